//! The one crash-safe file replacement of the workspace (noded's containerd and Kata writers and the
//! installer all use it), plus the small file helpers they share: sha256 of a file and the kernel's
//! `MemAvailable`.
//!
//! A crash (kill -9, power loss) at any point of [`write_atomic`] leaves the old bytes or the new
//! ones, never a mix, and at most a temp file whose name starts with
//! `.noded-tmp.<file name>.<pid>.`: the next write of that file (or [`clean_stale_temps`]) removes
//! it, so crashes do not leak files into directories that other programs (containerd, Kata) scan.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// Prefix of every temp file [`write_atomic`] creates.
pub const TEMP_PREFIX: &str = ".noded-tmp.";

#[derive(Debug, thiserror::Error)]
#[error("{path}: {action}: {source}")]
pub struct FsError {
    pub path: PathBuf,
    pub action: &'static str,
    pub source: std::io::Error,
}

fn ctx<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> FsError + 'a {
    move |source| FsError {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// How [`write_atomic_with`] treats what is already at the path.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// Mode of the new file; with `keep_existing` also the mode of a file that did not exist.
    pub mode: u32,
    /// Keep mode and owner of an existing file (a config file an admin owns). Off: the file gets
    /// exactly `mode` (the installer, which records and restores modes itself).
    pub keep_existing: bool,
    /// A symlink at the path is kept and the file it points at is replaced (what readers see
    /// through the link). Off: the link itself is replaced by the file.
    pub follow_symlink: bool,
    /// fsync the file and its directory. Off only for files that mean nothing after a power loss
    /// (noded's VM records under the run dir, a tmpfs): the rename alone is atomic for every
    /// process, and an fsync costs milliseconds on a disk, on AcquireVm's path.
    pub durable: bool,
}

impl WriteOptions {
    /// A file other programs may also own: symlink followed, existing mode/owner kept.
    pub fn keep(mode: u32) -> Self {
        Self {
            mode,
            keep_existing: true,
            follow_symlink: true,
            durable: true,
        }
    }

    /// Exactly these bytes with exactly this mode at exactly this path.
    pub fn exact(mode: u32) -> Self {
        Self {
            mode,
            keep_existing: false,
            follow_symlink: false,
            durable: true,
        }
    }

    /// The same write without fsync (see [`WriteOptions::durable`]).
    pub fn volatile(self) -> Self {
        Self {
            durable: false,
            ..self
        }
    }
}

/// Symlink hops followed before giving up (the kernel's own limit for path resolution).
const MAX_SYMLINK_HOPS: usize = 40;

/// The file a reader of `path` opens: symlinks at the last component followed (relative targets
/// against the link's directory). A dangling link resolves to the path it names, so a first write
/// creates the target and keeps the link.
pub fn resolve_target(path: &Path) -> Result<PathBuf, FsError> {
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

fn dir_of(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn temp_prefix(name: &str) -> String {
    format!("{TEMP_PREFIX}{name}.")
}

/// A temp file beside the target that nobody else can have prepared: the writer's pid and a random
/// suffix, and O_CREAT|O_EXCL|O_NOFOLLOW, so a planted file or symlink at the name fails the open
/// instead of being written through.
fn create_temp(dir: &Path, name: &str) -> Result<(File, PathBuf), FsError> {
    let mut last = None;
    for _ in 0..16 {
        let suffix = uuid::Uuid::new_v4().simple().to_string();
        let tmp = dir.join(format!(
            "{}{}.{}",
            temp_prefix(name),
            std::process::id(),
            &suffix[..12]
        ));
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

/// [`write_atomic_with`] for files other programs may own: a symlink at `path` is kept and its
/// target replaced; mode and owner of an existing file are kept; a new file gets `new_mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], new_mode: u32) -> Result<(), FsError> {
    write_atomic_with(path, bytes, WriteOptions::keep(new_mode))
}

/// Replaces `path` with `bytes`: temp file in the same directory (stale temps of crashed writers
/// removed first), owner/mode set on its descriptor (never by path), fsync, rename, fsync of the
/// directory. Missing parent directories are created.
pub fn write_atomic_with(path: &Path, bytes: &[u8], opts: WriteOptions) -> Result<(), FsError> {
    let target = if opts.follow_symlink {
        resolve_target(path)?
    } else {
        path.to_path_buf()
    };
    let path = target.as_path();
    let dir = dir_of(path);
    std::fs::create_dir_all(dir).map_err(ctx(dir, "create directory"))?;
    clean_temps_beside(path);
    let existing = if opts.keep_existing {
        match std::fs::symlink_metadata(path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(ctx(path, "stat")(e)),
        }
    } else {
        None
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mode = existing
        .as_ref()
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(opts.mode);
    let (mut f, tmp) = create_temp(dir, &name)?;
    let result = (|| {
        f.write_all(bytes).map_err(ctx(&tmp, "write temp file"))?;
        if let Some(m) = &existing {
            // Only root can chown; a non-root run keeps its own ownership, which is what it can do.
            // Before the chmod: chown clears setuid/setgid bits.
            let _ = std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()));
        }
        f.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(ctx(&tmp, "set mode"))?;
        if opts.durable {
            f.sync_all().map_err(ctx(&tmp, "fsync temp file"))?;
        }
        std::fs::rename(&tmp, path).map_err(ctx(path, "rename into place"))?;
        if opts.durable {
            fsync_dir(dir)?;
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Makes creations, renames and removals inside `dir` durable.
pub fn fsync_dir(dir: &Path) -> Result<(), FsError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(ctx(dir, "fsync directory"))
}

/// Removes an existing file durably. Through a symlink it removes the target [`write_atomic`]
/// created and keeps the link, as it was before.
pub fn remove_durable(path: &Path) -> Result<(), FsError> {
    let target = resolve_target(path)?;
    let path = target.as_path();
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(ctx(path, "remove")(e)),
    }
    fsync_dir(dir_of(path))
}

/// Removes temp files killed writers left next to `path` (and next to the file a symlink at `path`
/// points at, where [`write_atomic`] puts them).
pub fn clean_stale_temps(path: &Path) {
    if let Ok(target) = resolve_target(path)
        && target != path
    {
        clean_temps_beside(&target);
    }
    clean_temps_beside(path);
}

/// Whether the writer that named a temp `<prefix><pid>.<random>` is gone. A live pid is left alone:
/// it may be another process writing the same file right now (a reused pid only delays cleanup to a
/// later write). Names without a pid are from older releases, whose writers are gone.
fn writer_gone(rest: &str) -> bool {
    let Some(pid) = rest
        .split_once('.')
        .and_then(|(pid, _)| pid.parse::<i32>().ok())
    else {
        return true;
    };
    if pid <= 0 {
        return true;
    }
    // Signal 0: existence check only (EPERM means it exists under another user).
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => false,
        Err(nix::errno::Errno::ESRCH) => true,
        Err(_) => false,
    }
}

fn clean_temps_beside(path: &Path) {
    let Some(name) = path.file_name() else {
        return;
    };
    let dir = dir_of(path);
    let prefix = temp_prefix(&name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut removed = false;
    for e in entries.flatten() {
        let file_name = e.file_name();
        let file_name = file_name.to_string_lossy();
        if let Some(rest) = file_name.strip_prefix(&prefix)
            && writer_gone(rest)
            && std::fs::remove_file(e.path()).is_ok()
        {
            removed = true;
        }
    }
    if removed {
        let _ = fsync_dir(dir);
    }
}

/// sha256 of a file's content, lowercase hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = File::open(path)?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(hex::encode(h.finalize()))
}

/// sha256 of bytes, lowercase hex.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A `<Field>:   <n> kB` line of `/proc/meminfo` text, in bytes.
pub fn meminfo_field(text: &str, field: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kib.saturating_mul(1024))
    })
}

