//! gRPC node API on a unix socket (proto/noded.proto): AcquireVm / ReleaseVm from the VM engine, and
//! Status assembled from every component that registers a [`StatusProvider`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{UnixListener, UnixStream};
use tokio_stream::wrappers::UnixListenerStream;
use tonic::{Request, Response, Status};

use crate::containerd::cli::OutputFormat;
use crate::vm::engine::{Engine, EngineError};
use crate::vm::pool::PoolError;

pub mod authority;
pub(crate) mod handlers;

pub mod pb {
    tonic::include_proto!("noded.v1");
}

use pb::node_client::NodeClient;
use pb::node_server::{Node, NodeServer};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("API socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("API server: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("cannot reach noded at {path}: {detail} (is `noded run` running?)")]
    Connect { path: PathBuf, detail: String },
    #[error("noded answered: {0}")]
    Call(#[from] Status),
}

/// A component that contributes to `Status` (the VM engine fills `templates`; the runtime manager and
/// observer fill `handlers` and the containerd fields).
pub trait StatusProvider: Send + Sync {
    fn fill(&self, status: &mut pb::StatusResponse);
}

impl StatusProvider for Engine {
    fn fill(&self, status: &mut pb::StatusResponse) {
        let cgroup = crate::vm::cgroup::status();
        status.vm_cgroup = cgroup.path;
        status.vm_cgroup_error = cgroup.error;
        for s in self.snapshot() {
            status.templates.push(pb::TemplateStatus {
                name: s.name,
                ready: s.ready,
                fingerprint: s.fingerprint,
                pool_ready: s.pool_ready,
                pool_target: s.pool_target,
                builds: s.builds_ok + s.builds_failed,
                hits: s.hits,
                misses: s.misses,
                memory_bytes: s.memory_bytes,
                not_ready_reason: if s.ready {
                    String::new()
                } else {
                    s.last_damage
                },
                in_use: s.in_use,
                max_in_use: s.max_in_use,
                vms_in_use: s
                    .vms_in_use
                    .into_iter()
                    .map(|v| pb::VmInUse {
                        vm_id: v.vm_id,
                        pid: v.pid,
                        acquired_unix_ms: v.acquired_unix_ms,
                        adopted: v.adopted,
                    })
                    .collect(),
            });
        }
    }
}

/// The service behind the socket.
#[derive(Clone)]
pub struct NodeService {
    engine: Option<Arc<Engine>>,
    providers: Vec<Arc<dyn StatusProvider>>,
    /// Peer uids let through at accept (`daemon.api_allowed_uids`).
    allowed_uids: Vec<u32>,
}

impl Default for NodeService {
    fn default() -> Self {
        Self::new(None)
    }
}

impl NodeService {
    /// `engine` serves AcquireVm/ReleaseVm and fills template status.
    pub fn new(engine: Option<Arc<Engine>>) -> Self {
        let mut providers: Vec<Arc<dyn StatusProvider>> = Vec::new();
        if let Some(e) = &engine {
            providers.push(e.clone());
        }
        Self {
            engine,
            providers,
            allowed_uids: vec![0],
        }
    }

    /// Which peer uids may call (default: root only). Checked with SO_PEERCRED at accept.
    pub fn with_allowed_uids(mut self, uids: Vec<u32>) -> Self {
        self.allowed_uids = uids;
        self
    }

    /// Adds another contributor to `Status` (handler figures, containerd state, ...).
    pub fn with_provider(mut self, provider: Arc<dyn StatusProvider>) -> Self {
        self.providers.push(provider);
        self
    }

    fn engine(&self) -> Result<&Arc<Engine>, Status> {
        self.engine.as_ref().ok_or_else(|| {
            Status::failed_precondition("no VM templates are configured on this node")
        })
    }
}

fn engine_status(e: EngineError) -> Status {
    match e {
        EngineError::UnknownTemplate(_) | EngineError::NoTemplates => {
            Status::not_found(e.to_string())
        }
        EngineError::UnknownVm(_) => Status::not_found(e.to_string()),
        EngineError::Pool(PoolError::Exhausted { .. }) => Status::resource_exhausted(e.to_string()),
        other => Status::unavailable(other.to_string()),
    }
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn acquire_vm(
        &self,
        request: Request<pb::AcquireVmRequest>,
    ) -> Result<Response<pb::AcquireVmResponse>, Status> {
        let template = request.into_inner().template;
        let vm = self
            .engine()?
            .acquire(&template)
            .await
            .map_err(engine_status)?;
        Ok(Response::new(pb::AcquireVmResponse {
            vm_id: vm.vm_id,
            template: vm.template,
            console: vm.console.display().to_string(),
            pid: vm.pid,
            from_pool: vm.from_pool,
            acquire_micros: u64::try_from(vm.acquire.as_micros()).unwrap_or(u64::MAX),
        }))
    }

    async fn release_vm(
        &self,
        request: Request<pb::ReleaseVmRequest>,
    ) -> Result<Response<pb::ReleaseVmResponse>, Status> {
        let id = request.into_inner().vm_id;
        self.engine()?.release(&id).await.map_err(engine_status)?;
        Ok(Response::new(pb::ReleaseVmResponse {}))
    }

    async fn status(
        &self,
        _request: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        let mut status = pb::StatusResponse {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        };
        for p in &self.providers {
            p.fill(&mut status);
        }
        Ok(Response::new(status))
    }
}

