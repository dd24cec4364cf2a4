//! noded's own cgroup for VM processes (`daemon.vm_cgroup`).
//!
//! A container runtime stops a container by killing the processes of the container's cgroup: runc
//! writes `cgroup.kill` (v2) or freezes the container and signals every pid listed under its `devices`
//! hierarchy, subtree included (v1); systemd stops the scope's processes (`name=systemd`, or the
//! unified hierarchy in hybrid mode). QEMU is noded's child and starts in noded's cgroup, so a restart
//! of noded's container (crash, DaemonSet image upgrade) would kill every VM a caller is using. At
//! spawn each QEMU therefore moves into `<cgroup root>/<vm_cgroup>/<vm>`: one cgroup per VM, outside
//! noded's container, removed when the VM is destroyed.
//!
//! - cgroup v2 (`/sys/fs/cgroup/cgroup.controllers` exists): one hierarchy, the pid is written to
//!   `cgroup.procs` of the VM's directory.
//! - v1 / hybrid: one hierarchy per mount under `/sys/fs/cgroup` (`pids`, `memory`, `devices`, `cpu`,
//!   `freezer`, the named `systemd` one, `unified`, ...); the VM joins every one, because each runtime
//!   finds a container's processes through another of them. A v1 `cpuset` child starts without CPUs and
//!   memory nodes: they are copied from its parent before a process can join.
//!
//! When the cgroup filesystem is not writable (noded not root, read-only mount) or the VM cgroup would
//! still be inside noded's own cgroup (noded in its own cgroup namespace), a warning is logged once and
//! [`status`] says why: VMs then run, but die with noded's container.
//!
//! The setting is process-wide ([`install`]): one noded process has one VM cgroup, and the one call at
//! spawn ([`enter`]) needs no plumbing through every launcher.

use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Where the cgroup filesystem is mounted (privileged containers share the host's cgroup namespace
/// under containerd's CRI, so this is the host's hierarchy in the DaemonSet too).
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The validated `daemon.vm_cgroup`: a path relative to the cgroup root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Setting {
    /// Mount point of the cgroup filesystem ([`CGROUP_ROOT`]; a temp tree in unit tests).
    pub root: PathBuf,
    pub path: PathBuf,
}

impl Setting {
    /// `value` of `daemon.vm_cgroup`; `None` for `""` (off). The error is the message after the
    /// field name.
    pub fn parse(value: &str) -> Result<Option<Setting>, String> {
        if value.is_empty() {
            return Ok(None);
        }
        let p = Path::new(value);
        if p.is_absolute() {
            return Err(format!(
                "`{value}` is absolute; give it relative to {CGROUP_ROOT} (e.g. \"noded-vms\")"
            ));
        }
        for c in p.components() {
            match c {
                Component::Normal(n) => {
                    let n = n.to_string_lossy();
                    // Control files are named `<controller>.<knob>`; `cgroup.*` is the core's.
                    if n.starts_with("cgroup.") {
                        return Err(format!(
                            "`{value}`: component `{n}` would collide with cgroup control files"
                        ));
                    }
                    if !n
                        .chars()
                        .all(|ch| ch.is_ascii_alphanumeric() || matches!(ch, '-' | '_' | '.' | '@'))
                    {
                        return Err(format!(
                            "`{value}`: component `{n}` may only hold letters, digits, `-`, `_`, `.`, `@`"
                        ));
                    }
                }
                Component::ParentDir => {
                    return Err(format!(
                        "`{value}` contains `..`; it must stay under {CGROUP_ROOT}"
                    ));
                }
                Component::CurDir => {
                    return Err(format!("`{value}` contains `.` components"));
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(format!("`{value}` is absolute"));
                }
            }
        }
        Ok(Some(Setting {
            root: PathBuf::from(CGROUP_ROOT),
            path: p.to_path_buf(),
        }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("{path}: {action}: {source}")]
    Io {
        path: PathBuf,
        action: &'static str,
        source: std::io::Error,
    },
    #[error("{root}: no cgroup hierarchy is mounted there")]
    NoHierarchy { root: PathBuf },
    #[error(
        "VM cgroup {vm} is inside noded's own cgroup {own} ({hierarchy}): noded's container would still kill it"
    )]
    Inside {
        hierarchy: String,
        vm: String,
        own: String,
    },
    #[error(
        "noded runs in its own cgroup namespace: every cgroup it can reach is inside its container"
    )]
    Namespace,
}

