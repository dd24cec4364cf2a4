//! The node's container runtime as noded configures it: the [`RuntimeConfigurator`] seam.
//!
//! What noded needs from "the runtime on this node" is the same whatever it is: render and write the
//! Kata handlers into its config, say whether that needs a restart and do it (only then), revert
//! exactly what noded wrote, and name its version. The daemon (`noded run`: start and reconcile loop)
//! and the installer (`installer boot`, `installer uninstall`) reach the runtime only through this
//! trait, and [`configurator`] is the one place that picks the implementation. Everything else noded
//! does with a runtime is CRI and runtime-agnostic ([`crate::cri`]): probe sandboxes, status, pods.
//!
//! The implementation today is containerd's, [`ContainerdConfigurator`]. A second runtime adds its
//! module with a configurator, a variant of [`RuntimeError`] and an arm in [`configurator`] chosen by
//! noded.toml (docs/architecture.md lists the files; `noded/tests/configurator_seam.rs` shows the
//! skeleton).

use std::path::{Component, Path, PathBuf};

use tracing::info;

use crate::config::NodedConfig;
pub use crate::containerd::configurator::ContainerdConfigurator;
use crate::containerd::handler::{KataHandler, UnknownHandler};
use crate::exit::{self, ExitStatus};
use crate::metrics::{ApplyOutcome, Metrics};

/// What an apply or revert changed, or what a plan would change.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    /// Some file's bytes differ (or would).
    pub changed: bool,
    /// The runtime's effective config changed: it reads the new handlers only after a restart.
    pub restart_needed: bool,
    pub restarted: bool,
    /// After the restart, the runtime was seen serving every requested handler.
    pub verified: bool,
    /// Handlers added, updated or removed.
    pub handlers: Vec<String>,
    /// Files written or removed.
    pub files: Vec<PathBuf>,
    /// How the runtime's config is edited, in the runtime's words (containerd: `in-place`, `drop-in`).
    pub strategy: String,
    pub runtime_version: String,
    /// Set when a restart was needed but not allowed.
    pub warning: Option<String>,
}

/// How a configurator reaches the node and what it may do there.
#[derive(Debug, Clone, Default)]
pub struct Access {
    /// Every node path of noded.toml is taken under this directory (the installer's `--root`); None:
    /// the paths as configured (the daemon).
    pub root: Option<PathBuf>,
    /// The runtime's binary, asked for its version when nothing answers on its socket; None: its usual
    /// name on PATH.
    pub binary: Option<PathBuf>,
    /// The runtime runs (or may), so its socket is asked first: false before it ever starts
    /// (`installer boot`), and under another root.
    pub running: bool,
    /// Restart the runtime as noded.toml says when its effective config changed; false: never (the
    /// installer before the runtime starts, local mode before noded starts it).
    pub may_restart: bool,
    /// Take over handler entries of the same name that noded did not write (the installer, when
    /// nodeadm renders identical ones).
    pub adopt: bool,
}

impl Access {
    /// `noded run` on the node: paths as configured, the runtime running, restarts as configured.
    pub fn daemon() -> Self {
        Self {
            running: true,
            may_restart: true,
            ..Self::default()
        }
    }

