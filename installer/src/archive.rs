//! The Kata release tarball, read from ONE open descriptor in ONE pass: every byte read from the
//! file goes both into sha256 and into the decompressor + tar parser, so what is unpacked is exactly
//! what was hashed (a FIFO or a file swapped between "hash" and "extract" cannot feed two different
//! streams). Entries land in a private staging directory; the caller moves the tree into place only
//! after the digest matched. Every entry is checked against a strict policy instead of trusting the
//! archive: only `opt/kata/**` regular files, directories and symlinks that stay inside the Kata
//! root, no setuid/setgid/sticky or world-writable modes, no hardlinks or special files, size caps
//! counted on the bytes actually written.

use std::cell::Cell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use sha2::{Digest, Sha256};

/// Where the release tree sits inside the archive (Kata's static tarballs are `./opt/kata/...`).
pub const KATA_PREFIX: &str = "opt/kata";

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest single file (bytes written, not header claims).
    pub max_file_bytes: u64,
    /// All files together.
    pub max_total_bytes: u64,
    pub max_entries: u64,
}

impl Default for Limits {
    /// A Kata 3.x static release unpacks to ~1.5 GiB with its largest file (a guest image) well
    /// below 1 GiB; the caps leave room for growth but stop a bomb long before a disk fills.
    fn default() -> Self {
        Self {
            max_file_bytes: 4 << 30,
            max_total_bytes: 16 << 30,
            max_entries: 200_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{path}: cannot read the Kata tarball: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: cannot read the Kata tarball: it is a {kind}, not a regular file (it could feed different bytes to each reader); nothing was installed"
    )]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error(
        "{path}: sha256 mismatch: expected {expected}, file has {actual}; nothing was installed"
    )]
    HashMismatch {
        path: PathBuf,
        expected: String,
        actual: String,
    },
    #[error(
        "{path}: not a complete tar archive (truncated or damaged?): {message}; nothing was installed"
    )]
    Damaged { path: PathBuf, message: String },
    #[error("{path}: refused entry `{entry}`: {reason}; nothing was installed")]
    Refused {
        path: PathBuf,
        entry: String,
        reason: String,
    },
    /// Our own side failed (disk full, permissions of the staging dir): not the tarball's fault.
    #[error("{path}: {source}")]
    Staging {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ArchiveError {
    pub fn is_bad_input(&self) -> bool {
        !matches!(self, Self::Staging { .. })
    }
}

/// What one verified pass produced.
#[derive(Debug)]
pub struct Extracted {
    /// `<staging>/opt/kata`, a real directory (never a symlink).
    pub kata_root: PathBuf,
    pub files: u64,
    pub bytes: u64,
}

/// Opens `path` without following a final symlink and without blocking on a FIFO, and refuses
/// anything that is not a regular file: only a regular file yields the same bytes to one reader.
pub fn open_regular(path: &Path) -> Result<File, ArchiveError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc_flags::O_NOFOLLOW | libc_flags::O_NONBLOCK)
        .open(path)
        .map_err(|source| {
            if source.raw_os_error() == Some(libc_flags::ELOOP) {
                ArchiveError::NotRegular {
                    path: path.to_path_buf(),
                    kind: "symlink",
                }
            } else {
                ArchiveError::Open {
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    let meta = file.metadata().map_err(|source| ArchiveError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    let ft = meta.file_type();
    if !ft.is_file() {
        use std::os::unix::fs::FileTypeExt;
        let kind = if ft.is_fifo() {
            "FIFO"
        } else if ft.is_char_device() {
            "character device"
        } else if ft.is_block_device() {
            "block device"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_dir() {
            "directory"
        } else {
            "special file"
        };
        return Err(ArchiveError::NotRegular {
            path: path.to_path_buf(),
            kind,
        });
    }
    // O_NONBLOCK was only for the open of a FIFO; regular-file reads ignore it, but clear it anyway.
    nix::fcntl::fcntl(
        &file,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    )
    .map_err(|e| ArchiveError::Open {
        path: path.to_path_buf(),
        source: e.into(),
    })?;
    Ok(file)
}

mod libc_flags {
    pub const O_NOFOLLOW: i32 = nix::fcntl::OFlag::O_NOFOLLOW.bits();
    pub const O_NONBLOCK: i32 = nix::fcntl::OFlag::O_NONBLOCK.bits();
    pub const ELOOP: i32 = nix::errno::Errno::ELOOP as i32;
}

/// Every byte read from the file, exactly once, goes through the hasher.
struct Hashing<'a> {
    file: &'a File,
    hasher: &'a mut Sha256,
}

impl Read for Hashing<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (&*self.file).read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// Caps the decompressed stream as a whole (headers, PAX records and padding included): the tar
/// parser buffers PAX/long-name records in memory, so file-size caps alone do not bound it.
struct Capped<'a, R> {
    inner: R,
    left: u64,
    exceeded: &'a Cell<bool>,
}

impl<R: Read> Read for Capped<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            // One probe byte tells a stream that ends exactly at the cap from one that goes on.
            let mut probe = [0u8; 1];
            return match self.inner.read(&mut probe)? {
                0 => Ok(0),
                _ => {
                    self.exceeded.set(true);
                    Err(std::io::Error::other("decompressed size cap exceeded"))
                }
            };
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.left -= n as u64;
        Ok(n)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Dir(u32),
    File,
    Symlink,
}

/// Hashes and unpacks `tarball` into `staging` (an empty, private directory the caller created) in
/// one pass. On any error the caller removes `staging`; nothing outside it is written here.
/// `file` comes from [`open_regular`]; `tarball` only names it in messages.
pub fn extract_verified(
    tarball: &Path,
    file: &File,
    expected_sha256: &str,
    staging: &Path,
    limits: &Limits,
) -> Result<Extracted, ArchiveError> {
    let mut hasher = Sha256::new();
    let exceeded = Cell::new(false);
    let result = {
        let reader = BufReader::with_capacity(
            1 << 16,
            Hashing {
                file,
                hasher: &mut hasher,
            },
        );
        unpack(tarball, reader, staging, limits, &exceeded)
    };
    // Whatever the parser left unread (trailing bytes, or everything after a refused entry) is
    // hashed too, so the digest always covers the whole file: a wrong file is reported as such
    // before anything about its contents.
    let drained = std::io::copy(&mut &*file, &mut hasher).map_err(|source| ArchiveError::Open {
        path: tarball.to_path_buf(),
        source,
    });
    let actual = hex::encode(hasher.finalize());
    if actual != expected_sha256 {
        return Err(ArchiveError::HashMismatch {
            path: tarball.to_path_buf(),
            expected: expected_sha256.to_owned(),
            actual,
        });
    }
    drained?;
    let (files, bytes, dirs) = result?;
    // Directory modes last: a read-only directory would otherwise block its own entries.
    let mut dirs: Vec<(PathBuf, u32)> = dirs;
    dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
    for (rel, mode) in dirs {
        let real = staging.join(&rel);
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(mode)).map_err(
            |source| ArchiveError::Staging {
                path: real.clone(),
                source,
            },
        )?;
    }
    let kata_root = staging.join(KATA_PREFIX);
    match std::fs::symlink_metadata(&kata_root) {
        Ok(m) if m.is_dir() => {}
        _ => {
            return Err(ArchiveError::Refused {
                path: tarball.to_path_buf(),
                entry: KATA_PREFIX.into(),
                reason: "the archive has no opt/kata directory".into(),
            });
        }
    }
    Ok(Extracted {
        kata_root,
        files,
        bytes,
    })
}

type Unpacked = (u64, u64, Vec<(PathBuf, u32)>);

fn unpack<R: BufRead>(
    tarball: &Path,
    mut reader: R,
    staging: &Path,
    limits: &Limits,
    exceeded: &Cell<bool>,
) -> Result<Unpacked, ArchiveError> {
    let damaged = |message: String| ArchiveError::Damaged {
        path: tarball.to_path_buf(),
        message,
    };
    let magic = reader.fill_buf().map_err(|e| damaged(e.to_string()))?;
    let decoded: Box<dyn Read + '_> = if magic.starts_with(&[0x1f, 0x8b]) {
        Box::new(flate2::bufread::MultiGzDecoder::new(reader))
    } else if magic.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Box::new(lzma_rust2::XzReader::new(reader, true))
    } else if magic.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Box::new(
            ruzstd::decoding::StreamingDecoder::new(reader)
                .map_err(|e| damaged(format!("zstd: {e}")))?,
        )
    } else {
        Box::new(reader)
    };
    // Headers and padding on top of the file bytes: 1 KiB per entry is generous for ustar + PAX.
    let stream_cap = limits
        .max_total_bytes
        .saturating_add(limits.max_entries.saturating_mul(1024));
    let mut archive = tar::Archive::new(Capped {
        inner: decoded,
        left: stream_cap,
        exceeded,
    });
    let bomb = || ArchiveError::Refused {
        path: tarball.to_path_buf(),
        entry: "(archive)".into(),
        reason: format!(
            "the archive decompresses to more than {} bytes (cap)",
            limits.max_total_bytes
        ),
    };
    let io_err = |e: std::io::Error| {
        if exceeded.get() {
            bomb()
        } else {
            damaged(e.to_string())
        }
    };
    let mut seen: HashMap<PathBuf, Seen> = HashMap::new();
    let mut count = 0u64;
    let mut files = 0u64;
    let mut total = 0u64;
    for entry in archive.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        count += 1;
        let raw = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw).into_owned();
        let refuse = |reason: String| ArchiveError::Refused {
            path: tarball.to_path_buf(),
            entry: shown.clone(),
            reason,
        };
        if count > limits.max_entries {
            return Err(refuse(format!(
                "more than {} entries (cap)",
                limits.max_entries
            )));
        }
        let rel = relative_path(&raw).map_err(|r| refuse(r.into()))?;
        let kind = entry.header().entry_type();
        if rel.as_os_str().is_empty() {
            if kind.is_dir() {
                continue;
            }
            return Err(refuse(
                "an entry for the archive root that is not a directory".into(),
            ));
        }
        let prefix = Path::new(KATA_PREFIX);
        let is_ancestor_of_root = prefix.starts_with(&rel);
        if !is_ancestor_of_root && !rel.starts_with(prefix) {
            return Err(refuse(format!("outside {KATA_PREFIX}/")));
        }
        if is_ancestor_of_root && !kind.is_dir() {
            return Err(refuse(format!(
                "must be a directory, the archive has a {}",
                kind_name(kind)
            )));
        }
        // Every parent must be a directory this archive created (never a symlink it planted).
        let mut parents: Vec<&Path> = rel.ancestors().skip(1).collect();
        parents.retain(|p| !p.as_os_str().is_empty());
        for parent in parents.into_iter().rev() {
            match seen.get(parent) {
                Some(Seen::Dir(_)) => {}
                Some(Seen::Symlink) => {
                    return Err(refuse(format!(
                        "its parent `{}` is a symlink",
                        parent.display()
                    )));
                }
                Some(Seen::File) => {
                    return Err(refuse(format!(
                        "its parent `{}` is not a directory",
                        parent.display()
                    )));
                }
                None => {
                    create_dir(staging, parent)?;
                    seen.insert(parent.to_path_buf(), Seen::Dir(0o755));
                }
            }
        }
        let previous = seen.get(&rel).copied();
        if previous.is_some() && !(kind.is_dir() && matches!(previous, Some(Seen::Dir(_)))) {
            return Err(refuse("appears twice in the archive".into()));
        }
        let mode = entry.header().mode().map_err(io_err)?;
        let check_mode = |mode: u32| -> Result<(), ArchiveError> {
            if mode & 0o7000 != 0 {
                return Err(refuse(format!(
                    "setuid/setgid/sticky bit set (mode {:04o})",
                    mode & 0o7777
                )));
            }
            if mode & 0o002 != 0 {
                return Err(refuse(format!(
                    "world-writable (mode {:04o})",
                    mode & 0o7777
                )));
            }
            Ok(())
        };
        match kind {
            tar::EntryType::Directory => {
                check_mode(mode)?;
                if previous.is_none() {
                    create_dir(staging, &rel)?;
                }
                seen.insert(rel, Seen::Dir(mode & 0o777));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                check_mode(mode)?;
                let claimed = entry.header().size().map_err(io_err)?;
                if claimed > limits.max_file_bytes {
                    return Err(refuse(format!(
                        "{claimed} bytes, above the per-file cap of {}",
                        limits.max_file_bytes
                    )));
                }
                let real = staging.join(&rel);
                let staging_err = |source| ArchiveError::Staging {
                    path: real.clone(),
                    source,
                };
                let mut out = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc_flags::O_NOFOLLOW)
                    .open(&real)
                    .map_err(staging_err)?;
                let written =
                    copy_counted(&mut (&mut entry).take(limits.max_file_bytes + 1), &mut out)
                        .map_err(|e| match e {
                            CopyError::Read(e) => io_err(e),
                            CopyError::Write(e) => staging_err(e),
                        })?;
                if written > limits.max_file_bytes {
                    return Err(refuse(format!(
                        "more than the per-file cap of {} bytes",
                        limits.max_file_bytes
                    )));
                }
                total += written;
                if total > limits.max_total_bytes {
                    return Err(refuse(format!(
                        "the archive decompresses to more than {} bytes (cap)",
                        limits.max_total_bytes
                    )));
                }
                out.set_permissions(std::fs::Permissions::from_mode(mode & 0o777))
                    .map_err(staging_err)?;
                files += 1;
                seen.insert(rel, Seen::File);
            }
            tar::EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                check_symlink(&rel, &target).map_err(refuse)?;
                let real = staging.join(&rel);
                std::os::unix::fs::symlink(Path::new(OsStr::from_bytes(&target)), &real)
                    .map_err(|source| ArchiveError::Staging { path: real, source })?;
                seen.insert(rel, Seen::Symlink);
            }
            other => {
                return Err(refuse(format!("{} (not allowed)", kind_name(other))));
            }
        }
    }
    // The end-of-archive marker may come before the end of the compressed stream: read it out so a
    // damaged compressed trailer (bad CRC, cut xz index) is still noticed.
    let mut rest = archive.into_inner();
    std::io::copy(&mut rest, &mut std::io::sink()).map_err(io_err)?;
    let dirs = seen
        .into_iter()
        .filter_map(|(p, s)| match s {
            Seen::Dir(mode) => Some((p, mode)),
            _ => None,
        })
        .collect();
    Ok((files, total, dirs))
}

enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Counts what is really written (a header's size is a claim; the bytes are the fact).
fn copy_counted(from: &mut impl Read, to: &mut File) -> Result<u64, CopyError> {
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let got = match from.read(&mut buf) {
            Ok(0) => return Ok(n),
            Ok(got) => got,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        to.write_all(&buf[..got]).map_err(CopyError::Write)?;
        n += got as u64;
    }
}

fn create_dir(staging: &Path, rel: &Path) -> Result<(), ArchiveError> {
    let real = staging.join(rel);
    // 0700 while unpacking; the archive's mode is applied once every entry is in.
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&real)
        .map_err(|source| ArchiveError::Staging { path: real, source })
}

/// The archive path made relative and plain: no root, no `..`; `.` components dropped.
fn relative_path(raw: &[u8]) -> Result<PathBuf, &'static str> {
    let p = Path::new(OsStr::from_bytes(raw));
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::CurDir => {}
            Component::ParentDir => return Err("`..` in the path"),
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
        }
    }
    Ok(out)
}

/// A symlink may point only inside the Kata root: relative targets are resolved from the link's
/// directory, absolute ones must name the installed root (`/opt/kata/...`).
fn check_symlink(rel: &Path, target: &[u8]) -> Result<(), String> {
    if target.is_empty() {
        return Err("symlink with an empty target".into());
    }
    let t = Path::new(OsStr::from_bytes(target));
    let (mut resolved, rest): (Vec<std::ffi::OsString>, &Path) = if t.is_absolute() {
        (Vec::new(), t)
    } else {
        (
            rel.parent()
                .unwrap_or(Path::new(""))
                .components()
                .map(|c| c.as_os_str().to_owned())
                .collect(),
            t,
        )
    };
    let outside = || format!("symlink to `{}` points outside the Kata root", t.display());
    for c in rest.components() {
        match c {
            Component::Normal(n) => resolved.push(n.to_owned()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                resolved.pop().ok_or_else(outside)?;
            }
            Component::Prefix(_) => return Err(outside()),
        }
    }
    let resolved: PathBuf = resolved.iter().collect();
    if resolved.starts_with(KATA_PREFIX) {
        Ok(())
    } else {
        Err(outside())
    }
}

