//! A minimal kubelet stand-in: runs the pod of a DaemonSet (parsed from its YAML, not retyped) on a
//! real containerd through CRI v1, the way kubelet does for a DaemonSet pod bound to this node.
//!
//! What it renders, as kubelet would: sandbox metadata (DaemonSet-style pod name, namespace, uid,
//! attempt), the `io.kubernetes.pod.*` labels, a log directory, `hostNetwork`/`hostPID`/`hostIPC` as
//! NODE namespaces, the container's image, command/args, env (literal values, `$(VAR)` expansion and
//! `fieldRef` of `spec.nodeName`, `metadata.name/namespace/uid`, `spec.serviceAccountName`), the
//! privileged security context, memory limit and CPU shares, and every volumeMount from its
//! `hostPath` volume with kubelet's hostPath `type` checks (creating `DirectoryOrCreate` and
//! `FileOrCreate` paths), `readOnly`, `subPath` and `mountPropagation`. It does not pull images (the
//! image must already be in containerd's `k8s.io` namespace), set up DNS or a pod network, run
//! liveness probes or init containers, or mount service account tokens.
//!
//! Lifecycle: [`PodRunner::start`] (RunPodSandbox, CreateContainer, StartContainer),
//! [`PodRunner::wait_ready`] (the readinessProbe's httpGet on 127.0.0.1), [`PodRunner::kill9`],
//! [`PodRunner::restart_if_exited`] (restartPolicy Always: a new attempt in the same sandbox),
//! [`PodRunner::stop`], [`PodRunner::delete`]; dropping a started runner removes its sandbox.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, CreateContainerRequest, ImageSpec,
    KeyValue, LinuxContainerConfig, LinuxContainerResources, LinuxContainerSecurityContext,
    LinuxPodSandboxConfig, LinuxSandboxSecurityContext, Mount, MountPropagation, NamespaceMode,
    NamespaceOption, PodSandboxConfig, PodSandboxMetadata, RemovePodSandboxRequest,
    RunPodSandboxRequest, StopContainerRequest, StopPodSandboxRequest,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{Container, PodSpec, Probe, Volume};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use noded::cri::{CriClient, CriError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Per-call deadline for the CRI calls the runner makes.
const CRI_TIMEOUT: Duration = Duration::from_secs(60);
/// kubelet's default when the pod does not say.
const DEFAULT_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum KubeletError {
    #[error("cannot read DaemonSet manifest {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("DaemonSet manifest {what} does not parse: {detail}")]
    Parse { what: String, detail: String },
    /// The manifest asks for something this stand-in does not do (or that kubelet would reject).
    #[error("DaemonSet {field}: {detail}")]
    Manifest { field: String, detail: String },
    #[error("hostPath type check failed for volume {volume}: {path} {detail}")]
    HostPath {
        volume: String,
        path: PathBuf,
        detail: String,
    },
    #[error(
        "image {0} is not in containerd's k8s.io namespace (the stand-in does not pull; import it first)"
    )]
    ImageMissing(String),
    #[error(transparent)]
    Cri(#[from] CriError),
    #[error("{what}: {detail}")]
    Io { what: String, detail: String },
    #[error("pod {pod} not ready after {after:?}: {detail}")]
    NotReady {
        pod: String,
        after: Duration,
        detail: String,
    },
    #[error("pod {0} is not started")]
    NotStarted(String),
}

/// Maps a path as the manifest names it (a node path) to another path.
pub type PathMap = Arc<dyn Fn(&Path) -> PathBuf + Send + Sync>;

/// A file or directory bind-mounted into the container besides the manifest's volumeMounts (e.g. the
/// kubeconfig of a fake API server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraMount {
    /// As containerd sees it (not passed through the hostPath mapping).
    pub host_path: PathBuf,
    pub container_path: PathBuf,
    pub readonly: bool,
}

/// How to run the pod on this node.
#[derive(Clone)]
pub struct PodOptions {
    pub node_name: String,
    /// Node path → the path given to containerd. Identity by default (containerd runs where the node
    /// paths are the box's, e.g. in a mount namespace).
    pub host_path: PathMap,
    /// Node path → where this process checks and creates it for the hostPath `type` (kubelet does this
    /// in its own mount namespace). Default: the same as `host_path`. When containerd runs in another
    /// mount namespace, `/proc/<containerd pid>/root/<path>` reaches its view.
    pub check_path: Option<PathMap>,
    /// Appended to the container's env, as kubelet adds `KUBERNETES_SERVICE_HOST` and friends.
    pub extra_env: Vec<(String, String)>,
    pub extra_mounts: Vec<ExtraMount>,
    /// Replaces the container's image (e.g. the locally built image imported under another name).
    pub image: Option<String>,
    /// Which container of the pod template to run (default: the first).
    pub container: Option<String>,
    /// CRI runtime handler of the sandbox: "" = containerd's default (runc), as for a pod without
    /// `runtimeClassName`.
    pub runtime_handler: String,
    /// Root of the pod log directories (kubelet's `/var/log/pods`); default: a temp dir of the runner.
    pub log_root: Option<PathBuf>,
}

