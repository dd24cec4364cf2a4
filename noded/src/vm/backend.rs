//! The seam between the VM engine and a hypervisor.
//!
//! Templates, clones and the pool (`template.rs`, `clone.rs`, `pool.rs`, `engine.rs`) are written
//! once against two traits: [`Backend`] starts VMs (cold, or restored from a template's device
//! state) and reads its own command lines back; [`Vm`] is one running VM (console, save,
//! pause/resume, kill). QEMU is the implementation (`qemu.rs`, with its monitor client `qemu/qmp.rs`);
//! [`super::default_backend`] is the one place that names it.
//!
//! What every backend shares, and so lives here: guest RAM is a file (the template's, mapped shared
//! while it is built and private in its clones), device state is one file next to it, the guest is
//! driven through its serial console on `console.sock` in the VM's own directory (`guest.rs`), and
//! every process a backend starts gets a spawn record (`reap::VmRecord`) before anything else, so a
//! restarted noded finds it by what it started, never by a command line.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;

use super::guest::{GuestConsole, GuestError};
pub use crate::hypervisor::Hypervisor;

/// The console socket's file name inside a VM's directory (what `AcquireVm` hands out).
pub const CONSOLE_SOCKET: &str = "console.sock";
/// Longest path a unix socket can be bound at (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot start {binary}: {source} ({hint})")]
    Spawn {
        binary: String,
        hint: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("VM {name} exited ({status}); {program} said: {stderr}")]
    Exited {
        name: String,
        program: &'static str,
        status: String,
        stderr: String,
    },
    #[error("VM {name}: {what} did not appear within {timeout:?}")]
    NoSocket {
        name: String,
        what: &'static str,
        timeout: Duration,
    },
    /// The hypervisor's control channel (QEMU: QMP) failed or refused a command.
    #[error("VM {name}: {source}")]
    Control {
        name: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("VM {name}: {source}")]
    Guest { name: String, source: GuestError },
    #[error(
        "socket path {path} is {len} bytes, longer than a unix socket allows ({MAX_SOCKET_PATH}); use a shorter run_dir"
    )]
    PathTooLong { path: PathBuf, len: usize },
    #[error("`{binary} --version` failed: {detail}")]
    Version { binary: String, detail: String },
    #[error("VM {name}: saving device state ended as {outcome}")]
    Save { name: String, outcome: String },
    #[error("VM {name}: restoring device state ended as {outcome}")]
    Restore { name: String, outcome: String },
}

/// CPU virtualisation: hardware (KVM) or emulated (TCG, where `/dev/kvm` cannot run a guest).
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
    /// Template: writes go to the file, so the file *is* the guest's memory once it is paused.
    Shared,
    /// Clone (and cold boot): `MAP_PRIVATE`, copy-on-write over the file, which stays untouched.
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
    /// Kernel command line without host-specific hints (the TSC frequency under TCG).
    pub append: String,
}

/// One VM the engine asks a backend to start. The engine names and places it; the backend owns
/// everything inside `dir` besides the console socket's name.
#[derive(Debug, Clone)]
pub struct Launch {
    /// `noded-<template>-<id>`: what operators see (the spawn record is what identifies it).
    pub name: String,
    /// The VM's own directory (sockets, log, spawn record); removed with the VM.
    pub dir: PathBuf,
    /// Guest RAM.
    pub memory_file: PathBuf,
    pub memory_mib: u64,
    pub mapping: Mapping,
    /// The backend's rendering of the machine ([`Backend::machine_args`]); a clone gets exactly the
    /// arguments its template was built with (kept in the template's manifest).
    pub machine_args: Vec<String>,
    /// VM generation id; a fresh one per clone gives each clone its own RNG state after restore.
    pub vmgenid: uuid::Uuid,
    /// Killed by the kernel when the noded thread that spawned it dies (template sources, the KVM
    /// probe): nothing else could stop a VM whose noded was killed before its spawn record was
    /// written. Never for clones: one may be handed out, and VMs in use outlive noded.
    pub dies_with_noded: bool,
}

impl Launch {
    /// Where the guest's serial console listens (one client at a time).
    pub fn console_socket(&self) -> PathBuf {
        self.dir.join(CONSOLE_SOCKET)
    }

    /// `dir/<file>`, refused when too long to bind a unix socket at.
    pub fn socket(&self, file: &str) -> Result<PathBuf, BackendError> {
        let path = self.dir.join(file);
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(BackendError::PathTooLong { path, len });
        }
        Ok(path)
    }
}

/// How a VM a backend started came to be, read back from its command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Boot {
    /// A template being built (its memory file mapped shared).
    TemplateSource,
    /// Restored from a template's device state.
    Restore,
    /// Booted its kernel from scratch.
    Cold,
}

/// What [`Backend::identify`] reads from a command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The VM's name as given at launch (`noded-<template>-<id>`), when the command line has one.
    pub name: Option<String>,
    pub boot: Boot,
}