fn io<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        path: path.to_path_buf(),
        action,
        source,
    }
}

/// One mounted hierarchy (the whole tree in v2).
#[derive(Debug, Clone)]
struct Hierarchy {
    /// `<root>` (v2) or `<root>/<mount>` (v1).
    mount: PathBuf,
    /// v1 cpuset: children must be given CPUs and memory nodes before a process can join.
    cpuset: bool,
}

/// The hierarchies under `root` and the parent cgroup of every VM in each.
#[derive(Debug, Clone)]
pub struct VmCgroups {
    setting: Setting,
    hierarchies: Vec<Hierarchy>,
}

/// One VM's cgroup: its directory in every hierarchy it joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmCgroup {
    pub dirs: Vec<PathBuf>,
}

/// The cgroup hierarchies mounted at `root`.
fn hierarchies(root: &Path) -> Result<Vec<Hierarchy>, CgroupError> {
    if root.join("cgroup.controllers").exists() {
        return Ok(vec![Hierarchy {
            mount: root.to_path_buf(),
            cpuset: false,
        }]);
    }
    let mut found = Vec::new();
    for e in std::fs::read_dir(root)
        .map_err(io(root, "list"))?
        .filter_map(Result::ok)
    {
        // `cpu -> cpu,cpuacct` style aliases are symlinks: the real mount is listed once.
        if !e.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let mount = e.path();
        if !mount.join("cgroup.procs").exists() {
            continue;
        }
        let name = e.file_name().to_string_lossy().into_owned();
        found.push(Hierarchy {
            cpuset: name.split(',').any(|c| c == "cpuset"),
            mount,
        });
    }
    found.sort_by(|a, b| a.mount.cmp(&b.mount));
    if found.is_empty() {
        return Err(CgroupError::NoHierarchy {
            root: root.to_path_buf(),
        });
    }
    Ok(found)
}

/// `mkdir` that accepts an existing directory; a fresh v1 cpuset child gets its parent's CPUs and
/// memory nodes (it starts with none, and no process can join an empty cpuset).
fn make_dir(dir: &Path, cpuset: bool) -> Result<(), CgroupError> {
    match std::fs::create_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io(dir, "create cgroup")(e)),
    }
    if cpuset && let Some(parent) = dir.parent() {
        for knob in ["cpuset.cpus", "cpuset.mems"] {
            let mine = dir.join(knob);
            let current = std::fs::read_to_string(&mine).map_err(io(&mine, "read"))?;
            if current.trim().is_empty() {
                let theirs = parent.join(knob);
                let value = std::fs::read_to_string(&theirs).map_err(io(&theirs, "read"))?;
                std::fs::write(&mine, value.trim()).map_err(io(&mine, "write"))?;
            }
        }
    }
    Ok(())
}

/// `mkdir -p <mount>/<rel>` one level at a time (cpuset needs every level initialised).
fn make_path(h: &Hierarchy, rel: &Path) -> Result<PathBuf, CgroupError> {
    let mut dir = h.mount.clone();
    for c in rel.components() {
        dir.push(c);
        make_dir(&dir, h.cpuset)?;
    }
    Ok(dir)
}

impl VmCgroups {
    /// Finds the hierarchies and creates the VM parent cgroup in each.
    pub fn open(setting: &Setting) -> Result<Self, CgroupError> {
        let hierarchies = hierarchies(&setting.root)?;
        for h in &hierarchies {
            make_path(h, &setting.path)?;
        }
        Ok(Self {
            setting: setting.clone(),
            hierarchies,
        })
    }

    /// The VM parent cgroup's directory in each hierarchy.
    pub fn parents(&self) -> Vec<PathBuf> {
        self.hierarchies
            .iter()
            .map(|h| h.mount.join(&self.setting.path))
            .collect()
    }