impl std::fmt::Debug for PodOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodOptions")
            .field("node_name", &self.node_name)
            .field("extra_env", &self.extra_env)
            .field("extra_mounts", &self.extra_mounts)
            .field("image", &self.image)
            .field("container", &self.container)
            .field("runtime_handler", &self.runtime_handler)
            .field("log_root", &self.log_root)
            .finish_non_exhaustive()
    }
}

impl PodOptions {
    pub fn new(node_name: &str) -> Self {
        Self {
            node_name: node_name.into(),
            host_path: Arc::new(Path::to_path_buf),
            check_path: None,
            extra_env: Vec::new(),
            extra_mounts: Vec::new(),
            image: None,
            container: None,
            runtime_handler: String::new(),
            log_root: None,
        }
    }

    pub fn host_path(mut self, f: impl Fn(&Path) -> PathBuf + Send + Sync + 'static) -> Self {
        self.host_path = Arc::new(f);
        self
    }

    pub fn check_path(mut self, f: impl Fn(&Path) -> PathBuf + Send + Sync + 'static) -> Self {
        self.check_path = Some(Arc::new(f));
        self
    }

    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.extra_env.push((name.into(), value.into()));
        self
    }

    pub fn mount(mut self, host_path: &Path, container_path: &Path, readonly: bool) -> Self {
        self.extra_mounts.push(ExtraMount {
            host_path: host_path.into(),
            container_path: container_path.into(),
            readonly,
        });
        self
    }

    pub fn image(mut self, image: &str) -> Self {
        self.image = Some(image.into());
        self
    }

    pub fn log_root(mut self, dir: &Path) -> Self {
        self.log_root = Some(dir.into());
        self
    }
}

/// Parses a DaemonSet manifest (one YAML document).
pub fn parse_daemonset(yaml: &str) -> Result<DaemonSet, KubeletError> {
    serde_norway::from_str(yaml).map_err(|e| KubeletError::Parse {
        what: "text".into(),
        detail: e.to_string(),
    })
}

/// Reads and parses a DaemonSet manifest file.
pub fn read_daemonset(path: &Path) -> Result<DaemonSet, KubeletError> {
    let text = std::fs::read_to_string(path).map_err(|source| KubeletError::Read {
        path: path.into(),
        source,
    })?;
    serde_norway::from_str(&text).map_err(|e| KubeletError::Parse {
        what: path.display().to_string(),
        detail: e.to_string(),
    })
}

/// One hostPath the pod needs, with kubelet's `type` check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPathCheck {
    pub volume: String,
    /// As the manifest names it.
    pub node_path: PathBuf,
    /// `""`, `Directory`, `DirectoryOrCreate`, `File`, `FileOrCreate`, `Socket`, `CharDevice`,
    /// `BlockDevice`.
    pub type_: String,
}

/// The readinessProbe's httpGet, resolved to a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpProbe {
    pub path: String,
    pub port: u16,
}

/// The pod rendered into CRI requests (pure: no side effects, for inspection in tests).
#[derive(Debug, Clone)]
pub struct RenderedPod {
    pub sandbox: PodSandboxConfig,
    /// The container config for attempt 0 (later attempts change only `metadata.attempt` and the
    /// log path).
    pub container: ContainerConfig,
    pub host_paths: Vec<HostPathCheck>,
    pub readiness: Option<HttpProbe>,
    pub grace: Duration,
    pub restart_policy: String,
}

impl RenderedPod {
    pub fn pod_name(&self) -> &str {
        self.sandbox
            .metadata
            .as_ref()
            .map(|m| m.name.as_str())
            .unwrap_or_default()
    }

    /// The CRI mount at `container_path`, if any.
    pub fn mount(&self, container_path: &str) -> Option<&Mount> {
        self.container
            .mounts
            .iter()
            .find(|m| m.container_path == container_path)
    }

    /// The env value the container gets for `name`.
    pub fn env(&self, name: &str) -> Option<&str> {
        self.container
            .envs
            .iter()
            .rev()
            .find(|kv| kv.key == name)
            .map(|kv| kv.value.as_str())
    }

    fn container_for_attempt(&self, attempt: u32) -> ContainerConfig {
        let mut c = self.container.clone();
        let name = c
            .metadata
            .as_ref()
            .map(|m| m.name.clone())
            .unwrap_or_default();
        c.metadata = Some(ContainerMetadata {
            name: name.clone(),
            attempt,
        });
        c.log_path = format!("{name}/{attempt}.log");
        c.annotations.insert(
            "io.kubernetes.container.restartCount".into(),
            attempt.to_string(),
        );
        c
    }
}

fn manifest_err(field: impl Into<String>, detail: impl Into<String>) -> KubeletError {
    KubeletError::Manifest {
        field: field.into(),
        detail: detail.into(),
    }
}

