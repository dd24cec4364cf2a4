//! VM templates, built exactly like Kata's factory: guest RAM in a file on a private tmpfs mapped
//! shared, boot, wait until the guest answers, pause and save the device state (`Vm::save`: RAM is
//! not copied — it already is the file), stop. A manifest records what the template was built from and
//! the size and sha256 of both files so damage is detected before a clone is handed out.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::assets::sha256_file;
use super::backend::{Backend, BackendError, Launch, MachineSpec, Mapping};

pub const MANIFEST: &str = "manifest.json";
pub const MEMORY: &str = "memory";
pub const STATE: &str = "state";
/// tmpfs headroom above guest RAM for the state file and manifest (what Kata's factory uses).
pub const TMPFS_HEADROOM_MIB: u64 = 8;
/// Every VM noded starts is named `noded-<template>-...` (what operators see). The name identifies
/// nothing: the reaper and the observer go by the spawn record (`reap::VmRecord`).
pub const NAME_PREFIX: &str = "noded-";
/// A cold boot under TCG takes seconds; a loaded machine takes far longer.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {name}: {path}: {source}")]
    Io {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "template {name}: needs {needed_mib} MiB of tmpfs but only {available_mib} MiB of memory is available"
    )]
    NoSpace {
        name: String,
        needed_mib: u64,
        available_mib: u64,
    },
    #[error("template {name}: cannot mount tmpfs at {path}: {source}")]
    Mount {
        name: String,
        path: PathBuf,
        source: nix::Error,
    },
    #[error("template {name}: {source}")]
    Backend { name: String, source: BackendError },
    #[error("template {name}: {damage}")]
    Damaged { name: String, damage: Damage },
}

/// Why a template must not be used. Every variant leads to a rebuild.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Damage {
    #[error("no template (tmpfs empty: first start or after a reboot)")]
    Missing,
    #[error("manifest unreadable: {0}")]
    Manifest(String),
    #[error("built from other inputs (fingerprint {found}, expected {expected})")]
    Fingerprint { expected: String, found: String },
    #[error("{file} is {actual} bytes, manifest says {expected} (truncated or replaced)")]
    Size {
        file: &'static str,
        expected: u64,
        actual: u64,
    },
    #[error("{file} content changed (sha256 {actual}, manifest says {expected})")]
    Hash {
        file: &'static str,
        expected: String,
        actual: String,
    },
}

impl Damage {
    /// Short label for counters and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Manifest(_) => "manifest",
            Self::Fingerprint { .. } => "fingerprint",
            Self::Size { .. } => "size",
            Self::Hash { .. } => "hash",
        }
    }
}

/// What a template is built from; any change means the template is stale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    /// The backend's version line. Named `qemu_version` on disk, so templates built before there
    /// was a backend seam keep their fingerprint.
    #[serde(rename = "qemu_version")]
    pub hypervisor_version: String,
    /// Machine arguments (no per-VM paths, no host TSC hint).
    pub machine_args: Vec<String>,
    pub kernel_sha256: String,
    pub initrd_sha256: String,
    pub memory_mib: u64,
}

impl Fingerprint {
    pub fn new(
        backend: &dyn Backend,
        hypervisor_version: String,
        spec: &MachineSpec,
        kernel_sha256: String,
        initrd_sha256: String,
    ) -> Self {
        Self {
            hypervisor_version,
            machine_args: backend.machine_args(spec, None),
            kernel_sha256,
            initrd_sha256,
            memory_mib: spec.memory_mib,
        }
    }

