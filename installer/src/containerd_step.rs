//! The container-runtime part of boot and uninstall, through noded's
//! [`RuntimeConfigurator`](noded::runtime::RuntimeConfigurator) (the same code as `noded run` and
//! `noded containerd apply|revert`): for containerd, strategy by version, ownership record, backup of
//! the original bytes, byte-identical revert.

use std::path::{Path, PathBuf};

use noded::config::NodedConfig;
use noded::runtime::{self, Access, RuntimeConfigurator};
use serde::Serialize;

use crate::assets;
use crate::host;
use crate::manifest::{Entry, Kind, Ledger, Phase};

/// Where noded's library keeps its ownership record and backups, relative to its state dir.
const OWNERSHIP: &str = "ownership";

#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub config: PathBuf,
    pub changed: bool,
    pub handlers: Vec<String>,
    pub strategy: Option<String>,
    pub files: Vec<PathBuf>,
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
}

fn binary(ledger: &Ledger) -> PathBuf {
    host::containerd_binary(&ledger.root).unwrap_or_else(|| PathBuf::from("containerd"))
}

/// The runtime's configurator under the ledger's root, never asking a running daemon (boot runs
/// before it starts; uninstall reads the version from the binary, as boot did).
fn configurator(
    ledger: &Ledger,
    config: &NodedConfig,
    may_restart: bool,
    adopt: bool,
) -> Result<Box<dyn RuntimeConfigurator>, String> {
    let access = Access {
        root: Some(ledger.root.path("/")),
        binary: Some(binary(ledger)),
        running: false,
        may_restart,
        adopt,
    };
    runtime::configurator(config, &access).map_err(|e| e.to_string())
}

/// Registers the handlers of noded.toml before containerd starts (so never restarts it).
pub fn apply(ledger: &mut Ledger, config: &NodedConfig) -> Result<Applied, String> {
    let root = ledger.root.clone();
    let handlers = config.kata_handlers();
    // The library's record lives in noded's data dir; if boot is the one creating it, uninstall
    // removes it (after the revert that needs it).
    let ownership_node = config.daemon.data_dir.join(OWNERSHIP);
    if !root.path(&ownership_node).exists() && ledger.entry(&ownership_node).is_none() {
        ledger
            .ensure_dir(&config.daemon.data_dir)
            .map_err(|e| e.to_string())?;
        ledger.record(Entry {
            path: ownership_node.clone(),
            kind: Kind::Tree,
            phase: Phase::Boot,
            sha256: None,
            backup: None,
        });
        ledger.save().map_err(|e| e.to_string())?;
    }
    // With the nodeadm drop-in, nodeadm itself renders identical handler tables into config.toml;
    // noded takes those over instead of reporting them as foreign.
    let adopt = ledger.entry(Path::new(assets::NODEADM_DROPIN)).is_some();
    let configurator = configurator(ledger, config, false, adopt)?;
    // Recorded before the apply (intent first): a boot killed mid-apply is still reverted by
    // uninstall; reverting a config noded never touched is a no-op.
    ledger.manifest.containerd_applied = Some(config.containerd.config.clone());
    ledger.save().map_err(|e| e.to_string())?;
    let change = runtime()?
        .block_on(configurator.apply(&handlers))
        .map_err(|e| e.to_string())?;
    Ok(Applied {
        config: root.path(&config.containerd.config),
        changed: change.changed,
        handlers: change.handlers,
        strategy: Some(change.strategy),
        files: change.files,
    })
}

/// Restores containerd's config to the bytes it had before boot applied the handlers. On a live node
/// (`--root /`) containerd is restarted when the effective config changed; under another root never.
pub fn revert(ledger: &mut Ledger, config: Option<&NodedConfig>) -> Result<bool, String> {
    let Some(applied) = ledger.manifest.containerd_applied.clone() else {
        return Ok(false);
    };
    // Without a readable noded.toml: its defaults (data dir /var/lib/noded, restart auto).
    let mut config = match config {
        Some(c) => c.clone(),
        None => {
            NodedConfig::parse(Path::new("<noded.toml defaults>"), "").map_err(|e| e.to_string())?
        }
    };
    // The file boot applied to, whatever noded.toml says now.
    config.containerd.config = applied;
    // On a live node the runtime reloads the reverted config; under another root it is not running.
    let may_restart = ledger.root.is_host();
    let report = runtime()?
        .block_on(configurator(ledger, &config, may_restart, false)?.revert())
        .map_err(|e| e.to_string())?;
    ledger.manifest.containerd_applied = None;
    ledger.save().map_err(|e| e.to_string())?;
    Ok(report.changed)
}
