//! Orphan reaping: QEMU processes, template tmpfs mounts and sockets left by a previous noded of the
//! same run dir (killed with -9, crashed, or the node rebooted under it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::template::{Layout, destroy_dir, mounts_under};

/// What a reap removed.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Reaped {
    pub processes: Vec<u32>,
    pub mounts: Vec<PathBuf>,
    pub vm_dirs: usize,
}

/// QEMU processes named `noded-...` whose sockets live under `run_dir` (started by the noded that
/// owns `run_dir`).
pub fn find_vms(run_dir: &Path) -> Vec<(u32, String)> {
    let needle = format!("{}/", run_dir.display());
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for e in entries.filter_map(Result::ok) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_qemu = args
            .first()
            .is_some_and(|a| String::from_utf8_lossy(a).contains("qemu-system"));
        if !is_qemu {
            continue;
        }
        let ours = args
            .iter()
            .any(|a| String::from_utf8_lossy(a).contains(needle.as_str()));
        if let Some(name) = args
            .windows(2)
            .find(|w| w[0] == b"-name")
            .map(|w| String::from_utf8_lossy(w[1]).into_owned())
            && name.starts_with(super::qemu::NAME_PREFIX)
            && ours
        {
            found.push((pid, name));
        }
    }
    found
}

fn alive(pid: u32) -> bool {
    // A zombie still has a /proc entry; its state letter says it is gone.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .is_some_and(|zombie| !zombie)
}

/// SIGKILLs every QEMU of `run_dir` and waits (bounded) until they are gone.
pub async fn kill_vms(run_dir: &Path) -> Vec<u32> {
    let run_dir = run_dir.to_path_buf();
    tokio::task::spawn_blocking(move || kill_vms_blocking(&run_dir))
        .await
        .unwrap_or_default()
}

/// [`kill_vms`] for callers outside an async runtime (Drop guards).
pub fn kill_vms_blocking(run_dir: &Path) -> Vec<u32> {
    let vms = find_vms(run_dir);
    for (pid, name) in &vms {
        tracing::warn!(pid, vm = %name, "reaping orphaned QEMU");
        if let Ok(p) = i32::try_from(*pid) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while vms.iter().any(|(pid, _)| alive(*pid)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    vms.into_iter().map(|(pid, _)| pid).collect()
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