    /// Stable short hash, shown in status and compared on validation.
    pub fn id(&self) -> String {
        crate::fsutil::sha256_bytes(&serde_json::to_vec(self).unwrap_or_default())[..16].to_string()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileDigest {
    pub size: u64,
    pub sha256: String,
}

impl FileDigest {
    fn of(path: &Path) -> std::io::Result<Self> {
        Ok(Self {
            size: std::fs::metadata(path)?.len(),
            sha256: sha256_file(path)?,
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub name: String,
    pub fingerprint: Fingerprint,
    pub fingerprint_id: String,
    /// The exact machine arguments the template booted with; clones reuse them verbatim.
    pub machine_args: Vec<String>,
    pub memory_mib: u64,
    /// Guest request counter at save time: a clone's first answer must be `guest_counter + 1`.
    pub guest_counter: u64,
    pub state: FileDigest,
    pub memory: FileDigest,
    pub built_unix: u64,
    pub boot_ms: u64,
    pub save_ms: u64,
    /// Distinguishes rebuilds of the same template.
    pub generation: String,
}

/// A built template on its tmpfs.
#[derive(Debug, Clone)]
pub struct Template {
    pub dir: PathBuf,
    pub manifest: Manifest,
}

impl Template {
    pub fn memory_file(&self) -> PathBuf {
        self.dir.join(MEMORY)
    }
    pub fn state_file(&self) -> PathBuf {
        self.dir.join(STATE)
    }
}

/// Everything needed to build one template.
#[derive(Debug, Clone)]
pub struct TemplateSpec {
    pub name: String,
    pub machine: MachineSpec,
    pub fingerprint: Fingerprint,
    pub tsc_khz: Option<u64>,
}

/// Where templates and VM sockets live. VMs are named `noded-<template>-<id>` (what the observer and
/// operators see); a VM belongs to this noded when a spawn record under `run_dir/vms` matches it,
/// which is how the reaper tells our orphans from another noded's (or a parallel test's) VMs.
#[derive(Debug, Clone)]
pub struct Layout {
    pub run_dir: PathBuf,
}

impl Layout {
    pub fn new(run_dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(run_dir)?;
        let run_dir = std::fs::canonicalize(run_dir)?;
        Ok(Self { run_dir })
    }
    pub fn templates_dir(&self) -> PathBuf {
        self.run_dir.join("templates")
    }
    pub fn template_dir(&self, name: &str) -> PathBuf {
        self.templates_dir().join(name)
    }
    pub fn vms_dir(&self) -> PathBuf {
        self.run_dir.join("vms")
    }
    pub fn vm_name(&self, template: &str, id: &str) -> String {
        format!("{NAME_PREFIX}{template}-{id}")
    }
}

/// A fresh short VM id (sockets live under `run_dir/vms/<id>/`, and unix socket paths are short).
pub fn new_vm_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_string()
}

/// Quotes a path for `/bin/sh -c` (test harnesses that script guests; noded's own VMs never
/// run a shell: QEMU's state moves over unix sockets, see `qemu.rs`).
pub fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

fn mem_available_mib() -> Option<u64> {
    crate::fsutil::mem_available_bytes(Path::new("/proc")).map(|b| b >> 20)
}

/// Mount points (from /proc/self/mountinfo) at or below `dir`.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mount_path)
        .filter(|p| p.starts_with(dir))
        .collect();
    // Deepest first, so nested mounts go before their parents.
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found
}

fn unescape_mount_path(s: &str) -> PathBuf {
    PathBuf::from(
        s.replace("\\040", " ")
            .replace("\\011", "\t")
            .replace("\\012", "\n")
            .replace("\\134", "\\"),
    )
}

/// Lazily unmounts everything at or below `dir` and removes it. A symlink at `dir` is removed as a
/// link: nothing it points at is unmounted, chmod'ed or deleted.
pub fn destroy_dir(dir: &Path) {
    let meta = match std::fs::symlink_metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot stat");
            return;
        }
    };
    if !meta.is_dir() {
        if let Err(e) = std::fs::remove_file(dir) {
            tracing::warn!(path = %dir.display(), error = %e, "cannot remove");
        }
        return;
    }
    for m in mounts_under(dir) {
        // NOFOLLOW: a symlink swapped in below `dir` must not redirect the unmount elsewhere.
        let flags = nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW;
        if let Err(e) = nix::mount::umount2(&m, flags) {
            tracing::warn!(mount = %m.display(), error = %e, "cannot unmount");
        }
    }
    let _ = make_writable(dir);
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove");
    }
}

/// Lets a non-root run remove read-only directories. Only real directories, through a descriptor
/// opened with O_NOFOLLOW: a symlink planted in the tree never gets its target chmod'ed.
fn make_writable(dir: &Path) -> std::io::Result<()> {
    chmod_dir_nofollow(dir, 0o700)?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            let _ = chmod_dir_nofollow(&e.path(), 0o700);
        }
    }
    Ok(())
}

fn chmod_dir_nofollow(dir: &Path, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(dir)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
}