/// A hypervisor noded can build templates with and start VMs on.
#[async_trait]
pub trait Backend: Send + Sync {
    fn hypervisor(&self) -> Hypervisor;

    /// The hypervisor's version line: part of every template's fingerprint, so an upgrade rebuilds.
    async fn version(&self) -> Result<String, BackendError>;

    /// The machine as this hypervisor's arguments (no per-VM paths). `tsc_khz` is a host hint the
    /// backend may put on the kernel command line; `None` gives the host-independent form the
    /// fingerprint records.
    fn machine_args(&self, spec: &MachineSpec, tsc_khz: Option<u64>) -> Vec<String>;

    /// Boots `launch` from its kernel: a template source ([`Mapping::Shared`]) or a cold VM.
    /// Returns once the process runs, is recorded and its console is connected (before the guest
    /// can say anything); the guest itself is not waited for. On error no process is left.
    async fn spawn(&self, launch: Launch) -> Result<Box<dyn Vm>, BackendError>;

    /// Starts `launch` (a template's memory file, mapped private) from the device state in `state`,
    /// giving the load at most `timeout` (a damaged state can hang a hypervisor forever). Returns
    /// the VM paused, its state loaded. On error no process is left.
    async fn restore(
        &self,
        launch: Launch,
        state: &Path,
        timeout: Duration,
    ) -> Result<Box<dyn Vm>, BackendError>;

    /// Reads a command line this backend rendered: `None` when it is not this hypervisor's. Which
    /// VM is noded's is decided by spawn records, never by this: any user can write any argv.
    fn identify(&self, argv: &[String]) -> Option<Identity>;
}

/// One running VM. Dropping it kills the process; [`Vm::kill`] also waits and removes its
/// directory.
#[async_trait]
pub trait Vm: Send {
    fn launch(&self) -> &Launch;

    fn pid(&self) -> Option<u32>;

    /// noded's connection to the guest console (gone after [`Vm::hand_off`]).
    fn console(&mut self) -> Result<&mut GuestConsole, BackendError>;

    /// The error to report for a console failure: if the process died (waiting up to `grace` for
    /// it to), its exit status and last words instead.
    async fn console_failed(&mut self, source: GuestError, grace: Duration) -> BackendError;

    /// Pauses the VM and writes its device state to `state`; guest RAM is already in the
    /// (shared) memory file. The VM stays paused.
    async fn save(&mut self, state: &Path) -> Result<(), BackendError>;

    async fn pause(&mut self) -> Result<(), BackendError>;

    async fn resume(&mut self) -> Result<(), BackendError>;

    /// Closes noded's connections to the VM, so the caller it is handed to can open the console.
    fn hand_off(&mut self);

    /// Asks the hypervisor to exit; kills it if it has not within `timeout`.
    async fn quit(self: Box<Self>, timeout: Duration);

    /// Kills the process, waits for it and removes the VM's directory.
    async fn kill(self: Box<Self>);
}

/// Writes the spawn record ([`super::reap::VmRecord`]) of the process just started for `launch`
/// into its directory. Backends call it right after the spawn, before anything else can fail.
pub fn record_spawn(launch: &Launch, pid: Option<u32>) -> Result<(), BackendError> {
    let io = |source| BackendError::Io {
        path: launch.dir.join(super::reap::RECORD_FILE),
        source,
    };
    let pid = pid.ok_or_else(|| io(std::io::Error::other("VM exited before it was recorded")))?;
    // Out of noded's cgroup first (vm::cgroup): a VM handed out must outlive noded's container.
    let cgroup = super::cgroup::enter(pid, &launch.dir);
    super::reap::VmRecord::of_pid(pid, &launch.name)
        .map(|r| r.in_cgroup(cgroup.as_ref()))
        .and_then(|r| r.write(&launch.dir))
        .map_err(io)
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
    // Float-to-int `as` saturates; a CPU's MHz is far inside u64.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let khz = (mhz * 1000.0).round() as u64;
    Some(khz)
}

/// Makes `cmd`'s process get SIGKILL when the thread that spawns it exits (`PR_SET_PDEATHSIG`).
/// noded spawns VMs from async tasks on its runtime's worker (or main) threads, which live as long as
/// the process, so in practice: when noded dies. Never call this from a `spawn_blocking` thread: the
/// blocking pool retires idle threads, and the VM would die with one.
#[allow(unsafe_code)]
pub fn die_with_spawner(cmd: &mut tokio::process::Command) {
    let spawner = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and only makes async-signal-safe
    // system calls (prctl, getppid, _exit); it allocates nothing and takes no lock.
    unsafe {
        cmd.pre_exec(move || {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)?;
            // The spawner may have died between fork and prctl: then no signal would ever come.
            if nix::unistd::getppid() != spawner {
                nix::libc::_exit(1);
            }
            Ok(())
        });
    }
}