/// Binds the API socket, mode 0600, without a moment where anyone else could connect: the socket is
/// bound inside a fresh 0700 directory next to its final path, chmod'ed there, then renamed into
/// place. A stale socket of a previous run is replaced; anything else at the path (a symlink, a
/// regular file, a directory) is refused, never followed or removed.
pub fn bind(socket: &Path) -> Result<ApiListener, ApiError> {
    use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
    let err = |source| ApiError::Socket {
        path: socket.to_path_buf(),
        source,
    };
    let (Some(dir), Some(file)) = (socket.parent(), socket.file_name()) else {
        return Err(err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a socket path",
        )));
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::create_dir_all(dir).map_err(err)?;
    match std::fs::symlink_metadata(socket) {
        Ok(m) if m.file_type().is_socket() => {}
        Ok(m) => {
            let kind = if m.file_type().is_symlink() {
                "a symlink"
            } else if m.is_dir() {
                "a directory"
            } else {
                "not a socket"
            };
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{kind} is in the way; refusing to replace it (remove it if it is stale)"),
            )));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err(e)),
    }
    // mkdir fails if the name exists, so nobody can have pre-created (or symlinked) the private dir.
    let private = dir.join(format!(
        ".{}.bind-{}-{}",
        file.to_string_lossy(),
        std::process::id(),
        uuid::Uuid::new_v4().simple()
    ));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(err)?;
    let result = (|| {
        let staged = private.join("s");
        let listener = UnixListener::bind(&staged)?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        // rename(2) replaces a stale socket atomically and never follows a symlink at the target.
        std::fs::rename(&staged, socket)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    Ok(ApiListener {
        listener: result.map_err(err)?,
        path: socket.to_path_buf(),
    })
}

/// The bound API socket. The listener's own address is the private staging name it was bound
/// under, so the public path is kept here (for removal at shutdown).
pub struct ApiListener {
    pub listener: UnixListener,
    pub path: PathBuf,
}

/// Whether the connecting process may call: its uid (SO_PEERCRED) is in `allowed`.
fn peer_allowed(conn: &UnixStream, allowed: &[u32]) -> bool {
    match conn.peer_cred() {
        Ok(cred) if allowed.contains(&cred.uid()) => true,
        Ok(cred) => {
            tracing::warn!(
                uid = cred.uid(),
                pid = cred.pid().unwrap_or_default(),
                "node API: connection refused, uid not in daemon.api_allowed_uids"
            );
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "node API: connection refused, peer credentials unreadable");
            false
        }
    }
}

/// Serves until `shutdown` resolves, then removes the socket. Connections from a uid outside the
/// service's allow-list are closed at accept, before a byte of gRPC is read.
pub async fn serve(
    listener: ApiListener,
    service: NodeService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), ApiError> {
    let ApiListener { listener, path } = listener;
    let allowed = service.allowed_uids.clone();
    // grpc-core clients send the socket path as :authority, which h2 refuses: see `authority`.
    let incoming =
        tokio_stream::StreamExt::filter_map(UnixListenerStream::new(listener), move |conn| {
            match conn {
                Ok(c) if !peer_allowed(&c, &allowed) => None,
                other => Some(other.map(authority::AuthorityFix::new)),
            }
        });
    let result = tonic::transport::Server::builder()
        .add_service(NodeServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    // Only our own socket: a non-socket put there meanwhile is left alone.
    if std::fs::symlink_metadata(&path)
        .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
    {
        let _ = std::fs::remove_file(&path);
    }
    Ok(result?)
}

/// A client on the unix socket.
pub async fn connect(socket: &Path) -> Result<NodeClient<tonic::transport::Channel>, ApiError> {
    let path = socket.to_path_buf();
    let cerr = |detail: String| ApiError::Connect {
        path: socket.to_path_buf(),
        detail,
    };
    // The URI is required by tonic but unused: the connector dials the unix socket.
    let endpoint = tonic::transport::Endpoint::try_from("http://noded.sock")
        .map_err(|e| cerr(e.to_string()))?
        .connect_timeout(Duration::from_secs(5));
    let channel = endpoint
        .connect_with_connector(tower::service_fn(move |_: http::Uri| {
            let path = path.clone();
            async move {
                UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            }
        }))
        .await
        .map_err(|e| {
            cerr(format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(ToString::to_string)
                    .unwrap_or_default()
            ))
        })?;
    Ok(NodeClient::new(channel))
}

