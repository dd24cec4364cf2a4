//! Benchmark: cold boot vs template clone of the same guest, side by side in one run; host memory of
//! an idle clone vs an idle cold VM; `AcquireVm` from a warm pool (paused and running clones).
//!
//! `cargo run --release -p perf -- template [--rounds 5] [--memory-mib 512] [--acquires 20]` as root.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use noded::api::{self, NodeService, pb};
use noded::config::TemplateSection;
use noded::proctable;
use noded::vm::clone::{After, StartedVm, cold_boot, restore};
use noded::vm::engine::{Engine, EngineOptions, resolve};
use noded::vm::guest::GuestConsole;
use noded::vm::template::{self, Layout};

use crate::report::{Stats, emit};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Cold boots and clones each (alternating, same guest).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Guest memory (DESIGN §11: 512 MiB, 1 vCPU).
    #[arg(long, default_value_t = 512)]
    memory_mib: u64,
    /// AcquireVm calls per pool mode, each from a full (warm) pool.
    #[arg(long, default_value_t = 20)]
    acquires: usize,
    /// Guest asset cache (shared with `noded run`'s local default).
    #[arg(long, default_value = ".noded-data")]
    data_dir: PathBuf,
}

fn section(memory_mib: u64, target: u32) -> TemplateSection {
    TemplateSection {
        name: "bench".into(),
        runtime_handler: "kata-qemu-warm".into(),
        memory_mib,
        vcpus: 1,
        kernel: None,
        initrd: None,
        pool_target: target,
        pool_memory_budget_mib: 4096,
        max_vms_in_use: noded::config::default_max_vms_in_use(),
    }
}

fn options(args: &Args, run_dir: &Path, target: u32, mode: After) -> EngineOptions {
    EngineOptions {
        data_dir: args.data_dir.clone(),
        run_dir: run_dir.to_path_buf(),
        templates: vec![section(args.memory_mib, target)],
        mode,
        health_interval: Duration::from_secs(3600),
        accel: None,
        observer: None,
        guest: noded::vm::engine::GuestSource::download(),
        vm_cgroup: None,
    }
}

/// Host memory of an idle VM a moment after it answered (guest settled, no request in flight).
struct IdleUsage {
    pss: u64,
    private: u64,
    /// The private part of the guest RAM mapping only (for a clone: pages copied on write).
    guest_private: u64,
}

async fn idle_usage(vm: &StartedVm, guest_file: &Path) -> anyhow::Result<IdleUsage> {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let pid = vm.vm.pid().context("VM has no pid")?;
    let total = proctable::memory_of(pid)?;
    Ok(IdleUsage {
        pss: total.pss,
        private: total.private,
        guest_private: proctable::mapping_private(pid, guest_file)?,
    })
}

/// CPU time (user + system) of `pid`, from /proc/<pid>/stat, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state(0) ... utime(11) stime(12).
    Ok(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
}

