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
//!
//! Only local mode downloads. A node uses the files `installer bake --guest-assets` pinned into its
//! image ([`verify_pinned`]); `noded guest-assets --out DIR` on a Debian build host produces them.
//! Every command run here has a deadline and can be cancelled ([`Control`]): a shutdown during a
//! download kills the command's whole process group instead of waiting for apt.

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

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
    #[error("`{command}` timed out after {after:?} and was killed (guest.command_timeout_seconds)")]
    Timeout { command: String, after: Duration },
    #[error("guest asset build cancelled (shutdown or signal); its commands were killed")]
    Cancelled,
    #[error("{path}: pinned guest {what}: {detail}; not downloading a replacement")]
    Pinned {
        what: &'static str,
        path: PathBuf,
        detail: String,
    },
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

pub use crate::fsutil::sha256_file;

/// Deadline and cancellation for the commands a build runs, and which kernel it builds from.
#[derive(Debug, Clone)]
pub struct Control {
    /// Upper bound on one command (apt-get, apt-cache, dpkg, xz).
    pub command_timeout: Duration,
    /// `guest.kernel_package`: this Debian kernel package instead of the one the meta package
    /// currently depends on.
    pub kernel_package: Option<String>,
    cancel: Arc<AtomicBool>,
}

/// Default upper bound on one command: an `apt-get download` of a kernel package on a slow mirror.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for Control {
    fn default() -> Self {
        Self::new(DEFAULT_COMMAND_TIMEOUT)
    }
}

impl Control {
    pub fn new(command_timeout: Duration) -> Self {
        Self {
            command_timeout,
            kernel_package: None,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Builds from `kernel_package` (`guest.kernel_package`) when set.
    pub fn with_kernel_package(mut self, kernel_package: Option<String>) -> Self {
        self.kernel_package = kernel_package;
        self
    }

    /// The `[guest]` settings of noded.toml: command deadline and kernel package.
    pub fn from_config(guest: &crate::config::GuestSection) -> Self {
        Self::new(Duration::from_secs(guest.command_timeout_seconds.max(1)))
            .with_kernel_package(guest.kernel_package.clone())
    }

    /// Stops the build: the running command's process group is killed within [`POLL`].
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst) || CANCEL_ALL.load(Ordering::SeqCst)
    }

    fn check(&self) -> Result<(), AssetsError> {
        if self.is_cancelled() {
            Err(AssetsError::Cancelled)
        } else {
            Ok(())
        }
    }

    /// A guard that cancels the build when dropped: held by the async caller, so dropping its future
    /// (a shutdown racing startup) stops the blocking build too.
    pub fn cancel_on_drop(&self) -> CancelOnDrop {
        CancelOnDrop(self.clone())
    }
}

pub struct CancelOnDrop(Control);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

/// How often a running command is checked for its deadline and for cancellation.
const POLL: Duration = Duration::from_millis(50);

/// Set by [`cancel_on_signals`]: every build in this process stops.
static CANCEL_ALL: AtomicBool = AtomicBool::new(false);
/// The signal [`cancel_on_signals`] took (0: none).
static SIGNALLED: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);
/// Commands running now (a signalled CLI waits for them to be killed before it exits).
static ACTIVE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// For the one-shot CLIs (`noded guest-assets`, `noded template ...`): commands run in their own
/// process group, so a Ctrl-C on the terminal no longer reaches them. SIGINT/SIGTERM are taken here
/// instead (call before any other thread starts, so all inherit the block): every running command's
/// group is killed, then the process exits 128+signal. `noded run` cancels through its own shutdown.
pub fn cancel_on_signals() {
    use nix::sys::signal::{SigSet, Signal};
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set.add(Signal::SIGTERM);
    if set.thread_block().is_err() {
        return;
    }
    std::thread::spawn(move || {
        let Ok(signal) = set.wait() else { return };
        SIGNALLED.store(signal as i32, Ordering::SeqCst);
        CANCEL_ALL.store(true, Ordering::SeqCst);
        let deadline = Instant::now() + Duration::from_secs(2);
        while ACTIVE.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
        eprintln!("noded: {signal}: stopped");
        std::process::exit(128 + signal as i32);
    });
}

