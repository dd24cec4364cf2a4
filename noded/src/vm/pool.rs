//! Per-template pool of pre-forked clones: keeps `target` clones restored (paused or running) within a
//! memory budget, refills in the background, watches the template's health and rebuilds it when it is
//! missing, stale or damaged. Released VMs are destroyed, never reused.
//!
//! A VM handed out belongs to its caller until ReleaseVm: its spawn record carries the lease
//! (`reap::Lease`), written before AcquireVm answers, and noded stopping, crashing or being dropped
//! never kills it. The next noded adopts it ([`Pool::adopt`]): listed and counted here again,
//! released with the same handle.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, watch};

use super::backend::Backend;
use super::clone::{After, CloneError, StartedVm, cold_boot, restore};
use super::reap::{self, AdoptedVm, Lease};
use super::template::{self, Damage, Layout, Template, TemplateError, TemplateSpec};

/// Estimate of one idle clone's host cost until one has been measured.
const DEFAULT_CLONE_COST: u64 = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("template {0}: pool is shutting down")]
    ShuttingDown(String),
    #[error("template {template}: no VM could be started: {source}")]
    Start {
        template: String,
        source: Box<CloneError>,
    },
    #[error(
        "template {template}: {limit} VMs are in use (max_vms_in_use); release one before acquiring another"
    )]
    Exhausted { template: String, limit: u32 },
    #[error("template {template}: VM {id} failed to resume: {detail}")]
    Resume {
        template: String,
        id: String,
        detail: String,
    },
    #[error("template {template}: VM {id}: cannot record its lease: {source}")]
    Lease {
        template: String,
        id: String,
        source: std::io::Error,
    },
}

/// Outcome label of a template build (`noded_template_builds_total{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildOutcome {
    Success,
    Failure,
}

/// Callbacks for metrics (histograms need every sample, not a snapshot).
pub trait PoolObserver: Send + Sync {
    fn acquired(&self, template: &str, duration: Duration, from_pool: bool, cold: bool);
    fn built(&self, template: &str, outcome: BuildOutcome, duration: Duration);
}

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub name: String,
    pub runtime_handler: String,
    pub target: u32,
    pub budget_bytes: u64,
    /// VMs handed out and not yet released (plus acquires under way); more are refused. Idle clones
    /// are bounded by the budget, these by this count: together they bound the QEMU children.
    pub max_in_use: u32,
    pub mode: After,
    /// How often the memory file is re-hashed (it is also hashed at start and after build).
    pub health_interval: Duration,
}

/// Plain-data view of one pool (for `Status`, metrics, `noded template status`).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct TemplateSnapshot {
    pub name: String,
    pub runtime_handler: String,
    pub ready: bool,
    pub fingerprint: String,
    pub generation: String,
    pub pool_ready: u32,
    pub pool_target: u32,
    pub in_use: u32,
    pub builds_ok: u64,
    pub builds_failed: u64,
    /// Damaged or stale templates detected (each led to a rebuild).
    pub damaged: u64,
    pub last_damage: String,
    pub hits: u64,
    pub misses: u64,
    pub clone_failures: u64,
    pub last_clone_error: String,
    pub acquires: u64,
    pub acquire_seconds_sum: f64,
    /// `max_vms_in_use`.
    pub max_in_use: u32,
    /// VMs handed out and not released (adopted ones included), oldest first.
    pub vms_in_use: Vec<InUseVm>,
    /// Template memory file + host private memory of the pool's idle clones.
    pub memory_bytes: u64,
    pub template_dir: PathBuf,
}

/// A VM handed out by [`Pool::acquire`]; noded no longer talks to its console socket. Its QMP
/// socket is never handed out: QMP can run host commands as root (`migrate exec:`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct AcquiredVm {
    pub vm_id: String,
    pub template: String,
    pub console: PathBuf,
    pub pid: u32,
    pub from_pool: bool,
    /// No template was usable: the VM cold-booted (a miss).
    pub cold: bool,
    pub acquire: Duration,
}

/// One VM in use, as listed in the status.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct InUseVm {
    pub vm_id: String,
    pub pid: u32,
    pub acquired_unix_ms: u64,
    /// Started by an earlier noded run and adopted by this one.
    pub adopted: bool,
}

/// The VM behind a lease: started by this run, or adopted from an earlier one.
enum Leased {
    Started(StartedVm),
    Adopted(Box<AdoptedVm>),
}

