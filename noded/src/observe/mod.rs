//! Observing VMs on the host: which VMs run, what they cost in host memory, how fast they booted,
//! how many more fit. Feeds the metrics, `/readyz`, `noded status` and the scheduler signals.
//!
//! [`Observer`] is the one stateful piece: it scans `/proc` periodically ([`procscan`]), derives
//! capacity ([`capacity`]), keeps the latest probe result and recent boot latencies per runtime
//! handler, and publishes everything to [`crate::metrics::Metrics`].

pub(crate) mod capacity;
pub mod latency;
pub(crate) mod memory;
pub mod procscan;
pub mod readiness;
pub mod warm;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::config::NodedConfig;
use crate::metrics::{BootOutcome, HandlerGauges, Metrics, MetricsScope};
use capacity::{CapacityPolicy, Slots};
use memory::{HostResources, MemoryUsage, percentile};
use procscan::{BootKind, Hypervisor, Origin, Sandbox, ScanReport, Scanner, VmRole};

/// Boot latencies kept per handler for the p50/p90 `noded status` and the node labels show.
const BOOT_WINDOW: usize = 256;
/// Boot samples whose sandbox no scan found after this many scans are classified without it.
const PENDING_SCANS: u8 = 2;
/// Boot samples waiting for a scan, at most: while scans fail nothing is classified, and the queue
/// must not grow with every sandbox started meanwhile. Beyond it the oldest is dropped (counted).
pub const PENDING_MAX: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error(transparent)]
    Scan(#[from] procscan::ScanError),
    #[error(transparent)]
    Host(#[from] memory::HostReadError),
}

/// A template and the runtime handler its clones are accounted to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateRef {
    pub name: String,
    pub runtime_handler: String,
}

/// What the observer needs from the configuration.
#[derive(Debug, Clone)]
pub struct ObserverConfig {
    /// `/proc` normally; a synthetic tree in tests and benchmarks.
    pub proc_root: PathBuf,
    /// Handlers always reported (configured runtimes and probe handlers).
    pub handlers: Vec<String>,
    /// Handlers that must pass their probe for `/readyz`.
    pub probe_handlers: Vec<String>,
    /// `probe.failure_threshold`: failures in a row that make a proven node not ready (as the taint).
    pub probe_failure_threshold: u32,
    pub templates: Vec<TemplateRef>,
    /// Kata handlers served from Kata's own factory template (`kata-qemu-warm`, warm `[[handlers]]`).
    pub warm_handlers: Vec<String>,
    /// Each warm handler's template directory: a Kata clone whose guest memory comes from there is
    /// that handler's (the Go shim's binary name tells no handler on containerd 1.7+).
    pub warm_template_dirs: Vec<(PathBuf, String)>,
    /// Directories holding template memory files.
    pub template_dirs: Vec<PathBuf>,
    /// noded's `run_dir/vms`: the spawn records that identify its own VMs (`vm::reap::VmRecord`).
    pub own_vms_dir: Option<PathBuf>,
    pub capacity: CapacityPolicy,
}

impl ObserverConfig {
    pub fn from_config(cfg: &NodedConfig) -> ObserverConfig {
        let templates: Vec<TemplateRef> = cfg
            .templates
            .iter()
            .map(|t| TemplateRef {
                name: t.name.clone(),
                runtime_handler: t.runtime_handler.clone(),
            })
            .collect();
        let probe_handlers = cfg.probe_handlers();
        let runtimes = cfg.runtime_names();
        let mut handlers: Vec<String> = Vec::new();
        for h in runtimes
            .iter()
            .chain(&probe_handlers)
            .chain(templates.iter().map(|t| &t.runtime_handler))
        {
            if !handlers.contains(h) {
                handlers.push(h.clone());
            }
        }
        const MIB: u64 = 1024 * 1024;
        let warm = cfg.warm_targets();
        let o = &cfg.observe;
        ObserverConfig {
            proc_root: o.proc_root.clone(),
            handlers,
            probe_handlers,
            probe_failure_threshold: cfg.probe.failure_threshold,
            templates,
            warm_handlers: warm.iter().map(|t| t.name.clone()).collect(),
            warm_template_dirs: warm
                .iter()
                .map(|t| (absolute(&t.template_path), t.name.clone()))
                .collect(),
            // QEMU is given canonical paths (the engine canonicalizes run_dir), so compare with those.
            template_dirs: [
                PathBuf::from(procscan::KATA_FACTORY_TEMPLATE_DIR),
                cfg.daemon.run_dir.join("templates"),
                cfg.daemon.data_dir.join("templates"),
            ]
            .into_iter()
            .chain(warm.iter().map(|t| t.template_path.clone()))
            .map(|d| absolute(&d))
            .collect(),
            own_vms_dir: Some(cfg.daemon.run_dir.join("vms")),
            capacity: CapacityPolicy {
                reserved_memory_bytes: o.reserved_memory_mib.saturating_mul(MIB),
                reserved_cpu_millis: o.reserved_cpu_millis,
                cpu_millis_per_vm: o.cpu_millis_per_vm,
                prior_memory_bytes: o
                    .handler_prior_memory_mib
                    .iter()
                    .map(|(h, mib)| (h.clone(), mib.saturating_mul(MIB)))
                    .collect(),
                default_prior_memory_bytes: o.prior_memory_mib.saturating_mul(MIB),
            },
        }
    }

