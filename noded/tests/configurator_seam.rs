//! The `RuntimeConfigurator` seam: a skeleton second configurator compiled against the trait and run
//! through the daemon's generic path, and containerd's configurator seen only through the trait (what
//! the daemon and the installer get from `noded::runtime::configurator`).
//!
//! A real second runtime (k3s/rke2's containerd template, CRI-O) touches exactly these files (see
//! docs/architecture.md, "Container runtime"):
//! - `noded/src/<runtime>/` (new): its configurator, like the skeleton below, and its error type;
//! - `noded/src/runtime.rs`: one `RuntimeError` variant and one arm in `configurator`;
//! - `noded/src/config.rs`: the setting that selects it and its own section;
//! - `noded/src/lib.rs`: the module line.
//!
//! The daemon, the installer's boot/uninstall steps, the probe and CRI status (`noded::cri`) stay as
//! they are.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use noded::config::NodedConfig;
use noded::containerd::handler::KataHandler;
use noded::metrics::{Metrics, MetricsScope};
use noded::runtime::{self, Access, Change, RuntimeConfigurator, RuntimeError};
use testkit::per_series;

const HANDLERS: [KataHandler; 2] = [KataHandler::Qemu, KataHandler::QemuWarm];

/// A runtime that reads every `*.conf` of a drop-in directory, one `handler = <name>` line per
/// handler, and needs a restart to see a change. The skeleton owns one drop-in; its "restart" is a
/// counter where a real one would call systemd.
struct Skeleton {
    drop_in: PathBuf,
    restarts: AtomicU32,
}

impl Skeleton {
    fn render(handlers: &[KataHandler]) -> String {
        handlers
            .iter()
            .map(|h| format!("handler = {}\n", h.name()))
            .collect()
    }

    fn current(&self) -> Option<String> {
        std::fs::read_to_string(&self.drop_in).ok()
    }

    fn change(&self, after: Option<&str>, handlers: Vec<String>) -> Change {
        let changed = self.current().as_deref() != after;
        Change {
            changed,
            restart_needed: changed,
            handlers: if changed { handlers } else { Vec::new() },
            files: if changed {
                vec![self.drop_in.clone()]
            } else {
                Vec::new()
            },
            strategy: "drop-in".into(),
            runtime_version: "skeleton 0.1".into(),
            ..Change::default()
        }
    }
}

#[async_trait::async_trait]
impl RuntimeConfigurator for Skeleton {
    fn runtime(&self) -> &'static str {
        "skeleton"
    }

    async fn version(&self) -> Result<String, RuntimeError> {
        Ok("skeleton 0.1".into())
    }

    async fn plan(&self, handlers: &[KataHandler]) -> Result<Change, RuntimeError> {
        let names = handlers.iter().map(|h| h.name().to_owned()).collect();
        Ok(self.change(Some(&Self::render(handlers)), names))
    }

    async fn apply(&self, handlers: &[KataHandler]) -> Result<Change, RuntimeError> {
        let mut change = self.plan(handlers).await?;
        if change.changed {
            std::fs::create_dir_all(self.drop_in.parent().expect("parent")).expect("mkdir");
            std::fs::write(&self.drop_in, Self::render(handlers)).expect("write drop-in");
            change.restarted = self.restart().await?;
            change.verified = change.restarted;
        }
        Ok(change)
    }

    async fn revert(&self) -> Result<Change, RuntimeError> {
        let owned = self
            .current()
            .map(|t| t.lines().map(|l| l.replace("handler = ", "")).collect())
            .unwrap_or_default();
        let mut change = self.change(None, owned);
        if change.changed {
            std::fs::remove_file(&self.drop_in).expect("remove drop-in");
            change.restarted = self.restart().await?;
        }
        Ok(change)
    }

    async fn restart(&self) -> Result<bool, RuntimeError> {
        self.restarts.fetch_add(1, Ordering::SeqCst);
        Ok(true)
    }
}

fn metrics() -> Metrics {
    Metrics::new(MetricsScope {
        handlers: HANDLERS.iter().map(|h| h.name().to_owned()).collect(),
        templates: Vec::new(),
    })
}

/// The value of the first sample line of `text` that starts with `prefix`.
fn sample(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix} in\n{text}"))
}

