//! The record of everything bake and boot wrote, so uninstall removes exactly that and restores what
//! was there before. Intent first: every write is announced in the manifest's intent log (saved,
//! fsync'd) before it touches the disk, and recorded as an entry after; the next run (under the
//! same root lock) finishes or undoes whatever a killed run left announced, so a kill -9 at any step
//! converges: a re-run bake succeeds, and uninstall removes exactly what was written.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use noded::fsutil::{clean_stale_temps, sha256_bytes, sha256_file};

use crate::root::{IoError, Root, fsync_dir, remove_if_exists, write_atomic};

pub const INSTALLER_DIR: &str = "/var/lib/noded/installer";
const MANIFEST: &str = "manifest.json";
const FORMAT: u32 = 1;
/// Beside the installer dir's topmost new ancestor: the dir chain is built here and renamed into
/// place with the first manifest in it (`-new`), or renamed here and then deleted (`-old`).
const INSTALLER_NEW: &str = ".noded-installer-new";
const INSTALLER_OLD: &str = ".noded-installer-old";

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
    #[error("{path}: another installer is working on this root")]
    Busy { path: PathBuf },
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
    /// Releases installed side by side in other roots (`installer bake --kata-root`), e.g. a canary
    /// at `/opt/kata-3.28` that `[[handlers]]` with `kata_root` use.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub releases: Vec<KataRecord>,
    #[serde(default)]
    pub entries: Vec<Entry>,
    /// Directories that did not exist before, in creation order (removed in reverse, if empty).
    #[serde(default)]
    pub created_dirs: Vec<PathBuf>,
    /// Set once boot applied the containerd config through noded's library.
    #[serde(default)]
    pub containerd_applied: Option<PathBuf>,
    /// The guest kernel + initrd bake pinned for noded's template pool (`--guest-assets`); their
    /// files are entries too, so uninstall removes them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<crate::guest::GuestRecord>,
    /// Writes announced but not yet recorded as entries (see [`Intent`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub intents: Vec<Intent>,
}

impl Manifest {
    /// The release installed at `node_root` (`/opt/kata` or a side-by-side root).
    pub fn release(&self, node_root: &Path) -> Option<&KataRecord> {
        self.kata
            .iter()
            .chain(&self.releases)
            .find(|k| k.root == node_root)
    }

    /// Records the release `k` installed (replacing the record of its root).
    fn set_release(&mut self, k: KataRecord) {
        if k.root == Path::new(crate::assets::KATA_ROOT) {
            self.kata = Some(k);
        } else {
            self.releases.retain(|r| r.root != k.root);
            self.releases.push(k);
        }
    }
}

/// A write about to happen. Saved before the write, removed when its entry is recorded; one left
/// over means the run died in between, and [`Ledger::open`] settles it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Intent {
    /// A file (re)written at `path`; `backup` is where the original is (or will be) copied first.
    File {
        path: PathBuf,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        backup: Option<PathBuf>,
    },
    Symlink {
        path: PathBuf,
        target: PathBuf,
    },
    /// A tree unpacked in `staging` and renamed to `path`. `staged_ino` is set (and saved) just
    /// before the rename: `path` having that inode afterwards means the rename happened.
    Tree {
        path: PathBuf,
        staging: PathBuf,
        sha256: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        staged_ino: Option<u64>,
    },
}

/// The manifest bound to a root, with the operations that keep it truthful.
#[derive(Debug)]
pub struct Ledger {
    pub root: Root,
    pub manifest: Manifest,
    /// Entries/dirs present before this run, so a failed run can undo only its own work.
    mark: (usize, usize),
    /// Whether a manifest was on disk when opened.
    pub loaded: bool,
    /// flock on the root directory, held for the whole run: what a previous run left (staging
    /// dirs, temp names, intents) is then known to be from a dead process.
    _lock: nix::fcntl::Flock<std::fs::File>,
}

impl Ledger {
    pub fn path(root: &Root) -> PathBuf {
        root.path(INSTALLER_DIR).join(MANIFEST)
    }

