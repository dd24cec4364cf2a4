//! What the scheduler sees, and how often: integer node labels with hysteresis and a rate limit, and the
//! RuntimeClass memory overhead with its own 10% band.
//!
//! Hysteresis bands (a label is rewritten only when the measured value leaves the band around the value
//! last published, and then at most once per `label_interval`):
//! - `noded.io/vm-slots-free`: moves by at least `max(2, 10% of the published value)`, or crosses zero
//!   (full ↔ not full is what a `Gt` affinity cares about most).
//! - `noded.io/boot-p50-ms`: moves by at least `max(50 ms, 20% of the published value)`.
//! - `noded.io/warm-templates`: any change (a small count that changes only on template build/loss).
//!
//! Every label write is a node object update that every node watcher in the cluster receives; without
//! the band a busy node would rewrite `vm-slots-free` on every pod start.

use std::time::{Duration, Instant};

/// The values behind the three integer labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerLabels {
    pub vm_slots_free: u32,
    /// `None` until a VM booted: the label is left out rather than published as 0, which a `Lt`
    /// affinity would read as "fastest node".
    pub boot_p50_ms: Option<u32>,
    pub warm_templates: u32,
}

impl SchedulerLabels {
    /// `(label key, value)` pairs as written on the node.
    pub fn to_pairs(self) -> Vec<(&'static str, String)> {
        let mut pairs = vec![(super::LABEL_VM_SLOTS_FREE, self.vm_slots_free.to_string())];
        if let Some(p50) = self.boot_p50_ms {
            pairs.push((super::LABEL_BOOT_P50_MS, p50.to_string()));
        }
        pairs.push((super::LABEL_WARM_TEMPLATES, self.warm_templates.to_string()));
        pairs
    }

    /// True when `new` is outside the hysteresis band around `self` (the published values).
    pub fn moved_past_band(self, new: SchedulerLabels) -> bool {
        let slots_band = (self.vm_slots_free.div_ceil(10)).max(2);
        let slots = self.vm_slots_free.abs_diff(new.vm_slots_free) >= slots_band
            || ((self.vm_slots_free == 0) != (new.vm_slots_free == 0));
        let boot = match (self.boot_p50_ms, new.boot_p50_ms) {
            (Some(old), Some(new)) => old.abs_diff(new) >= (old / 5).max(50),
            (old, new) => old != new,
        };
        let warm = self.warm_templates != new.warm_templates;
        slots || boot || warm
    }
}

/// Decides when the label values change.
#[derive(Debug)]
pub struct LabelGovernor {
    interval: Duration,
    published: Option<SchedulerLabels>,
    last_publish: Option<Instant>,
}

/// The governor's answer for a measurement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LabelDecision {
    /// Write these values now.
    Publish(SchedulerLabels),
    /// Inside the band: nothing to do.
    Unchanged,
    /// Outside the band but the last write was too recent: offer again at this instant.
    HoldUntil(Instant),
}

impl LabelGovernor {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            published: None,
            last_publish: None,
        }
    }

    /// Values the node should carry (the last published ones).
    pub fn published(&self) -> Option<SchedulerLabels> {
        self.published
    }

    pub fn offer(&mut self, now: Instant, measured: SchedulerLabels) -> LabelDecision {
        if let Some(old) = self.published
            && !old.moved_past_band(measured)
        {
            return LabelDecision::Unchanged;
        }
        if let Some(last) = self.last_publish {
            let due = last + self.interval;
            if now < due {
                return LabelDecision::HoldUntil(due);
            }
        }
        self.published = Some(measured);
        self.last_publish = Some(now);
        LabelDecision::Publish(measured)
    }
}

/// Kata's own RuntimeClass default (kata-deploy ships `memory: 160Mi`) until a VM was measured.
pub const DEFAULT_OVERHEAD_MIB: u64 = 160;
/// The overhead a RuntimeClass starts with before one of its VMs was measured: kata-deploy's value for
/// every class, warm ones included. A warm pod boots cold whenever the template is missing (after a
/// reboot, during a rebuild), and a cold VM costs far more than a clone: a lower prior would
/// under-reserve exactly then. The measured clone cost replaces it once clones ran.
pub fn default_overhead_mib(_runtime_class: &str) -> u64 {
    DEFAULT_OVERHEAD_MIB
}
/// Bounds on the published memory overhead: a broken measurement must not make every Kata pod
/// unschedulable (huge) or overcommit the node (tiny).
pub const MIN_OVERHEAD_MIB: u64 = 64;
pub const MAX_OVERHEAD_MIB: u64 = 2048;
/// Constant CPU overhead per pod (kata-deploy's value); the VMM's CPU cost is not measured per VM.
pub const OVERHEAD_CPU: &str = "250m";

