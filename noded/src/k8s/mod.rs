//! Kubernetes publisher: proves-then-untaints the node, owns the Kata RuntimeClasses, and publishes
//! scheduler signals (labels, `noded.io/vm-slots`, the `KataRuntimeReady` condition, Events).
//!
//! Entry points: [`publisher::channels`] for the inputs, [`publisher::PublisherSettings::from_config`],
//! [`publisher::spawn`] (its own task; never blocks the rest of noded).

pub mod daemon;
pub mod events;
pub(crate) mod feed;
pub(crate) mod node;
pub(crate) mod publisher;
pub mod retry;
pub mod runtimeclass;
pub mod signals;

pub use publisher::{
    Capacity, HandlerHealth, Notice, PublisherHandles, PublisherInputs, PublisherSettings,
    PublisherStatus, Readiness, RuntimeHealth, channels, run_with_client, spawn,
};

/// Label for humans and dashboards (readiness for the scheduler is the startup taint).
pub const LABEL_KATA_READY: &str = "noded.io/kata-ready";
pub const LABEL_VM_SLOTS_FREE: &str = "noded.io/vm-slots-free";
pub const LABEL_BOOT_P50_MS: &str = "noded.io/boot-p50-ms";
pub const LABEL_WARM_TEMPLATES: &str = "noded.io/warm-templates";
/// Extended resource pods request to get a VM slot.
pub const RESOURCE_VM_SLOTS: &str = "noded.io/vm-slots";
pub const CONDITION_KATA_RUNTIME_READY: &str = "KataRuntimeReady";
/// Kata's warm path works: the factory template is built and a probe sandbox was restored from it.
pub const CONDITION_KATA_WARM_TEMPLATE_READY: &str = "KataWarmTemplateReady";
/// Field manager for every write (server-side apply and patches).
pub const FIELD_MANAGER: &str = "noded";
/// Label Karpenter NodePools put on Kata nodes at birth; RuntimeClasses select on it.
pub const KATA_RUNTIME_LABEL: &str = "katacontainers.io/kata-runtime";

#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    #[error(
        "no Kubernetes client configuration (in-cluster service account or kubeconfig): {0}; the node stays tainted until noded can reach the API server"
    )]
    ClientConfig(#[source] kube::Error),
    #[error(
        "node name unknown: set [kubernetes] node_name in noded.toml or NODE_NAME (downward API fieldRef spec.nodeName)"
    )]
    NoNodeName,
    #[error(
        "no runtime handler to prove: set [probe] handlers or [containerd] runtimes; the startup taint is never lifted without a probe"
    )]
    NoHandlers,
    #[error("Kubernetes API: {verb} {what}: {source}")]
    Api {
        verb: &'static str,
        what: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "node {node}: the startup-taint patch conflicted {attempts} times in a row (another writer keeps changing the taints); retrying later"
    )]
    Conflict { node: String, attempts: u32 },
}

impl K8sError {
    pub fn class(&self) -> retry::ErrorClass {
        match self {
            K8sError::Api { source, .. } => retry::classify(source),
            K8sError::Conflict { .. } => retry::ErrorClass::Conflict,
            K8sError::ClientConfig(_) | K8sError::NoNodeName | K8sError::NoHandlers => {
                retry::ErrorClass::Permanent
            }
        }
    }
}
