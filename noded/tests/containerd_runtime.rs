//! The containerd runtime pieces against a real private containerd + runc of every series (1.6, 1.7,
//! 2.1); the tests that restart containerd run on one series per major version (1.6 and 2.1) to keep CI
//! time down.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use noded::containerd::cri_plugin::{self, loaded_handlers};
use noded::containerd::image::{self, K8S_NAMESPACE, PAUSE_IMAGE, PROBE_IMAGE};
use noded::containerd::private::PrivateContainerd;
use noded::cri::CriClient;
use noded::cri::probe::{ProbeOptions, ProbeStage, probe};
use noded::observe::latency;
use testkit::containerd::Series;
use testkit::per_series;

/// The series' default private config for `dir` with one more handler next to runc.
fn config_with_handler(series: Series, dir: &Path, name: &str, runtime_type: &str) -> String {
    let runc = "runtime_type = \"io.containerd.runc.v2\"";
    let text = testkit::containerd::default_config(series, dir, PAUSE_IMAGE);
    assert!(text.contains(runc));
    text.replacen(
        runc,
        &format!(
            "{runc}\n\n        [plugins.\"{}\".containerd.runtimes.{name}]\n          runtime_type = \"{runtime_type}\"",
            series.runtime_plugin()
        ),
        1,
    )
}

fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