/// Counts a running command for [`cancel_on_signals`].
struct Active;

impl Active {
    fn start() -> Self {
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        Self
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `program arg arg`, for messages (one line, no Debug quoting).
fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(mut p) = pipe {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = p.read_to_end(&mut buf);
            let _ = tx.send(buf);
        });
    }
    rx
}

/// Runs `cmd` in its own process group (apt-get forks its download methods) with stdin closed, and
/// waits for it under `ctl`: on the deadline or a cancel the whole group is SIGKILLed and reaped.
/// Returns stdout when `cmd` has no stdout of its own set (piped here), else empty.
fn run_bounded(
    cmd: &mut Command,
    ctl: &Control,
    capture_stdout: bool,
) -> Result<String, AssetsError> {
    ctl.check()?;
    let command = shown(cmd);
    if capture_stdout {
        cmd.stdout(Stdio::piped());
    }
    cmd.stderr(Stdio::piped()).process_group(0);
    let _active = Active::start();
    let mut child = cmd.spawn().map_err(|e| AssetsError::Command {
        command: command.clone(),
        detail: e.to_string(),
    })?;
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + ctl.command_timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {}
            Err(e) => {
                return Err(AssetsError::Command {
                    command,
                    detail: e.to_string(),
                });
            }
        }
        let stop = if ctl.is_cancelled() {
            Some(AssetsError::Cancelled)
        } else if Instant::now() >= deadline {
            Some(AssetsError::Timeout {
                command: command.clone(),
                after: ctl.command_timeout,
            })
        } else {
            None
        };
        if let Some(err) = stop {
            // The leader is not reaped yet, so its pid still names this group and nothing else.
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::killpg(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            let _ = child.wait();
            tracing::warn!(command = %command, error = %err, "guest asset command stopped");
            return Err(err);
        }
        std::thread::sleep(POLL);
    };
    let err_text = stderr
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    if !status.success() {
        return Err(AssetsError::Command {
            command,
            detail: format!(
                "{status}: {}",
                crate::config::one_line(&String::from_utf8_lossy(&err_text))
            ),
        });
    }
    let out = stdout
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_default();
    Ok(String::from_utf8_lossy(&out).into_owned())
}

fn run(cmd: &mut Command, ctl: &Control) -> Result<String, AssetsError> {
    cmd.stdin(Stdio::null());
    run_bounded(cmd, ctl, true)
}

fn apt_show(package: &str, ctl: &Control) -> Result<Vec<(String, String)>, AssetsError> {
    let text = run(
        Command::new("apt-cache").args(["show", "--no-all-versions", package]),
        ctl,
    )?;
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

fn resolve(package: &str, ctl: &Control) -> Result<AptPackage, AssetsError> {
    let fields = apt_show(package, ctl)?;
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

fn resolve_all(cache: &Path, ctl: &Control) -> Result<Resolved, AssetsError> {
    let path = cache.join("resolved.json");
    let stamp = format!(
        "{}|{}",
        lists_stamp(),
        ctl.kernel_package.as_deref().unwrap_or_default()
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
        kernel: resolve_kernel(ctl)?,
        busybox: resolve(BUSYBOX_PACKAGE, ctl)?,
    };
    let _ = std::fs::write(&path, serde_json::to_vec(&r).unwrap_or_default());
    Ok(r)
}

/// The concrete kernel package the meta package currently points to.
fn resolve_kernel(ctl: &Control) -> Result<AptPackage, AssetsError> {
    if let Some(name) = &ctl.kernel_package {
        return resolve(name, ctl);
    }
    let fields = apt_show(KERNEL_META_PACKAGE, ctl)?;
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
    resolve(target, ctl)
}

/// `apt-get download` into `dir`, verified against apt's sha256, then `dpkg -x` into `dir/root`.
fn download_and_extract(
    pkg: &AptPackage,
    dir: &Path,
    ctl: &Control,
) -> Result<PathBuf, AssetsError> {
    run(
        Command::new("apt-get")
            .current_dir(dir)
            .args(["download", "-q"])
            .arg(format!("{}={}", pkg.name, pkg.version)),
        ctl,
    )?;
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
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&root), ctl)?;
    Ok(root)
}

