//! The publisher: one task that turns runtime health, capacity and notices into node state.
//!
//! It is level-triggered: every sync reads the node and writes only what differs from the desired
//! state, so a lost write, a kubelet reset or an API outage heals on the next sync. Inputs arrive on
//! channels (typed, so the task is testable without containerd or VMs): runtime health and capacity
//! are `watch` channels (only the latest value matters; a slow API server coalesces them), notices
//! are an `mpsc` queue (each one becomes an Event, none may be coalesced away).
//!
//! Readiness rules (the shared model of `crate::observe::readiness`, which `/readyz` follows too):
//! - The startup taint is removed only after EVERY configured handler's latest probe succeeded.
//! - A handler failing `failure_threshold` probes in a row puts the taint back (condition False).
//! - Before the first sync with a probe result, the taint is not touched at all: on a fresh node it is
//!   there from birth and stays; when noded restarts on a proven node it is absent and stays absent
//!   (re-adding it would be the restart gap kata-deploy has).
//! - Shutdown does nothing to the node: running pods keep their runtime, the taint is not re-added (a
//!   DaemonSet rollout must not make the node unschedulable), containerd's config is never touched here.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use kube::Client;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::events::{self, EventType, NodeEvent};
use super::node::{
    self, DesiredCondition, JSON_PATCH, MERGE_PATCH, NodeApi, STRATEGIC_MERGE_PATCH,
};
use super::retry::{Backoff, ErrorClass, classify};
use super::signals::{
    LabelDecision, LabelGovernor, SchedulerLabels, default_overhead_mib, overhead_mib,
    overhead_moved,
};
use super::{
    CONDITION_KATA_RUNTIME_READY, CONDITION_KATA_WARM_TEMPLATE_READY, K8sError, LABEL_KATA_READY,
    runtimeclass,
};
use crate::config::NodedConfig;
// The readiness model is shared with `/readyz` (observe::readiness); re-exported for the k8s API.
pub use crate::observe::readiness::{HandlerHealth, Readiness, ReadinessModel, RuntimeHealth};

/// What the node can take, as measured by the observers and the template pool.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Capacity {
    /// VMs the node can hold in total: the `noded.io/vm-slots` extended resource.
    pub slots_total: u32,
    pub slots_free: u32,
    /// Median sandbox boot; `None` until a VM booted on this node.
    pub boot_p50_ms: Option<u32>,
    pub warm_templates: u32,
    /// The `KataWarmTemplateReady` condition; `None` when the node has no warm handler.
    pub warm_condition: Option<crate::observe::warm::WarmCondition>,
    /// Measured host memory of one VM per runtime handler (private bytes of qemu + shim + virtiofsd);
    /// a handler is absent until one of its VMs was measured. Drives each RuntimeClass's overhead.
    pub vm_cost_bytes: BTreeMap<String, u64>,
}

/// Things that happened on the node that an operator wants to see as Events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    ConfigApplied { detail: String },
    ContainerdRestarted { detail: String },
    TemplateRebuilt { template: String, detail: String },
    TemplateFailed { template: String, detail: String },
}

/// Receiving ends, owned by the publisher task.
pub struct PublisherInputs {
    pub health: watch::Receiver<RuntimeHealth>,
    pub capacity: watch::Receiver<Option<Capacity>>,
    pub notices: mpsc::Receiver<Notice>,
}

/// Sending ends, for the rest of noded. Use `notices.try_send` from code that must not wait on the
/// API server (a full queue drops the event, not the work).
#[derive(Clone)]
pub struct PublisherHandles {
    pub health: watch::Sender<RuntimeHealth>,
    pub capacity: watch::Sender<Option<Capacity>>,
    pub notices: mpsc::Sender<Notice>,
}

pub fn channels() -> (PublisherHandles, PublisherInputs) {
    let (health_tx, health) = watch::channel(RuntimeHealth::default());
    let (capacity_tx, capacity) = watch::channel(None);
    let (notices_tx, notices) = mpsc::channel(64);
    (
        PublisherHandles {
            health: health_tx,
            capacity: capacity_tx,
            notices: notices_tx,
        },
        PublisherInputs {
            health,
            capacity,
            notices,
        },
    )
}

