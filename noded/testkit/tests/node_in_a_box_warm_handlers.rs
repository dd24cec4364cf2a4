//! A warm `[[handlers]]` entry on the node's path, once per containerd series: the AMI bakes a
//! bootable Kata release (real QEMU templates and clones) with the kata-qemu-warm preset and a
//! handler of the operator's, `kata-qemu-warm-debug` (`warm = true` plus a setting). The DaemonSet
//! pod keeps one Kata factory template per warm handler, each in its own template path with its own
//! record; a pod of the custom handler boots as a clone of *its* template and is counted under its
//! name; a reboot of that template alone is rebuilt without touching the preset's; uninstall unmounts
//! both.

use std::time::Duration;

use anyhow::{Context, ensure};
use testkit::containerd::Series;
use testkit::scenario::{
    Booted, boot_baked, bootable_kata_tarball, box_prerequisites, set_kata_check_seconds,
    wipe_kata_template_at,
};
use testkit::scrape::{NODE_METRICS, grep, metric, scrape, wait_node_metric, wait_until};

const CUSTOM: &str = "kata-qemu-warm-debug";
const PRESET: &str = "kata-qemu-warm";
const CUSTOM_TEMPLATE: &str = "/run/vc/vm/template-kata-qemu-warm-debug";
const PRESET_TEMPLATE: &str = "/run/vc/vm/template";
const TIMEOUT: Duration = Duration::from_secs(120);