per_series! {
[V1_6, V2_1]
async fn private_containerd_starts_stops_and_restarts(series) {
    if common::containerd::available_series(series).is_none() {
        return;
    }
    let mut ctrd = testkit::containerd::start(series, PAUSE_IMAGE).await.unwrap();
    let first = ctrd.containerd_pid().unwrap();
    let mut cri = CriClient::connect(ctrd.socket()).await.unwrap();
    assert_eq!(cri.version().await.unwrap().runtime_name, "containerd");

    ctrd.restart().await.unwrap();
    let second = ctrd.containerd_pid().unwrap();
    assert_ne!(first, second);
    assert!(!pid_alive(first), "old containerd {first} still running");
    assert!(
        loaded_handlers(ctrd.socket())
            .await
            .unwrap()
            .contains_key("runc")
    );

    // The restart command, run the way `--restart command:CMD` runs it.
    let out = Command::new("sh")
        .arg("-c")
        .arg(ctrd.restart_command())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let third = ctrd.containerd_pid().unwrap();
    assert_ne!(second, third);
    assert!(!pid_alive(second));
    let mut answered = false;
    for _ in 0..200 {
        if CriClient::connect(ctrd.socket()).await.is_ok() {
            answered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        answered,
        "containerd did not answer after the restart command"
    );

    ctrd.stop().await.unwrap();
    assert!(!pid_alive(third));
    assert!(
        CriClient::connect(ctrd.socket()).await.is_err() || {
            // A leftover socket file that nobody listens on must not answer calls.
            let mut c = CriClient::connect(ctrd.socket()).await.unwrap();
            c.version().await.is_err()
        }
    );
    ctrd.start_again().await.unwrap();
    assert!(
        CriClient::connect(ctrd.socket())
            .await
            .unwrap()
            .version()
            .await
            .is_ok()
    );
    let dir = ctrd.dir().to_path_buf();
    let last = ctrd.containerd_pid().unwrap();
    drop(ctrd);
    assert!(!pid_alive(last), "drop must kill containerd");
    assert!(!dir.exists(), "temp dir removed on drop");
}
}

per_series! {
async fn starts_from_a_config_file_the_caller_wrote(series) {
    let Some(bins) = common::containerd::available_series(series) else {
        return;
    };
    let tmp = tempfile::tempdir_in("/tmp").unwrap();
    let cfg = tmp.path().join("my-config.toml");
    let text = config_with_handler(series, tmp.path(), "extra", "io.containerd.extra.v2");
    std::fs::write(&cfg, text).unwrap();
    let ctrd = PrivateContainerd::start_with(tmp.path(), &cfg, &bins.launch())
        .await
        .unwrap();
    assert_eq!(ctrd.config_path(), cfg.as_path());
    let handlers = loaded_handlers(ctrd.socket()).await.unwrap();
    assert_eq!(handlers["extra"].runtime_type, "io.containerd.extra.v2");
    assert_eq!(handlers["runc"].runtime_type, "io.containerd.runc.v2");
}
}

per_series! {
async fn a_config_that_containerd_rejects_is_reported_with_its_log(series) {
    let Some(bins) = common::containerd::available_series(series) else {
        return;
    };
    let tmp = tempfile::tempdir_in("/tmp").unwrap();
    let cfg = tmp.path().join("bad.toml");
    // Valid TOML, but containerd refuses to start: `required_plugins` names a plugin that does not exist.
    let text = testkit::containerd::default_config(series, tmp.path(), PAUSE_IMAGE).replace(
        "required_plugins = [\"io.containerd.grpc.v1.cri\"]",
        "required_plugins = [\"io.containerd.grpc.v1.cri\", \"io.noded.no-such-plugin\"]",
    );
    std::fs::write(&cfg, text).unwrap();
    let started = tokio::time::timeout(Duration::from_secs(60), async {
        let r = PrivateContainerd::start_with(tmp.path(), &cfg, &bins.launch()).await;
        r.map(|_| ())
    })
    .await
    .unwrap();
    let err = started
        .expect_err("containerd must not come up")
        .to_string();
    assert!(err.contains("no-such-plugin"), "{err}");
}
}

per_series! {
async fn image_build_and_import_is_idempotent(series) {
    let Some(bins) = common::containerd::available_series(series) else {
        return;
    };
    let ctrd = testkit::containerd::start(series, PAUSE_IMAGE).await.unwrap();
    let busybox = Path::new(image::DEFAULT_BUSYBOX);
    let a = image::build_layout(busybox, &[PROBE_IMAGE, PAUSE_IMAGE]).unwrap();
    let b = image::build_layout(busybox, &[PROBE_IMAGE, PAUSE_IMAGE]).unwrap();
    assert_eq!(a.tar, b.tar, "same input, same bytes");

    let first = image::import_layout(ctrd.socket(), K8S_NAMESPACE, &a.tar)
        .await
        .unwrap();
    assert_eq!(first.len(), 2);
    assert!(
        first
            .iter()
            .all(|i| i.changed && i.digest == a.manifest_digest)
    );
    let second = image::ensure_local_images(ctrd.socket(), busybox)
        .await
        .unwrap();
    assert_eq!(second.len(), 2);
    assert!(
        second
            .iter()
            .all(|i| !i.changed && i.digest == a.manifest_digest),
        "{second:?}"
    );

    // The same tar is what `ctr images import` accepts: containerd's own client agrees on the digest.
    let tar_path = ctrd.dir().join("images.tar");
    image::write_layout_tar(busybox, &[PROBE_IMAGE, PAUSE_IMAGE], &tar_path).unwrap();
    let ls = Command::new(&bins.ctr)
        .args(["--address"])
        .arg(ctrd.socket())
        .args(["-n", K8S_NAMESPACE, "images", "ls"])
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&ls.stdout);
    for name in [PROBE_IMAGE, PAUSE_IMAGE] {
        let line = listing
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_default();
        assert!(
            line.contains(&a.manifest_digest),
            "{name} missing in:\n{listing}"
        );
    }

    let mut cri = CriClient::connect(ctrd.socket()).await.unwrap();
    cri.wait_image(PROBE_IMAGE, Duration::from_secs(10))
        .await
        .unwrap();
    cri.wait_image(PAUSE_IMAGE, Duration::from_secs(10))
        .await
        .unwrap();
    assert!(
        !cri.image_present("noded.local/never-imported:1")
            .await
            .unwrap()
    );
}
}

