//! `/metrics`, `/healthz` and `/readyz` over HTTP (axum routes, served by hyper) on
//! `daemon.metrics_listen`.
//!
//! `/metrics` speaks OpenMetrics to clients that accept it (Prometheus asks for it) and the
//! Prometheus text format 0.0.4 to everything else (curl, `promtool check metrics`).
//!
//! The port listens on every interface of a node, so the server is bounded (see [`Limits`]): a
//! client gets [`Limits::header_read_timeout`] to send its request headers, a connection lives at
//! most [`Limits::connection_timeout`], one source address holds at most
//! [`Limits::max_connections_per_ip`] and all together at most [`Limits::max_connections`]. A new
//! connection over a cap pushes out the oldest connection with no request in flight of the address
//! holding the most (a slowloris or a flood from one pod evicts itself, never the scraper's single
//! connection); when nothing can be pushed out it is closed at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper_util::rt::{TokioIo, TokioTimer};

use crate::metrics::{OPENMETRICS_CONTENT_TYPE, PROMETHEUS_TEXT_CONTENT_TYPE};
use crate::observe::Observer;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} for /metrics: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// Bounds on what one client can hold of the server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time from connect (or from the previous response) to the end of the request headers.
    pub header_read_timeout: Duration,
    /// Whole life of a connection, keep-alive included.
    pub connection_timeout: Duration,
    /// Open connections.
    pub max_connections: usize,
    /// Open connections from one source address.
    pub max_connections_per_ip: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(5),
            connection_timeout: Duration::from_secs(30),
            max_connections: 64,
            max_connections_per_ip: 16,
        }
    }
}

/// Liveness of the daemon's long-running tasks, reported by `/healthz`: a registered task that ended
/// (returned, panicked or was aborted) turns it into 503 naming the task. Clones share one registry.
#[derive(Debug, Clone, Default)]
pub struct Health {
    ended: Arc<Mutex<BTreeSet<String>>>,
}

/// Held by a watched task; dropping it (the task ended, however) marks the task dead.
#[derive(Debug)]
pub struct TaskGuard {
    health: Health,
    name: String,
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.health.lock().insert(std::mem::take(&mut self.name));
    }
}

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.ended.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A guard for a task that must run as long as the daemon: move it into the task.
    pub fn register(&self, name: impl Into<String>) -> TaskGuard {
        let name = name.into();
        self.lock().remove(&name);
        TaskGuard {
            health: self.clone(),
            name,
        }
    }

    /// `tokio::spawn` of a task that must run as long as the daemon.
    pub fn spawn<F>(&self, name: impl Into<String>, task: F) -> tokio::task::JoinHandle<()>
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let guard = self.register(name);
        tokio::spawn(async move {
            let _guard = guard;
            task.await;
        })
    }

    /// Watches a task spawned elsewhere. Aborting the returned handle aborts `handle`'s task too.
    pub fn watch(
        &self,
        name: impl Into<String>,
        handle: tokio::task::JoinHandle<()>,
    ) -> tokio::task::JoinHandle<()> {
        struct AbortOnDrop(tokio::task::AbortHandle);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let inner = AbortOnDrop(handle.abort_handle());
        self.spawn(name, async move {
            let _inner = inner;
            let _ = handle.await;
        })
    }

    /// Names of registered tasks that ended, sorted.
    pub fn ended(&self) -> Vec<String> {
        self.lock().iter().cloned().collect()
    }
}

#[derive(Clone)]
struct AppState {
    observer: Arc<Observer>,
    health: Health,
}

/// The routes, for a caller that serves them itself (tests, the benchmark). `/healthz` watches no
/// task: see [`router_with_health`].
pub fn router(observer: Arc<Observer>) -> Router {
    router_with_health(observer, Health::new())
}

/// The routes, `/healthz` failing once a task registered in `health` ends.
pub fn router_with_health(observer: Arc<Observer>, health: Health) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { observer, health })
}

pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

/// Serves [`router`] with the default [`Limits`] until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    observer: Arc<Observer>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    serve_router(listener, router(observer), Limits::default(), shutdown).await
}

/// Serves `app` within `limits` until `shutdown` completes; open connections are then closed (a
/// scrape is cheap to repeat, and the daemon is stopping).
pub async fn serve_router(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), HttpError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /metrics, /healthz, /readyz");
    }
    let table = Arc::new(Mutex::new(Table::default()));
    let mut conns = tokio::task::JoinSet::new();
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors or a connection reset before accept: keep serving.
                        tracing::debug!(error = %e, "accept");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let mut t = table.lock().unwrap_or_else(PoisonError::into_inner);
                if !t.admit(peer.ip(), &limits) {
                    drop(stream);
                    continue;
                }
                let id = t.next_id;
                t.next_id += 1;
                let conn = Conn::default();
                let task = connection(
                    stream,
                    app.clone(),
                    http1.clone(),
                    limits.connection_timeout,
                    conn.clone(),
                    Release { table: Arc::clone(&table), id },
                );
                // Inserted under the lock the task's `Release` needs: it cannot run before this.
                let abort = conns.spawn(task);
                t.insert(id, peer.ip(), conn, abort);
            }
        }
    }
    conns.shutdown().await;
    Ok(())
}

/// The open connections, oldest first (ids grow with accept order), and how many per address.
#[derive(Default)]
struct Table {
    next_id: u64,
    conns: BTreeMap<u64, Entry>,
    per_ip: HashMap<IpAddr, usize>,
}

struct Entry {
    ip: IpAddr,
    conn: Conn,
    abort: tokio::task::AbortHandle,
}