    /// Locks the root, settles what a killed run left behind, and loads the manifest (or an empty
    /// one when nothing was installed yet).
    pub fn open(root: &Root) -> Result<Self, ManifestError> {
        let lock = lock_root(root)?;
        sweep(root);
        let path = Self::path(root);
        let (manifest, loaded) = match std::fs::read(&path) {
            Ok(bytes) => (
                serde_json::from_slice(&bytes).map_err(|e| ManifestError::Corrupt {
                    path: path.clone(),
                    message: e.to_string(),
                })?,
                true,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (
                Manifest {
                    format: FORMAT,
                    ..Manifest::default()
                },
                false,
            ),
            Err(e) => return Err(IoError::at(&path)(e).into()),
        };
        // Beside every tree (releases outside /opt, noded's ownership dir): a killed run's staging
        // or half-removed tree ([`remove_tree`]). Under the lock, anything there is a dead run's.
        let trees = manifest
            .entries
            .iter()
            .filter(|e| e.kind == Kind::Tree)
            .map(|e| e.path.as_path())
            .chain(manifest.releases.iter().map(|r| r.root.as_path()));
        for t in trees {
            sweep_staging_beside(root, t);
        }
        let mut ledger = Self {
            root: root.clone(),
            manifest,
            mark: (0, 0),
            loaded,
            _lock: lock,
        };
        ledger.settle_intents()?;
        ledger.mark = (
            ledger.manifest.entries.len(),
            ledger.manifest.created_dirs.len(),
        );
        Ok(ledger)
    }

    pub fn exists(root: &Root) -> bool {
        Self::path(root).is_file()
    }

    pub fn save(&mut self) -> Result<(), ManifestError> {
        self.ensure_installer_dir()?;
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
        if missing.is_empty() {
            return Ok(());
        }
        missing.reverse();
        // Recorded before created: a dir the run never got to make is a harmless NotFound later.
        self.manifest.created_dirs.extend(missing.iter().cloned());
        self.save()?;
        for d in missing {
            let real = self.root.path(&d);
            match std::fs::create_dir(&real) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists && real.is_dir() => {}
                Err(e) => return Err(IoError::at(&real)(e).into()),
            }
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
        let take_backup = self.entry(node_path).is_none() && real.symlink_metadata().is_ok();
        let backup = if take_backup {
            Some(backup_path(node_path))
        } else {
            self.entry(node_path).and_then(|e| e.backup.clone())
        };
        self.announce(Intent::File {
            path: node_path.to_path_buf(),
            backup: backup.clone(),
        })?;
        if take_backup {
            self.backup(node_path)?;
        }
        write_atomic(&real, bytes, mode)?;
        self.record(Entry {
            path: node_path.to_path_buf(),
            kind: Kind::File,
            phase,
            sha256: Some(sha),
            backup,
        });
        self.settled(node_path);
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
        self.announce(Intent::Symlink {
            path: node_path.to_path_buf(),
            target: target.to_path_buf(),
        })?;
        std::os::unix::fs::symlink(target, &real).map_err(IoError::at(&real))?;
        if let Some(dir) = real.parent() {
            fsync_dir(dir)?;
        }
        self.record(Entry {
            path: node_path.to_path_buf(),
            kind: Kind::Symlink,
            phase,
            sha256: None,
            backup: None,
        });
        self.settled(node_path);
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
        let node_backup = backup_path(node_path);
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
        let fresh = self.mark == (0, 0) && !self.loaded;
        let mut problems = Vec::new();
        // Intents of this run (an error between announce and record): settle them like a crash.
        if let Err(e) = self.settle_intents() {
            problems.push(e.to_string());
        }
        while self.manifest.entries.len() > self.mark.0 {
            problems.extend(self.undo_last_entry());
        }
        problems.extend(self.remove_dirs_after(self.mark.1));
        if fresh {
            problems.extend(self.dispose_installer_dir());
        }
        problems
    }

    /// Removes the entries of one phase (or all) and then the directories that became empty.
    /// One entry at a time, saved after each: a kill -9 half-way leaves a manifest that lists
    /// exactly what is still installed. Returns problems that did not stop the removal.
    pub fn remove(&mut self, phase: Option<Phase>) -> Vec<String> {
        let mut problems = Vec::new();
        if let Err(e) = self.settle_intents() {
            problems.push(e.to_string());
        }
        let Some(phase) = phase else {
            while !self.manifest.entries.is_empty() {
                problems.extend(self.undo_last_entry());
            }
            // Dirs are removed at the very end; the installer's own chain (which holds the
            // manifest) goes last of all, in one rename.
            problems.extend(self.remove_dirs_after(0));
            problems.extend(self.dispose_installer_dir());
            return problems;
        };
        let mut i = self.manifest.entries.len();
        while i > 0 {
            i -= 1;
            if self.manifest.entries[i].phase == phase {
                let e = self.manifest.entries.remove(i);
                problems.extend(self.undo_entry(&e));
                if let Err(err) = self.save() {
                    problems.push(err.to_string());
                }
            }
        }
        problems
    }

    /// Removes one entry now (something a re-bake no longer installs), restoring what it replaced.
    pub fn forget(&mut self, node_path: &Path) -> Vec<String> {
        let Some(i) = self
            .manifest
            .entries
            .iter()
            .position(|e| e.path == node_path)
        else {
            return Vec::new();
        };
        let e = self.manifest.entries.remove(i);
        if i < self.mark.0 {
            self.mark.0 -= 1;
        }
        let mut problems = self.undo_entry(&e);
        if let Err(err) = self.save() {
            problems.push(err.to_string());
        }
        problems
    }

    /// Removes one side-by-side release (its tree and its record), nothing else.
    pub fn forget_release(&mut self, node_root: &Path) -> Vec<String> {
        self.manifest.releases.retain(|r| r.root != node_root);
        self.forget(node_root)
    }

    fn undo_last_entry(&mut self) -> Vec<String> {
        let Some(e) = self.manifest.entries.pop() else {
            return Vec::new();
        };
        let mut problems = self.undo_entry(&e);
        if let Err(err) = self.save() {
            problems.push(err.to_string());
        }
        problems
    }

    /// Removes (if empty) the dirs created after `mark`, newest first, except the installer's
    /// own chain, which is kept in front of them for [`Self::dispose_installer_dir`].
    fn remove_dirs_after(&mut self, mark: usize) -> Vec<String> {
        let mut problems = Vec::new();
        let tail = self
            .manifest
            .created_dirs
            .split_off(mark.min(self.manifest.created_dirs.len()));
        let (chain, others): (Vec<PathBuf>, Vec<PathBuf>) = tail
            .into_iter()
            .partition(|d| self.is_installer_chain(Some(d)));
        let floor = self.manifest.created_dirs.len() + chain.len();
        self.manifest.created_dirs.extend(chain);
        self.manifest.created_dirs.extend(others);
        while self.manifest.created_dirs.len() > floor {
            problems.extend(self.undo_last_dir());
        }
        problems
    }

    fn undo_last_dir(&mut self) -> Vec<String> {
        let Some(d) = self.manifest.created_dirs.pop() else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        let real = self.root.path(&d);
        match std::fs::remove_dir(&real) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => problems.push(format!("{}: left in place: {e}", real.display())),
        }
        if let Err(err) = self.save() {
            problems.push(err.to_string());
        }
        problems
    }