const HANDLERS: &str = "[[handlers]]\nname = \"kata-qemu-warm-debug\"\nhypervisor = \"qemu\"\nwarm = true\nenable_debug = true\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_in_a_box_warm_handlers_containerd_1_6() {
    run(Series::V1_6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_in_a_box_warm_handlers_containerd_1_7() {
    run(Series::V1_7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_in_a_box_warm_handlers_containerd_2_1() {
    run(Series::V2_1).await;
}

async fn run(series: Series) {
    let Some((bins, archive)) = box_prerequisites(series) else {
        return;
    };
    let b = boot_baked(series, bins, &archive, |nodebox, installer, dir| {
        let (tarball, sha) = bootable_kata_tarball(dir, "3.99.0-box")?;
        let file = dir.join("handlers.toml");
        std::fs::write(&file, HANDLERS)?;
        nodebox.installer(
            installer,
            &[
                "bake",
                "--kata-tarball",
                &tarball.to_string_lossy(),
                "--sha256",
                &sha,
                "--nodeadm",
                "never",
                "--handlers",
                &file.to_string_lossy(),
            ],
        )?;
        Ok(())
    })
    .await
    .expect("box boots");
    let mut pod = None;
    if let Err(e) = Box::pin(scenario(&b, &mut pod)).await {
        let logs = pod.as_ref().map(|p| p.logs()).unwrap_or_default();
        panic!(
            "{series}: {e:#}\n--- noded log ---\n{}\n--- containerd log ---\n{}",
            testkit::nodebox::tail(&logs, 60),
            testkit::nodebox::tail(&b.nodebox.containerd_log(), 20),
        );
    }
}

fn node_metric(name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    scrape(NODE_METRICS)
        .ok()
        .and_then(|m| metric(&m, name, labels))
}

async fn scenario(
    b: &Booted,
    slot: &mut Option<testkit::kubelet::PodRunner>,
) -> anyhow::Result<()> {
    let api = &b.outside.api;
    set_kata_check_seconds(&b.nodebox, 2)?;
    let pod = slot.insert(b.pod(None)?);
    pod.start().await?;
    b.wait_taint_lifted(TIMEOUT).await?;

    // 1. One template per warm handler, each current, each proven by its probe.
    for t in [PRESET, CUSTOM] {
        wait_node_metric("noded_template_ready", &[("template", t)], 1.0, TIMEOUT)
            .await
            .with_context(|| format!("template of {t}"))?;
    }
    wait_until(
        TIMEOUT,
        "KataWarmTemplateReady=True, 2 warm templates",
        || {
            let st = api.state();
            st.condition("KataWarmTemplateReady")
                .is_some_and(|c| c["status"] == "True")
                && st.label("noded.io/warm-templates").as_deref() == Some("2")
        },
    )
    .await?;
    for (template, record) in [
        (
            CUSTOM_TEMPLATE,
            "factory-template.kata-qemu-warm-debug.json",
        ),
        (
            PRESET_TEMPLATE,
            "factory-template.configuration-qemu-warm.json",
        ),
    ] {
        ensure!(
            b.nodebox.path(template).join("state").is_file(),
            "no template state in {template}"
        );
        let record = format!("/var/lib/noded/kata/{record}");
        ensure!(b.nodebox.path(&record).is_file(), "no record {record}");
    }
    // The custom handler's configuration: noded's templating copy plus its drop-in.
    let own = "/opt/kata/share/defaults/kata-containers/noded/kata-qemu-warm-debug";
    let copy: toml::Table =
        std::fs::read_to_string(b.nodebox.path(format!("{own}/configuration-qemu.toml")))?
            .parse()?;
    ensure!(
        copy["factory"]["template_path"].as_str() == Some(CUSTOM_TEMPLATE)
            && copy["factory"]["enable_template"].as_bool() == Some(true),
        "custom warm copy: {copy}"
    );
    ensure!(
        b.nodebox
            .path(format!("{own}/config.d/50-noded.toml"))
            .is_file(),
        "no drop-in for the custom warm handler"
    );

    // 2. A pod of the custom handler is a clone of its own template, counted under its name.
    let vm = Box::pin(b.run_kata_pod(CUSTOM, "custom-warm", "/opt/kata", TIMEOUT)).await?;
    ensure!(
        vm["boot"] == "template"
            && vm["reason"]
                .as_str()
                .is_some_and(|r| r.contains(CUSTOM_TEMPLATE)),
        "custom warm pod: {vm}"
    );
    wait_node_metric(
        "noded_vm_boot_seconds_count",
        &[("runtime_handler", CUSTOM), ("boot", "template")],
        1.0,
        TIMEOUT,
    )
    .await?;

    // 3. Reboot of the custom template alone: rebuilt; the preset's is left as it was.
    let preset_state = b.nodebox.path(PRESET_TEMPLATE).join("state");
    let preset_before = std::fs::metadata(&preset_state)?.modified()?;
    let ok = [("outcome", "ok")];
    let builds = node_metric("noded_template_builds_total", &ok).unwrap_or(0.0);
    wipe_kata_template_at(&b.nodebox, CUSTOM_TEMPLATE)?;
    wait_node_metric("noded_template_builds_total", &ok, builds + 1.0, TIMEOUT).await?;
    wait_until(TIMEOUT, "custom template rebuilt", || {
        b.nodebox.path(CUSTOM_TEMPLATE).join("state").is_file()
    })
    .await?;
    ensure!(
        std::fs::metadata(&preset_state)?.modified()? == preset_before,
        "the preset's template was rebuilt with the custom one"
    );
    let vm = Box::pin(b.run_kata_pod(CUSTOM, "custom-after-reboot", "/opt/kata", TIMEOUT)).await?;
    ensure!(
        vm["boot"] == "template",
        "custom warm pod after its rebuild: {vm}"
    );
    let m = scrape(NODE_METRICS)?;
    ensure!(
        metric(&m, "noded_template_ready", &[("template", CUSTOM)]) == Some(1.0),
        "{}",
        grep(&m, "noded_template_ready")
    );

    // 4. Uninstall (DaemonSet gone first): both templates unmounted through Kata, no Kata left.
    if let Some(mut p) = slot.take() {
        p.delete().await?;
    }
    b.uninstall_leaves_runc(&["/opt/kata", "/etc/noded/noded.toml"])
        .await?;
    for t in [CUSTOM_TEMPLATE, PRESET_TEMPLATE] {
        ensure!(
            !b.nodebox.path(t).join("state").exists(),
            "template {t} left after uninstall"
        );
    }
    Ok(())
}
