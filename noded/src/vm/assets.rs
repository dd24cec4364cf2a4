//! Guest assets: a Debian kernel and a busybox-static initramfs, both taken from Debian packages with
//! `apt-get download` + `dpkg -x` (nothing is fetched any other way) and cached under
//! `<data_dir>/guest/`, keyed by the hashes of their inputs.
//!
//! Which kernel: Debian's generic `linux-image-amd64` flavour, booted as an uncompressed `vmlinux`
//! through PVH on `-M q35`. The cloud flavour boots a little faster but has no `CONFIG_VMGENID`, and
//! without vmgenid every clone of a template would produce the same `/dev/urandom` bytes until the
//! kernel's next reseed (DESIGN §6). q35 is also Kata's own machine type, so what we measure is what
//! Kata's factory gets. The generic bzImage is xz-compressed (the slow part of its cold boot); the
//! payload is extracted once here, which leaves cold boot at ~3–4 s under TCG.
//!
//! The initramfs `/init` mounts proc/sys/dev and answers line requests on the serial console (see
//! [`crate::vm::guest`]); its counter lives in guest RAM, so a clone's answers continue the
//! template's count instead of restarting — which is how a restored clone is told from a cold boot.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// Meta package whose dependency names the current kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-amd64";
pub const BUSYBOX_PACKAGE: &str = "busybox-static";

/// The guest's `/init`. Changing it changes the initrd hash, which rebuilds every template.
pub const INIT_SCRIPT: &str = r#"#!/bin/sh
# noded guest init: answers one request per line on ttyS0. The counter lives in guest RAM, so a
# template clone continues the template's count; a cold boot starts again at 1.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
stty -F /dev/ttyS0 raw -echo
n=0
while true; do
  while read -r cmd arg; do
    n=$((n+1))
    case "$cmd" in
      ping) echo "pong $arg $n";;
      rand) echo "rand $arg $n $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')";;
      clock) hwclock -s -u; echo "clock $arg $n $(date +%s)";;
      *) echo "err $arg $n";;
    esac
  done < /dev/ttyS0 > /dev/ttyS0
done
"#;