    /// Puts one path back as it was before the installer: the original restored from its backup
    /// by one rename (no remove first, so a kill -9 never loses it), or our file removed. A
    /// missing backup means the original is already back in place (a run killed after the rename).
    fn undo_entry(&self, e: &Entry) -> Vec<String> {
        let mut problems = Vec::new();
        let real = self.root.path(&e.path);
        if e.kind == Kind::File
            && let Some(want) = &e.sha256
            && sha256_file(&real).is_ok_and(|s| &s != want)
            && e.backup.as_ref().is_none_or(|b| self.root.path(b).exists())
        {
            problems.push(format!(
                "{}: changed since install; removed anyway",
                real.display()
            ));
        }
        match &e.backup {
            Some(b) => {
                let from = self.root.path(b);
                if from.symlink_metadata().is_ok()
                    && let Err(err) = std::fs::rename(&from, &real)
                {
                    problems.push(format!(
                        "{}: cannot restore the original from {}: {err}",
                        real.display(),
                        from.display()
                    ));
                }
            }
            None if e.kind == Kind::Tree => {
                if let Err(err) = remove_tree(&real) {
                    problems.push(err.to_string());
                }
            }
            None => {
                if let Err(err) = remove_if_exists(&real) {
                    problems.push(err.to_string());
                }
            }
        }
        if let Some(dir) = real.parent() {
            let _ = fsync_dir(dir);
        }
        problems
    }

