//! A real private containerd + runc for integration tests, with the busybox probe/pause images imported.
//! Reusable: `start_series(series)` gives a running containerd of that series (`start()`: the installed
//! 1.6), or None = skipped locally; `start_sleeper()` runs a long-lived runc container through CRI,
//! `assert_running()` checks it is still alive.

use std::path::Path;
use std::time::Duration;

use k8s_cri::v1::ContainerState;
use noded::containerd::image::{self, PAUSE_IMAGE, PROBE_IMAGE};
use noded::cri::{CriClient, PodSpec};
use testkit::containerd::{Binaries, Series, TempContainerd};

/// Everything a private containerd needs; None (skip) when missing outside CI.
pub fn available() -> bool {
    super::require_root()
        && super::require("containerd").is_some()
        && super::require("runc").is_some()
        && super::require("containerd-shim-runc-v2").is_some()
        && super::require("unshare").is_some()
        && super::require(image::DEFAULT_BUSYBOX).is_some()
}

/// Starts a private containerd 1.6 (the installed one; default config, sandbox image = the local pause
/// image) in a fresh temp dir and imports the busybox images. Dropping it kills containerd, shims and
/// containers.
pub async fn start() -> Option<TempContainerd> {
    start_series(Series::V1_6).await
}

/// Everything a private containerd of `series` needs; None (skip) when missing outside CI.
pub fn available_series(series: Series) -> Option<Binaries> {
    if !available() {
        return None;
    }
    testkit::containerd::require(series)
}

/// Like [`start`] for any series (its own binaries and config version).
pub async fn start_series(series: Series) -> Option<TempContainerd> {
    available_series(series)?;
    let ctrd = testkit::containerd::start(series, PAUSE_IMAGE)
        .await
        .unwrap_or_else(|e| panic!("private {series} starts: {e:#}"));
    import_images(ctrd.socket()).await;
    Some(ctrd)
}

/// Imports the busybox images into k8s.io and waits until CRI sees them.
pub async fn import_images(socket: &Path) {
    image::ensure_local_images(socket, Path::new(image::DEFAULT_BUSYBOX))
        .await
        .expect("images import");
    let mut cri = CriClient::connect(socket).await.expect("CRI connects");
    for name in [PROBE_IMAGE, PAUSE_IMAGE] {
        cri.wait_image(name, Duration::from_secs(10))
            .await
            .expect("CRI sees the imported image");
    }
}

/// A CRI pod with one long-running container.
#[derive(Debug, Clone)]
pub struct RunningPod {
    pub pod: PodSpec,
    pub sandbox_id: String,
    pub container_id: String,
}

/// Runs a host-network pod with handler `handler` and a `sleep` container from the probe image.
pub async fn start_sleeper(socket: &Path, handler: &str) -> RunningPod {
    Box::pin(start_sleeper_inner(socket, handler)).await
}

async fn start_sleeper_inner(socket: &Path, handler: &str) -> RunningPod {
    let t = Duration::from_secs(60);
    let mut cri = CriClient::connect(socket).await.expect("CRI connects");
    let pod = PodSpec::unique("sleeper", handler);
    let sandbox_id = cri.run_pod(&pod, t).await.expect("RunPodSandbox");
    let container_id = cri
        .create_container(
            &sandbox_id,
            &pod,
            "sleep",
            PROBE_IMAGE,
            &["/bin/sleep", "3600"],
            t,
        )
        .await
        .expect("CreateContainer");
    cri.start_container(&container_id, t)
        .await
        .expect("StartContainer");
    assert_running(socket, &container_id).await;
    RunningPod {
        pod,
        sandbox_id,
        container_id,
    }
}

/// Asserts CRI reports the container RUNNING.
pub async fn assert_running(socket: &Path, container_id: &str) {
    let mut cri = CriClient::connect(socket).await.expect("CRI connects");
    let info = cri
        .container_info(container_id)
        .await
        .expect("ContainerStatus");
    assert_eq!(
        info.state,
        ContainerState::ContainerRunning,
        "container {container_id}: {info:?}"
    );
}

/// Stops and removes the pod (and its container).
pub async fn remove(socket: &Path, pod: &RunningPod) {
    let mut cri = CriClient::connect(socket).await.expect("CRI connects");
    cri.remove_pod(&pod.sandbox_id, Duration::from_secs(60))
        .await
        .expect("remove pod");
}

/// PIDs of processes whose command line contains `needle` (e.g. a unique container id).
/// The processes of `pod`'s sleeper container: children of the shim serving its sandbox (whose
/// command line names the sandbox id) that run `sleep 3600`. Not every `sleep 3600` on the machine:
/// parallel tests run sleepers of their own and kill them when they end.
pub fn sleeper_pids(pod: &RunningPod) -> Vec<i32> {
    let shims = pids_with_cmdline(&pod.sandbox_id);
    let ppid = |pid: i32| -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) state ppid ...`: comm may hold spaces and parentheses; split after the last ')'.
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    pids_with_cmdline("3600")
        .into_iter()
        .filter(|p| ppid(*p).is_some_and(|pp| shims.contains(&pp)))
        .collect()
}

pub fn pids_with_cmdline(needle: &str) -> Vec<i32> {
    noded::proctable::pids_where(Path::new("/proc"), |argv| {
        argv.iter().any(|a| a.contains(needle))
    })
}