/// How long a RuntimeClass the API server refused for good is left alone before noded asks again
/// (an operator may have extended the RBAC and policy since).
const REFUSED_CLASS_RETRY: Duration = Duration::from_secs(300);

/// One of noded's built-in handler names, whose classes the shipped RBAC and policy allow.
fn is_preset(class: &str) -> bool {
    crate::containerd::handler::KataHandler::ALL
        .iter()
        .any(|h| h.name() == class)
}

#[derive(Debug, Clone)]
pub struct PublisherSettings {
    pub node_name: String,
    /// Key of the startup taint (effect `NoSchedule`).
    pub startup_taint: String,
    /// Handlers that must all pass their probe before the taint goes.
    pub handlers: Vec<String>,
    pub failure_threshold: u32,
    /// RuntimeClasses to own (handler = name).
    pub runtime_classes: Vec<String>,
    /// Minimum time between label rewrites.
    pub label_interval: Duration,
    /// Full re-read of the node (re-asserts the extended resource after a kubelet reset).
    pub resync: Duration,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
}

impl PublisherSettings {
    pub fn from_config(cfg: &NodedConfig) -> Result<Self, K8sError> {
        let node_name = if cfg.kubernetes.node_name.is_empty() {
            std::env::var("NODE_NAME").unwrap_or_default()
        } else {
            cfg.kubernetes.node_name.clone()
        };
        if node_name.is_empty() {
            return Err(K8sError::NoNodeName);
        }
        let handlers = cfg.probe_handlers();
        if handlers.is_empty() {
            return Err(K8sError::NoHandlers);
        }
        Ok(Self {
            node_name,
            startup_taint: cfg.kubernetes.startup_taint.clone(),
            handlers,
            failure_threshold: cfg.probe.failure_threshold.max(1),
            runtime_classes: runtimeclass::class_names(&cfg.runtime_names()),
            label_interval: Duration::from_secs(cfg.kubernetes.label_interval_seconds),
            resync: Duration::from_secs(30),
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(30),
        })
    }
}

/// What the publisher has achieved, for health endpoints, tests and benchmarks.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublisherStatus {
    pub readiness: Readiness,
    /// The last sync reached the API server and wrote everything it wanted.
    pub synced: bool,
    pub last_error: Option<String>,
}

