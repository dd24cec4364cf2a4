//! Finds the processes that make up VMs on the host (hypervisors, Kata shims, virtiofsd), groups them
//! per sandbox, reads their memory and tells template clones from cold boots by the command line.
//!
//! A command line is only a hint: any user can start a process whose argv reads
//! `qemu-system-x86_64 -name sandbox-x`. What a sandbox *is* comes from where the process sits:
//! - noded's own VMs are the processes matching a spawn record (`vm::reap::VmRecord`: pid, start time,
//!   executable) under noded's `run_dir/vms`;
//! - a Kata sandbox is a Kata shim (`containerd-shim-kata*-v2`) running as root (uid 0), keyed by its
//!   `-id`, plus the shim's descendants (hypervisor, virtiofsd).
//!
//! Everything else that looks like a VM is reported as unattributed (memory visible, logged) and is
//! neither a VM, nor a slot, nor overhead.
//!
//! Processes come and go while a scan runs (a pod is deleted, a pool clone is handed out and
//! released): a process that vanished between listing `/proc` and reading one of its files is
//! skipped and counted, never an error.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use procfs::ProcError;
use procfs::process::Process;

use super::memory::{MemoryUsage, read_rollup};
pub use crate::hypervisor::Hypervisor;
/// Defined by the metrics registry (it is a metric label); the scan classifies VMs by it.
pub use crate::metrics::BootKind;
use crate::vm::reap::{ProcIdentity, VmRecord};

/// Where Kata's VM factory keeps its template (`kata-runtime factory init`).
pub const KATA_FACTORY_TEMPLATE_DIR: &str = "/run/vc/vm/template";

#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    #[error("cannot list processes under {root}: {source} (is procfs mounted there?)")]
    List { root: PathBuf, source: ProcError },
}

/// What a VM-related process is, from its executable name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ProcessKind {
    Hypervisor(Hypervisor),
    KataShim,
    Virtiofsd,
}

impl ProcessKind {
    /// Classifies by argv[0]'s file name; `None` for every unrelated process.
    pub fn of_argv0(argv0: &str) -> Option<ProcessKind> {
        let name = argv0.rsplit('/').next().unwrap_or(argv0);
        if let Some(h) = Hypervisor::of_argv0(name) {
            Some(ProcessKind::Hypervisor(h))
        } else if name.starts_with("containerd-shim-kata") && name.ends_with("-v2") {
            Some(ProcessKind::KataShim)
        } else if name == "virtiofsd" {
            Some(ProcessKind::Virtiofsd)
        } else {
            None
        }
    }

    pub fn hypervisor(self) -> Option<Hypervisor> {
        match self {
            ProcessKind::Hypervisor(h) => Some(h),
            _ => None,
        }
    }
}

/// How a VM came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum VmRole {
    /// Restored from a template: `-incoming`, or the template's memory file mapped private.
    Clone,
    /// Booted its kernel from scratch.
    Cold,
    /// The template VM itself (memory file mapped shared, being saved); not a workload VM.
    TemplateSource,
}

impl VmRole {
    /// `None` for a template source: it is infrastructure, not a VM that was booted for work.
    pub fn boot(self) -> Option<BootKind> {
        match self {
            VmRole::Clone => Some(BootKind::Template),
            VmRole::Cold => Some(BootKind::Cold),
            VmRole::TemplateSource => None,
        }
    }
}

/// Who started the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case", tag = "engine")]
pub enum Origin {
    /// Kata (shim and hypervisor named after the sandbox id).
    Kata,
    /// noded's own engine: QEMU named `noded-<template>-<id>`.
    Noded { template: String },
}

/// One VM-related process as read in one scan.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmProcess {
    pub pid: i32,
    pub kind: ProcessKind,
    /// `None` when `smaps_rollup` could not be read (permission), so the sum is a lower bound.
    pub memory: Option<MemoryUsage>,
}

/// The hypervisor process of a sandbox and what its command line says.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HypervisorProcess {
    pub pid: i32,
    pub kind: Hypervisor,
    pub role: VmRole,
    /// The file-backed guest memory, when there is one.
    pub mem_path: Option<PathBuf>,
}