/// Share of one CPU an idle, running VM uses (what a running pooled clone costs while it waits).
async fn idle_cpu_pct(pid: u32) -> anyhow::Result<f64> {
    let window = Duration::from_secs(3);
    let before = cpu_ticks(pid)?;
    tokio::time::sleep(window).await;
    let after = cpu_ticks(pid)?;
    // USER_HZ is 100 on Linux.
    Ok((after - before) as f64 / 100.0 / window.as_secs_f64() * 100.0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median_u64(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

struct PoolFigures {
    rpc: Stats,
    to_answer: Stats,
    server: Stats,
}

async fn pool_bench(args: &Args, base: &Path, mode: After) -> anyhow::Result<PoolFigures> {
    let run_dir = base.join(format!("pool-{mode:?}").to_lowercase());
    let engine = Engine::start(options(args, &run_dir, 2, mode)).await?;
    let result = async {
        anyhow::ensure!(
            engine.wait_ready(Duration::from_secs(600)).await,
            "pool never filled"
        );
        let socket = run_dir.join("api.sock");
        let listener = api::bind(&socket)?;
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(api::serve(
            listener,
            NodeService::new(Some(Arc::clone(&engine))),
            async {
                let _ = stop_rx.await;
            },
        ));
        let mut client = api::connect(&socket).await?;
        let (mut rpc, mut answer, mut server_side) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.acquires {
            anyhow::ensure!(
                engine.wait_ready(Duration::from_secs(120)).await,
                "pool did not refill"
            );
            let t0 = Instant::now();
            let vm = client
                .acquire_vm(pb::AcquireVmRequest {
                    template: String::new(),
                })
                .await?
                .into_inner();
            rpc.push(t0.elapsed());
            anyhow::ensure!(vm.from_pool, "pool was not warm");
            let mut c = GuestConsole::connect(Path::new(&vm.console)).await?;
            c.ping(Duration::from_secs(10)).await?;
            answer.push(t0.elapsed());
            server_side.push(Duration::from_micros(vm.acquire_micros));
            drop(c);
            client
                .release_vm(pb::ReleaseVmRequest { vm_id: vm.vm_id })
                .await?;
        }
        let _ = stop.send(());
        let _ = server.await;
        Ok(PoolFigures {
            rpc: Stats::of(&rpc),
            to_answer: Stats::of(&answer),
            server: Stats::of(&server_side),
        })
    }
    .await;
    engine.shutdown().await;
    result
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        nix::unistd::geteuid().is_root(),
        "the template benchmark mounts tmpfs: run it as root"
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(bench(args))
}

async fn bench(args: &Args) -> anyhow::Result<()> {
    let tmp = tempfile::Builder::new()
        .prefix("nperf")
        .tempdir_in("/tmp")?;
    let layout = Layout::new(&tmp.path().join("run"))?;
    let sec = section(args.memory_mib, 0);
    let opts = options(args, &layout.run_dir, 0, After::Running);
    let (resolved, accel, qemu_version) = resolve(&opts, &sec, &layout).await?;
    let spec = &resolved.spec;
    let backend = &*resolved.backend;
    eprintln!(
        "guest: {} ({}), {} MiB, accel={}",
        resolved.assets.kernel_package,
        qemu_version,
        args.memory_mib,
        accel.as_str()
    );
    let t = template::build(backend, &layout, spec).await?;

    let mut cold_run = Vec::new();
    let mut cold_answer = Vec::new();
    let mut clone_run = Vec::new();
    let mut clone_answer = Vec::new();
    let (mut cold_priv, mut cold_pss, mut clone_priv, mut clone_pss, mut clone_cow) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut idle_cpu = f64::NAN;
    for round in 0..args.rounds {
        let cold = cold_boot(
            backend,
            &layout,
            "bench",
            &spec.machine,
            spec.tsc_khz,
            Duration::from_secs(300),
        )
        .await?;
        cold_run.push(cold.to_running);
        cold_answer.push(cold.to_answer);
        let u = idle_usage(&cold, &cold.vm.launch().memory_file).await?;
        cold_priv.push(u.private);
        cold_pss.push(u.pss);
        cold.vm.kill().await;

        let clone = restore(backend, &layout, &t, After::Running).await?;
        clone_run.push(clone.to_running);
        clone_answer.push(clone.to_answer);
        let u = idle_usage(&clone, &t.memory_file()).await?;
        clone_priv.push(u.private);
        clone_pss.push(u.pss);
        clone_cow.push(u.guest_private);
        if round == 0 {
            idle_cpu = idle_cpu_pct(clone.vm.pid().context("pid")?).await?;
        }
        clone.vm.kill().await;
        eprintln!(
            "round {round}: cold {:.0} ms, clone {:.1} ms to answer",
            ms(cold_answer[round]),
            ms(clone_answer[round])
        );
    }
    let manifest = t.manifest.clone();
    template::destroy_dir(&t.dir);

    let paused = pool_bench(args, tmp.path(), After::Paused).await?;
    let running = pool_bench(args, tmp.path(), After::Running).await?;

    let cold_a = Stats::of(&cold_answer);
    let clone_a = Stats::of(&clone_answer);
    let cold_r = Stats::of(&cold_run);
    let clone_r = Stats::of(&clone_run);
    let guest_bytes = args.memory_mib << 20;
    let pct = |a: u64, b: u64| {
        if b == 0 {
            f64::NAN
        } else {
            100.0 * a as f64 / b as f64
        }
    };
    let (cp, cps, kp, kps, cow) = (
        median_u64(&cold_priv),
        median_u64(&cold_pss),
        median_u64(&clone_priv),
        median_u64(&clone_pss),
        median_u64(&clone_cow),
    );
    let json = serde_json::json!({
        "benchmark": "template",
        "guest_memory_mib": args.memory_mib,
        "vcpus": 1,
        "rounds": args.rounds,
        "accel": accel.as_str(),
        "qemu": qemu_version,
        "kernel_package": resolved.assets.kernel_package,
        "template_boot_ms": manifest.boot_ms,
        "template_save_ms": manifest.save_ms,
        "template_state_bytes": manifest.state.size,
        "cold_spawn_to_running_ms": cold_r,
        "cold_spawn_to_answer_ms": cold_a,
        "clone_spawn_to_running_ms": clone_r,
        "clone_spawn_to_answer_ms": clone_a,
        "clone_speedup": cold_a.median_ms / clone_a.median_ms,
        "clone_speedup_p90": cold_a.p90_ms / clone_a.p90_ms,
        "cold_idle_private_bytes": cp,
        "cold_idle_pss_bytes": cps,
        "clone_idle_private_bytes": kp,
        "clone_idle_pss_bytes": kps,
        "clone_guest_ram_cow_bytes": cow,
        "clone_private_pct_of_guest": pct(kp, guest_bytes),
        "clone_private_pct_of_cold": pct(kp, cp),
        "clone_guest_ram_cow_pct_of_guest": pct(cow, guest_bytes),
        "clone_idle_running_cpu_pct": idle_cpu,
        "pool_paused_acquire_rpc_ms": paused.rpc,
        "pool_paused_acquire_to_answer_ms": paused.to_answer,
        "pool_paused_acquire_server_ms": paused.server,
        "pool_running_acquire_rpc_ms": running.rpc,
        "pool_running_acquire_to_answer_ms": running.to_answer,
        "pool_running_acquire_server_ms": running.server,
    });
    let s = |x: &Stats| {
        format!(
            "median {:.1} ms, p90 {:.1} ms, p99 {:.1} ms (n={})",
            x.median_ms, x.p90_ms, x.p99_ms, x.n
        )
    };
    let mib = |b: u64| format!("{:.1} MiB", b as f64 / f64::from(1 << 20));
    let rows = vec![
        (
            "guest".into(),
            format!("{} MiB, 1 vCPU, accel={}", args.memory_mib, accel.as_str()),
        ),
        ("cold spawn→running".into(), s(&cold_r)),
        ("clone spawn→running".into(), s(&clone_r)),
        ("cold spawn→guest answers".into(), s(&cold_a)),
        ("clone spawn→guest answers".into(), s(&clone_a)),
        (
            "clone_speedup (answer, median)".into(),
            format!("{:.1}x", cold_a.median_ms / clone_a.median_ms),
        ),
        (
            "idle cold VM private / PSS".into(),
            format!("{} / {}", mib(cp), mib(cps)),
        ),
        (
            "idle clone private / PSS".into(),
            format!(
                "{} / {} ({:.1}% of guest, {:.1}% of cold)",
                mib(kp),
                mib(kps),
                pct(kp, guest_bytes),
                pct(kp, cp)
            ),
        ),
        (
            "clone guest-RAM CoW".into(),
            format!("{} ({:.2}% of guest)", mib(cow), pct(cow, guest_bytes)),
        ),
        (
            "idle running clone CPU".into(),
            format!("{idle_cpu:.2}% of one core"),
        ),
        ("pool paused: AcquireVm RPC".into(), s(&paused.rpc)),
        ("pool paused: AcquireVm→answer".into(), s(&paused.to_answer)),
        ("pool running: AcquireVm RPC".into(), s(&running.rpc)),
        (
            "pool running: AcquireVm→answer".into(),
            s(&running.to_answer),
        ),
        (
            "template boot / save".into(),
            format!(
                "{} ms / {} ms, state {} B",
                manifest.boot_ms, manifest.save_ms, manifest.state.size
            ),
        ),
    ];
    emit("template: cold boot vs clone", &json, &rows);
    Ok(())
}
