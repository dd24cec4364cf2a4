//! The VMs of the fake Kata release, with the real QEMU: what `kata-runtime factory init` builds (a
//! template: guest RAM in a file on a tmpfs, device state saved with `migrate`) and what the fake
//! shim boots per sandbox (a clone of that template, or a cold boot), with the command lines Kata's Go
//! runtime uses, so noded's `/proc` scanner and template checks see what they would see on a node.
//!
//! The guest is noded's own test guest (`noded::vm::assets`): a Debian kernel booted as `vmlinux`
//! through PVH and a busybox initramfs whose `/init` answers `ping N` with `pong N <counter>`, the
//! counter kept in guest RAM. A clone's first answer continues the template's count; a cold boot
//! starts again at 1. Always TCG: `/dev/kvm` may exist on a machine that cannot run a guest with it,
//! and template and clones must agree on the accelerator.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use noded::vm::assets::GuestAssets;
use noded::vm::guest::GuestConsole;
use noded::vm::qemu::qmp::{Capability, MigrationStatus, Qmp};

/// Kata's default `[factory] template_path`.
pub const DEFAULT_TEMPLATE_PATH: &str = "/run/vc/vm/template";
/// Kata sizes the template tmpfs at guest memory + this (room for the device state).
pub const TEMPLATE_STATE_MIB: u64 = 8;
/// Kata keeps each VM's sockets in `/run/vc/vm/<id>/`.
pub const VM_RUN_DIR: &str = "/run/vc/vm";
/// Kata's default initrd name in a release (a symlink to the versioned file).
pub const DEFAULT_INITRD: &str = "kata-containers-initrd.img";

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// A cold boot under TCG takes 3-4 s on an idle machine; a loaded CI machine can take far longer.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const SAVE_TIMEOUT: Duration = Duration::from_secs(60);
/// An empty state file leaves QEMU in `inmigrate` forever: every restore wait is bounded.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

/// A configuration problem (exit code 2 in `fake-kata-runtime`), as opposed to a failure to run.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BadConfig(pub String);

/// What the fake reads from a Kata `configuration-qemu*.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    pub source: PathBuf,
    /// `[hypervisor.qemu] path`.
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub image: Option<PathBuf>,
    pub memory_mib: u64,
    pub machine_type: String,
    pub kernel_params: String,
    /// `[factory] enable_template`.
    pub enable_template: bool,
    /// `[factory] template_path`, Kata's default when absent.
    pub template_path: PathBuf,
}

