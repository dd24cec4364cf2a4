//! The target filesystem: `/` on a node or in a Packer build, a temp tree in tests. Every path the
//! installer writes is a node path ("/etc/noded/noded.toml") rebased onto the root here.

use std::path::{Component, Path, PathBuf};

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

impl From<noded::fsutil::FsError> for IoError {
    fn from(e: noded::fsutil::FsError) -> Self {
        Self {
            path: e.path,
            source: e.source,
        }
    }
}

/// The workspace's crash-safe replace (temp beside the target, fsync, rename, fsync of the
/// directory), with exactly `mode` and never through a symlink: the installer records what was
/// at the path and restores it itself. A killed write leaves a `.noded-tmp.<name>.` temp that
/// [`noded::fsutil::clean_stale_temps`] (or the next write) removes.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IoError> {
    noded::fsutil::write_atomic_with(path, bytes, noded::fsutil::WriteOptions::exact(mode))
        .map_err(IoError::from)
}

/// Makes renames/creations/removals inside `dir` durable.
pub fn fsync_dir(dir: &Path) -> Result<(), IoError> {
    noded::fsutil::fsync_dir(dir).map_err(IoError::from)
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
