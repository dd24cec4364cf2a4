//! Boot latency from containerd's event stream: per sandbox, the time from its container being created
//! (`/containers/create`) to its task starting (`/tasks/start`), attributed to the CRI runtime handler.
//!
//! Both timestamps are containerd's own (event envelopes), so the figure does not depend on how fast noded
//! reads the stream. A CRI sandbox's handler comes from the sandbox metadata the CRI plugin stores as a
//! container extension; containers not made by CRI (e.g. `ctr run`) are attributed to their runtime name
//! (`io.containerd.runc.v2`). CRI app containers inside a sandbox are not samples: the sandbox start is the
//! VM boot.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::events::{ContainerCreate, ContainerDelete, TaskStart};
use containerd_client::services::v1::containers_client::ContainersClient;
use containerd_client::services::v1::events_client::EventsClient;
use containerd_client::services::v1::{Container, GetContainerRequest, SubscribeRequest};
use prost::Message;
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

/// CRI label on containerd containers: `sandbox` or `container`.
const CRI_KIND_LABEL: &str = "io.cri-containerd.kind";
/// CRI sandbox metadata extension (JSON with `Metadata.RuntimeHandler`).
const CRI_SANDBOX_METADATA: &str = "io.cri-containerd.sandbox.metadata";
/// Pending creates older than this are dropped (a sandbox that never started).
const PENDING_TTL_SECS: f64 = 600.0;
/// Creates waiting for their start, at most: a flood of containers that never start (any client of
/// containerd can create them) must not grow noded's memory. Beyond it the oldest is dropped.
pub const PENDING_MAX: usize = 4096;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
const RPC_TIMEOUT: Duration = Duration::from_secs(10);

/// One sandbox's boot: container create → task start, in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct BootSample {
    /// CRI runtime handler (e.g. `runc`, `kata-qemu`), or the containerd runtime name for non-CRI
    /// containers.
    pub runtime_handler: String,
    pub sandbox_id: String,
    pub namespace: String,
    pub seconds: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum LatencyError {
    #[error("cannot connect to containerd at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("containerd event subscription failed: {0}")]
    Subscribe(Box<tonic::Status>),
}

struct Pending {
    created_at: f64,
    handler: String,
}

/// Container creates waiting for their task start, bounded by age and by [`PENDING_MAX`].
#[derive(Default)]
struct PendingCreates {
    map: HashMap<(String, String), Pending>,
    dropped: u64,
}

impl PendingCreates {
    fn insert(&mut self, key: (String, String), p: Pending) {
        let now = p.created_at;
        self.map
            .retain(|_, q| now - q.created_at < PENDING_TTL_SECS);
        if self.map.len() >= PENDING_MAX && !self.map.contains_key(&key) {
            let oldest = self
                .map
                .iter()
                .min_by(|a, b| a.1.created_at.total_cmp(&b.1.created_at))
                .map(|(k, _)| k.clone());
            if let Some(k) = oldest {
                self.map.remove(&k);
                self.dropped += 1;
                if self.dropped.is_power_of_two() {
                    warn!(
                        dropped = self.dropped,
                        "too many containers created and not started; dropping the oldest boot measurements"
                    );
                }
            }
        }
        self.map.insert(key, p);
    }

    fn remove(&mut self, key: &(String, String)) -> Option<Pending> {
        self.map.remove(key)
    }
}

