//! `installer bake --guest-assets DIR`: the guest kernel + initramfs of noded's own VM template pool,
//! installed into the image and pinned by sha256 in the manifest and in noded.toml, so a node never
//! downloads them (issue 11). DIR is what `noded guest-assets --out DIR` wrote on a Debian build host
//! (the AL2023 image builder has no apt): `vmlinux`, `initrd.cpio` and `guest-assets.json` with their
//! sha256.

use std::path::{Path, PathBuf};

use noded::vm::assets::{EXPORT_MANIFEST, ExportManifest};
use serde::{Deserialize, Serialize};

use crate::manifest::{Ledger, ManifestError, Phase};
use noded::fsutil::sha256_bytes;

/// Where the pinned guest lives on the node (outside `/opt/kata`, which a Kata upgrade replaces).
pub const GUEST_KERNEL: &str = "/opt/noded/guest/vmlinux";
pub const GUEST_INITRD: &str = "/opt/noded/guest/initrd.cpio";

#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}; nothing was installed")]
pub struct GuestError {
    pub path: PathBuf,
    pub message: String,
}

/// The pin as bake recorded it (manifest) and wrote it into noded.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRecord {
    pub kernel: PathBuf,
    pub kernel_sha256: String,
    pub initrd: PathBuf,
    pub initrd_sha256: String,
    /// The Debian package the kernel came from (as the build host reported it).
    #[serde(default)]
    pub kernel_package: String,
}

/// A verified `--guest-assets` directory, read into memory (a kernel is tens of MB): what is written
/// is exactly what was hashed.
pub struct GuestAssets {
    kernel: Vec<u8>,
    initrd: Vec<u8>,
    pub record: GuestRecord,
}

fn bad(path: &Path, message: impl Into<String>) -> GuestError {
    GuestError {
        path: path.to_path_buf(),
        message: message.into(),
    }
}

/// A file named by the manifest: a plain name inside `dir` (no path, no `..`), a regular file whose
/// sha256 is the manifest's.
fn read_pinned(dir: &Path, name: &str, want: &str, field: &str) -> Result<Vec<u8>, GuestError> {
    let manifest = dir.join(EXPORT_MANIFEST);
    if name.is_empty() || name.contains('/') || name == "." || name == ".." {
        return Err(bad(
            &manifest,
            format!("{field} `{name}` is not a file name in the directory"),
        ));
    }
    if want.len() != 64 || !want.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(bad(
            &manifest,
            format!("{field}_sha256 `{want}` is not 64 hexadecimal digits"),
        ));
    }
    let path = dir.join(name);
    let meta = std::fs::symlink_metadata(&path).map_err(|e| bad(&path, e.to_string()))?;
    if !meta.is_file() {
        return Err(bad(&path, "not a regular file"));
    }
    let bytes = std::fs::read(&path).map_err(|e| bad(&path, e.to_string()))?;
    let actual = sha256_bytes(&bytes);
    if !actual.eq_ignore_ascii_case(want) {
        return Err(bad(
            &path,
            format!("sha256 {actual} does not match {field}_sha256 {want} in {EXPORT_MANIFEST}"),
        ));
    }
    Ok(bytes)
}

/// Reads and verifies DIR before anything is written.
pub fn load(dir: &Path) -> Result<GuestAssets, GuestError> {
    let path = dir.join(EXPORT_MANIFEST);
    let text = std::fs::read(&path).map_err(|e| bad(&path, e.to_string()))?;
    let m: ExportManifest = serde_json::from_slice(&text)
        .map_err(|e| bad(&path, format!("not a guest-assets manifest: {e}")))?;
    if m.format != 1 {
        return Err(bad(&path, format!("unknown format {}", m.format)));
    }
    let kernel = read_pinned(dir, &m.kernel, &m.kernel_sha256, "kernel")?;
    let initrd = read_pinned(dir, &m.initrd, &m.initrd_sha256, "initrd")?;
    if !kernel.starts_with(b"\x7fELF") {
        return Err(bad(
            &dir.join(&m.kernel),
            "not an ELF vmlinux (noded boots the uncompressed kernel through PVH)",
        ));
    }
    if !initrd.starts_with(b"070701") {
        return Err(bad(&dir.join(&m.initrd), "not a newc cpio initramfs"));
    }
    Ok(GuestAssets {
        kernel,
        initrd,
        record: GuestRecord {
            kernel: PathBuf::from(GUEST_KERNEL),
            kernel_sha256: m.kernel_sha256.to_ascii_lowercase(),
            initrd: PathBuf::from(GUEST_INITRD),
            initrd_sha256: m.initrd_sha256.to_ascii_lowercase(),
            kernel_package: m.kernel_package,
        },
    })
}

/// Installs the guest files and returns the pin for noded.toml and the manifest (recorded by the
/// caller once the whole bake succeeded) with the node paths written / left unchanged.
pub fn install(
    ledger: &mut Ledger,
    assets: &GuestAssets,
) -> Result<(GuestRecord, Vec<PathBuf>, Vec<PathBuf>), ManifestError> {
    let (mut written, mut unchanged) = (Vec::new(), Vec::new());
    for (path, bytes) in [
        (GUEST_KERNEL, &assets.kernel),
        (GUEST_INITRD, &assets.initrd),
    ] {
        let p = Path::new(path);
        // Read-only: noded only reads them, and a changed file fails its pin anyway.
        if ledger.write_file(p, bytes, 0o444, Phase::Bake)? {
            written.push(p.to_path_buf());
        } else {
            unchanged.push(p.to_path_buf());
        }
    }
    Ok((assets.record.clone(), written, unchanged))
}

/// A bake without `--guest-assets` after one with: the image must not keep files no config pins.
pub fn remove_previous(ledger: &mut Ledger) {
    for p in [GUEST_KERNEL, GUEST_INITRD] {
        if ledger.entry(Path::new(p)).is_some() {
            tracing::info!(path = p, "removing the previous bake's guest asset");
            for problem in ledger.forget(Path::new(p)) {
                tracing::warn!(%problem, "removing the previous bake's guest asset");
            }
        }
    }
}