impl QemuConfig {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| BadConfig(format!("{}: cannot read: {e}", path.display())))?;
        Self::parse(path, &text).map_err(|e| anyhow!(e))
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, BadConfig> {
        let bad = |m: String| BadConfig(format!("{}: {m}", path.display()));
        let doc: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| bad(noded::config::one_line(&e.to_string())))?;
        let qemu = doc
            .get("hypervisor")
            .and_then(|h| h.get("qemu"))
            .and_then(toml::Value::as_table)
            .ok_or_else(|| bad("no [hypervisor.qemu] table".into()))?;
        let string = |key: &str| -> Result<Option<String>, BadConfig> {
            match qemu.get(key) {
                None => Ok(None),
                Some(toml::Value::String(s)) if s.is_empty() => Ok(None),
                Some(toml::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(bad(format!(
                    "[hypervisor.qemu] {key} must be a string, not {other}"
                ))),
            }
        };
        let qemu_path =
            string("path")?.ok_or_else(|| bad("[hypervisor.qemu] path is not set".into()))?;
        let kernel =
            string("kernel")?.ok_or_else(|| bad("[hypervisor.qemu] kernel is not set".into()))?;
        let memory_mib = match qemu.get("default_memory") {
            None => 2048,
            Some(toml::Value::Integer(m)) if *m > 0 => u64::try_from(*m).unwrap_or(2048),
            Some(other) => {
                return Err(bad(format!(
                    "[hypervisor.qemu] default_memory must be a positive integer, not {other}"
                )));
            }
        };
        let factory = doc.get("factory").and_then(toml::Value::as_table);
        let enable_template = match factory.and_then(|f| f.get("enable_template")) {
            None => false,
            Some(toml::Value::Boolean(b)) => *b,
            Some(other) => {
                return Err(bad(format!(
                    "[factory] enable_template must be a boolean, not {other}"
                )));
            }
        };
        let template_path = match factory.and_then(|f| f.get("template_path")) {
            None => DEFAULT_TEMPLATE_PATH.to_owned(),
            Some(toml::Value::String(s)) if !s.is_empty() => s.clone(),
            Some(other) => {
                return Err(bad(format!(
                    "[factory] template_path must be a non-empty string, not {other}"
                )));
            }
        };
        Ok(Self {
            source: path.to_path_buf(),
            qemu: qemu_path.into(),
            kernel: kernel.into(),
            initrd: string("initrd")?.map(PathBuf::from),
            image: string("image")?.map(PathBuf::from),
            memory_mib,
            machine_type: string("machine_type")?.unwrap_or_else(|| "q35".into()),
            kernel_params: string("kernel_params")?.unwrap_or_default(),
            enable_template,
            template_path: template_path.into(),
        })
    }

    pub fn memory_file(&self) -> PathBuf {
        self.template_path.join("memory")
    }

    pub fn state_file(&self) -> PathBuf {
        self.template_path.join("state")
    }

    /// Both files Kata's factory leaves behind exist (what Kata checks before using a template).
    pub fn template_exists(&self) -> bool {
        self.memory_file().is_file() && self.state_file().is_file()
    }

    /// The initramfs a VM boots. A config with only `image` boots the release's default initrd next
    /// to it: the fake's image is not a disk this guest could use, and the initramfs is the same guest.
    pub fn boot_initrd(&self) -> Result<PathBuf, BadConfig> {
        if let Some(i) = &self.initrd {
            return Ok(i.clone());
        }
        let image = self.image.as_ref().ok_or_else(|| {
            BadConfig(format!(
                "{}: [hypervisor.qemu] has neither initrd nor image",
                self.source.display()
            ))
        })?;
        Ok(image
            .parent()
            .map(|d| d.join(DEFAULT_INITRD))
            .unwrap_or_else(|| PathBuf::from(DEFAULT_INITRD)))
    }

    /// Machine and boot arguments shared by the template and its clones (they must be identical).
    pub fn machine_args(&self) -> Result<Vec<String>, BadConfig> {
        let mut append = noded::vm::guest::GUEST_APPEND.to_owned();
        // Under TCG the kernel's TSC calibration hangs at random without it (DESIGN §6).
        if let Some(khz) = noded::vm::backend::host_tsc_khz() {
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
        if !self.kernel_params.trim().is_empty() {
            append.push(' ');
            append.push_str(self.kernel_params.trim());
        }
        Ok(vec![
            "-machine".into(),
            format!("{},accel=tcg,memory-backend=mem0", self.machine_type),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-smp".into(),
            "1".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.boot_initrd()?.display().to_string(),
            "-append".into(),
            append,
        ])
    }
}

/// How one VM's guest RAM is backed and whether it waits for an incoming state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `memory-backend-file,share=on` on the template tmpfs: the file is the guest's RAM.
    Template,
    /// The template's file mapped private (copy-on-write), `-incoming defer`.
    Clone,
    /// Anonymous RAM, no incoming state.
    Cold,
}

/// The full QEMU command (binary + args) of one VM; `dir` holds its QMP and console sockets.
pub fn qemu_command(cfg: &QemuConfig, role: Role, name: &str, dir: &Path) -> Result<Command> {
    let mut cmd = Command::new(&cfg.qemu);
    cmd.args(cfg.machine_args()?);
    let size = cfg.memory_mib;
    let backend = match role {
        Role::Template => format!(
            "memory-backend-file,id=mem0,size={size}M,mem-path={},share=on",
            cfg.memory_file().display()
        ),
        Role::Clone => format!(
            "memory-backend-file,id=mem0,size={size}M,mem-path={},share=off",
            cfg.memory_file().display()
        ),
        Role::Cold => format!("memory-backend-ram,id=mem0,size={size}M"),
    };
    cmd.args(["-object", &backend, "-name", name]);
    cmd.arg("-qmp").arg(format!(
        "unix:{},server=on,wait=off",
        dir.join("qmp.sock").display()
    ));
    cmd.arg("-chardev").arg(format!(
        "socket,id=ser0,path={},server=on,wait=off",
        dir.join("console.sock").display()
    ));
    cmd.args(["-serial", "chardev:ser0"]);
    if role == Role::Clone {
        cmd.args(["-S", "-incoming", "defer"]);
    }
    Ok(cmd)
}