    /// Announces a write: saved (fsync'd) before anything touches the disk.
    fn announce(&mut self, intent: Intent) -> Result<(), ManifestError> {
        self.manifest.intents.push(intent);
        self.save()
    }

    /// The write at `node_path` is recorded as an entry: its intent is done (saved by the caller).
    fn settled(&mut self, node_path: &Path) {
        self.manifest.intents.retain(|i| i.path() != node_path);
    }

    /// Announces the Kata tree install (`staging` is not created yet).
    pub fn announce_tree(
        &mut self,
        node_path: &Path,
        staging: &Path,
        sha256: &str,
    ) -> Result<(), ManifestError> {
        self.announce(Intent::Tree {
            path: node_path.to_path_buf(),
            staging: staging.to_path_buf(),
            sha256: sha256.to_owned(),
            staged_ino: None,
        })
    }

    /// Saves the inode of the verified staged tree just before it is renamed into place.
    pub fn tree_about_to_move(&mut self, node_path: &Path, ino: u64) -> Result<(), ManifestError> {
        for i in &mut self.manifest.intents {
            if let Intent::Tree {
                path, staged_ino, ..
            } = i
                && path == node_path
            {
                *staged_ino = Some(ino);
            }
        }
        self.save()
    }

    /// The tree is in place: its entry and Kata record replace the intent, in one save.
    pub fn tree_installed(&mut self, entry: Entry, kata: KataRecord) -> Result<(), ManifestError> {
        let path = entry.path.clone();
        self.record(entry);
        self.manifest.set_release(kata);
        self.settled(&path);
        self.save()
    }

    /// Finishes or undoes each intent a killed run left: a tree whose rename happened is recorded
    /// (roll forward, it was verified before the rename); anything else is put back as it was.
    fn settle_intents(&mut self) -> Result<(), ManifestError> {
        if self.manifest.intents.is_empty() {
            return Ok(());
        }
        while let Some(intent) = self.manifest.intents.pop() {
            match intent {
                Intent::File { path, backup } => {
                    let real = self.root.path(&path);
                    clean_stale_temps(&real);
                    self.manifest.entries.retain(|e| e.path != path);
                    match backup {
                        // The original was copied before being overwritten: put it back.
                        Some(b) if self.root.path(&b).symlink_metadata().is_ok() => {
                            let from = self.root.path(&b);
                            std::fs::rename(&from, &real).map_err(IoError::at(&real))?;
                        }
                        // No copy yet, so no overwrite yet: the original is untouched.
                        Some(b) => {
                            clean_stale_temps(&self.root.path(&b));
                        }
                        None => {
                            // Ours (new, or an update of our own file): removed; the re-run
                            // writes it again.
                            remove_if_exists(&real)?;
                        }
                    }
                }
                Intent::Symlink { path, target } => {
                    let real = self.root.path(&path);
                    if std::fs::read_link(&real).is_ok_and(|t| t == target)
                        && self.entry(&path).is_none()
                    {
                        remove_if_exists(&real)?;
                    }
                }
                Intent::Tree {
                    path,
                    staging,
                    sha256,
                    staged_ino,
                } => {
                    let real = self.root.path(&path);
                    let moved = staged_ino.is_some_and(|ino| {
                        std::fs::symlink_metadata(&real).is_ok_and(|m| {
                            std::os::unix::fs::MetadataExt::ino(&m) == ino && m.is_dir()
                        })
                    });
                    if moved {
                        self.record(Entry {
                            path: path.clone(),
                            kind: Kind::Tree,
                            phase: Phase::Bake,
                            sha256: Some(sha256.clone()),
                            backup: None,
                        });
                        self.manifest.set_release(KataRecord {
                            tarball_sha256: sha256,
                            version: noded::kata::KataLayout::new(&real).version(),
                            root: path,
                        });
                    }
                    // Holds the new tree (not moved) or the previous release (exchanged).
                    remove_if_exists(&self.root.path(&staging))?;
                }
            }
            self.save()?;
        }
        Ok(())
    }