    /// The label values the metrics registry pre-creates.
    pub fn metrics_scope(&self) -> MetricsScope {
        MetricsScope {
            handlers: self.handlers.clone(),
            // Kata's factory template of a warm handler is reported under the handler's name.
            templates: self
                .templates
                .iter()
                .map(|t| t.name.clone())
                .chain(self.warm_handlers.iter().cloned())
                .collect(),
        }
    }

    /// Pods of this handler are meant to start as clones (noded's template or Kata's factory), so a
    /// cold boot is a template miss.
    fn has_template(&self, handler: &str) -> bool {
        self.templates.iter().any(|t| t.runtime_handler == handler)
            || self.warm_handlers.iter().any(|h| h == handler)
    }
}

/// The latest probe of one handler.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ProbeRecord {
    pub ok: bool,
    pub seconds: f64,
    pub error: Option<String>,
}

/// Everything `noded status` and the Status RPC show for one runtime handler.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct HandlerSnapshot {
    pub runtime_handler: String,
    /// Latest probe passed. A handler without a probe yet is not ready.
    pub ready: bool,
    pub probe: Option<ProbeRecord>,
    pub slots_total: u64,
    pub slots_free: u64,
    /// Host memory one slot is sized for, and whether it was measured (else the prior).
    pub slot_cost_bytes: u64,
    pub slot_cost_measured: bool,
    pub vms: u64,
    pub vms_template: u64,
    pub vms_cold: u64,
    pub memory: MemoryUsage,
    pub boot_p50_seconds: Option<f64>,
    pub boot_p90_seconds: Option<f64>,
}

/// `/readyz`: ready exactly when the node's startup taint is lifted or kept off
/// ([`readiness::ReadinessModel`], the publisher's model).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadyzStatus {
    pub ready: bool,
    /// Probe handlers whose latest probe did not pass, and why (a proven node stays ready while a
    /// failure streak is below the threshold).
    pub failing: Vec<(String, String)>,
}

/// One observation round's per-handler figures.
#[derive(Debug, Clone, Default)]
struct HandlerFigures {
    vms_template: u64,
    vms_cold: u64,
    memory: MemoryUsage,
    pss_per_vm: Vec<u64>,
    slots: Option<Slots>,
}

#[derive(Debug)]
struct PendingBoot {
    handler: String,
    sandbox_id: String,
    seconds: f64,
    scans_waited: u8,
}

#[derive(Debug, Default)]
struct State {
    figures: BTreeMap<String, HandlerFigures>,
    /// Boot kind of every live sandbox, from the latest scan.
    live: HashMap<String, BootKind>,
    /// Sandboxes already counted as template hit or miss.
    counted: BTreeSet<String>,
    /// Scans that saw a not yet counted Kata sandbox whose handler was still unknown.
    unattributed_scans: HashMap<String, u8>,
    /// Handler of a sandbox, learnt from boot samples (containerd events name it; /proc does not).
    sandbox_handlers: HashMap<String, String>,
    boots: HashMap<String, VecDeque<f64>>,
    probes: BTreeMap<String, ProbeRecord>,
    pending: VecDeque<PendingBoot>,
    /// Boot samples dropped because [`PENDING_MAX`] were waiting.
    pending_dropped: u64,
    /// `/readyz`, decided like the node taint from every probe outcome.
    readiness: readiness::ReadinessModel,
}