/// Renders the DaemonSet's pod for `node` into CRI configs. `log_root` is kubelet's `/var/log/pods`.
pub fn render(
    ds: &DaemonSet,
    opts: &PodOptions,
    log_root: &Path,
) -> Result<RenderedPod, KubeletError> {
    let ds_name = ds
        .metadata
        .name
        .clone()
        .ok_or_else(|| manifest_err("metadata.name", "missing"))?;
    let namespace = ds
        .metadata
        .namespace
        .clone()
        .unwrap_or_else(|| "default".into());
    let template = &ds.spec.template;
    let spec: &PodSpec = template
        .spec
        .as_ref()
        .ok_or_else(|| manifest_err("spec.template.spec", "missing"))?;
    let uid = uuid::Uuid::new_v4().to_string();
    // The DaemonSet controller names pods `<daemonset>-<5 random chars>`.
    let pod_name = format!("{ds_name}-{}", &uid.replace('-', "")[..5]);

    let container = match &opts.container {
        Some(name) => spec
            .containers
            .iter()
            .find(|c| &c.name == name)
            .ok_or_else(|| {
                manifest_err(
                    "spec.template.spec.containers",
                    format!("no container named {name}"),
                )
            })?,
        None => spec
            .containers
            .first()
            .ok_or_else(|| manifest_err("spec.template.spec.containers", "empty"))?,
    };
    let cfield = format!("spec.template.spec.containers[{}]", container.name);

    let host_network = spec.host_network.unwrap_or(false);
    let host_pid = spec.host_pid.unwrap_or(false);
    let host_ipc = spec.host_ipc.unwrap_or(false);
    let node = |on: bool, otherwise: NamespaceMode| {
        if on {
            NamespaceMode::Node as i32
        } else {
            otherwise as i32
        }
    };
    let sandbox_ns = NamespaceOption {
        network: node(host_network, NamespaceMode::Pod),
        pid: node(host_pid, NamespaceMode::Pod),
        ipc: node(host_ipc, NamespaceMode::Pod),
        ..Default::default()
    };
    let container_ns = NamespaceOption {
        network: node(host_network, NamespaceMode::Pod),
        // kubelet: the container's own PID namespace unless hostPID (or shareProcessNamespace).
        pid: node(
            host_pid,
            if spec.share_process_namespace.unwrap_or(false) {
                NamespaceMode::Pod
            } else {
                NamespaceMode::Container
            },
        ),
        ipc: node(host_ipc, NamespaceMode::Pod),
        ..Default::default()
    };
    let any_privileged = spec.containers.iter().any(is_privileged);

    let mut pod_labels: HashMap<String, String> = template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    pod_labels.insert("io.kubernetes.pod.name".into(), pod_name.clone());
    pod_labels.insert("io.kubernetes.pod.namespace".into(), namespace.clone());
    pod_labels.insert("io.kubernetes.pod.uid".into(), uid.clone());
    let pod_annotations: HashMap<String, String> = template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();

    let sandbox = PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: pod_name.clone(),
            uid: uid.clone(),
            namespace: namespace.clone(),
            attempt: 0,
        }),
        // Empty: with host network containerd uses the node's hostname; a pod network would need CNI.
        hostname: String::new(),
        log_directory: log_root
            .join(format!("{namespace}_{pod_name}_{uid}"))
            .display()
            .to_string(),
        labels: pod_labels.clone(),
        annotations: pod_annotations,
        linux: Some(LinuxPodSandboxConfig {
            // Left default: containerd's own cgroup parent (kubelet would pass its kubepods slice).
            cgroup_parent: String::new(),
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(sandbox_ns),
                privileged: any_privileged,
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };

    let field_value = |path: &str| -> Option<String> {
        Some(match path {
            "spec.nodeName" => opts.node_name.clone(),
            "metadata.name" => pod_name.clone(),
            "metadata.namespace" => namespace.clone(),
            "metadata.uid" => uid.clone(),
            "spec.serviceAccountName" => spec.service_account_name.clone().unwrap_or_default(),
            _ => return None,
        })
    };
    let mut envs: Vec<(String, String)> = Vec::new();
    for (i, e) in container.env.iter().flatten().enumerate() {
        let value = match (&e.value, &e.value_from) {
            (_, Some(from)) => {
                let fr = from.field_ref.as_ref().ok_or_else(|| {
                    manifest_err(
                        format!("{cfield}.env[{i}] ({})", e.name),
                        "only valueFrom.fieldRef is supported by the kubelet stand-in",
                    )
                })?;
                field_value(&fr.field_path).ok_or_else(|| {
                    manifest_err(
                        format!(
                            "{cfield}.env[{i}] ({}).valueFrom.fieldRef.fieldPath",
                            e.name
                        ),
                        format!("unsupported field {}", fr.field_path),
                    )
                })?
            }
            (Some(v), None) => expand(v, &envs),
            (None, None) => String::new(),
        };
        envs.push((e.name.clone(), value));
    }
    envs.extend(opts.extra_env.iter().cloned());

    let volumes: BTreeMap<&str, &Volume> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| (v.name.as_str(), v))
        .collect();
    let mut mounts = Vec::new();
    let mut host_paths = Vec::new();
    for (i, vm) in container.volume_mounts.iter().flatten().enumerate() {
        let field = format!("{cfield}.volumeMounts[{i}] ({})", vm.name);
        let vol = volumes.get(vm.name.as_str()).ok_or_else(|| {
            manifest_err(
                &field,
                "no volume of that name in spec.template.spec.volumes",
            )
        })?;
        let hp = vol.host_path.as_ref().ok_or_else(|| {
            manifest_err(
                format!("spec.template.spec.volumes ({})", vol.name),
                "only hostPath volumes are supported by the kubelet stand-in",
            )
        })?;
        let node_path = PathBuf::from(&hp.path);
        if !node_path.is_absolute() {
            return Err(manifest_err(
                format!("spec.template.spec.volumes ({}).hostPath.path", vol.name),
                format!("{} is not absolute", hp.path),
            ));
        }
        if !host_paths
            .iter()
            .any(|h: &HostPathCheck| h.volume == vol.name)
        {
            host_paths.push(HostPathCheck {
                volume: vol.name.clone(),
                node_path: node_path.clone(),
                type_: hp.type_.clone().unwrap_or_default(),
            });
        }
        let mut source = (opts.host_path)(&node_path);
        if let Some(sub) = vm.sub_path.as_deref().filter(|s| !s.is_empty()) {
            if Path::new(sub).is_absolute() || sub.split('/').any(|c| c == "..") {
                return Err(manifest_err(
                    format!("{field}.subPath"),
                    "must be a relative path without ..",
                ));
            }
            source = source.join(sub);
        }
        let propagation = match vm.mount_propagation.as_deref() {
            None | Some("None") => MountPropagation::PropagationPrivate,
            Some("HostToContainer") => MountPropagation::PropagationHostToContainer,
            Some("Bidirectional") => {
                // kubelet refuses Bidirectional for unprivileged containers.
                if !is_privileged(container) {
                    return Err(manifest_err(
                        format!("{field}.mountPropagation"),
                        "Bidirectional requires a privileged container",
                    ));
                }
                MountPropagation::PropagationBidirectional
            }
            Some(other) => {
                return Err(manifest_err(
                    format!("{field}.mountPropagation"),
                    format!("unknown value {other:?}"),
                ));
            }
        };
        mounts.push(Mount {
            container_path: vm.mount_path.clone(),
            host_path: source.display().to_string(),
            readonly: vm.read_only.unwrap_or(false),
            propagation: propagation as i32,
            ..Default::default()
        });
    }
    for m in &opts.extra_mounts {
        mounts.push(Mount {
            container_path: m.container_path.display().to_string(),
            host_path: m.host_path.display().to_string(),
            readonly: m.readonly,
            ..Default::default()
        });
    }

    let image = match &opts.image {
        Some(i) => i.clone(),
        None => container
            .image
            .clone()
            .ok_or_else(|| manifest_err(format!("{cfield}.image"), "missing"))?,
    };
    let mut labels: HashMap<String, String> = HashMap::new();
    labels.insert(
        "io.kubernetes.container.name".into(),
        container.name.clone(),
    );
    labels.insert("io.kubernetes.pod.name".into(), pod_name.clone());
    labels.insert("io.kubernetes.pod.namespace".into(), namespace.clone());
    labels.insert("io.kubernetes.pod.uid".into(), uid.clone());
    let grace = spec
        .termination_grace_period_seconds
        .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
        .unwrap_or(DEFAULT_GRACE);
    let mut annotations = HashMap::new();
    annotations.insert(
        "io.kubernetes.pod.terminationGracePeriod".into(),
        grace.as_secs().to_string(),
    );
    let container_cfg = ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: container.name.clone(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image,
            ..Default::default()
        }),
        command: container
            .command
            .iter()
            .flatten()
            .map(|a| expand(a, &envs))
            .collect(),
        args: container
            .args
            .iter()
            .flatten()
            .map(|a| expand(a, &envs))
            .collect(),
        working_dir: container.working_dir.clone().unwrap_or_default(),
        envs: envs
            .iter()
            .map(|(k, v)| KeyValue {
                key: k.clone(),
                value: v.clone(),
            })
            .collect(),
        mounts,
        labels,
        annotations,
        log_path: format!("{}/0.log", container.name),
        linux: Some(LinuxContainerConfig {
            resources: Some(resources(container, &cfield)?),
            security_context: Some(LinuxContainerSecurityContext {
                privileged: is_privileged(container),
                namespace_options: Some(container_ns),
                ..Default::default()
            }),
        }),
        ..Default::default()
    };

    let readiness = container
        .readiness_probe
        .as_ref()
        .map(|p| http_probe(p, container, &format!("{cfield}.readinessProbe")))
        .transpose()?
        .flatten();

    Ok(RenderedPod {
        sandbox,
        container: container_cfg,
        host_paths,
        readiness,
        grace,
        restart_policy: spec
            .restart_policy
            .clone()
            .unwrap_or_else(|| "Always".into()),
    })
}

