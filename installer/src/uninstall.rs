//! `installer uninstall`: removes exactly what bake and boot wrote, restores what was there before,
//! and reverts containerd's config to its original bytes through noded's library.

use std::path::PathBuf;

use noded::config::NodedConfig;
use noded::kata::{KataFactory, KataLayout};
use serde::Serialize;

use crate::assets;
use crate::manifest::{Ledger, ManifestError};
use crate::root::{Root, remove_if_exists};

#[derive(Debug, thiserror::Error)]
pub enum UninstallError {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("containerd config revert failed, nothing else was removed: {0}")]
    Containerd(String),
    #[error("uninstall incomplete: {0}")]
    Incomplete(String),
}

impl noded::exit::ExitStatus for UninstallError {
    fn exit_code(&self) -> u8 {
        noded::exit::RUNTIME_FAILURE
    }
}

#[derive(Debug, Serialize)]
pub struct UninstallReport {
    pub installed: bool,
    pub containerd_reverted: bool,
    pub removed_entries: usize,
    pub purged: Vec<PathBuf>,
    pub warnings: Vec<String>,
}

pub fn uninstall(root: &Root, purge: bool) -> Result<UninstallReport, UninstallError> {
    // Opening locks the root and settles what a killed bake/boot/uninstall left (its staging dirs,
    // half-written files, a half-removed installer dir), also when no manifest remains.
    let mut ledger = Ledger::open(root)?;
    if !ledger.loaded {
        return Ok(UninstallReport {
            installed: false,
            containerd_reverted: false,
            removed_entries: 0,
            purged: Vec::new(),
            warnings: Vec::new(),
        });
    }
    let config = NodedConfig::load(&root.path(assets::NODED_TOML)).ok();
    // containerd first: if its revert fails, Kata (which its config points at) must stay.
    let containerd_reverted = crate::containerd_step::revert(&mut ledger, config.as_ref())
        .map_err(UninstallError::Containerd)?;

    let mut warnings = Vec::new();
    // Kata's factory template is a tmpfs Kata mounted; unmount it through Kata before its tree goes.
    let layout = KataLayout::new(root.path(assets::KATA_ROOT));
    let template = root.path(assets::KATA_TEMPLATE_DIR);
    if template.join("state").exists()
        && let Some(c) = &config
    {
        match KataFactory::new(
            layout.clone(),
            layout.warm_config(),
            &root.path(&c.daemon.data_dir),
        )
        .and_then(|f| f.destroy())
        {
            Ok(()) => {}
            Err(e) => warnings.push(format!("Kata factory template: {e}")),
        }
    }

    let removed_entries = ledger.manifest.entries.len();
    let problems = ledger.remove(None);
    let mut purged = Vec::new();
    if purge && let Some(c) = &config {
        for dir in [&c.daemon.data_dir, &c.daemon.run_dir] {
            let real = root.path(dir);
            match remove_if_exists(&real) {
                Ok(true) => purged.push(real),
                Ok(false) => {}
                Err(e) => warnings.push(e.to_string()),
            }
        }
    }
    let (soft, hard): (Vec<String>, Vec<String>) = problems
        .into_iter()
        .partition(|p| p.contains("changed since install") || p.contains("left in place"));
    warnings.extend(soft);
    if !hard.is_empty() {
        return Err(UninstallError::Incomplete(hard.join("; ")));
    }
    Ok(UninstallReport {
        installed: true,
        containerd_reverted,
        removed_entries,
        purged,
        warnings,
    })
}
