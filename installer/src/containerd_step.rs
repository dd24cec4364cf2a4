//! The containerd part of boot and uninstall, through noded's library (the same code as
//! `noded containerd apply|revert`).

use std::path::PathBuf;

use noded::config::NodedConfig;
use serde::Serialize;

use crate::manifest::Ledger;

#[derive(Debug, Clone, Serialize)]
pub struct Applied {
    pub config: PathBuf,
    pub changed: bool,
    pub handlers: Vec<String>,
}

pub fn apply(ledger: &mut Ledger, config: &NodedConfig) -> Result<Applied, String> {
    // Pending noded::containerd::apply (lead); until then boot reports the target only.
    let path = ledger.root.path(&config.containerd.config);
    Ok(Applied {
        config: path,
        changed: false,
        handlers: Vec::new(),
    })
}

pub fn revert(_ledger: &mut Ledger) -> Result<bool, String> {
    Ok(false)
}