/// A VM in use. Dropping one (noded exiting for any reason, the pool dropped) never kills the VM:
/// only [`InUse::destroy`] (ReleaseVm) does, or the reaper of a later run once its template is gone.
struct InUse {
    vm: Option<Leased>,
    lease: Lease,
    pid: u32,
}

impl InUse {
    fn listed(&self) -> InUseVm {
        InUseVm {
            vm_id: self.lease.vm_id.clone(),
            pid: self.pid,
            acquired_unix_ms: self.lease.acquired_unix_ms,
            adopted: matches!(self.vm, Some(Leased::Adopted(_))),
        }
    }

    /// Kills the VM and removes its directory and cgroup.
    async fn destroy(mut self) {
        match self.vm.take() {
            Some(Leased::Started(vm)) => vm.vm.kill().await,
            Some(Leased::Adopted(vm)) => vm.destroy().await,
            None => {}
        }
    }
}

impl Drop for InUse {
    fn drop(&mut self) {
        if let Some(Leased::Started(vm)) = self.vm.take() {
            // Dropping the process handle would kill the VM: its caller still uses it, and the
            // next noded adopts it from its record. What is forgotten is only the handle's memory.
            std::mem::forget(vm);
        }
    }
}

/// One acquire's reservation against `max_in_use`, returned on drop unless the VM landed in `in_use`.
struct Slot<'a> {
    inner: &'a Inner,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let mut st = self.inner.lock();
        st.acquiring = st.acquiring.saturating_sub(1);
    }
}

struct Idle {
    vm: StartedVm,
    cost: u64,
}

#[derive(Default)]
struct State {
    template: Option<Arc<Template>>,
    ready: VecDeque<Idle>,
    in_use: HashMap<String, InUse>,
    /// Acquires past the cap check that have not yet landed in `in_use`.
    acquiring: u32,
    clone_cost: u64,
    consecutive_failures: u32,
    /// The on-disk template was already counted as damaged; don't count it again when rebuilding.
    damage_counted: bool,
    stats: TemplateSnapshot,
}

struct Inner {
    cfg: PoolConfig,
    layout: Layout,
    spec: TemplateSpec,
    backend: Arc<dyn Backend>,
    state: Mutex<State>,
    wake: Notify,
    /// Wakes waiters when the pool's contents change (tests, `wait_full`).
    changed: watch::Sender<u64>,
    shutdown: watch::Sender<bool>,
    observer: Option<Arc<dyn PoolObserver>>,
}

#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves plain counters behind; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }
    fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }
}

impl Pool {
    /// Starts the pool's background task (template check/build, refill, health watch).
    pub fn start(
        cfg: PoolConfig,
        layout: Layout,
        spec: TemplateSpec,
        backend: Arc<dyn Backend>,
        observer: Option<Arc<dyn PoolObserver>>,
    ) -> (Pool, tokio::task::JoinHandle<()>) {
        let stats = TemplateSnapshot {
            name: cfg.name.clone(),
            runtime_handler: cfg.runtime_handler.clone(),
            pool_target: cfg.target,
            max_in_use: cfg.max_in_use,
            fingerprint: spec.fingerprint.id(),
            template_dir: layout.template_dir(&cfg.name),
            ..TemplateSnapshot::default()
        };
        let inner = Arc::new(Inner {
            cfg,
            layout,
            spec,
            backend,
            state: Mutex::new(State {
                stats,
                clone_cost: DEFAULT_CLONE_COST,
                ..State::default()
            }),
            wake: Notify::new(),
            changed: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            observer,
        });
        let task = tokio::spawn(run(inner.clone()));
        (Pool { inner }, task)
    }

    pub fn name(&self) -> &str {
        &self.inner.cfg.name
    }

    pub fn snapshot(&self) -> TemplateSnapshot {
        let st = self.inner.lock();
        let mut s = st.stats.clone();
        s.ready = st.template.is_some();
        s.generation = st
            .template
            .as_ref()
            .map(|t| t.manifest.generation.clone())
            .unwrap_or_default();
        s.pool_ready = u32::try_from(st.ready.len()).unwrap_or(u32::MAX);
        s.in_use = u32::try_from(st.in_use.len()).unwrap_or(u32::MAX);
        s.vms_in_use = st.in_use.values().map(InUse::listed).collect();
        s.vms_in_use
            .sort_by(|a, b| (a.acquired_unix_ms, &a.vm_id).cmp(&(b.acquired_unix_ms, &b.vm_id)));
        s.memory_bytes = st.template.as_ref().map_or(0, |t| t.manifest.memory.size)
            + st.ready.iter().map(|i| i.cost).sum::<u64>();
        s
    }