    /// `d` is the installer dir or one of its ancestors (the chain that holds the manifest).
    fn is_installer_chain(&self, d: Option<&PathBuf>) -> bool {
        d.is_some_and(|d| Path::new(INSTALLER_DIR).starts_with(d))
    }

    /// Creates the installer dir and its missing ancestors all at once: built under a fixed temp
    /// name with the first manifest (which records them) inside, then renamed into place. A kill
    /// before the rename leaves only the temp name, which the next run removes.
    fn ensure_installer_dir(&mut self) -> Result<(), ManifestError> {
        let mut missing = Vec::new();
        let mut cur = Some(Path::new(INSTALLER_DIR));
        while let Some(d) = cur {
            if d == Path::new("/") || self.root.path(d).is_dir() {
                break;
            }
            missing.push(d.to_path_buf());
            cur = d.parent();
        }
        let Some(top) = missing.last().cloned() else {
            return Ok(());
        };
        missing.reverse();
        let parent = self.root.path(top.parent().unwrap_or(Path::new("/")));
        let tmp = parent.join(INSTALLER_NEW);
        remove_if_exists(&tmp)?;
        for d in &missing {
            let rel = d.strip_prefix(&top).unwrap_or(Path::new(""));
            let real = tmp.join(rel);
            std::fs::create_dir(&real).map_err(IoError::at(&real))?;
        }
        self.manifest.created_dirs.extend(missing.iter().cloned());
        let json =
            serde_json::to_vec_pretty(&self.manifest).map_err(|e| ManifestError::Corrupt {
                path: Self::path(&self.root),
                message: e.to_string(),
            })?;
        let inside = tmp
            .join(
                Path::new(INSTALLER_DIR)
                    .strip_prefix(&top)
                    .unwrap_or(Path::new("")),
            )
            .join(MANIFEST);
        write_atomic(&inside, &json, 0o600)?;
        let dest = self.root.path(&top);
        std::fs::rename(&tmp, &dest).map_err(IoError::at(&dest))?;
        fsync_dir(&parent)?;
        Ok(())
    }

    /// Removes the manifest and the installer dirs the installer created: the topmost of them
    /// that holds nothing else is renamed to a fixed temp name (one atomic step that makes the
    /// manifest disappear) and deleted; ancestors holding other things stay (reported).
    fn dispose_installer_dir(&mut self) -> Vec<String> {
        let mut problems = Vec::new();
        let installer = self.root.path(INSTALLER_DIR);
        // Backups are all restored by now; what is left in there is ours.
        if let Err(e) = remove_if_exists(&installer.join("backups")) {
            problems.push(e.to_string());
        }
        let chain: Vec<PathBuf> = self
            .manifest
            .created_dirs
            .iter()
            .filter(|d| self.is_installer_chain(Some(d)))
            .cloned()
            .collect();
        // Topmost created chain dir whose only content is the rest of the chain.
        let removable = chain
            .iter()
            .filter(|d| {
                let mut cur = d.to_path_buf();
                loop {
                    if cur == Path::new(INSTALLER_DIR) {
                        return true;
                    }
                    let Ok(list) = std::fs::read_dir(self.root.path(&cur)) else {
                        return false;
                    };
                    let names: Vec<_> =
                        list.filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
                    let Some(next) = Path::new(INSTALLER_DIR)
                        .strip_prefix(&cur)
                        .ok()
                        .and_then(|r| r.components().next())
                    else {
                        return false;
                    };
                    if names.len() != 1 || names[0] != next.as_os_str() {
                        return false;
                    }
                    cur = cur.join(next);
                }
            })
            .min_by_key(|d| d.components().count())
            .cloned();
        match removable {
            Some(top) => {
                let real = self.root.path(&top);
                let parent = real.parent().unwrap_or(Path::new("/")).to_path_buf();
                let trash = parent.join(INSTALLER_OLD);
                let r = remove_if_exists(&trash)
                    .and_then(|_| std::fs::rename(&real, &trash).map_err(IoError::at(&real)))
                    .and_then(|()| fsync_dir(&parent))
                    .and_then(|()| remove_if_exists(&trash).map(|_| ()));
                if let Err(e) = r {
                    problems.push(e.to_string());
                }
                for d in chain
                    .iter()
                    .rev()
                    .filter(|d| top.starts_with(d) && **d != top)
                {
                    let real = self.root.path(d);
                    if let Err(e) = std::fs::remove_dir(&real)
                        && e.kind() != std::io::ErrorKind::NotFound
                    {
                        problems.push(format!("{}: left in place: {e}", real.display()));
                    }
                }
            }
            None => {
                // The installer dir was there before us: only our file goes.
                if let Err(e) = remove_if_exists(&installer.join(MANIFEST)) {
                    problems.push(e.to_string());
                }
            }
        }
        self.manifest.created_dirs.retain(|d| !chain.contains(d));
        problems
    }
}