fn is_privileged(c: &Container) -> bool {
    c.security_context
        .as_ref()
        .and_then(|s| s.privileged)
        .unwrap_or(false)
}

/// kubelet's `$(VAR)` expansion against the env defined so far; `$$` escapes, unknown names stay.
fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(a) = after.strip_prefix('$') {
            out.push('$');
            rest = a;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// kubelet's mapping of requests/limits: memory limit in bytes, CPU shares from the CPU request.
fn resources(c: &Container, cfield: &str) -> Result<LinuxContainerResources, KubeletError> {
    let mut r = LinuxContainerResources::default();
    let Some(req) = &c.resources else {
        return Ok(r);
    };
    if let Some(mem) = req.limits.as_ref().and_then(|l| l.get("memory")) {
        r.memory_limit_in_bytes = quantity_bytes(&mem.0).ok_or_else(|| {
            manifest_err(
                format!("{cfield}.resources.limits.memory"),
                format!("bad quantity {:?}", mem.0),
            )
        })?;
    }
    let cpu = req
        .requests
        .as_ref()
        .and_then(|l| l.get("cpu"))
        .or_else(|| req.limits.as_ref().and_then(|l| l.get("cpu")));
    if let Some(cpu) = cpu {
        let milli = quantity_millicpu(&cpu.0).ok_or_else(|| {
            manifest_err(
                format!("{cfield}.resources.requests.cpu"),
                format!("bad quantity {:?}", cpu.0),
            )
        })?;
        // kubelet: shares = milli * 1024 / 1000, at least 2.
        r.cpu_shares = (milli * 1024 / 1000).max(2);
    }
    Ok(r)
}

fn quantity_bytes(q: &str) -> Option<i64> {
    const SUFFIXES: [(&str, i64); 12] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("Pi", 1 << 50),
        ("Ei", 1 << 60),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
        ("P", 1_000_000_000_000_000),
        ("E", 1_000_000_000_000_000_000),
    ];
    for (suffix, mult) in SUFFIXES {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<i64>().ok()?.checked_mul(mult);
        }
    }
    q.parse().ok()
}