/// Observes VMs and keeps the latest figures. Share it as `Arc<Observer>`.
#[derive(Debug)]
pub struct Observer {
    config: ObserverConfig,
    scanner: Scanner,
    metrics: Arc<Metrics>,
    state: Mutex<State>,
    warm: warm::WarmTemplates,
    /// Wakes the periodic loop early when a boot sample waits for classification.
    wake: tokio::sync::Notify,
}

impl Observer {
    pub fn new(config: ObserverConfig, metrics: Arc<Metrics>) -> Observer {
        let mut scanner = Scanner::new(
            config.proc_root.clone(),
            config.template_dirs.clone(),
            config.templates.iter().map(|t| t.name.clone()).collect(),
        );
        if let Some(dir) = &config.own_vms_dir {
            scanner = scanner.with_own_vms(dir.clone());
        }
        let state = State {
            readiness: readiness::ReadinessModel::new(
                config.probe_handlers.clone(),
                config.probe_failure_threshold,
            ),
            ..State::default()
        };
        Observer {
            warm: warm::WarmTemplates::new(config.warm_handlers.iter().cloned()),
            config,
            scanner,
            metrics,
            state: Mutex::new(state),
            wake: tokio::sync::Notify::new(),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn config(&self) -> &ObserverConfig {
        &self.config
    }

    /// Kata's warm path per warm handler (template valid, probe restored from it).
    pub fn warm(&self) -> &warm::WarmTemplates {
        &self.warm
    }

    /// How the sandbox `id` booted, from a fresh `/proc` scan (blocking; a few ms). `None` when no
    /// hypervisor of that sandbox is running.
    pub fn sandbox_boot(&self, id: &str) -> Option<BootKind> {
        let scan = self.scanner.scan().ok()?;
        scan.sandboxes
            .iter()
            .find(|s| s.id == id)
            .and_then(Sandbox::boot)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves figures that are at worst one round old.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Scans now, updates the figures and the metrics, and returns the scan (blocking I/O).
    pub fn observe_now(&self) -> Result<ScanReport, ObserveError> {
        let scan = self.scanner.scan()?;
        let host = HostResources::read(self.scanner.root())?;
        self.apply(&scan, &host);
        Ok(scan)
    }

    /// Periodic loop for `noded run`: scans every `interval`, or sooner when a boot sample waits.
    /// Runs until the task is dropped/aborted; scan errors are logged, not fatal.
    pub async fn run(self: Arc<Self>, interval: Duration) {
        loop {
            let me = Arc::clone(&self);
            match tokio::task::spawn_blocking(move || me.observe_now()).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "VM observation failed"),
                Err(e) => tracing::warn!(error = %e, "VM observation task failed"),
            }
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = self.wake.notified() => {
                    // Let the VM's processes settle into /proc before looking.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// A sandbox of `handler` booted in `seconds` (from containerd events). Its boot kind comes from
    /// the next scan that sees it.
    pub fn record_boot(&self, handler: &str, sandbox_id: &str, seconds: f64) {
        let span = tracing::debug_span!("boot", runtime_handler = handler, sandbox = sandbox_id);
        let _g = span.enter();
        // Any runtime name can come from containerd's events: unconfigured ones share one value.
        let handler = &self.metrics.handler_label(handler);
        let mut st = self.state();
        st.sandbox_handlers
            .insert(sandbox_id.to_string(), handler.to_string());
        if let Some(kind) = st.live.get(sandbox_id).copied() {
            // A scan saw this VM before containerd named its handler and left it uncounted: decide
            // now rather than a scan later, so a boot sample is never published before the hit or
            // miss of its VM.
            if st.unattributed_scans.contains_key(sandbox_id) {
                self.count_hit_or_miss(&mut st, sandbox_id, handler, kind);
            }
            self.finish_boot(&mut st, handler, kind, seconds);
        } else {
            if st.pending.len() >= PENDING_MAX
                && let Some(old) = st.pending.pop_front()
            {
                if !st.live.contains_key(&old.sandbox_id) {
                    st.sandbox_handlers.remove(&old.sandbox_id);
                }
                st.pending_dropped += 1;
                if st.pending_dropped.is_power_of_two() {
                    tracing::warn!(
                        dropped = st.pending_dropped,
                        "boot samples waiting for a scan exceed {PENDING_MAX}; dropping the oldest"
                    );
                }
            }
            st.pending.push_back(PendingBoot {
                handler: handler.to_string(),
                sandbox_id: sandbox_id.to_string(),
                seconds,
                scans_waited: 0,
            });
            drop(st);
            self.wake.notify_one();
        }
    }

    /// Boot samples waiting for a scan, and how many were dropped because too many waited.
    pub fn pending_boot_samples(&self) -> (usize, u64) {
        let st = self.state();
        (st.pending.len(), st.pending_dropped)
    }

    /// Distinct handler names the observer keeps state under (boot windows, figures, probes).
    pub fn handler_keys(&self) -> usize {
        let st = self.state();
        let mut keys: BTreeSet<&String> = st.boots.keys().collect();
        keys.extend(st.figures.keys());
        keys.extend(st.probes.keys());
        keys.extend(st.sandbox_handlers.values());
        keys.len()
    }

    /// The latest probe of `handler`. A failed probe is also a failed boot of that handler.
    pub fn record_probe(&self, handler: &str, ok: bool, duration: Duration, error: Option<String>) {
        let seconds = duration.as_secs_f64();
        if !ok {
            tracing::warn!(runtime_handler = handler, error = ?error, "probe sandbox failed");
            self.metrics.observe_boot(
                handler,
                self.assumed_boot(handler),
                BootOutcome::Failed,
                seconds,
            );
        }
        self.metrics.set_runtime_ready(handler, ok);
        let mut st = self.state();
        st.readiness.record(handler, ok, error.clone());
        st.probes
            .insert(handler.to_string(), ProbeRecord { ok, seconds, error });
    }

    /// [`Self::record_boot`] for a sample from containerd's events.
    pub fn record_boot_sample(&self, s: &latency::BootSample) {
        self.record_boot(&s.runtime_handler, &s.sandbox_id, s.seconds);
    }

    /// [`Self::record_probe`] for a probe sandbox's outcome.
    pub fn record_probe_outcome(&self, o: &crate::cri::probe::ProbeOutcome) {
        self.record_probe(&o.handler, o.ok, o.duration, o.error.clone());
    }

    /// Feeds boot samples (`latency::spawn`) into the observer until the channel closes.
    pub async fn consume_boot_samples(
        self: Arc<Self>,
        mut samples: tokio::sync::mpsc::Receiver<latency::BootSample>,
    ) {
        while let Some(s) = samples.recv().await {
            self.record_boot_sample(&s);
        }
    }

    /// `/readyz`'s answer, from the same readiness model as the node taint.
    pub fn readiness(&self) -> ReadyzStatus {
        let st = self.state();
        ReadyzStatus {
            ready: st.readiness.readiness().is_ready(),
            failing: st.readiness.failing(),
        }
    }

    /// Per-handler figures for `noded status`, the Status RPC and the node publisher.
    pub fn handler_snapshots(&self) -> Vec<HandlerSnapshot> {
        let st = self.state();
        let mut names: Vec<String> = self.config.handlers.clone();
        for h in st.figures.keys().chain(st.probes.keys()) {
            if !names.contains(h) {
                names.push(h.clone());
            }
        }
        names
            .into_iter()
            .map(|h| {
                let f = st.figures.get(&h).cloned().unwrap_or_default();
                let probe = st.probes.get(&h).cloned();
                let boots: Vec<f64> = st
                    .boots
                    .get(&h)
                    .map(|b| b.iter().copied().collect())
                    .unwrap_or_default();
                let slots = f.slots.unwrap_or(Slots {
                    total: 0,
                    free: 0,
                    cost_bytes: 0,
                    measured: false,
                });
                HandlerSnapshot {
                    ready: probe.as_ref().is_some_and(|p| p.ok),
                    probe,
                    slots_total: slots.total,
                    slots_free: slots.free,
                    slot_cost_bytes: slots.cost_bytes,
                    slot_cost_measured: slots.measured,
                    vms: f.vms_template + f.vms_cold,
                    vms_template: f.vms_template,
                    vms_cold: f.vms_cold,
                    memory: f.memory,
                    boot_p50_seconds: quantile(&boots, 0.5),
                    boot_p90_seconds: quantile(&boots, 0.9),
                    runtime_handler: h,
                }
            })
            .collect()
    }

    fn assumed_boot(&self, handler: &str) -> BootKind {
        if self.config.has_template(handler) {
            BootKind::Template
        } else {
            BootKind::Cold
        }
    }

    /// Counts a live Kata sandbox once: a clone is a template hit, a cold boot a miss when its
    /// handler has a template.
    fn count_hit_or_miss(&self, st: &mut State, id: &str, handler: &str, kind: BootKind) {
        match kind {
            BootKind::Template => self.metrics.record_template_hit(),
            BootKind::Cold if self.config.has_template(handler) => {
                tracing::info!(sandbox = %id, runtime_handler = %handler, "VM booted cold although a template is configured");
                self.metrics.record_template_miss();
            }
            BootKind::Cold => {}
        }
        st.counted.insert(id.to_string());
        st.unattributed_scans.remove(id);
    }

    fn finish_boot(&self, st: &mut State, handler: &str, kind: BootKind, seconds: f64) {
        self.metrics
            .observe_boot(handler, kind, BootOutcome::Ok, seconds);
        let window = st.boots.entry(handler.to_string()).or_default();
        if window.len() == BOOT_WINDOW {
            window.pop_front();
        }
        window.push_back(seconds);
    }

    /// Which runtime handler a sandbox belongs to. `/proc` rarely says it, so in order: what
    /// containerd told (boot samples), noded's own template, the shim binary's name, then the
    /// configured handler that fits the hypervisor and boot kind.
    fn handler_of(&self, st: &State, sb: &Sandbox) -> String {
        if let Some(h) = st.sandbox_handlers.get(&sb.id) {
            return h.clone();
        }
        if let Origin::Noded { template } = &sb.origin
            && let Some(t) = self.config.templates.iter().find(|t| &t.name == template)
        {
            return t.runtime_handler.clone();
        }
        if let Some(h) = &sb.handler_hint {
            return h.clone();
        }
        let clone = sb
            .hypervisor
            .as_ref()
            .is_some_and(|h| h.role != VmRole::Cold);
        if clone {
            // A Kata clone belongs to the warm handler whose template holds its memory; a noded
            // clone was named after its template above.
            let mem = sb.hypervisor.as_ref().and_then(|h| h.mem_path.as_ref());
            if let Some((_, h)) = self
                .config
                .warm_template_dirs
                .iter()
                .find(|(dir, _)| mem.is_some_and(|m| m.starts_with(dir)))
            {
                return h.clone();
            }
            if let Some(h) = self.config.warm_handlers.first() {
                return h.clone();
            }
            if let Some(t) = self.config.templates.first() {
                return t.runtime_handler.clone();
            }
        }
        let family = sb
            .hypervisor
            .as_ref()
            .map_or(Hypervisor::Qemu, |h| h.kind)
            .name();
        self.config
            .handlers
            .iter()
            .find(|h| h.contains(family) && !self.config.has_template(h))
            .or_else(|| self.config.handlers.iter().find(|h| h.contains(family)))
            .cloned()
            .unwrap_or_else(|| format!("kata-{family}"))
    }

    fn apply(&self, scan: &ScanReport, host: &HostResources) {
        let mut st = self.state();
        let mut figures: BTreeMap<String, HandlerFigures> = self
            .config
            .handlers
            .iter()
            .map(|h| (h.clone(), HandlerFigures::default()))
            .collect();
        let mut live: HashMap<String, BootKind> = HashMap::new();
        for sb in &scan.sandboxes {
            let handler = self.metrics.handler_label(&self.handler_of(&st, sb));
            let f = figures.entry(handler.clone()).or_default();
            // Template sources cost memory but are not VMs anyone booted.
            f.memory += sb.memory;
            let Some(kind) = sb.boot() else {
                continue;
            };
            live.insert(sb.id.clone(), kind);
            match kind {
                BootKind::Template => f.vms_template += 1,
                BootKind::Cold => f.vms_cold += 1,
            }
            f.pss_per_vm.push(sb.memory.pss);
            // noded's own engine counts its hits and misses when it hands a VM out (a pre-forked
            // clone waiting in the pool is not a hit yet); Kata's VMs are only known from /proc.
            if sb.origin == Origin::Kata && !st.counted.contains(&sb.id) {
                // A Kata VM exists (booting) before containerd's task event names its handler, and a
                // re-exec'd shim's argv does not name it either: a miss decided on a guessed handler
                // is wrong (a warm pod's cold boot would be taken for a cold-handler pod). A cold VM
                // waits a few scans for the boot sample; only then the guess decides. A clone is a
                // hit whatever its handler.
                let known = kind == BootKind::Template
                    || st.sandbox_handlers.contains_key(&sb.id)
                    || sb.handler_hint.is_some();
                let seen = st.unattributed_scans.entry(sb.id.clone()).or_insert(0);
                *seen = seen.saturating_add(1);
                if known || *seen > PENDING_SCANS {
                    self.count_hit_or_miss(&mut st, &sb.id, &handler, kind);
                }
            }
        }
        let vms_all: u64 = figures.values().map(|f| f.vms_template + f.vms_cold).sum();
        for (h, f) in &mut figures {
            f.slots = Some(capacity::slots(
                &self.config.capacity,
                host,
                h,
                &f.pss_per_vm,
                vms_all,
            ));
        }
        // Forget sandboxes that are gone, so the sets stay as large as the node's VM count.
        st.counted.retain(|id| live.contains_key(id));
        st.unattributed_scans.retain(|id, _| live.contains_key(id));
        let pending = std::mem::take(&mut st.pending);
        for mut p in pending {
            if let Some(kind) = live.get(&p.sandbox_id).copied() {
                self.finish_boot(&mut st, &p.handler, kind, p.seconds);
            } else if p.scans_waited + 1 >= PENDING_SCANS {
                let kind = self.assumed_boot(&p.handler);
                tracing::debug!(sandbox = %p.sandbox_id, runtime_handler = %p.handler, "sandbox gone before a scan saw it; boot kind assumed");
                self.finish_boot(&mut st, &p.handler, kind, p.seconds);
            } else {
                p.scans_waited += 1;
                st.pending.push_back(p);
            }
        }
        let pending_ids: BTreeSet<&str> =
            st.pending.iter().map(|p| p.sandbox_id.as_str()).collect();
        let keep: BTreeSet<String> = st
            .sandbox_handlers
            .keys()
            .filter(|id| live.contains_key(*id) || pending_ids.contains(id.as_str()))
            .cloned()
            .collect();
        st.sandbox_handlers.retain(|id, _| keep.contains(id));
        st.live = live;
        let gauges: Vec<HandlerGauges> = figures
            .iter()
            .map(|(h, f)| {
                let slots = f.slots.unwrap_or(Slots {
                    total: 0,
                    free: 0,
                    cost_bytes: 0,
                    measured: false,
                });
                HandlerGauges {
                    runtime_handler: h.clone(),
                    vms_template: f.vms_template,
                    vms_cold: f.vms_cold,
                    rss_bytes: f.memory.rss,
                    pss_bytes: f.memory.pss,
                    private_bytes: f.memory.private,
                    slots_total: slots.total,
                    slots_free: slots.free,
                }
            })
            .collect();
        st.figures = figures;
        drop(st);
        self.metrics.set_handler_gauges(&gauges);
    }
}

/// Canonical when it exists, else made absolute against the working directory.
fn absolute(p: &std::path::Path) -> PathBuf {
    std::fs::canonicalize(p)
        .or_else(|_| std::path::absolute(p))
        .unwrap_or_else(|_| p.to_path_buf())
}

fn quantile(values: &[f64], q: f64) -> Option<f64> {
    // Boot seconds → microseconds keeps the shared integer percentile honest to a µs.
    // Float-to-int `as` saturates: a negative or NaN duration counts as 0 µs.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let micros: Vec<u64> = values.iter().map(|s| (s * 1e6).round() as u64).collect();
    percentile(&micros, q).map(|us| us as f64 / 1e6)
}