/// Why `noded template destroy` refused to remove a template directory.
#[derive(Debug, thiserror::Error)]
pub enum DestroyError {
    #[error("template name: {0}")]
    Name(#[from] crate::names::NameError),
    #[error("{path}: {why}; refusing to destroy anything outside {templates}")]
    Outside {
        path: PathBuf,
        templates: PathBuf,
        why: &'static str,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Layout {
    /// Destroys template `name`: its directory must be a real directory directly inside this
    /// layout's own templates directory (no `..`, no absolute name, no symlink at either level).
    /// Returns whether there was anything to destroy.
    pub fn destroy_template(&self, name: &str) -> Result<bool, DestroyError> {
        crate::names::check_label(name)?;
        let templates = self.templates_dir();
        let outside = |path: &Path, why| DestroyError::Outside {
            path: path.to_path_buf(),
            templates: templates.clone(),
            why,
        };
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| DestroyError::Io { path, source }
        };
        match std::fs::symlink_metadata(&templates) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(&templates)(e)),
            Ok(m) if !m.is_dir() => {
                return Err(outside(&templates, "is a symlink or not a directory"));
            }
            Ok(_) => {}
        }
        let dir = templates.join(name);
        match std::fs::symlink_metadata(&dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(io(&dir)(e)),
            Ok(m) if !m.is_dir() => return Err(outside(&dir, "is a symlink or not a directory")),
            Ok(_) => {}
        }
        // The lstat checks above see the last component only; the resolved paths prove the whole
        // chain (a symlinked parent in between) stays put.
        let real_templates = std::fs::canonicalize(&templates).map_err(io(&templates))?;
        let real = std::fs::canonicalize(&dir).map_err(io(&dir))?;
        if real.parent() != Some(real_templates.as_path())
            || real.file_name() != Some(std::ffi::OsStr::new(name))
        {
            return Err(outside(&dir, "resolves outside the templates directory"));
        }
        destroy_dir(&real);
        Ok(true)
    }
}

/// Reads and checks a template. `deep` also hashes the memory file (hundreds of MiB: done at build,
/// at start and by the health watch, not before every clone). The small state file is always hashed.
pub fn validate(dir: &Path, expected: &Fingerprint, deep: bool) -> Result<Template, Damage> {
    let manifest_path = dir.join(MANIFEST);
    let text = match std::fs::read_to_string(&manifest_path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Damage::Missing),
        Err(e) => return Err(Damage::Manifest(e.to_string())),
    };
    let manifest: Manifest =
        serde_json::from_str(&text).map_err(|e| Damage::Manifest(e.to_string()))?;
    let expected_id = expected.id();
    if manifest.fingerprint != *expected || manifest.fingerprint_id != expected_id {
        return Err(Damage::Fingerprint {
            expected: expected_id,
            found: manifest.fingerprint_id,
        });
    }
    let t = Template {
        dir: dir.to_path_buf(),
        manifest,
    };
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    for (file, path, digest) in [
        ("state", t.state_file(), &t.manifest.state),
        ("memory", t.memory_file(), &t.manifest.memory),
    ] {
        let actual = size(&path);
        if actual != digest.size {
            return Err(Damage::Size {
                file,
                expected: digest.size,
                actual,
            });
        }
        if file == "state" || deep {
            let sha = sha256_file(&path).unwrap_or_default();
            if sha != digest.sha256 {
                return Err(Damage::Hash {
                    file,
                    expected: digest.sha256.clone(),
                    actual: sha,
                });
            }
        }
    }
    Ok(t)
}

/// Builds the template `spec.name` under `layout` with `backend`, replacing whatever is there.
#[tracing::instrument(name = "template_build", skip_all, fields(template = %spec.name))]
pub async fn build(
    backend: &dyn Backend,
    layout: &Layout,
    spec: &TemplateSpec,
) -> Result<Template, TemplateError> {
    let name = spec.name.clone();
    let dir = layout.template_dir(&name);
    let io = |path: &Path| {
        let name = name.clone();
        let path = path.to_path_buf();
        move |source| TemplateError::Io { name, path, source }
    };
    destroy_dir(&dir);
    let needed_mib = spec.machine.memory_mib + TMPFS_HEADROOM_MIB;
    if let Some(available_mib) = mem_available_mib()
        && available_mib < needed_mib
    {
        return Err(TemplateError::NoSpace {
            name,
            needed_mib,
            available_mib,
        });
    }
    std::fs::create_dir_all(&dir).map_err(io(&dir))?;
    nix::mount::mount(
        Some("tmpfs"),
        &dir,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(format!("size={needed_mib}m,mode=0700").as_str()),
    )
    .map_err(|source| TemplateError::Mount {
        name: name.clone(),
        path: dir.clone(),
        source,
    })?;
    let result = build_on_tmpfs(backend, layout, spec, &dir).await;
    if result.is_err() {
        destroy_dir(&dir);
    }
    result
}

