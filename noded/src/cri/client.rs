//! A CRI v1 client over the runtime's unix socket: status, version, and the pod/container/image calls
//! the probe and tests need. Nothing here knows which runtime answers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerFilter, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, ImageStatusRequest, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListContainersRequest, ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxFilter, PodSandboxMetadata, RemovePodSandboxRequest, RunPodSandboxRequest,
    StartContainerRequest, StatusRequest, StopPodSandboxRequest, VersionRequest,
};
use tonic::transport::Channel;
use tracing::debug;

use super::status::{CriStatus, CriVersion, RuntimeCondition};

/// Per-call deadline unless a caller gives its own.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on opening the socket.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to the CRI socket {socket}: {detail}")]
    Connect { socket: PathBuf, detail: String },
    /// `message` is the runtime's error, verbatim.
    #[error("CRI {op} failed ({code:?}): {message}")]
    Rpc {
        op: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("CRI {op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// The runtime's verbose `Status` info is not in the shape its reader expects (containerd's:
    /// [`crate::containerd::cri_plugin`]).
    #[error("CRI Status verbose info is not what containerd 1.6+ returns: {0}")]
    BadInfo(String),
    #[error(
        "image {image} is not known to the CRI plugin after {after:?} (imported into namespace k8s.io?)"
    )]
    ImageMissing { image: String, after: Duration },
}

impl CriError {
    /// The runtime's own message for RPC failures (what an operator greps for, e.g. containerd's "no
    /// runtime for "kata-qemu" is configured"), else the Display text.
    pub fn runtime_message(&self) -> String {
        match self {
            CriError::Rpc { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        parts.push(s.to_string());
        cur = s.source();
    }
    parts.join(": ")
}

/// What a container looks like to CRI right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub id: String,
    pub state: ContainerState,
    /// Meaningful once `state` is `ContainerExited`.
    pub exit_code: i32,
    pub reason: String,
    pub message: String,
    /// Host PID of the container's init process (containerd's verbose info), while it runs.
    pub pid: Option<u32>,
}

/// A pod sandbox to run: the minimal shape that works without CNI (host network, no hostname).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    pub name: String,
    pub uid: String,
    pub namespace: String,
    pub runtime_handler: String,
    /// Host network needs no CNI; Kata handlers generally need a pod network (`false`).
    pub host_network: bool,
    pub labels: BTreeMap<String, String>,
}

impl PodSpec {
    /// A pod with a unique name/uid (a failed sandbox keeps its name reserved until removed).
    pub fn unique(prefix: &str, runtime_handler: &str) -> Self {
        let uid = uuid::Uuid::new_v4().to_string();
        Self {
            name: format!("{prefix}-{}", &uid[..8]),
            uid,
            namespace: "noded".into(),
            runtime_handler: runtime_handler.into(),
            host_network: true,
            labels: BTreeMap::new(),
        }
    }

    fn namespace_options(&self) -> NamespaceOption {
        NamespaceOption {
            network: if self.host_network {
                NamespaceMode::Node as i32
            } else {
                NamespaceMode::Pod as i32
            },
            ..Default::default()
        }
    }