/// Extracts the uncompressed ELF `vmlinux` from a bzImage (boot protocol ≥ 2.08 payload fields).
fn extract_vmlinux(bzimage: &Path, out: &Path, ctl: &Control) -> Result<(), AssetsError> {
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
    // xz --single-stream may complain about the bzImage's trailing size field (non-zero exit): the
    // ELF check below is what decides.
    let status = match run_bounded(
        Command::new(tool[0])
            .args(&tool[1..])
            .stdin(file)
            .stdout(target),
        ctl,
        false,
    ) {
        Ok(_) => "exit 0".to_string(),
        Err(AssetsError::Command { detail, .. }) => detail,
        Err(e) => {
            let _ = std::fs::remove_file(&compressed);
            return Err(e);
        }
    };
    let _ = std::fs::remove_file(&compressed);
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
/// Polled (not a blocking flock) so a cancel also ends the wait for another builder.
fn lock(dir: &Path, ctl: &Control) -> Result<nix::fcntl::Flock<std::fs::File>, AssetsError> {
    let path = dir.join(".lock");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path))?;
    loop {
        ctl.check()?;
        match nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusiveNonblock) {
            Ok(l) => return Ok(l),
            Err((back, nix::errno::Errno::EWOULDBLOCK)) => f = back,
            Err((_, e)) => {
                return Err(AssetsError::Io {
                    path,
                    source: e.into(),
                });
            }
        }
        std::thread::sleep(POLL);
    }
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
    ctl: &Control,
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
    let root = download_and_extract(&pkg, work.path(), ctl)?;
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
    extract_vmlinux(&bzimage, &out.join("vmlinux"), ctl)?;
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
    match e {
        AssetsError::Cancelled => return AssetsError::Cancelled,
        AssetsError::Timeout { command, after } => {
            return AssetsError::Timeout {
                command: command.clone(),
                after: *after,
            };
        }
        _ => {}
    }
    AssetsError::Metadata {
        package: KERNEL_META_PACKAGE.into(),
        detail: e.to_string(),
    }
}