/// All processes of one sandbox (one VM) and their summed memory.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sandbox {
    pub id: String,
    pub origin: Origin,
    /// Missing while a shim is starting or stopping its VM.
    pub hypervisor: Option<HypervisorProcess>,
    /// Runtime handler named by the shim binary (`containerd-shim-kata-qemu-v2` → `kata-qemu`);
    /// `containerd-shim-kata-v2` names none.
    pub handler_hint: Option<String>,
    pub processes: Vec<VmProcess>,
    pub memory: MemoryUsage,
}

impl Sandbox {
    /// `None` for template sources and for sandboxes without a hypervisor (yet).
    pub fn boot(&self) -> Option<BootKind> {
        self.hypervisor.as_ref().and_then(|h| h.role.boot())
    }
}

/// What one scan found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ScanReport {
    /// Sorted by id.
    pub sandboxes: Vec<Sandbox>,
    /// VM-related processes no sandbox could be found for (kept so their memory is not hidden).
    pub unattributed: Vec<VmProcess>,
    /// Processes that exited between listing and reading them.
    pub vanished: u32,
    /// Processes whose files could not be read for another reason (permission).
    pub unreadable: u32,
    #[serde(skip)]
    pub duration: Duration,
}

/// Scans one procfs tree.
#[derive(Debug, Clone)]
pub struct Scanner {
    root: PathBuf,
    template_dirs: Vec<PathBuf>,
    /// Known template names, longest first, to split `noded-<template>-<id>` when both contain `-`.
    templates: Vec<String>,
    /// noded's `run_dir/vms`, holding a spawn record per VM it started.
    own_vms: Option<PathBuf>,
}

/// How far up the parent chain a hypervisor's Kata shim is looked for.
const MAX_ANCESTRY: usize = 16;

impl Scanner {
    /// `root` is normally `/proc`; tests point it at a synthetic tree. `template_dirs` are directories
    /// holding template memory files (noded's, Kata's factory's).
    pub fn new(
        root: impl Into<PathBuf>,
        template_dirs: Vec<PathBuf>,
        templates: Vec<String>,
    ) -> Self {
        let mut templates = templates;
        templates.sort_by_key(|t| std::cmp::Reverse(t.len()));
        Scanner {
            root: root.into(),
            template_dirs,
            templates,
            own_vms: None,
        }
    }

