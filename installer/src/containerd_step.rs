//! The containerd part of boot and uninstall, through noded's library (the same code as
//! `noded containerd apply|revert`): strategy by containerd version, ownership record, backup of the
//! original bytes, byte-identical revert.

use std::path::{Path, PathBuf};

use noded::config::NodedConfig;
use noded::containerd::apply::{self, Request};
use noded::containerd::handler::parse_handlers;
use noded::containerd::restart::Restart;
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

/// Registers the handlers of noded.toml before containerd starts (so never restarts it).
pub fn apply(ledger: &mut Ledger, config: &NodedConfig) -> Result<Applied, String> {
    let root = ledger.root.clone();
    let handlers = parse_handlers(&config.containerd.runtimes).map_err(|e| e.to_string())?;
    let state_dir = root.path(&config.daemon.data_dir);
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
    let req = Request {
        config: root.path(&config.containerd.config),
        handlers,
        kata_root: root.path(&config.containerd.kata_root),
        state_dir,
        // With the nodeadm drop-in, nodeadm itself renders identical handler tables into
        // config.toml; noded takes those over instead of reporting them as foreign.
        adopt: ledger.entry(Path::new(assets::NODEADM_DROPIN)).is_some(),
        containerd_version: None,
        containerd_binary: binary(ledger),
        socket: None,
    };
    // Recorded before the apply (intent first): a boot killed mid-apply is still reverted by
    // uninstall; reverting a config noded never touched is a no-op.
    ledger.manifest.containerd_applied = Some(config.containerd.config.clone());
    ledger.save().map_err(|e| e.to_string())?;
    let report = runtime()?
        .block_on(apply::apply(&req, &Restart::Never))
        .map_err(|e| e.to_string())?;
    Ok(Applied {
        config: req.config,
        changed: report.changed,
        handlers: report.handlers,
        strategy: serde_json::to_value(report.strategy)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned)),
        files: report.files,
    })
}

/// Restores containerd's config to the bytes it had before boot applied the handlers. On a live node
/// (`--root /`) containerd is restarted when the effective config changed; under another root never.
pub fn revert(ledger: &mut Ledger, config: Option<&NodedConfig>) -> Result<bool, String> {
    let Some(applied) = ledger.manifest.containerd_applied.clone() else {
        return Ok(false);
    };
    let data_dir = config.map_or_else(
        || PathBuf::from("/var/lib/noded"),
        |c| c.daemon.data_dir.clone(),
    );
    let restart = if ledger.root.is_host() {
        config
            .and_then(|c| c.containerd.restart.parse::<Restart>().ok())
            .unwrap_or_else(Restart::auto)
    } else {
        Restart::Never
    };
    let report = runtime()?
        .block_on(apply::revert(
            &ledger.root.path(&applied),
            &ledger.root.path(&data_dir),
            &restart,
            None,
            &binary(ledger),
        ))
        .map_err(|e| e.to_string())?;
    ledger.manifest.containerd_applied = None;
    ledger.save().map_err(|e| e.to_string())?;
    Ok(report.changed)
}