    /// `node_path` where this access sees it: under `root` when set (only its normal components, as
    /// the installer's root does), else unchanged.
    pub fn path(&self, node_path: &Path) -> PathBuf {
        match &self.root {
            Some(root) => root.join(
                node_path
                    .components()
                    .filter(|c| matches!(c, Component::Normal(_)))
                    .collect::<PathBuf>(),
            ),
            None => node_path.to_path_buf(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("containerd.runtimes: {0}")]
    Handler(#[from] UnknownHandler),
    #[error("containerd.restart: {0}")]
    Restart(#[from] crate::containerd::restart::BadRestart),
    #[error(transparent)]
    Containerd(#[from] crate::containerd::apply::ApplyError),
    /// k3s/rke2: the containerd template (`containerd.flavour`).
    #[error(transparent)]
    Embedded(#[from] crate::containerd::embedded::TemplateError),
    /// `[[handlers]]`: a handler's Kata configuration or drop-in.
    #[error(transparent)]
    Kata(#[from] crate::kata::KataError),
}

impl ExitStatus for RuntimeError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Handler(_) | Self::Restart(_) => exit::BAD_INPUT,
            Self::Containerd(e) => e.exit_code(),
            Self::Embedded(e) => e.exit_code(),
            Self::Kata(e) => e.exit_code(),
        }
    }
}

/// The node's container runtime, as far as its configuration goes.
#[async_trait::async_trait]
pub trait RuntimeConfigurator: Send + Sync {
    /// The runtime's name in logs and messages (`containerd`).
    fn runtime(&self) -> &'static str;

    /// The runtime's version: the running daemon's, else its binary's.
    async fn version(&self) -> Result<String, RuntimeError>;

    /// Renders the config for `handlers` and reports what [`apply`](Self::apply) would change,
    /// including whether the runtime would need a restart. Writes nothing.
    async fn plan(&self, handlers: &[KataHandler]) -> Result<Change, RuntimeError>;

    /// Writes the config for `handlers` (nothing when it is already there). When the effective config
    /// changed: restarts the runtime if allowed, waits for it and verifies it serves every handler,
    /// restoring the previous config when it does not.
    async fn apply(&self, handlers: &[KataHandler]) -> Result<Change, RuntimeError>;

    /// Restores what noded wrote: the original bytes where nobody changed the file since, else only
    /// noded's own entries removed. Restarts the runtime (if allowed) when the effective config changed.
    async fn revert(&self) -> Result<Change, RuntimeError>;

    /// Restarts the runtime the configured way; Ok(false) when it is not to be restarted.
    async fn restart(&self) -> Result<bool, RuntimeError>;
}

/// The configurator of the node's runtime as noded.toml describes it (containerd: `[containerd]`;
/// `containerd.flavour` k3s/rke2: the template of their embedded containerd).
pub fn configurator(
    config: &NodedConfig,
    access: &Access,
) -> Result<Box<dyn RuntimeConfigurator>, RuntimeError> {
    let flavour = config.containerd.flavour;
    if flavour.is_embedded() {
        return Ok(Box::new(
            crate::containerd::embedded::EmbeddedContainerd::new(config, access, flavour),
        ));
    }
    Ok(Box::new(ContainerdConfigurator::new(config, access)))
}

/// Applies `handlers` through `runtime` and counts the outcome (`noded_containerd_config_applies_total`
/// by result, `noded_containerd_restarts_total`: metric names are a contract, kept for any runtime).
pub async fn apply_recorded(
    runtime: &dyn RuntimeConfigurator,
    handlers: &[KataHandler],
    metrics: &Metrics,
) -> Result<Change, RuntimeError> {
    let result = runtime.apply(handlers).await;
    match &result {
        Ok(c) => {
            metrics.record_apply(if c.changed {
                ApplyOutcome::Changed
            } else {
                ApplyOutcome::Unchanged
            });
            if c.restarted {
                metrics.record_containerd_restart();
            }
        }
        Err(_) => metrics.record_apply(ApplyOutcome::Failed),
    }
    result
}

/// `noded run`'s apply at start and on every reconcile round: the handlers of noded.toml. None when
/// `containerd.apply_on_start` is off.
pub async fn apply_on_start(
    runtime: &dyn RuntimeConfigurator,
    config: &NodedConfig,
    metrics: &Metrics,
) -> Result<Option<Change>, RuntimeError> {
    if !config.containerd.apply_on_start {
        return Ok(None);
    }
    // The drop-ins first: containerd's entries point at the handlers' own configuration copies.
    let dropins = crate::kata::handlers::apply(
        &config.handlers,
        &config.containerd.kata_root,
        &config
            .daemon
            .data_dir
            .join(crate::kata::handlers::STATE_FILE),
    )?;
    if dropins.changed() {
        info!(written = ?dropins.written, removed = ?dropins.removed, "Kata handler drop-ins applied");
    }
    let handlers = config.kata_handlers();
    let change = apply_recorded(runtime, &handlers, metrics).await?;
    info!(
        changed = change.changed,
        restarted = change.restarted,
        handlers = ?change.handlers,
        "{} config applied",
        runtime.runtime()
    );
    Ok(Some(change))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_rebases_node_paths_under_the_root_only() {
        let daemon = Access::daemon();
        assert_eq!(
            daemon.path(Path::new("rel/noded.toml")),
            Path::new("rel/noded.toml")
        );
        let installer = Access {
            root: Some(PathBuf::from("/tmp/root")),
            ..Access::default()
        };
        assert_eq!(
            installer.path(Path::new("/etc/containerd/../config.toml")),
            Path::new("/tmp/root/etc/containerd/config.toml")
        );
    }
}
