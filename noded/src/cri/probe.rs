//! The probe sandbox: proves a runtime handler really runs pods, end to end through CRI.
//!
//! Per handler: `RunPodSandbox` (unique name/uid) with the node's own sandbox image — for Kata that boots
//! the VM and waits for its agent, which is the part that fails on a broken node — then optionally a
//! tiny container from an image the node already holds, wait for exit code 0, then stop and remove
//! everything, also when a step failed or timed out. By default the probe is sandbox-only: a node holds
//! the pause image (kubelet needs it) but no image noded would have to import by hand. The runtime's own
//! error is reported verbatim (containerd's is what tells an operator "no runtime for "kata-qemu" is
//! configured").

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tracing::{Instrument, info, warn};

use super::{CriClient, CriError, PodSpec};

/// Label every probe sandbox carries (value: the probe's unique id), used to find leftovers.
pub const PROBE_LABEL: &str = "noded.io/probe";
/// The image of the probe container when a probe runs one (the local image noded builds; see
/// `containerd::image`).
pub const PROBE_IMAGE: &str = "noded.local/probe:1";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeOptions {
    /// Bound on the whole probe (sandbox + container + exit), not counting cleanup.
    pub timeout: Duration,
    /// Bound on cleanup (stop + remove), which runs even after a timeout.
    pub cleanup_timeout: Duration,
    /// The probe container's image; None = sandbox only (the node's pause image, nothing else).
    pub image: Option<String>,
    pub command: Vec<String>,
    /// Host network needs no CNI (works with runc); Kata handlers generally need a pod network.
    pub host_network: bool,
}

impl ProbeOptions {
    /// What a node runs: a sandbox on the handler, no container image needed.
    pub fn sandbox_only() -> Self {
        Self {
            image: None,
            ..Self::default()
        }
    }
}

impl Default for ProbeOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(60),
            cleanup_timeout: Duration::from_secs(30),
            image: Some(PROBE_IMAGE.into()),
            command: vec!["/bin/sh".into(), "-c".into(), "echo ok".into()],
            host_network: true,
        }
    }
}

