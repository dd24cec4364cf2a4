//! The Prometheus registry of noded. Family names and labels are a contract (DESIGN section 8):
//! dashboards and alert rules in `daemonset/` depend on them, so every family is registered here and
//! nowhere else, with typed label sets.
//!
//! Label sets known from the configuration (handlers, templates, outcomes) are created at start with
//! zero values, so a family is visible before its first event and `rate()` sees the first increase.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::sync::Mutex;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// `Content-Type` of [`Metrics::encode`].
pub const OPENMETRICS_CONTENT_TYPE: &str =
    "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// `Content-Type` of [`Metrics::encode_prometheus_text`].
pub const PROMETHEUS_TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Every family name noded exports, as Prometheus stores them (counters with `_total`).
pub const FAMILIES: [&str; 14] = [
    "noded_vm_boot_seconds",
    "noded_vms",
    "noded_vm_host_memory_bytes",
    "noded_vm_slots",
    "noded_template_ready",
    "noded_template_pool_size",
    "noded_template_acquire_seconds",
    "noded_template_hits_total",
    "noded_template_misses_total",
    "noded_template_builds_total",
    "noded_containerd_config_applies_total",
    "noded_containerd_restarts_total",
    "noded_runtime_ready",
    "noded_build_info",
];

/// The `runtime_handler` label value of every handler that is not configured. Handler names reach
/// noded from containerd's events and from /proc (any client may create a container with any
/// runtime name), so only configured handlers get their own series: the label set stays bounded.
pub const OTHER_HANDLER: &str = "other";

/// Boot latency buckets: clones answer in tens of milliseconds, cold Kata boots take seconds.
const BOOT_BUCKETS: [f64; 14] = [
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0,
];
/// Pool acquire is a sub-millisecond to millisecond operation.
const ACQUIRE_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0,
];

fn encode_str(e: &mut LabelValueEncoder<'_>, s: &str) -> std::fmt::Result {
    e.write_str(s)
}

/// The `boot` label of boot and VM-count metrics: a template clone or a cold boot. Defined here, with
/// the other label values, so the registry depends on no module that records into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BootKind {
    Template,
    Cold,
}

impl BootKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BootKind::Template => "template",
            BootKind::Cold => "cold",
        }
    }
}

impl EncodeLabelValue for BootKind {
    fn encode(&self, e: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
        encode_str(e, self.as_str())
    }
}

/// Defines a label-value enum with its lowercase wire names.
macro_rules! label_enum {
    ($(#[$m:meta])* $name:ident { $($variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name { $($variant),+ }
        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }
        impl EncodeLabelValue for $name {
            fn encode(&self, e: &mut LabelValueEncoder<'_>) -> std::fmt::Result {
                encode_str(e, self.as_str())
            }
        }
    };
}