fn quantity_millicpu(q: &str) -> Option<i64> {
    match q.strip_suffix('m') {
        Some(m) => m.parse().ok(),
        None => {
            let cores: f64 = q.parse().ok()?;
            #[allow(clippy::cast_possible_truncation)]
            Some((cores * 1000.0).round() as i64)
        }
    }
}

fn http_probe(p: &Probe, c: &Container, field: &str) -> Result<Option<HttpProbe>, KubeletError> {
    let Some(get) = &p.http_get else {
        return Ok(None);
    };
    if get.scheme.as_deref().is_some_and(|s| s != "HTTP") {
        return Err(manifest_err(
            format!("{field}.httpGet.scheme"),
            "only HTTP is supported",
        ));
    }
    let port = match &get.port {
        IntOrString::Int(n) => u16::try_from(*n).map_err(|_| {
            manifest_err(
                format!("{field}.httpGet.port"),
                format!("{n} is not a port"),
            )
        })?,
        IntOrString::String(name) => {
            let cp = c
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .ok_or_else(|| {
                    manifest_err(
                        format!("{field}.httpGet.port"),
                        format!("no container port named {name:?}"),
                    )
                })?;
            u16::try_from(cp.container_port).map_err(|_| {
                manifest_err(
                    format!("{field}.httpGet.port"),
                    format!("container port {} is not a port", cp.container_port),
                )
            })?
        }
    };
    Ok(Some(HttpProbe {
        path: get.path.clone().unwrap_or_else(|| "/".into()),
        port,
    }))
}

/// kubelet's hostPath `type` check on `path` (this process's view), creating `*OrCreate` paths.
pub fn check_host_path(check: &HostPathCheck, path: &Path) -> Result<(), KubeletError> {
    use std::os::unix::fs::FileTypeExt;
    let fail = |detail: &str| KubeletError::HostPath {
        volume: check.volume.clone(),
        path: path.into(),
        detail: detail.into(),
    };
    let meta = std::fs::metadata(path);
    match check.type_.as_str() {
        "" => Ok(()),
        "DirectoryOrCreate" => match meta {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(fail("is not a directory")),
            Err(_) => {
                use std::os::unix::fs::DirBuilderExt;
                std::fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o755)
                    .create(path)
                    .map_err(|e| fail(&format!("cannot be created: {e}")))
            }
        },
        "Directory" => match meta {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(fail("is not a directory")),
            Err(_) => Err(fail("does not exist")),
        },
        "FileOrCreate" => match meta {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(fail("is not a file")),
            Err(_) => {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| fail(&format!("parent cannot be created: {e}")))?;
                }
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map(drop)
                    .map_err(|e| fail(&format!("cannot be created: {e}")))
            }
        },
        "File" => match meta {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(fail("is not a file")),
            Err(_) => Err(fail("does not exist")),
        },
        "Socket" => match meta {
            Ok(m) if m.file_type().is_socket() => Ok(()),
            Ok(_) => Err(fail("is not a socket file")),
            Err(_) => Err(fail("does not exist")),
        },
        "CharDevice" => match meta {
            Ok(m) if m.file_type().is_char_device() => Ok(()),
            Ok(_) => Err(fail("is not a character device")),
            Err(_) => Err(fail("does not exist")),
        },
        "BlockDevice" => match meta {
            Ok(m) if m.file_type().is_block_device() => Ok(()),
            Ok(_) => Err(fail("is not a block device")),
            Err(_) => Err(fail("does not exist")),
        },
        other => Err(KubeletError::Manifest {
            field: format!(
                "spec.template.spec.volumes ({}).hostPath.type",
                check.volume
            ),
            detail: format!("unknown type {other:?}"),
        }),
    }
}