    /// Processes matching a spawn record under `vms_dir` (noded's `run_dir/vms`) are noded's VMs.
    pub fn with_own_vms(mut self, vms_dir: impl Into<PathBuf>) -> Self {
        self.own_vms = Some(vms_dir.into());
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn scan(&self) -> Result<ScanReport, ScanError> {
        let started = Instant::now();
        let span = tracing::debug_span!("procscan", root = %self.root.display());
        let _guard = span.enter();
        let list = procfs::process::all_processes_with_root(&self.root).map_err(|source| {
            ScanError::List {
                root: self.root.clone(),
                source,
            }
        })?;
        let mut report = ScanReport::default();
        let mut found: Vec<Found> = Vec::new();
        let records: HashMap<u32, VmRecord> = self
            .own_vms
            .as_deref()
            .map(VmRecord::read_all)
            .unwrap_or_default()
            .into_iter()
            .map(|(_, r)| (r.pid, r))
            .collect();
        let own = OwnVms {
            boot_id: if records.is_empty() {
                String::new()
            } else {
                crate::vm::reap::boot_id()
            },
            records,
        };
        for entry in list {
            let process = match entry {
                Ok(p) => p,
                Err(e) => {
                    report.count(&e);
                    continue;
                }
            };
            match self.inspect(&process, &own) {
                Ok(Some(f)) => found.push(f),
                Ok(None) => {}
                Err(e) => report.count(&e),
            }
        }
        self.group(found, &mut report);
        report.duration = started.elapsed();
        tracing::debug!(
            sandboxes = report.sandboxes.len(),
            vanished = report.vanished,
            elapsed_ms = report.duration.as_secs_f64() * 1e3,
            "scan done"
        );
        Ok(report)
    }

    /// Reads one process; `Ok(None)` when it is not VM-related.
    fn inspect(&self, process: &Process, own: &OwnVms) -> procfs::ProcResult<Option<Found>> {
        let argv = process.cmdline()?;
        let Some(kind) = argv.first().and_then(|a| ProcessKind::of_argv0(a)) else {
            return Ok(None);
        };
        let stat = process.stat()?;
        let memory = match read_rollup(process) {
            Ok(m) => Some(m),
            Err(ProcError::PermissionDenied(_)) => None,
            Err(e) => return Err(e),
        };
        let cmd = CommandLine::parse(kind, &argv);
        // Only a root shim starts a sandbox: anyone can name a process after Kata's shim.
        let root = kind == ProcessKind::KataShim && runs_as_root(process);
        let own_name = match u32::try_from(process.pid())
            .ok()
            .and_then(|p| own.records.get(&p))
        {
            Some(r) if kind.hypervisor().is_some() => {
                let live = ProcIdentity {
                    starttime: stat.starttime,
                    exe: process.exe().ok(),
                    zombie: false,
                };
                r.matches(&live, &own.boot_id).then(|| r.name.clone())
            }
            _ => None,
        };
        Ok(Some(Found {
            process: VmProcess {
                pid: process.pid(),
                kind,
                memory,
            },
            cmd,
            ppid: stat.ppid,
            root,
            own_name,
        }))
    }

    /// The parent of `pid`, read from the tree (for ancestors that are not VM-related themselves).
    fn ppid_of(&self, pid: i32) -> Option<i32> {
        let stat = std::fs::read_to_string(self.root.join(pid.to_string()).join("stat")).ok()?;
        let (_, rest) = stat.rsplit_once(')')?;
        rest.split_whitespace().nth(1)?.parse().ok()
    }

    /// The sandbox key of `f`: its own spawn record, its root shim's id, or the nearest root Kata
    /// shim among its ancestors. `Err(())` for noded's own non-VM processes (the KVM probe).
    fn key_of(
        &self,
        f: &Found,
        found: &[Found],
        by_pid: &HashMap<i32, usize>,
        ppids: &mut HashMap<i32, Option<i32>>,
    ) -> Result<Option<SandboxKey>, ()> {
        if let Some(name) = &f.own_name {
            return qemu_name(name, &self.templates).map(Some).ok_or(());
        }
        if let Some(key) = f.shim_key() {
            return Ok(Some(key));
        }
        let mut pid = f.ppid;
        for _ in 0..MAX_ANCESTRY {
            if pid <= 1 {
                break;
            }
            let parent = match by_pid.get(&pid) {
                Some(&i) => {
                    if let Some(key) = found[i].shim_key() {
                        return Ok(Some(key));
                    }
                    Some(found[i].ppid)
                }
                None => *ppids.entry(pid).or_insert_with(|| self.ppid_of(pid)),
            };
            match parent {
                Some(p) if p != pid => pid = p,
                _ => break,
            }
        }
        Ok(None)
    }

    fn group(&self, found: Vec<Found>, report: &mut ScanReport) {
        // Memory files mapped privately by some VM: a shared mapping of the same file is its template.
        let privately_mapped: std::collections::HashSet<PathBuf> = found
            .iter()
            .filter_map(|f| f.cmd.memory.as_ref())
            .filter(|m| !m.shared)
            .map(|m| m.path.clone())
            .collect();
        let by_pid: HashMap<i32, usize> = found
            .iter()
            .enumerate()
            .map(|(i, f)| (f.process.pid, i))
            .collect();
        let mut ppids: HashMap<i32, Option<i32>> = HashMap::new();
        let keys: Vec<Result<Option<SandboxKey>, ()>> = found
            .iter()
            .map(|f| self.key_of(f, &found, &by_pid, &mut ppids))
            .collect();

        let mut sandboxes: BTreeMap<String, Sandbox> = BTreeMap::new();
        for (f, key) in found.into_iter().zip(keys) {
            let key = match key {
                Ok(Some(k)) => k,
                Ok(None) => {
                    tracing::debug!(
                        pid = f.process.pid,
                        kind = ?f.process.kind,
                        "VM-like process under no root Kata shim and no noded record: not counted"
                    );
                    report.unattributed.push(f.process);
                    continue;
                }
                Err(()) => continue,
            };
            let sb = sandboxes.entry(key.id.clone()).or_insert_with(|| Sandbox {
                id: key.id.clone(),
                origin: key.origin.clone(),
                hypervisor: None,
                handler_hint: None,
                processes: Vec::new(),
                memory: MemoryUsage::default(),
            });
            if let Origin::Noded { .. } = key.origin {
                sb.origin = key.origin.clone();
            }
            if f.process.kind == ProcessKind::KataShim {
                sb.handler_hint = f.cmd.handler_hint.clone();
            }
            if let Some(kind) = f.process.kind.hypervisor()
                && sb.hypervisor.is_none()
            {
                sb.hypervisor = Some(HypervisorProcess {
                    pid: f.process.pid,
                    kind,
                    role: self.role(&f.cmd, &privately_mapped),
                    mem_path: f.cmd.memory.as_ref().map(|m| m.path.clone()),
                });
            }
            sb.memory += f.process.memory.unwrap_or_default();
            sb.processes.push(f.process);
        }
        report.sandboxes = sandboxes.into_values().collect();
    }

    fn role(
        &self,
        cmd: &CommandLine,
        privately_mapped: &std::collections::HashSet<PathBuf>,
    ) -> VmRole {
        if cmd.incoming {
            return VmRole::Clone;
        }
        let Some(mem) = &cmd.memory else {
            return VmRole::Cold;
        };
        let in_template_dir = self.template_dirs.iter().any(|d| mem.path.starts_with(d));
        match (
            mem.shared,
            in_template_dir || privately_mapped.contains(&mem.path),
        ) {
            (false, true) => VmRole::Clone,
            (true, true) => VmRole::TemplateSource,
            // share=on on a plain directory (/dev/shm for virtio-fs) is how Kata cold-boots.
            _ => VmRole::Cold,
        }
    }
}

impl ScanReport {
    fn count(&mut self, e: &ProcError) {
        match e {
            ProcError::NotFound(_) => self.vanished += 1,
            ProcError::Io(io, _) if io.raw_os_error() == Some(libc::ESRCH) => self.vanished += 1,
            // A zombie's or exiting process's files can read short.
            ProcError::Incomplete(_) => self.vanished += 1,
            other => {
                tracing::debug!(error = %other, "unreadable process");
                self.unreadable += 1;
            }
        }
    }
}

/// noded's spawn records, by pid, for one scan.
struct OwnVms {
    records: HashMap<u32, VmRecord>,
    boot_id: String,
}

struct Found {
    process: VmProcess,
    cmd: CommandLine,
    ppid: i32,
    /// A Kata shim running as root (real and effective uid 0).
    root: bool,
    /// The `-name` of the spawn record this QEMU matches: one of noded's own VMs.
    own_name: Option<String>,
}

impl Found {
    /// The sandbox a root Kata shim stands for.
    fn shim_key(&self) -> Option<SandboxKey> {
        if self.process.kind != ProcessKind::KataShim || !self.root {
            return None;
        }
        self.cmd.shim_id.as_ref().map(|id| SandboxKey {
            id: id.clone(),
            origin: Origin::Kata,
        })
    }
}

/// Real and effective uid both 0, from `status` (the owner of `/proc/<pid>` is root for any
/// non-dumpable process, so it proves nothing).
fn runs_as_root(process: &Process) -> bool {
    use std::io::Read as _;
    let mut text = String::new();
    let read = process
        .open_relative("status")
        .and_then(|mut f| f.read_to_string(&mut text).map_err(ProcError::from));
    if read.is_err() {
        return false;
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .map(|ids| {
            let ids: Vec<&str> = ids.split_whitespace().collect();
            ids.len() >= 2 && ids[0] == "0" && ids[1] == "0"
        })
        .unwrap_or(false)
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SandboxKey {
    id: String,
    origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct MemoryFile {
    path: PathBuf,
    shared: bool,
}

const QEMU: ProcessKind = ProcessKind::Hypervisor(Hypervisor::Qemu);

/// What the classification needs from a command line.
#[derive(Debug, Default)]
struct CommandLine {
    /// A shim's `-id` (the sandbox id; trusted only for a shim running as root).
    shim_id: Option<String>,
    handler_hint: Option<String>,
    incoming: bool,
    memory: Option<MemoryFile>,
}

impl CommandLine {
    fn parse(kind: ProcessKind, argv: &[String]) -> CommandLine {
        let mut cmd = CommandLine::default();
        if kind == ProcessKind::KataShim {
            cmd.handler_hint = shim_handler(&argv[0]);
        }
        let mut i = 1;
        while i < argv.len() {
            let arg = argv[i].as_str();
            let value = argv.get(i + 1).map(String::as_str);
            // QEMU accepts both `-opt` and `--opt`.
            let opt = arg
                .strip_prefix('-')
                .map(|a| a.strip_prefix('-').unwrap_or(a));
            match (kind, opt, value) {
                (ProcessKind::KataShim, Some("id"), Some(v)) => {
                    cmd.shim_id = Some(v.to_string());
                }
                (QEMU, Some("incoming"), _) => cmd.incoming = true,
                (QEMU, Some("object"), Some(v)) => {
                    if let Some(m) = memory_backend_file(v) {
                        // The guest RAM backend wins over e.g. an nvdimm rootfs image: prefer one in a
                        // template position (first shared/private file that is not read-only).
                        cmd.memory.get_or_insert(m);
                    }
                }
                _ => {}
            }
            i += 1;
        }
        cmd
    }
}

/// `containerd-shim-kata-qemu-v2` → `kata-qemu` (kata-deploy's per-handler shim links).
fn shim_handler(argv0: &str) -> Option<String> {
    let name = argv0.rsplit('/').next().unwrap_or(argv0);
    let handler = name.strip_prefix("containerd-shim-")?.strip_suffix("-v2")?;
    (handler != "kata").then(|| handler.to_string())
}

/// A spawn record's `noded-<template>-<id>` (also as `guest=<name>,...`) → its template.
fn qemu_name(value: &str, templates: &[String]) -> Option<SandboxKey> {
    let name = value.split(',').next().unwrap_or(value);
    let name = name.strip_prefix("guest=").unwrap_or(name);
    let rest = name.strip_prefix("noded-")?;
    // The engine's short-lived KVM capability probe is not a VM anyone asked for.
    if rest.starts_with("probe-") {
        return None;
    }
    let template = templates
        .iter()
        .find(|t| {
            rest.len() > t.len() + 1
                && rest.starts_with(t.as_str())
                && rest.as_bytes()[t.len()] == b'-'
        })
        .cloned()
        .or_else(|| rest.rsplit_once('-').map(|(t, _)| t.to_string()))?;
    if template.is_empty() {
        return None;
    }
    Some(SandboxKey {
        id: name.to_string(),
        origin: Origin::Noded { template },
    })
}

/// `memory-backend-file,id=..,mem-path=P,share=on|off,...` → the file and whether it is shared.
/// Read-only backends (Kata's nvdimm rootfs image) are not guest RAM.
fn memory_backend_file(value: &str) -> Option<MemoryFile> {
    let mut parts = value.split(',');
    if parts.next()? != "memory-backend-file" {
        return None;
    }
    let mut path = None;
    let mut shared = false;
    for p in parts {
        match p.split_once('=') {
            Some(("mem-path", v)) => path = Some(PathBuf::from(v)),
            Some(("share", v)) => shared = matches!(v, "on" | "yes" | "true"),
            Some(("readonly", "on" | "yes" | "true")) => return None,
            _ => {}
        }
    }
    Some(MemoryFile {
        path: path?,
        shared,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn kinds_from_argv0() {
        assert_eq!(
            ProcessKind::of_argv0("/usr/bin/qemu-system-x86_64"),
            Some(QEMU)
        );
        assert_eq!(
            ProcessKind::of_argv0("/opt/kata/bin/containerd-shim-kata-v2"),
            Some(ProcessKind::KataShim)
        );
        assert_eq!(ProcessKind::of_argv0("containerd-shim-runc-v2"), None);
        assert_eq!(
            ProcessKind::of_argv0("/opt/kata/libexec/virtiofsd"),
            Some(ProcessKind::Virtiofsd)
        );
        assert_eq!(ProcessKind::of_argv0("bash"), None);
    }

    #[test]
    fn kata_qemu_cold_with_virtiofs_shm_is_cold() {
        let c = CommandLine::parse(
            QEMU,
            &argv(
                "qemu-system-x86_64 -name sandbox-abc123,debug-threads=on -object memory-backend-file,id=dimm1,size=2048M,mem-path=/dev/shm,share=on -object memory-backend-file,id=mem0,mem-path=/opt/kata/kata.img,size=1G,readonly=on",
            ),
        );
        // The name is no identity: only a root shim above this process makes it a sandbox.
        assert_eq!(c.shim_id, None);
        let s = Scanner::new(
            "/proc",
            vec![PathBuf::from(KATA_FACTORY_TEMPLATE_DIR)],
            vec![],
        );
        assert_eq!(s.role(&c, &Default::default()), VmRole::Cold);
    }

    #[test]
    fn kata_factory_clone_and_template() {
        let s = Scanner::new(
            "/proc",
            vec![PathBuf::from(KATA_FACTORY_TEMPLATE_DIR)],
            vec![],
        );
        let clone = CommandLine::parse(
            QEMU,
            &argv(
                "qemu -name sandbox-x -object memory-backend-file,id=dimm1,size=2048M,mem-path=/run/vc/vm/template/memory -incoming defer",
            ),
        );
        assert_eq!(s.role(&clone, &Default::default()), VmRole::Clone);
        let tpl = CommandLine::parse(
            QEMU,
            &argv(
                "qemu -name sandbox-t -object memory-backend-file,id=dimm1,size=2048M,mem-path=/run/vc/vm/template/memory,share=on",
            ),
        );
        assert_eq!(s.role(&tpl, &Default::default()), VmRole::TemplateSource);
    }

    #[test]
    fn private_mapping_of_a_file_another_vm_shares_is_a_clone_even_outside_known_dirs() {
        let s = Scanner::new("/proc", vec![], vec![]);
        let c = CommandLine::parse(
            QEMU,
            &argv("qemu -object memory-backend-file,id=m,size=1G,mem-path=/tmp/t/memory,share=off"),
        );
        let set = [PathBuf::from("/tmp/t/memory")].into_iter().collect();
        assert_eq!(s.role(&c, &set), VmRole::Clone);
        assert_eq!(s.role(&c, &Default::default()), VmRole::Cold);
    }

    #[test]
    fn noded_record_names_split_on_known_templates() {
        let t = vec!["my-tpl".to_string(), "my".to_string()];
        let k = qemu_name("noded-my-tpl-7", &t).expect("noded name");
        assert_eq!(
            k.origin,
            Origin::Noded {
                template: "my-tpl".into()
            }
        );
        assert_eq!(k.id, "noded-my-tpl-7");
        let k = qemu_name("guest=noded-default-vm3,debug-threads=on", &[]).expect("noded name");
        assert_eq!(
            k.origin,
            Origin::Noded {
                template: "default".into()
            }
        );
        assert!(qemu_name("noded-", &[]).is_none());
        assert!(qemu_name("noded-probe-kvm-123", &[]).is_none());
        assert!(qemu_name("myvm", &[]).is_none());
        assert!(qemu_name("sandbox-abc", &[]).is_none());
    }

    #[test]
    fn shim_id_and_handler_hint() {
        let c = CommandLine::parse(
            ProcessKind::KataShim,
            &argv(
                "/opt/kata/bin/containerd-shim-kata-qemu-v2 -namespace k8s.io -address /run/containerd/containerd.sock -publish-binary /usr/bin/containerd -id 0123abcd",
            ),
        );
        assert_eq!(c.shim_id.as_deref(), Some("0123abcd"));
        assert_eq!(c.handler_hint.as_deref(), Some("kata-qemu"));
        assert_eq!(shim_handler("containerd-shim-kata-v2"), None);
    }
}