/// Follows containerd's events and sends a [`BootSample`] per started sandbox until `tx` is closed.
/// Reconnects with backoff (100 ms doubling to 5 s) whenever containerd goes away, e.g. across restarts;
/// events published while disconnected are missed.
pub async fn watch(socket: PathBuf, tx: mpsc::Sender<BootSample>) {
    let mut backoff = BACKOFF_MIN;
    while !tx.is_closed() {
        match follow(&socket, &tx).await {
            Ok(()) => {
                // The stream ended (containerd stopped) after a successful subscription.
                backoff = BACKOFF_MIN;
                debug!("containerd event stream ended; resubscribing");
            }
            Err(e) => {
                debug!(error = %e, ?backoff, "containerd events unavailable; retrying");
            }
        }
        if tx.is_closed() {
            break;
        }
        tokio::select! {
            () = tokio::time::sleep(backoff) => {}
            () = tx.closed() => break,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// [`watch`] on its own task; abort the handle (or drop the receiver) to stop it.
pub fn spawn(socket: PathBuf) -> (tokio::task::JoinHandle<()>, mpsc::Receiver<BootSample>) {
    let (tx, rx) = mpsc::channel(1024);
    (tokio::spawn(watch(socket, tx)), rx)
}

async fn follow(socket: &Path, tx: &mpsc::Sender<BootSample>) -> Result<(), LatencyError> {
    let channel =
        containerd_client::connect(socket)
            .await
            .map_err(|source| LatencyError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
    let mut events = EventsClient::new(channel.clone());
    let mut containers = ContainersClient::new(channel);
    let filters = ["/containers/create", "/containers/delete", "/tasks/start"]
        .iter()
        .map(|t| format!("topic==\"{t}\""))
        .collect();
    let mut stream = events
        .subscribe(SubscribeRequest { filters })
        .await
        .map_err(|s| LatencyError::Subscribe(Box::new(s)))?
        .into_inner();
    info!(socket = %socket.display(), "following containerd events for boot latency");
    let mut pending = PendingCreates::default();
    loop {
        let envelope = tokio::select! {
            m = stream.message() => m,
            () = tx.closed() => return Ok(()),
        };
        let envelope = match envelope {
            Ok(Some(e)) => e,
            Ok(None) => return Ok(()),
            Err(s) => return Err(LatencyError::Subscribe(Box::new(s))),
        };
        let (Some(any), Some(ts)) = (envelope.event, envelope.timestamp) else {
            continue;
        };
        let at = ts.seconds as f64 + f64::from(ts.nanos) / 1e9;
        let ns = envelope.namespace;
        match envelope.topic.as_str() {
            "/containers/create" => {
                let Ok(ev) = ContainerCreate::decode(any.value.as_slice()) else {
                    continue;
                };
                let runtime_name = ev.runtime.map(|r| r.name).unwrap_or_default();
                let container = get_container(&mut containers, &ns, &ev.id).await;
                if let Some(handler) = boot_handler(container.as_ref(), &runtime_name) {
                    pending.insert(
                        (ns, ev.id),
                        Pending {
                            created_at: at,
                            handler,
                        },
                    );
                }
            }
            "/tasks/start" => {
                let Ok(ev) = TaskStart::decode(any.value.as_slice()) else {
                    continue;
                };
                if let Some(p) = pending.remove(&(ns.clone(), ev.container_id.clone())) {
                    let sample = BootSample {
                        runtime_handler: p.handler,
                        sandbox_id: ev.container_id,
                        namespace: ns,
                        seconds: (at - p.created_at).max(0.0),
                    };
                    debug!(
                        runtime_handler = %sample.runtime_handler,
                        sandbox = %sample.sandbox_id,
                        seconds = sample.seconds,
                        "sandbox boot"
                    );
                    if tx.send(sample).await.is_err() {
                        return Ok(());
                    }
                }
            }
            "/containers/delete" => {
                if let Ok(ev) = ContainerDelete::decode(any.value.as_slice()) {
                    pending.remove(&(ns, ev.id));
                }
            }
            _ => {}
        }
    }
}

async fn get_container(
    client: &mut ContainersClient<Channel>,
    namespace: &str,
    id: &str,
) -> Option<Container> {
    let mut req = tonic::Request::new(GetContainerRequest { id: id.into() });
    req.metadata_mut()
        .insert("containerd-namespace", namespace.parse().ok()?);
    match tokio::time::timeout(RPC_TIMEOUT, client.get(req)).await {
        Ok(Ok(r)) => r.into_inner().container,
        Ok(Err(s)) => {
            warn!(container = id, error = %s.message(), "cannot look up container for boot latency");
            None
        }
        Err(_) => None,
    }
}

/// The handler a container's boot is attributed to, or None when it is not a boot (a CRI app container).
fn boot_handler(container: Option<&Container>, runtime_name: &str) -> Option<String> {
    let Some(c) = container else {
        return (!runtime_name.is_empty()).then(|| runtime_name.to_string());
    };
    let runtime = c.runtime.as_ref().map_or(runtime_name, |r| r.name.as_str());
    match c.labels.get(CRI_KIND_LABEL).map(String::as_str) {
        Some("sandbox") => Some(
            c.extensions
                .get(CRI_SANDBOX_METADATA)
                .and_then(|any| sandbox_handler(&any.value))
                .unwrap_or_else(|| runtime.to_string()),
        ),
        Some(_) => None,
        None => Some(runtime.to_string()),
    }
}

/// `Metadata.RuntimeHandler` from the CRI plugin's sandbox metadata JSON.
pub fn sandbox_handler(metadata_json: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(metadata_json).ok()?;
    let h = v.get("Metadata")?.get("RuntimeHandler")?.as_str()?;
    (!h.is_empty()).then(|| h.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use containerd_client::services::v1::container::Runtime;

    fn container(kind: Option<&str>, metadata: Option<&str>) -> Container {
        Container {
            id: "c1".into(),
            labels: kind
                .map(|k| [(CRI_KIND_LABEL.to_string(), k.to_string())].into())
                .unwrap_or_default(),
            runtime: Some(Runtime {
                name: "io.containerd.runc.v2".into(),
                options: None,
            }),
            extensions: metadata
                .map(|m| {
                    [(
                        CRI_SANDBOX_METADATA.to_string(),
                        prost_types::Any {
                            type_url: "github.com/containerd/cri/pkg/store/sandbox/Metadata".into(),
                            value: m.as_bytes().to_vec(),
                        },
                    )]
                    .into()
                })
                .unwrap_or_default(),
            ..Default::default()
        }
    }

    #[test]
    fn attributes_sandboxes_to_their_cri_handler() {
        let c = container(
            Some("sandbox"),
            Some(r#"{"Version":"v1","Metadata":{"ID":"c1","RuntimeHandler":"kata-qemu"}}"#),
        );
        assert_eq!(
            boot_handler(Some(&c), "io.containerd.kata-qemu.v2").as_deref(),
            Some("kata-qemu")
        );
    }

    #[test]
    fn falls_back_to_the_runtime_name() {
        let c = container(
            Some("sandbox"),
            Some(r#"{"Metadata":{"RuntimeHandler":""}}"#),
        );
        assert_eq!(
            boot_handler(Some(&c), "").as_deref(),
            Some("io.containerd.runc.v2")
        );
        let plain = container(None, None);
        assert_eq!(
            boot_handler(Some(&plain), "").as_deref(),
            Some("io.containerd.runc.v2")
        );
        assert_eq!(boot_handler(None, "x.v2").as_deref(), Some("x.v2"));
    }

    #[test]
    fn pending_creates_stay_bounded_under_a_flood() {
        let mut p = PendingCreates::default();
        for i in 0..(PENDING_MAX * 3) {
            p.insert(
                ("ns".into(), format!("c{i}")),
                Pending {
                    created_at: i as f64 * 1e-3,
                    handler: format!("runtime-{i}"),
                },
            );
            assert!(p.map.len() <= PENDING_MAX);
        }
        assert_eq!(p.dropped, (PENDING_MAX * 2) as u64);
        // The newest survive, the oldest went first.
        let newest = format!("c{}", PENDING_MAX * 3 - 1);
        assert!(p.remove(&("ns".into(), newest)).is_some());
        assert!(p.remove(&("ns".into(), "c0".into())).is_none());
        // Age still expires entries.
        p.insert(
            ("ns".into(), "late".into()),
            Pending {
                created_at: 1e6,
                handler: "x".into(),
            },
        );
        assert_eq!(p.map.len(), 1);
    }

    #[test]
    fn app_containers_are_not_boots() {
        let c = container(Some("container"), None);
        assert_eq!(boot_handler(Some(&c), "io.containerd.runc.v2"), None);
    }
}