per_series! {
async fn cri_status_lists_the_runc_handler(series) {
    let Some(ctrd) = common::containerd::start_series(series).await else {
        return;
    };
    let mut cri = CriClient::connect(ctrd.socket()).await.unwrap();
    let v = cri.version().await.unwrap();
    assert_eq!(v.runtime_name, "containerd");
    assert_eq!(v.runtime_api_version, "v1");
    let status = cri_plugin::status(&mut cri).await.unwrap();
    assert!(status.runtime_ready(), "{status:?}");
    assert_eq!(status.default_runtime_name, "runc");
    if series.version().major >= 2 {
        // 2.x: no image config in Status; the sandbox image is the pinned one, and the served
        // handlers are listed.
        assert_eq!(status.sandbox_image, "", "{series}");
        assert!(
            status.runtime_handlers.contains(&"runc".to_owned()),
            "{:?}",
            status.runtime_handlers
        );
    } else {
        assert_eq!(status.sandbox_image, PAUSE_IMAGE, "{series}");
        assert!(status.runtime_handlers.is_empty(), "{series}");
    }
    assert_eq!(
        cri_plugin::sandbox_image(&mut cri).await.unwrap().as_deref(),
        Some(PAUSE_IMAGE),
        "{series}"
    );
    let runc = &status.handlers["runc"];
    assert_eq!(runc.runtime_type, "io.containerd.runc.v2");
    assert_eq!(
        runc.options.as_ref().and_then(|o| o.get("SystemdCgroup")),
        Some(&serde_json::Value::Bool(false))
    );
    assert_eq!(status.handlers.len(), 1, "{:?}", status.handlers.keys());
}
}

per_series! {
[V1_6, V2_1]
async fn a_runc_container_survives_a_containerd_restart(series) {
    let Some(mut ctrd) = common::containerd::start_series(series).await else {
        return;
    };
    let pod = common::containerd::start_sleeper(ctrd.socket(), "runc").await;
    let mut cri = CriClient::connect(ctrd.socket()).await.unwrap();
    let pid = cri
        .container_info(&pod.container_id)
        .await
        .unwrap()
        .pid
        .unwrap();
    let shims = common::containerd::pids_with_cmdline(&pod.sandbox_id);
    assert!(!shims.is_empty(), "no shim for sandbox {}", pod.sandbox_id);
    let sleepers: Vec<i32> = shims.into_iter().chain([pid.cast_signed()]).collect();
    ctrd.restart().await.unwrap();
    common::containerd::assert_running(ctrd.socket(), &pod.container_id).await;
    assert!(
        sleepers.iter().all(|p| pid_alive(*p)),
        "the container process died"
    );
    common::containerd::remove(ctrd.socket(), &pod).await;
    let mut cri = CriClient::connect(ctrd.socket()).await.unwrap();
    assert!(cri.all_pods().await.unwrap().is_empty());
}
}

per_series! {
async fn drop_kills_shims_and_containers(series) {
    let Some(ctrd) = common::containerd::start_series(series).await else {
        return;
    };
    let pod = common::containerd::start_sleeper(ctrd.socket(), "runc").await;
    let procs = common::containerd::pids_with_cmdline(&pod.sandbox_id);
    assert!(!procs.is_empty(), "shim for the sandbox not found");
    let sock = ctrd.socket().display().to_string();
    let shims = common::containerd::pids_with_cmdline(&sock);
    drop(ctrd);
    for p in procs.iter().chain(&shims) {
        assert!(!pid_alive(*p), "process {p} survived the drop");
    }
}
}

per_series! {
async fn probe_with_runc_succeeds_and_leaves_nothing_behind(series) {
    let Some(ctrd) = common::containerd::start_series(series).await else {
        return;
    };
    let outcome = probe(ctrd.socket(), "runc", &ProbeOptions::default()).await;
    assert!(outcome.ok, "{outcome:?}\n{}", ctrd.log_tail(20));
    assert_eq!(outcome.handler, "runc");
    assert_eq!(outcome.error, None);
    assert!(outcome.cleaned_up);
    let mut cri = CriClient::connect(ctrd.socket()).await.unwrap();
    assert!(cri.all_pods().await.unwrap().is_empty());
    assert!(cri.containers(None).await.unwrap().is_empty());
    let sock = ctrd.socket().display().to_string();
    // The shim exits once its last sandbox is removed: after containerd's Shutdown call returned,
    // in its own time (10 s, as for the fake Kata shim; 2 s was short for a loaded runner).
    let _ = testkit::scrape::wait_until(Duration::from_secs(10), "runc shims exited", || {
        common::containerd::pids_with_cmdline(&sock).is_empty()
    })
    .await;
    let shims = common::containerd::pids_with_cmdline(&sock);
    assert!(shims.is_empty(), "shims left after 10 s: {shims:?}");
}
}