/// Busybox: `<cache>/busybox-<deb sha256>/busybox`.
fn ensure_busybox(
    cache: &Path,
    resolved: &Result<Resolved, AssetsError>,
    ctl: &Control,
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
    let root = download_and_extract(&pkg, work.path(), ctl)?;
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
    // newc's size fields are 32 bits; the entries are noded's guest init, busybox and its links and
    // directories (a few MB, short names), far below 4 GiB.
    #[allow(clippy::cast_possible_truncation)]
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

/// Builds (or reuses) the kernel and initramfs under `<data_dir>/guest`, with the default deadline
/// per command and no cancellation (the CLI, tests).
pub fn ensure(data_dir: &Path) -> Result<GuestAssets, AssetsError> {
    ensure_with(data_dir, &Control::default())
}

/// [`ensure`] under `ctl`: every apt-get/apt-cache/dpkg/xz run is bounded and cancellable.
pub fn ensure_with(data_dir: &Path, ctl: &Control) -> Result<GuestAssets, AssetsError> {
    let cache = data_dir.join("guest");
    std::fs::create_dir_all(&cache).map_err(io_err(&cache))?;
    let _lock = lock(&cache, ctl)?;
    let resolved = resolve_all(&cache, ctl);
    // A cancel must not fall back to a cached build: it stops.
    if let Err(e @ AssetsError::Cancelled) = &resolved {
        return Err(clone_err(e));
    }
    let (kernel, kernel_package) = ensure_kernel(&cache, &resolved, ctl)?;
    let busybox_path = ensure_busybox(&cache, &resolved, ctl)?;
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

/// A kernel + initrd pinned by sha256 (`[guest]` in noded.toml, written by `installer bake`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pinned {
    pub kernel: PathBuf,
    pub kernel_sha256: String,
    pub initrd: PathBuf,
    pub initrd_sha256: String,
}

fn verify_file(what: &'static str, path: &Path, want: &str) -> Result<String, AssetsError> {
    let bad = |detail: String| AssetsError::Pinned {
        what,
        path: path.to_path_buf(),
        detail,
    };
    let meta = std::fs::metadata(path).map_err(|e| bad(e.to_string()))?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    let actual = sha256_file(path).map_err(|e| bad(e.to_string()))?;
    if !actual.eq_ignore_ascii_case(want) {
        return Err(bad(format!(
            "sha256 {actual} does not match the pinned {want}"
        )));
    }
    Ok(actual)
}

/// Checks the pinned files against their sha256. Never builds or downloads anything: a missing or
/// changed file is an error naming it.
pub fn verify_pinned(p: &Pinned) -> Result<GuestAssets, AssetsError> {
    Ok(GuestAssets {
        kernel_sha256: verify_file("kernel", &p.kernel, &p.kernel_sha256)?,
        kernel: p.kernel.clone(),
        kernel_package: String::new(),
        initrd_sha256: verify_file("initrd", &p.initrd, &p.initrd_sha256)?,
        initrd: p.initrd.clone(),
    })
}

/// File names in a directory made by `noded guest-assets --out DIR` (what `installer bake
/// --guest-assets DIR` takes).
pub const EXPORT_KERNEL: &str = "vmlinux";
pub const EXPORT_INITRD: &str = "initrd.cpio";
pub const EXPORT_MANIFEST: &str = "guest-assets.json";

/// `guest-assets.json`: what the directory holds and the sha256 bake verifies before installing.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportManifest {
    pub format: u32,
    /// File name inside the directory.
    pub kernel: String,
    pub kernel_sha256: String,
    /// The Debian package the kernel was extracted from (`name=version`), for the record.
    #[serde(default)]
    pub kernel_package: String,
    pub initrd: String,
    pub initrd_sha256: String,
}

fn copy_verified(from: &Path, to: &Path, sha: &str) -> Result<(), AssetsError> {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp).map_err(io_err(from))?;
    let actual = sha256_file(&tmp).map_err(io_err(&tmp))?;
    if actual != sha {
        let _ = std::fs::remove_file(&tmp);
        return Err(AssetsError::Checksum {
            file: from.to_path_buf(),
            expected: sha.to_string(),
            actual,
        });
    }
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, to).map_err(io_err(to))
}

