//! `noded run`: wires the runtime manager, template pool, observers, metrics and Kubernetes publisher.
//!
//! Start order matters: containerd's config is applied (and containerd restarted only if it changed)
//! before anything probes the runtime; the HTTP endpoints come up first so health is visible while the
//! rest starts.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info};

use crate::config::{LogFormat, NodedConfig};
use crate::exit::{self, ExitStatus};
use crate::metrics::Metrics;
use crate::observe::{Observer, ObserverConfig};
use crate::runtime::RuntimeConfigurator;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Component(String),
}

/// Entry point of `noded run`. Returns the process exit code.
pub fn run_cli(config_path: Option<&Path>) -> u8 {
    // Until the handlers exist (config load, tracing and runtime set-up take tens of milliseconds in a
    // debug build) a SIGTERM/SIGINT is held pending instead of killing noded with exit 143: blocked
    // here, on the thread that later unblocks it, and inherited by the runtime's worker threads.
    mask_shutdown_signals(true);
    let config = match config_path {
        Some(p) => NodedConfig::load(p),
        None => NodedConfig::local_default(),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!("noded: {e}");
            return e.exit_code();
        }
    };
    init_tracing(config.daemon.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!("{}", DaemonError::Runtime(e));
            return exit::RUNTIME_FAILURE;
        }
    };
    // Signal handlers go in before anything starts: a SIGTERM in the first second of startup must stop
    // noded through the same cleanup as one an hour later, not kill it with the default disposition.
    let result = rt.block_on(async {
        let shutdown = shutdown_signal().map_err(DaemonError::Signals)?;
        // `block_on` runs this on the thread that blocked them: a pending signal is delivered now.
        mask_shutdown_signals(false);
        run(config, shutdown).await
    });
    match result {
        Ok(()) => exit::OK,
        Err(e) => {
            error!("noded run failed: {e}");
            exit::RUNTIME_FAILURE
        }
    }
}

pub fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A second init (tests calling run twice in one process) is harmless: keep the first subscriber.
    let _ = match format {
        LogFormat::Json => builder.json().try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

fn shutdown_signals() -> nix::sys::signal::SigSet {
    let mut set = nix::sys::signal::SigSet::empty();
    set.add(nix::sys::signal::Signal::SIGTERM);
    set.add(nix::sys::signal::Signal::SIGINT);
    set
}

/// Blocks (`true`) or unblocks SIGTERM/SIGINT on the calling thread. Unblocking is unconditional: a
/// mask inherited blocked from the parent would otherwise make noded deaf to them.
fn mask_shutdown_signals(block: bool) {
    use nix::sys::signal::{SigmaskHow, pthread_sigmask};
    let how = if block {
        SigmaskHow::SIG_BLOCK
    } else {
        SigmaskHow::SIG_UNBLOCK
    };
    if let Err(e) = pthread_sigmask(how, Some(&shutdown_signals()), None) {
        tracing::warn!("cannot change the signal mask: {e}");
    }
}

/// Installs the SIGTERM/SIGINT handlers now (must be called inside the runtime) and returns a future
/// that resolves when either arrives.
pub fn shutdown_signal() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: shutting down"),
            _ = int.recv() => info!("SIGINT: shutting down"),
        }
    })
}

/// Runs the daemon until `shutdown` resolves. Shutdown never reverts containerd's config or removes
/// runtimes: running pods keep their runtime (removal is the explicit `installer uninstall`).
///
/// `shutdown` is raced against startup too: whatever had started when it fires is stopped by the same
/// code as on a normal exit, and a startup step interrupted half-way drops its own guards (a private
/// containerd or QEMU child is killed by its owner's Drop).
pub async fn run(
    config: NodedConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), DaemonError> {
    info!(
        private_containerd = config.containerd.private,
        templates = config.templates.len(),
        kubernetes = config.kubernetes.enabled,
        "noded starting"
    );
    let mut config = config;
    if let Ok(cwd) = std::env::current_dir() {
        config.resolve_relative(&cwd);
    }
    tokio::pin!(shutdown);
    let mut parts = Parts::default();
    let started = tokio::select! {
        r = start(&config, &mut parts) => Some(r),
        () = &mut shutdown => None,
    };
    let result = match started {
        Some(Ok(())) => {
            shutdown.await;
            Ok(())
        }
        Some(Err(e)) => Err(e),
        None => {
            info!("shutdown requested during startup");
            Ok(())
        }
    };
    parts.stop().await;
    info!("noded stopped");
    result
}