impl Table {
    /// Makes room for one more connection from `ip`, pushing out another if a cap is reached;
    /// false = no room (every candidate has a request in flight).
    fn admit(&mut self, ip: IpAddr, limits: &Limits) -> bool {
        if self.per_ip.get(&ip).copied().unwrap_or(0) >= limits.max_connections_per_ip {
            return self.evict(Some(ip));
        }
        if self.conns.len() >= limits.max_connections {
            return self.evict(None);
        }
        true
    }

    fn insert(&mut self, id: u64, ip: IpAddr, conn: Conn, abort: tokio::task::AbortHandle) {
        *self.per_ip.entry(ip).or_default() += 1;
        self.conns.insert(id, Entry { ip, conn, abort });
    }

    fn remove(&mut self, id: u64) -> Option<Entry> {
        let e = self.conns.remove(&id)?;
        if let Some(n) = self.per_ip.get_mut(&e.ip) {
            *n -= 1;
            if *n == 0 {
                self.per_ip.remove(&e.ip);
            }
        }
        Some(e)
    }

    /// Closes the oldest idle connection of `ip`, or (None) of the address holding the most
    /// connections that has an idle one.
    fn evict(&mut self, ip: Option<IpAddr>) -> bool {
        let victim = self
            .conns
            .iter()
            .filter(|(_, e)| ip.is_none_or(|ip| e.ip == ip) && e.conn.evictable())
            // max_by_key keeps the last maximum: reversed, the oldest of the heaviest address.
            .rev()
            .max_by_key(|(_, e)| self.per_ip.get(&e.ip).copied().unwrap_or(0))
            .map(|(id, _)| *id);
        match victim.and_then(|id| self.remove(id)) {
            Some(e) => {
                e.abort.abort();
                true
            }
            None => false,
        }
    }
}

/// Time after a response during which its connection is not evicted, so the response's bytes are
/// flushed before the socket can be closed under it.
const FLUSH_GRACE: Duration = Duration::from_millis(20);

/// What the accept loop knows of one connection.
#[derive(Clone, Default)]
struct Conn {
    in_flight: Arc<AtomicUsize>,
    /// Milliseconds since `EPOCH` of the last response's end; 0 = none yet.
    last_response: Arc<AtomicU64>,
}

static EPOCH: std::sync::LazyLock<Instant> = std::sync::LazyLock::new(Instant::now);

fn now_ms() -> u64 {
    // +1: a response in the first millisecond must not read as "none yet".
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX) + 1
}

impl Conn {
    fn evictable(&self) -> bool {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return false;
        }
        let last = self.last_response.load(Ordering::Acquire);
        last == 0
            || now_ms().saturating_sub(last)
                >= u64::try_from(FLUSH_GRACE.as_millis()).unwrap_or(u64::MAX)
    }
}

/// Counts a request from its headers until its response body has been handed to hyper entirely.
struct InFlight(Conn);

impl InFlight {
    fn enter(conn: &Conn) -> Self {
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        Self(conn.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.last_response.store(now_ms(), Ordering::Release);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until hyper drops it.
struct Guarded {
    body: Body,
    _in_flight: InFlight,
}

impl axum::body::HttpBody for Guarded {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Removes a connection from the table when its task ends, however it ends.
struct Release {
    table: Arc<Mutex<Table>>,
    id: u64,
}

impl Drop for Release {
    fn drop(&mut self) {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(self.id);
    }
}

async fn connection(
    stream: tokio::net::TcpStream,
    app: Router,
    http1: hyper::server::conn::http1::Builder,
    lifetime: Duration,
    conn: Conn,
    release: Release,
) {
    let _release = release;
    let _ = stream.set_nodelay(true);
    let service =
        hyper::service::service_fn(move |req: axum::http::Request<hyper::body::Incoming>| {
            let in_flight = InFlight::enter(&conn);
            let app = app.clone();
            async move {
                let response = tower::ServiceExt::oneshot(app, req.map(Body::new)).await;
                response.map(|r| {
                    r.map(|body| {
                        Body::new(Guarded {
                            body,
                            _in_flight: in_flight,
                        })
                    })
                })
            }
        });
    match tokio::time::timeout(
        lifetime,
        http1.serve_connection(TokioIo::new(stream), service),
    )
    .await
    {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(error = %e, "metrics connection"),
        Err(_) => tracing::debug!("metrics connection: lifetime over, closed"),
    }
}

fn wants_openmetrics(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"))
}

async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let m = state.observer.metrics();
    let (body, content_type) = if wants_openmetrics(&headers) {
        (m.encode(), OPENMETRICS_CONTENT_TYPE)
    } else {
        (m.encode_prometheus_text(), PROMETHEUS_TEXT_CONTENT_TYPE)
    };
    match body {
        Ok(body) => ([(header::CONTENT_TYPE, content_type)], body).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn healthz(State(state): State<AppState>) -> Response {
    let ended = state.health.ended();
    if ended.is_empty() {
        return (StatusCode::OK, "ok\n").into_response();
    }
    let mut body = String::from("unhealthy\n");
    for name in ended {
        body.push_str(&format!("{name}: task ended\n"));
    }
    (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
}

async fn readyz(State(state): State<AppState>) -> Response {
    let r = state.observer.readiness();
    if r.ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        let mut body = String::from("not ready\n");
        for (handler, why) in &r.failing {
            body.push_str(&format!("{handler}: {why}\n"));
        }
        (StatusCode::SERVICE_UNAVAILABLE, body).into_response()
    }
}