    /// Moves `pid` into `<vm_cgroup>/<leaf>` in every hierarchy. Hierarchies that refuse are skipped
    /// (the VM is in the cgroup of the others) and returned as errors.
    pub fn enter(&self, pid: u32, leaf: &str) -> (VmCgroup, Vec<CgroupError>) {
        let rel = self.setting.path.join(leaf);
        let mut dirs = Vec::new();
        let mut errors = Vec::new();
        for h in &self.hierarchies {
            let joined = make_path(h, &rel).and_then(|dir| {
                let procs = dir.join("cgroup.procs");
                std::fs::write(&procs, pid.to_string())
                    .map_err(io(&procs, "move the VM in"))
                    .map(|()| dir)
            });
            match joined {
                Ok(dir) => dirs.push(dir),
                Err(e) => {
                    // An empty leaf left by the failure is not the VM's: remove it now.
                    let _ = std::fs::remove_dir(h.mount.join(&rel));
                    errors.push(e);
                }
            }
        }
        (VmCgroup { dirs }, errors)
    }

    /// Removes the VM parent cgroups if no VM is left in them (noded stopping).
    pub fn remove_parents(&self) {
        for dir in self.parents() {
            let mut d = dir.as_path();
            // Up to (not including) the hierarchy's mount: `a/b` removes `a/b`, then `a`.
            for _ in self.setting.path.components() {
                if std::fs::remove_dir(d).is_err() {
                    break;
                }
                match d.parent() {
                    Some(p) => d = p,
                    None => break,
                }
            }
        }
    }
}

/// Whether `path` is a directory on a cgroup filesystem (what a record may name for removal).
fn on_cgroupfs(path: &Path) -> bool {
    use nix::sys::statfs::{CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC, statfs};
    statfs(path).is_ok_and(|s| {
        let t = s.filesystem_type();
        t == CGROUP_SUPER_MAGIC || t == CGROUP2_SUPER_MAGIC
    })
}

impl VmCgroup {
    /// Removes the VM's cgroup directories. The VM must be gone: a cgroup with a process in it is
    /// not removable (EBUSY), and a just-killed process leaves it within milliseconds, so EBUSY is
    /// retried briefly. Only directories on a cgroup filesystem are touched (the paths come from a
    /// record file). Returns whether everything is gone.
    pub fn remove(&self) -> bool {
        let mut all = true;
        for dir in &self.dirs {
            if !dir.is_absolute()
                || dir.components().any(|c| c == Component::ParentDir)
                || !on_cgroupfs(dir)
            {
                all &= !dir.exists();
                continue;
            }
            let mut removed = false;
            for _ in 0..50 {
                match std::fs::remove_dir(dir) {
                    Ok(()) => {
                        removed = true;
                        break;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        removed = true;
                        break;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => {
                        tracing::warn!(cgroup = %dir.display(), error = %e, "cannot remove VM cgroup");
                        break;
                    }
                }
            }
            all &= removed;
        }
        all
    }
}

/// `(hierarchy, path)` pairs of a `/proc/<pid>/cgroup` file (`id:controllers:path` lines).
pub fn parse_proc_cgroup(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (id, rest) = l.split_once(':')?;
            let (controllers, path) = rest.split_once(':')?;
            Some((format!("{id}:{controllers}"), path.to_string()))
        })
        .collect()
}

/// The first hierarchy in which the VM (`vm`, a `/proc/<pid>/cgroup`) is still at or below noded's
/// own cgroup (`own`). noded at a hierarchy's root is not inside a container there.
pub fn still_inside(own: &str, vm: &str) -> Option<CgroupError> {
    let own = parse_proc_cgroup(own);
    for (hierarchy, path) in parse_proc_cgroup(vm) {
        let Some((_, mine)) = own.iter().find(|(h, _)| *h == hierarchy) else {
            continue;
        };
        if mine == "/" {
            continue;
        }
        if path == *mine || path.starts_with(&format!("{mine}/")) {
            return Some(CgroupError::Inside {
                hierarchy,
                vm: path,
                own: mine.clone(),
            });
        }
    }
    None
}

/// Whether noded has a cgroup namespace of its own (`/proc/1` is the host's init with hostPID). An
/// unreadable link says nothing.
fn own_cgroup_namespace() -> bool {
    match (
        std::fs::read_link("/proc/self/ns/cgroup"),
        std::fs::read_link("/proc/1/ns/cgroup"),
    ) {
        (Ok(a), Ok(b)) => a != b,
        _ => false,
    }
}

/// What `Status` reports about VM cgroups.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CgroupStatus {
    /// `daemon.vm_cgroup` in use (empty: off).
    pub path: String,
    /// Why VMs would not survive a restart of noded's container (empty: they do, as far as noded
    /// can tell).
    pub error: String,
}