/// What has been started so far, stopped in reverse order. Filled step by step by [`start`], so a
/// shutdown in the middle of startup stops exactly what exists.
#[derive(Default)]
struct Parts {
    http: Option<tokio::task::JoinHandle<()>>,
    private_containerd: Option<crate::containerd::private::PrivateContainerd>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    publisher: Option<crate::k8s::daemon::RunningPublisher>,
    vm: Option<VmPart>,
    /// The probe loop, stopped before anything else: on a node, containerd and its pods outlive
    /// noded, so a probe sandbox must not be cut off mid-creation.
    probe: Option<ProbeTask>,
}

/// The probe loop's task and how to stop it between probes.
struct ProbeTask {
    socket: std::path::PathBuf,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// How long shutdown lets a probe in flight finish (its sandbox created, then stopped and removed by
/// the probe itself) before cutting it off; with [`PROBE_SWEEP`], within a pod's default 30 s grace.
const PROBE_DRAIN: Duration = Duration::from_secs(10);
/// Bound on removing what a cut-off probe left at shutdown.
const PROBE_SWEEP: Duration = Duration::from_secs(10);

impl ProbeTask {
    /// Lets a probe in flight finish, then stops the loop. A cancelled `RunPodSandbox` is not undone
    /// by containerd: it finishes creating the sandbox after the client is gone (2.1 then leaves it
    /// `SANDBOX_UNKNOWN` with its shim running), so the sandbox can appear only after a sweep has
    /// listed the pods. Cut off only a probe that outlives [`PROBE_DRAIN`]; the sweep here and the
    /// one at the next start remove what that leaves.
    async fn stop(mut self, private_containerd: bool) {
        let _ = self.stop.send(true);
        let drained = tokio::time::timeout(PROBE_DRAIN, &mut self.task)
            .await
            .is_ok();
        if drained {
            return;
        }
        self.task.abort();
        let _ = self.task.await;
        tracing::warn!("a probe outlived the {PROBE_DRAIN:?} shutdown drain; cut off");
        // Local mode stops its own containerd, and every sandbox with it.
        if private_containerd {
            return;
        }
        match tokio::time::timeout(
            PROBE_SWEEP,
            crate::cri::probe::remove_leftover_probes(&self.socket, PROBE_SWEEP),
        )
        .await
        {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(removed = n, "removed the probe sandbox cut off at shutdown"),
            Ok(Err(e)) => tracing::warn!("probe sandboxes at shutdown: {e}"),
            Err(_) => {
                tracing::warn!("probe sandboxes at shutdown: timed out after {PROBE_SWEEP:?}")
            }
        }
    }
}

impl Parts {
    async fn stop(mut self) {
        if let Some(probe) = self.probe.take() {
            probe.stop(self.private_containerd.is_some()).await;
        }
        for t in self.tasks.drain(..) {
            t.abort();
            let _ = t.await;
        }
        if let Some(vm) = self.vm.take() {
            vm.stop().await;
        }
        if let Some(p) = self.publisher.take() {
            p.stop().await;
        }
        if let Some(h) = self.http.take() {
            h.abort();
        }
        // Local mode owns its containerd: stop it (and every container it runs). A host containerd
        // is never touched on shutdown.
        if let Some(mut c) = self.private_containerd.take()
            && let Err(e) = c.stop().await
        {
            tracing::warn!("stopping the private containerd: {e}");
        }
    }
}

/// Starts every component in dependency order:
/// 1. metrics + health HTTP server (health is visible while the rest starts)
/// 2. containerd config apply (+ private containerd in local mode): the handlers must be in
///    containerd's config before anything probes the runtime
/// 3. observers, Kubernetes publisher, boot-latency follower, runtime probes
/// 4. template pool + gRPC API
async fn start(config: &NodedConfig, parts: &mut Parts) -> Result<(), DaemonError> {
    let observe_config = ObserverConfig::from_config(config);
    let metrics = Arc::new(Metrics::new(observe_config.metrics_scope()));
    let observer = Arc::new(Observer::new(observe_config, Arc::clone(&metrics)));
    let listener = crate::http::bind(config.daemon.metrics_listen)
        .await
        .map_err(|e| DaemonError::Component(e.to_string()))?;
    // /healthz turns 503 naming any of these long-running tasks that ends (returns, panics).
    let health = crate::http::Health::new();
    let serve = crate::http::serve_router(
        listener,
        crate::http::router_with_health(Arc::clone(&observer), health.clone()),
        crate::http::Limits::default(),
        std::future::pending(),
    );
    parts.http = Some(tokio::spawn(async move {
        if let Err(e) = serve.await {
            error!("metrics server: {e}");
        }
    }));
    if config.containerd.private {
        // Local mode is containerd by definition: noded starts its own.
        parts.private_containerd = Some(
            crate::containerd::manage::start_private(config, &metrics)
                .await
                .map_err(|e| DaemonError::Component(e.to_string()))?,
        );
    } else {
        let runtime: Arc<dyn RuntimeConfigurator> =
            crate::runtime::configurator(config, &crate::runtime::Access::daemon())
                .map_err(|e| DaemonError::Component(e.to_string()))?
                .into();
        crate::runtime::apply_on_start(runtime.as_ref(), config, &metrics)
            .await
            .map_err(|e| DaemonError::Component(format!("{} config: {e}", runtime.runtime())))?;
        if config.containerd.apply_on_start && config.containerd.reconcile_seconds > 0 {
            parts.tasks.push(health.spawn(
                "containerd-reconcile",
                reconcile_loop(config.clone(), runtime, Arc::clone(&metrics)),
            ));
        }
    }
    // Boot samples trigger an extra scan between the periodic ones.
    let interval = Duration::from_secs(config.observe.interval_seconds.max(1));
    parts
        .tasks
        .push(health.spawn("observer", Arc::clone(&observer).run(interval)));
    // Its own task: an unreachable API server never blocks metrics or health. The probe loop records
    // outcomes into `publisher.handles.health`.
    if config.kubernetes.enabled {
        parts.publisher = Some(
            crate::k8s::daemon::start(config, Arc::clone(&observer))
                .map_err(|e| DaemonError::Component(e.to_string()))?,
        );
    }
    // Boot latency from containerd's events, and the periodic probe sandbox per handler (readiness).
    let (boot_events, boot_samples) =
        crate::observe::latency::spawn(config.containerd.socket.clone());
    parts.tasks.push(health.watch("boot-events", boot_events));
    parts.tasks.push(health.spawn(
        "boot-samples",
        Arc::clone(&observer).consume_boot_samples(boot_samples),
    ));
    let (stop, stopped) = tokio::sync::watch::channel(false);
    parts.probe = Some(ProbeTask {
        socket: config.containerd.socket.clone(),
        stop,
        task: health.spawn(
            "probe-loop",
            probe_loop(
                config.clone(),
                Arc::clone(&observer),
                parts.publisher.as_ref().map(|p| p.handles.health.clone()),
                stopped,
            ),
        ),
    });
    // Kata's factory template for warm handlers: checked and (re)built in the background; a node
    // without it still runs pods (cold), so it never delays the startup taint.
    let keeper = crate::kata::keeper::KeeperSettings::from_config(config);
    if config.kata.manage_template && !keeper.handlers.is_empty() {
        let reporter = Arc::new(WarmReporter {
            observer: Arc::clone(&observer),
            notices: parts.publisher.as_ref().map(|p| p.handles.notices.clone()),
            last_failure: Default::default(),
        });
        parts.tasks.push(health.spawn(
            "kata-template-keeper",
            crate::kata::keeper::run(keeper, reporter),
        ));
    }
    parts.vm = Some(start_vm_engine(config, &metrics, &observer).await?);
    Ok(())
}

/// Re-applies the handlers every `containerd.reconcile_seconds`: a drifted config is written again and
/// containerd restarted (only then); a failure is logged and counted, and the next round tries again.
async fn reconcile_loop(
    config: NodedConfig,
    runtime: Arc<dyn RuntimeConfigurator>,
    metrics: Arc<Metrics>,
) {
    let interval = Duration::from_secs(config.containerd.reconcile_seconds);
    loop {
        tokio::time::sleep(interval).await;
        match crate::runtime::apply_on_start(runtime.as_ref(), &config, &metrics).await {
            Ok(Some(r)) if r.changed => {
                tracing::warn!(
                    restarted = r.restarted,
                    "containerd config had drifted; re-applied"
                )
            }
            Ok(_) => {}
            Err(e) => error!("re-applying {} config: {e}", runtime.runtime()),
        }
    }
}

/// Proves every probe handler with a real sandbox every `probe.interval_seconds`. Outcomes feed
/// `/readyz` and the metrics (observer) and the node publisher (startup taint, condition). Returns
/// between probes once `stop` turns true.
async fn probe_loop(
    config: NodedConfig,
    observer: Arc<Observer>,
    health: Option<tokio::sync::watch::Sender<crate::k8s::publisher::RuntimeHealth>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let opts = crate::cri::probe::ProbeOptions {
        timeout: Duration::from_secs(config.probe.timeout_seconds.max(1)),
        image: config.probe.image.clone(),
        ..crate::cri::probe::ProbeOptions::sandbox_only()
    };
    // Sandboxes of a noded killed mid-probe (kill -9, OOM) would otherwise stay forever: their label
    // marks them as ours. Best effort — the next start tries again.
    match crate::cri::probe::remove_leftover_probes(&config.containerd.socket, opts.cleanup_timeout)
        .await
    {
        Ok(0) => {}
        Ok(n) => info!(
            removed = n,
            "removed probe sandboxes left by an earlier noded"
        ),
        Err(e) => tracing::warn!("cannot list leftover probe sandboxes: {e}"),
    }
    let interval = Duration::from_secs(config.probe.interval_seconds.max(1));
    let handlers = config.probe_handlers();
    let mut retry = PROBE_RETRY_FIRST;
    loop {
        let mut all_ok = true;
        for handler in &handlers {
            if *stop.borrow() {
                return;
            }
            let warm = observer.warm().is_warm(handler);
            let (outcome, boot) = crate::cri::probe::probe_inspecting(
                &config.containerd.socket,
                handler,
                &opts,
                // The proof that Kata uses the template: the probe's own VM restores from it.
                |sandbox| warm.then(|| observer.sandbox_boot(sandbox)).flatten(),
            )
            .await;
            if warm && outcome.ok {
                let boot = boot.flatten();
                info!(runtime_handler = %handler, boot = ?boot, "warm probe VM");
                observer.warm().set_probe_boot(handler, boot);
            }
            observer.record_probe_outcome(&outcome);
            all_ok &= outcome.ok;
            if let Some(h) = &health {
                h.send_modify(|h| h.record(handler, outcome.ok, outcome.error.clone()));
            }
        }
        // A warm template not yet proven by a clone probe is retried like a failed round (it does
        // not make the node unready: cold pods run).
        all_ok &= !observer.warm().awaiting_proof();
        // A failed round is retried with backoff, not after the full interval: a transient failure at
        // boot (containerd restarting, a config being rewritten) would otherwise keep a node tainted
        // for a whole interval (found by `perf nodeboot`'s fault run: 60 s instead of ~1 s).
        let wait = if all_ok {
            retry = PROBE_RETRY_FIRST;
            interval
        } else {
            let w = retry.min(interval);
            retry = (retry * 2).min(interval);
            w
        };
        // A template that just became valid is proven right away, not after a full interval.
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = observer.warm().changed() => retry = PROBE_RETRY_FIRST,
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}

/// The Kata template keeper's findings → the observer (condition, label), metrics and node Events.
struct WarmReporter {
    observer: Arc<Observer>,
    notices: Option<tokio::sync::mpsc::Sender<crate::k8s::publisher::Notice>>,
    /// Last failure reason per handler: a failure repeated by every retry is one Event, not many.
    last_failure: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
}

impl crate::kata::keeper::TemplateReporter for WarmReporter {
    fn checked(&self, handler: &str, check: &crate::kata::keeper::TemplateCheck) {
        use crate::kata::EnsureAction;
        use crate::kata::keeper::TemplateCheck;
        let metrics = self.observer.metrics();
        let (valid, rebuilt) = match check {
            TemplateCheck::Valid { action } => (true, *action != EnsureAction::Kept),
            TemplateCheck::Invalid { .. } => (false, false),
        };
        // Kata's factory keeps one template and no pre-forked clones: its pool is that template.
        metrics.set_template_ready(handler, valid);
        metrics.set_template_pool(handler, u64::from(valid), 1);
        let notice = match check {
            TemplateCheck::Valid { action } if rebuilt => {
                metrics.record_template_build(crate::metrics::BuildOutcome::Ok);
                Some(crate::k8s::publisher::Notice::TemplateRebuilt {
                    template: handler.to_owned(),
                    detail: format!("Kata VM template built ({action:?})"),
                })
            }
            TemplateCheck::Valid { .. } => None,
            TemplateCheck::Invalid { reason } => {
                metrics.record_template_build(crate::metrics::BuildOutcome::Failed);
                let repeated = self
                    .last_failure
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(handler.to_owned(), reason.clone())
                    .is_some_and(|last| &last == reason);
                (!repeated).then(|| crate::k8s::publisher::Notice::TemplateFailed {
                    template: handler.to_owned(),
                    detail: reason.clone(),
                })
            }
        };
        if valid {
            self.last_failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(handler);
        }
        self.observer.warm().set_template(
            handler,
            match check {
                TemplateCheck::Valid { .. } => Ok(()),
                TemplateCheck::Invalid { reason } => Err(reason.clone()),
            },
            rebuilt,
        );
        if let (Some(tx), Some(n)) = (&self.notices, notice) {
            // Events are best effort: a full queue drops one rather than stalling the keeper.
            let _ = tx.try_send(n);
        }
    }
}

/// First retry after a failed probe round; doubles up to `probe.interval_seconds`.
const PROBE_RETRY_FIRST: Duration = Duration::from_secs(1);

/// Forwards the VM engine's per-event figures (histogram samples, build outcomes) to the metrics.
struct PoolMetrics(Arc<Metrics>);

impl crate::vm::pool::PoolObserver for PoolMetrics {
    fn acquired(&self, _template: &str, duration: Duration, _from_pool: bool, cold: bool) {
        self.0.observe_template_acquire(duration.as_secs_f64());
        if cold {
            self.0.record_template_miss();
        } else {
            self.0.record_template_hit();
        }
    }
    fn built(&self, _template: &str, outcome: crate::vm::pool::BuildOutcome, _duration: Duration) {
        self.0.record_template_build(match outcome {
            crate::vm::pool::BuildOutcome::Success => crate::metrics::BuildOutcome::Ok,
            crate::vm::pool::BuildOutcome::Failure => crate::metrics::BuildOutcome::Failed,
        });
    }
}

/// The template engine (when `[[templates]]` are configured) and the gRPC API socket.
struct VmPart {
    engine: Option<Arc<crate::vm::engine::Engine>>,
    api: tokio::task::JoinHandle<()>,
    api_stop: tokio::sync::oneshot::Sender<()>,
    gauges: tokio::task::JoinHandle<()>,
}

impl VmPart {
    async fn stop(self) {
        let _ = self.api_stop.send(());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.api).await;
        self.gauges.abort();
        if let Some(e) = self.engine {
            e.shutdown().await;
        }
    }
}

async fn start_vm_engine(
    config: &NodedConfig,
    metrics: &Arc<Metrics>,
    observer: &Arc<Observer>,
) -> Result<VmPart, DaemonError> {
    let engine = if config.templates.is_empty() {
        None
    } else {
        let mut opts = crate::vm::engine::EngineOptions::from_config(config);
        opts.observer = Some(Arc::new(PoolMetrics(Arc::clone(metrics))));
        // A broken template input (apt unreachable, no QEMU) must not take the runtime manager down:
        // the error is logged, template_ready stays 0 and Status lists no template.
        match crate::vm::engine::Engine::start(opts).await {
            Ok(e) => Some(e),
            Err(e) => {
                error!("VM templates disabled: {e}");
                None
            }
        }
    };
    let gauges = {
        let engine = engine.clone();
        let metrics = Arc::clone(metrics);
        tokio::spawn(async move {
            let Some(engine) = engine else { return };
            loop {
                for t in engine.snapshot() {
                    metrics.set_template_ready(&t.name, t.ready);
                    metrics.set_template_pool(
                        &t.name,
                        u64::from(t.pool_ready),
                        u64::from(t.pool_target),
                    );
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    let listener = crate::api::bind(&config.daemon.api_socket)
        .map_err(|e| DaemonError::Component(e.to_string()))?;
    let service = crate::api::NodeService::new(engine.clone())
        .with_provider(observer.clone())
        .with_allowed_uids(config.daemon.api_allowed_uids.clone());
    let (api_stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let api = tokio::spawn(async move {
        if let Err(e) = crate::api::serve(listener, service, async {
            let _ = stop_rx.await;
        })
        .await
        {
            error!("{e}");
        }
    });
    info!(socket = %config.daemon.api_socket.display(), "node API listening");
    Ok(VmPart {
        engine,
        api,
        api_stop,
        gauges,
    })
}