/// Wraps `cmd` so the process is SIGKILLed when the thread that spawns it dies (`setpriv
/// --pdeathsig`, which execs the command: the pid stays QEMU's): a killed shim or runtime never
/// leaves a VM behind. Without setpriv the command is returned as it is.
pub fn with_parent_death_kill(cmd: Command) -> Command {
    let setpriv = Path::new("/usr/bin/setpriv");
    if !setpriv.is_file() {
        return cmd;
    }
    let mut wrapped = Command::new(setpriv);
    wrapped
        .args(["--pdeathsig", "KILL", "--"])
        .arg(cmd.get_program())
        .args(cmd.get_args());
    wrapped
}

/// Whether `pid` is a live process (not gone, not a zombie).
pub fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name, which may itself contain spaces.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, Some('Z' | 'X') | None)
}

/// A started QEMU with its QMP and console connections. Who spawned it reaps it.
pub struct Vm {
    pub pid: u32,
    pub name: String,
    pub dir: PathBuf,
    pub qmp: Qmp,
    pub console: GuestConsole,
}

impl Vm {
    /// Spawns QEMU through `spawn` (which returns its pid) and connects to its QMP and console sockets.
    /// On failure the process is SIGKILLed before returning.
    pub async fn start(
        cfg: &QemuConfig,
        role: Role,
        name: &str,
        dir: &Path,
        spawn: &mut dyn FnMut(Command) -> std::io::Result<u32>,
    ) -> Result<Self> {
        let _ = std::fs::remove_dir_all(dir);
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let log_path = dir.join("qemu.log");
        let log = std::fs::File::create(&log_path)
            .with_context(|| format!("create {}", log_path.display()))?;
        let mut cmd = with_parent_death_kill(qemu_command(cfg, role, name, dir)?);
        cmd.stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log);
        let pid = spawn(cmd).with_context(|| format!("cannot start {}", cfg.qemu.display()))?;
        let connected = connect(pid, dir).await;
        match connected {
            Ok((qmp, console)) => Ok(Self {
                pid,
                name: name.to_owned(),
                dir: dir.to_path_buf(),
                qmp,
                console,
            }),
            Err(e) => {
                kill(pid);
                let said = noded::config::one_line(
                    &std::fs::read_to_string(&log_path).unwrap_or_default(),
                );
                Err(e.context(format!("QEMU {name} (pid {pid}) said: {said}")))
            }
        }
    }

    /// QEMU's own stderr so far, on one line (what a failure report shows).
    pub fn log(&self) -> String {
        noded::config::one_line(
            &std::fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default(),
        )
    }

    /// Waits for a booting guest to answer; returns its counter.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<u64> {
        let answer = self.console.wait_ready(timeout).await.with_context(|| {
            format!(
                "guest of {} did not answer (console: {}; QEMU: {})",
                self.name,
                self.console.last_output(),
                self.log()
            )
        })?;
        Ok(answer.counter)
    }
}

