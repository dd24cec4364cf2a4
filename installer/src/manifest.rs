//! The record of everything bake and boot wrote, so uninstall removes exactly that and restores what
//! was there before. Saved after every step: a bake that dies half-way can still be uninstalled.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::root::{IoError, Root, remove_if_exists, sha256_bytes, sha256_file, write_atomic};

pub const INSTALLER_DIR: &str = "/var/lib/noded/installer";
const MANIFEST: &str = "manifest.json";
const FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Io(#[from] IoError),
    #[error("{path}: unreadable installer manifest: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "{path} exists and was not installed by `installer bake`; move it away or uninstall it first"
    )]
    Foreign { path: PathBuf },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Bake,
    Boot,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    File,
    Symlink,
    /// A whole directory tree the installer put in place (the Kata release).
    Tree,
    /// A directory created empty (e.g. the runtime dir boot prepares).
    Dir,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// Node path, e.g. `/etc/noded/noded.toml`.
    pub path: PathBuf,
    pub kind: Kind,
    pub phase: Phase,
    /// Content hash of files (for Tree: of the tarball it came from).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Where the bytes that were there before are kept (restored on uninstall).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KataRecord {
    pub tarball_sha256: String,
    pub version: Option<String>,
    pub root: PathBuf,
}

#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    #[serde(default)]
    pub kata: Option<KataRecord>,
    #[serde(default)]
    pub entries: Vec<Entry>,
    /// Directories that did not exist before, in creation order (removed in reverse, if empty).
    #[serde(default)]
    pub created_dirs: Vec<PathBuf>,
    /// Set once boot applied the containerd config through noded's library.
    #[serde(default)]
    pub containerd_applied: Option<PathBuf>,
}

/// The manifest bound to a root, with the operations that keep it truthful.
#[derive(Debug)]
pub struct Ledger {
    pub root: Root,
    pub manifest: Manifest,
    /// Entries/dirs present before this run, so a failed run can undo only its own work.
    mark: (usize, usize),
}

impl Ledger {
    pub fn path(root: &Root) -> PathBuf {
        root.path(INSTALLER_DIR).join(MANIFEST)
    }

