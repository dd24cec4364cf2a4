//! Keeps Kata's factory template built for every warm handler while `noded run` runs.
//!
//! Kata's shim only fetches an existing template and silently boots cold without one, so nobody but
//! noded notices a template that is gone (the tmpfs after a reboot), stale (a new Kata or guest from
//! `installer bake`) or damaged. The keeper checks each warm handler's template every
//! `kata.template_check_seconds`, rebuilds it through Kata's own tool when needed, retries a failed
//! build with backoff, and reports every state change to a [`TemplateReporter`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracing::Instrument;

use super::KataError;
use super::WarmTarget;
use super::factory::{EnsureAction, FactoryExec, KataFactory, in_mount_namespace};
use super::layout::KataLayout;

/// First retry after a failed build; doubles up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_secs(2);
const RETRY_MAX: Duration = Duration::from_secs(300);

#[derive(Debug, Clone)]
pub struct KeeperSettings {
    pub handlers: Vec<WarmTarget>,
    /// noded's persistent directory (the build records must survive the reboot that empties the
    /// template tmpfs).
    pub data_dir: PathBuf,
    pub check_interval: Duration,
    pub exec: FactoryExec,
    /// Where Kata's files, tools and template live (see [`in_mount_namespace`]).
    pub mount_namespace: Option<PathBuf>,
}

impl KeeperSettings {
    pub fn from_config(cfg: &crate::config::NodedConfig) -> Self {
        Self {
            handlers: cfg.warm_targets(),
            data_dir: cfg.daemon.data_dir.clone(),
            check_interval: Duration::from_secs(cfg.kata.template_check_seconds.max(1)),
            exec: FactoryExec {
                timeout: Duration::from_secs(cfg.kata.factory_timeout_seconds.max(1)),
            },
            mount_namespace: cfg.kata.factory_mount_namespace.clone(),
        }
    }
}

/// One check of one handler's template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateCheck {
    /// Current (kept or just built); `action` says which.
    Valid { action: EnsureAction },
    /// Not usable; clones cannot happen until a later check succeeds. Pods still run (cold).
    Invalid { reason: String },
}

/// Where the keeper's findings go (metrics, node condition, Events).
pub trait TemplateReporter: Send + Sync {
    fn checked(&self, handler: &str, check: &TemplateCheck);
}

/// Runs until the task is aborted. Checks run one after another on the blocking pool: building a
/// template boots a VM and hashes files, which must not occupy the async workers.
pub async fn run(settings: KeeperSettings, reporter: Arc<dyn TemplateReporter>) {
    let mut failures: BTreeMap<String, u32> = BTreeMap::new();
    loop {
        for handler in &settings.handlers {
            let span = tracing::info_span!("kata_template", runtime_handler = %handler.name);
            let s = settings.clone();
            let target = handler.clone();
            let check = tokio::task::spawn_blocking(move || check_once(&s, &target))
                .instrument(span.clone())
                .await
                .unwrap_or_else(|e| TemplateCheck::Invalid {
                    reason: format!("template check panicked: {e}"),
                });
            let n = failures.entry(handler.name.clone()).or_default();
            match &check {
                TemplateCheck::Valid { .. } => *n = 0,
                TemplateCheck::Invalid { reason } => {
                    *n = n.saturating_add(1);
                    span.in_scope(|| {
                        tracing::warn!(%reason, failures = *n, "Kata VM template not usable; warm pods boot cold")
                    });
                }
            }
            reporter.checked(&handler.name, &check);
        }
        let worst = failures.values().copied().max().unwrap_or(0);
        tokio::time::sleep(next_wait(worst, settings.check_interval)).await;
    }
}

/// After `failures` consecutive failures: 2 s, 4 s, … up to 5 min; the normal check interval when
/// nothing failed (or when it is shorter than the backoff step).
pub fn next_wait(failures: u32, check_interval: Duration) -> Duration {
    if failures == 0 {
        return check_interval;
    }
    let step = RETRY_FIRST.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    step.min(RETRY_MAX).min(check_interval.max(RETRY_FIRST))
}

/// One synchronous check (and build when needed) of `handler`'s template.
pub fn check_once(settings: &KeeperSettings, target: &WarmTarget) -> TemplateCheck {
    let result = in_mount_namespace(settings.mount_namespace.as_deref(), || {
        let layout = KataLayout::new(&target.kata_root);
        KataFactory::new(layout, target.config.clone(), &settings.data_dir)?
            .with_exec(settings.exec.clone())
            .ensure()
    });
    match result {
        Ok(outcome) => TemplateCheck::Valid {
            action: outcome.action,
        },
        Err(e) => TemplateCheck::Invalid { reason: reason(&e) },
    }
}

fn reason(e: &KataError) -> String {
    crate::config::one_line(&e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_bounded_by_the_check_interval_and_five_minutes() {
        let hour = Duration::from_secs(3600);
        assert_eq!(next_wait(0, hour), hour);
        assert_eq!(next_wait(1, hour), Duration::from_secs(2));
        assert_eq!(next_wait(2, hour), Duration::from_secs(4));
        assert_eq!(next_wait(30, hour), Duration::from_secs(300));
        assert_eq!(
            next_wait(5, Duration::from_secs(10)),
            Duration::from_secs(10)
        );
    }
}