/// The daemon's apply path (`runtime::apply_recorded`, what start and the reconcile loop use) works
/// with any configurator: restart only on a change, idempotent, counted.
#[tokio::test]
async fn a_second_configurator_runs_through_the_daemon_path() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let skeleton = Skeleton {
        drop_in: tmp.path().join("conf.d/noded-kata.conf"),
        restarts: AtomicU32::new(0),
    };
    let runtime: &dyn RuntimeConfigurator = &skeleton;
    let metrics = metrics();

    let first = runtime::apply_recorded(runtime, &HANDLERS, &metrics)
        .await
        .expect("apply");
    assert!(
        first.changed && first.restarted && first.verified,
        "{first:?}"
    );
    assert_eq!(first.handlers, ["kata-qemu", "kata-qemu-warm"]);
    let again = runtime::apply_recorded(runtime, &HANDLERS, &metrics)
        .await
        .expect("apply again");
    assert!(!again.changed && !again.restarted, "{again:?}");
    assert_eq!(skeleton.restarts.load(Ordering::SeqCst), 1);
    let text = metrics.encode().expect("encode");
    assert_eq!(
        sample(
            &text,
            "noded_containerd_config_applies_total{outcome=\"changed\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &text,
            "noded_containerd_config_applies_total{outcome=\"unchanged\"}"
        ),
        1.0
    );
    assert_eq!(sample(&text, "noded_containerd_restarts_total"), 1.0);

    let reverted = runtime.revert().await.expect("revert");
    assert!(reverted.changed && reverted.restarted, "{reverted:?}");
    assert!(!skeleton.drop_in.exists());
}

/// containerd's configurator through the trait only, as `installer boot` and `uninstall` get it: under
/// a root, not running, never restarted.
fn containerd_behind_the_seam(series: testkit::containerd::Series) {
    let Some(bins) = testkit::containerd::require(series) else {
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let etc = root.path().join("etc/containerd");
    std::fs::create_dir_all(&etc).expect("mkdir");
    let original = bins.config_default().expect("containerd config default");
    let main = etc.join("config.toml");
    std::fs::write(&main, &original).expect("write config");
    let config = NodedConfig::parse(Path::new("<test>"), "").expect("defaults");
    let access = Access {
        root: Some(root.path().to_path_buf()),
        binary: Some(bins.containerd.clone()),
        ..Access::default()
    };
    let configurator = runtime::configurator(&config, &access).expect("configurator");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");

    assert_eq!(configurator.runtime(), "containerd");
    let version = rt.block_on(configurator.version()).expect("version");
    assert_eq!(version, bins.detect_version().expect("version").to_string());
    let strategy = if series.version().major >= 2 {
        "drop-in"
    } else {
        "in-place"
    };

    let plan = rt.block_on(configurator.plan(&HANDLERS)).expect("plan");
    assert!(plan.changed && plan.restart_needed, "{plan:?}");
    assert_eq!(plan.strategy, strategy);
    assert_eq!(
        std::fs::read(&main).expect("read"),
        original,
        "plan writes nothing"
    );

    let applied = rt.block_on(configurator.apply(&HANDLERS)).expect("apply");
    assert!(applied.changed && applied.restart_needed, "{applied:?}");
    assert!(!applied.restarted, "never restarted: {applied:?}");
    assert!(applied.warning.is_some(), "{applied:?}");
    assert_eq!(applied.files, plan.files);
    assert_eq!(applied.runtime_version, version);
    // Under the root only: nothing escaped to the host's paths.
    assert!(applied.files.iter().all(|f| f.starts_with(root.path())));
    assert!(root.path().join("var/lib/noded").is_dir());

    let replan = rt.block_on(configurator.plan(&HANDLERS)).expect("plan");
    assert!(!replan.changed && !replan.restart_needed, "{replan:?}");

    let reverted = rt.block_on(configurator.revert()).expect("revert");
    assert!(reverted.changed && reverted.restart_needed, "{reverted:?}");
    assert_eq!(std::fs::read(&main).expect("read"), original);
    let again = rt.block_on(configurator.revert()).expect("revert again");
    assert!(!again.changed, "{again:?}");
}

per_series! {
    [V1_6, V2_1]
    fn containerd_through_the_trait(series) {
        containerd_behind_the_seam(series);
    }
}
