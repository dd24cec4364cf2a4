//! Maps the observer's per-handler figures to the publisher's node-level [`Capacity`].

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::Capacity;
use crate::observe::{HandlerSnapshot, Observer};

/// Node-level capacity from per-handler snapshots: the handler with the most slots defines the slot
/// count (all handlers share the same host memory, so the counts are alternatives, not a sum); the
/// boot p50 is the fastest handler's (the one a latency-sensitive pod would pick). `None` before the
/// observer has computed any slots, so nothing is published from an empty first scan.
pub fn capacity_from_snapshots(snaps: &[HandlerSnapshot], warm_templates: u32) -> Option<Capacity> {
    let best = snaps
        .iter()
        .filter(|s| s.slots_total > 0)
        .max_by_key(|s| s.slots_total)?;
    let clamp = |v: u64| u32::try_from(v).unwrap_or(u32::MAX);
    let boot_p50_ms = snaps
        .iter()
        .filter_map(|s| s.boot_p50_seconds)
        .map(|s| (s * 1000.0).round())
        .fold(None, |acc: Option<f64>, v| {
            Some(acc.map_or(v, |a| a.min(v)))
        })
        // Float-to-int `as` saturates (NaN is 0); the value is clamped to u32's range first anyway.
        .map(|ms| {
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let ms = ms.clamp(0.0, f64::from(u32::MAX)) as u32;
            ms
        });
    let vm_cost_bytes = snaps
        .iter()
        .filter(|s| s.slot_cost_measured)
        .map(|s| (s.runtime_handler.clone(), s.slot_cost_bytes))
        .collect();
    Some(Capacity {
        slots_total: clamp(best.slots_total),
        slots_free: clamp(best.slots_free),
        boot_p50_ms,
        warm_templates,
        warm_condition: None,
        vm_cost_bytes,
    })
}

/// Feeds the publisher from the observer every `interval`; only real changes wake the publisher.
pub async fn feed_capacity(
    observer: Arc<Observer>,
    tx: watch::Sender<Option<Capacity>>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let next = capacity_from_snapshots(&observer.handler_snapshots(), observer.warm().proven())
            .map(|c| Capacity {
                warm_condition: observer.warm().condition(),
                ..c
            });
        if next.is_none() {
            continue;
        }
        tx.send_if_modified(|cur| {
            if *cur == next {
                false
            } else {
                *cur = next;
                true
            }
        });
        if tx.is_closed() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::memory::MemoryUsage;

    fn snap(
        h: &str,
        total: u64,
        free: u64,
        p50: Option<f64>,
        cost: Option<u64>,
    ) -> HandlerSnapshot {
        HandlerSnapshot {
            runtime_handler: h.into(),
            ready: true,
            probe: None,
            slots_total: total,
            slots_free: free,
            slot_cost_bytes: cost.unwrap_or(300 << 20),
            slot_cost_measured: cost.is_some(),
            vms: 0,
            vms_template: 0,
            vms_cold: 0,
            memory: MemoryUsage::default(),
            boot_p50_seconds: p50,
            boot_p90_seconds: None,
        }
    }

    #[test]
    fn best_handler_defines_slots_fastest_defines_boot() {
        assert_eq!(
            capacity_from_snapshots(&[snap("a", 0, 0, None, None)], 0),
            None
        );
        let c = capacity_from_snapshots(
            &[
                snap("kata-qemu", 40, 30, Some(0.9), Some(200 << 20)),
                snap("kata-qemu-warm", 60, 50, Some(0.0304), None),
            ],
            2,
        )
        .expect("capacity");
        assert_eq!(c.slots_total, 60);
        assert_eq!(c.slots_free, 50);
        assert_eq!(c.boot_p50_ms, Some(30));
        assert_eq!(
            c.vm_cost_bytes,
            [("kata-qemu".to_string(), 200u64 << 20)]
                .into_iter()
                .collect()
        );
        assert_eq!(c.warm_templates, 2);
    }
}
