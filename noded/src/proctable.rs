//! The host's process table, read through procfs: the one way noded lists processes, reads their
//! command lines and accounts their memory. The VM scan ([`crate::observe::procscan`]), the private
//! containerd's shim cleanup and the VM pool's clone cost all read `/proc` through here or through
//! procfs directly; nothing parses `/proc/<pid>/cmdline` or `smaps` by hand.
//!
//! PSS is the figure density planning uses: pages shared between clones of one template (the template's
//! memory file, QEMU's own text) are split between the processes mapping them, so summing PSS over all
//! VMs never counts a shared page twice. RSS over-counts shared pages; private (clean + dirty) is what
//! killing the process would give back.

use std::ops::{Add, AddAssign};
use std::path::Path;

use procfs::process::{MMapPath, Process};

/// One process and its command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub pid: i32,
    pub argv: Vec<String>,
}

/// Every process under `proc_root` (`/proc`, or a synthetic tree in tests) whose command line could
/// be read. Processes that exit during the walk, kernel threads and zombies (empty command line) and
/// processes we may not read are left out: a listing is a snapshot, never an error.
pub fn list(proc_root: &Path) -> Vec<Entry> {
    let Ok(all) = procfs::process::all_processes_with_root(proc_root) else {
        return Vec::new();
    };
    all.flatten()
        .filter_map(|p| {
            let argv = p.cmdline().ok().filter(|a| !a.is_empty())?;
            Some(Entry { pid: p.pid(), argv })
        })
        .collect()
}

/// Pids of the processes under `proc_root` whose command line satisfies `pred`.
pub fn pids_where(proc_root: &Path, pred: impl Fn(&[String]) -> bool) -> Vec<i32> {
    list(proc_root)
        .into_iter()
        .filter(|e| pred(&e.argv))
        .map(|e| e.pid)
        .collect()
}

/// Memory of one process or a sum of processes, in bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryUsage {
    pub rss: u64,
    pub pss: u64,
    /// Private_Clean + Private_Dirty.
    pub private: u64,
}

impl Add for MemoryUsage {
    type Output = MemoryUsage;
    fn add(self, o: MemoryUsage) -> MemoryUsage {
        MemoryUsage {
            rss: self.rss.saturating_add(o.rss),
            pss: self.pss.saturating_add(o.pss),
            private: self.private.saturating_add(o.private),
        }
    }
}

impl AddAssign for MemoryUsage {
    fn add_assign(&mut self, o: MemoryUsage) {
        *self = *self + o;
    }
}

impl std::iter::Sum for MemoryUsage {
    fn sum<I: Iterator<Item = MemoryUsage>>(iter: I) -> MemoryUsage {
        iter.fold(MemoryUsage::default(), Add::add)
    }
}

/// Reads `smaps_rollup` of `process`. A kernel thread or zombie has an empty rollup: that is zero, not
/// an error.
pub fn read_rollup(process: &Process) -> procfs::ProcResult<MemoryUsage> {
    let rollup = process.smaps_rollup()?;
    let Some(map) = rollup.memory_map_rollup.0.first() else {
        return Ok(MemoryUsage::default());
    };
    let field = |k: &str| map.extension.map.get(k).copied().unwrap_or(0);
    Ok(MemoryUsage {
        rss: field("Rss"),
        pss: field("Pss"),
        private: field("Private_Clean").saturating_add(field("Private_Dirty")),
    })
}

/// [`read_rollup`] of the process `pid` in the real `/proc`.
pub fn memory_of(pid: u32) -> procfs::ProcResult<MemoryUsage> {
    let pid = i32::try_from(pid).map_err(|_| procfs::ProcError::NotFound(None))?;
    read_rollup(&Process::new(pid)?)
}

/// Private bytes (clean + dirty) of the mappings of `file` in `pid` (real `/proc`), from its
/// `smaps`: for a VM whose guest RAM is `file`, the pages it copied on write.
pub fn mapping_private(pid: u32, file: &Path) -> procfs::ProcResult<u64> {
    let pid = i32::try_from(pid).map_err(|_| procfs::ProcError::NotFound(None))?;
    let maps = Process::new(pid)?.smaps()?;
    Ok(maps
        .into_iter()
        .filter(|m| matches!(&m.pathname, MMapPath::Path(p) if p == file))
        .map(|m| {
            let field = |k: &str| m.extension.map.get(k).copied().unwrap_or(0);
            field("Private_Clean").saturating_add(field("Private_Dirty"))
        })
        .sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_this_process_with_its_command_line() {
        let me = i32::try_from(std::process::id()).expect("pid");
        let found = list(Path::new("/proc"));
        let entry = found
            .iter()
            .find(|e| e.pid == me)
            .expect("own process listed");
        let exe = std::env::current_exe().expect("exe");
        let name = exe.file_name().expect("name").to_string_lossy();
        assert!(entry.argv[0].ends_with(name.as_ref()), "{entry:?}");
        assert!(pids_where(Path::new("/proc"), |a| a == entry.argv.as_slice()).contains(&me));
    }

    #[test]
    fn own_memory_and_a_mapped_file() {
        let me = std::process::id();
        // The relocated data of this test binary is copied on write: private to this process.
        let exe = std::fs::read_link("/proc/self/exe").expect("own exe");
        let private = mapping_private(me, &exe).expect("own smaps");
        // Read after: the process only grew in between.
        let m = memory_of(me).expect("own smaps_rollup");
        assert!(m.rss > 0 && m.pss > 0 && m.private > 0, "{m:?}");
        assert!(private > 0 && private <= m.rss, "{private} of {m:?}");
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            mapping_private(me, &dir.path().join("not-mapped")).expect("own smaps"),
            0
        );
    }
}