/// One container attempt of the running pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub attempt: u32,
    pub container_id: String,
}

/// The DaemonSet's pod on one node, run through CRI.
pub struct PodRunner {
    socket: PathBuf,
    opts: PodOptions,
    pod: RenderedPod,
    sandbox_id: Option<String>,
    attempts: Vec<Attempt>,
    _log_tmp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for PodRunner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodRunner")
            .field("socket", &self.socket)
            .field("pod", &self.pod.pod_name())
            .field("sandbox_id", &self.sandbox_id)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

impl PodRunner {
    /// Renders the pod for the containerd CRI socket `socket` (nothing runs until [`start`](Self::start)).
    pub fn new(socket: &Path, ds: &DaemonSet, opts: PodOptions) -> Result<Self, KubeletError> {
        let (log_root, tmp) = match &opts.log_root {
            Some(d) => (d.clone(), None),
            None => {
                let t = tempfile::Builder::new()
                    .prefix("kubelet-pods-")
                    .tempdir()
                    .map_err(|e| KubeletError::Io {
                        what: "temp log dir".into(),
                        detail: e.to_string(),
                    })?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let pod = render(ds, &opts, &log_root)?;
        Ok(Self {
            socket: socket.into(),
            opts,
            pod,
            sandbox_id: None,
            attempts: Vec::new(),
            _log_tmp: tmp,
        })
    }

    pub fn rendered(&self) -> &RenderedPod {
        &self.pod
    }

    pub fn pod_name(&self) -> &str {
        self.pod.pod_name()
    }

    pub fn sandbox_id(&self) -> Option<&str> {
        self.sandbox_id.as_deref()
    }

    pub fn attempts(&self) -> &[Attempt] {
        &self.attempts
    }

    /// The current container attempt's id.
    pub fn container_id(&self) -> Option<&str> {
        self.attempts.last().map(|a| a.container_id.as_str())
    }

    /// The CRI log file of the current attempt (`<log_directory>/<container>/<attempt>.log`).
    pub fn log_path(&self) -> PathBuf {
        let attempt = self.attempts.last().map_or(0, |a| a.attempt);
        self.log_path_of(attempt)
    }

    fn log_path_of(&self, attempt: u32) -> PathBuf {
        Path::new(&self.pod.sandbox.log_directory)
            .join(self.pod.container_for_attempt(attempt).log_path)
    }

    /// The container's output of every attempt so far, without the CRI log line prefix
    /// (`<time> <stream> <P|F> `), for printing on a test failure.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for a in &self.attempts {
            out.push_str(&format!("--- attempt {} ---\n", a.attempt));
            let text = std::fs::read_to_string(self.log_path_of(a.attempt)).unwrap_or_default();
            for line in text.lines() {
                let msg = line.splitn(4, ' ').nth(3).unwrap_or(line);
                out.push_str(msg);
                out.push('\n');
            }
        }
        out
    }

    async fn cri(&self) -> Result<CriClient, KubeletError> {
        Ok(CriClient::connect(&self.socket).await?)
    }

    /// hostPath checks, RunPodSandbox (handler from the options, "" = default runc), CreateContainer,
    /// StartContainer. On a failure after the sandbox exists, the sandbox is removed again.
    pub async fn start(&mut self) -> Result<(), KubeletError> {
        Box::pin(self.start_inner()).await
    }

    async fn start_inner(&mut self) -> Result<(), KubeletError> {
        if self.sandbox_id.is_some() {
            return Ok(());
        }
        for hp in &self.pod.host_paths {
            let path = match &self.opts.check_path {
                Some(f) => f(&hp.node_path),
                None => (self.opts.host_path)(&hp.node_path),
            };
            check_host_path(hp, &path)?;
        }
        let mut cri = self.cri().await?;
        let image = self
            .pod
            .container
            .image
            .as_ref()
            .map(|i| i.image.clone())
            .unwrap_or_default();
        if !cri.image_present(&image).await? {
            return Err(KubeletError::ImageMissing(image));
        }
        std::fs::create_dir_all(&self.pod.sandbox.log_directory).map_err(|e| KubeletError::Io {
            what: format!("pod log directory {}", self.pod.sandbox.log_directory),
            detail: e.to_string(),
        })?;
        let r = tokio::time::timeout(
            CRI_TIMEOUT,
            cri.runtime_service().run_pod_sandbox(RunPodSandboxRequest {
                config: Some(self.pod.sandbox.clone()),
                runtime_handler: self.opts.runtime_handler.clone(),
            }),
        )
        .await
        .map_err(|_| CriError::Timeout {
            op: "RunPodSandbox",
            after: CRI_TIMEOUT,
        })?
        .map_err(|s| rpc("RunPodSandbox", &s))?;
        self.sandbox_id = Some(r.into_inner().pod_sandbox_id);
        if let Err(e) = self.start_attempt(&mut cri, 0).await {
            let _ = self.delete_with(Duration::ZERO).await;
            return Err(e);
        }
        Ok(())
    }

