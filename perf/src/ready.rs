//! Benchmark: node ready — publisher start → real probe sandbox (private containerd 1.6 + runc through
//! CRI) → startup taint removed on a request-level fake API server (the one noded's tests use).
//!
//! This is the baked-image path: containerd is already running with the runtime configured (noded's
//! `containerd apply` finds nothing to change), so what is measured is what stands between a node that
//! joined and a node that accepts Kata pods: connect, prove the runtime, lift the taint.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use noded::containerd::image::{self, PAUSE_IMAGE, PROBE_IMAGE};
use noded::cri::CriClient;

use testkit::fake_api;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Measured runs (median reported).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// busybox-static used to build the probe/pause images.
    #[arg(long, default_value = image::DEFAULT_BUSYBOX)]
    pub busybox: std::path::PathBuf,
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: &Args) -> anyhow::Result<()> {
    let t = Instant::now();
    let ctrd = testkit::containerd::start_temp(PAUSE_IMAGE)
        .await
        .context("private containerd")?;
    let containerd_start = t.elapsed();
    image::ensure_local_images(ctrd.socket(), &args.busybox)
        .await
        .context("import probe/pause images")?;
    let mut cri = CriClient::connect(ctrd.socket()).await?;
    for name in [PROBE_IMAGE, PAUSE_IMAGE] {
        cri.wait_image(name, Duration::from_secs(10)).await?;
    }

    let mut ready = Vec::new();
    let mut probe = Vec::new();
    let mut publish = Vec::new();
    for i in 0..args.runs.max(1) {
        let (total, p) = Box::pin(one_run(ctrd.socket())).await?;
        eprintln!("run {i}: ready in {total:?} (probe {p:?})");
        ready.push(total);
        probe.push(p);
        publish.push(total.saturating_sub(p));
    }
    let ready_s = crate::report::Stats::of(&ready);
    let probe_s = crate::report::Stats::of(&probe);
    let publish_s = crate::report::Stats::of(&publish);
    let json = serde_json::json!({
        "bench": "ready",
        "runs": ready.len(),
        "start_to_taint_removed": ready_s,
        "probe_sandbox": probe_s,
        "publish_after_probe": publish_s,
        "private_containerd_start_ms": containerd_start.as_secs_f64() * 1e3,
        "target_ms": 5000.0,
        "kata_deploy_reference_ms": 60000.0,
    });
    let rows = vec![
        ("runs".to_string(), ready.len().to_string()),
        (
            "start → taint removed, median".to_string(),
            format!(
                "{:.1} ms (min {:.1}, max {:.1})",
                ready_s.median_ms, ready_s.min_ms, ready_s.max_ms
            ),
        ),
        (
            "  real probe sandbox (runc), median".to_string(),
            format!("{:.1} ms", probe_s.median_ms),
        ),
        (
            "  API work after the probe, median".to_string(),
            format!("{:.1} ms", publish_s.median_ms),
        ),
        (
            "private containerd start (not in the above)".to_string(),
            format!("{:.1} ms", containerd_start.as_secs_f64() * 1e3),
        ),
        (
            "target".to_string(),
            "≤ 5000 ms (kata-deploy: ~60 s + restart gaps)".to_string(),
        ),
    ];
    crate::report::emit("node ready", &json, &rows);
    Ok(())
}

/// One fresh node: publisher + fake API server started, probe, wait for the taint to go.
async fn one_run(socket: &Path) -> anyhow::Result<(Duration, Duration)> {
    let fake = fake_api::FakeApi::new(fake_api::fresh_node());
    let start = Instant::now();
    let running = fake_api::start(&fake, fake_api::settings());
    let p0 = Instant::now();
    let outcome = fake_api::cri_probe(socket, "runc").await;
    let probe = p0.elapsed();
    if let Err(e) = &outcome {
        anyhow::bail!("runc probe failed: {e}");
    }
    running.probe("runc", true, None);
    fake.wait_for("startup taint removed", |s| !s.has_startup_taint())
        .await;
    let total = start.elapsed();
    running.stop().await;
    Ok((total, probe))
}
