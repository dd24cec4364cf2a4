//! The fake Kata shim under a real private containerd: a handler noded's own apply registered runs
//! a CRI pod whose container prints and exits 0, Kata's `ConfigPath` reaches the shim, and a
//! handler whose ConfigPath file is missing fails RunPodSandbox naming the path.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, CreateContainerRequest, ImageSpec,
    LinuxContainerConfig, LinuxContainerSecurityContext, NamespaceMode, NamespaceOption,
    RunPodSandboxRequest,
};
use noded::containerd::apply::{self, Request};
use noded::containerd::handler::KataHandler;
use noded::containerd::image::{self, DEFAULT_BUSYBOX, PAUSE_IMAGE, PROBE_IMAGE};
use noded::containerd::restart::Restart;
use noded::cri::{CriClient, PodSpec};
use testkit::containerd::{self as series_ctrd, Series};
use testkit::fake_kata::FakeKata;

const SHIM: &str = env!("CARGO_BIN_EXE_fake-kata-shim");
const TIMEOUT: Duration = Duration::from_secs(60);

fn prerequisites() -> bool {
    testkit::require::require_runc_pods()
}

fn container_config(pod: &PodSpec, marker: &str) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: "hello".into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: PROBE_IMAGE.into(),
            ..Default::default()
        }),
        command: vec!["/bin/sh".into(), "-c".into(), format!("echo {marker}")],
        log_path: "hello.log".into(),
        linux: Some(LinuxContainerConfig {
            security_context: Some(LinuxContainerSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: if pod.host_network {
                        NamespaceMode::Node as i32
                    } else {
                        NamespaceMode::Pod as i32
                    },
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

async fn kata_sandbox_runs(series: Series) {
    if !prerequisites() {
        return;
    }
    let Some(bins) = series_ctrd::require(series) else {
        return;
    };
    let ctrd = series_ctrd::start(series, PAUSE_IMAGE)
        .await
        .unwrap_or_else(|e| panic!("{series}: start containerd: {e:#}"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let kata_root = tmp.path().join("opt/kata");
    let kata = FakeKata::write_with_shim(&kata_root, &kata_root, "3.18.0", Path::new(SHIM));
    // containerd 1.6 ignores runtime_path: the shim must be found by its per-handler name.
    for h in [KataHandler::Qemu, KataHandler::Clh] {
        kata.link_shim_as(h.name(), &ctrd.layout().bin);
    }

    // Imported before apply restarts containerd: the restarted CRI plugin loads them at start.
    // (Right after an import, 1.7's CRI can answer ImageStatus for the pause image yet still try
    // to pull it for RunPodSandbox, until its image event is processed.)
    image::ensure_local_images(ctrd.socket(), Path::new(DEFAULT_BUSYBOX))
        .await
        .expect("import images");
    let req = Request {
        config: ctrd.config_path().to_path_buf(),
        handlers: vec![KataHandler::Qemu, KataHandler::Clh],
        kata_root: kata_root.clone(),
        state_dir: tmp.path().join("state"),
        adopt: false,
        containerd_version: None,
        containerd_binary: bins.containerd.clone(),
        custom: Vec::new(),
        socket: Some(ctrd.socket().to_path_buf()),
    };
    let report = apply::apply(&req, &Restart::Command(ctrd.restart_command()))
        .await
        .unwrap_or_else(|e| panic!("{series}: apply: {e}\n{}", ctrd.log_tail(30)));
    assert!(
        report.restarted && report.verified,
        "{series}: handlers not loaded: {report:?}"
    );

    let mut cri = CriClient::connect(ctrd.socket()).await.expect("CRI");
    cri.wait_image(PROBE_IMAGE, TIMEOUT)
        .await
        .expect("probe image");

    // A pod on kata-qemu whose container prints a marker and exits 0.
    let pod = PodSpec::unique("fake-kata", KataHandler::Qemu.name());
    let logs = tmp.path().join("logs");
    std::fs::create_dir_all(&logs).expect("mkdir logs");
    let mut sandbox_config = pod.to_cri();
    sandbox_config.log_directory = logs.display().to_string();
    let sandbox = cri
        .runtime_service()
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(sandbox_config.clone()),
            runtime_handler: pod.runtime_handler.clone(),
        })
        .await
        .unwrap_or_else(|e| panic!("{series}: RunPodSandbox: {e}\n{}", ctrd.log_tail(30)))
        .into_inner()
        .pod_sandbox_id;
    let marker = format!("hello-from-fake-kata-{}", pod.uid);
    let container = cri
        .runtime_service()
        .create_container(CreateContainerRequest {
            pod_sandbox_id: sandbox.clone(),
            config: Some(container_config(&pod, &marker)),
            sandbox_config: Some(sandbox_config),
        })
        .await
        .unwrap_or_else(|e| panic!("{series}: CreateContainer: {e}\n{}", ctrd.log_tail(30)))
        .into_inner()
        .container_id;
    cri.start_container(&container, TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{series}: StartContainer: {e}\n{}", ctrd.log_tail(30)));
    let info = cri
        .wait_exited(&container, TIMEOUT)
        .await
        .expect("container exits");
    assert_eq!(info.state, ContainerState::ContainerExited);
    assert_eq!(info.exit_code, 0, "{series}: {info:?}");

    let log = std::fs::read_to_string(logs.join("hello.log")).expect("container log");
    assert!(
        log.lines()
            .any(|l| l.contains(" stdout ") && l.ends_with(&marker)),
        "{series}: marker missing from the CRI log:\n{log}"
    );

    // Both tasks went through one shim (the sandbox's), each with the handler's ConfigPath.
    let qemu_config = kata_root.join("share/defaults/kata-containers/configuration-qemu.toml");
    let creates = kata.shim_creates();
    let ids: BTreeSet<&str> = creates.iter().filter_map(|c| c["id"].as_str()).collect();
    assert_eq!(
        ids,
        BTreeSet::from([sandbox.as_str(), container.as_str()]),
        "{series}: {creates:?}"
    );
    for c in &creates {
        assert_eq!(c["config_path"], qemu_config.display().to_string(), "{c}");
        assert!(c["error"].is_null(), "{c}");
    }
    eprintln!("{series}: creates seen by the shim: {creates:?}; log: {log}");
    assert_eq!(
        kata.shim_pids().len(),
        1,
        "{series}: one shim process per sandbox"
    );

    cri.remove_pod(&sandbox, TIMEOUT)
        .await
        .expect("stop and remove the pod");
    kata.wait_no_shim("stop/remove").await;

    // A handler whose ConfigPath names a file that is not there.
    let clh_config = kata_root.join("share/defaults/kata-containers/configuration-clh.toml");
    std::fs::remove_file(&clh_config).expect("remove clh config");
    let bad = PodSpec::unique("fake-kata-bad", KataHandler::Clh.name());
    let err = cri
        .run_pod(&bad, TIMEOUT)
        .await
        .expect_err("RunPodSandbox must fail without the Kata config");
    let message = err.to_string();
    eprintln!("{series}: RunPodSandbox on a handler without its config: {message}");
    assert!(
        message.contains(&clh_config.display().to_string()),
        "{series}: error does not name {}: {message}",
        clh_config.display()
    );
    let recorded = kata.shim_creates();
    assert!(
        recorded
            .iter()
            .any(|c| c["config_path"] == clh_config.display().to_string() && !c["error"].is_null()),
        "{series}: failed Create not recorded: {recorded:?}"
    );
    for id in cri.all_pods().await.expect("list pods") {
        let _ = cri.remove_pod(&id, TIMEOUT).await;
    }
    kata.wait_no_shim("a failed RunPodSandbox").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kata_sandbox_runs_on_containerd_1_6() {
    Box::pin(kata_sandbox_runs(Series::V1_6)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kata_sandbox_runs_on_containerd_1_7() {
    Box::pin(kata_sandbox_runs(Series::V1_7)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kata_sandbox_runs_on_containerd_2_1() {
    Box::pin(kata_sandbox_runs(Series::V2_1)).await;
}

#[test]
fn shim_binary_builds_the_shim_cargo_built_for_these_tests() {
    // What other crates' tests get from shim_binary() is this very build of the shim.
    let built = testkit::fake_kata::shim_binary().expect("build the fake shim");
    assert_eq!(
        std::fs::canonicalize(&built).expect("built shim"),
        std::fs::canonicalize(SHIM).expect("cargo's shim"),
    );
}