/// Measured host bytes of one VM (qemu + shim + virtiofsd, private) → MiB, rounded up and bounded.
pub fn overhead_mib(per_vm_bytes: Option<u64>) -> u64 {
    match per_vm_bytes {
        None | Some(0) => DEFAULT_OVERHEAD_MIB,
        Some(b) => b
            .div_ceil(1024 * 1024)
            .clamp(MIN_OVERHEAD_MIB, MAX_OVERHEAD_MIB),
    }
}

/// The RuntimeClasses are rewritten only when the overhead moves by more than 10%: they are cluster
/// objects that every node's noded applies, so small per-node differences must not make them flap.
pub fn overhead_moved(current_mib: u64, new_mib: u64) -> bool {
    current_mib.abs_diff(new_mib).saturating_mul(10) > current_mib
}

#[cfg(test)]
mod tests {
    use super::*;

    fn l(free: u32, p50: u32, warm: u32) -> SchedulerLabels {
        SchedulerLabels {
            vm_slots_free: free,
            boot_p50_ms: Some(p50),
            warm_templates: warm,
        }
    }

    #[test]
    fn bands() {
        let base = l(40, 500, 2);
        assert!(!base.moved_past_band(l(37, 500, 2)), "3 < 10% of 40");
        assert!(base.moved_past_band(l(36, 500, 2)), "4 = 10% of 40");
        assert!(!l(5, 500, 2).moved_past_band(l(4, 500, 2)), "min band 2");
        assert!(l(1, 500, 2).moved_past_band(l(0, 500, 2)), "crossing zero");
        assert!(!base.moved_past_band(l(40, 590, 2)), "90 < 20% of 500");
        assert!(base.moved_past_band(l(40, 600, 2)));
        assert!(
            !l(40, 100, 2).moved_past_band(l(40, 149, 2)),
            "min band 50 ms"
        );
        assert!(base.moved_past_band(l(40, 500, 3)));
        let unknown = SchedulerLabels {
            boot_p50_ms: None,
            ..base
        };
        assert!(unknown.moved_past_band(base), "first boot measured");
        assert_eq!(unknown.to_pairs().len(), 2, "no boot label until measured");
    }

    #[test]
    fn governor_rate_limits_and_holds() {
        let t0 = Instant::now();
        let mut g = LabelGovernor::new(Duration::from_secs(30));
        assert_eq!(
            g.offer(t0, l(10, 300, 1)),
            LabelDecision::Publish(l(10, 300, 1))
        );
        assert_eq!(
            g.offer(t0 + Duration::from_secs(1), l(11, 300, 1)),
            LabelDecision::Unchanged
        );
        assert_eq!(
            g.offer(t0 + Duration::from_secs(1), l(2, 300, 1)),
            LabelDecision::HoldUntil(t0 + Duration::from_secs(30))
        );
        assert_eq!(g.published(), Some(l(10, 300, 1)));
        assert_eq!(
            g.offer(t0 + Duration::from_secs(30), l(2, 300, 1)),
            LabelDecision::Publish(l(2, 300, 1))
        );
    }

    #[test]
    fn overhead_rounding_bounds_and_band() {
        assert_eq!(overhead_mib(None), DEFAULT_OVERHEAD_MIB);
        assert_eq!(overhead_mib(Some(150 * 1024 * 1024 + 1)), 151);
        assert_eq!(overhead_mib(Some(1024)), MIN_OVERHEAD_MIB);
        assert_eq!(overhead_mib(Some(u64::MAX)), MAX_OVERHEAD_MIB);
        assert!(!overhead_moved(160, 176));
        assert!(overhead_moved(160, 177));
        assert!(overhead_moved(160, 143));
    }
}
