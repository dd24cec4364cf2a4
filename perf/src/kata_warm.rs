//! Benchmark: Kata pod sandbox start on the warm handler (a clone of Kata's factory template, kept by
//! noded) vs the cold handler (a booted VM), through CRI on the node-in-a-box's containerd with the
//! bootable fake Kata (real QEMU, same guest for both); and the time noded needs to rebuild the template
//! after a reboot emptied its tmpfs.
//!
//! Side by side in one run (the machine is noisy): each round starts one sandbox per handler, in
//! alternating order. The clock runs around `RunPodSandbox` (what kubelet waits for) and stops when
//! containerd answers: the shim's VM is up (cold: guest answered; clone: restored, `cont`, answered).
//! A sandbox whose VM did not boot the way its handler promises is counted, never silently timed.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use noded::cri::{CriClient, PodSpec};
use testkit::containerd::Series;
use testkit::fake_kata::FakeKata;
use testkit::scenario::{
    Booted, KataRelease, boot_with, image_archive, set_kata_check_seconds, wipe_kata_template,
};
use testkit::scrape::{NODE_METRICS, metric, scrape};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sandboxes per handler.
    #[arg(long, default_value_t = 10)]
    pub pods: usize,
    /// Reboots (template tmpfs emptied) after which the rebuild is timed.
    #[arg(long, default_value_t = 3)]
    pub reboots: usize,
    /// containerd series of the box (1.6, 1.7, 2.1).
    #[arg(long, default_value = "1.6", value_parser = crate::report::parse_series)]
    pub series: Series,
}

const WARM: &str = "kata-qemu-warm";
const COLD: &str = "kata-qemu";
const TIMEOUT: Duration = Duration::from_secs(180);
/// The keeper's check interval in the box: a rebuild is noticed within 1 s, so the figure is
/// dominated by the build itself (on a node the 30 s default bounds the detection delay).
const CHECK_SECONDS: u64 = 1;

pub fn run(args: &Args) -> Result<()> {
    crate::report::block_on(run_async(args))
}

async fn run_async(args: &Args) -> Result<()> {
    let archive = image_archive()?;
    let bins = testkit::containerd::binaries(args.series)?;
    let b = boot_with(args.series, bins, &archive, KataRelease::Bootable).await?;
    set_kata_check_seconds(&b.nodebox, CHECK_SECONDS)?;
    let mut pod = b.pod(None)?;
    pod.start().await?;
    let result = Box::pin(measure(&b, args)).await;
    let _ = pod.delete().await;
    let m = result?;

    let warm = crate::report::Stats::of(&m.warm);
    let cold = crate::report::Stats::of(&m.cold);
    let rebuild = crate::report::Stats::of(&m.rebuild);
    let ratio = |c: f64, w: f64| if w > 0.0 { c / w } else { f64::NAN };
    let rows = vec![
        (
            format!("{WARM} RunPodSandbox (template clone)"),
            format!(
                "median {:.0} ms, p99 {:.0} ms (n={})",
                warm.median_ms, warm.p99_ms, warm.n
            ),
        ),
        (
            format!("{COLD} RunPodSandbox (cold boot)"),
            format!(
                "median {:.0} ms, p99 {:.0} ms (n={})",
                cold.median_ms, cold.p99_ms, cold.n
            ),
        ),
        (
            "cold / warm".into(),
            format!(
                "median {:.2}x, p99 {:.2}x",
                ratio(cold.median_ms, warm.median_ms),
                ratio(cold.p99_ms, warm.p99_ms)
            ),
        ),
        (
            "sandboxes that booted the wrong way".into(),
            m.wrong_kind.to_string(),
        ),
        (
            format!("reboot → template rebuilt (check every {CHECK_SECONDS} s)"),
            format!(
                "median {:.0} ms, p99 {:.0} ms (n={})",
                rebuild.median_ms, rebuild.p99_ms, rebuild.n
            ),
        ),
    ];
    let json = serde_json::json!({
        "bench": "kata-warm",
        "series": args.series.name(),
        "warm": warm,
        "cold": cold,
        "ratio_median": ratio(cold.median_ms, warm.median_ms),
        "ratio_p99": ratio(cold.p99_ms, warm.p99_ms),
        "wrong_kind": m.wrong_kind,
        "rebuild_after_reboot": rebuild,
        "template_check_seconds": CHECK_SECONDS,
    });
    crate::report::emit("perf kata-warm", &json, &rows);
    Ok(())
}

#[derive(Default)]
struct Measured {
    warm: Vec<Duration>,
    cold: Vec<Duration>,
    wrong_kind: usize,
    rebuild: Vec<Duration>,
}

async fn measure(b: &Booted, args: &Args) -> Result<Measured> {
    wait_until("the warm path to be proven", || {
        b.outside
            .api
            .state()
            .condition("KataWarmTemplateReady")
            .is_some_and(|c| c["status"] == "True")
    })
    .await?;
    let kata = FakeKata {
        root: b.nodebox.path("/opt/kata"),
    };
    let mut cri = CriClient::connect(&b.nodebox.containerd_socket()).await?;
    let mut m = Measured::default();
    for i in 0..args.pods {
        let order = if i % 2 == 0 {
            [WARM, COLD]
        } else {
            [COLD, WARM]
        };
        for handler in order {
            let mut spec = PodSpec::unique("bench", handler);
            spec.host_network = true;
            let t = Instant::now();
            let id = cri.run_pod(&spec, TIMEOUT).await?;
            let took = t.elapsed();
            let boot = kata
                .vm_calls()
                .into_iter()
                .rfind(|v| v["id"] == id.as_str())
                .and_then(|v| v["boot"].as_str().map(str::to_owned))
                .with_context(|| format!("no VM recorded for sandbox {id}"))?;
            cri.remove_pod(&id, TIMEOUT).await?;
            let expected = if handler == WARM { "template" } else { "cold" };
            if boot != expected {
                eprintln!("{handler}: sandbox {id} booted {boot}, expected {expected}");
                m.wrong_kind += 1;
                continue;
            }
            if handler == WARM {
                m.warm.push(took);
            } else {
                m.cold.push(took);
            }
        }
    }
    for _ in 0..args.reboots {
        let before = built_ok()?;
        wipe_kata_template(&b.nodebox)?;
        let t = Instant::now();
        wait_until("the template to be rebuilt", || {
            built_ok().is_ok_and(|n| n > before)
        })
        .await?;
        m.rebuild.push(t.elapsed());
    }
    Ok(m)
}

fn built_ok() -> Result<f64> {
    Ok(metric(
        &scrape(NODE_METRICS)?,
        "noded_template_builds_total",
        &[("outcome", "ok")],
    )
    .unwrap_or(0.0))
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < TIMEOUT {
        if done() {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("timed out waiting for {what}")
}