#[derive(Debug, thiserror::Error)]
pub enum AssetsError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "`{command}` failed: {detail} (guest assets come from Debian packages; check apt sources and network, run as root)"
    )]
    Command { command: String, detail: String },
    #[error("apt metadata for {package}: {detail}")]
    Metadata { package: String, detail: String },
    #[error("{path}: not a usable kernel: {detail}")]
    Kernel { path: PathBuf, detail: String },
    #[error("downloaded {file}: sha256 {actual} does not match apt's {expected}")]
    Checksum {
        file: PathBuf,
        expected: String,
        actual: String,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AssetsError + '_ {
    move |source| AssetsError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A kernel + initrd ready to boot, with their hashes (part of every template's fingerprint).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct GuestAssets {
    pub kernel: PathBuf,
    pub kernel_sha256: String,
    pub kernel_package: String,
    pub initrd: PathBuf,
    pub initrd_sha256: String,
}

/// A Debian package as apt's metadata describes it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct AptPackage {
    name: String,
    version: String,
    sha256: String,
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn run(cmd: &mut Command) -> Result<String, AssetsError> {
    let shown = format!("{cmd:?}");
    let out = cmd.output().map_err(|e| AssetsError::Command {
        command: shown.clone(),
        detail: e.to_string(),
    })?;
    if !out.status.success() {
        return Err(AssetsError::Command {
            command: shown,
            detail: format!(
                "{}: {}",
                out.status,
                crate::config::one_line(&String::from_utf8_lossy(&out.stderr))
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn apt_show(package: &str) -> Result<Vec<(String, String)>, AssetsError> {
    let text = run(Command::new("apt-cache").args(["show", "--no-all-versions", package]))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.trim().to_string()))
        .collect())
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

fn resolve(package: &str) -> Result<AptPackage, AssetsError> {
    let fields = apt_show(package)?;
    let meta = |detail: &str| AssetsError::Metadata {
        package: package.into(),
        detail: detail.into(),
    };
    Ok(AptPackage {
        name: field(&fields, "Package")
            .ok_or_else(|| meta("no Package field"))?
            .into(),
        version: field(&fields, "Version")
            .ok_or_else(|| meta("no Version field"))?
            .into(),
        sha256: field(&fields, "SHA256")
            .ok_or_else(|| meta("no SHA256 field"))?
            .into(),
    })
}

/// What apt resolved, remembered until apt's package lists change (`apt-cache` takes seconds).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Resolved {
    lists_stamp: String,
    kernel: AptPackage,
    busybox: AptPackage,
}

fn lists_stamp() -> String {
    ["/var/lib/apt/lists", "/var/cache/apt/pkgcache.bin"]
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_nanos().to_string())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("/")
}

fn resolve_all(cache: &Path) -> Result<Resolved, AssetsError> {
    let path = cache.join("resolved.json");
    let stamp = format!(
        "{}|{}",
        lists_stamp(),
        std::env::var("NODED_GUEST_KERNEL_PACKAGE").unwrap_or_default()
    );
    if let Ok(r) = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<Resolved>(&b).map_err(|e| e.to_string()))
        && r.lists_stamp == stamp
    {
        return Ok(r);
    }
    let r = Resolved {
        lists_stamp: stamp,
        kernel: resolve_kernel()?,
        busybox: resolve(BUSYBOX_PACKAGE)?,
    };
    let _ = std::fs::write(&path, serde_json::to_vec(&r).unwrap_or_default());
    Ok(r)
}

/// The concrete kernel package the meta package currently points to.
fn resolve_kernel() -> Result<AptPackage, AssetsError> {
    if let Ok(name) = std::env::var("NODED_GUEST_KERNEL_PACKAGE") {
        return resolve(&name);
    }
    let fields = apt_show(KERNEL_META_PACKAGE)?;
    let depends = field(&fields, "Depends").ok_or_else(|| AssetsError::Metadata {
        package: KERNEL_META_PACKAGE.into(),
        detail: "no Depends field".into(),
    })?;
    let target = depends
        .split([',', ' ', '('])
        .find(|t| t.starts_with("linux-image-"))
        .ok_or_else(|| AssetsError::Metadata {
            package: KERNEL_META_PACKAGE.into(),
            detail: format!("Depends `{depends}` names no linux-image package"),
        })?;
    resolve(target)
}

/// `apt-get download` into `dir`, verified against apt's sha256, then `dpkg -x` into `dir/root`.
fn download_and_extract(pkg: &AptPackage, dir: &Path) -> Result<PathBuf, AssetsError> {
    run(Command::new("apt-get")
        .current_dir(dir)
        .args(["download", "-q"])
        .arg(format!("{}={}", pkg.name, pkg.version)))?;
    let deb = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .ok_or_else(|| AssetsError::Command {
            command: format!("apt-get download {}", pkg.name),
            detail: "no .deb file appeared".into(),
        })?;
    let actual = sha256_file(&deb).map_err(io_err(&deb))?;
    if actual != pkg.sha256 {
        return Err(AssetsError::Checksum {
            file: deb,
            expected: pkg.sha256.clone(),
            actual,
        });
    }
    let root = dir.join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root))?;
    Ok(root)
}

/// Extracts the uncompressed ELF `vmlinux` from a bzImage (boot protocol ≥ 2.08 payload fields).
fn extract_vmlinux(bzimage: &Path, out: &Path) -> Result<(), AssetsError> {
    let data = std::fs::read(bzimage).map_err(io_err(bzimage))?;
    let bad = |detail: String| AssetsError::Kernel {
        path: bzimage.to_path_buf(),
        detail,
    };
    if data.len() < 0x250 || &data[0x202..0x206] != b"HdrS" {
        return Err(bad("no bzImage setup header".into()));
    }
    let le32 = |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
    let setup_sects = match data[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512 + le32(0x248) as usize;
    let end = start + le32(0x24c) as usize;
    let payload = data
        .get(start..end)
        .ok_or_else(|| bad("payload outside the file".into()))?;
    let tool: &[&str] = if payload.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        &["xz", "-dc", "--single-stream"]
    } else if payload.starts_with(&[0x1f, 0x8b]) {
        &["gzip", "-dc"]
    } else if payload.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        &["zstd", "-dcq"]
    } else {
        return Err(bad(format!(
            "unknown payload compression {:02x?}",
            &payload[..payload.len().min(6)]
        )));
    };
    let compressed = out.with_extension("payload");
    std::fs::write(&compressed, payload).map_err(io_err(&compressed))?;
    let file = std::fs::File::open(&compressed).map_err(io_err(&compressed))?;
    let target = std::fs::File::create(out).map_err(io_err(out))?;
    let status = Command::new(tool[0])
        .args(&tool[1..])
        .stdin(file)
        .stdout(target)
        .status()
        .map_err(|e| AssetsError::Command {
            command: tool.join(" "),
            detail: e.to_string(),
        })?;
    let _ = std::fs::remove_file(&compressed);
    // xz --single-stream may still complain about the bzImage's trailing size field; the ELF check is
    // what decides.
    let mut head = [0u8; 4];
    std::fs::File::open(out)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(io_err(out))?;
    if head != *b"\x7fELF" {
        return Err(bad(format!(
            "`{}` ({status}) did not yield an ELF",
            tool[0]
        )));
    }
    Ok(())
}