    pub fn to_cri(&self) -> PodSandboxConfig {
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: self.name.clone(),
                uid: self.uid.clone(),
                namespace: self.namespace.clone(),
                attempt: 0,
            }),
            labels: self.labels.clone().into_iter().collect(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(self.namespace_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// Client for a runtime's CRI services (RuntimeService + ImageService).
#[derive(Debug, Clone)]
pub struct CriClient {
    runtime: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
}

fn rpc_err(op: &'static str) -> impl FnOnce(tonic::Status) -> CriError {
    move |s| CriError::Rpc {
        op,
        code: s.code(),
        message: s.message().to_string(),
    }
}

async fn timed<T>(
    op: &'static str,
    after: Duration,
    fut: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, CriError> {
    match tokio::time::timeout(after, fut).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(rpc_err(op)(s)),
        Err(_) => Err(CriError::Timeout { op, after }),
    }
}

impl CriClient {
    /// Opens `socket` with the workspace's one unix-socket gRPC connector, `containerd_client::connect`
    /// (a plain tonic channel over a unix stream: nothing in it is specific to containerd). The channel
    /// has no per-call deadline; each call of this client bounds itself (see `timed`).
    pub async fn connect(socket: &Path) -> Result<Self, CriError> {
        let channel =
            match tokio::time::timeout(CONNECT_TIMEOUT, containerd_client::connect(socket)).await {
                Ok(Ok(ch)) => ch,
                Ok(Err(e)) => {
                    return Err(CriError::Connect {
                        socket: socket.to_path_buf(),
                        detail: format!("{e}: {}", source_chain(&e)),
                    });
                }
                Err(_) => {
                    return Err(CriError::Connect {
                        socket: socket.to_path_buf(),
                        detail: format!("timed out after {CONNECT_TIMEOUT:?}"),
                    });
                }
            };
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// The generated RuntimeService client, for calls this wrapper does not cover. Its calls carry no
    /// deadline: bound them with a timeout.
    pub fn runtime_service(&mut self) -> &mut RuntimeServiceClient<Channel> {
        &mut self.runtime
    }

    pub async fn version(&mut self) -> Result<CriVersion, CriError> {
        let r = timed(
            "Version",
            RPC_TIMEOUT,
            self.runtime.version(VersionRequest {
                version: "v1".into(),
            }),
        )
        .await?;
        Ok(CriVersion {
            runtime_name: r.runtime_name,
            runtime_version: r.runtime_version,
            runtime_api_version: r.runtime_api_version,
        })
    }

    /// `Status(verbose=true)`: conditions, the handlers the runtime serves, and its verbose info.
    pub async fn status_verbose(&mut self) -> Result<CriStatus, CriError> {
        let r = timed(
            "Status",
            RPC_TIMEOUT,
            self.runtime.status(StatusRequest { verbose: true }),
        )
        .await?;
        let conditions = r
            .status
            .map(|s| {
                s.conditions
                    .into_iter()
                    .map(|c| RuntimeCondition {
                        kind: c.r#type,
                        status: c.status,
                        reason: c.reason,
                        message: c.message,
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(CriStatus {
            conditions,
            runtime_handlers: r.runtime_handlers.into_iter().map(|h| h.name).collect(),
            info: r.info,
        })
    }

    /// Tags of the images the runtime pins (never garbage-collected: the sandbox image).
    pub async fn pinned_images(&mut self) -> Result<Vec<String>, CriError> {
        let r = timed(
            "ListImages",
            RPC_TIMEOUT,
            self.images
                .list_images(k8s_cri::v1::ListImagesRequest { filter: None }),
        )
        .await?;
        Ok(r.images
            .into_iter()
            .filter(|i| i.pinned)
            .flat_map(|i| i.repo_tags)
            .collect())
    }

    /// Whether the CRI plugin knows the image (by name or id).
    pub async fn image_present(&mut self, image: &str) -> Result<bool, CriError> {
        let r = timed(
            "ImageStatus",
            RPC_TIMEOUT,
            self.images.image_status(ImageStatusRequest {
                image: Some(ImageSpec {
                    image: image.into(),
                    ..Default::default()
                }),
                verbose: false,
            }),
        )
        .await?;
        Ok(r.image.is_some())
    }

    /// Waits until the CRI plugin has picked up an image containerd just imported (it learns about it
    /// from an image event, asynchronously).
    pub async fn wait_image(&mut self, image: &str, timeout: Duration) -> Result<(), CriError> {
        let start = Instant::now();
        loop {
            if self.image_present(image).await? {
                return Ok(());
            }
            if start.elapsed() >= timeout {
                return Err(CriError::ImageMissing {
                    image: image.into(),
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `RunPodSandbox`; returns the sandbox id.
    pub async fn run_pod(&mut self, pod: &PodSpec, timeout: Duration) -> Result<String, CriError> {
        let r = timed(
            "RunPodSandbox",
            timeout,
            self.runtime.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(pod.to_cri()),
                runtime_handler: pod.runtime_handler.clone(),
            }),
        )
        .await?;
        debug!(sandbox = %r.pod_sandbox_id, handler = %pod.runtime_handler, "pod sandbox running");
        Ok(r.pod_sandbox_id)
    }

    /// `CreateContainer` running `command` from `image` in the sandbox; returns the container id.
    pub async fn create_container(
        &mut self,
        sandbox_id: &str,
        pod: &PodSpec,
        name: &str,
        image: &str,
        command: &[&str],
        timeout: Duration,
    ) -> Result<String, CriError> {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.into(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.into(),
                ..Default::default()
            }),
            command: command.iter().map(|s| (*s).to_string()).collect(),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(pod.namespace_options()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = timed(
            "CreateContainer",
            timeout,
            // Boxed: the request (two full sandbox configs) makes a large future.
            Box::pin(self.runtime.create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox_id.into(),
                config: Some(config),
                sandbox_config: Some(pod.to_cri()),
            })),
        )
        .await?;
        Ok(r.container_id)
    }

    pub async fn start_container(
        &mut self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<(), CriError> {
        timed(
            "StartContainer",
            timeout,
            self.runtime.start_container(StartContainerRequest {
                container_id: container_id.into(),
            }),
        )
        .await?;
        Ok(())
    }

    pub async fn container_info(&mut self, container_id: &str) -> Result<ContainerInfo, CriError> {
        let r = timed(
            "ContainerStatus",
            RPC_TIMEOUT,
            self.runtime.container_status(ContainerStatusRequest {
                container_id: container_id.into(),
                verbose: true,
            }),
        )
        .await?;
        let pid = r
            .info
            .get("info")
            .and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok())
            .and_then(|v| v["pid"].as_u64())
            .and_then(|p| u32::try_from(p).ok())
            .filter(|p| *p > 0);
        let s = r.status.ok_or_else(|| CriError::Rpc {
            op: "ContainerStatus",
            code: tonic::Code::NotFound,
            message: format!("no status for container {container_id}"),
        })?;
        Ok(ContainerInfo {
            id: s.id,
            state: ContainerState::try_from(s.state).unwrap_or(ContainerState::ContainerUnknown),
            exit_code: s.exit_code,
            reason: s.reason,
            message: s.message,
            pid,
        })
    }

    /// Polls until the container has exited; returns its final status.
    pub async fn wait_exited(
        &mut self,
        container_id: &str,
        timeout: Duration,
    ) -> Result<ContainerInfo, CriError> {
        let start = Instant::now();
        loop {
            let info = self.container_info(container_id).await?;
            if info.state == ContainerState::ContainerExited {
                return Ok(info);
            }
            if start.elapsed() >= timeout {
                return Err(CriError::Timeout {
                    op: "waiting for container exit",
                    after: timeout,
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `StopPodSandbox` + `RemovePodSandbox` (which removes the sandbox's containers too).
    pub async fn remove_pod(
        &mut self,
        sandbox_id: &str,
        timeout: Duration,
    ) -> Result<(), CriError> {
        // containerd 2.x can answer `ttrpc: closed` while the sandbox's shim is exiting under the
        // call; the sandbox is stopped a moment later, so the stop is retried briefly.
        let mut attempt = 0;
        loop {
            let stop = timed(
                "StopPodSandbox",
                timeout,
                self.runtime.stop_pod_sandbox(StopPodSandboxRequest {
                    pod_sandbox_id: sandbox_id.into(),
                }),
            )
            .await;
            match stop {
                Ok(_) => break,
                Err(CriError::Rpc { message, .. })
                    if message.contains("ttrpc: closed") && attempt < 5 =>
                {
                    attempt += 1;
                    debug!(sandbox = %sandbox_id, attempt, "StopPodSandbox: ttrpc closed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e),
            }
        }
        timed(
            "RemovePodSandbox",
            timeout,
            self.runtime.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: sandbox_id.into(),
            }),
        )
        .await?;
        debug!(sandbox = %sandbox_id, "pod sandbox removed");
        Ok(())
    }

    /// Every sandbox (any state) with its labels.
    pub async fn list_pods(&mut self) -> Result<Vec<k8s_cri::v1::PodSandbox>, CriError> {
        let r = timed(
            "ListPodSandbox",
            RPC_TIMEOUT,
            self.runtime
                .list_pod_sandbox(ListPodSandboxRequest { filter: None }),
        )
        .await?;
        Ok(r.items)
    }

    /// Ids of sandboxes (any state) whose labels include all of `labels`.
    pub async fn pods_with_labels(
        &mut self,
        labels: &BTreeMap<String, String>,
    ) -> Result<Vec<String>, CriError> {
        let r = timed(
            "ListPodSandbox",
            RPC_TIMEOUT,
            self.runtime.list_pod_sandbox(ListPodSandboxRequest {
                filter: Some(PodSandboxFilter {
                    label_selector: labels.clone().into_iter().collect(),
                    ..Default::default()
                }),
            }),
        )
        .await?;
        Ok(r.items.into_iter().map(|p| p.id).collect())
    }

    /// Ids of all sandboxes (any state).
    pub async fn all_pods(&mut self) -> Result<Vec<String>, CriError> {
        self.pods_with_labels(&BTreeMap::new()).await
    }

    /// Ids of all containers (any state), optionally only those of one sandbox.
    pub async fn containers(&mut self, sandbox_id: Option<&str>) -> Result<Vec<String>, CriError> {
        let r = timed(
            "ListContainers",
            RPC_TIMEOUT,
            self.runtime.list_containers(ListContainersRequest {
                filter: Some(ContainerFilter {
                    pod_sandbox_id: sandbox_id.unwrap_or_default().into(),
                    ..Default::default()
                }),
            }),
        )
        .await?;
        Ok(r.containers.into_iter().map(|c| c.id).collect())
    }
}

/// Connects and waits until CRI answers: right after the runtime (re)starts its socket is up before CRI
/// has recovered its state (containerd: every call fails with "server is not initialized yet").
pub async fn wait_ready(socket: &Path, timeout: Duration) -> Result<CriClient, CriError> {
    let start = Instant::now();
    loop {
        let attempt = async {
            let mut c = CriClient::connect(socket).await?;
            c.version().await?;
            Ok::<_, CriError>(c)
        };
        match attempt.await {
            Ok(c) => return Ok(c),
            Err(e) if start.elapsed() >= timeout => return Err(e),
            Err(e) => debug!(error = %e, "CRI not ready yet"),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
