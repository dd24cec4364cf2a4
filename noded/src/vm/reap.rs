//! Orphan reaping and re-adoption: QEMU processes, template tmpfs mounts and sockets left by a
//! previous noded of the same run dir (killed with -9, crashed, restarted, or the node rebooted under
//! it).
//!
//! noded's own VMs are known by what noded started, never by what a command line says (any user can
//! name a process `qemu-system-x86_64 -name noded-x-1 /run/noded/...`): when QEMU is spawned, a
//! [`VmRecord`] (pid, start time, executable, boot id, its cgroup) is written next to its sockets,
//! under `<run_dir>/vms/<vm>/`. When the VM is handed out (AcquireVm) the record gets a [`Lease`].
//!
//! A restarted noded sorts the records: a VM in use ([`Lease`]) whose process still matches its
//! record and whose template is still configured is *adopted* ([`AdoptedVm`]): its directory,
//! sockets and cgroup stay, its pool counts it, and ReleaseVm with the old handle destroys it. Every
//! other matching process (idle pooled clones, a template being built, VMs of a template no longer
//! configured) is SIGKILLed through a pidfd, so a pid recycled in between is never signalled; records
//! from another boot or of dead processes are removed with their directories and cgroups.
//!
//! Template tmpfs mounts are reaped as before (those of configured templates are kept for
//! validation). An adopted clone maps its template's memory file: unmounting the tmpfs (MNT_DETACH)
//! or rebuilding the template never takes the file from under it, because the kernel keeps a
//! detached tmpfs, and the pages of a mapped file, until the last mapping is gone.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::cgroup::VmCgroup;
use super::template::{Layout, destroy_dir, mounts_under};

/// The record's file name inside a VM's socket directory.
pub const RECORD_FILE: &str = "process.json";

/// What a reap removed (and kept).
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Reaped {
    /// Processes killed.
    pub processes: Vec<u32>,
    pub mounts: Vec<PathBuf>,
    /// VM directories removed.
    pub vm_dirs: usize,
    /// VMs in use that were adopted (left running), by pid.
    pub adopted: Vec<u32>,
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
    /// The VM's own cgroup directories (`vm::cgroup`), one per hierarchy; removed with the VM.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cgroup: Vec<PathBuf>,
    /// Set when the VM is handed out: it then outlives noded (restart, crash, upgrade).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<Lease>,
}

/// A VM handed out by AcquireVm and not yet released, as recorded next to the VM.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Lease {
    /// The handle ReleaseVm takes: the VM's id, also its directory's name.
    pub vm_id: String,
    /// The `[[templates]]` name it belongs to (counted against its `max_vms_in_use`).
    pub template: String,
    /// Template generation it was cloned from; `None` for a cold boot (a pool miss).
    #[serde(default)]
    pub generation: Option<String>,
    /// Console socket the caller was given.
    pub console: PathBuf,
    pub acquired_unix_ms: u64,
    #[serde(default)]
    pub from_pool: bool,
    #[serde(default)]
    pub cold: bool,
}

impl Lease {
    /// Now, in milliseconds since the epoch (for `acquired_unix_ms`).
    pub fn now_unix_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or_default()
    }
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
            cgroup: Vec::new(),
            lease: None,
        })
    }

    /// The record with the VM's cgroup directories (none when it joined no cgroup).
    pub fn in_cgroup(mut self, cgroup: Option<&VmCgroup>) -> Self {
        self.cgroup = cgroup.map(|c| c.dirs.clone()).unwrap_or_default();
        self
    }

    /// Writes the record into `dir`, atomically (a reader sees the old record or the new one; a
    /// planted file or symlink at the temp name fails the write). No fsync: the run dir is a tmpfs
    /// and a record means nothing after a reboot.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        let json = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        crate::fsutil::write_atomic_with(
            &dir.join(RECORD_FILE),
            &json,
            crate::fsutil::WriteOptions::exact(0o600).volatile(),
        )
        .map_err(|e| std::io::Error::new(e.source.kind(), e.to_string()))
    }

    /// The record in `dir`.
    pub fn read(dir: &Path) -> std::io::Result<VmRecord> {
        let bytes = std::fs::read(dir.join(RECORD_FILE))?;
        serde_json::from_slice(&bytes).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{}: {e}", dir.join(RECORD_FILE).display()),
            )
        })
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