/// An exclusive lock on the cache, so concurrent builders (daemon, CLI, tests) don't race.
fn lock(dir: &Path) -> Result<nix::fcntl::Flock<std::fs::File>, AssetsError> {
    let path = dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive).map_err(|(_, e)| {
        AssetsError::Io {
            path,
            source: e.into(),
        }
    })
}

fn short(sha: &str) -> &str {
    &sha[..sha.len().min(16)]
}

/// Newest complete cached directory whose name starts with `prefix` (used when apt is unreachable).
fn cached_fallback(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let mut found: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter(|e| e.path().join(".complete").exists())
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    found.sort();
    found.pop().map(|(_, p)| p)
}

/// Kernel: `<cache>/kernel-<deb sha256>/vmlinux`.
fn ensure_kernel(
    cache: &Path,
    resolved: &Result<Resolved, AssetsError>,
) -> Result<(PathBuf, String), AssetsError> {
    let pkg = match resolved {
        Ok(r) => r.kernel.clone(),
        Err(e) => {
            if let Some(dir) = cached_fallback(cache, "kernel-") {
                tracing::warn!(error = %e, cached = %dir.display(), "apt metadata unavailable; using cached guest kernel");
                let name = std::fs::read_to_string(dir.join("package")).unwrap_or_default();
                return Ok((dir.join("vmlinux"), name.trim().to_string()));
            }
            return Err(clone_err(e));
        }
    };
    let dir = cache.join(format!("kernel-{}", short(&pkg.sha256)));
    let label = format!("{}={}", pkg.name, pkg.version);
    if dir.join(".complete").exists() {
        return Ok((dir.join("vmlinux"), label));
    }
    tracing::info!(package = %label, "building guest kernel from the Debian package");
    let work = tempfile::Builder::new()
        .prefix(".kernel-build-")
        .tempdir_in(cache)
        .map_err(io_err(cache))?;
    let root = download_and_extract(&pkg, work.path())?;
    let boot = root.join("boot");
    let bzimage = std::fs::read_dir(&boot)
        .map_err(io_err(&boot))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .ok_or_else(|| AssetsError::Kernel {
            path: boot.clone(),
            detail: "no vmlinuz-* in the package".into(),
        })?;
    let out = work.path().join("out");
    std::fs::create_dir(&out).map_err(io_err(&out))?;
    extract_vmlinux(&bzimage, &out.join("vmlinux"))?;
    if let Some(config) = std::fs::read_dir(&boot)
        .map_err(io_err(&boot))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("config-"))
        })
    {
        std::fs::copy(&config, out.join("config")).map_err(io_err(&config))?;
    }
    std::fs::write(out.join("package"), &label).map_err(io_err(&out))?;
    let vmlinux = out.join("vmlinux");
    let sha = sha256_file(&vmlinux).map_err(io_err(&vmlinux))?;
    std::fs::write(out.join("vmlinux.sha256"), sha).map_err(io_err(&out))?;
    std::fs::write(out.join(".complete"), "").map_err(io_err(&out))?;
    std::fs::rename(&out, &dir).map_err(io_err(&dir))?;
    Ok((dir.join("vmlinux"), label))
}

fn clone_err(e: &AssetsError) -> AssetsError {
    AssetsError::Metadata {
        package: KERNEL_META_PACKAGE.into(),
        detail: e.to_string(),
    }
}

