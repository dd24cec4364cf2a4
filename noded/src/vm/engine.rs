//! The VM engine: reaps what a previous run left, resolves each configured template's inputs (guest
//! assets, hypervisor version, accelerator), and runs one [`Pool`] per template on a [`Backend`].
//! This is what `noded run`, the gRPC API, `noded template ...`, the tests and the benchmark use.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::assets::{self, AssetsError, GuestAssets, sha256_file};
use super::backend::{Accel, Backend, BackendError, Launch, MachineSpec, Mapping, host_tsc_khz};
use super::clone::After;
use super::guest::GUEST_APPEND;
use super::pool::{AcquiredVm, Pool, PoolConfig, PoolError, PoolObserver, TemplateSnapshot};
use super::reap::{self, Reaped};
use super::template::{Fingerprint, Layout, NAME_PREFIX, TemplateSpec};
use crate::config::{NodedConfig, TemplateSection};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("run dir {path}: {source}")]
    RunDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("guest assets: {0}")]
    Assets(#[from] AssetsError),
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("template {name}: {path}: {source}")]
    Input {
        name: String,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("no template named `{0}` is configured")]
    UnknownTemplate(String),
    #[error("no templates are configured (add a [[templates]] section)")]
    NoTemplates,
    #[error("no VM `{0}` is in use (already released, or never acquired here)")]
    UnknownVm(String),
    #[error("{0}")]
    Pool(#[from] PoolError),
    #[error(
        "template {name}: no guest kernel/initrd: pin them in [guest] (`installer bake --guest-assets`) or set the template's kernel and initrd; downloading is off outside local mode (guest.download)"
    )]
    NoGuest { name: String },
    #[error("template {name} is not ready: {reason}")]
    NotReady { name: String, reason: String },
}

impl crate::exit::ExitStatus for EngineError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::UnknownTemplate(_) | Self::NoTemplates | Self::NoGuest { .. } => {
                crate::exit::BAD_INPUT
            }
            _ => crate::exit::RUNTIME_FAILURE,
        }
    }
}

#[derive(Clone)]
pub struct EngineOptions {
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub templates: Vec<TemplateSection>,
    pub mode: After,
    pub health_interval: Duration,
    /// `None`: detect (KVM only if it really runs a guest); `guest.accel` in noded.toml.
    pub accel: Option<Accel>,
    pub observer: Option<Arc<dyn PoolObserver>>,
    /// Where templates without their own kernel/initrd get them.
    pub guest: GuestSource,
    /// The cgroup VM processes move into at spawn (`daemon.vm_cgroup`); `None`: they stay in
    /// noded's.
    pub vm_cgroup: Option<super::cgroup::Setting>,
}

/// The origin of the guest kernel + initramfs.
#[derive(Debug, Clone)]
pub enum GuestSource {
    /// Files pinned by sha256 (`[guest]`, written by `installer bake`): checked, never replaced.
    Pinned(assets::Pinned),
    /// Built from Debian packages under `data_dir` (local mode), each command bounded by
    /// `command_timeout`; `kernel_package` overrides the kernel the meta package points at.
    Download {
        command_timeout: Duration,
        kernel_package: Option<String>,
    },
    /// Neither: only templates with an explicit kernel and initrd can start.
    Off,
}

impl GuestSource {
    /// Local mode's download, with the default per-command deadline (tests, the benchmark).
    pub fn download() -> Self {
        Self::Download {
            command_timeout: assets::DEFAULT_COMMAND_TIMEOUT,
            kernel_package: None,
        }
    }

    pub fn from_config(cfg: &NodedConfig) -> Self {
        let g = &cfg.guest;
        match (&g.kernel, &g.kernel_sha256, &g.initrd, &g.initrd_sha256) {
            (Some(kernel), Some(ks), Some(initrd), Some(is)) => Self::Pinned(assets::Pinned {
                kernel: kernel.clone(),
                kernel_sha256: ks.to_ascii_lowercase(),
                initrd: initrd.clone(),
                initrd_sha256: is.to_ascii_lowercase(),
            }),
            _ if cfg.guest_download() => Self::Download {
                command_timeout: Duration::from_secs(g.command_timeout_seconds.max(1)),
                kernel_package: g.kernel_package.clone(),
            },
            _ => Self::Off,
        }
    }
}