async fn build_on_tmpfs(
    backend: &dyn Backend,
    layout: &Layout,
    spec: &TemplateSpec,
    dir: &Path,
) -> Result<Template, TemplateError> {
    let name = spec.name.clone();
    let failed = |source| TemplateError::Backend {
        name: name.clone(),
        source,
    };
    let machine_args = backend.machine_args(&spec.machine, spec.tsc_khz);
    let launch = Launch {
        name: layout.vm_name(&name, "template"),
        dir: layout.vms_dir().join(format!("tpl-{name}")),
        memory_file: dir.join(MEMORY),
        memory_mib: spec.machine.memory_mib,
        mapping: Mapping::Shared,
        machine_args: machine_args.clone(),
        // Clones replace it with their own; the device must be present in both (DESIGN §6).
        vmgenid: uuid::Uuid::new_v4(),
        // A killed builder must not leave its source VM running: the next build starts over.
        dies_with_noded: true,
    };
    let t0 = Instant::now();
    let mut vm = backend.spawn(launch).await.map_err(failed)?;
    let outcome = async {
        let ready = vm.console()?.wait_ready(BOOT_TIMEOUT).await;
        let ready = match ready {
            Ok(a) => a,
            Err(source) => return Err(vm.console_failed(source, Duration::ZERO).await),
        };
        let boot_ms = u64::try_from(t0.elapsed().as_millis()).unwrap_or(u64::MAX);
        let t1 = Instant::now();
        vm.save(&dir.join(STATE)).await?;
        let save_ms = u64::try_from(t1.elapsed().as_millis()).unwrap_or(u64::MAX);
        Ok((ready.counter, boot_ms, save_ms))
    }
    .await;
    let (guest_counter, boot_ms, save_ms) = match outcome {
        Ok(v) => v,
        Err(e) => {
            vm.kill().await;
            return Err(failed(e));
        }
    };
    vm.quit(Duration::from_secs(5)).await;
    let state = dir.join(STATE);
    let memory = dir.join(MEMORY);
    // Hashing hundreds of MiB of guest memory blocks for seconds: off the async workers.
    let digest = |p: &Path| {
        let name = name.clone();
        let path = p.to_path_buf();
        async move {
            let p2 = path.clone();
            match tokio::task::spawn_blocking(move || FileDigest::of(&p2)).await {
                Ok(r) => r,
                Err(e) => Err(std::io::Error::other(e)),
            }
            .map_err(move |source| TemplateError::Io { name, path, source })
        }
    };
    let state_digest = digest(&state).await?;
    let memory_digest = digest(&memory).await?;
    let manifest = Manifest {
        name: name.clone(),
        fingerprint_id: spec.fingerprint.id(),
        fingerprint: spec.fingerprint.clone(),
        machine_args,
        memory_mib: spec.machine.memory_mib,
        guest_counter,
        state: state_digest,
        memory: memory_digest,
        built_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        boot_ms,
        save_ms,
        generation: uuid::Uuid::new_v4().simple().to_string()[..8].to_string(),
    };
    let manifest_path = dir.join(MANIFEST);
    let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
    std::fs::write(&manifest_path, json).map_err(|source| TemplateError::Io {
        name: name.clone(),
        path: manifest_path.clone(),
        source,
    })?;
    {
        use std::os::unix::fs::PermissionsExt;
        for p in [&state, &memory, &manifest_path] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o444)).map_err(
                |source| TemplateError::Io {
                    name: name.clone(),
                    path: p.clone(),
                    source,
                },
            )?;
        }
    }
    tracing::info!(
        boot_ms,
        save_ms,
        state_bytes = manifest.state.size,
        fingerprint = %manifest.fingerprint_id,
        "template built"
    );
    Ok(Template {
        dir: dir.to_path_buf(),
        manifest,
    })
}
