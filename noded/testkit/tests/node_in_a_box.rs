//! The production path as one: AMI bake → `installer boot` → the node's containerd (1.6, 1.7, 2.1) →
//! the DaemonSet's own pod (its manifest, its image) through CRI → probes on every Kata handler →
//! startup taint lifted; then the lifecycle an operator puts a node through (kata-deploy's lifecycle
//! suite holds here too): drift + restart over D-Bus, kill -9, pod deletion, image upgrade, uninstall.

use std::collections::BTreeSet;
use std::time::Duration;

use noded::containerd::cri_plugin;
use noded::cri::{CriClient, PodSpec};
use testkit::containerd::Series;
use testkit::scenario::{Booted, boot};

const HANDLERS: [&str; 2] = ["kata-qemu", "kata-qemu-warm"];
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_in_a_box_containerd_1_6() {
    run(Series::V1_6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_in_a_box_containerd_1_7() {
    run(Series::V1_7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_in_a_box_containerd_2_1() {
    run(Series::V2_1).await;
}

async fn run(series: Series) {
    let Some((bins, archive)) = testkit::scenario::box_prerequisites(series) else {
        return;
    };
    let b = boot(series, bins, &archive).await.expect("box boots");
    let outcome = Box::pin(lifecycle(&b)).await;
    if let Err(e) = outcome {
        let pods = std::fs::read_dir(b.outside.dir.path().join("pods"))
            .map(|d| {
                d.flatten()
                    .map(|e| e.path().display().to_string())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        panic!(
            "{series}: {e:#}\n--- containerd log ---\n{}\n--- pod logs under {pods:?} ---\n{}",
            testkit::nodebox::tail(&b.nodebox.containerd_log(), 40),
            pod_logs(&b)
        );
    }
}

fn pod_logs(b: &Booted) -> String {
    let mut out = String::new();
    let mut stack = vec![b.outside.dir.path().join("pods")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(t) = std::fs::read_to_string(&p) {
                out.push_str(&format!(
                    "== {}\n{}\n",
                    p.display(),
                    testkit::nodebox::tail(&t, 60)
                ));
            }
        }
    }
    out
}

/// Kata shim Creates per handler, told apart by the ConfigPath each handler's table names.
fn creates_per_handler(b: &Booted) -> BTreeSet<String> {
    let kata = testkit::fake_kata::FakeKata {
        root: b.nodebox.path("/opt/kata"),
    };
    kata.shim_creates()
        .iter()
        .filter_map(|c| c["config_path"].as_str().map(str::to_owned))
        .filter_map(|p| {
            if p.ends_with("configuration-qemu.toml") {
                Some("kata-qemu".to_owned())
            } else if p.ends_with("configuration-qemu-warm.toml") {
                Some("kata-qemu-warm".to_owned())
            } else {
                None
            }
        })
        .collect()
}

async fn lifecycle(b: &Booted) -> anyhow::Result<()> {
    use anyhow::{Context, ensure};
    let api = &b.outside.api;
    let socket = b.nodebox.containerd_socket();
    ensure!(api.state().has_startup_taint(), "the node starts tainted");
    // 0. What boot did: handlers in containerd's config before containerd started.
    let mut cri = CriClient::connect(&socket).await?;
    let status = cri_plugin::status(&mut cri).await?;
    for h in HANDLERS {
        ensure!(
            status.handlers.contains_key(h),
            "containerd did not load {h} from the booted config: {:?}",
            status.handlers
        );
    }

    // 1. The DaemonSet pod: taint lifted only after both Kata handlers passed a real probe.
    let mut pod = b.pod(None)?;
    pod.start().await?;
    let took = b.wait_taint_lifted(BOOT_TIMEOUT).await.with_context(|| {
        format!(
            "noded log:\n{}\nAPI requests: {:?}",
            testkit::nodebox::tail(&pod.logs(), 40),
            api.state().log.iter().map(|r| r.line()).collect::<Vec<_>>()
        )
    })?;
    let proven = creates_per_handler(b);
    for h in HANDLERS {
        ensure!(
            proven.contains(h),
            "taint lifted without a probe sandbox on {h} (proven: {proven:?})"
        );
    }
    eprintln!(
        "{}: taint lifted {took:?} after the pod started",
        b.nodebox.series
    );
    pod.wait_ready(Duration::from_secs(30)).await?;
    {
        let st = api.state();
        let cond = st
            .condition("KataRuntimeReady")
            .context("no KataRuntimeReady")?;
        ensure!(cond["status"] == "True", "KataRuntimeReady: {cond}");
        ensure!(
            st.label("noded.io/kata-ready").as_deref() == Some("true"),
            "label noded.io/kata-ready missing"
        );
        for rc in HANDLERS {
            ensure!(
                st.runtime_classes.contains_key(rc),
                "RuntimeClass {rc} not published"
            );
        }
    }
    // 2. A real Prometheus scrapes the pod's /metrics (hostNetwork: the node's port 9464).
    let prom = testkit::prometheus::Prometheus::start(&["127.0.0.1:9464"])?;
    let ready = prom
        .wait_query("noded_runtime_ready", Duration::from_secs(30))
        .await?;
    ensure!(
        ready.len() >= HANDLERS.len(),
        "noded_runtime_ready series: {ready:?}"
    );
    drop(prom);

    // 3. A Kata sandbox of a workload, which every later step must leave running.
    let mut workload = PodSpec::unique("workload", "kata-qemu");
    workload.host_network = true;
    let workload_id = cri.run_pod(&workload, Duration::from_secs(60)).await?;
    let pid_before = b.nodebox.containerd_pid();

    // 4. Drift (an operator or nodeadm rewrote the config) + kill -9 of noded: the restarted container
    //    re-applies and restarts the node's containerd through systemd over D-Bus, and converges.
    let cfg = b.nodebox.path("/etc/containerd/config.toml");
    let drifted = testkit::nodebox::nodeadm_config(b.nodebox.series);
    let dropin = b.nodebox.path("/etc/containerd/config.d/noded-kata.toml");
    if dropin.exists() {
        std::fs::remove_file(&dropin)?;
    }
    std::fs::write(&cfg, drifted)?;
    let restarts_before = b.outside.bus.systemd.restart_calls().len();
    pod.kill9().await?;
    pod.wait_exited(Duration::from_secs(30)).await?;
    pod.restart_if_exited()
        .await?
        .context("the container did not restart")?;
    let deadline = std::time::Instant::now() + BOOT_TIMEOUT;
    while b.outside.bus.systemd.restart_calls().len() == restarts_before {
        ensure!(
            std::time::Instant::now() < deadline,
            "no RestartUnit over D-Bus after the drift; noded log:\n{}",
            testkit::nodebox::tail(&pod.logs(), 40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls = b.outside.bus.systemd.restart_calls();
    ensure!(
        calls.last().map(|(u, m)| (u.as_str(), m.as_str()))
            == Some(("containerd.service", "replace")),
        "restart calls: {calls:?}"
    );
    // fake-systemd logs the call before it runs the restart: until the unit's stop has run, the old
    // containerd still answers CRI and the unit's pidfile still names it.
    testkit::scrape::wait_until(BOOT_TIMEOUT, "containerd was not restarted", || {
        b.nodebox
            .containerd_pid()
            .is_some_and(|p| Some(p) != pid_before)
    })
    .await
    .with_context(|| {
        format!(
            "containerd pid {:?}, before the drift {pid_before:?}; containerd log:\n{}",
            b.nodebox.containerd_pid(),
            testkit::nodebox::tail(&b.nodebox.containerd_log(), 30)
        )
    })?;
    b.nodebox.wait_cri(Duration::from_secs(30)).await?;
    pod.wait_ready(BOOT_TIMEOUT).await?;
    let mut cri = CriClient::connect(&socket).await?;
    let status = cri_plugin::status(&mut cri).await?;
    for h in HANDLERS {
        ensure!(status.handlers.contains_key(h), "{h} not re-applied");
    }
    ensure!(
        !api.state().has_startup_taint(),
        "converged node is tainted again"
    );
    ensure!(
        testkit::nodebox::sandbox_ready(&mut cri, &workload_id).await?,
        "the workload's Kata sandbox did not survive the containerd restart"
    );

    // 5. Deleting the pod (DaemonSet deleted or rolled) leaves the runtime and running sandboxes.
    pod.delete().await?;
    let status = cri_plugin::status(&mut cri).await?;
    for h in HANDLERS {
        ensure!(
            status.handlers.contains_key(h),
            "{h} gone after pod deletion"
        );
    }
    ensure!(
        testkit::nodebox::sandbox_ready(&mut cri, &workload_id).await?,
        "workload sandbox disturbed by pod deletion"
    );

    // 6. Upgrade of the image (another tag of the DaemonSet image): converges, sandbox intact.
    let upgraded = format!("{}-upgrade", b.image);
    b.nodebox.ctr(&["images", "tag", &b.image, &upgraded])?;
    // CRI's image store learns of the new name from containerd's events (2.x: asynchronously).
    cri.wait_image(&upgraded, Duration::from_secs(30)).await?;
    let mut pod = b.pod(Some(&upgraded))?;
    pod.start().await?;
    pod.wait_ready(BOOT_TIMEOUT).await?;
    ensure!(
        !api.state().has_startup_taint(),
        "tainted after the upgrade"
    );
    ensure!(
        testkit::nodebox::sandbox_ready(&mut cri, &workload_id).await?,
        "workload sandbox disturbed by the upgrade"
    );
    pod.delete().await?;

    // 7. No probe sandbox is left behind by any of it (a killed noded's are removed at its next start).
    let probes = probe_sandboxes(&mut cri).await?;
    ensure!(probes.is_empty(), "probe sandboxes left: {probes:?}");
    cri.remove_pod(&workload_id, Duration::from_secs(30))
        .await?;

    // 8. installer uninstall: every artifact gone; containerd (restarted by its unit) runs runc pods.
    b.uninstall_leaves_runc(&[
        "/opt/kata",
        "/usr/local/bin/containerd-shim-kata-qemu-v2",
        "/usr/local/bin/containerd-shim-kata-qemu-warm-v2",
        "/usr/local/bin/installer",
        "/etc/noded/noded.toml",
        "/etc/systemd/system/noded-boot.service",
    ])
    .await?;
    Ok(())
}

/// Sandboxes carrying noded's probe label.
async fn probe_sandboxes(cri: &mut CriClient) -> anyhow::Result<Vec<String>> {
    let r = cri
        .runtime_service()
        .list_pod_sandbox(k8s_cri::v1::ListPodSandboxRequest { filter: None })
        .await?
        .into_inner();
    Ok(r.items
        .into_iter()
        .filter(|p| p.labels.contains_key(noded::cri::probe::PROBE_LABEL))
        .map(|p| p.id)
        .collect())
}