impl Intent {
    fn path(&self) -> &Path {
        match self {
            Self::File { path, .. } | Self::Symlink { path, .. } | Self::Tree { path, .. } => path,
        }
    }
}

fn backup_path(node_path: &Path) -> PathBuf {
    let name: String = node_path
        .to_string_lossy()
        .trim_start_matches('/')
        .replace('/', "__");
    Path::new(INSTALLER_DIR).join("backups").join(name)
}

/// An exclusive flock on the root directory itself: nothing is written for it, and the kernel
/// drops it when the holder dies (kill -9 included).
fn lock_root(root: &Root) -> Result<nix::fcntl::Flock<std::fs::File>, ManifestError> {
    let dir = root.path("/");
    let f = std::fs::File::open(&dir).map_err(IoError::at(&dir))?;
    match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(l),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Err(ManifestError::Busy { path: dir }),
        Err((_, e)) => Err(IoError::at(&dir)(e.into()).into()),
    }
}

/// Under the lock, these fixed temp names can only be a dead run's: the installer dir chain half
/// built or half removed, and Kata staging dirs.
/// Removes a whole tree (a Kata release) so that no kill leaves part of it under its own name: it
/// is first renamed to a staging name beside it (one atomic step, made durable), then deleted. A
/// half-deleted tree under its name would pass for the installed release with a re-run `bake` of
/// the same tarball; a staging name is swept by the next run instead.
fn remove_tree(real: &Path) -> Result<(), IoError> {
    if real.symlink_metadata().is_err() {
        return Ok(());
    }
    let Some(parent) = real.parent() else {
        return remove_if_exists(real).map(|_| ());
    };
    let doomed = parent.join(format!(
        "{}rm-{}-{}",
        crate::bake::STAGING_PREFIX,
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::rename(real, &doomed).map_err(IoError::at(real))?;
    fsync_dir(parent)?;
    remove_if_exists(&doomed).map(|_| ())
}

/// The staging dirs (`.kata-staging-*`) a killed run left beside `node_root`'s release tree.
fn sweep_staging_beside(root: &Root, node_root: &Path) {
    let parent = root.path(node_root.parent().unwrap_or(Path::new("/")));
    if let Ok(list) = std::fs::read_dir(&parent) {
        for e in list.filter_map(|e| e.ok()) {
            if e.file_name()
                .to_string_lossy()
                .starts_with(crate::bake::STAGING_PREFIX)
            {
                let _ = remove_if_exists(&e.path());
            }
        }
    }
}

fn sweep(root: &Root) {
    let mut cur = Some(Path::new(INSTALLER_DIR));
    while let Some(d) = cur {
        for name in [INSTALLER_NEW, INSTALLER_OLD] {
            let _ = remove_if_exists(&root.path(d).join(name));
        }
        cur = d.parent();
    }
    sweep_staging_beside(root, Path::new(crate::assets::KATA_ROOT));
}
