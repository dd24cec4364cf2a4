//! A CRI v1 client over containerd's unix socket: runtime status (which handlers containerd really loaded),
//! version, and the pod/container calls the probe and tests need.

use std::collections::{BTreeMap, HashMap};
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
use serde::Deserialize;
use tonic::transport::{Channel, Endpoint, Uri};
use tracing::debug;

/// Per-call deadline unless a caller gives its own.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CriError {
    #[error("cannot connect to containerd's CRI socket {socket}: {detail}")]
    Connect { socket: PathBuf, detail: String },
    /// `message` is containerd's error, verbatim.
    #[error("CRI {op} failed ({code:?}): {message}")]
    Rpc {
        op: &'static str,
        code: tonic::Code,
        message: String,
    },
    #[error("CRI {op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    #[error("CRI Status verbose info is not what containerd 1.6+ returns: {0}")]
    BadInfo(String),
    #[error(
        "image {image} is not known to the CRI plugin after {after:?} (imported into namespace k8s.io?)"
    )]
    ImageMissing { image: String, after: Duration },
}

impl CriError {
    /// containerd's own message for RPC failures (what an operator greps for), else the Display text.
    pub fn containerd_message(&self) -> String {
        match self {
            CriError::Rpc { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }
}

/// A tonic channel to a unix socket; `rpc_timeout` bounds each call.
pub async fn unix_channel(socket: &Path, rpc_timeout: Duration) -> Result<Channel, CriError> {
    let path = socket.to_path_buf();
    let endpoint = Endpoint::from_static("http://[::]")
        .timeout(rpc_timeout)
        .connect_timeout(Duration::from_secs(5));
    let connect = endpoint.connect_with_connector(tower::service_fn(move |_: Uri| {
        let path = path.clone();
        async move {
            Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                tokio::net::UnixStream::connect(path).await?,
            ))
        }
    }));
    match tokio::time::timeout(Duration::from_secs(5), connect).await {
        Ok(Ok(ch)) => Ok(ch),
        Ok(Err(e)) => Err(CriError::Connect {
            socket: socket.to_path_buf(),
            detail: format!("{e}: {}", source_chain(&e)),
        }),
        Err(_) => Err(CriError::Connect {
            socket: socket.to_path_buf(),
            detail: "timed out after 5s".into(),
        }),
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

/// One runtime handler as containerd's CRI plugin has it loaded (from `Status(verbose).info["config"]`).
#[derive(Debug, Clone, PartialEq, Deserialize, Default)]
pub struct HandlerInfo {
    /// e.g. `io.containerd.runc.v2`, `io.containerd.kata-qemu.v2`.
    #[serde(rename = "runtimeType", default)]
    pub runtime_type: String,
    #[serde(rename = "runtimePath", default)]
    pub runtime_path: String,
    #[serde(rename = "PodAnnotations", default)]
    pub pod_annotations: Option<Vec<String>>,
    #[serde(rename = "privileged_without_host_devices", default)]
    pub privileged_without_host_devices: bool,
    #[serde(default)]
    pub snapshotter: String,
    /// The handler's `options` table as containerd parsed it (runtime specific, e.g. runc's
    /// `SystemdCgroup`, Kata's `ConfigPath`).
    #[serde(default)]
    pub options: Option<BTreeMap<String, serde_json::Value>>,
}

impl HandlerInfo {
    /// `options.ConfigPath` (Kata handlers).
    pub fn config_path(&self) -> Option<&str> {
        self.options.as_ref()?.get("ConfigPath")?.as_str()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeCondition {
    pub kind: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

/// CRI `Status(verbose=true)`, parsed.
#[derive(Debug, Clone, PartialEq)]
pub struct CriStatus {
    /// `RuntimeReady`, `NetworkReady` (false without CNI config; host-network pods still work).
    pub conditions: Vec<RuntimeCondition>,
    pub default_runtime_name: String,
    /// The CRI plugin's sandbox image as containerd 1.x reports it; empty on containerd 2.x, whose
    /// Status no longer carries the image config (see [`CriClient::sandbox_image`]).
    pub sandbox_image: String,
    pub handlers: BTreeMap<String, HandlerInfo>,
    /// Names of the handlers the runtime lists in `StatusResponse.runtime_handlers` (containerd 2.x;
    /// empty on 1.x). The default handler appears as `""`.
    pub runtime_handlers: Vec<String>,
}

impl CriStatus {
    pub fn runtime_ready(&self) -> bool {
        self.conditions
            .iter()
            .any(|c| c.kind == "RuntimeReady" && c.status)
    }
}

#[derive(Deserialize)]
struct VerboseConfig {
    containerd: VerboseContainerd,
    #[serde(rename = "sandboxImage", default)]
    sandbox_image: String,
}

#[derive(Deserialize)]
struct VerboseContainerd {
    #[serde(rename = "defaultRuntimeName", default)]
    default_runtime_name: String,
    #[serde(default)]
    runtimes: Option<BTreeMap<String, HandlerInfo>>,
}

/// Parses the verbose `info` map of a CRI `StatusResponse`.
pub fn parse_status_info(
    info: &HashMap<String, String>,
) -> Result<(String, String, BTreeMap<String, HandlerInfo>), CriError> {
    let config = info
        .get("config")
        .ok_or_else(|| CriError::BadInfo("no \"config\" key".into()))?;
    let parsed: VerboseConfig = serde_json::from_str(config)
        .map_err(|e| CriError::BadInfo(format!("info[\"config\"]: {e}")))?;
    Ok((
        parsed.containerd.default_runtime_name,
        parsed.sandbox_image,
        parsed.containerd.runtimes.unwrap_or_default(),
    ))
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CriVersion {
    pub runtime_name: String,
    pub runtime_version: String,
    pub runtime_api_version: String,
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

/// Client for containerd's CRI plugin (RuntimeService + ImageService).
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
    pub async fn connect(socket: &Path) -> Result<Self, CriError> {
        // Per-call deadlines are enforced with tokio timeouts (each call names its own).
        let channel = unix_channel(socket, Duration::from_secs(600)).await?;
        Ok(Self {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }

    /// The generated RuntimeService client, for calls this wrapper does not cover.
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
        let (default_runtime_name, sandbox_image, handlers) = parse_status_info(&r.info)?;
        Ok(CriStatus {
            conditions,
            default_runtime_name,
            sandbox_image,
            handlers,
            runtime_handlers: r.runtime_handlers.into_iter().map(|h| h.name).collect(),
        })
    }

    /// The sandbox (pause) image: containerd 1.x reports it in Status; containerd 2.x only pins it
    /// (`pinned_images.sandbox`), so it is the pinned image CRI lists (None while not present).
    pub async fn sandbox_image(&mut self) -> Result<Option<String>, CriError> {
        let status = self.status_verbose().await?;
        if !status.sandbox_image.is_empty() {
            return Ok(Some(status.sandbox_image));
        }
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
            .next())
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

/// Connects and waits until the CRI plugin answers: right after containerd (re)starts its socket is up
/// before the CRI plugin has recovered its state, and every CRI call fails with "server is not
/// initialized yet" until then.
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

/// The runtime handlers containerd's CRI plugin has loaded right now (what the config applier verifies
/// after a restart).
pub async fn loaded_handlers(socket: &Path) -> Result<BTreeMap<String, HandlerInfo>, CriError> {
    Ok(CriClient::connect(socket)
        .await?
        .status_verbose()
        .await?
        .handlers)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn parses_containerd_16_verbose_config() {
        let config = r#"{"containerd":{"snapshotter":"overlayfs","defaultRuntimeName":"runc",
            "runtimes":{"runc":{"runtimeType":"io.containerd.runc.v2","runtimePath":"","runtimeEngine":"",
            "PodAnnotations":null,"ContainerAnnotations":null,"runtimeRoot":"","options":{"SystemdCgroup":false},
            "privileged_without_host_devices":false,"baseRuntimeSpec":"","cniConfDir":"","cniMaxConfNum":0},
            "kata-qemu":{"runtimeType":"io.containerd.kata-qemu.v2","runtimePath":"/opt/kata/bin/containerd-shim-kata-v2",
            "PodAnnotations":["io.katacontainers.*"],"options":{"ConfigPath":"/opt/kata/share/defaults/kata-containers/configuration-qemu.toml"},
            "privileged_without_host_devices":true}}},"sandboxImage":"noded.local/pause:1"}"#;
        let info = HashMap::from([("config".to_string(), config.to_string())]);
        let (default, sandbox, handlers) = parse_status_info(&info).unwrap();
        assert_eq!(default, "runc");
        assert_eq!(sandbox, "noded.local/pause:1");
        assert_eq!(handlers["runc"].runtime_type, "io.containerd.runc.v2");
        let kata = &handlers["kata-qemu"];
        assert!(kata.privileged_without_host_devices);
        assert_eq!(
            kata.pod_annotations.as_deref(),
            Some(&["io.katacontainers.*".to_string()][..])
        );
        assert_eq!(
            kata.config_path(),
            Some("/opt/kata/share/defaults/kata-containers/configuration-qemu.toml")
        );
    }

    /// containerd 2.1's verbose config has no `sandboxImage` (the image config moved out of Status).
    #[test]
    fn parses_containerd_21_verbose_config_without_sandbox_image() {
        let config = r#"{"containerd":{"defaultRuntimeName":"runc","runtimes":{"runc":{"runtimeType":"io.containerd.runc.v2",
            "options":{"SystemdCgroup":false},"sandboxer":"podsandbox","io_type":""}}},"cni":{"binDirs":["/x"]},
            "disableApparmor":true,"restrictOOMScoreAdj":true}"#;
        let info = HashMap::from([("config".to_string(), config.to_string())]);
        let (default, sandbox, handlers) = parse_status_info(&info).unwrap();
        assert_eq!(default, "runc");
        assert_eq!(sandbox, "");
        assert_eq!(handlers["runc"].runtime_type, "io.containerd.runc.v2");
    }

    #[test]
    fn missing_config_is_an_error() {
        assert!(matches!(
            parse_status_info(&HashMap::new()),
            Err(CriError::BadInfo(_))
        ));
    }
}