    async fn start_attempt(
        &mut self,
        cri: &mut CriClient,
        attempt: u32,
    ) -> Result<(), KubeletError> {
        let sandbox_id = self
            .sandbox_id
            .clone()
            .ok_or_else(|| KubeletError::NotStarted(self.pod.pod_name().into()))?;
        let config = self.pod.container_for_attempt(attempt);
        let log_dir = Path::new(&self.pod.sandbox.log_directory).join(
            config
                .metadata
                .as_ref()
                .map(|m| m.name.clone())
                .unwrap_or_default(),
        );
        std::fs::create_dir_all(&log_dir).map_err(|e| KubeletError::Io {
            what: format!("container log directory {}", log_dir.display()),
            detail: e.to_string(),
        })?;
        let r = tokio::time::timeout(
            CRI_TIMEOUT,
            Box::pin(
                cri.runtime_service()
                    .create_container(CreateContainerRequest {
                        pod_sandbox_id: sandbox_id,
                        config: Some(config),
                        sandbox_config: Some(self.pod.sandbox.clone()),
                    }),
            ),
        )
        .await
        .map_err(|_| CriError::Timeout {
            op: "CreateContainer",
            after: CRI_TIMEOUT,
        })?
        .map_err(|s| rpc("CreateContainer", &s))?;
        let container_id = r.into_inner().container_id;
        self.attempts.push(Attempt {
            attempt,
            container_id: container_id.clone(),
        });
        cri.start_container(&container_id, CRI_TIMEOUT).await?;
        Ok(())
    }

    /// The current attempt's state as CRI reports it.
    pub async fn container_info(&self) -> Result<noded::cri::ContainerInfo, KubeletError> {
        let id = self
            .container_id()
            .ok_or_else(|| KubeletError::NotStarted(self.pod.pod_name().into()))?;
        Ok(self.cri().await?.container_info(id).await?)
    }

    /// Host PID of the current attempt's init process (containerd's verbose ContainerStatus), while it
    /// runs.
    pub async fn container_pid(&self) -> Result<Option<u32>, KubeletError> {
        Ok(self.container_info().await?.pid)
    }

