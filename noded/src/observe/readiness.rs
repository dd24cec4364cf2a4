//! The one readiness model of the node: when the runtime is ready to take pods. `/readyz` (through
//! the [`super::Observer`]) and the node publisher's startup taint (k8s) both decide with
//! [`ReadinessModel`], fed by the same probe outcomes, so the endpoint answers ready exactly when the
//! taint is lifted or kept off.
//!
//! Rules:
//! - Ready only after EVERY probe handler's latest probe succeeded.
//! - On a proven (ready) node, a handler must fail `failure_threshold` probes in a row before the node
//!   is not ready again (one failed probe is noise, not a broken runtime); it is then tainted.
//! - Before any probe result the readiness is [`Readiness::Unknown`]: the node is left as it is.

use std::collections::BTreeMap;

/// Latest probe result of one handler, plus how many failed in a row (counted by the sender so that
/// coalescing in a watch channel cannot lose failures).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HandlerHealth {
    /// Probes recorded so far; the publisher uses it to notice new results.
    pub probes: u64,
    pub ok: bool,
    pub error: Option<String>,
    pub consecutive_failures: u32,
}

/// Health of every probed runtime handler.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeHealth {
    pub handlers: BTreeMap<String, HandlerHealth>,
}

impl RuntimeHealth {
    /// Records one probe outcome; call through `watch::Sender::send_modify`.
    pub fn record(&mut self, handler: &str, ok: bool, error: Option<String>) {
        let h = self.handlers.entry(handler.to_string()).or_default();
        h.probes += 1;
        h.ok = ok;
        h.consecutive_failures = if ok {
            0
        } else {
            h.consecutive_failures.saturating_add(1)
        };
        h.error = if ok { None } else { error };
    }
}

/// Readiness as last decided.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Readiness {
    /// No probe result yet: the node is left as it is.
    #[default]
    Unknown,
    /// Every handler passed its latest probe (or the node is proven and no failure streak reached
    /// the threshold).
    Ready,
    /// A probe failed; `taint` when a handler failed `failure_threshold` times in a row.
    NotReady { taint: bool, message: String },
}

impl Readiness {
    /// Ready for pods: the startup taint is lifted or kept off.
    pub fn is_ready(&self) -> bool {
        *self == Readiness::Ready
    }
}

/// The readiness decision over the probe health of a set of handlers. Both `/readyz` and the
/// publisher hold one.
#[derive(Debug, Clone)]
pub struct ReadinessModel {
    handlers: Vec<String>,
    threshold: u32,
    health: RuntimeHealth,
    readiness: Readiness,
}

/// No handlers: never ready (nothing proves the runtime).
impl Default for ReadinessModel {
    fn default() -> Self {
        Self::new(Vec::new(), 1)
    }
}

impl ReadinessModel {
    /// `handlers` must all pass; `failure_threshold` failures in a row (at least 1) break a proven
    /// node.
    pub fn new(handlers: Vec<String>, failure_threshold: u32) -> Self {
        Self {
            handlers,
            threshold: failure_threshold.max(1),
            health: RuntimeHealth::default(),
            readiness: Readiness::Unknown,
        }
    }

    pub fn handlers(&self) -> &[String] {
        &self.handlers
    }

    pub fn failure_threshold(&self) -> u32 {
        self.threshold
    }

    pub fn readiness(&self) -> &Readiness {
        &self.readiness
    }

    /// The probe health the current readiness was decided on.
    pub fn health(&self) -> &RuntimeHealth {
        &self.health
    }

    /// Records one probe outcome and decides again; returns the readiness when it changed.
    pub fn record(&mut self, handler: &str, ok: bool, error: Option<String>) -> Option<&Readiness> {
        let mut health = std::mem::take(&mut self.health);
        health.record(handler, ok, error);
        self.update(health)
    }