/// Spawns the publisher as its own task, so an unreachable API server never blocks metrics or health.
/// Connects with `kube::Client::try_default` (in-cluster service account, else kubeconfig), retrying
/// with backoff. The task ends when `shutdown` resolves.
pub fn spawn(
    settings: PublisherSettings,
    inputs: PublisherInputs,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> (
    tokio::task::JoinHandle<()>,
    watch::Receiver<PublisherStatus>,
) {
    let (status_tx, status_rx) = watch::channel(PublisherStatus::default());
    let span = info_span!("k8s_publisher", node = %settings.node_name);
    let task = tokio::spawn(
        async move {
            tokio::pin!(shutdown);
            let mut backoff = Backoff::new(settings.backoff_base, settings.backoff_cap);
            let client = loop {
                match Client::try_default().await {
                    Ok(c) => break c,
                    Err(e) => {
                        let e = K8sError::ClientConfig(e);
                        warn!(error = %e, "cannot build a Kubernetes client; node stays tainted");
                        status_tx.send_modify(|s| s.last_error = Some(e.to_string()));
                        tokio::select! {
                            () = tokio::time::sleep(backoff.next_delay()) => {}
                            () = &mut shutdown => return,
                        }
                    }
                }
            };
            run_with_client(client, settings, inputs, status_tx, shutdown).await;
        }
        .instrument(span),
    );
    (task, status_rx)
}

/// The publisher loop on a given client (tests pass a client whose service is a fake API server).
pub async fn run_with_client(
    client: Client,
    settings: PublisherSettings,
    mut inputs: PublisherInputs,
    status: watch::Sender<PublisherStatus>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut p = Publisher::new(client, settings);
    let mut backoff = Backoff::new(p.settings.backoff_base, p.settings.backoff_cap);
    let (mut health_open, mut capacity_open, mut notices_open) = (true, true, true);
    let mut next_sync = Instant::now();
    let mut in_backoff = false;
    loop {
        let wake = p.label_hold.map_or(next_sync, |h| h.min(next_sync));
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            r = inputs.health.changed(), if health_open => health_open = r.is_ok(),
            r = inputs.capacity.changed(), if capacity_open => capacity_open = r.is_ok(),
            n = inputs.notices.recv(), if notices_open => match n {
                Some(n) => p.on_notice(n),
                None => notices_open = false,
            },
            () = tokio::time::sleep_until(wake) => {}
        }
        // Always take the latest of every input, in a fixed order (health, capacity, notices), so that
        // whatever woke us, a notice sent after a capacity change is handled after it.
        let health = inputs.health.borrow_and_update().clone();
        p.on_health(&health);
        let capacity = inputs.capacity.borrow_and_update().clone();
        p.on_capacity(capacity, Instant::now());
        while let Ok(n) = inputs.notices.try_recv() {
            p.on_notice(n);
        }
        let now = Instant::now();
        let sync_now = now >= next_sync || (p.dirty && !in_backoff);
        if !sync_now {
            continue;
        }
        let result = tokio::select! {
            r = p.sync() => r,
            () = &mut shutdown => break,
        };
        match result {
            Ok(()) => {
                backoff.reset();
                in_backoff = false;
                next_sync = Instant::now() + p.settings.resync;
                status.send_modify(|s| {
                    s.readiness = p.readiness.readiness().clone();
                    s.synced = true;
                    s.last_error = None;
                });
            }
            Err(e) => {
                let delay = backoff.next_delay();
                in_backoff = true;
                next_sync = Instant::now() + delay;
                if e.class() == ErrorClass::Permanent {
                    error!(error = %e, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "Kubernetes sync failed");
                } else {
                    warn!(error = %e, retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX), "Kubernetes sync failed");
                }
                status.send_modify(|s| {
                    s.synced = false;
                    s.last_error = Some(e.to_string());
                });
            }
        }
    }
    info!("publisher stopped; node left as it is (no taint re-added, runtime untouched)");
}

struct Publisher {
    client: Client,
    node: NodeApi,
    settings: PublisherSettings,
    /// The startup taint, condition and label follow it; `/readyz` decides with the same model.
    readiness: ReadinessModel,
    /// Probe counter per handler already turned into events.
    seen_probes: BTreeMap<String, u64>,
    capacity: Option<Capacity>,
    governor: LabelGovernor,
    label_hold: Option<Instant>,
    /// RuntimeClass → memory overhead (MiB) it should carry / last carried.
    overhead_wanted: BTreeMap<String, u64>,
    overhead_applied: BTreeMap<String, u64>,
    /// RuntimeClasses of `[[handlers]]` entries the API server refused for good (the shipped RBAC and
    /// admission policy name only the presets), and when to ask again.
    classes_refused: BTreeMap<String, Instant>,
    node_uid: Option<String>,
    events: VecDeque<(NodeEvent, u32)>,
    /// Something changed that the node does not show yet.
    dirty: bool,
}

const MAX_QUEUED_EVENTS: usize = 100;
const EVENT_ATTEMPTS: u32 = 3;
const CONFLICT_ATTEMPTS: u32 = 5;

impl Publisher {
    fn new(client: Client, settings: PublisherSettings) -> Self {
        let overhead_wanted = settings
            .runtime_classes
            .iter()
            .map(|c| (c.clone(), default_overhead_mib(c)))
            .collect();
        Self {
            node: NodeApi::new(client.clone(), settings.node_name.clone()),
            client,
            governor: LabelGovernor::new(settings.label_interval),
            readiness: ReadinessModel::new(settings.handlers.clone(), settings.failure_threshold),
            settings,
            seen_probes: BTreeMap::new(),
            capacity: None,
            label_hold: None,
            overhead_wanted,
            overhead_applied: BTreeMap::new(),
            classes_refused: BTreeMap::new(),
            node_uid: None,
            events: VecDeque::new(),
            dirty: true,
        }
    }