per_series! {
async fn probe_with_a_failing_command_reports_the_exit_code(series) {
    let Some(ctrd) = common::containerd::start_series(series).await else {
        return;
    };
    let opts = ProbeOptions {
        command: vec!["/bin/sh".into(), "-c".into(), "exit 3".into()],
        ..ProbeOptions::default()
    };
    let outcome = probe(ctrd.socket(), "runc", &opts).await;
    assert!(!outcome.ok);
    assert_eq!(outcome.failed_at, Some(ProbeStage::ExitCode));
    assert!(
        outcome.error.as_deref().unwrap().contains("code 3"),
        "{outcome:?}"
    );
    assert!(outcome.cleaned_up);
    let mut cri = CriClient::connect(ctrd.socket()).await.unwrap();
    assert!(cri.all_pods().await.unwrap().is_empty());
}
}

per_series! {
async fn probe_with_an_unknown_handler_surfaces_containerds_error(series) {
    let Some(ctrd) = common::containerd::start_series(series).await else {
        return;
    };
    let outcome = probe(ctrd.socket(), "kata-nope", &ProbeOptions::default()).await;
    assert!(!outcome.ok);
    assert_eq!(outcome.failed_at, Some(ProbeStage::RunPodSandbox));
    let err = outcome.error.unwrap();
    assert!(
        err.contains(r#"no runtime for "kata-nope" is configured"#),
        "{err}"
    );
    assert!(!err.contains('\n'));
    let mut cri = CriClient::connect(ctrd.socket()).await.unwrap();
    assert!(cri.all_pods().await.unwrap().is_empty());
}
}

per_series! {
async fn probe_with_a_missing_shim_surfaces_containerds_error(series) {
    let Some(bins) = common::containerd::available_series(series) else {
        return;
    };
    let tmp = tempfile::tempdir_in("/tmp").unwrap();
    let cfg = tmp.path().join("config.toml");
    let text = config_with_handler(series, tmp.path(), "kata-qemu", "io.containerd.kata-qemu.v2");
    std::fs::write(&cfg, text).unwrap();
    let ctrd = PrivateContainerd::start_with(tmp.path(), &cfg, &bins.launch())
        .await
        .unwrap();
    common::containerd::import_images(ctrd.socket()).await;
    let outcome = probe(ctrd.socket(), "kata-qemu", &ProbeOptions::default()).await;
    assert!(!outcome.ok);
    let err = outcome.error.unwrap();
    assert!(err.contains("containerd-shim-kata-qemu-v2"), "{err}");
    assert!(outcome.cleaned_up);
    let mut cri = CriClient::connect(ctrd.socket()).await.unwrap();
    assert!(
        cri.all_pods().await.unwrap().is_empty(),
        "a failed sandbox was left behind"
    );
}
}

per_series! {
[V1_6, V2_1]
async fn boot_latency_samples_appear_for_a_probe_and_survive_a_restart(series) {
    let Some(mut ctrd) = common::containerd::start_series(series).await else {
        return;
    };
    let (task, mut rx) = latency::spawn(ctrd.socket().to_path_buf());
    // Wait until the subscription is up: a sample from a probe proves it (retry while it is not).
    let first = sample_from_probe(&ctrd, &mut rx).await;
    assert_eq!(first.runtime_handler, "runc");
    assert_eq!(first.namespace, K8S_NAMESPACE);
    assert!(first.seconds > 0.0 && first.seconds < 60.0, "{first:?}");

    ctrd.restart().await.unwrap();
    let second = sample_from_probe(&ctrd, &mut rx).await;
    assert_eq!(second.runtime_handler, "runc");
    assert_ne!(second.sandbox_id, first.sandbox_id);
    task.abort();
}
}

async fn sample_from_probe(
    ctrd: &PrivateContainerd,
    rx: &mut tokio::sync::mpsc::Receiver<latency::BootSample>,
) -> latency::BootSample {
    for _ in 0..20 {
        let outcome = probe(ctrd.socket(), "runc", &ProbeOptions::default()).await;
        assert!(outcome.ok, "{outcome:?}");
        if let Ok(Some(s)) = tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
            return s;
        }
    }
    panic!("no boot latency sample after 20 probes");
}