/// Busybox: `<cache>/busybox-<deb sha256>/busybox`.
fn ensure_busybox(
    cache: &Path,
    resolved: &Result<Resolved, AssetsError>,
) -> Result<PathBuf, AssetsError> {
    let pkg = match resolved {
        Ok(r) => r.busybox.clone(),
        Err(e) => {
            if let Some(dir) = cached_fallback(cache, "busybox-") {
                tracing::warn!(error = %e, "apt metadata unavailable; using cached busybox");
                return Ok(dir.join("busybox"));
            }
            return Err(clone_err(e));
        }
    };
    let dir = cache.join(format!("busybox-{}", short(&pkg.sha256)));
    if dir.join(".complete").exists() {
        return Ok(dir.join("busybox"));
    }
    let work = tempfile::Builder::new()
        .prefix(".busybox-build-")
        .tempdir_in(cache)
        .map_err(io_err(cache))?;
    let root = download_and_extract(&pkg, work.path())?;
    let out = work.path().join("out");
    std::fs::create_dir(&out).map_err(io_err(&out))?;
    let bin = root.join("bin/busybox");
    std::fs::copy(&bin, out.join("busybox")).map_err(io_err(&bin))?;
    std::fs::write(out.join(".complete"), "").map_err(io_err(&out))?;
    std::fs::rename(&out, &dir).map_err(io_err(&dir))?;
    Ok(dir.join("busybox"))
}

/// newc cpio writer (the format the kernel unpacks as initramfs).
struct Cpio {
    out: Vec<u8>,
    ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.ino += 1;
        let fields = [
            self.ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0,
        ];
        self.out.extend_from_slice(b"070701");
        for f in fields {
            self.out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        self.out.extend_from_slice(name.as_bytes());
        self.out.push(0);
        self.pad();
        self.out.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.out.len().is_multiple_of(4) {
            self.out.push(0);
        }
    }
}

fn build_initrd(busybox: &[u8]) -> Vec<u8> {
    const DIR: u32 = 0o040_755;
    const FILE: u32 = 0o100_755;
    const LINK: u32 = 0o120_777;
    const CHR: u32 = 0o020_600;
    let mut c = Cpio {
        out: Vec::new(),
        ino: 0,
    };
    for d in [".", "bin", "dev", "proc", "sys", "tmp", "etc"] {
        c.entry(d, DIR, (0, 0), &[]);
    }
    // The kernel opens /dev/console for init's stdio before devtmpfs is mounted.
    c.entry("dev/console", CHR, (5, 1), &[]);
    c.entry("init", FILE, (0, 0), INIT_SCRIPT.as_bytes());
    c.entry("bin/busybox", FILE, (0, 0), busybox);
    c.entry("bin/sh", LINK, (0, 0), b"busybox");
    c.entry("TRAILER!!!", 0, (0, 0), &[]);
    c.out
}

/// Builds (or reuses) the kernel and initramfs under `<data_dir>/guest`.
pub fn ensure(data_dir: &Path) -> Result<GuestAssets, AssetsError> {
    let cache = data_dir.join("guest");
    std::fs::create_dir_all(&cache).map_err(io_err(&cache))?;
    let _lock = lock(&cache)?;
    let resolved = resolve_all(&cache);
    let (kernel, kernel_package) = ensure_kernel(&cache, &resolved)?;
    let busybox_path = ensure_busybox(&cache, &resolved)?;
    let busybox = std::fs::read(&busybox_path).map_err(io_err(&busybox_path))?;
    let mut key = Sha256::new();
    key.update(b"noded-initrd-v1\0");
    key.update(INIT_SCRIPT.as_bytes());
    key.update(&busybox);
    let key = hex::encode(key.finalize());
    let initrd = cache.join(format!("initrd-{}.cpio", short(&key)));
    if !initrd.exists() {
        let tmp = cache.join(format!(".initrd-{}.tmp", std::process::id()));
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(&build_initrd(&busybox)).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &initrd).map_err(io_err(&initrd))?;
    }
    // Hashed once when the kernel was extracted; the file is noded's own cache.
    let kernel_sha256 = match std::fs::read_to_string(kernel.with_extension("sha256")) {
        Ok(s) if s.trim().len() == 64 => s.trim().to_string(),
        _ => {
            let sha = sha256_file(&kernel).map_err(io_err(&kernel))?;
            let _ = std::fs::write(kernel.with_extension("sha256"), &sha);
            sha
        }
    };
    Ok(GuestAssets {
        kernel_sha256,
        kernel,
        kernel_package,
        initrd_sha256: sha256_file(&initrd).map_err(io_err(&initrd))?,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_newc_and_aligned() {
        let img = build_initrd(b"fake");
        assert!(img.starts_with(b"070701"));
        assert_eq!(img.len() % 4, 0);
        let text = String::from_utf8_lossy(&img);
        assert!(text.contains("TRAILER!!!"));
        assert!(text.contains("pong $arg $n"));
    }
}
