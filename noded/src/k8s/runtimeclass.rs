//! RuntimeClasses `kata-qemu`, `kata-qemu-warm` (and `kata-clh`, … when configured), owned by noded
//! through server-side apply: field manager `noded`, `force` so a kata-deploy leftover does not block the
//! takeover, handler = name, overhead from the measured per-VM cost.

use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{Value, json};

use super::signals::OVERHEAD_CPU;
use super::{FIELD_MANAGER, KATA_RUNTIME_LABEL};

/// The apply body for one RuntimeClass.
pub fn runtime_class(name: &str, overhead_mib: u64) -> Value {
    json!({
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/managed-by": "noded"},
        },
        "handler": name,
        "overhead": {"podFixed": {"memory": format!("{overhead_mib}Mi"), "cpu": OVERHEAD_CPU}},
        "scheduling": {
            // The node label Karpenter NodePools set at birth; readiness is the startup taint, which
            // these pods deliberately do NOT tolerate.
            "nodeSelector": {KATA_RUNTIME_LABEL: "true"},
            "tolerations": [{"key": "kata", "operator": "Equal", "value": "true", "effect": "NoSchedule"}],
        },
    })
}

/// Which configured runtime handlers get a RuntimeClass: the Kata ones (`runc` in local mode does not).
pub fn class_names(runtimes: &[String]) -> Vec<String> {
    runtimes
        .iter()
        .filter(|r| r.starts_with("kata-"))
        .cloned()
        .collect()
}

pub async fn apply(
    client: &Client,
    name: &str,
    overhead_mib: u64,
) -> Result<RuntimeClass, kube::Error> {
    let api = Api::<RuntimeClass>::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(
        name,
        &params,
        &Patch::Apply(runtime_class(name, overhead_mib)),
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_is_a_valid_runtime_class() {
        let rc: RuntimeClass =
            serde_json::from_value(runtime_class("kata-qemu", 170)).expect("valid RuntimeClass");
        assert_eq!(rc.handler, "kata-qemu");
        let overhead = rc.overhead.and_then(|o| o.pod_fixed).expect("overhead");
        assert_eq!(overhead["memory"].0, "170Mi");
        let sched = rc.scheduling.expect("scheduling");
        assert_eq!(
            sched.node_selector.expect("selector")["katacontainers.io/kata-runtime"],
            "true"
        );
    }

    #[test]
    fn only_kata_handlers_get_classes() {
        let names = class_names(&["kata-qemu".into(), "runc".into(), "kata-clh".into()]);
        assert_eq!(names, vec!["kata-qemu".to_string(), "kata-clh".to_string()]);
    }
}