/// Copies built assets into `out` with their manifest (written last: a directory with a manifest
/// is complete).
pub fn export(assets: &GuestAssets, out: &Path) -> Result<ExportManifest, AssetsError> {
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let manifest = ExportManifest {
        format: 1,
        kernel: EXPORT_KERNEL.into(),
        kernel_sha256: assets.kernel_sha256.clone(),
        kernel_package: assets.kernel_package.clone(),
        initrd: EXPORT_INITRD.into(),
        initrd_sha256: assets.initrd_sha256.clone(),
    };
    let path = out.join(EXPORT_MANIFEST);
    let _ = std::fs::remove_file(&path);
    copy_verified(
        &assets.kernel,
        &out.join(EXPORT_KERNEL),
        &assets.kernel_sha256,
    )?;
    copy_verified(
        &assets.initrd,
        &out.join(EXPORT_INITRD),
        &assets.initrd_sha256,
    )?;
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| AssetsError::Io {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    std::fs::write(&path, json).map_err(io_err(&path))?;
    Ok(manifest)
}

/// `noded guest-assets --out DIR`: builds the guest from Debian packages (a Debian build host; the
/// node image builder has no apt) and writes it with its sha256 for `installer bake --guest-assets`.
pub fn cli(out: &Path, config: Option<&Path>) -> u8 {
    cancel_on_signals();
    let cfg = match config {
        Some(p) => crate::config::NodedConfig::load(p),
        None => crate::config::NodedConfig::local_default(),
    };
    let mut cfg = match cfg {
        Ok(c) => c,
        Err(e) => {
            eprintln!("noded: {e}");
            return crate::exit::ExitStatus::exit_code(&e);
        }
    };
    if let Ok(cwd) = std::env::current_dir() {
        cfg.resolve_relative(&cwd);
    }
    let ctl = Control::from_config(&cfg.guest);
    match ensure_with(&cfg.daemon.data_dir, &ctl).and_then(|a| export(&a, out)) {
        Ok(m) => {
            println!("{}", serde_json::to_string(&m).unwrap_or_default());
            crate::exit::OK
        }
        Err(e) => {
            eprintln!(
                "noded guest-assets: {}",
                crate::config::one_line(&e.to_string())
            );
            let signal = SIGNALLED.load(Ordering::SeqCst);
            if matches!(e, AssetsError::Cancelled) && signal > 0 {
                // As if the signal had ended us (the signal thread exits with the same code).
                u8::try_from(128 + signal).unwrap_or(crate::exit::RUNTIME_FAILURE)
            } else {
                crate::exit::RUNTIME_FAILURE
            }
        }
    }
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

    #[test]
    fn a_command_past_its_deadline_is_killed_with_its_group() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("child.pid");
        let ctl = Control::new(Duration::from_millis(300));
        let started = Instant::now();
        // The grandchild (`sleep`) is what apt's download methods are to apt-get.
        let err = run(
            Command::new("sh")
                .arg("-c")
                .arg(format!("sleep 30 & echo $! > {}; wait", pidfile.display())),
            &ctl,
        )
        .expect_err("must time out");
        assert!(started.elapsed() < Duration::from_secs(5));
        let msg = err.to_string();
        assert!(msg.contains("`sh -c sleep 30"), "{msg}");
        assert!(msg.contains("timed out after 300ms"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pidfile")
            .trim()
            .parse()
            .expect("pid");
        // Killed and, orphaned, reaped by init (or by this process as subreaper): gone soon.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
        {
            assert!(Instant::now() < deadline, "grandchild {pid} survived");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn a_cancel_stops_the_running_command() {
        let ctl = Control::new(Duration::from_secs(60));
        let c = ctl.clone();
        let t = std::thread::spawn(move || run(Command::new("sleep").arg("30"), &c));
        std::thread::sleep(Duration::from_millis(200));
        let started = Instant::now();
        drop(ctl.cancel_on_drop());
        let r = t.join().expect("join");
        assert!(matches!(r, Err(AssetsError::Cancelled)), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn pinned_files_must_match_their_sha256() {
        let dir = tempfile::tempdir().expect("tempdir");
        let k = dir.path().join("vmlinux");
        let i = dir.path().join("initrd.cpio");
        std::fs::write(&k, b"kernel").expect("write");
        std::fs::write(&i, b"initrd").expect("write");
        let pin = Pinned {
            kernel: k.clone(),
            kernel_sha256: sha256_file(&k).expect("hash"),
            initrd: i.clone(),
            initrd_sha256: sha256_file(&i).expect("hash"),
        };
        let a = verify_pinned(&pin).expect("matching pins");
        assert_eq!(a.kernel, k);
        std::fs::write(&i, b"tampered").expect("write");
        let msg = verify_pinned(&pin).expect_err("tampered").to_string();
        assert!(
            msg.starts_with(&format!("{}: pinned guest initrd: sha256 ", i.display())),
            "{msg}"
        );
        std::fs::remove_file(&k).expect("rm");
        let msg = verify_pinned(&pin).expect_err("missing").to_string();
        assert!(
            msg.starts_with(&format!("{}: pinned guest kernel: ", k.display())),
            "{msg}"
        );
    }
}
