//! Orphan reaping: QEMU processes, template tmpfs mounts and sockets left by a previous noded of the
//! same run dir (killed with -9, crashed, or the node rebooted under it).
//!
//! noded's own VMs are known by what noded started, never by what a command line says (any user can
//! name a process `qemu-system-x86_64 -name noded-x-1 /run/noded/...`): when QEMU is spawned, a
//! [`VmRecord`] (pid, start time, executable, boot id) is written next to its sockets, under
//! `<run_dir>/vms/<vm>/`. A restarted noded kills exactly the processes whose pid, start time and
//! executable still match a record, through a pidfd so a pid recycled in between is never signalled.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::template::{Layout, destroy_dir, mounts_under};

/// The record's file name inside a VM's socket directory.
pub const RECORD_FILE: &str = "process.json";

/// What a reap removed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Reaped {
    pub processes: Vec<u32>,
    pub mounts: Vec<PathBuf>,
    pub vm_dirs: usize,
}

/// Identity of a QEMU process noded started, persisted so a later noded can re-identify it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmRecord {
    pub pid: u32,
    /// Clock ticks after boot at which the process started (`/proc/<pid>/stat` field 22). A pid
    /// recycled by another process has another start time.
    pub starttime: u64,
    /// `/proc/<pid>/exe` when it was recorded.
    pub exe: PathBuf,
    /// Start times only compare within one boot (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// The VM's `-name` (`noded-<template>-<id>`).
    pub name: String,
}

/// What `/proc/<pid>` says about a live process, for comparing with a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcIdentity {
    pub starttime: u64,
    /// `None` when the link cannot be read (another user's process without privilege).
    pub exe: Option<PathBuf>,
    pub zombie: bool,
}

/// The host's boot id (empty when unreadable).
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// `(state, starttime)` from a `/proc/<pid>/stat` line. The command name may hold spaces and `)`,
/// so fields are counted from the last `)`.
pub fn parse_stat(stat: &str) -> Option<(char, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // After the state: ppid pgrp session tty_nr tpgid flags minflt cminflt majflt cmajflt utime stime
    // cutime cstime priority nice num_threads itrealvalue starttime (field 22 of the whole line).
    let starttime = fields.nth(18)?.parse().ok()?;
    Some((state, starttime))
}

/// Reads `/proc/<pid>` under `proc_root`; `None` when there is no such process.
pub fn identity(proc_root: &Path, pid: u32) -> Option<ProcIdentity> {
    let dir = proc_root.join(pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let (state, starttime) = parse_stat(&stat)?;
    Some(ProcIdentity {
        starttime,
        exe: std::fs::read_link(dir.join("exe")).ok(),
        zombie: state == 'Z' || state == 'X',
    })
}

/// A replaced binary (package upgrade) reads as `<path> (deleted)`; it is still the same program.
fn same_exe(a: &Path, b: &Path) -> bool {
    let strip = |p: &Path| {
        let s = p.to_string_lossy();
        s.strip_suffix(" (deleted)").unwrap_or(&s).to_string()
    };
    strip(a) == strip(b)
}

impl VmRecord {
    /// The record of `pid` as it runs now (read from the real `/proc`).
    pub fn of_pid(pid: u32, name: &str) -> std::io::Result<VmRecord> {
        let id = identity(Path::new("/proc"), pid).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("process {pid} is gone"),
            )
        })?;
        let exe = id.exe.ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("/proc/{pid}/exe is unreadable"),
            )
        })?;
        Ok(VmRecord {
            pid,
            starttime: id.starttime,
            exe,
            boot_id: boot_id(),
            name: name.to_string(),
        })
    }

    /// Writes the record into `dir` (atomically: a reader sees the old record or the new one).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let tmp = dir.join(format!(".{RECORD_FILE}.tmp"));
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        {
            let mut f = std::fs::File::create(&tmp)?;
            f.write_all(&json)?;
        }
        std::fs::rename(&tmp, dir.join(RECORD_FILE))
    }

    /// Every record under `vms_dir` (`<vms_dir>/<vm>/process.json`), with its directory. Unreadable
    /// or malformed records are skipped: they identify nothing.
    pub fn read_all(vms_dir: &Path) -> Vec<(PathBuf, VmRecord)> {
        let Ok(entries) = std::fs::read_dir(vms_dir) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for e in entries.filter_map(Result::ok) {
            let dir = e.path();
            let Ok(bytes) = std::fs::read(dir.join(RECORD_FILE)) else {
                continue;
            };
            match serde_json::from_slice::<VmRecord>(&bytes) {
                Ok(r) => out.push((dir, r)),
                Err(err) => {
                    tracing::warn!(dir = %dir.display(), error = %err, "ignoring malformed VM record");
                }
            }
        }
        out
    }

    /// Whether the process `live` (read from `/proc/<self.pid>` in this boot) is the one recorded.
    pub fn matches(&self, live: &ProcIdentity, boot_id: &str) -> bool {
        !live.zombie
            && self.boot_id == boot_id
            && live.starttime == self.starttime
            && live.exe.as_deref().is_some_and(|e| same_exe(e, &self.exe))
    }

    /// Whether the recorded process is still running (real `/proc`).
    pub fn is_running(&self, boot_id: &str) -> bool {
        identity(Path::new("/proc"), self.pid).is_some_and(|live| self.matches(&live, boot_id))
    }
}