/// The step a probe failed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeStage {
    Connect,
    RunPodSandbox,
    CreateContainer,
    StartContainer,
    WaitExit,
    ExitCode,
    Timeout,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ProbeOutcome {
    pub handler: String,
    pub ok: bool,
    /// From the first CRI call to the container's exit (cleanup not included).
    pub duration: Duration,
    /// containerd's error, verbatim, on one line.
    pub error: Option<String>,
    pub failed_at: Option<ProbeStage>,
    /// true when stop/remove found nothing left behind (or removed it).
    pub cleaned_up: bool,
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Runs one probe sandbox with `handler` on the containerd at `socket`.
pub async fn probe(socket: &Path, handler: &str, opts: &ProbeOptions) -> ProbeOutcome {
    probe_inspecting(socket, handler, opts, |_| ()).await.0
}

/// Like [`probe`], and calls `inspect` with the sandbox id while the probe sandbox runs (before it is
/// removed): how its VM booted can only be seen while it exists. `None` when the probe failed first.
pub async fn probe_inspecting<T: Send>(
    socket: &Path,
    handler: &str,
    opts: &ProbeOptions,
    inspect: impl FnOnce(&str) -> T + Send,
) -> (ProbeOutcome, Option<T>) {
    let span = tracing::info_span!("probe", runtime_handler = handler);
    Box::pin(probe_inner(socket, handler, opts, inspect))
        .instrument(span)
        .await
}

async fn probe_inner<T: Send>(
    socket: &Path,
    handler: &str,
    opts: &ProbeOptions,
    inspect: impl FnOnce(&str) -> T + Send,
) -> (ProbeOutcome, Option<T>) {
    let mut pod = PodSpec::unique("noded-probe", handler);
    pod.host_network = opts.host_network;
    let probe_id = pod.uid.clone();
    pod.labels.insert(PROBE_LABEL.into(), probe_id.clone());

    let start = Instant::now();
    let mut cri = match CriClient::connect(socket).await {
        Ok(c) => c,
        Err(e) => {
            let outcome = ProbeOutcome {
                handler: handler.into(),
                ok: false,
                duration: start.elapsed(),
                error: Some(one_line(&e.to_string())),
                failed_at: Some(ProbeStage::Connect),
                cleaned_up: true,
            };
            return (outcome, None);
        }
    };
    let mut run_client = cri.clone();
    let run = Box::pin(run_probe(&mut run_client, &pod, opts));
    let result = match tokio::time::timeout(opts.timeout, run).await {
        Ok(r) => r,
        Err(_) => Err((
            ProbeStage::Timeout,
            format!("probe did not finish within {:?}", opts.timeout),
        )),
    };
    let duration = start.elapsed();
    let inspected = result.as_ref().ok().map(|sandbox| inspect(sandbox));
    let cleaned_up = Box::pin(cleanup(&mut cri, &probe_id, opts.cleanup_timeout)).await;
    let outcome = match result {
        Ok(_) => ProbeOutcome {
            handler: handler.into(),
            ok: true,
            duration,
            error: None,
            failed_at: None,
            cleaned_up,
        },
        Err((stage, error)) => ProbeOutcome {
            handler: handler.into(),
            ok: false,
            duration,
            error: Some(one_line(&error)),
            failed_at: Some(stage),
            cleaned_up,
        },
    };
    if outcome.ok {
        info!(seconds = duration.as_secs_f64(), "probe passed");
    } else {
        warn!(error = ?outcome.error, stage = ?outcome.failed_at, "probe failed");
    }
    (outcome, inspected)
}

async fn run_probe(
    cri: &mut CriClient,
    pod: &PodSpec,
    opts: &ProbeOptions,
) -> Result<String, (ProbeStage, String)> {
    let t = opts.timeout;
    let msg = |e: CriError| e.runtime_message();
    let sandbox = cri
        .run_pod(pod, t)
        .await
        .map_err(|e| (ProbeStage::RunPodSandbox, msg(e)))?;
    let Some(image) = &opts.image else {
        return Ok(sandbox);
    };
    let command: Vec<&str> = opts.command.iter().map(String::as_str).collect();
    let container = cri
        .create_container(&sandbox, pod, "probe", image, &command, t)
        .await
        .map_err(|e| (ProbeStage::CreateContainer, msg(e)))?;
    cri.start_container(&container, t)
        .await
        .map_err(|e| (ProbeStage::StartContainer, msg(e)))?;
    let exited = cri
        .wait_exited(&container, t)
        .await
        .map_err(|e| (ProbeStage::WaitExit, msg(e)))?;
    if exited.exit_code != 0 {
        return Err((
            ProbeStage::ExitCode,
            format!(
                "probe container exited with code {} ({} {})",
                exited.exit_code, exited.reason, exited.message
            ),
        ));
    }
    Ok(sandbox)
}

/// Stops and removes every sandbox of this probe (a failed RunPodSandbox can leave a NOTREADY one).
async fn cleanup(cri: &mut CriClient, probe_id: &str, timeout: Duration) -> bool {
    let labels = BTreeMap::from([(PROBE_LABEL.to_string(), probe_id.to_string())]);
    let work = async {
        let ids = cri.pods_with_labels(&labels).await?;
        for id in &ids {
            cri.remove_pod(id, timeout).await?;
        }
        Ok::<_, CriError>(())
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            warn!(error = %e, "probe cleanup failed");
            false
        }
        Err(_) => {
            warn!("probe cleanup timed out after {timeout:?}");
            false
        }
    }
}

/// Removes probe sandboxes left behind by an earlier noded (e.g. killed mid-probe).
pub async fn remove_leftover_probes(socket: &Path, timeout: Duration) -> Result<usize, CriError> {
    let mut cri = CriClient::connect(socket).await?;
    let mut n = 0;
    for p in cri.list_pods().await? {
        if p.labels.contains_key(PROBE_LABEL) {
            cri.remove_pod(&p.id, timeout).await?;
            n += 1;
        }
    }
    Ok(n)
}
