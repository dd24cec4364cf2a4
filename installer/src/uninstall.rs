//! `installer uninstall`: removes exactly what bake and boot wrote, restores what was there before,
//! and reverts containerd's config to its original bytes through noded's library.

use std::path::{Component, Path, PathBuf};

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
    #[error("{0}; --purge refused, nothing removed")]
    UnsafePurge(String),
    /// `--kata-root` names no side-by-side release of this root's installer.
    #[error(
        "--kata-root {0}: not a release `installer bake --kata-root` installed; nothing removed"
    )]
    NotARelease(PathBuf),
    /// `--kata-root`: noded.toml still has handlers that run from it.
    #[error(
        "--kata-root {root}: {config} still uses it ({handlers}); bake without those [[handlers]] first; nothing removed"
    )]
    ReleaseInUse {
        root: PathBuf,
        config: PathBuf,
        handlers: String,
    },
}

impl noded::exit::ExitStatus for UninstallError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::UnsafePurge(_) | Self::NotARelease(_) | Self::ReleaseInUse { .. } => {
                noded::exit::BAD_INPUT
            }
            _ => noded::exit::RUNTIME_FAILURE,
        }
    }
}

/// What `--purge` may remove: noded's own state directories at their fixed places, rebased onto the
/// root, each a real directory reached without a symlink. A noded.toml pointing `data_dir` or
/// `run_dir` anywhere else (`/`, `/etc`, a parent of the root's system dirs) is refused as a whole,
/// before anything is removed.
fn purge_targets(root: &Root, config: &NodedConfig) -> Result<Vec<PathBuf>, UninstallError> {
    let own = noded::config::DaemonSection::default();
    let file = root.path(assets::NODED_TOML);
    let refuse = |msg: String| UninstallError::UnsafePurge(format!("{}: {msg}", file.display()));
    let mut out = Vec::new();
    for (field, dir, allowed) in [
        ("daemon.data_dir", &config.daemon.data_dir, &own.data_dir),
        ("daemon.run_dir", &config.daemon.run_dir, &own.run_dir),
    ] {
        // Compared as written: `..`, `.` or a trailing trick never makes a path equal to ours.
        let lexically_ours = dir
            .components()
            .all(|c| matches!(c, Component::RootDir | Component::Normal(_)))
            && dir == allowed;
        if !lexically_ours {
            return Err(refuse(format!(
                "{field} = {:?} is not noded's own directory (purge removes only {} and {})",
                dir.display().to_string(),
                own.data_dir.display(),
                own.run_dir.display()
            )));
        }
        if let Some(real) = real_dir_under(root, dir).map_err(refuse)? {
            out.push(real);
        }
    }
    Ok(out)
}

/// `node_path` under the root, walked one component at a time with lstat: None when it does not
/// exist, an error when any component is a symlink or the end is not a directory.
fn real_dir_under(root: &Root, node_path: &Path) -> Result<Option<PathBuf>, String> {
    let base = root.path("/");
    let mut p = std::fs::canonicalize(&base).map_err(|e| format!("{}: {e}", base.display()))?;
    for c in node_path.components() {
        let Component::Normal(name) = c else {
            continue;
        };
        p.push(name);
        match std::fs::symlink_metadata(&p) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", p.display())),
            Ok(m) if m.file_type().is_symlink() => {
                return Err(format!("{} is a symlink", p.display()));
            }
            Ok(m) if !m.is_dir() => return Err(format!("{} is not a directory", p.display())),
            Ok(_) => {}
        }
    }
    Ok(Some(p))
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
    let purge_dirs = match (&config, purge) {
        (Some(c), true) => purge_targets(root, c)?,
        _ => Vec::new(),
    };
    // containerd first: if its revert fails, Kata (which its config points at) must stay.
    let containerd_reverted = crate::containerd_step::revert(&mut ledger, config.as_ref())
        .map_err(UninstallError::Containerd)?;

    let mut warnings = Vec::new();
    // Kata's factory templates are tmpfs Kata mounted: unmounted through Kata (with the handler's
    // configuration, so before noded's copies go) before the trees go.
    if let Some(c) = &config {
        for t in c.warm_targets() {
            if !root.path(&t.template_path).join("state").exists() {
                continue;
            }
            let layout = KataLayout::new(root.path(&t.kata_root));
            match KataFactory::new(layout, root.path(&t.config), &root.path(&c.daemon.data_dir))
                .and_then(|f| f.destroy())
            {
                Ok(()) => {}
                Err(e) => warnings.push(format!("Kata factory template of {}: {e}", t.name)),
            }
        }
    }
    // [[handlers]] drop-ins and configuration copies noded wrote, before the Kata tree goes; a file
    // someone changed since is left and reported.
    if let Some(c) = &config {
        let state = root
            .path(&c.daemon.data_dir)
            .join(noded::kata::handlers::STATE_FILE);
        match noded::kata::handlers::revert(&state) {
            Ok(o) => warnings.extend(
                o.kept_modified
                    .iter()
                    .map(|p| format!("{}: changed since noded wrote it; left", p.display())),
            ),
            Err(e) => warnings.push(format!("Kata handler drop-ins: {e}")),
        }
    }

    let removed_entries = ledger.manifest.entries.len();
    let problems = ledger.remove(None);
    let mut purged = Vec::new();
    for real in purge_dirs {
        match remove_if_exists(&real) {
            Ok(true) => purged.push(real),
            Ok(false) => {}
            Err(e) => warnings.push(e.to_string()),
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

/// `uninstall --kata-root DIR`: removes the side-by-side release at DIR and nothing else (the main
/// install, other releases, containerd's config stay). Refused while noded.toml's `[[handlers]]`
/// still run from it: their containerd entries would name a shim that is gone.
pub fn uninstall_release(root: &Root, kata_root: &Path) -> Result<UninstallReport, UninstallError> {
    let mut ledger = Ledger::open(root)?;
    if kata_root == Path::new(assets::KATA_ROOT)
        || !ledger.manifest.releases.iter().any(|r| r.root == kata_root)
    {
        return Err(UninstallError::NotARelease(kata_root.to_path_buf()));
    }
    let config_path = root.path(assets::NODED_TOML);
    if let Ok(config) = NodedConfig::load(&config_path) {
        let users: Vec<String> = config
            .handlers
            .iter()
            .filter(|h| h.kata_root(&config.containerd.kata_root) == kata_root)
            .map(|h| h.name.clone())
            .collect();
        if !users.is_empty() {
            return Err(UninstallError::ReleaseInUse {
                root: kata_root.to_path_buf(),
                config: config_path,
                handlers: users.join(", "),
            });
        }
    }
    let problems = ledger.forget_release(kata_root);
    if !problems.is_empty() {
        return Err(UninstallError::Incomplete(problems.join("; ")));
    }
    Ok(UninstallReport {
        installed: true,
        containerd_reverted: false,
        removed_entries: 1,
        purged: Vec::new(),
        warnings: Vec::new(),
    })
}