label_enum!(
    /// Whether a boot produced a running sandbox.
    BootOutcome { Ok => "ok", Failed => "failed" }
);
label_enum!(MemoryKind { Rss => "rss", Pss => "pss", Private => "private" });
label_enum!(SlotState { Total => "total", Free => "free" });
label_enum!(PoolState { Ready => "ready", Target => "target" });
label_enum!(
    /// Result of a template build.
    BuildOutcome { Ok => "ok", Failed => "failed" }
);
label_enum!(
    /// Result of one `containerd apply` (CLI or daemon start).
    ApplyOutcome { Changed => "changed", Unchanged => "unchanged", Failed => "failed" }
);

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BootLabels {
    pub runtime_handler: String,
    pub boot: BootKind,
    pub outcome: BootOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct VmLabels {
    pub runtime_handler: String,
    pub boot: BootKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct MemoryLabels {
    pub runtime_handler: String,
    pub kind: MemoryKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SlotLabels {
    pub runtime_handler: String,
    pub state: SlotState,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct TemplateLabels {
    pub template: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PoolLabels {
    pub template: String,
    pub state: PoolState,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BuildLabels {
    pub outcome: BuildOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ApplyLabels {
    pub outcome: ApplyOutcome,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HandlerLabels {
    pub runtime_handler: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct BuildInfoLabels {
    pub version: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn boot_histogram() -> Histogram {
    Histogram::new(BOOT_BUCKETS)
}

/// Figures of one runtime handler from one observation round (see `observe`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandlerGauges {
    pub runtime_handler: String,
    pub vms_template: u64,
    pub vms_cold: u64,
    pub rss_bytes: u64,
    pub pss_bytes: u64,
    pub private_bytes: u64,
    pub slots_total: u64,
    pub slots_free: u64,
}

/// The label values known from configuration.
#[derive(Debug, Clone, Default)]
pub struct MetricsScope {
    pub handlers: Vec<String>,
    pub templates: Vec<String>,
}

impl MetricsScope {
    /// `runtime_handler` itself when configured, else [`OTHER_HANDLER`].
    pub fn handler_label(&self, runtime_handler: &str) -> String {
        if self.handlers.iter().any(|h| h == runtime_handler) {
            runtime_handler.to_string()
        } else {
            OTHER_HANDLER.to_string()
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("cannot encode metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}

/// noded's metrics. Cheap to share (`Arc<Metrics>`); every method takes `&self`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    vm_boot: HistogramFamily<BootLabels>,
    vms: Family<VmLabels, Gauge>,
    vm_memory: Family<MemoryLabels, Gauge>,
    vm_slots: Family<SlotLabels, Gauge>,
    template_ready: Family<TemplateLabels, Gauge>,
    template_pool: Family<PoolLabels, Gauge>,
    template_acquire: Histogram,
    template_hits: Counter,
    template_misses: Counter,
    template_builds: Family<BuildLabels, Counter>,
    config_applies: Family<ApplyLabels, Counter>,
    containerd_restarts: Counter,
    runtime_ready: Family<HandlerLabels, Gauge>,
    /// Handlers whose VM gauges were last set, so handlers that disappear get their series removed.
    vm_handlers: Mutex<BTreeSet<String>>,
    scope: MetricsScope,
}

fn gauge_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Metrics {
    pub fn new(scope: MetricsScope) -> Metrics {
        let mut registry = Registry::with_prefix("noded");
        let vm_boot: HistogramFamily<BootLabels> =
            Family::new_with_constructor(boot_histogram as fn() -> Histogram);
        registry.register(
            "vm_boot_seconds",
            "Sandbox boot latency (create to running) per runtime handler, template clone or cold boot",
            vm_boot.clone(),
        );
        let vms = Family::<VmLabels, Gauge>::default();
        registry.register("vms", "VMs running on the host", vms.clone());
        let vm_memory = Family::<MemoryLabels, Gauge>::default();
        registry.register(
            "vm_host_memory_bytes",
            "Host memory of all VMs of a handler (hypervisor + shim + virtiofsd), summed",
            vm_memory.clone(),
        );
        let vm_slots = Family::<SlotLabels, Gauge>::default();
        registry.register(
            "vm_slots",
            "VMs of a handler the node holds in total and still fits, at the measured per-VM cost",
            vm_slots.clone(),
        );
        let template_ready = Family::<TemplateLabels, Gauge>::default();
        registry.register(
            "template_ready",
            "1 when the VM template is built, verified and usable",
            template_ready.clone(),
        );
        let template_pool = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "template_pool_size",
            "Pre-forked paused clones ready to hand out, and the pool's target",
            template_pool.clone(),
        );
        let template_acquire = Histogram::new(ACQUIRE_BUCKETS);
        registry.register(
            "template_acquire_seconds",
            "Time to hand out a VM from the template pool (AcquireVm)",
            template_acquire.clone(),
        );
        let template_hits = Counter::default();
        registry.register(
            "template_hits",
            "VMs of a handler with a template that started as template clones",
            template_hits.clone(),
        );
        let template_misses = Counter::default();
        registry.register(
            "template_misses",
            "VMs of a handler with a template that booted cold (template missing or stale)",
            template_misses.clone(),
        );
        let template_builds = Family::<BuildLabels, Counter>::default();
        registry.register(
            "template_builds",
            "VM template builds",
            template_builds.clone(),
        );
        let config_applies = Family::<ApplyLabels, Counter>::default();
        registry.register(
            "containerd_config_applies",
            "containerd configuration applies by result",
            config_applies.clone(),
        );
        let containerd_restarts = Counter::default();
        registry.register(
            "containerd_restarts",
            "containerd restarts noded performed",
            containerd_restarts.clone(),
        );
        let runtime_ready = Family::<HandlerLabels, Gauge>::default();
        registry.register(
            "runtime_ready",
            "1 when the runtime handler's latest probe sandbox succeeded",
            runtime_ready.clone(),
        );
        let build_info = Family::<BuildInfoLabels, Gauge>::default();
        build_info
            .get_or_create(&BuildInfoLabels {
                version: env!("CARGO_PKG_VERSION").to_string(),
            })
            .set(1);
        registry.register("build_info", "noded build; value is always 1", build_info);

        let m = Metrics {
            registry,
            vm_boot,
            vms,
            vm_memory,
            vm_slots,
            template_ready,
            template_pool,
            template_acquire,
            template_hits,
            template_misses,
            template_builds,
            config_applies,
            containerd_restarts,
            runtime_ready,
            vm_handlers: Mutex::new(BTreeSet::new()),
            scope,
        };
        m.initialise();
        m
    }

    fn initialise(&self) {
        for o in ApplyOutcome::ALL {
            let _ = self
                .config_applies
                .get_or_create(&ApplyLabels { outcome: *o });
        }
        for o in BuildOutcome::ALL {
            let _ = self
                .template_builds
                .get_or_create(&BuildLabels { outcome: *o });
        }
        for h in &self.scope.handlers {
            for boot in [BootKind::Template, BootKind::Cold] {
                for outcome in BootOutcome::ALL {
                    let _ = self.vm_boot.get_or_create(&BootLabels {
                        runtime_handler: h.clone(),
                        boot,
                        outcome: *outcome,
                    });
                }
            }
            let _ = self.runtime_ready.get_or_create(&HandlerLabels {
                runtime_handler: h.clone(),
            });
        }
        for t in &self.scope.templates {
            let _ = self.template_ready.get_or_create(&TemplateLabels {
                template: t.clone(),
            });
            for state in PoolState::ALL {
                let _ = self.template_pool.get_or_create(&PoolLabels {
                    template: t.clone(),
                    state: *state,
                });
            }
        }
        self.set_handler_gauges(&[]);
    }

    /// OpenMetrics text (what Prometheus asks for).
    pub fn encode(&self) -> Result<String, MetricsError> {
        let mut out = String::with_capacity(16 * 1024);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }

    /// Prometheus text format 0.0.4, for clients that do not accept OpenMetrics (`promtool check
    /// metrics`, curl): counter families carry their `_total` suffix, no `# UNIT`/`# EOF`.
    pub fn encode_prometheus_text(&self) -> Result<String, MetricsError> {
        Ok(openmetrics_to_prometheus_text(&self.encode()?))
    }

    /// `runtime_handler` itself when configured, else [`OTHER_HANDLER`].
    pub fn handler_label(&self, runtime_handler: &str) -> String {
        self.scope.handler_label(runtime_handler)
    }

    pub fn observe_boot(
        &self,
        runtime_handler: &str,
        boot: BootKind,
        outcome: BootOutcome,
        seconds: f64,
    ) {
        self.vm_boot
            .get_or_create(&BootLabels {
                runtime_handler: self.handler_label(runtime_handler),
                boot,
                outcome,
            })
            .observe(seconds);
    }

    pub fn observe_template_acquire(&self, seconds: f64) {
        self.template_acquire.observe(seconds);
    }

    pub fn record_template_hit(&self) {
        self.template_hits.inc();
    }

    pub fn record_template_miss(&self) {
        self.template_misses.inc();
    }

    pub fn record_template_build(&self, outcome: BuildOutcome) {
        self.template_builds
            .get_or_create(&BuildLabels { outcome })
            .inc();
    }

    pub fn record_apply(&self, outcome: ApplyOutcome) {
        self.config_applies
            .get_or_create(&ApplyLabels { outcome })
            .inc();
    }

    pub fn record_containerd_restart(&self) {
        self.containerd_restarts.inc();
    }

    pub fn set_template_ready(&self, template: &str, ready: bool) {
        self.template_ready
            .get_or_create(&TemplateLabels {
                template: template.to_string(),
            })
            .set(i64::from(ready));
    }

    pub fn set_template_pool(&self, template: &str, ready: u64, target: u64) {
        for (state, v) in [(PoolState::Ready, ready), (PoolState::Target, target)] {
            self.template_pool
                .get_or_create(&PoolLabels {
                    template: template.to_string(),
                    state,
                })
                .set(gauge_i64(v));
        }
    }

    pub fn set_runtime_ready(&self, runtime_handler: &str, ready: bool) {
        self.runtime_ready
            .get_or_create(&HandlerLabels {
                runtime_handler: self.handler_label(runtime_handler),
            })
            .set(i64::from(ready));
    }

    /// Replaces the per-handler VM gauges (VM counts, memory, slots) with one observation round.
    /// Handlers absent from `figures` lose their series, except configured ones, which drop to zero.
    pub fn set_handler_gauges(&self, figures: &[HandlerGauges]) {
        // Unconfigured handlers are summed into one `other` series.
        let mut folded: std::collections::BTreeMap<String, HandlerGauges> = Default::default();
        for f in figures {
            let label = self.handler_label(&f.runtime_handler);
            let g = folded
                .entry(label.clone())
                .or_insert_with(|| HandlerGauges {
                    runtime_handler: label,
                    ..HandlerGauges::default()
                });
            g.vms_template += f.vms_template;
            g.vms_cold += f.vms_cold;
            g.rss_bytes += f.rss_bytes;
            g.pss_bytes += f.pss_bytes;
            g.private_bytes += f.private_bytes;
            g.slots_total += f.slots_total;
            g.slots_free += f.slots_free;
        }
        let figures: Vec<HandlerGauges> = folded.into_values().collect();
        let mut all: Vec<HandlerGauges> = figures.clone();
        for h in &self.scope.handlers {
            if !figures.iter().any(|f| &f.runtime_handler == h) {
                all.push(HandlerGauges {
                    runtime_handler: h.clone(),
                    ..HandlerGauges::default()
                });
            }
        }
        let mut seen = BTreeSet::new();
        for f in &all {
            let h = &f.runtime_handler;
            seen.insert(h.clone());
            for (boot, n) in [
                (BootKind::Template, f.vms_template),
                (BootKind::Cold, f.vms_cold),
            ] {
                self.vms
                    .get_or_create(&VmLabels {
                        runtime_handler: h.clone(),
                        boot,
                    })
                    .set(gauge_i64(n));
            }
            for (kind, v) in [
                (MemoryKind::Rss, f.rss_bytes),
                (MemoryKind::Pss, f.pss_bytes),
                (MemoryKind::Private, f.private_bytes),
            ] {
                self.vm_memory
                    .get_or_create(&MemoryLabels {
                        runtime_handler: h.clone(),
                        kind,
                    })
                    .set(gauge_i64(v));
            }
            for (state, v) in [
                (SlotState::Total, f.slots_total),
                (SlotState::Free, f.slots_free),
            ] {
                self.vm_slots
                    .get_or_create(&SlotLabels {
                        runtime_handler: h.clone(),
                        state,
                    })
                    .set(gauge_i64(v));
            }
        }
        let Ok(mut previous) = self.vm_handlers.lock() else {
            return;
        };
        for gone in previous.difference(&seen) {
            if self.scope.handlers.contains(gone) {
                continue;
            }
            for boot in [BootKind::Template, BootKind::Cold] {
                self.vms.remove(&VmLabels {
                    runtime_handler: gone.clone(),
                    boot,
                });
            }
            for kind in MemoryKind::ALL {
                self.vm_memory.remove(&MemoryLabels {
                    runtime_handler: gone.clone(),
                    kind: *kind,
                });
            }
            for state in SlotState::ALL {
                self.vm_slots.remove(&SlotLabels {
                    runtime_handler: gone.clone(),
                    state: *state,
                });
            }
        }
        *previous = seen;
    }
}

/// Rewrites prometheus-client's OpenMetrics output as Prometheus text 0.0.4. The two differ, for
/// what noded emits, only in counter family names (`x` vs `x_total`), `# UNIT` and `# EOF`.
pub fn openmetrics_to_prometheus_text(om: &str) -> String {
    let mut out = String::with_capacity(om.len());
    let mut pending_help: Option<(&str, &str)> = None;
    for line in om.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            pending_help = Some((name, help));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "untyped"));
            let (name_out, kind_out) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "info" => (format!("{name}_info"), "gauge"),
                "stateset" | "unknown" => (name.to_string(), "untyped"),
                k => (name.to_string(), k),
            };
            if let Some((hname, help)) = pending_help.take()
                && hname == name
            {
                let _ = writeln!(out, "# HELP {name_out} {help}");
            }
            let _ = writeln!(out, "# TYPE {name_out} {kind_out}");
            continue;
        }
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope() -> MetricsScope {
        MetricsScope {
            handlers: vec!["kata-qemu".into(), "kata-qemu-warm".into()],
            templates: vec!["default".into()],
        }
    }

    #[test]
    fn every_family_is_present_from_the_start() {
        let m = Metrics::new(scope());
        let om = m.encode().expect("encode");
        let text = openmetrics_to_prometheus_text(&om);
        for family in FAMILIES {
            assert!(
                text.lines()
                    .any(|l| l.starts_with(family) && !l.starts_with('#')),
                "family {family} has no sample:\n{text}"
            );
        }
        assert!(om.ends_with("# EOF\n"));
    }

    #[test]
    fn unconfigured_handlers_fold_into_one_label_value() {
        let m = Metrics::new(scope());
        let mut figures = Vec::new();
        for i in 0..10_000 {
            let h = format!("runtime-{i}");
            m.observe_boot(&h, BootKind::Cold, BootOutcome::Ok, 1.0);
            m.set_runtime_ready(&h, true);
            figures.push(HandlerGauges {
                runtime_handler: h,
                vms_cold: 1,
                ..HandlerGauges::default()
            });
        }
        m.set_handler_gauges(&figures);
        let t = m.encode_prometheus_text().expect("encode");
        let mut values: Vec<&str> = t
            .split("runtime_handler=\"")
            .skip(1)
            .filter_map(|r| r.split('"').next())
            .collect();
        values.sort_unstable();
        values.dedup();
        assert_eq!(values, ["kata-qemu", "kata-qemu-warm", "other"]);
        assert!(
            t.contains("noded_vms{runtime_handler=\"other\",boot=\"cold\"} 10000"),
            "{t}"
        );
        assert!(t.contains("noded_vm_boot_seconds_count{runtime_handler=\"other\",boot=\"cold\",outcome=\"ok\"} 10000"));
    }

    #[test]
    fn recorded_values_appear_with_their_labels() {
        let m = Metrics::new(scope());
        m.observe_boot("kata-qemu-warm", BootKind::Template, BootOutcome::Ok, 0.07);
        m.record_apply(ApplyOutcome::Changed);
        m.record_apply(ApplyOutcome::Changed);
        m.record_template_miss();
        m.set_handler_gauges(&[HandlerGauges {
            runtime_handler: "kata-clh".into(),
            vms_cold: 3,
            pss_bytes: 42,
            slots_total: 10,
            slots_free: 7,
            ..HandlerGauges::default()
        }]);
        let t = m.encode_prometheus_text().expect("encode");
        assert!(t.contains(
            "noded_vm_boot_seconds_count{runtime_handler=\"kata-qemu-warm\",boot=\"template\",outcome=\"ok\"} 1"
        ), "{t}");
        assert!(
            t.contains("noded_containerd_config_applies_total{outcome=\"changed\"} 2"),
            "{t}"
        );
        assert!(t.contains("noded_template_misses_total 1"), "{t}");
        // An unconfigured handler is reported as `other`.
        assert!(!t.contains("kata-clh"), "{t}");
        assert!(
            t.contains("noded_vms{runtime_handler=\"other\",boot=\"cold\"} 3"),
            "{t}"
        );
        assert!(
            t.contains("noded_vm_host_memory_bytes{runtime_handler=\"other\",kind=\"pss\"} 42"),
            "{t}"
        );
        assert!(
            t.contains("noded_vm_slots{runtime_handler=\"other\",state=\"free\"} 7"),
            "{t}"
        );
        // Configured handlers keep their zero series; a vanished unconfigured one loses them.
        assert!(
            t.contains("noded_vms{runtime_handler=\"kata-qemu\",boot=\"cold\"} 0"),
            "{t}"
        );
        m.set_handler_gauges(&[]);
        let t = m.encode_prometheus_text().expect("encode");
        assert!(!t.contains("runtime_handler=\"other\""), "{t}");
    }
}