impl EngineOptions {
    pub fn from_config(cfg: &NodedConfig) -> Self {
        Self {
            data_dir: cfg.daemon.data_dir.clone(),
            run_dir: cfg.daemon.run_dir.clone(),
            templates: cfg.templates.clone(),
            // Measured (docs/performance.md): a running idle clone costs <1% of a core under TCG and
            // saves the `cont` round trip on every AcquireVm.
            mode: After::Running,
            health_interval: Duration::from_secs(300),
            accel: match cfg.guest.accel {
                crate::config::AccelSetting::Auto => None,
                crate::config::AccelSetting::Kvm => Some(Accel::Kvm),
                crate::config::AccelSetting::Tcg => Some(Accel::Tcg),
            },
            observer: None,
            guest: GuestSource::from_config(cfg),
            // Checked when the config was loaded.
            vm_cgroup: cfg.daemon.vm_cgroup_setting().ok().flatten(),
        }
    }
}

type Task = tokio::task::JoinHandle<()>;

pub struct Engine {
    backend: Arc<dyn Backend>,
    layout: Layout,
    pools: BTreeMap<String, Pool>,
    /// Templates whose inputs could not be resolved (pinned file changed, download failed): listed
    /// as not ready with the reason; noded keeps running without them.
    failed: BTreeMap<String, TemplateSnapshot>,
    tasks: Mutex<BTreeMap<String, Task>>,
    default: Option<String>,
    pub accel: Accel,
    pub reaped: Reaped,
    pub hypervisor_version: String,
    /// VMs in use adopted for templates whose pool could not start.
    strays: super::pool::Strays,
}

/// Resolved inputs of one template.
pub struct ResolvedTemplate {
    pub spec: TemplateSpec,
    pub assets: GuestAssets,
    /// What builds the template and starts its VMs.
    pub backend: Arc<dyn Backend>,
}