    /// The current template (None while building or after damage was found).
    pub fn template(&self) -> Option<Arc<Template>> {
        self.inner.lock().template.clone()
    }

    /// Waits until the template exists and the pool holds `target` clones (or `timeout`).
    pub async fn wait_full(&self, timeout: Duration) -> bool {
        let mut rx = self.inner.changed.subscribe();
        let check = |p: &Pool| {
            let st = p.inner.lock();
            st.template.is_some() && !wants_more(&p.inner.cfg, &st)
        };
        tokio::time::timeout(timeout, async {
            loop {
                if check(self) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        })
        .await
        .is_ok()
            && check(self)
    }

    /// Hands out a VM: a pre-forked clone when one is ready, else a clone made now, else (no usable
    /// template) a cold boot, counted as a miss.
    #[tracing::instrument(name = "acquire", skip_all, fields(template = %self.inner.cfg.name))]
    pub async fn acquire(&self) -> Result<AcquiredVm, PoolError> {
        let inner = &self.inner;
        let name = inner.cfg.name.clone();
        if inner.stopping() {
            return Err(PoolError::ShuttingDown(name));
        }
        let t0 = Instant::now();
        // The slot is taken before any clone is started, so a flood of concurrent acquires cannot
        // overshoot the cap; the guard gives it back on every early return.
        let slot = {
            let mut st = inner.lock();
            let limit = inner.cfg.max_in_use;
            if st.in_use.len() as u64 + u64::from(st.acquiring) >= u64::from(limit) {
                drop(st);
                tracing::warn!(limit, "AcquireVm refused: max_vms_in_use reached");
                return Err(PoolError::Exhausted {
                    template: name,
                    limit,
                });
            }
            st.acquiring += 1;
            Slot { inner }
        };
        let mut attempts = 0;
        let (mut started, from_pool, cold) = loop {
            attempts += 1;
            let (idle, template) = {
                let mut st = inner.lock();
                // Cheap check (sizes only) on the hot path; the health watch hashes.
                if let Some(t) = st.template.clone()
                    && let Err(d) = quick_check(&t)
                {
                    mark_damaged(&mut st, &d);
                }
                let idle = if st.template.is_some() {
                    st.ready.pop_front()
                } else {
                    None
                };
                (idle, st.template.clone())
            };
            inner.wake.notify_one();
            inner.bump();
            match idle {
                Some(idle) => {
                    let mut vm = idle.vm;
                    if inner.cfg.mode == After::Paused {
                        let resumed = vm.vm.resume().await.map_err(|e| e.to_string());
                        if let Err(detail) = resumed {
                            tracing::warn!(vm = %vm.id, %detail, "pooled clone failed to resume; discarding it");
                            record_clone_failure(inner, &detail);
                            let id = vm.id.clone();
                            vm.vm.kill().await;
                            if attempts < 3 {
                                continue;
                            }
                            return Err(PoolError::Resume {
                                template: name,
                                id,
                                detail,
                            });
                        }
                    }
                    break (vm, true, false);
                }
                None => {
                    let r = match template {
                        Some(t) => restore(&*inner.backend, &inner.layout, &t, After::Running)
                            .await
                            .map(|vm| (vm, false)),
                        None => cold_boot(
                            &*inner.backend,
                            &inner.layout,
                            &name,
                            &inner.spec.machine,
                            inner.spec.tsc_khz,
                            Duration::from_secs(120),
                        )
                        .await
                        .map(|vm| (vm, true)),
                    };
                    match r {
                        Ok((vm, cold)) => break (vm, false, cold),
                        Err(source) => {
                            record_clone_failure(inner, &source.to_string());
                            return Err(PoolError::Start {
                                template: name,
                                source: Box::new(source),
                            });
                        }
                    }
                }
            }
        };
        // Hand the console over: it accepts one client.
        started.vm.hand_off();
        let pid = started.vm.pid().unwrap_or_default();
        let lease = Lease {
            vm_id: started.id.clone(),
            template: name.clone(),
            generation: started.generation.clone(),
            console: started.vm.launch().console_socket(),
            acquired_unix_ms: Lease::now_unix_ms(),
            from_pool,
            cold,
        };
        // Recorded before the caller hears of the VM, so a noded killed right after still finds it
        // in use; a VM whose lease cannot be recorded is not handed out (it would not survive).
        if let Err(source) = reap::record_lease(&started.vm.launch().dir, pid, &lease) {
            tracing::error!(vm = %started.id, error = %source, "cannot record the VM's lease; not handing it out");
            let id = started.id.clone();
            started.vm.kill().await;
            return Err(PoolError::Lease {
                template: name,
                id,
                source,
            });
        }
        let acquired = AcquiredVm {
            vm_id: started.id.clone(),
            template: name.clone(),
            console: lease.console.clone(),
            pid,
            from_pool,
            cold,
            acquire: t0.elapsed(),
        };
        {
            let mut st = inner.lock();
            if cold {
                st.stats.misses += 1;
            } else {
                st.stats.hits += 1;
            }
            st.stats.acquires += 1;
            st.stats.acquire_seconds_sum += acquired.acquire.as_secs_f64();
            st.in_use.insert(
                started.id.clone(),
                InUse {
                    vm: Some(Leased::Started(started)),
                    lease,
                    pid,
                },
            );
            st.acquiring -= 1;
            std::mem::forget(slot);
        }
        inner.bump();
        if let Some(o) = &inner.observer {
            o.acquired(&name, acquired.acquire, from_pool, cold);
        }
        tracing::info!(vm = %acquired.vm_id, from_pool, cold, acquire_us = u64::try_from(acquired.acquire.as_micros()).unwrap_or(u64::MAX), "VM acquired");
        Ok(acquired)
    }

    /// Destroys an acquired VM (or one adopted from an earlier run). Returns false if this pool
    /// does not own `vm_id`.
    pub async fn release(&self, vm_id: &str) -> bool {
        let vm = self.inner.lock().in_use.remove(vm_id);
        match vm {
            Some(vm) => {
                vm.destroy().await;
                self.inner.bump();
                true
            }
            None => false,
        }
    }

    /// Takes over VMs in use that an earlier noded handed out (found by the reaper): they count
    /// against `max_vms_in_use` and are released like any other.
    pub fn adopt(&self, vms: Vec<AdoptedVm>) {
        if vms.is_empty() {
            return;
        }
        {
            let mut st = self.inner.lock();
            for vm in vms {
                st.in_use.insert(
                    vm.lease.vm_id.clone(),
                    InUse {
                        lease: vm.lease.clone(),
                        pid: vm.pid(),
                        vm: Some(Leased::Adopted(Box::new(vm))),
                    },
                );
            }
        }
        self.inner.bump();
    }

    pub fn owns(&self, vm_id: &str) -> bool {
        self.inner.lock().in_use.contains_key(vm_id)
    }

    /// Hashes the template now (what the periodic health watch does); a damaged template is dropped
    /// with its idle clones and rebuilt in the background. Returns the damage found, if any.
    pub async fn check_health(&self) -> Option<Damage> {
        check_health(&self.inner).await
    }

    /// Stops the background task, kills every idle VM of this pool and removes its template. VMs in
    /// use keep running (their callers still use them): the next noded adopts them. The template's
    /// tmpfs is unmounted lazily, so the memory file stays mapped in their clones until they end.
    pub async fn shutdown(&self, task: tokio::task::JoinHandle<()>) {
        let inner = &self.inner;
        inner.shutdown.send_replace(true);
        inner.wake.notify_one();
        let _ = tokio::time::timeout(Duration::from_secs(30), task).await;
        let (ready, in_use) = {
            let mut st = inner.lock();
            st.template = None;
            (
                std::mem::take(&mut st.ready),
                std::mem::take(&mut st.in_use),
            )
        };
        for i in ready {
            i.vm.vm.kill().await;
        }
        if !in_use.is_empty() {
            tracing::info!(template = %inner.cfg.name, vms = in_use.len(), "leaving VMs in use running");
        }
        drop(in_use);
        template::destroy_dir(&inner.layout.template_dir(&inner.cfg.name));
        inner.bump();
    }
}

/// Whether the pool is below target and one more clone fits the memory budget.
fn wants_more(cfg: &PoolConfig, st: &State) -> bool {
    let held: u64 = st.ready.iter().map(|i| i.cost).sum();
    u32::try_from(st.ready.len()).is_ok_and(|n| n < cfg.target)
        && held + st.clone_cost <= cfg.budget_bytes
}

fn quick_check(t: &Template) -> Result<(), Damage> {
    for (file, path, digest) in [
        ("state", t.state_file(), &t.manifest.state),
        ("memory", t.memory_file(), &t.manifest.memory),
    ] {
        let actual = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if actual != digest.size {
            return Err(Damage::Size {
                file,
                expected: digest.size,
                actual,
            });
        }
    }
    Ok(())
}

fn mark_damaged(st: &mut State, d: &Damage) {
    tracing::error!(template = %st.stats.name, damage = %d, "template damaged; dropping it and its idle clones, rebuilding");
    st.template = None;
    st.stats.damaged += 1;
    st.damage_counted = true;
    st.stats.last_damage = d.to_string();
    // Idle clones map the damaged file; they are killed by the background task.
}

fn record_clone_failure(inner: &Inner, detail: &str) {
    let mut st = inner.lock();
    st.stats.clone_failures += 1;
    st.stats.last_clone_error = detail.to_string();
    st.consecutive_failures += 1;
}

async fn kill_idle(inner: &Inner) {
    let idle = std::mem::take(&mut inner.lock().ready);
    for i in idle {
        i.vm.vm.kill().await;
    }
    inner.bump();
}

async fn check_health(inner: &Arc<Inner>) -> Option<Damage> {
    let template = inner.lock().template.clone()?;
    let expected = inner.spec.fingerprint.clone();
    let dir = template.dir.clone();
    let result = tokio::task::spawn_blocking(move || template::validate(&dir, &expected, true))
        .await
        .unwrap_or(Err(Damage::Manifest("validation task panicked".into())));
    let damage = match result {
        Ok(t) if t.manifest.generation == template.manifest.generation => return None,
        Ok(_) => Damage::Manifest("template replaced underneath noded".into()),
        Err(d) => d,
    };
    {
        let mut st = inner.lock();
        if st
            .template
            .as_ref()
            .is_some_and(|t| t.manifest.generation == template.manifest.generation)
        {
            mark_damaged(&mut st, &damage);
        }
    }
    kill_idle(inner).await;
    inner.wake.notify_one();
    Some(damage)
}

/// Reuses a valid template left by a previous run, or builds one.
async fn ensure_template(inner: &Arc<Inner>) -> bool {
    if inner.lock().template.is_some() {
        return true;
    }
    kill_idle(inner).await;
    let dir = inner.layout.template_dir(&inner.cfg.name);
    let expected = inner.spec.fingerprint.clone();
    let d2 = dir.clone();
    let existing = tokio::task::spawn_blocking(move || template::validate(&d2, &expected, true))
        .await
        .unwrap_or(Err(Damage::Manifest("validation task panicked".into())));
    match existing {
        Ok(t) => {
            tracing::info!(template = %inner.cfg.name, generation = %t.manifest.generation, "reusing existing template");
            let mut st = inner.lock();
            st.template = Some(Arc::new(t));
            st.consecutive_failures = 0;
            drop(st);
            inner.bump();
            return true;
        }
        Err(Damage::Missing) => inner.lock().damage_counted = false,
        Err(d) => {
            let mut st = inner.lock();
            if !std::mem::take(&mut st.damage_counted) {
                st.stats.damaged += 1;
            }
            st.stats.last_damage = d.to_string();
            tracing::warn!(template = %inner.cfg.name, damage = %d, "existing template unusable; rebuilding");
        }
    }
    let t0 = Instant::now();
    let built: Result<Template, TemplateError> =
        template::build(&*inner.backend, &inner.layout, &inner.spec).await;
    let outcome = if built.is_ok() {
        BuildOutcome::Success
    } else {
        BuildOutcome::Failure
    };
    if let Some(o) = &inner.observer {
        o.built(&inner.cfg.name, outcome, t0.elapsed());
    }
    let ok = {
        let mut st = inner.lock();
        match built {
            Ok(t) => {
                st.stats.builds_ok += 1;
                st.template = Some(Arc::new(t));
                st.consecutive_failures = 0;
                true
            }
            Err(e) => {
                tracing::error!(template = %inner.cfg.name, error = %e, "template build failed");
                st.stats.builds_failed += 1;
                st.stats.last_damage = e.to_string();
                false
            }
        }
    };
    inner.bump();
    ok
}

/// Restores one clone into the pool if target and budget allow. Returns whether it tried.
async fn fill_one(inner: &Arc<Inner>) -> bool {
    let template = {
        let st = inner.lock();
        let Some(t) = st.template.clone() else {
            return false;
        };
        if !wants_more(&inner.cfg, &st) {
            return false;
        }
        t
    };
    match restore(&*inner.backend, &inner.layout, &template, inner.cfg.mode).await {
        Ok(vm) => {
            let cost = vm
                .vm
                .pid()
                .and_then(|pid| crate::proctable::memory_of(pid).ok())
                .map_or(DEFAULT_CLONE_COST, |u| u.private);
            let rejected = {
                let mut st = inner.lock();
                st.consecutive_failures = 0;
                st.clone_cost = cost.max(1);
                let current = st
                    .template
                    .as_ref()
                    .is_some_and(|t| t.manifest.generation == template.manifest.generation);
                if current && !inner.stopping() {
                    st.ready.push_back(Idle { vm, cost });
                    None
                } else {
                    Some(vm)
                }
            };
            if let Some(vm) = rejected {
                vm.vm.kill().await;
            }
            inner.bump();
        }
        Err(e) => {
            tracing::warn!(error = %e, "clone failed to restore; killed");
            record_clone_failure(inner, &e.to_string());
            let failures = inner.lock().consecutive_failures;
            // A template that yields no good clone is damaged even if its hashes still match.
            if check_health(inner).await.is_none() && failures >= 3 {
                let mut st = inner.lock();
                mark_damaged(
                    &mut st,
                    &Damage::Manifest(format!("{failures} clones in a row failed: {e}")),
                );
            }
            let backoff = Duration::from_millis(500 * u64::from(failures.min(10)));
            tokio::time::sleep(backoff).await;
        }
    }
    true
}

async fn run(inner: Arc<Inner>) {
    let mut shutdown = inner.shutdown.subscribe();
    let mut build_failures = 0u32;
    let mut next_health = tokio::time::Instant::now() + inner.cfg.health_interval;
    loop {
        if inner.stopping() {
            break;
        }
        if ensure_template(&inner).await {
            build_failures = 0;
            while !inner.stopping() && fill_one(&inner).await {}
        } else {
            build_failures += 1;
            let backoff = Duration::from_secs(u64::from(build_failures.min(12)) * 5);
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.changed() => {}
            }
            continue;
        }
        tokio::select! {
            _ = inner.wake.notified() => {}
            _ = tokio::time::sleep_until(next_health) => {
                next_health = tokio::time::Instant::now() + inner.cfg.health_interval;
                check_health(&inner).await;
            }
            _ = shutdown.changed() => {}
        }
    }
}