struct Installed {
    cgroups: Option<VmCgroups>,
    status: Mutex<CgroupStatus>,
    warned: AtomicBool,
}

impl Installed {
    /// Logs the first problem once (a failing cgroup fs would otherwise log for every clone) and
    /// keeps the latest in the status.
    fn problem(&self, e: &CgroupError) {
        let msg = crate::config::one_line(&e.to_string());
        if !self.warned.swap(true, Ordering::Relaxed) {
            tracing::warn!(error = %msg, "VM cgroup (daemon.vm_cgroup): VMs will not survive a restart of noded's container");
        }
        self.status.lock().unwrap_or_else(|p| p.into_inner()).error = msg;
    }
}

static CURRENT: RwLock<Option<Arc<Installed>>> = RwLock::new(None);

fn current() -> Option<Arc<Installed>> {
    CURRENT.read().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Sets the process-wide VM cgroup (`None`: VMs stay where noded is). Creates the parent cgroups;
/// a failure is logged once and reported by [`status`], VMs then stay in noded's cgroup.
pub fn install(setting: Option<&Setting>) -> CgroupStatus {
    let installed = match setting {
        None => None,
        Some(s) => {
            let status = CgroupStatus {
                path: s.path.display().to_string(),
                error: String::new(),
            };
            let opened = if own_cgroup_namespace() {
                Err(CgroupError::Namespace)
            } else {
                VmCgroups::open(s)
            };
            let (cgroups, problem) = match opened {
                Ok(c) => (Some(c), None),
                Err(e) => (None, Some(e)),
            };
            let i = Installed {
                cgroups,
                status: Mutex::new(status),
                warned: AtomicBool::new(false),
            };
            if let Some(e) = problem {
                i.problem(&e);
            }
            Some(Arc::new(i))
        }
    };
    *CURRENT.write().unwrap_or_else(|p| p.into_inner()) = installed;
    status()
}

/// The installed setting's state.
pub fn status() -> CgroupStatus {
    current()
        .map(|i| i.status.lock().unwrap_or_else(|p| p.into_inner()).clone())
        .unwrap_or_default()
}

/// Moves a just-spawned VM process into its own cgroup, named after its directory (`vm_dir`'s last
/// component): the one call at spawn (`backend::record_spawn`). Synchronous for that caller; on a
/// multi-threaded runtime the worker hands its other tasks off while a v1 migration waits for an
/// RCU grace period (~15 ms). Idempotent: a process already in its cgroup is not moved again.
/// `None` when no VM cgroup is installed or none could be joined.
pub fn enter(pid: u32, vm_dir: &Path) -> Option<VmCgroup> {
    let installed = current()?;
    let cgroups = installed.cgroups.as_ref()?;
    let leaf = vm_dir.file_name()?.to_string_lossy().into_owned();
    let run = || {
        let wanted = format!("/{}/{leaf}", cgroups.setting.path.display());
        let now = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let placed = parse_proc_cgroup(&now);
        if !placed.is_empty() && placed.iter().all(|(_, p)| p.ends_with(&wanted)) {
            return Some(VmCgroup {
                dirs: cgroups
                    .parents()
                    .into_iter()
                    .map(|d| d.join(&leaf))
                    .collect(),
            });
        }
        let (cgroup, errors) = cgroups.enter(pid, &leaf);
        for e in &errors {
            installed.problem(e);
        }
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let vm = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        if let Some(e) = still_inside(&own, &vm) {
            installed.problem(&e);
        }
        (!cgroup.dirs.is_empty()).then_some(cgroup)
    };
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(run)
        }
        _ => run(),
    }
}