    fn queue_event(&mut self, ev: NodeEvent) {
        if self.events.len() >= MAX_QUEUED_EVENTS {
            warn!(
                reason = ev.reason,
                "event queue full; dropping the oldest event"
            );
            self.events.pop_front();
        }
        self.events.push_back((ev, 0));
        self.dirty = true;
    }

    fn on_notice(&mut self, n: Notice) {
        let ev = match n {
            Notice::ConfigApplied { detail } => NodeEvent {
                type_: EventType::Normal,
                reason: "ContainerdConfigApplied",
                action: "Apply",
                note: detail,
            },
            Notice::ContainerdRestarted { detail } => NodeEvent {
                type_: EventType::Normal,
                reason: "ContainerdRestarted",
                action: "Restart",
                note: detail,
            },
            Notice::TemplateRebuilt { template, detail } => NodeEvent {
                type_: EventType::Normal,
                reason: "TemplateRebuilt",
                action: "Rebuild",
                note: format!("template {template}: {detail}"),
            },
            Notice::TemplateFailed { template, detail } => NodeEvent {
                type_: EventType::Warning,
                reason: "TemplateBuildFailed",
                action: "Build",
                note: format!("template {template}: {detail}; its pods boot cold meanwhile"),
            },
        };
        self.queue_event(ev);
    }

    fn on_health(&mut self, health: &RuntimeHealth) {
        let threshold = self.settings.failure_threshold;
        let mut failures = Vec::new();
        for handler in &self.settings.handlers {
            let Some(h) = health.handlers.get(handler) else {
                continue;
            };
            let seen = self.seen_probes.entry(handler.clone()).or_insert(0);
            if h.probes <= *seen {
                continue;
            }
            *seen = h.probes;
            // One event when a streak starts and one when it reaches the threshold, not one per probe.
            if !h.ok && (h.consecutive_failures == 1 || h.consecutive_failures == threshold) {
                failures.push(NodeEvent {
                    type_: EventType::Warning,
                    reason: "ProbeFailed",
                    action: "Probe",
                    note: format!(
                        "runtime handler {handler}: probe failed ({} in a row): {}",
                        h.consecutive_failures,
                        h.error.as_deref().unwrap_or("no error message")
                    ),
                });
            }
        }
        for ev in failures {
            self.queue_event(ev);
        }
        let Some(next) = self.readiness.update(health.clone()).cloned() else {
            return;
        };
        match &next {
            Readiness::Ready => {
                info!("every runtime handler passed its probe: lifting the startup taint");
                self.queue_event(NodeEvent {
                    type_: EventType::Normal,
                    reason: "KataRuntimeReady",
                    action: "Probe",
                    note: format!(
                        "runtime handlers proven: {}",
                        self.settings.handlers.join(", ")
                    ),
                });
            }
            Readiness::NotReady {
                taint: true,
                message,
            } => {
                warn!(%message, "runtime not ready: tainting the node");
                self.queue_event(NodeEvent {
                    type_: EventType::Warning,
                    reason: "KataRuntimeNotReady",
                    action: "Taint",
                    note: message.clone(),
                });
            }
            Readiness::NotReady { .. } | Readiness::Unknown => {}
        }
        self.dirty = true;
    }

