//! How many VMs of each runtime handler the node holds and still fits.
//!
//! # Formula
//!
//! Per handler `h`, with every memory figure in bytes:
//!
//! ```text
//! cost(h)        = p90 of per-sandbox PSS of h's running VMs      (qemu + shim + virtiofsd summed)
//!                  or, when h has no VM running, prior(h)          (the RuntimeClass overhead)
//! allocatable    = MemTotal − reserved_memory                      (kubelet's reserved + eviction)
//! headroom       = MemAvailable − reserved_memory                  (≥ 0; already net of running VMs)
//! mem_total(h)   = ⌊ allocatable / cost(h) ⌋
//! mem_free(h)    = ⌊ headroom / cost(h) ⌋
//! cpu_total      = ⌊ (cpus × 1000 − reserved_cpu_millis) / cpu_millis_per_vm ⌋   (unbounded when 0)
//! cpu_free       = cpu_total − VMs of all handlers                 (≥ 0)
//! total(h)       = min(mem_total(h), cpu_total)
//! free(h)        = min(mem_free(h), cpu_free, total(h))
//! ```
//!
//! PSS, not RSS: clones of one template share its memory file and QEMU's text, and PSS charges each
//! VM only its share, so `running × cost` approximates what the VMs really hold. p90, not the mean: a
//! slot must fit a typical-to-large VM, not the average of idle ones. `MemAvailable` already excludes
//! memory the running VMs (and everything else on the node) hold, so free slots need no subtraction of
//! VM memory and never double-count it. A cost of zero (no PSS readable, zero prior) would mean
//! infinite slots; it is treated as "no capacity known" and yields zero slots.

use std::collections::BTreeMap;

use super::memory::{HostResources, percentile};

/// kata-deploy's RuntimeClass `overhead.podFixed` for kata-qemu: the prior before any VM is measured.
pub const DEFAULT_PRIOR_MEMORY_BYTES: u64 = 160 * 1024 * 1024;
/// kata-deploy's RuntimeClass `overhead.podFixed.cpu`.
pub const DEFAULT_CPU_MILLIS_PER_VM: u64 = 250;

/// Inputs that come from configuration, not from measurement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapacityPolicy {
    /// Memory kept away from VMs: kubelet's system/kube reserved plus the eviction threshold.
    pub reserved_memory_bytes: u64,
    pub reserved_cpu_millis: u64,
    /// CPU one VM is charged; 0 disables the CPU bound (CPU is overcommitted).
    pub cpu_millis_per_vm: u64,
    /// Per-VM host memory assumed for a handler with no VM running (its RuntimeClass overhead).
    pub prior_memory_bytes: BTreeMap<String, u64>,
    /// Prior for handlers missing from `prior_memory_bytes`.
    pub default_prior_memory_bytes: u64,
}

impl Default for CapacityPolicy {
    fn default() -> Self {
        CapacityPolicy {
            reserved_memory_bytes: 0,
            reserved_cpu_millis: 0,
            cpu_millis_per_vm: DEFAULT_CPU_MILLIS_PER_VM,
            prior_memory_bytes: BTreeMap::new(),
            default_prior_memory_bytes: DEFAULT_PRIOR_MEMORY_BYTES,
        }
    }
}

impl CapacityPolicy {
    fn prior(&self, handler: &str) -> u64 {
        self.prior_memory_bytes
            .get(handler)
            .copied()
            .unwrap_or(self.default_prior_memory_bytes)
    }
}

/// Slots of one handler and how they were derived.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Slots {
    pub total: u64,
    pub free: u64,
    /// The per-VM host memory used.
    pub cost_bytes: u64,
    /// true when `cost_bytes` was measured, false when it is the prior.
    pub measured: bool,
}