/// Removes the installed VM parent cgroups where they are empty (noded stopping; VMs still in use
/// keep theirs).
pub fn remove_empty_parents() {
    if let Some(c) = current().as_ref().and_then(|i| i.cgroups.as_ref()) {
        c.remove_parents();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setting_refuses_absolute_dotdot_and_control_names() {
        assert_eq!(Setting::parse("").expect("off"), None);
        let s = Setting::parse("noded-vms").expect("ok").expect("on");
        assert_eq!(s.path, PathBuf::from("noded-vms"));
        assert_eq!(s.root, PathBuf::from(CGROUP_ROOT));
        assert!(Setting::parse("system.slice/noded-vms.slice").is_ok());
        for (bad, says) in [
            ("/sys/fs/cgroup/x", "absolute"),
            ("../escape", ".."),
            ("a/../../b", ".."),
            ("./a", "`.`"),
            ("a/cgroup.procs", "control files"),
            ("a b", "letters"),
            ("a\nb", "letters"),
        ] {
            let e = Setting::parse(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains('\n') || bad.contains('\n'), "{e}");
        }
    }

    #[test]
    fn inside_check_compares_each_hierarchy() {
        let own = "9:name=systemd:/\n8:pids:/kubepods/pod1/c1\n4:memory:/kubepods/pod1/c1\n0::/\n";
        let out = "9:name=systemd:/noded-vms/a\n8:pids:/noded-vms/a\n4:memory:/noded-vms/a\n0::/noded-vms/a\n";
        assert!(still_inside(own, out).is_none());
        let partly =
            "9:name=systemd:/noded-vms/a\n8:pids:/kubepods/pod1/c1\n4:memory:/noded-vms/a\n";
        match still_inside(own, partly) {
            Some(CgroupError::Inside { hierarchy, .. }) => assert_eq!(hierarchy, "8:pids"),
            other => panic!("{other:?}"),
        }
        let below = "4:memory:/kubepods/pod1/c1/noded-vms/a\n";
        assert!(still_inside(own, below).is_some());
        // A sibling whose name merely starts with noded's is outside.
        assert!(still_inside(own, "4:memory:/kubepods/pod1/c1x/a\n").is_none());
    }

    #[test]
    fn hierarchies_of_a_v1_and_a_v2_tree() {
        let v1 = tempfile::tempdir().expect("tmp");
        for h in ["pids", "memory", "cpuset", "systemd", "cpu,cpuacct"] {
            std::fs::create_dir(v1.path().join(h)).expect("mkdir");
            std::fs::write(v1.path().join(h).join("cgroup.procs"), "").expect("procs");
        }
        std::os::unix::fs::symlink("cpu,cpuacct", v1.path().join("cpu")).expect("alias");
        std::fs::create_dir(v1.path().join("not-a-hierarchy")).expect("mkdir");
        let found = hierarchies(v1.path()).expect("v1");
        let names: Vec<String> = found
            .iter()
            .map(|h| h.mount.file_name().expect("name").to_string_lossy().into())
            .collect();
        assert_eq!(
            names,
            ["cpu,cpuacct", "cpuset", "memory", "pids", "systemd"]
        );
        assert_eq!(
            found.iter().filter(|h| h.cpuset).count(),
            1,
            "only cpuset needs its CPUs copied"
        );

        let v2 = tempfile::tempdir().expect("tmp");
        std::fs::write(v2.path().join("cgroup.controllers"), "memory pids").expect("write");
        std::fs::create_dir(v2.path().join("pids")).expect("a child cgroup, not a hierarchy");
        let found = hierarchies(v2.path()).expect("v2");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].mount, v2.path());

        let empty = tempfile::tempdir().expect("tmp");
        assert!(matches!(
            hierarchies(empty.path()),
            Err(CgroupError::NoHierarchy { .. })
        ));
    }

    #[test]
    fn removal_touches_cgroup_filesystems_only() {
        let dir = tempfile::tempdir().expect("tmp");
        let victim = dir.path().join("empty-dir");
        std::fs::create_dir(&victim).expect("mkdir");
        let forged = VmCgroup {
            dirs: vec![victim.clone()],
        };
        assert!(!forged.remove());
        assert!(
            victim.exists(),
            "a record naming a plain directory removes nothing"
        );
    }

    #[test]
    fn an_unusable_cgroup_fs_is_reported_once_and_vms_stay_put() {
        let empty = tempfile::tempdir().expect("tmp");
        let setting = Setting {
            root: empty.path().to_path_buf(),
            path: PathBuf::from("noded-vms"),
        };
        let status = install(Some(&setting));
        assert_eq!(status.path, "noded-vms");
        assert!(
            status.error.contains("no cgroup hierarchy"),
            "{}",
            status.error
        );
        assert_eq!(
            enter(std::process::id(), Path::new("/run/noded/vms/x")),
            None
        );
        assert_eq!(install(None), CgroupStatus::default());
    }
}