    /// Until the readinessProbe's httpGet on 127.0.0.1 (the pod uses the host network) answers 2xx/3xx,
    /// as kubelet counts success. Without a readinessProbe: until the container runs. Fails early when
    /// the container exits.
    pub async fn wait_ready(&self, timeout: Duration) -> Result<(), KubeletError> {
        let start = Instant::now();
        let mut last;
        loop {
            let info = self.container_info().await?;
            match info.state {
                ContainerState::ContainerExited => {
                    return Err(KubeletError::NotReady {
                        pod: self.pod_name().into(),
                        after: start.elapsed(),
                        detail: format!(
                            "container exited with code {} ({}); log:\n{}",
                            info.exit_code,
                            info.reason,
                            self.logs()
                        ),
                    });
                }
                ContainerState::ContainerRunning => match &self.pod.readiness {
                    None => return Ok(()),
                    Some(p) => match http_get(p).await {
                        Ok(code) if (200..400).contains(&code) => return Ok(()),
                        Ok(code) => last = format!("GET {} -> {code}", p.path),
                        Err(e) => last = format!("GET 127.0.0.1:{}{}: {e}", p.port, p.path),
                    },
                },
                other => last = format!("container {other:?}"),
            }
            if start.elapsed() >= timeout {
                return Err(KubeletError::NotReady {
                    pod: self.pod_name().into(),
                    after: timeout,
                    detail: format!("{last}; log:\n{}", self.logs()),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL to the container's init process, as the OOM killer would.
    pub async fn kill9(&self) -> Result<(), KubeletError> {
        let pid = self
            .container_pid()
            .await?
            .ok_or_else(|| KubeletError::Io {
                what: "kill -9".into(),
                detail: format!(
                    "container of pod {} has no pid (not running)",
                    self.pod_name()
                ),
            })?;
        let pid = i32::try_from(pid).map_err(|_| KubeletError::Io {
            what: "kill -9".into(),
            detail: format!("pid {pid} out of range"),
        })?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| KubeletError::Io {
            what: format!("kill -9 {pid}"),
            detail: e.to_string(),
        })
    }

    /// Waits until the current attempt has exited (e.g. after [`kill9`](Self::kill9)).
    pub async fn wait_exited(
        &self,
        timeout: Duration,
    ) -> Result<noded::cri::ContainerInfo, KubeletError> {
        let id = self
            .container_id()
            .ok_or_else(|| KubeletError::NotStarted(self.pod.pod_name().into()))?;
        Ok(self.cri().await?.wait_exited(id, timeout).await?)
    }

    /// restartPolicy Always (a DaemonSet's only policy): when the current attempt has exited, creates and
    /// starts attempt N+1 in the same sandbox, as kubelet does (without its back-off). Returns the new
    /// attempt number, or None when the container still runs.
    pub async fn restart_if_exited(&mut self) -> Result<Option<u32>, KubeletError> {
        Box::pin(async {
            let info = self.container_info().await?;
            if info.state != ContainerState::ContainerExited {
                return Ok(None);
            }
            let next = self.attempts.last().map_or(0, |a| a.attempt + 1);
            let mut cri = self.cri().await?;
            self.start_attempt(&mut cri, next).await?;
            Ok(Some(next))
        })
        .await
    }

    /// StopContainer with `grace` (default: the pod's terminationGracePeriodSeconds): SIGTERM, then
    /// SIGKILL after the grace period.
    pub async fn stop(&self, grace: Option<Duration>) -> Result<(), KubeletError> {
        let id = self
            .container_id()
            .ok_or_else(|| KubeletError::NotStarted(self.pod.pod_name().into()))?;
        let grace = grace.unwrap_or(self.pod.grace);
        let mut cri = self.cri().await?;
        let call_timeout = grace + CRI_TIMEOUT;
        tokio::time::timeout(
            call_timeout,
            cri.runtime_service().stop_container(StopContainerRequest {
                container_id: id.into(),
                timeout: i64::try_from(grace.as_secs()).unwrap_or(i64::MAX),
            }),
        )
        .await
        .map_err(|_| CriError::Timeout {
            op: "StopContainer",
            after: call_timeout,
        })?
        .map_err(|s| rpc("StopContainer", &s))?;
        Ok(())
    }

    /// Deletes the pod as kubelet does: stop the container with the grace period, then stop and
    /// remove the sandbox (which removes its containers).
    pub async fn delete(&mut self) -> Result<(), KubeletError> {
        let grace = self.pod.grace;
        self.delete_with(grace).await
    }

    async fn delete_with(&mut self, grace: Duration) -> Result<(), KubeletError> {
        if self.sandbox_id.is_none() {
            return Ok(());
        }
        if !self.attempts.is_empty() {
            // Not fatal: the container may be gone already; StopPodSandbox kills what is left.
            let _ = self.stop(Some(grace)).await;
        }
        let Some(id) = self.sandbox_id.clone() else {
            return Ok(());
        };
        remove_sandbox(&self.socket, &id).await?;
        self.sandbox_id = None;
        self.attempts.clear();
        Ok(())
    }
}

fn rpc(op: &'static str, s: &tonic::Status) -> KubeletError {
    KubeletError::Cri(CriError::Rpc {
        op,
        code: s.code(),
        message: s.message().to_string(),
    })
}

async fn remove_sandbox(socket: &Path, id: &str) -> Result<(), KubeletError> {
    let mut cri = CriClient::connect(socket).await?;
    let rt = cri.runtime_service();
    tokio::time::timeout(
        CRI_TIMEOUT,
        rt.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.into(),
        }),
    )
    .await
    .map_err(|_| CriError::Timeout {
        op: "StopPodSandbox",
        after: CRI_TIMEOUT,
    })?
    .map_err(|s| rpc("StopPodSandbox", &s))?;
    tokio::time::timeout(
        CRI_TIMEOUT,
        rt.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.into(),
        }),
    )
    .await
    .map_err(|_| CriError::Timeout {
        op: "RemovePodSandbox",
        after: CRI_TIMEOUT,
    })?
    .map_err(|s| rpc("RemovePodSandbox", &s))?;
    Ok(())
}

/// One HTTP/1.1 GET on 127.0.0.1; returns the status code.
async fn http_get(p: &HttpProbe) -> Result<u16, std::io::Error> {
    let io = async {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", p.port)).await?;
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUser-Agent: kube-probe/testkit\r\nConnection: close\r\n\r\n",
            p.path, p.port
        );
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await?;
        let head = String::from_utf8_lossy(&buf[..buf.len().min(64)]).into_owned();
        head.split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("not an HTTP response: {head:?}"),
                )
            })
    };
    // kubelet's default probe timeout.
    tokio::time::timeout(Duration::from_secs(1), io)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out after 1s"))?
}

impl Drop for PodRunner {
    fn drop(&mut self) {
        let Some(id) = self.sandbox_id.take() else {
            return;
        };
        let socket = self.socket.clone();
        // A runtime of its own on its own thread: Drop may run inside or outside a tokio runtime.
        let done = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt
                && let Err(e) = rt.block_on(remove_sandbox(&socket, &id))
            {
                eprintln!("kubelet stand-in: cannot remove pod sandbox {id}: {e}");
            }
        });
        let _ = done.join();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expands_env_references_like_kubelet() {
        let env = vec![("A".to_string(), "x".to_string())];
        assert_eq!(expand("$(A)/$(B)/$$(A)/$", &env), "x/$(B)/$(A)/$");
    }

    #[test]
    fn quantities() {
        assert_eq!(quantity_bytes("2Gi"), Some(2 << 30));
        assert_eq!(quantity_bytes("128Mi"), Some(128 << 20));
        assert_eq!(quantity_bytes("1000"), Some(1000));
        assert_eq!(quantity_millicpu("50m"), Some(50));
        assert_eq!(quantity_millicpu("1.5"), Some(1500));
    }
}
