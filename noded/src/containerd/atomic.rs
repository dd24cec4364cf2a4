//! Crash-safe file replacement: a crash at any point leaves either the old or the new bytes.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Prefix of noded's temp files; leftovers of a crash are removed by [`clean_stale_temps`].
const TEMP_PREFIX: &str = ".noded-tmp.";

#[derive(Debug, thiserror::Error)]
#[error("{path}: {action}: {source}")]
pub struct WriteError {
    pub path: PathBuf,
    pub action: &'static str,
    pub source: std::io::Error,
}

fn ctx<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> WriteError + 'a {
    move |source| WriteError {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// A test-only pause point: with `NODED_TEST_PAUSE_AT=<step>` the process stops here for a long time,
/// so crash-safety tests can `kill -9` it at exactly this step. Costs one env lookup otherwise.
pub fn pause_point(step: &str) {
    if std::env::var("NODED_TEST_PAUSE_AT").as_deref() == Ok(step) {
        eprintln!("noded: paused at {step}");
        std::thread::sleep(std::time::Duration::from_secs(3600));
    }
}

/// Symlink hops followed before giving up (the kernel's own limit for path resolution).
const MAX_SYMLINK_HOPS: usize = 40;

/// The file a reader of `path` opens: symlinks at the last component followed (relative targets
/// against the link's directory), like containerd and every other reader sees it. A dangling link
/// resolves to the path it names, so a first write creates the target and keeps the link.
pub fn resolve_target(path: &Path) -> Result<PathBuf, WriteError> {
    let mut p = path.to_path_buf();
    for _ in 0..MAX_SYMLINK_HOPS {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let target = std::fs::read_link(&p).map_err(ctx(&p, "read symlink"))?;
                p = match p.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                };
            }
            Ok(_) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(p),
            Err(e) => return Err(ctx(&p, "stat")(e)),
        }
    }
    Err(ctx(path, "resolve symlink")(
        std::io::Error::from_raw_os_error(libc::ELOOP),
    ))
}

/// A temp file next to `target` that nobody else can have prepared: a random suffix, and
/// O_CREAT|O_EXCL|O_NOFOLLOW, so a planted file or symlink at the name fails the open instead of
/// being written through.
fn create_temp(dir: &Path, name: &str) -> Result<(File, PathBuf), WriteError> {
    let mut last = None;
    for _ in 0..16 {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let tmp = dir.join(format!("{TEMP_PREFIX}{name}.{}", &suffix[..16]));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
        {
            Ok(f) => return Ok((f, tmp)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some((tmp, e)),
            Err(e) => return Err(ctx(&tmp, "create temp file")(e)),
        }
    }
    let (tmp, e) =
        last.unwrap_or_else(|| (dir.to_path_buf(), std::io::Error::other("no temp name")));
    Err(ctx(&tmp, "create temp file")(e))
}

/// Replaces `path` with `bytes`: temp file in the same directory, fsync, rename, fsync the directory.
/// A symlink at `path` is kept and its target replaced (what containerd reads through the link).
/// Mode and owner of an existing file are kept, set on the temp file's descriptor (never by path);
/// a new file gets `new_mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], new_mode: u32) -> Result<(), WriteError> {
    let target = resolve_target(path)?;
    let path = target.as_path();
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(ctx(dir, "create directory"))?;
    let existing = match std::fs::symlink_metadata(path) {
        Ok(m) => Some(m),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ctx(path, "stat")(e)),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mode = existing
        .as_ref()
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(new_mode);
    let (mut f, tmp) = create_temp(dir, &name)?;
    let result = (|| {
        pause_point("temp-created");
        f.write_all(bytes).map_err(ctx(&tmp, "write temp file"))?;
        pause_point("temp-written");
        if let Some(m) = &existing {
            // Only root can chown; a non-root run keeps its own ownership, which is what it can do.
            // Before the chmod: chown clears setuid/setgid bits.
            let _ = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()));
        }
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(ctx(&tmp, "set mode"))?;
        f.sync_all().map_err(ctx(&tmp, "fsync temp file"))?;
        pause_point("temp-synced");
        std::fs::rename(&tmp, path).map_err(ctx(path, "rename into place"))?;
        pause_point("renamed");
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(ctx(dir, "fsync directory"))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Removes an existing file durably (used by revert of a file noded created). Through a symlink it
/// removes the target [`write_atomic`] created and keeps the link, as it was before.
pub fn remove_durable(path: &Path) -> Result<(), WriteError> {
    let target = resolve_target(path)?;
    let path = target.as_path();
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ctx(path, "remove")(e)),
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(ctx(dir, "fsync directory"))?;
    }
    Ok(())
}

/// Removes temp files a killed writer left next to `path`.
pub fn clean_stale_temps(path: &Path) {
    // Temps are created beside the file a symlink points at, so that is where leftovers are.
    if let Ok(target) = resolve_target(path)
        && target != path
    {
        clean_temps_beside(&target);
    }
    clean_temps_beside(path);
}

fn clean_temps_beside(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!("{TEMP_PREFIX}{}.", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().starts_with(&prefix) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_mode_and_replaces_content() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("config.toml");
        std::fs::write(&p, b"old").expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        write_atomic(&p, b"new", 0o644).expect("atomic write");
        assert_eq!(std::fs::read(&p).expect("read"), b"new");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).expect("ls").collect();
        assert_eq!(leftovers.len(), 1, "no temp file left behind");
    }

    #[test]
    fn stale_temps_are_removed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("config.toml");
        let stale = dir.path().join(format!("{TEMP_PREFIX}config.toml.999"));
        std::fs::write(&stale, b"half").expect("write");
        clean_stale_temps(&p);
        assert!(!stale.exists());
    }
}