    fn on_capacity(&mut self, capacity: Option<Capacity>, now: Instant) {
        let changed = capacity != self.capacity;
        if changed {
            if capacity.as_ref().map(|c| c.slots_total)
                != self.capacity.as_ref().map(|c| c.slots_total)
            {
                self.dirty = true;
            }
            let costs = capacity.as_ref().map(|c| &c.vm_cost_bytes);
            for (class, wanted) in &mut self.overhead_wanted {
                let Some(&bytes) = costs.and_then(|m| m.get(class)) else {
                    continue;
                };
                let mib = overhead_mib(Some(bytes));
                if overhead_moved(*wanted, mib) {
                    info!(runtime_class = %class, from_mib = *wanted, to_mib = mib, "RuntimeClass overhead moved");
                    *wanted = mib;
                    self.dirty = true;
                }
            }
            self.capacity.clone_from(&capacity);
        }
        let hold_expired = self.label_hold.is_some_and(|h| now >= h);
        let Some(c) = capacity else { return };
        if !changed && !hold_expired {
            return;
        }
        let measured = SchedulerLabels {
            vm_slots_free: c.slots_free,
            boot_p50_ms: c.boot_p50_ms,
            warm_templates: c.warm_templates,
        };
        match self.governor.offer(now.into_std(), measured) {
            LabelDecision::Publish(_) => {
                self.label_hold = None;
                self.dirty = true;
            }
            LabelDecision::Unchanged => self.label_hold = None,
            LabelDecision::HoldUntil(t) => self.label_hold = Some(Instant::from_std(t)),
        }
    }

    fn desired_taint(&self) -> Option<bool> {
        match self.readiness.readiness() {
            Readiness::Ready => Some(false),
            Readiness::NotReady { taint: true, .. } => Some(true),
            _ => None,
        }
    }

    async fn sync(&mut self) -> Result<(), K8sError> {
        for (name, mib) in self.overhead_wanted.clone() {
            if self.overhead_applied.get(&name) == Some(&mib)
                || self
                    .classes_refused
                    .get(&name)
                    .is_some_and(|until| Instant::now() < *until)
            {
                continue;
            }
            match runtimeclass::apply(&self.client, &name, mib).await {
                Ok(_) => {
                    self.classes_refused.remove(&name);
                    self.overhead_applied.insert(name, mib);
                }
                // A preset's class is part of the install: without it the node is not ready. A
                // `[[handlers]]` class the cluster refuses (RBAC resourceNames, the admission policy)
                // only leaves that handler unusable: pods naming it are refused at admission, which
                // says why; holding the whole node tainted for it would not.
                Err(source) if !is_preset(&name) && classify(&source) == ErrorClass::Permanent => {
                    warn!(
                        runtime_class = %name,
                        error = %source,
                        "RuntimeClass refused by the API server; add it to the noded ClusterRole's resourceNames and the noded-runtimeclasses admission policy (retrying in 5 minutes)"
                    );
                    self.classes_refused
                        .insert(name, Instant::now() + REFUSED_CLASS_RETRY);
                }
                Err(source) => {
                    return Err(K8sError::Api {
                        verb: "apply",
                        what: format!("runtimeclass {name}"),
                        source,
                    });
                }
            }
        }

        let mut n = self.get_node().await?;
        let taint = self.desired_taint();
        // Tainting is urgent and goes first; untainting goes last, once slots, labels and condition
        // are in place for the pods that will arrive.
        if taint == Some(true) {
            n = self.patch_taint(n, true).await?;
        }
        if let Some(c) = &self.capacity
            && let Some(p) = node::slots_patch(&n, c.slots_total)
        {
            n = self.patch(true, JSON_PATCH, &p, "status vm-slots").await?;
        }
        let mut labels: Vec<(&str, String)> = Vec::new();
        match self.readiness.readiness() {
            Readiness::Ready => labels.push((LABEL_KATA_READY, "true".into())),
            Readiness::NotReady { .. } => labels.push((LABEL_KATA_READY, "false".into())),
            Readiness::Unknown => {}
        }
        if let Some(l) = self.governor.published() {
            labels.extend(l.to_pairs());
        }
        if let Some(p) = node::labels_patch(&n, &labels) {
            n = self.patch(false, MERGE_PATCH, &p, "labels").await?;
        }
        if let Some(cond) = self.desired_condition()
            && let Some(p) = node::condition_patch(&n, &cond, &now_rfc3339())
        {
            n = self
                .patch(true, STRATEGIC_MERGE_PATCH, &p, "status condition")
                .await?;
        }
        if let Some(w) = self
            .capacity
            .as_ref()
            .and_then(|c| c.warm_condition.as_ref())
        {
            let cond = DesiredCondition {
                type_: CONDITION_KATA_WARM_TEMPLATE_READY,
                ready: w.ready,
                reason: w.reason.to_owned(),
                message: w.message.clone(),
            };
            if let Some(p) = node::condition_patch(&n, &cond, &now_rfc3339()) {
                n = self
                    .patch(true, STRATEGIC_MERGE_PATCH, &p, "warm template condition")
                    .await?;
            }
        }
        if taint == Some(false) {
            self.patch_taint(n, false).await?;
        }
        self.flush_events().await;
        self.dirty = false;
        Ok(())
    }