    /// Loads the manifest, or an empty one when nothing was installed yet. Writes nothing.
    pub fn open(root: &Root) -> Result<Self, ManifestError> {
        let path = Self::path(root);
        let manifest = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| ManifestError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Manifest {
                format: FORMAT,
                ..Manifest::default()
            },
            Err(e) => return Err(IoError::at(&path)(e).into()),
        };
        let mark = (manifest.entries.len(), manifest.created_dirs.len());
        Ok(Self {
            root: root.clone(),
            manifest,
            mark,
        })
    }

    pub fn exists(root: &Root) -> bool {
        Self::path(root).is_file()
    }

    pub fn save(&mut self) -> Result<(), ManifestError> {
        self.ensure_dir(Path::new(INSTALLER_DIR))?;
        let json =
            serde_json::to_vec_pretty(&self.manifest).map_err(|e| ManifestError::Corrupt {
                path: Self::path(&self.root),
                message: e.to_string(),
            })?;
        write_atomic(&Self::path(&self.root), &json, 0o600)?;
        Ok(())
    }

    pub fn entry(&self, node_path: &Path) -> Option<&Entry> {
        self.manifest.entries.iter().find(|e| e.path == node_path)
    }

    /// Creates `node_dir` and its missing parents, recording each one created.
    pub fn ensure_dir(&mut self, node_dir: &Path) -> Result<(), ManifestError> {
        let mut missing = Vec::new();
        let mut cur = Some(node_dir);
        while let Some(d) = cur {
            if d.as_os_str().is_empty() || d == Path::new("/") || self.root.path(d).is_dir() {
                break;
            }
            missing.push(d.to_path_buf());
            cur = d.parent();
        }
        for d in missing.into_iter().rev() {
            let real = self.root.path(&d);
            std::fs::create_dir(&real).map_err(IoError::at(&real))?;
            self.manifest.created_dirs.push(d);
        }
        Ok(())
    }

    /// Writes a file the installer owns. Idempotent: identical bytes are not rewritten. A file that
    /// was there before (not ours) is backed up first and restored on uninstall.
    pub fn write_file(
        &mut self,
        node_path: &Path,
        bytes: &[u8],
        mode: u32,
        phase: Phase,
    ) -> Result<bool, ManifestError> {
        let real = self.root.path(node_path);
        let sha = sha256_bytes(bytes);
        if let Some(e) = self.entry(node_path)
            && e.sha256.as_deref() == Some(sha.as_str())
            && sha256_file(&real).is_ok_and(|s| s == sha)
        {
            return Ok(false);
        }
        if let Some(parent) = node_path.parent() {
            self.ensure_dir(parent)?;
        }
        let backup = if self.entry(node_path).is_none() && real.symlink_metadata().is_ok() {
            Some(self.backup(node_path)?)
        } else {
            self.entry(node_path).and_then(|e| e.backup.clone())
        };
        write_atomic(&real, bytes, mode)?;
        self.record(Entry {
            path: node_path.to_path_buf(),
            kind: Kind::File,
            phase,
            sha256: Some(sha),
            backup,
        });
        self.save()?;
        Ok(true)
    }

    /// A symlink (systemd's `enable` is nothing more than these).
    pub fn symlink(
        &mut self,
        node_path: &Path,
        target: &Path,
        phase: Phase,
    ) -> Result<bool, ManifestError> {
        let real = self.root.path(node_path);
        if std::fs::read_link(&real).is_ok_and(|t| t == target) {
            if self.entry(node_path).is_none() {
                return Err(ManifestError::Foreign { path: real });
            }
            return Ok(false);
        }
        if real.symlink_metadata().is_ok() {
            return Err(ManifestError::Foreign { path: real });
        }
        if let Some(parent) = node_path.parent() {
            self.ensure_dir(parent)?;
        }
        std::os::unix::fs::symlink(target, &real).map_err(IoError::at(&real))?;
        self.record(Entry {
            path: node_path.to_path_buf(),
            kind: Kind::Symlink,
            phase,
            sha256: None,
            backup: None,
        });
        self.save()?;
        Ok(true)
    }

    /// A directory boot prepares (runtime dirs); recorded only if it did not exist.
    pub fn dir(&mut self, node_path: &Path) -> Result<bool, ManifestError> {
        let before = self.manifest.created_dirs.len();
        self.ensure_dir(node_path)?;
        let created = self.manifest.created_dirs.len() > before;
        if created {
            self.save()?;
        }
        Ok(created)
    }

    pub fn record(&mut self, entry: Entry) {
        self.manifest.entries.retain(|e| e.path != entry.path);
        self.manifest.entries.push(entry);
    }

    fn backup(&mut self, node_path: &Path) -> Result<PathBuf, ManifestError> {
        let name: String = node_path
            .to_string_lossy()
            .trim_start_matches('/')
            .replace('/', "__");
        let node_backup = Path::new(INSTALLER_DIR).join("backups").join(name);
        self.ensure_dir(node_backup.parent().unwrap_or(Path::new(INSTALLER_DIR)))?;
        let from = self.root.path(node_path);
        let to = self.root.path(&node_backup);
        // Copy, not rename: the original stays in place until the atomic replace.
        let bytes = std::fs::read(&from).map_err(IoError::at(&from))?;
        let mode = std::fs::metadata(&from)
            .map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()))
            .map_err(IoError::at(&from))?;
        write_atomic(&to, &bytes, mode & 0o7777)?;
        Ok(node_backup)
    }

    /// Undo everything this run added (a bake that failed half-way).
    pub fn rollback_run(&mut self) -> Vec<String> {
        let fresh = self.mark == (0, 0);
        let entries: Vec<Entry> = self.manifest.entries.drain(self.mark.0..).collect();
        let dirs: Vec<PathBuf> = self.manifest.created_dirs.drain(self.mark.1..).collect();
        let mut problems = self.undo(entries.iter().rev(), std::iter::empty());
        if fresh {
            let installer = self.root.path(INSTALLER_DIR);
            for f in [MANIFEST, "backups"] {
                if let Err(e) = remove_if_exists(&installer.join(f)) {
                    problems.push(e.to_string());
                }
            }
        } else if let Err(e) = self.save() {
            problems.push(e.to_string());
        }
        problems.extend(self.undo(std::iter::empty(), dirs.iter().rev()));
        problems
    }

    /// Removes the entries of one phase (or all) and then the directories that became empty.
    /// Returns problems that did not stop the removal (modified files, non-empty dirs).
    pub fn remove(&mut self, phase: Option<Phase>) -> Vec<String> {
        let (gone, keep): (Vec<Entry>, Vec<Entry>) = std::mem::take(&mut self.manifest.entries)
            .into_iter()
            .partition(|e| phase.is_none_or(|p| e.phase == p));
        self.manifest.entries = keep;
        let dirs = if phase.is_none() {
            std::mem::take(&mut self.manifest.created_dirs)
        } else {
            Vec::new()
        };
        // Dirs are removed at the very end: the manifest itself lives in one of them.
        let mut problems = self.undo(gone.iter().rev(), std::iter::empty());
        if phase.is_none() {
            let installer = self.root.path(INSTALLER_DIR);
            for f in [MANIFEST, "backups"] {
                if let Err(e) = remove_if_exists(&installer.join(f)) {
                    problems.push(e.to_string());
                }
            }
            problems.extend(self.undo(std::iter::empty(), dirs.iter().rev()));
        } else if let Err(e) = self.save() {
            problems.push(e.to_string());
        }
        problems
    }

    fn undo<'a>(
        &self,
        entries: impl Iterator<Item = &'a Entry>,
        dirs: impl Iterator<Item = &'a PathBuf>,
    ) -> Vec<String> {
        let mut problems = Vec::new();
        for e in entries {
            let real = self.root.path(&e.path);
            if e.kind == Kind::File
                && let Some(want) = &e.sha256
                && sha256_file(&real).is_ok_and(|s| &s != want)
            {
                problems.push(format!(
                    "{}: changed since install; removed anyway",
                    real.display()
                ));
            }
            if let Err(err) = remove_if_exists(&real) {
                problems.push(err.to_string());
                continue;
            }
            if let Some(b) = &e.backup {
                let from = self.root.path(b);
                if let Err(err) = std::fs::rename(&from, &real) {
                    problems.push(format!(
                        "{}: cannot restore the original from {}: {err}",
                        real.display(),
                        from.display()
                    ));
                }
            }
        }
        for d in dirs {
            let real = self.root.path(d);
            match std::fs::remove_dir(&real) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => problems.push(format!("{}: left in place: {e}", real.display())),
            }
        }
        problems
    }
}