/// Renders a status as the `noded status` table.
pub fn status_table(s: &pb::StatusResponse) -> String {
    let mut out = format!("noded {}\n", s.version);
    if !s.containerd_version.is_empty() {
        out.push_str(&format!(
            "containerd {} (config changed: {}, restarts: {})\n",
            s.containerd_version, s.containerd_config_changed, s.containerd_restarts
        ));
    }
    out.push_str(&format!(
        "\n{:<16} {:<6} {:<17} {:>10} {:>7} {:>6} {:>7} {:>10}\n",
        "TEMPLATE", "READY", "FINGERPRINT", "POOL", "BUILDS", "HITS", "MISSES", "MEMORY"
    ));
    for t in &s.templates {
        out.push_str(&format!(
            "{:<16} {:<6} {:<17} {:>10} {:>7} {:>6} {:>7} {:>9}M\n",
            t.name,
            if t.ready { "yes" } else { "no" },
            t.fingerprint,
            format!("{}/{}", t.pool_ready, t.pool_target),
            t.builds,
            t.hits,
            t.misses,
            t.memory_bytes >> 20
        ));
        if !t.not_ready_reason.is_empty() {
            out.push_str(&format!("  {}: {}\n", t.name, t.not_ready_reason));
        }
        if t.in_use > 0 {
            let vms: Vec<String> = t
                .vms_in_use
                .iter()
                .map(|v| {
                    let adopted = if v.adopted { ", adopted" } else { "" };
                    format!("{} (pid {}{adopted})", v.vm_id, v.pid)
                })
                .collect();
            out.push_str(&format!(
                "  {}: {}/{} in use: {}\n",
                t.name,
                t.in_use,
                t.max_in_use,
                vms.join(", ")
            ));
        }
    }
    if !s.vm_cgroup_error.is_empty() {
        out.push_str(&format!(
            "\nVMs in use will not survive a restart of noded's container: {}\n",
            s.vm_cgroup_error
        ));
    }
    if !s.handlers.is_empty() {
        out.push('\n');
        out.push_str(&handlers::render_handler_table(&s.handlers));
    }
    out
}

/// Status as one JSON object (field names as in the proto).
pub fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    let templates: Vec<serde_json::Value> = s
        .templates
        .iter()
        .map(|t| {
            serde_json::json!({
                "name": t.name, "ready": t.ready, "fingerprint": t.fingerprint,
                "pool_ready": t.pool_ready, "pool_target": t.pool_target, "builds": t.builds,
                "hits": t.hits, "misses": t.misses, "memory_bytes": t.memory_bytes,
                "not_ready_reason": t.not_ready_reason,
                "in_use": t.in_use, "max_in_use": t.max_in_use,
                "vms_in_use": t.vms_in_use.iter().map(|v| serde_json::json!({
                    "vm_id": v.vm_id, "pid": v.pid, "acquired_unix_ms": v.acquired_unix_ms,
                    "adopted": v.adopted,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    let handlers: Vec<serde_json::Value> = s
        .handlers
        .iter()
        .map(|h| {
            serde_json::json!({
                "runtime_handler": h.runtime_handler, "ready": h.ready,
                "last_probe_error": h.last_probe_error, "last_probe_seconds": h.last_probe_seconds,
                "slots_total": h.slots_total, "slots_free": h.slots_free, "vms": h.vms,
                "vms_template": h.vms_template, "vms_cold": h.vms_cold, "pss_bytes": h.pss_bytes,
                "rss_bytes": h.rss_bytes, "private_bytes": h.private_bytes,
                "boot_p50_seconds": h.boot_p50_seconds, "boot_p90_seconds": h.boot_p90_seconds,
            })
        })
        .collect();
    serde_json::json!({
        "version": s.version,
        "templates": templates,
        "handlers": handlers,
        "containerd_config_changed": s.containerd_config_changed,
        "containerd_version": s.containerd_version,
        "containerd_restarts": s.containerd_restarts,
        "vm_cgroup": s.vm_cgroup,
        "vm_cgroup_error": s.vm_cgroup_error,
    })
}

/// `noded status`.
pub fn status_cli(socket: &Path, output: OutputFormat) -> u8 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return crate::exit::RUNTIME_FAILURE;
        }
    };
    let result = rt.block_on(async {
        let mut client = connect(socket).await?;
        let s = tokio::time::timeout(Duration::from_secs(10), client.status(pb::StatusRequest {}))
            .await
            .map_err(|_| Status::deadline_exceeded("Status took longer than 10 s"))??;
        Ok::<_, ApiError>(s.into_inner())
    });
    match result {
        Ok(s) => {
            match output {
                OutputFormat::Json => println!("{}", status_json(&s)),
                OutputFormat::Text => print!("{}", status_table(&s)),
            }
            crate::exit::OK
        }
        Err(e) => {
            eprintln!("noded status: {e}");
            crate::exit::RUNTIME_FAILURE
        }
    }
}