fn kind_name(kind: tar::EntryType) -> &'static str {
    match kind {
        tar::EntryType::Regular | tar::EntryType::Continuous => "regular file",
        tar::EntryType::Directory => "directory",
        tar::EntryType::Symlink => "symlink",
        tar::EntryType::Link => "hardlink",
        tar::EntryType::Char => "character device",
        tar::EntryType::Block => "block device",
        tar::EntryType::Fifo => "FIFO",
        tar::EntryType::GNUSparse => "sparse file",
        _ => "special entry",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_made_relative_or_refused() {
        assert_eq!(
            relative_path(b"./opt/kata/bin").expect("ok"),
            Path::new("opt/kata/bin")
        );
        assert!(relative_path(b"/etc/passwd").is_err());
        assert!(relative_path(b"opt/kata/../../etc").is_err());
        assert_eq!(relative_path(b"./").expect("ok"), Path::new(""));
    }

    #[test]
    fn symlinks_stay_inside_the_kata_root() {
        let link = Path::new("opt/kata/share/kata-containers/vmlinux.container");
        assert!(check_symlink(link, b"vmlinux-6.12").is_ok());
        assert!(check_symlink(link, b"../../bin/qemu").is_ok());
        assert!(check_symlink(link, b"/opt/kata/bin/qemu").is_ok());
        assert!(check_symlink(link, b"../../../../etc/shadow").is_err());
        assert!(
            check_symlink(link, b"../..").is_ok(),
            "the root itself is inside"
        );
        assert!(check_symlink(link, b"../../..").is_err(), "opt/ is not");
        assert!(check_symlink(link, b"/tmp/evil").is_err());
        assert!(check_symlink(link, b"/opt/kata/../../etc").is_err());
        assert!(check_symlink(link, b"../../../../../../../../x").is_err());
    }
}