/// noded's QEMU processes of `run_dir` that are still running, by their records: `(pid, name)`.
pub fn find_vms(run_dir: &Path) -> Vec<(u32, String)> {
    let boot = boot_id();
    VmRecord::read_all(&run_dir.join("vms"))
        .into_iter()
        .filter(|(_, r)| r.is_running(&boot))
        .map(|(_, r)| (r.pid, r.name))
        .collect()
}

/// SIGKILLs the recorded process through a pidfd opened *before* the identity is checked, so the
/// signal reaches the recorded process or nobody. `true` when it was signalled.
fn kill_recorded(record: &VmRecord, boot: &str) -> bool {
    use rustix::process::{Pid, PidfdFlags, Signal, pidfd_open, pidfd_send_signal};
    let Some(pid) = i32::try_from(record.pid).ok().and_then(Pid::from_raw) else {
        return false;
    };
    let Ok(fd) = pidfd_open(pid, PidfdFlags::empty()) else {
        return false;
    };
    // The pidfd pins the process that held the pid when it was opened; the record is older than
    // that, so if /proc still shows the recorded start time now, the pidfd is that process.
    if !record.is_running(boot) {
        return false;
    }
    pidfd_send_signal(&fd, Signal::KILL).is_ok()
}

/// SIGKILLs every recorded QEMU of `run_dir` and waits (bounded) until they are gone.
pub async fn kill_vms(run_dir: &Path) -> Vec<u32> {
    let run_dir = run_dir.to_path_buf();
    tokio::task::spawn_blocking(move || kill_vms_blocking(&run_dir))
        .await
        .unwrap_or_default()
}

/// [`kill_vms`] for callers outside an async runtime (Drop guards).
pub fn kill_vms_blocking(run_dir: &Path) -> Vec<u32> {
    let boot = boot_id();
    let mut killed = Vec::new();
    for (_, record) in VmRecord::read_all(&run_dir.join("vms")) {
        if kill_recorded(&record, &boot) {
            tracing::warn!(pid = record.pid, vm = %record.name, "reaping orphaned QEMU");
            killed.push(record);
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while killed.iter().any(|r| r.is_running(&boot)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    killed.into_iter().map(|r| r.pid).collect()
}

/// Kills orphaned VMs, then removes VM socket dirs and every template mount except those in `keep`
/// (templates that are about to be validated and possibly reused).
pub async fn reap(layout: &Layout, keep: &[&Path]) -> Reaped {
    let processes = kill_vms(&layout.run_dir).await;
    let mut vm_dirs = 0;
    if let Ok(entries) = std::fs::read_dir(layout.vms_dir()) {
        for e in entries.filter_map(Result::ok) {
            let _ = std::fs::remove_dir_all(e.path());
            vm_dirs += 1;
        }
    }
    let mut mounts = Vec::new();
    let templates = layout.templates_dir();
    for m in mounts_under(&templates) {
        if keep.iter().any(|k| *k == m) {
            continue;
        }
        tracing::warn!(mount = %m.display(), "removing stale template mount");
        destroy_dir(&m);
        mounts.push(m);
    }
    // Leftover directories (template dirs whose mount is gone) are stale too.
    if let Ok(entries) = std::fs::read_dir(&templates) {
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            if !keep.iter().any(|k| *k == p) {
                destroy_dir(&p);
            }
        }
    }
    Reaped {
        processes,
        mounts,
        vm_dirs,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_hostile_comm() {
        let line = "42 (a) b) S 1 42 42 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 777 0 0\n";
        assert_eq!(parse_stat(line), Some(('S', 777)));
        assert_eq!(parse_stat("42 (x) Z"), None);
    }

    #[test]
    fn record_matches_only_its_own_process() {
        let r = VmRecord {
            pid: 7,
            starttime: 100,
            exe: "/usr/bin/qemu-system-x86_64".into(),
            boot_id: "b".into(),
            name: "noded-d-1".into(),
        };
        let live = ProcIdentity {
            starttime: 100,
            exe: Some("/usr/bin/qemu-system-x86_64 (deleted)".into()),
            zombie: false,
        };
        assert!(r.matches(&live, "b"));
        assert!(!r.matches(&live, "other-boot"));
        assert!(!r.matches(
            &ProcIdentity {
                starttime: 101,
                ..live.clone()
            },
            "b"
        ));
        assert!(!r.matches(
            &ProcIdentity {
                exe: Some("/usr/bin/sleep".into()),
                ..live.clone()
            },
            "b"
        ));
        assert!(!r.matches(
            &ProcIdentity {
                exe: None,
                ..live.clone()
            },
            "b"
        ));
        assert!(!r.matches(
            &ProcIdentity {
                zombie: true,
                ..live
            },
            "b"
        ));
    }
}