    /// Takes the latest probe health (as counted by its sender) and decides again; returns the
    /// readiness when it changed.
    pub fn update(&mut self, health: RuntimeHealth) -> Option<&Readiness> {
        self.health = health;
        let next = evaluate(
            &self.health,
            &self.handlers,
            self.threshold,
            &self.readiness,
        )?;
        if next == self.readiness {
            return None;
        }
        self.readiness = next;
        Some(&self.readiness)
    }

    /// Probe handlers whose latest probe did not pass, and why (for `/readyz`'s body).
    pub fn failing(&self) -> Vec<(String, String)> {
        self.handlers
            .iter()
            .filter_map(
                |h| match self.health.handlers.get(h).filter(|x| x.probes > 0) {
                    Some(x) if x.ok => None,
                    Some(x) => Some((
                        h.clone(),
                        x.error.clone().unwrap_or_else(|| "probe failed".into()),
                    )),
                    None => Some((h.clone(), "no probe has run yet".into())),
                },
            )
            .collect()
    }
}

/// The readiness the health implies, or `None` to keep the current one (no result yet, or a failure
/// streak on a proven node that has not reached the threshold).
fn evaluate(
    health: &RuntimeHealth,
    handlers: &[String],
    threshold: u32,
    current: &Readiness,
) -> Option<Readiness> {
    let results: Vec<(&String, Option<&HandlerHealth>)> = handlers
        .iter()
        .map(|h| (h, health.handlers.get(h).filter(|x| x.probes > 0)))
        .collect();
    if !results.is_empty() && results.iter().all(|(_, h)| h.is_some_and(|h| h.ok)) {
        return Some(Readiness::Ready);
    }
    let failing: Vec<(&String, &HandlerHealth)> = results
        .iter()
        .filter_map(|(name, h)| h.filter(|h| !h.ok).map(|h| (*name, h)))
        .collect();
    if failing.is_empty() {
        return None;
    }
    let message = failing
        .iter()
        .map(|(name, h)| {
            format!(
                "runtime handler {name}: probe failed {} time(s) in a row: {}",
                h.consecutive_failures,
                h.error.as_deref().unwrap_or("no error message")
            )
        })
        .collect::<Vec<_>>()
        .join("; ");
    let broken = failing
        .iter()
        .any(|(_, h)| h.consecutive_failures >= threshold);
    match current {
        Readiness::Ready if !broken => None,
        Readiness::NotReady { taint: true, .. } => Some(Readiness::NotReady {
            taint: true,
            message,
        }),
        _ => Some(Readiness::NotReady {
            taint: broken,
            message,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(entries: &[(&str, bool, u32)]) -> RuntimeHealth {
        let mut h = RuntimeHealth::default();
        for (name, ok, n) in entries {
            for _ in 0..*n {
                h.record(name, *ok, (!ok).then(|| "boom".to_string()));
            }
        }
        h
    }

    fn handlers() -> Vec<String> {
        vec!["a".into(), "b".into()]
    }

    fn model() -> ReadinessModel {
        ReadinessModel::new(handlers(), 3)
    }

    #[test]
    fn ready_needs_every_handler() {
        assert_eq!(
            evaluate(&hs(&[("a", true, 1)]), &handlers(), 3, &Readiness::Unknown),
            None
        );
        assert_eq!(
            evaluate(
                &hs(&[("a", true, 1), ("b", true, 1)]),
                &handlers(),
                3,
                &Readiness::Unknown
            ),
            Some(Readiness::Ready)
        );
        assert_eq!(
            evaluate(&RuntimeHealth::default(), &[], 3, &Readiness::Unknown),
            None
        );
    }

    #[test]
    fn first_failure_on_fresh_node_is_not_ready_without_taint_change() {
        let r = evaluate(&hs(&[("a", false, 1)]), &handlers(), 3, &Readiness::Unknown);
        assert!(
            matches!(r, Some(Readiness::NotReady { taint: false, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn proven_node_keeps_ready_until_threshold() {
        assert_eq!(
            evaluate(
                &hs(&[("a", true, 1), ("b", false, 2)]),
                &handlers(),
                3,
                &Readiness::Ready
            ),
            None
        );
        let r = evaluate(
            &hs(&[("a", true, 1), ("b", false, 3)]),
            &handlers(),
            3,
            &Readiness::Ready,
        );
        assert!(
            matches!(r, Some(Readiness::NotReady { taint: true, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn record_counts_streaks() {
        let mut h = hs(&[("a", false, 2)]);
        assert_eq!(h.handlers["a"].consecutive_failures, 2);
        h.record("a", true, None);
        assert_eq!(h.handlers["a"].consecutive_failures, 0);
        assert_eq!(h.handlers["a"].probes, 3);
    }

    #[test]
    fn model_is_unknown_until_a_result_and_ready_only_with_every_handler() {
        let mut m = model();
        assert_eq!(*m.readiness(), Readiness::Unknown);
        assert!(!m.readiness().is_ready());
        assert_eq!(
            m.failing(),
            [
                ("a".to_string(), "no probe has run yet".to_string()),
                ("b".to_string(), "no probe has run yet".to_string())
            ]
        );
        assert_eq!(m.record("a", true, None), None, "b has no result yet");
        assert_eq!(m.record("b", true, None), Some(&Readiness::Ready));
        assert!(m.readiness().is_ready());
        assert!(m.failing().is_empty());
    }

    #[test]
    fn model_on_a_proven_node_stays_ready_below_the_threshold_and_taints_at_it() {
        let mut m = model();
        m.record("a", true, None);
        m.record("b", true, None);
        // Two failures in a row: still ready (what the taint does), though the latest probe of b
        // failed, which /readyz reports in its body.
        assert_eq!(m.record("b", false, Some("shim died".into())), None);
        assert_eq!(m.record("b", false, Some("shim died".into())), None);
        assert!(m.readiness().is_ready());
        assert_eq!(m.failing(), [("b".to_string(), "shim died".to_string())]);
        // The third: tainted, and a passing probe of b makes it ready again.
        let r = m.record("b", false, Some("shim died".into())).cloned();
        assert!(
            matches!(&r, Some(Readiness::NotReady { taint: true, message })
                if message == "runtime handler b: probe failed 3 time(s) in a row: shim died"),
            "{r:?}"
        );
        assert_eq!(m.record("b", true, None), Some(&Readiness::Ready));
    }

    #[test]
    fn model_fresh_node_failure_is_not_ready_and_streak_taints() {
        let mut m = ReadinessModel::new(handlers(), 2);
        m.record("a", true, None);
        let r = m.record("b", false, None).cloned();
        assert!(
            matches!(r, Some(Readiness::NotReady { taint: false, .. })),
            "{r:?}"
        );
        let r = m.record("b", false, None).cloned();
        assert!(
            matches!(r, Some(Readiness::NotReady { taint: true, .. })),
            "{r:?}"
        );
        // Every handler passing again lifts it.
        m.record("b", true, None);
        assert!(m.readiness().is_ready());
    }

    #[test]
    fn update_takes_the_senders_counted_health() {
        // The publisher gets the health through a watch channel that may coalesce: the streak is
        // counted by the sender, so three failures seen at once still break a proven node.
        let mut m = model();
        m.update(hs(&[("a", true, 1), ("b", true, 1)]));
        assert!(m.readiness().is_ready());
        let r = m
            .update(hs(&[("a", true, 1), ("b", true, 1), ("b", false, 3)]))
            .cloned();
        assert!(
            matches!(r, Some(Readiness::NotReady { taint: true, .. })),
            "{r:?}"
        );
    }

    #[test]
    fn a_zero_threshold_means_one() {
        assert_eq!(ReadinessModel::new(handlers(), 0).failure_threshold(), 1);
    }
}
