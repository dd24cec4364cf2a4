//! The target filesystem: `/` on a node or in a Packer build, a temp tree in tests. Every path the
//! installer writes is a node path ("/etc/noded/noded.toml") rebased onto the root here.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct IoError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl IoError {
    pub fn at(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self {
            path: path.to_path_buf(),
            source,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Root(PathBuf);

impl Root {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self(dir.into())
    }

    pub fn is_host(&self) -> bool {
        self.0 == Path::new("/")
    }

    /// `/etc/x` -> `<root>/etc/x`. Node paths are absolute and never contain `..`.
    pub fn path(&self, node_path: impl AsRef<Path>) -> PathBuf {
        let rel: PathBuf = node_path
            .as_ref()
            .components()
            .filter(|c| matches!(c, Component::Normal(_)))
            .collect();
        self.0.join(rel)
    }
}

pub fn sha256_file(path: &Path) -> Result<String, IoError> {
    let mut f = std::fs::File::open(path).map_err(IoError::at(path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(IoError::at(path))?;
    Ok(hex::encode(h.finalize()))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The temp name [`write_atomic`] uses beside `path`: fixed, so a run killed between writing and
/// renaming leaves a name the next run knows and removes (a random name would leak forever).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.installer-new"))
}

/// temp file beside the target + fsync + rename + fsync of the directory: a crash (or kill -9)
/// leaves the old file or the new one, never a mix, and the rename itself is durable.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IoError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = path.parent().unwrap_or(Path::new("/"));
    let tmp = temp_path(path);
    remove_if_exists(&tmp)?;
    // O_EXCL|O_NOFOLLOW: never write through something planted under the temp name.
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(&tmp)
        .map_err(IoError::at(&tmp))?;
    f.write_all(bytes).map_err(IoError::at(&tmp))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(IoError::at(&tmp))?;
    f.sync_all().map_err(IoError::at(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(IoError::at(path))?;
    fsync_dir(dir)
}

/// Makes renames/creations/removals inside `dir` durable.
pub fn fsync_dir(dir: &Path) -> Result<(), IoError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(IoError::at(dir))
}

pub fn remove_if_exists(path: &Path) -> Result<bool, IoError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(IoError::at(path)(e)),
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path)
            .map(|()| true)
            .map_err(IoError::at(path)),
        Ok(_) => std::fs::remove_file(path)
            .map(|()| true)
            .map_err(IoError::at(path)),
    }
}