/// KVM probe, cached per host boot and kernel (the probe costs seconds where KVM does not work).
async fn detect_accel(
    backend: &dyn Backend,
    assets: &GuestAssets,
    data_dir: &Path,
    scratch: &Path,
) -> Accel {
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    // Pinned assets leave `<data_dir>/guest` uncreated; the probe's answer is cached there.
    let _ = std::fs::create_dir_all(data_dir.join("guest"));
    let cache = data_dir.join("guest").join(format!(
        "accel-{}-{}",
        boot_id.trim(),
        &assets.kernel_sha256[..assets.kernel_sha256.len().min(16)]
    ));
    match std::fs::read_to_string(&cache).as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    let spec = MachineSpec {
        accel: Accel::Kvm,
        memory_mib: 128,
        vcpus: 1,
        kernel: assets.kernel.clone(),
        initrd: assets.initrd.clone(),
        append: GUEST_APPEND.into(),
    };
    let accel = if probe_kvm(backend, &spec, scratch, Duration::from_secs(5)).await {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    let _ = std::fs::write(&cache, accel.as_str());
    accel
}

/// Whether KVM can really run a guest here. `/dev/kvm` existing is not enough (on nested or
/// restricted hosts the hypervisor starts with KVM and the guest then hangs in early boot), so this
/// boots the real guest under KVM and waits for it to answer a request. A KVM guest answers in well
/// under a second; `deadline` bounds the cost of the probe on hosts where it fails.
async fn probe_kvm(
    backend: &dyn Backend,
    spec: &MachineSpec,
    scratch: &Path,
    deadline: Duration,
) -> bool {
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
    let launch = Launch {
        name: format!("{NAME_PREFIX}probe-kvm-{}", std::process::id()),
        dir: scratch.join("kvm-probe"),
        memory_file: scratch.join("kvm-probe.mem"),
        memory_mib: kvm.memory_mib,
        mapping: Mapping::Private,
        machine_args: backend.machine_args(&kvm, None),
        vmgenid: uuid::Uuid::new_v4(),
        dies_with_noded: true,
    };
    let mem = launch.memory_file.clone();
    let result = async {
        let mut vm = backend.spawn(launch).await.map_err(|e| e.to_string())?;
        let ok = match vm.console() {
            Ok(c) => c.wait_ready(deadline).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
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

/// The guest assets of `source`, off the async threads. Dropping the returned future (a shutdown
/// racing startup) cancels a download: its running command's process group is killed.
pub async fn guest_assets(
    source: &GuestSource,
    data_dir: &Path,
) -> Result<GuestAssets, AssetsError> {
    let source = source.clone();
    let data_dir = data_dir.to_path_buf();
    let ctl = match &source {
        GuestSource::Download {
            command_timeout,
            kernel_package,
        } => assets::Control::new(*command_timeout).with_kernel_package(kernel_package.clone()),
        _ => assets::Control::default(),
    };
    let _cancel = ctl.cancel_on_drop();
    tokio::task::spawn_blocking(move || match source {
        GuestSource::Pinned(p) => assets::verify_pinned(&p),
        GuestSource::Download { .. } => assets::ensure_with(&data_dir, &ctl),
        GuestSource::Off => Err(AssetsError::Metadata {
            package: "guest".into(),
            detail: "nothing pinned and downloading is off".into(),
        }),
    })
    .await
    .map_err(|e| AssetsError::Command {
        command: "guest asset build".into(),
        detail: e.to_string(),
    })?
}

/// Resolves a template's spec on the default backend: guest assets (verified, or built if this mode
/// may download), hypervisor version, accelerator. A template with its own kernel and initrd uses
/// nothing else.
pub async fn resolve(
    opts: &EngineOptions,
    section: &TemplateSection,
    layout: &Layout,
) -> Result<(ResolvedTemplate, Accel, String), EngineError> {
    resolve_with(super::default_backend(), opts, section, layout, None).await
}

async fn resolve_with(
    backend: Arc<dyn Backend>,
    opts: &EngineOptions,
    section: &TemplateSection,
    layout: &Layout,
    shared: Option<&Result<GuestAssets, String>>,
) -> Result<(ResolvedTemplate, Accel, String), EngineError> {
    let hash = |p: &Path| {
        sha256_file(p).map_err(|source| EngineError::Input {
            name: section.name.clone(),
            path: p.to_path_buf(),
            source,
        })
    };
    let mut assets = match (&section.kernel, &section.initrd) {
        (Some(k), Some(i)) => GuestAssets {
            kernel: k.clone(),
            kernel_sha256: hash(k)?,
            kernel_package: String::new(),
            initrd: i.clone(),
            initrd_sha256: hash(i)?,
        },
        _ => match (shared, &opts.guest) {
            (_, GuestSource::Off) => {
                return Err(EngineError::NoGuest {
                    name: section.name.clone(),
                });
            }
            (Some(Ok(a)), _) => a.clone(),
            (Some(Err(reason)), _) => {
                return Err(EngineError::NotReady {
                    name: section.name.clone(),
                    reason: reason.clone(),
                });
            }
            (None, source) => guest_assets(source, &opts.data_dir).await?,
        },
    };
    if let Some(k) = &section.kernel {
        assets.kernel_sha256 = hash(k)?;
        assets.kernel = k.clone();
    }
    if let Some(i) = &section.initrd {
        assets.initrd_sha256 = hash(i)?;
        assets.initrd = i.clone();
    }
    let accel = match opts.accel {
        Some(a) => a,
        None => detect_accel(&*backend, &assets, &opts.data_dir, &layout.vms_dir()).await,
    };
    let version = backend.version().await?;
    let machine = MachineSpec {
        accel,
        memory_mib: section.memory_mib,
        vcpus: section.vcpus,
        kernel: assets.kernel.clone(),
        initrd: assets.initrd.clone(),
        append: GUEST_APPEND.into(),
    };
    let fingerprint = Fingerprint::new(
        &*backend,
        version.clone(),
        &machine,
        assets.kernel_sha256.clone(),
        assets.initrd_sha256.clone(),
    );
    let spec = TemplateSpec {
        name: section.name.clone(),
        machine,
        fingerprint,
        tsc_khz: host_tsc_khz(),
    };
    Ok((
        ResolvedTemplate {
            spec,
            assets,
            backend,
        },
        accel,
        version,
    ))
}

impl Engine {
    /// [`Engine::start_with`] the default backend (QEMU).
    pub async fn start(opts: EngineOptions) -> Result<Arc<Engine>, EngineError> {
        Self::start_with(super::default_backend(), opts).await
    }

    /// Reaps orphans of a previous run, resolves every template and starts its pool on `backend`.
    /// Templates are built in the background; use [`Engine::wait_ready`] to wait for them.
    pub async fn start_with(
        backend: Arc<dyn Backend>,
        opts: EngineOptions,
    ) -> Result<Arc<Engine>, EngineError> {
        let layout = Layout::new(&opts.run_dir).map_err(|source| EngineError::RunDir {
            path: opts.run_dir.clone(),
            source,
        })?;
        let keep: Vec<PathBuf> = opts
            .templates
            .iter()
            .map(|t| layout.template_dir(&t.name))
            .collect();
        let keep_refs: Vec<&Path> = keep.iter().map(PathBuf::as_path).collect();
        super::cgroup::install(opts.vm_cgroup.as_ref());
        // VMs in use of configured templates outlive the previous noded: adopted, not reaped.
        let configured = opts.templates.iter().map(|t| t.name.clone()).collect();
        let (reaped, mut adopted) =
            reap::reap_adopting(&layout, &keep_refs, reap::KeepLeases::Of(configured)).await;
        if !reaped.processes.is_empty() || !reaped.mounts.is_empty() {
            tracing::warn!(
                processes = reaped.processes.len(),
                mounts = reaped.mounts.len(),
                "reaped leftovers of a previous run"
            );
        }
        let mut pools = BTreeMap::new();
        let mut tasks = BTreeMap::new();
        let mut failed = BTreeMap::new();
        let mut accel = Accel::Tcg;
        let mut hypervisor_version = String::new();
        // Resolved once for every template that uses them: one download, one verification.
        let mut shared: Option<Result<GuestAssets, String>> = None;
        for section in &opts.templates {
            if shared.is_none()
                && (section.kernel.is_none() || section.initrd.is_none())
                && !matches!(opts.guest, GuestSource::Off)
            {
                shared = Some(
                    guest_assets(&opts.guest, &opts.data_dir)
                        .await
                        .map_err(|e| crate::config::one_line(&e.to_string())),
                );
            }
            let resolved =
                resolve_with(backend.clone(), &opts, section, &layout, shared.as_ref()).await;
            let (resolved, a, v) = match resolved {
                Ok(r) => r,
                // Without the hypervisor no template can run: the engine as a whole is off.
                Err(e @ EngineError::Backend(_)) => return Err(e),
                Err(e) => {
                    let reason = match e {
                        EngineError::NotReady { reason, .. } => reason,
                        other => crate::config::one_line(&other.to_string()),
                    };
                    tracing::error!(template = %section.name, reason = %reason, "template not ready");
                    failed.insert(
                        section.name.clone(),
                        TemplateSnapshot {
                            name: section.name.clone(),
                            runtime_handler: section.runtime_handler.clone(),
                            ready: false,
                            pool_target: section.pool_target,
                            last_damage: reason,
                            template_dir: layout.template_dir(&section.name),
                            ..TemplateSnapshot::default()
                        },
                    );
                    continue;
                }
            };
            accel = a;
            hypervisor_version = v;
            let cfg = PoolConfig {
                name: section.name.clone(),
                runtime_handler: section.runtime_handler.clone(),
                target: section.pool_target,
                budget_bytes: section.pool_memory_budget_mib << 20,
                max_in_use: section.max_vms_in_use,
                mode: opts.mode,
                health_interval: opts.health_interval,
            };
            let (pool, task) = Pool::start(
                cfg,
                layout.clone(),
                resolved.spec,
                resolved.backend,
                opts.observer.clone(),
            );
            let mine;
            (mine, adopted) = std::mem::take(&mut adopted)
                .into_iter()
                .partition(|a| a.lease.template == section.name);
            pool.adopt(mine);
            pools.insert(section.name.clone(), pool);
            tasks.insert(section.name.clone(), task);
        }
        tracing::info!(
            hypervisor = %backend.hypervisor(),
            accel = accel.as_str(),
            templates = pools.len(),
            "VM engine started"
        );
        Ok(Arc::new(Engine {
            backend,
            layout,
            default: opts.templates.first().map(|t| t.name.clone()),
            pools,
            failed,
            tasks: Mutex::new(tasks),
            accel,
            reaped,
            hypervisor_version,
            strays: super::pool::Strays::new(adopted),
        }))
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }

    pub fn pool(&self, template: &str) -> Result<&Pool, EngineError> {
        let name = if template.is_empty() {
            self.default.as_deref().ok_or(EngineError::NoTemplates)?
        } else {
            template
        };
        if let Some(f) = self.failed.get(name) {
            return Err(EngineError::NotReady {
                name: name.into(),
                reason: f.last_damage.clone(),
            });
        }
        self.pools
            .get(name)
            .ok_or_else(|| EngineError::UnknownTemplate(name.into()))
    }

    /// A VM of `template` (empty: the first configured template).
    pub async fn acquire(&self, template: &str) -> Result<AcquiredVm, EngineError> {
        Ok(self.pool(template)?.acquire().await?)
    }

    pub async fn release(&self, vm_id: &str) -> Result<(), EngineError> {
        for pool in self.pools.values() {
            if pool.owns(vm_id) && pool.release(vm_id).await {
                return Ok(());
            }
        }
        if self.strays.release(vm_id).await {
            return Ok(());
        }
        Err(EngineError::UnknownVm(vm_id.into()))
    }

    /// Every configured template, the ones that could not start included (not ready, with the
    /// reason in `last_damage`).
    pub fn snapshot(&self) -> Vec<TemplateSnapshot> {
        let mut all: Vec<TemplateSnapshot> = self.pools.values().map(Pool::snapshot).collect();
        all.extend(self.failed.values().map(|f| {
            let mut s = f.clone();
            s.vms_in_use = self.strays.in_use(&s.name);
            s.in_use = u32::try_from(s.vms_in_use.len()).unwrap_or(u32::MAX);
            s
        }));
        all.sort_by(|a, b| a.name.cmp(&b.name));
        all
    }

    /// Waits until every pool has its template and is full.
    pub async fn wait_ready(&self, timeout: Duration) -> bool {
        if !self.failed.is_empty() {
            return false;
        }
        let deadline = tokio::time::Instant::now() + timeout;
        for pool in self.pools.values() {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !pool.wait_full(left).await {
                return false;
            }
        }
        true
    }

    /// Kills every idle VM, removes templates and sockets. VMs in use keep running, in their own
    /// cgroups, with their records: the next engine adopts them (or reaps them if their template
    /// is gone). Safe to call more than once.
    pub async fn shutdown(&self) {
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|p| p.into_inner()));
        let mut tasks = tasks;
        for (name, pool) in &self.pools {
            let task = tasks.remove(name).unwrap_or_else(|| tokio::spawn(async {}));
            pool.shutdown(task).await;
        }
        // Anything else carrying our marker (a clone mid-restore when the task was stopped).
        let _ = reap::reap_adopting(&self.layout, &[], reap::KeepLeases::All).await;
        super::cgroup::remove_empty_parents();
        tracing::info!("VM engine stopped");
    }
}
