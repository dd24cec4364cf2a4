//! `installer boot`: what noded-boot.service runs on every boot, after nodeadm rendered containerd's
//! config and before containerd reads it. Must be fast and must not need the network.

use std::path::{Path, PathBuf};
use std::time::Instant;

use noded::config::NodedConfig;
use noded::kata::{KataLayout, WarmOptions, warm};
use serde::Serialize;

use crate::assets;
use crate::host::{self, Kvm};
use crate::manifest::{Ledger, ManifestError};
use crate::root::Root;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{0}: not baked (no installer manifest); run `installer bake` first")]
    NotBaked(PathBuf),
    #[error(transparent)]
    Config(#[from] noded::config::ConfigError),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Kata(#[from] noded::kata::KataError),
    #[error("containerd config: {0}")]
    Containerd(String),
}

impl noded::exit::ExitStatus for BootError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::NotBaked(_) | Self::Config(_) => noded::exit::BAD_INPUT,
            Self::Kata(e) => e.exit_code(),
            _ => noded::exit::RUNTIME_FAILURE,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BootReport {
    pub kvm: Kvm,
    pub modules_missing: Vec<String>,
    pub warm_config_changed: bool,
    /// `[[handlers]]` configuration copies and drop-ins written or removed by this boot.
    pub handler_dropins: noded::kata::handlers::DropinOutcome,
    pub containerd: crate::containerd_step::Applied,
    pub prepared_dirs: Vec<PathBuf>,
    pub warnings: Vec<String>,
    pub elapsed_ms: u128,
}

pub fn boot(root: &Root) -> Result<BootReport, BootError> {
    let started = Instant::now();
    if !Ledger::exists(root) {
        return Err(BootError::NotBaked(Ledger::path(root)));
    }
    let mut ledger = Ledger::open(root)?;
    let config = NodedConfig::load(&root.path(assets::NODED_TOML))?;
    let mut warnings = Vec::new();

    // A node without KVM still gets its containerd config: the DaemonSet's probe then keeps the
    // startup taint on and says why, which is more useful than a failed unit nobody looks at.
    let kvm = host::kvm(root);
    if kvm != Kvm::Usable {
        warnings.push(format!(
            "/dev/kvm is not usable ({kvm:?}): Kata VMs cannot start"
        ));
    }
    let modules_missing: Vec<String> = assets::MODULES
        .iter()
        .filter(|m| !host::module_loaded(root, m))
        .map(|m| (*m).to_owned())
        .collect();
    if !modules_missing.is_empty() {
        warnings.push(format!(
            "kernel modules not loaded: {} (see {})",
            modules_missing.join(", "),
            assets::MODULES_CONF
        ));
    }

    // Re-derived on the node itself: paths are then the node's, and a Kata upgrade is picked up.
    let layout = KataLayout::new(root.path(&config.containerd.kata_root));
    let warm = warm::derive(
        &layout,
        &WarmOptions {
            template_path: root.path(assets::KATA_TEMPLATE_DIR),
            ..WarmOptions::default()
        },
    )?;

    // [[handlers]] settings as noded-owned drop-ins, rewritten only when their bytes change; each
    // handler's Kata root seen under `root` like the presets'.
    let handlers: Vec<_> = config
        .handlers
        .iter()
        .cloned()
        .map(|mut h| {
            h.kata_root = Some(root.path(h.kata_root(&config.containerd.kata_root)));
            h
        })
        .collect();
    let dropins = noded::kata::handlers::apply(
        &handlers,
        &root.path(&config.containerd.kata_root),
        &root
            .path(&config.daemon.data_dir)
            .join(noded::kata::handlers::STATE_FILE),
    )?;

    let containerd =
        crate::containerd_step::apply(&mut ledger, &config).map_err(BootError::Containerd)?;

    // Volatile dirs (tmpfs /run is empty after every boot): noded's sockets and template mounts, and
    // the parent of Kata's factory template, on which `kata-runtime factory init` mounts its tmpfs.
    let mut prepared_dirs = Vec::new();
    let template_parent = Path::new(assets::KATA_TEMPLATE_DIR)
        .parent()
        .unwrap_or(Path::new("/run"));
    for dir in [config.daemon.run_dir.as_path(), template_parent] {
        if dir.is_absolute() {
            ledger.dir(dir)?;
            prepared_dirs.push(dir.to_path_buf());
        }
    }
    ledger.save()?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    Ok(BootReport {
        kvm,
        modules_missing,
        warm_config_changed: warm.changed,
        handler_dropins: dropins,
        containerd,
        prepared_dirs,
        warnings,
        elapsed_ms: started.elapsed().as_millis(),
    })
}