/// The kernel's `MemAvailable` in bytes, from `<proc_root>/meminfo` (`/proc`, or a fake in tests).
pub fn mem_available_bytes(proc_root: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(proc_root.join("meminfo")).ok()?;
    meminfo_field(&text, "MemAvailable")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

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
        assert_eq!(
            names(dir.path()),
            ["config.toml"],
            "no temp file left behind"
        );
    }

    #[test]
    fn exact_sets_mode_and_replaces_a_symlink() {
        let dir = tempfile::tempdir().expect("tempdir");
        let real = dir.path().join("real");
        std::fs::write(&real, b"theirs").expect("write");
        let p = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &p).expect("symlink");
        write_atomic_with(&p, b"ours", WriteOptions::exact(0o640)).expect("write");
        let m = std::fs::symlink_metadata(&p).expect("stat");
        assert!(m.is_file());
        assert_eq!(m.permissions().mode() & 0o7777, 0o640);
        assert_eq!(std::fs::read(&real).expect("read"), b"theirs");
    }

    #[test]
    fn a_dead_writers_temp_is_removed_by_the_next_write_a_live_ones_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("config.toml");
        // A pid that cannot exist (above the kernel's pid_max limit of 2^22).
        let dead = dir
            .path()
            .join(format!("{TEMP_PREFIX}config.toml.99999999.abc"));
        let legacy = dir
            .path()
            .join(format!("{TEMP_PREFIX}config.toml.0123456789abcdef"));
        let live = dir.path().join(format!(
            "{TEMP_PREFIX}config.toml.{}.abc",
            std::process::id()
        ));
        let other = dir
            .path()
            .join(format!("{TEMP_PREFIX}other.toml.99999999.abc"));
        for f in [&dead, &legacy, &live, &other] {
            std::fs::write(f, b"half").expect("write");
        }
        write_atomic(&p, b"new", 0o644).expect("write");
        assert!(!dead.exists() && !legacy.exists());
        assert!(live.exists(), "a running writer's temp is not touched");
        assert!(other.exists(), "another file's temp is not touched");
        std::fs::remove_file(&live).expect("rm");
        clean_stale_temps(&p);
        assert_eq!(
            names(dir.path()),
            [
                format!("{TEMP_PREFIX}other.toml.99999999.abc"),
                "config.toml".into()
            ]
        );
    }

    #[test]
    fn sha256_and_meminfo() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("f");
        std::fs::write(&p, b"abc").expect("write");
        assert_eq!(
            sha256_file(&p).expect("hash"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(sha256_bytes(b"abc"), sha256_file(&p).expect("hash"));
        std::fs::write(
            dir.path().join("meminfo"),
            "MemTotal:       2048 kB\nMemAvailable:   1024 kB\n",
        )
        .expect("write");
        assert_eq!(mem_available_bytes(dir.path()), Some(1024 * 1024));
        assert_eq!(meminfo_field("MemAvailableX: 5 kB\n", "MemAvailable"), None);
        assert_eq!(mem_available_bytes(&dir.path().join("nope")), None);
    }
}