async fn connect(pid: u32, dir: &Path) -> Result<(Qmp, GuestConsole)> {
    let qmp_path = dir.join("qmp.sock");
    let deadline = tokio::time::Instant::now() + QMP_TIMEOUT;
    let qmp = loop {
        if !alive(pid) {
            bail!("QEMU exited during start");
        }
        if qmp_path.exists()
            && let Ok(q) = Qmp::connect(&qmp_path, QMP_TIMEOUT).await
        {
            break q;
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "QMP socket {} did not answer within {QMP_TIMEOUT:?}",
                qmp_path.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // QEMU creates chardev sockets before the monitor's, so the console listens by now.
    let console = GuestConsole::connect(&dir.join("console.sock"))
        .await
        .context("connect to the guest console")?;
    Ok((qmp, console))
}

/// SIGKILL; reaping is the spawner's business.
pub fn kill(pid: u32) {
    if let Ok(p) = i32::try_from(pid) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// Waits until `pid` is no longer a live process (its spawner reaped it or it is a zombie).
pub fn wait_gone(pid: u32, timeout: Duration) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    while alive(pid) {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Boots the template VM with its RAM in `<template_path>/memory` (shared), waits for the guest,
/// pauses it and saves the device state to `<template_path>/state` with `x-ignore-shared` (the RAM is
/// not copied: the memory file *is* it). Leaves QEMU running; the caller quits it. Returns the guest's
/// counter at save time.
pub async fn save_template(vm: &mut Vm, cfg: &QemuConfig) -> Result<u64> {
    let counter = vm.wait_ready(BOOT_TIMEOUT).await?;
    let q = &mut vm.qmp;
    q.stop(QMP_TIMEOUT).await.context("QMP stop")?;
    q.migrate_set_capability(Capability::XIgnoreShared, true, QMP_TIMEOUT)
        .await
        .context("QMP migrate-set-capabilities x-ignore-shared")?;
    q.migrate(
        &format!("exec:cat > {}", shell_quote(&cfg.state_file())),
        QMP_TIMEOUT,
    )
    .await
    .context("QMP migrate")?;
    let info = q
        .wait_migration(SAVE_TIMEOUT, QMP_TIMEOUT)
        .await
        .context("waiting for the device state to be saved")?;
    if info.status != Some(MigrationStatus::Completed) {
        bail!(
            "saving the template's device state ended as {:?}: {}",
            info.status,
            info.error_desc.unwrap_or_default()
        );
    }
    Ok(counter)
}

/// Loads the template's device state into a clone started with [`Role::Clone`], runs it and checks
/// the guest answers with a counter that continues a template's (> 1; a cold-booted or reset guest
/// answers 1). Returns that counter.
pub async fn restore_clone(vm: &mut Vm, cfg: &QemuConfig) -> Result<u64> {
    let q = &mut vm.qmp;
    q.migrate_set_capability(Capability::XIgnoreShared, true, QMP_TIMEOUT)
        .await
        .context("QMP migrate-set-capabilities x-ignore-shared")?;
    q.migrate_incoming(
        &format!("exec:cat {}", shell_quote(&cfg.state_file())),
        QMP_TIMEOUT,
    )
    .await
    .context("QMP migrate-incoming")?;
    let info = q
        .wait_migration(RESTORE_TIMEOUT, QMP_TIMEOUT)
        .await
        .context("waiting for the device state to load")?;
    if info.status != Some(MigrationStatus::Completed) {
        bail!(
            "loading {} ended as {:?}: {}",
            cfg.state_file().display(),
            info.status,
            info.error_desc.unwrap_or_default()
        );
    }
    q.cont(QMP_TIMEOUT).await.context("QMP cont")?;
    let answer = vm
        .console
        .ping(ANSWER_TIMEOUT)
        .await
        .context("the restored guest did not answer ping")?;
    if answer.counter <= 1 {
        bail!(
            "the restored guest answered with counter {} (it booted afresh: the template's memory is not what it ran)",
            answer.counter
        );
    }
    Ok(answer.counter)
}

/// noded's test guest (kernel + busybox initramfs), built once per target dir with
/// `noded::vm::assets::ensure` (Debian packages through apt) and reused by every bootable fake release.
pub fn guest_assets() -> Result<GuestAssets> {
    let dir = crate::containerd::target_dir().join("testkit-guest");
    noded::vm::assets::ensure(&dir).with_context(|| {
        format!(
            "build the guest kernel and initramfs under {}",
            dir.display()
        )
    })
}

/// A newc cpio archive holding one regular file: appended to an initramfs, the kernel unpacks it on
/// top (concatenated archives are allowed), so a release's initrd can change bytes and stay bootable.
pub fn cpio_with_file(name: &str, data: &[u8]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
        let name_len = u32::try_from(name.len() + 1).unwrap_or(u32::MAX);
        let size = u32::try_from(data.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(b"070701");
        for f in [ino, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, name_len, 0] {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
        out.extend_from_slice(data);
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    entry(&mut out, 1, name, 0o100_644, data);
    entry(&mut out, 0, "TRAILER!!!", 0, &[]);
    out
}

/// Whether `path` is a mount point, from `/proc/self/mountinfo`.
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path) else {
        return false;
    };
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = canon.display().to_string();
    info.lines()
        .filter_map(|l| l.split(' ').nth(4))
        // mountinfo escapes spaces and the like as octal.
        .any(|m| m.replace("\\040", " ") == want)
}

/// `p` as one word for the `/bin/sh -c` QEMU runs an `exec:` migration URI with (Kata's own
/// `exec:cat` URIs are built the same way).
fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<QemuConfig, BadConfig> {
        QemuConfig::parse(Path::new("/k/configuration-qemu.toml"), text)
    }

    #[test]
    fn kata_shipped_config_boots_from_its_image_without_templating() {
        let text = crate::fake_kata::QEMU_CONFIG.replace("@ROOT@", "/opt/kata");
        let cfg = parse(&text).expect("parse");
        assert_eq!(cfg.qemu, Path::new("/opt/kata/bin/qemu-system-x86_64"));
        assert_eq!(cfg.memory_mib, 2048);
        assert_eq!(cfg.machine_type, "q35");
        assert!(!cfg.enable_template);
        assert_eq!(cfg.template_path, Path::new(DEFAULT_TEMPLATE_PATH));
        assert_eq!(cfg.initrd, None);
        assert_eq!(
            cfg.boot_initrd().expect("initrd"),
            Path::new("/opt/kata/share/kata-containers/kata-containers-initrd.img")
        );
    }

    #[test]
    fn templating_keys_are_read_and_bad_values_name_the_field() {
        let cfg = parse(
            "[hypervisor.qemu]\npath = \"/q\"\nkernel = \"/k\"\ninitrd = \"/i\"\ndefault_memory = 256\n\
             [factory]\nenable_template = true\ntemplate_path = \"/t\"\n",
        )
        .expect("parse");
        assert!(cfg.enable_template);
        assert_eq!(cfg.state_file(), Path::new("/t/state"));
        assert_eq!(cfg.boot_initrd().expect("initrd"), Path::new("/i"));
        let args = cfg.machine_args().expect("args");
        assert!(args.contains(&"256M".to_owned()), "{args:?}");

        let err =
            parse("[hypervisor.qemu]\npath = \"/q\"\nkernel = \"/k\"\ndefault_memory = \"lots\"\n")
                .expect_err("bad memory");
        assert!(
            err.0.contains("/k/configuration-qemu.toml") && err.0.contains("default_memory"),
            "{err}"
        );
        let err = parse("[hypervisor.qemu]\npath = \"/q\"\n").expect_err("no kernel");
        assert!(err.0.contains("kernel"), "{err}");
        let err = parse("[hypervisor.clh]\npath = \"/c\"\n").expect_err("no qemu");
        assert!(err.0.contains("[hypervisor.qemu]"), "{err}");
        let err = parse("[hypervisor.qemu]\npath = \"/q\"\nkernel = \"/k\"\n[factory]\nenable_template = \"yes\"\n")
            .expect_err("bad bool");
        assert!(err.0.contains("enable_template"), "{err}");
    }

    #[test]
    fn cpio_appendix_is_a_4_aligned_newc_archive() {
        let c = cpio_with_file("etc/kata-version", b"3.99.0\n");
        assert!(c.starts_with(b"070701"));
        assert_eq!(c.len() % 4, 0);
        assert!(String::from_utf8_lossy(&c).contains("TRAILER!!!"));
    }
}
