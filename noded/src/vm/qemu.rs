//! QEMU command line builder, accelerator detection and the VM process handle.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::guest::{GuestConsole, GuestError};
use super::qmp::{Qmp, QmpError};

pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// Every QEMU noded starts carries `-name noded-<template>-...` (what operators see). The name
/// identifies nothing: the reaper and the observer go by the spawn record (`reap::VmRecord`).
pub const NAME_PREFIX: &str = "noded-";

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot start {binary}: {source} (install Debian's qemu-system-x86)")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("VM {name} exited during start ({status}); QEMU said: {stderr}")]
    Exited {
        name: String,
        status: String,
        stderr: String,
    },
    #[error("VM {name}: QMP socket did not appear within {timeout:?}")]
    NoSocket { name: String, timeout: Duration },
    #[error("VM {name}: {source}")]
    Qmp { name: String, source: QmpError },
    #[error("VM {name}: {source}")]
    Guest { name: String, source: GuestError },
    #[error(
        "socket path {path} is {len} bytes, longer than a unix socket allows (107); use a shorter run_dir"
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error("`{QEMU_BINARY} --version` failed: {0}")]
    Version(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kvm => "kvm",
            Self::Tcg => "tcg",
        }
    }
}

/// How the guest RAM file is mapped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Template: writes go to the file, so the file *is* the guest's memory after `stop`.
    Shared,
    /// Clone: `MAP_PRIVATE`, copy-on-write over the template's file, which stays untouched.
    Private,
}

/// Everything that must be identical between a template and its clones.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MachineSpec {
    pub accel: Accel,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel command line without the host-specific `tsc_early_khz`.
    pub append: String,
}

/// Base kernel command line of noded's guest. `no_timer_check`: on a loaded host a TCG guest can
/// fail the kernel's IO-APIC timer check and panic ("IO-APIC + timer doesn't work").
pub const GUEST_APPEND: &str = "console=ttyS0 quiet panic=1 no_timer_check";

impl MachineSpec {
    /// Machine and device arguments shared by template and clones (no per-VM paths).
    pub fn machine_args(&self, tsc_khz: Option<u64>) -> Vec<String> {
        let mut append = self.append.clone();
        if let (Accel::Tcg, Some(khz)) = (self.accel, tsc_khz) {
            // Under TCG the kernel's TSC calibration hangs at random without this (DESIGN §6).
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
        let mut args = vec![
            "-machine".to_string(),
            format!("q35,accel={},memory-backend=mem0", self.accel.as_str()),
            "-m".into(),
            format!("{}M", self.memory_mib),
            "-smp".into(),
            self.vcpus.to_string(),
        ];
        if self.accel == Accel::Kvm {
            args.extend(["-cpu".into(), "host".into()]);
        }
        args.extend([
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.initrd.display().to_string(),
            "-append".into(),
            append,
        ]);
        args
    }
}

/// Per-VM part of the command line.
#[derive(Debug, Clone)]
pub struct VmLaunch {
    /// Full `-name` value; starts with [`NAME_PREFIX`].
    pub name: String,
    pub dir: PathBuf,
    pub memory_file: PathBuf,
    pub mapping: Mapping,
    pub incoming: bool,
    /// vmgenid GUID; a fresh one per clone gives each clone its own RNG state after restore.
    pub vmgenid: uuid::Uuid,
}

impl VmLaunch {
    pub fn qmp_socket(&self) -> PathBuf {
        self.dir.join("qmp.sock")
    }
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join("console.sock")
    }
    /// Where device state is streamed (template save, clone restore); never handed to callers.
    /// As long as `console.sock`, so the path-length check of the other sockets covers it.
    pub fn migration_socket(&self) -> PathBuf {
        self.dir.join("migrate.sock")
    }
    pub fn log_file(&self) -> PathBuf {
        self.dir.join("qemu.log")
    }