/// Slots of `handler`, whose running VMs have the per-sandbox PSS `pss_per_vm`, on a node where
/// `vms_all_handlers` VMs run in total.
pub fn slots(
    policy: &CapacityPolicy,
    host: &HostResources,
    handler: &str,
    pss_per_vm: &[u64],
    vms_all_handlers: u64,
) -> Slots {
    let (cost, measured) = match percentile(pss_per_vm, 0.9) {
        Some(p90) if p90 > 0 => (p90, true),
        _ => (policy.prior(handler), false),
    };
    if cost == 0 {
        return Slots {
            total: 0,
            free: 0,
            cost_bytes: 0,
            measured,
        };
    }
    let allocatable = host
        .memory_total_bytes
        .saturating_sub(policy.reserved_memory_bytes);
    let headroom = host
        .memory_available_bytes
        .saturating_sub(policy.reserved_memory_bytes);
    let mem_total = allocatable / cost;
    let mem_free = headroom / cost;
    let millis = u64::from(host.cpus)
        .saturating_mul(1000)
        .saturating_sub(policy.reserved_cpu_millis);
    // A zero per-VM CPU charge means CPU is not a bound.
    let (cpu_total, cpu_free) = match millis.checked_div(policy.cpu_millis_per_vm) {
        Some(t) => (t, t.saturating_sub(vms_all_handlers)),
        None => (u64::MAX, u64::MAX),
    };
    let total = mem_total.min(cpu_total);
    Slots {
        total,
        free: mem_free.min(cpu_free).min(total),
        cost_bytes: cost,
        measured,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1024 * 1024 * 1024;
    const MIB: u64 = 1024 * 1024;

    fn host(total: u64, available: u64, cpus: u32) -> HostResources {
        HostResources {
            memory_total_bytes: total,
            memory_available_bytes: available,
            cpus,
        }
    }

    fn no_cpu_bound() -> CapacityPolicy {
        CapacityPolicy {
            cpu_millis_per_vm: 0,
            ..CapacityPolicy::default()
        }
    }

    #[test]
    fn no_vms_uses_the_runtimeclass_prior() {
        let mut p = no_cpu_bound();
        p.prior_memory_bytes.insert("kata-qemu".into(), 256 * MIB);
        let s = slots(&p, &host(16 * GIB, 8 * GIB, 64), "kata-qemu", &[], 0);
        assert!(!s.measured);
        assert_eq!(s.cost_bytes, 256 * MIB);
        assert_eq!(s.total, 64);
        assert_eq!(s.free, 32);
        let other = slots(&p, &host(16 * GIB, 8 * GIB, 64), "kata-clh", &[], 0);
        assert_eq!(other.cost_bytes, DEFAULT_PRIOR_MEMORY_BYTES);
    }

    #[test]
    fn measured_cost_is_p90_of_pss() {
        let pss: Vec<u64> = (1..=10).map(|i| i * 100 * MIB).collect();
        let s = slots(
            &no_cpu_bound(),
            &host(9 * 1000 * MIB, 1800 * MIB, 8),
            "h",
            &pss,
            10,
        );
        assert!(s.measured);
        assert_eq!(s.cost_bytes, 900 * MIB);
        assert_eq!(s.total, 10);
        assert_eq!(s.free, 2);
    }

    #[test]
    fn zero_memory_gives_zero_slots() {
        let s = slots(&no_cpu_bound(), &host(0, 0, 8), "h", &[], 0);
        assert_eq!((s.total, s.free), (0, 0));
    }

    #[test]
    fn zero_cost_is_no_capacity_not_infinite() {
        let p = CapacityPolicy {
            default_prior_memory_bytes: 0,
            ..no_cpu_bound()
        };
        let s = slots(&p, &host(16 * GIB, 16 * GIB, 8), "h", &[0, 0], 2);
        assert_eq!((s.total, s.free, s.cost_bytes), (0, 0, 0));
    }

    #[test]
    fn more_vms_than_fit_leaves_no_free_slot() {
        // 40 VMs of 200 MiB on a node whose memory is exhausted, and a CPU bound below the count.
        let p = CapacityPolicy {
            cpu_millis_per_vm: 250,
            ..CapacityPolicy::default()
        };
        let pss = vec![200 * MIB; 40];
        let s = slots(&p, &host(4 * GIB, 50 * MIB, 4), "h", &pss, 40);
        assert_eq!(s.total, 16); // 4 CPUs × 1000 / 250
        assert_eq!(s.free, 0);
    }

    #[test]
    fn reserved_memory_is_kept_away_and_saturates() {
        let p = CapacityPolicy {
            reserved_memory_bytes: 2 * GIB,
            ..no_cpu_bound()
        };
        let s = slots(&p, &host(4 * GIB, 3 * GIB, 8), "h", &[GIB], 1);
        assert_eq!((s.total, s.free), (2, 1));
        let s = slots(&p, &host(GIB, GIB, 8), "h", &[GIB], 1);
        assert_eq!((s.total, s.free), (0, 0));
    }

    #[test]
    fn free_never_exceeds_total() {
        // MemAvailable can exceed what the reservation leaves of MemTotal only through odd inputs;
        // the result must stay consistent anyway.
        let s = slots(
            &no_cpu_bound(),
            &host(GIB, 4 * GIB, 8),
            "h",
            &[100 * MIB],
            0,
        );
        assert!(s.free <= s.total);
    }
}
