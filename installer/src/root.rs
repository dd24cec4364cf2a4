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

/// temp file beside the target + fsync + rename: a crash leaves the old file or the new one.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IoError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("/"));
    let mut tmp = tempfile::Builder::new()
        .prefix(".installer-")
        .tempfile_in(dir)
        .map_err(IoError::at(path))?;
    tmp.write_all(bytes).map_err(IoError::at(path))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(IoError::at(path))?;
    tmp.as_file().sync_all().map_err(IoError::at(path))?;
    tmp.persist(path).map_err(|e| IoError {
        path: path.to_path_buf(),
        source: e.error,
    })?;
    Ok(())
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
