//! Warm templates for real Kata pods, on the production path: the box bakes a Kata release whose
//! `kata-runtime factory init` builds a real QEMU template and whose shim boots every sandbox as a
//! real QEMU clone of it (or cold). The DaemonSet pod must keep that template built and current, prove
//! the warm path with its probe, and count real pods' boots as hits and misses — through a reboot
//! (tmpfs wiped), a build failure, a damaged template and a new Kata release baked on the node.

use std::time::Duration;

use anyhow::{Context, ensure};
use testkit::containerd::Series;
use testkit::fake_kata::FakeKata;
use testkit::scenario::{
    Booted, KataRelease, bake, boot_with, box_prerequisites, set_kata_check_seconds,
    wipe_kata_template,
};
use testkit::scrape::{grep, metric};

const WARM: &str = "kata-qemu-warm";
const COLD: &str = "kata-qemu";
const TIMEOUT: Duration = Duration::from_secs(120);
const RECORD: &str = "/var/lib/noded/kata/factory-template.configuration-qemu-warm.json";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_in_a_box_warm_containerd_1_6() {
    run(Series::V1_6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_in_a_box_warm_containerd_1_7() {
    run(Series::V1_7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_in_a_box_warm_containerd_2_1() {
    run(Series::V2_1).await;
}

async fn run(series: Series) {
    let Some((bins, archive)) = box_prerequisites(series) else {
        return;
    };
    let b = boot_with(series, bins, &archive, KataRelease::Bootable)
        .await
        .expect("box boots");
    let mut pod = None;
    let outcome = Box::pin(warm_path(&b, &mut pod)).await;
    if let Err(e) = outcome {
        let logs = pod.as_ref().map(|p| p.logs()).unwrap_or_default();
        panic!(
            "{series}: {e:#}\n--- noded log ---\n{}\n--- calls.log ---\n{}\n--- containerd log ---\n{}",
            testkit::nodebox::tail(&logs, 60),
            testkit::nodebox::tail(&kata(&b).calls().join("\n"), 30),
            testkit::nodebox::tail(&b.nodebox.containerd_log(), 20),
        );
    }
    if let Some(mut p) = pod {
        let _ = p.delete().await;
    }
}

fn kata(b: &Booted) -> FakeKata {
    FakeKata {
        root: b.nodebox.path("/opt/kata"),
    }
}

async fn warm_path(
    b: &Booted,
    slot: &mut Option<testkit::kubelet::PodRunner>,
) -> anyhow::Result<()> {
    let api = &b.outside.api;
    // Shorter checks than a node's 30 s, so each phase converges in seconds; everything else is baked.
    set_kata_check_seconds(&b.nodebox, 2)?;
    let pod = slot.insert(b.pod(None)?);
    pod.start().await?;
    b.wait_taint_lifted(TIMEOUT).await?;

    // 1. The template is built by noded at start, and the warm probe proves it: condition + label.
    let took = wait_for(TIMEOUT, "KataWarmTemplateReady=True", || {
        let st = api.state();
        st.condition("KataWarmTemplateReady")
            .is_some_and(|c| c["status"] == "True")
            && st.label("noded.io/warm-templates").as_deref() == Some("1")
    })
    .await?;
    eprintln!(
        "{}: warm path proven {took:?} after the taint was lifted",
        b.nodebox.series
    );
    let m = scrape()?;
    ensure!(
        metric(&m, "noded_template_ready", &[("template", WARM)]) == Some(1.0),
        "template_ready: {}",
        grep(&m, "noded_template_ready")
    );
    ensure!(
        metric(
            &m,
            "noded_template_pool_size",
            &[("template", WARM), ("state", "ready")]
        ) == Some(1.0),
        "pool size: {}",
        grep(&m, "noded_template_pool_size")
    );
    let built = record_version(b)?;
    ensure!(built == "3.99.0-box", "recorded Kata version {built}");

    // 2. A real pod on the warm handler is a clone and counted as a hit with a template boot time;
    //    one on the cold handler boots cold and is no miss (its handler has no template).
    let hits = counter(&m, "noded_template_hits_total");
    let misses = counter(&m, "noded_template_misses_total");
    let boot = Box::pin(start_pod(b, WARM, "warm-1")).await?;
    ensure!(boot == "template", "first warm pod booted {boot}");
    wait_counter("noded_template_hits_total", hits + 1.0).await?;
    wait_metric(
        "noded_vm_boot_seconds_count",
        &[("runtime_handler", WARM), ("boot", "template")],
        1.0,
    )
    .await?;
    let boot = Box::pin(start_pod(b, COLD, "cold-1")).await?;
    ensure!(boot == "cold", "cold handler pod booted {boot}");
    wait_metric(
        "noded_vm_boot_seconds_count",
        &[("runtime_handler", COLD), ("boot", "cold")],
        1.0,
    )
    .await?;
    ensure!(
        counter(&scrape()?, "noded_template_misses_total") == misses,
        "a cold pod of a handler without template counted as a miss"
    );

    // 3. Reboot: the template tmpfs is gone. noded rebuilds it and the next warm pod is a hit again.
    let builds = built_ok(&scrape()?);
    wipe_kata_template(&b.nodebox)?;
    wait_metric("noded_template_builds_total", OK, builds + 1.0).await?;
    wait_for(
        TIMEOUT,
        "KataWarmTemplateReady=True after the rebuild",
        || {
            api.state()
                .condition("KataWarmTemplateReady")
                .is_some_and(|c| c["status"] == "True")
        },
    )
    .await?;
    let boot = Box::pin(start_pod(b, WARM, "warm-after-reboot")).await?;
    ensure!(
        boot == "template",
        "warm pod after the rebuild booted {boot}"
    );

    // 4. The build fails (broken Kata): the node says so, warm pods still run — cold, as misses.
    let fail = b.nodebox.path("/opt/kata/fail-init");
    std::fs::write(&fail, b"")?;
    wipe_kata_template(&b.nodebox)?;
    wait_for(
        TIMEOUT,
        "KataWarmTemplateReady=False/TemplateNotBuilt",
        || {
            api.state()
                .condition("KataWarmTemplateReady")
                .is_some_and(|c| c["status"] == "False" && c["reason"] == "TemplateNotBuilt")
                && api.state().label("noded.io/warm-templates").as_deref() == Some("0")
        },
    )
    .await?;
    ensure!(
        !api.state().has_startup_taint(),
        "a missing template must never taint the node"
    );
    let misses = counter(&scrape()?, "noded_template_misses_total");
    let boot = Box::pin(start_pod(b, WARM, "warm-while-broken")).await?;
    ensure!(boot == "cold", "warm pod without template booted {boot}");
    wait_counter("noded_template_misses_total", misses + 1.0).await?;
    wait_metric(
        "noded_vm_boot_seconds_count",
        &[("runtime_handler", WARM), ("boot", "cold")],
        1.0,
    )
    .await?;
    std::fs::remove_file(&fail)?;
    wait_for(TIMEOUT, "template back after the fix", || {
        api.state()
            .condition("KataWarmTemplateReady")
            .is_some_and(|c| c["status"] == "True")
    })
    .await?;

    // 5. A damaged template (saved device state rewritten) is rebuilt before it is used again.
    let builds = built_ok(&scrape()?);
    let state = b.nodebox.path("/run/vc/vm/template/state");
    let len = std::fs::metadata(&state)?.len();
    std::fs::write(&state, vec![0u8; usize::try_from(len)?])?;
    wait_metric("noded_template_builds_total", OK, builds + 1.0).await?;
    ensure!(
        std::fs::read(&state)? != vec![0u8; usize::try_from(len)?],
        "the damaged state is still there after the rebuild"
    );
    let boot = Box::pin(start_pod(b, WARM, "warm-after-damage")).await?;
    ensure!(
        boot == "template",
        "warm pod after the damage booted {boot}"
    );

    // 6. A new Kata release baked on the node: the template is rebuilt with the new fingerprint.
    let (tarball, sha) =
        testkit::scenario::bootable_kata_tarball(b.outside.dir.path(), "3.99.1-box")?;
    let installer = b.outside.dir.path().join("installer-rebake");
    std::fs::copy(b.nodebox.path("/usr/local/bin/installer"), &installer)?;
    bake(&b.nodebox, &installer, &tarball, &sha)?;
    set_kata_check_seconds(&b.nodebox, 2)?;
    wait_for(TIMEOUT, "template rebuilt for Kata 3.99.1-box", || {
        record_version(b).is_ok_and(|v| v == "3.99.1-box")
    })
    .await?;
    let boot = Box::pin(start_pod(b, WARM, "warm-after-upgrade")).await?;
    ensure!(
        boot == "template",
        "warm pod after the upgrade booted {boot}"
    );
    Ok(())
}

fn record_version(b: &Booted) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(b.nodebox.path(RECORD)).context(RECORD)?;
    let v: serde_json::Value = serde_json::from_str(&text)?;
    v["fingerprint"]["kata_version"]
        .as_str()
        .map(str::to_owned)
        .context("no kata_version in the record")
}

/// Runs a pod on `handler` and returns how its VM booted (`template`, `cold`).
async fn start_pod(b: &Booted, handler: &str, name: &str) -> anyhow::Result<String> {
    let vm = Box::pin(b.run_kata_pod(handler, name, "/opt/kata", TIMEOUT)).await?;
    Ok(vm["boot"].as_str().unwrap_or_default().to_owned())
}

async fn wait_for(
    timeout: Duration,
    what: &str,
    done: impl FnMut() -> bool,
) -> anyhow::Result<Duration> {
    testkit::scrape::wait_until(timeout, what, done).await
}

async fn wait_counter(name: &str, at_least: f64) -> anyhow::Result<()> {
    wait_metric(name, &[], at_least).await
}

async fn wait_metric(name: &str, labels: &[(&str, &str)], at_least: f64) -> anyhow::Result<()> {
    testkit::scrape::wait_node_metric(name, labels, at_least, TIMEOUT).await
}

fn scrape() -> anyhow::Result<String> {
    testkit::scrape::scrape(testkit::scrape::NODE_METRICS)
}

const OK: &[(&str, &str)] = &[("outcome", "ok")];

fn built_ok(text: &str) -> f64 {
    metric(text, "noded_template_builds_total", OK).unwrap_or(0.0)
}

fn counter(text: &str, name: &str) -> f64 {
    metric(text, name, &[]).unwrap_or(0.0)
}
