//! What noded wrote, per containerd config file: the handlers it owns, a backup of the original bytes
//! and the hashes of its own writes. Lives in noded's data dir, never in containerd's.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::atomic::{WriteError, remove_durable, write_atomic};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: cannot read noded's ownership record: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: corrupt ownership record ({message}); move it away to let noded start over")]
    Corrupt { path: PathBuf, message: String },
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// One config file noded changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileRecord {
    /// Whether the file existed before noded first wrote it (revert deletes it otherwise).
    pub original_existed: bool,
    pub original_sha256: String,
    /// Where the original bytes are kept.
    pub backup: PathBuf,
    /// Hashes of the bytes noded wrote (the latest last). A file whose hash is not here was changed by
    /// someone else since (nodeadm regenerates config.toml at boot): its bytes become the new original.
    pub written_sha256: Vec<String>,
    /// Handler tables noded owns in this file.
    pub handlers: Vec<String>,
    /// The whole file is noded's (a drop-in): revert deletes it.
    #[serde(default)]
    pub whole_file: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct State {
    pub files: BTreeMap<PathBuf, FileRecord>,
}

/// The ownership record on disk, under `<state_dir>/containerd/`.
#[derive(Debug, Clone)]
pub struct StateStore {
    dir: PathBuf,
}

impl StateStore {
    pub fn new(state_dir: &Path) -> Self {
        Self {
            dir: state_dir.join("ownership"),
        }
    }

    fn file(&self) -> PathBuf {
        self.dir.join("ownership.json")
    }

    pub fn load(&self) -> Result<State, StateError> {
        let path = self.file();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(source) => Err(StateError::Read { path, source }),
        }
    }

    pub fn save(&self, state: &State) -> Result<(), StateError> {
        let bytes = serde_json::to_vec_pretty(state).map_err(|e| StateError::Corrupt {
            path: self.file(),
            message: e.to_string(),
        })?;
        write_atomic(&self.file(), &bytes, 0o600)?;
        Ok(())
    }

    /// Where the detected containerd version is remembered.
    pub fn version_cache(&self) -> PathBuf {
        self.dir.join("containerd-version.json")
    }

    /// Backup location of a config file's original bytes.
    pub fn backup_path(&self, config: &Path) -> PathBuf {
        let name = config
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tag = &crate::fsutil::sha256_bytes(config.as_os_str().as_encoded_bytes())[..12];
        self.dir.join("backup").join(format!("{name}.{tag}.orig"))
    }

    pub fn write_backup(&self, config: &Path, bytes: &[u8]) -> Result<PathBuf, StateError> {
        let p = self.backup_path(config);
        write_atomic(&p, bytes, 0o600)?;
        Ok(p)
    }

    pub fn remove_backup(&self, record: &FileRecord) -> Result<(), StateError> {
        Ok(remove_durable(&record.backup)?)
    }
}

impl FileRecord {
    pub fn wrote(&self, sha: &str) -> bool {
        self.written_sha256.iter().any(|s| s == sha)
    }

    /// Remembers a write; the last two are enough to recognise the file after a crash mid-write.
    pub fn push_written(&mut self, sha: String) {
        if !self.wrote(&sha) {
            self.written_sha256.push(sha);
        }
        let excess = self.written_sha256.len().saturating_sub(2);
        self.written_sha256.drain(..excess);
    }
}