/// A pidfd for the recorded process, opened *before* its identity is checked: it pins the process
/// that held the pid when it was opened, and the record is older than that, so if `/proc` still
/// shows the recorded start time afterwards, the pidfd is the recorded process. `None` when that
/// process is gone (or the pid is another process now).
fn open_recorded(record: &VmRecord, boot: &str) -> Option<OwnedFd> {
    use rustix::process::{Pid, PidfdFlags, pidfd_open};
    let pid = i32::try_from(record.pid).ok().and_then(Pid::from_raw)?;
    let fd = pidfd_open(pid, PidfdFlags::empty()).ok()?;
    record.is_running(boot).then_some(fd)
}

/// SIGKILL through a pidfd: reaches the process the pidfd was opened for, or nobody.
fn kill_pidfd(fd: &OwnedFd) -> bool {
    use rustix::process::{Signal, pidfd_send_signal};
    pidfd_send_signal(fd, Signal::KILL).is_ok()
}

/// Waits (bounded) until none of `records` runs any more.
fn wait_gone(records: &[VmRecord], boot: &str, timeout: Duration) {
    let deadline = std::time::Instant::now() + timeout;
    while records.iter().any(|r| r.is_running(boot)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Removes the VM cgroup directories a record names (the VM must be gone).
fn remove_cgroup(record: &VmRecord) {
    if !record.cgroup.is_empty() {
        VmCgroup {
            dirs: record.cgroup.clone(),
        }
        .remove();
    }
}

/// Removes a VM's directory and then the cgroup its record names. What every destroyed VM goes
/// through (backends call it from `kill`), so no path leaves a cgroup behind.
pub fn remove_vm_dir(dir: &Path) {
    let record = VmRecord::read(dir).ok();
    let _ = std::fs::remove_dir_all(dir);
    if let Some(r) = record {
        remove_cgroup(&r);
    }
}

/// Marks the VM in `dir` as handed out: its record gets `lease` (atomically, before the caller is
/// told about the VM, so a noded killed right after still finds the lease). The record must still
/// be that of `pid`.
pub fn record_lease(dir: &Path, pid: u32, lease: &Lease) -> std::io::Result<()> {
    let mut record = VmRecord::read(dir)?;
    if record.pid != pid {
        return Err(std::io::Error::other(format!(
            "{}: records pid {}, the VM is pid {pid}",
            dir.join(RECORD_FILE).display(),
            record.pid
        )));
    }
    record.lease = Some(lease.clone());
    record.write(dir)
}

/// A VM in use left by a previous noded, still running as recorded: its pool takes it over.
#[derive(Debug)]
pub struct AdoptedVm {
    pub dir: PathBuf,
    pub record: VmRecord,
    pub lease: Lease,
    /// Opened while the identity matched: signals reach this process or nobody.
    pidfd: OwnedFd,
}

impl AdoptedVm {
    pub fn pid(&self) -> u32 {
        self.record.pid
    }

    /// Kills the VM (through its pidfd), waits until it is gone, removes its directory and cgroup.
    /// It is not noded's child any more: its new parent (init, or a subreaper) reaps it.
    pub async fn destroy(self) {
        let _ = tokio::task::spawn_blocking(move || self.destroy_blocking()).await;
    }

    fn destroy_blocking(self) {
        if kill_pidfd(&self.pidfd) {
            wait_gone(
                std::slice::from_ref(&self.record),
                &boot_id(),
                Duration::from_secs(5),
            );
        }
        remove_vm_dir(&self.dir);
        tracing::info!(vm = %self.lease.vm_id, pid = self.record.pid, "adopted VM destroyed");
    }
}

/// Which leased VMs a reap leaves running.
#[derive(Debug, Clone)]
pub enum KeepLeases {
    /// Noded starting: VMs in use of these templates (the configured ones) are adopted, the rest
    /// reaped.
    Of(Vec<String>),
    /// Noded stopping: every VM in use stays (its caller still uses it); the next noded adopts it.
    All,
    /// Everything dies (test cleanup).
    None,
}

impl KeepLeases {
    fn keeps(&self, dir: &Path, lease: &Lease) -> bool {
        // A lease copied into another VM's directory, or naming something that cannot be a
        // template, is no lease.
        let consistent = dir.file_name() == Some(std::ffi::OsStr::new(&lease.vm_id))
            && crate::names::check_label(&lease.vm_id).is_ok()
            && crate::names::check_label(&lease.template).is_ok();
        consistent
            && match self {
                Self::Of(templates) => templates.contains(&lease.template),
                Self::All => true,
                Self::None => false,
            }
    }
}

/// What [`sort_vms`] did.
struct Sorted {
    killed: Vec<u32>,
    adopted: Vec<AdoptedVm>,
    removed_dirs: usize,
}

/// Sorts every VM directory of `vms_dir`: adopts what `keep` keeps and still runs as recorded,
/// SIGKILLs every other recorded process that still runs, then removes the directories (and
/// cgroups) of everything not adopted.
fn sort_vms(vms_dir: &Path, keep: &KeepLeases) -> Sorted {
    let boot = boot_id();
    let mut killed = Vec::new();
    let mut adopted = Vec::new();
    let mut records = Vec::new();
    for (dir, record) in VmRecord::read_all(vms_dir) {
        let pidfd = open_recorded(&record, &boot);
        match (pidfd, &record.lease) {
            (Some(pidfd), Some(lease)) if keep.keeps(&dir, lease) => {
                tracing::info!(vm = %lease.vm_id, template = %lease.template, pid = record.pid, "adopting VM in use");
                adopted.push(AdoptedVm {
                    lease: lease.clone(),
                    dir,
                    record,
                    pidfd,
                });
                continue;
            }
            (Some(pidfd), lease) => {
                if kill_pidfd(&pidfd) {
                    tracing::warn!(pid = record.pid, vm = %record.name, in_use = lease.is_some(), "reaping orphaned QEMU");
                    killed.push(record.clone());
                }
            }
            (None, _) => {}
        }
        records.push(record);
    }
    wait_gone(&killed, &boot, Duration::from_secs(5));
    let mut removed_dirs = 0;
    if let Ok(entries) = std::fs::read_dir(vms_dir) {
        for e in entries.filter_map(Result::ok) {
            let p = e.path();
            if adopted.iter().any(|a| a.dir == p) {
                continue;
            }
            let _ = std::fs::remove_dir_all(&p);
            removed_dirs += 1;
        }
    }
    for r in &records {
        remove_cgroup(r);
    }
    Sorted {
        killed: killed.into_iter().map(|r| r.pid).collect(),
        adopted,
        removed_dirs,
    }
}

/// SIGKILLs every recorded QEMU of `run_dir`, in use or not, and waits (bounded) until they are
/// gone; their directories stay.
pub async fn kill_vms(run_dir: &Path) -> Vec<u32> {
    let run_dir = run_dir.to_path_buf();
    tokio::task::spawn_blocking(move || kill_vms_blocking(&run_dir))
        .await
        .unwrap_or_default()
}

/// [`kill_vms`] for callers outside an async runtime (Drop guards). The cgroups of the killed VMs
/// are removed.
pub fn kill_vms_blocking(run_dir: &Path) -> Vec<u32> {
    let boot = boot_id();
    let mut killed = Vec::new();
    for (_, record) in VmRecord::read_all(&run_dir.join("vms")) {
        if let Some(fd) = open_recorded(&record, &boot)
            && kill_pidfd(&fd)
        {
            tracing::warn!(pid = record.pid, vm = %record.name, "reaping orphaned QEMU");
            killed.push(record);
        }
    }
    wait_gone(&killed, &boot, Duration::from_secs(5));
    for r in &killed {
        remove_cgroup(r);
    }
    killed.into_iter().map(|r| r.pid).collect()
}

/// [`reap_adopting`] that adopts nothing: every recorded VM dies.
pub async fn reap(layout: &Layout, keep: &[&Path]) -> Reaped {
    reap_adopting(layout, keep, KeepLeases::None).await.0
}

/// Kills orphaned VMs except the VMs in use that `leases` keeps (returned, still running, for their
/// pools), removes every other VM directory, and every template mount except those in `keep`
/// (templates that are about to be validated and possibly reused).
pub async fn reap_adopting(
    layout: &Layout,
    keep: &[&Path],
    leases: KeepLeases,
) -> (Reaped, Vec<AdoptedVm>) {
    let vms_dir = layout.vms_dir();
    let sorted = tokio::task::spawn_blocking(move || sort_vms(&vms_dir, &leases))
        .await
        .unwrap_or(Sorted {
            killed: Vec::new(),
            adopted: Vec::new(),
            removed_dirs: 0,
        });
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
    let reaped = Reaped {
        processes: sorted.killed,
        mounts,
        vm_dirs: sorted.removed_dirs,
        adopted: sorted.adopted.iter().map(AdoptedVm::pid).collect(),
    };
    (reaped, sorted.adopted)
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
            cgroup: Vec::new(),
            lease: None,
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

    fn record() -> VmRecord {
        VmRecord {
            pid: 7,
            starttime: 100,
            exe: "/usr/bin/qemu-system-x86_64".into(),
            boot_id: "b".into(),
            name: "noded-d-0123456789ab".into(),
            cgroup: Vec::new(),
            lease: None,
        }
    }

    #[test]
    fn record_with_lease_and_cgroup_round_trips() {
        let dir = tempfile::tempdir().expect("tmp");
        let vm = dir.path().join("0123456789ab");
        std::fs::create_dir(&vm).expect("mkdir");
        let mut r = record();
        r.write(&vm).expect("write");
        assert_eq!(VmRecord::read(&vm).expect("read"), r);
        let lease = Lease {
            vm_id: "0123456789ab".into(),
            template: "d".into(),
            generation: Some("1a2b3c4d".into()),
            console: vm.join("console.sock"),
            acquired_unix_ms: 1_700_000_000_000,
            from_pool: true,
            cold: false,
        };
        r.cgroup = vec!["/sys/fs/cgroup/noded-vms/0123456789ab".into()];
        r.write(&vm).expect("write");
        record_lease(&vm, 7, &lease).expect("lease");
        let back = VmRecord::read(&vm).expect("read");
        assert_eq!(back.lease.as_ref(), Some(&lease));
        assert_eq!(back.cgroup, r.cgroup);
        assert_eq!(
            record_lease(&vm, 8, &lease)
                .expect_err("another pid")
                .kind(),
            std::io::ErrorKind::Other
        );
        let names: Vec<String> = std::fs::read_dir(&vm)
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [RECORD_FILE], "no temp file left behind");
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(vm.join(RECORD_FILE))
                .expect("stat")
                .permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn records_of_older_releases_read_as_idle() {
        let old = r#"{"pid":7,"starttime":100,"exe":"/usr/bin/qemu-system-x86_64","boot_id":"b","name":"noded-d-1"}"#;
        let r: VmRecord = serde_json::from_str(old).expect("old record");
        assert_eq!((r.lease, r.cgroup.len()), (None, 0));
        // Nothing new is written for an idle VM either: older readers keep working.
        let json = serde_json::to_string(&record()).expect("json");
        assert!(
            !json.contains("lease") && !json.contains("cgroup"),
            "{json}"
        );
    }

    #[test]
    fn only_consistent_leases_of_kept_templates_are_kept() {
        let lease = Lease {
            vm_id: "0123456789ab".into(),
            template: "d".into(),
            generation: None,
            console: "/run/noded/vms/0123456789ab/console.sock".into(),
            acquired_unix_ms: 0,
            from_pool: false,
            cold: true,
        };
        let dir = Path::new("/run/noded/vms/0123456789ab");
        let configured = KeepLeases::Of(vec!["d".into()]);
        assert!(configured.keeps(dir, &lease));
        assert!(!KeepLeases::Of(vec!["other".into()]).keeps(dir, &lease));
        assert!(KeepLeases::All.keeps(dir, &lease));
        assert!(!KeepLeases::None.keeps(dir, &lease));
        assert!(
            !configured.keeps(Path::new("/run/noded/vms/ffffffffffff"), &lease),
            "a lease copied into another VM's directory"
        );
        let hostile = Lease {
            template: "../d".into(),
            ..lease.clone()
        };
        assert!(!KeepLeases::All.keeps(dir, &hostile));
    }
}