    fn desired_condition(&self) -> Option<DesiredCondition> {
        match self.readiness.readiness() {
            Readiness::Unknown => None,
            Readiness::Ready => Some(DesiredCondition {
                type_: CONDITION_KATA_RUNTIME_READY,
                ready: true,
                reason: "RuntimeProven".into(),
                message: format!(
                    "runtime handlers passed their probe: {}",
                    self.settings.handlers.join(", ")
                ),
            }),
            Readiness::NotReady { message, .. } => Some(DesiredCondition {
                type_: CONDITION_KATA_RUNTIME_READY,
                ready: false,
                reason: "ProbeFailed".into(),
                message: message.clone(),
            }),
        }
    }

    async fn get_node(&mut self) -> Result<Node, K8sError> {
        let n = self.node.get().await.map_err(|source| K8sError::Api {
            verb: "get",
            what: format!("node {}", self.node.name()),
            source,
        })?;
        self.node_uid.clone_from(&n.metadata.uid);
        Ok(n)
    }

    async fn patch(
        &self,
        status: bool,
        content_type: &str,
        body: &serde_json::Value,
        what: &str,
    ) -> Result<Node, K8sError> {
        debug!(what, %body, "patching node");
        self.node
            .patch(status, content_type, body)
            .await
            .map_err(|source| K8sError::Api {
                verb: "patch",
                what: format!("node {} {what}", self.node.name()),
                source,
            })
    }

    /// Adds or removes the startup taint; on a conflict (409, or 422 from the `test` guard) re-reads the
    /// node and computes the patch again.
    async fn patch_taint(&mut self, mut n: Node, present: bool) -> Result<Node, K8sError> {
        let mut pause = Backoff::new(Duration::from_millis(10), Duration::from_millis(500));
        for attempt in 1..=CONFLICT_ATTEMPTS {
            let Some(p) = node::taint_patch(&n, &self.settings.startup_taint, present) else {
                return Ok(n);
            };
            match self.node.patch(false, JSON_PATCH, &p).await {
                Ok(updated) => {
                    info!(taint = %self.settings.startup_taint, present, "startup taint updated");
                    return Ok(updated);
                }
                Err(e) if classify(&e) == ErrorClass::Conflict => {
                    debug!(attempt, error = %e, "taint patch conflicted; re-reading the node");
                    tokio::time::sleep(pause.next_delay()).await;
                    n = self.get_node().await?;
                }
                Err(source) => {
                    return Err(K8sError::Api {
                        verb: "patch",
                        what: format!("node {} taints", self.node.name()),
                        source,
                    });
                }
            }
        }
        Err(K8sError::Conflict {
            node: self.node.name().to_string(),
            attempts: CONFLICT_ATTEMPTS,
        })
    }

    async fn flush_events(&mut self) {
        while let Some((ev, attempts)) = self.events.pop_front() {
            let obj = events::build(
                self.node.name(),
                self.node_uid.as_deref(),
                &ev,
                std::time::SystemTime::now(),
            );
            match events::post(&self.client, &obj).await {
                Ok(_) => {}
                Err(e) => {
                    if classify(&e) == ErrorClass::Transient && attempts + 1 < EVENT_ATTEMPTS {
                        self.events.push_front((ev, attempts + 1));
                    } else {
                        warn!(reason = ev.reason, error = %e, "dropping event");
                    }
                    // The API server is unhappy: try the rest on the next sync.
                    return;
                }
            }
        }
    }
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    k8s_openapi::jiff::Timestamp::from_second(i64::try_from(secs).unwrap_or(0))
        .map(|t| t.to_string())
        .unwrap_or_default()
}