/// VMs in use adopted for a configured template whose pool could not start (its inputs did not
/// resolve this time): still listed, counted and released with their handles, never killed for it.
#[derive(Default)]
pub struct Strays {
    vms: Mutex<HashMap<String, InUse>>,
}

impl Strays {
    pub fn new(vms: Vec<AdoptedVm>) -> Self {
        let vms = vms
            .into_iter()
            .map(|vm| {
                (
                    vm.lease.vm_id.clone(),
                    InUse {
                        lease: vm.lease.clone(),
                        pid: vm.pid(),
                        vm: Some(Leased::Adopted(Box::new(vm))),
                    },
                )
            })
            .collect();
        Self {
            vms: Mutex::new(vms),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, InUse>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Destroys `vm_id` if it is one of these.
    pub async fn release(&self, vm_id: &str) -> bool {
        let vm = self.lock().remove(vm_id);
        match vm {
            Some(vm) => {
                vm.destroy().await;
                true
            }
            None => false,
        }
    }

    /// The stray VMs of `template`.
    pub fn in_use(&self, template: &str) -> Vec<InUseVm> {
        let mut vms: Vec<InUseVm> = self
            .lock()
            .values()
            .filter(|v| v.lease.template == template)
            .map(InUse::listed)
            .collect();
        vms.sort_by(|a, b| (a.acquired_unix_ms, &a.vm_id).cmp(&(b.acquired_unix_ms, &b.vm_id)));
        vms
    }
}
