//! A request-level fake Kubernetes API server for the publisher tests, the `ready` benchmark and the
//! node-in-a-box. It keeps one Node, RuntimeClasses and Events in memory, really applies JSON patches
//! (with `test` ops), merge patches and strategic merge patches of conditions, records every request
//! exactly as it arrived, and can inject faults (409, 5xx) or be "down" (connection errors).
//!
//! Two transports serve the same state through the same request handler: [`FakeApi::client`] (in
//! process, `tower_test::mock::pair` into `kube::Client::new`, kube-rs's own pattern) and
//! [`FakeApi::serve_http`] (a real HTTP/1.1 listener on 127.0.0.1 plus a kubeconfig file, for a noded
//! running in another process or in a container).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::Notify;

pub const NODE: &str = "kata-node-1";
pub const STARTUP_TAINT: &str = "noded.io/runtime-not-ready";

/// One request as the fake saw it.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
    /// The `Authorization` header as sent (empty when none), e.g. `Bearer <token>` from a kubeconfig.
    pub authorization: String,
    /// Status answered; 0 = connection error (server down).
    pub status: u16,
}

impl Recorded {
    /// `METHOD path?query` — compact form for sequence assertions.
    pub fn line(&self) -> String {
        if self.query.is_empty() {
            format!("{} {}", self.method, self.path)
        } else {
            format!("{} {}?{}", self.method, self.path, self.query)
        }
    }
}

/// An error answer for the next request matching method + path.
#[derive(Debug, Clone)]
pub struct Fault {
    pub method: &'static str,
    pub path: String,
    /// Only requests with this content type (e.g. the JSON patch of the taint, not the label merge patch).
    pub content_type: Option<&'static str>,
    pub status: u16,
    pub message: String,
}

#[derive(Debug)]
pub struct State {
    pub node: Value,
    pub runtime_classes: BTreeMap<String, Value>,
    pub events: Vec<Value>,
    pub log: Vec<Recorded>,
    pub faults: VecDeque<Fault>,
    pub down: bool,
    rv: u64,
}

impl State {
    pub fn taint_keys(&self) -> Vec<String> {
        self.node["spec"]["taints"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|t| t["key"].as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn has_startup_taint(&self) -> bool {
        self.taint_keys().iter().any(|k| k == STARTUP_TAINT)
    }

    pub fn label(&self, key: &str) -> Option<String> {
        self.node["metadata"]["labels"][key]
            .as_str()
            .map(str::to_string)
    }

    pub fn condition(&self, type_: &str) -> Option<Value> {
        self.node["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
    }

    pub fn capacity(&self, resource: &str) -> Option<String> {
        self.node["status"]["capacity"][resource]
            .as_str()
            .map(str::to_string)
    }

    pub fn allocatable(&self, resource: &str) -> Option<String> {
        self.node["status"]["allocatable"][resource]
            .as_str()
            .map(str::to_string)
    }

    /// Requests that changed something (PATCH/POST answered 2xx).
    pub fn writes(&self) -> Vec<&Recorded> {
        self.log
            .iter()
            .filter(|r| r.method != "GET" && (200..300).contains(&r.status))
            .collect()
    }

    pub fn event_reasons(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| e["reason"].as_str().map(str::to_string))
            .collect()
    }

    fn bump(&mut self) {
        self.rv += 1;
        self.node["metadata"]["resourceVersion"] = Value::String(self.rv.to_string());
    }
}

/// A fresh Karpenter node: labelled and tainted at birth, kubelet Ready, no runtime proven yet.
pub fn fresh_node() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": NODE,
            "uid": "8f0c6a8e-0000-4000-8000-000000000001",
            "resourceVersion": "1",
            "labels": {
                "kubernetes.io/hostname": NODE,
                "katacontainers.io/kata-runtime": "true",
                "karpenter.sh/nodepool": "kata-metal"
            }
        },
        "spec": {
            "taints": [
                {"key": "kata", "value": "true", "effect": "NoSchedule"},
                {"key": STARTUP_TAINT, "effect": "NoSchedule"}
            ]
        },
        "status": {
            "capacity": {"cpu": "96", "memory": "393216Mi", "pods": "110"},
            "allocatable": {"cpu": "95", "memory": "380000Mi", "pods": "110"},
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": "2026-01-01T00:00:00Z",
                "lastTransitionTime": "2026-01-01T00:00:00Z"
            }]
        }
    })
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
}