    /// Full argument vector (without the binary).
    pub fn args(&self, machine_args: &[String], memory_mib: u64) -> Vec<OsString> {
        let share = match self.mapping {
            Mapping::Shared => "on",
            Mapping::Private => "off",
        };
        let mut a: Vec<OsString> = machine_args.iter().map(OsString::from).collect();
        let mut push = |s: String| a.push(OsString::from(s));
        // seccomp: QEMU runs as root and parses guest-controlled device state. spawn=deny is
        // possible because state moves over unix sockets noded holds, never `exec:` (a shell).
        push("-sandbox".into());
        push("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into());
        push("-object".into());
        push(format!(
            "memory-backend-file,id=mem0,size={memory_mib}M,mem-path={},share={share}",
            self.memory_file.display()
        ));
        push("-device".into());
        push(format!("vmgenid,guid={}", self.vmgenid));
        push("-name".into());
        push(format!("{},process={}", self.name, self.name));
        push("-qmp".into());
        push(format!(
            "unix:{},server=on,wait=off",
            self.qmp_socket().display()
        ));
        push("-chardev".into());
        push(format!(
            "socket,id=ser0,path={},server=on,wait=off",
            self.console_socket().display()
        ));
        push("-serial".into());
        push("chardev:ser0".into());
        if self.incoming {
            push("-S".into());
            push("-incoming".into());
            push("defer".into());
        }
        a
    }
}

/// A running QEMU process that noded owns. Dropping it kills the process.
pub struct VmProcess {
    pub name: String,
    pub launch: VmLaunch,
    pub child: Child,
    pub qmp: Option<Qmp>,
    pub console: Option<GuestConsole>,
    pub started: std::time::Instant,
}

impl VmProcess {
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Spawns QEMU and connects QMP (waiting for its socket). The console is connected too, before the
    /// guest can say anything, so no answer is lost.
    pub async fn spawn(
        launch: VmLaunch,
        machine_args: &[String],
        memory_mib: u64,
        timeout: Duration,
    ) -> Result<Self, QemuError> {
        for p in [launch.qmp_socket(), launch.console_socket()] {
            let len = p.as_os_str().len();
            if len > 107 {
                return Err(QemuError::PathTooLong { path: p, len });
            }
        }
        std::fs::create_dir_all(&launch.dir).map_err(|source| QemuError::Io {
            path: launch.dir.clone(),
            source,
        })?;
        let log = std::fs::File::create(launch.log_file()).map_err(|source| QemuError::Io {
            path: launch.log_file(),
            source,
        })?;
        let started = std::time::Instant::now();
        let child = Command::new(QEMU_BINARY)
            .args(launch.args(machine_args, memory_mib))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| QemuError::Spawn {
                binary: QEMU_BINARY.into(),
                source,
            })?;
        let mut vm = VmProcess {
            name: launch.name.clone(),
            launch,
            child,
            qmp: None,
            console: None,
            started,
        };
        // Recorded before anything else can fail (dropping the Child kills QEMU): the record is how
        // a restarted noded finds this process, never its command line.
        if let Err(e) = record_vm(&vm.launch, vm.child.id()) {
            if let Some(status) = vm.child.try_wait().ok().flatten() {
                return Err(vm.exited(status.to_string()));
            }
            return Err(e);
        }
        let qmp_path = vm.launch.qmp_socket();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = vm.child.try_wait().ok().flatten() {
                return Err(vm.exited(status.to_string()));
            }
            if qmp_path.exists() {
                match Qmp::connect(&qmp_path, timeout).await {
                    Ok(q) => {
                        vm.qmp = Some(q);
                        // A wrapper script may have exec'd QEMU since the spawn: record what runs now.
                        if let Err(e) = record_vm(&vm.launch, vm.child.id()) {
                            tracing::debug!(vm = %vm.name, error = %e, "VM record not refreshed");
                        }
                        break;
                    }
                    Err(QmpError::Connect { .. }) => {}
                    Err(source) => {
                        return Err(QemuError::Qmp {
                            name: vm.name.clone(),
                            source,
                        });
                    }
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(QemuError::NoSocket {
                    name: vm.name.clone(),
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        // QEMU creates the chardev sockets before the monitor, so the console is listening by now.
        let console = GuestConsole::connect(&vm.launch.console_socket())
            .await
            .map_err(|source| QemuError::Guest {
                name: vm.name.clone(),
                source,
            })?;
        vm.console = Some(console);
        Ok(vm)
    }

    fn exited(&self, status: String) -> QemuError {
        let mut stderr = crate::config::one_line(
            &std::fs::read_to_string(self.launch.log_file()).unwrap_or_default(),
        );
        if let Some(c) = &self.console {
            let out = c.last_output();
            if !out.is_empty() {
                stderr.push_str(&format!("; guest console: {out}"));
            }
        }
        QemuError::Exited {
            name: self.name.clone(),
            status,
            stderr,
        }
    }

    /// The error to report for `source`, naming the exit status if QEMU died.
    pub fn qmp_error(&mut self, source: QmpError) -> QemuError {
        if let Some(status) = self.child.try_wait().ok().flatten() {
            return self.exited(status.to_string());
        }
        QemuError::Qmp {
            name: self.name.clone(),
            source,
        }
    }

    /// The error to report for a console failure, naming the exit status and QEMU's last words if it
    /// died (a guest kernel panic ends QEMU: `-no-reboot`).
    pub fn guest_error(&mut self, source: GuestError) -> QemuError {
        if let Some(status) = self.child.try_wait().ok().flatten() {
            return self.exited(status.to_string());
        }
        QemuError::Guest {
            name: self.name.clone(),
            source,
        }
    }

    pub fn qmp(&mut self) -> Result<&mut Qmp, QemuError> {
        let name = self.name.clone();
        self.qmp.as_mut().ok_or(QemuError::Qmp {
            name,
            source: QmpError::Closed {
                command: "(connection already handed off)".into(),
            },
        })
    }

    pub fn console(&mut self) -> Result<&mut GuestConsole, QemuError> {
        let name = self.name.clone();
        self.console.as_mut().ok_or(QemuError::Guest {
            name,
            source: GuestError::Closed,
        })
    }

    /// Kills QEMU and waits for it, then removes its socket directory.
    pub async fn kill(mut self) {
        self.qmp = None;
        self.console = None;
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = std::fs::remove_dir_all(&self.launch.dir);
    }

    /// Asks QEMU to quit; kills it if it does not exit within `timeout`.
    pub async fn quit(mut self, timeout: Duration) {
        if let Some(q) = self.qmp.as_mut() {
            let _ = q.quit(timeout).await;
        }
        if tokio::time::timeout(timeout, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(vm = %self.name, "QEMU did not quit; killing it");
        }
        self.kill().await;
    }
}

/// Writes the [`VmRecord`](super::reap::VmRecord) of the QEMU just spawned into its socket dir.
fn record_vm(launch: &VmLaunch, pid: Option<u32>) -> Result<(), QemuError> {
    let io = |source| QemuError::Io {
        path: launch.dir.join(super::reap::RECORD_FILE),
        source,
    };
    let pid = pid.ok_or_else(|| io(std::io::Error::other("QEMU exited before it was recorded")))?;
    super::reap::VmRecord::of_pid(pid, &launch.name)
        .and_then(|r| r.write(&launch.dir))
        .map_err(io)
}

/// `QEMU emulator version 7.2.22 (...)` → the first line.
pub async fn qemu_version() -> Result<String, QemuError> {
    let out = Command::new(QEMU_BINARY)
        .arg("--version")
        .output()
        .await
        .map_err(|e| QemuError::Version(e.to_string()))?;
    if !out.status.success() {
        return Err(QemuError::Version(out.status.to_string()));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string())
}

/// Host TSC frequency in kHz, from `/proc/cpuinfo`.
pub fn host_tsc_khz() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mhz: f64 = text
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    Some((mhz * 1000.0).round() as u64)
}

/// Whether KVM can really run a guest here. `/dev/kvm` existing is not enough (on nested or
/// restricted hosts QEMU starts with `accel=kvm` and the guest then hangs in early boot), so this boots
/// the real guest under KVM and waits for it to answer a request. A KVM guest answers in well under a
/// second; `deadline` bounds the cost of the probe on hosts where it fails.
pub async fn probe_kvm(spec: &MachineSpec, scratch: &Path, deadline: Duration) -> bool {
    if std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        tracing::info!("no usable /dev/kvm; guests run under TCG");
        return false;
    }
    let mut kvm = spec.clone();
    kvm.accel = Accel::Kvm;
    kvm.memory_mib = kvm.memory_mib.min(128);
    let launch = VmLaunch {
        name: format!("{NAME_PREFIX}probe-kvm-{}", std::process::id()),
        dir: scratch.join("kvm-probe"),
        memory_file: scratch.join("kvm-probe.mem"),
        mapping: Mapping::Private,
        incoming: false,
        vmgenid: uuid::Uuid::new_v4(),
    };
    let mem = launch.memory_file.clone();
    let result = async {
        let mut vm = VmProcess::spawn(
            launch,
            &kvm.machine_args(None),
            kvm.memory_mib,
            Duration::from_secs(5),
        )
        .await
        .map_err(|e| e.to_string())?;
        let ok = vm
            .console()
            .map_err(|e| e.to_string())?
            .wait_ready(deadline)
            .await
            .map_err(|e| e.to_string());
        vm.kill().await;
        ok
    }
    .await;
    let _ = std::fs::remove_file(&mem);
    match result {
        Ok(_) => {
            tracing::info!("KVM runs guests here; using accel=kvm");
            true
        }
        Err(e) => {
            tracing::info!(reason = %e, "/dev/kvm exists but cannot run a guest; using accel=tcg");
            false
        }
    }
}