impl FakeApi {
    pub fn new(node: Value) -> Self {
        Self {
            state: Arc::new(Mutex::new(State {
                node,
                runtime_classes: BTreeMap::new(),
                events: Vec::new(),
                log: Vec::new(),
                faults: VecDeque::new(),
                down: false,
                rv: 1,
            })),
            changed: Arc::new(Notify::new()),
        }
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock already failed; keep its state readable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn set_down(&self, down: bool) {
        self.state().down = down;
    }

    pub fn inject(&self, fault: Fault) {
        self.state().faults.push_back(fault);
    }

    /// Changes the node as another writer would (kubelet), bumping its resourceVersion.
    pub fn mutate_node(&self, f: impl FnOnce(&mut Value)) {
        let mut s = self.state();
        f(&mut s.node);
        s.bump();
        drop(s);
        self.changed.notify_waiters();
    }

    /// A kube client whose transport is this fake. The serving task ends when the client is dropped.
    pub fn client(&self) -> kube::Client {
        let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let fake = self.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                match fake.handle(req).await {
                    Some(resp) => send.send_response(resp.map(Body::from)),
                    None => send.send_error(std::io::Error::new(
                        std::io::ErrorKind::ConnectionRefused,
                        "fake API server is down: connection refused",
                    )),
                }
                fake.changed.notify_waiters();
            }
        });
        kube::Client::new(service, "default")
    }

    /// Serves this fake's state on a real HTTP/1.1 listener on 127.0.0.1 (a free port), through the same
    /// request handler as [`client`](Self::client). While [`set_down`](Self::set_down) is on, connections
    /// are closed without an answer. Dropping the returned server stops listening and closes every
    /// connection.
    /// Must be called inside a tokio runtime (the server runs as a task of it).
    pub fn serve_http(&self) -> Result<HttpServer, std::io::Error> {
        let listener = std::net::TcpListener::bind(("127.0.0.1", 0))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let fake = self.clone();
        let task = tokio::spawn(async move {
            // Connection tasks live in this set: aborting the accept task drops it, which aborts them.
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let (stream, _) = tokio::select! {
                    accepted = listener.accept() => match accepted {
                        Ok(a) => a,
                        Err(e) => {
                            tracing::warn!(error = %e, "fake API server: accept failed");
                            continue;
                        }
                    },
                    Some(_) = conns.join_next(), if !conns.is_empty() => continue,
                };
                let fake = fake.clone();
                conns.spawn(async move {
                    let svc =
                        hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                            let fake = fake.clone();
                            async move {
                                let out = fake.handle(req).await;
                                fake.changed.notify_waiters();
                                match out {
                                    Some(resp) => Ok(resp
                                        .map(|b| http_body_util::Full::new(bytes::Bytes::from(b)))),
                                    // An error makes hyper drop the connection: the client sees it
                                    // closed without a response, the nearest a live listener gets to
                                    // "connection refused".
                                    None => Err(std::io::Error::new(
                                        std::io::ErrorKind::ConnectionRefused,
                                        "fake API server is down",
                                    )),
                                }
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(HttpServer { addr, task })
    }

    /// Waits until `pred` holds; panics (failing the test instead of hanging it) after 60 s.
    pub async fn wait_for(&self, what: &str, pred: impl Fn(&State) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if pred(&self.state()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let s = self.state();
                let log: Vec<String> = s
                    .log
                    .iter()
                    .map(|r| format!("{} -> {}", r.line(), r.status))
                    .collect();
                panic!(
                    "timed out waiting for: {what}\nrequests:\n{}",
                    log.join("\n")
                );
            }
        }
    }

    /// The one request handler behind both transports; `None` = the server is down (connection error).
    async fn handle<B>(&self, req: Request<B>) -> Option<Response<Vec<u8>>>
    where
        B: hyper::body::Body,
    {
        let (parts, body) = req.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes().to_vec())
            .unwrap_or_default();
        let body: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        let mut rec = Recorded {
            method: parts.method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or_default().to_string(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            body,
            authorization: parts
                .headers
                .get(http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string(),
            status: 0,
        };
        let mut s = self.state();
        if s.down {
            s.log.push(rec);
            return None;
        }
        let fault = s
            .faults
            .iter()
            .position(|f| {
                f.method == rec.method
                    && f.path == rec.path
                    && f.content_type.is_none_or(|c| c == rec.content_type)
            })
            .and_then(|i| s.faults.remove(i));
        let (status, out) = match fault {
            Some(f) => (f.status, status_body(f.status, &f.message)),
            None => route(&mut s, &rec),
        };
        rec.status = status;
        s.log.push(rec);
        drop(s);
        let resp = Response::builder()
            .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(serde_json::to_vec(&out).unwrap_or_default());
        resp.ok()
    }
}

/// [`FakeApi::serve_http`]'s listener; dropping it stops the server.
#[derive(Debug)]
pub struct HttpServer {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HttpServer {
    pub fn addr(&self) -> std::net::SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes `dir/kubeconfig` (this server, a token user, namespace `default`) for a client in another
    /// process: `KUBECONFIG=<path>`, which `kube::Config::infer` (behind `Client::try_default`) reads
    /// before it looks for an in-cluster service account.
    pub fn kubeconfig(&self, dir: &std::path::Path) -> Result<std::path::PathBuf, std::io::Error> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1
kind: Config
clusters:
  - name: fake
    cluster:
      server: {url}
contexts:
  - name: fake
    context:
      cluster: fake
      user: fake
      namespace: default
current-context: fake
users:
  - name: fake
    user:
      token: {TOKEN}
",
            url = self.url()
        );
        std::fs::write(&path, text)?;
        Ok(path)
    }
}

/// The bearer token in [`HttpServer::kubeconfig`] (the fake accepts any).
pub const TOKEN: &str = "fake-api-token";

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn status_body(code: u16, message: &str) -> Value {
    let reason = match code {
        409 => "Conflict",
        422 => "Invalid",
        404 => "NotFound",
        429 => "TooManyRequests",
        503 => "ServiceUnavailable",
        _ => "InternalError",
    };
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn route(s: &mut State, r: &Recorded) -> (u16, Value) {
    let node_path = format!("/api/v1/nodes/{NODE}");
    let status_path = format!("{node_path}/status");
    match (r.method.as_str(), r.path.as_str()) {
        ("GET", p) if p == node_path => (200, s.node.clone()),
        ("PATCH", p) if p == node_path || p == status_path => {
            let mut next = s.node.clone();
            let applied = match r.content_type.as_str() {
                "application/json-patch+json" => json_patch(&mut next, &r.body),
                "application/merge-patch+json" => {
                    merge_patch(&mut next, &r.body);
                    Ok(())
                }
                "application/strategic-merge-patch+json" => {
                    strategic_merge(&mut next, &r.body);
                    Ok(())
                }
                other => Err((415, format!("unsupported media type {other:?}"))),
            };
            match applied {
                Ok(()) => {
                    s.node = next;
                    s.bump();
                    (200, s.node.clone())
                }
                Err((code, msg)) => (code, status_body(code, &msg)),
            }
        }
        ("PATCH", p) if p.starts_with("/apis/node.k8s.io/v1/runtimeclasses/") => {
            let name = p
                .trim_start_matches("/apis/node.k8s.io/v1/runtimeclasses/")
                .to_string();
            let mut obj = r.body.clone();
            obj["metadata"]["resourceVersion"] = json!("1");
            s.runtime_classes.insert(name, obj.clone());
            (200, obj)
        }
        ("POST", "/apis/events.k8s.io/v1/namespaces/default/events") => {
            s.events.push(r.body.clone());
            (201, r.body.clone())
        }
        _ => (
            404,
            status_body(404, &format!("{} {} not found", r.method, r.path)),
        ),
    }
}

fn unescape(token: &str) -> String {
    token.replace("~1", "/").replace("~0", "~")
}

fn split_pointer(path: &str) -> Vec<String> {
    path.split('/').skip(1).map(unescape).collect()
}

fn get_mut<'a>(mut v: &'a mut Value, tokens: &[String]) -> Option<&'a mut Value> {
    for t in tokens {
        v = match v {
            Value::Object(m) => m.get_mut(t)?,
            Value::Array(a) => a.get_mut(t.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

/// RFC 6902 (test, add, replace, remove) — what the API server does with application/json-patch+json.
pub fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), (u16, String)> {
    let ops = ops
        .as_array()
        .ok_or((400, "json patch must be an array".to_string()))?;
    for op in ops {
        let path = op["path"].as_str().unwrap_or_default();
        let tokens = split_pointer(path);
        let (parent, last) = tokens.split_at(tokens.len().saturating_sub(1));
        let last = last.first().cloned().unwrap_or_default();
        match op["op"].as_str().unwrap_or_default() {
            "test" => {
                if get_mut(doc, &tokens).map(|v| &*v) != Some(&op["value"]) {
                    return Err((
                        422,
                        format!(
                            "the server rejected our request due to an error in our request: testing value {path} failed"
                        ),
                    ));
                }
            }
            "add" | "replace" => {
                let is_replace = op["op"] == "replace";
                let target =
                    get_mut(doc, parent).ok_or((422, format!("{path}: missing parent")))?;
                match target {
                    Value::Object(m) => {
                        if is_replace && !m.contains_key(&last) {
                            return Err((422, format!("replace {path}: missing")));
                        }
                        m.insert(last, op["value"].clone());
                    }
                    Value::Array(a) if last == "-" => a.push(op["value"].clone()),
                    Value::Array(a) => {
                        let i: usize = last
                            .parse()
                            .map_err(|_| (422, format!("{path}: bad index")))?;
                        if is_replace {
                            *a.get_mut(i).ok_or((422, format!("{path}: out of range")))? =
                                op["value"].clone();
                        } else if i <= a.len() {
                            a.insert(i, op["value"].clone());
                        } else {
                            return Err((422, format!("{path}: out of range")));
                        }
                    }
                    _ => return Err((422, format!("{path}: parent is not a container"))),
                }
            }
            "remove" => {
                let target =
                    get_mut(doc, parent).ok_or((422, format!("{path}: missing parent")))?;
                let removed = match target {
                    Value::Object(m) => m.remove(&last).is_some(),
                    Value::Array(a) => match last.parse::<usize>() {
                        Ok(i) if i < a.len() => {
                            a.remove(i);
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                };
                if !removed {
                    return Err((422, format!("remove {path}: missing")));
                }
            }
            other => return Err((400, format!("unsupported op {other}"))),
        }
    }
    Ok(())
}

/// RFC 7386.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(t) = target {
        for (k, v) in p {
            if v.is_null() {
                t.remove(k);
            } else {
                merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
    }
}

/// Strategic merge as the API server does it for what noded sends: lists named `conditions` merge by
/// `type`, everything else like a merge patch.
pub fn strategic_merge(target: &mut Value, patch: &Value) {
    let (Value::Object(t), Value::Object(p)) = (&mut *target, patch) else {
        merge_patch(target, patch);
        return;
    };
    for (k, v) in p {
        if k == "conditions"
            && let (Some(Value::Array(existing)), Value::Array(new)) = (t.get_mut(k), v)
        {
            for c in new {
                match existing.iter_mut().find(|e| e["type"] == c["type"]) {
                    Some(e) => merge_patch(e, c),
                    None => existing.push(c.clone()),
                }
            }
        } else if v.is_null() {
            t.remove(k);
        } else if v.is_object() {
            strategic_merge(t.entry(k.clone()).or_insert(json!({})), v);
        } else {
            t.insert(k.clone(), v.clone());
        }
    }
}

/// Publisher settings for tests: handler `runc`, threshold 3, the two Kata RuntimeClasses, no label rate
/// limit, resync effectively off (tests that need it set it), short backoff.
pub fn settings() -> noded::k8s::PublisherSettings {
    noded::k8s::PublisherSettings {
        node_name: NODE.into(),
        startup_taint: STARTUP_TAINT.into(),
        handlers: vec!["runc".into()],
        failure_threshold: 3,
        runtime_classes: vec!["kata-qemu".into(), "kata-qemu-warm".into()],
        label_interval: Duration::ZERO,
        resync: Duration::from_secs(3600),
        backoff_base: Duration::from_millis(20),
        backoff_cap: Duration::from_millis(200),
    }
}

/// A publisher task running against the fake; aborted on drop so a failing test leaves nothing behind.
pub struct Running {
    pub handles: noded::k8s::PublisherHandles,
    pub status: tokio::sync::watch::Receiver<noded::k8s::PublisherStatus>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Running {
    /// Records one probe outcome, as the probe loop does.
    pub fn probe(&self, handler: &str, ok: bool, error: Option<&str>) {
        self.handles
            .health
            .send_modify(|h| h.record(handler, ok, error.map(str::to_string)));
    }

    pub fn capacity(&self, c: noded::k8s::Capacity) {
        self.handles.capacity.send_replace(Some(c));
    }

    /// Asks the publisher to stop (as on SIGTERM) and waits for the task to end.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("publisher task panicked");
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub fn start(fake: &FakeApi, settings: noded::k8s::PublisherSettings) -> Running {
    start_with_client(fake.client(), settings)
}

pub fn start_with_client(client: kube::Client, settings: noded::k8s::PublisherSettings) -> Running {
    let (handles, inputs) = noded::k8s::channels();
    let (status_tx, status) = tokio::sync::watch::channel(noded::k8s::PublisherStatus::default());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(noded::k8s::run_with_client(
        client,
        settings,
        inputs,
        status_tx,
        async move {
            let _ = stop_rx.await;
        },
    ));
    Running {
        handles,
        status,
        stop: Some(stop_tx),
        task: Some(task),
    }
}

pub fn capacity(total: u32, free: u32) -> noded::k8s::Capacity {
    noded::k8s::Capacity {
        slots_total: total,
        slots_free: free,
        boot_p50_ms: Some(300),
        warm_templates: 1,
        warm_condition: None,
        vm_cost_bytes: Default::default(),
    }
}

/// A probe sandbox through containerd's CRI, as the runtime manager does it: RunPodSandbox with
/// `handler`, a container from the probe image that runs `/bin/true`, then stop + remove. `Err` carries
/// containerd's own message.
pub async fn cri_probe(socket: &std::path::Path, handler: &str) -> Result<(), String> {
    // The CRI client's futures are large; keep them off the caller's stack.
    Box::pin(cri_probe_inner(socket, handler)).await
}

async fn cri_probe_inner(socket: &std::path::Path, handler: &str) -> Result<(), String> {
    use noded::cri::{CriClient, PodSpec};
    let t = Duration::from_secs(60);
    let mut cri = CriClient::connect(socket)
        .await
        .map_err(|e| e.runtime_message())?;
    let pod = PodSpec::unique("noded-probe", handler);
    let sandbox = cri
        .run_pod(&pod, t)
        .await
        .map_err(|e| e.runtime_message())?;
    let result = async {
        let id = cri
            .create_container(
                &sandbox,
                &pod,
                "probe",
                noded::containerd::image::PROBE_IMAGE,
                &["/bin/true"],
                t,
            )
            .await?;
        cri.start_container(&id, t).await
    }
    .await;
    let removed = cri.remove_pod(&sandbox, t).await;
    result.map_err(|e| e.runtime_message())?;
    removed.map_err(|e| e.runtime_message())
}
