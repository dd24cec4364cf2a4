//! SIGTERM while a probe sandbox is being created, on a node's containerd (not noded's own): the
//! probe finishes and removes its sandbox before noded exits, and nothing labelled as a probe is left.
//!
//! Why it matters: a cancelled `RunPodSandbox` is not undone by containerd. It goes on creating the
//! sandbox after the client is gone, and 2.1 then kept it as `SANDBOX_UNKNOWN` with its shim running,
//! after the shutdown sweep had already listed the pods (node_in_a_box caught that once: the cancel
//! hit containerd's narrow "get task pid" step). That window cannot be hit on purpose; what this test
//! pins is the fix: the probe is not cancelled but finishes and cleans up after itself. The probe
//! handler is runc behind a wrapper that makes `runc create` take 2 s, so the signal lands while the
//! sandbox is in flight every time.

mod common;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use noded::containerd::image::PAUSE_IMAGE;
use noded::cri::CriClient;
use noded::cri::probe::PROBE_LABEL;
use testkit::process::Proc;
use testkit::scrape::{free_port, wait_until};

const HANDLER: &str = "runc-slow";

/// runc, with every `create` held for 2 s and marked in `marks` when it starts and ends.
fn slow_runc(dir: &Path, marks: &Path) -> std::path::PathBuf {
    let runc = common::require("runc").expect("runc");
    let path = dir.join("runc-slow");
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n\
             for a in \"$@\"; do\n\
             \x20 if [ \"$a\" = create ]; then\n\
             \x20   echo start >> {m}\n\
             \x20   sleep 2\n\
             \x20   echo end >> {m}\n\
             \x20   break\n\
             \x20 fi\n\
             done\n\
             exec {runc} \"$@\"\n",
            m = marks.display(),
            runc = runc.display()
        ),
    )
    .expect("wrapper");
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    path
}

fn marks(path: &Path) -> (usize, usize) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    (
        text.lines().filter(|l| *l == "start").count(),
        text.lines().filter(|l| *l == "end").count(),
    )
}

async fn probe_pods(socket: &Path) -> Vec<String> {
    let mut cri = CriClient::connect(socket).await.expect("CRI");
    cri.list_pods()
        .await
        .expect("list pods")
        .into_iter()
        .filter(|p| p.labels.contains_key(PROBE_LABEL))
        .map(|p| format!("{} ({:?})", p.id, p.state()))
        .collect()
}

testkit::per_series!(
    async fn sigterm_mid_probe_leaves_no_probe_sandbox(series) {
        if common::containerd::available_series(series).is_none() {
            return;
        }
        let dir = tempfile::tempdir().expect("tempdir");
        let marks_path = dir.path().join("creates");
        let wrapper = slow_runc(dir.path(), &marks_path);
        let ctrd =
            testkit::containerd::start_with_runc_handler(series, PAUSE_IMAGE, HANDLER, &wrapper)
                .await
                .unwrap_or_else(|e| panic!("{series} starts: {e:#}"));
        common::containerd::import_images(ctrd.socket()).await;

        let data = dir.path().join("data");
        let config = dir.path().join("noded.toml");
        let port = free_port();
        std::fs::write(
            &config,
            format!(
                "[daemon]\ndata_dir = \"{d}\"\nrun_dir = \"{d}/run\"\napi_socket = \"{d}/run/noded.sock\"\n\
                 metrics_listen = \"127.0.0.1:{port}\"\nlog_format = \"text\"\n\n\
                 [containerd]\nconfig = {cfg:?}\nruntimes = []\nsocket = {sock:?}\n\
                 private = false\napply_on_start = false\n\n\
                 [probe]\nhandlers = [\"{HANDLER}\"]\n\n[kubernetes]\nenabled = false\n",
                d = data.display(),
                cfg = ctrd.config_path().display().to_string(),
                sock = ctrd.socket().display().to_string(),
            ),
        )
        .expect("config");
        let log_path = dir.path().join("noded.log");
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        // Killed with its group if the test fails before it exits (containerd has its own guard).
        let mut daemon = Proc(
            Command::new(env!("CARGO_BIN_EXE_noded"))
                .args(["run", "--config"])
                .arg(&config)
                .env("RUST_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&log_path).expect("log file"))
                .process_group(0)
                .spawn()
                .expect("spawn noded"),
        );

        // The first probe's `runc create` has begun: its sandbox is in flight.
        let deadline = Instant::now() + Duration::from_secs(60);
        while marks(&marks_path).0 == 0 {
            assert!(
                Instant::now() < deadline,
                "{series}: no probe reached runc create within 60 s; noded log:\n{}",
                log()
            );
            assert!(
                daemon.0.try_wait().expect("wait").is_none(),
                "{series}: noded exited early:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        kill(Pid::from_raw(daemon.pid()), Signal::SIGTERM).expect("SIGTERM");
        let mut status = None;
        wait_until(Duration::from_secs(30), "noded exits after SIGTERM", || {
            status = daemon.0.try_wait().expect("wait");
            status.is_some()
        })
        .await
        .unwrap_or_else(|e| panic!("{series}: {e}:\n{}", log()));
        let text = log();
        let status = status.expect("exited");
        assert!(status.success(), "{series}: exit {status}:\n{text}");
        let (_, after) = text
            .split_once("SIGTERM: shutting down")
            .unwrap_or_else(|| panic!("{series}: no shutdown line:\n{text}"));
        assert!(
            after.contains("probe passed"),
            "{series}: the probe in flight must finish before noded exits:\n{text}"
        );

        // Whatever containerd still had in hand for the probe is done before looking.
        wait_until(Duration::from_secs(20), "runc create ended", || {
            let (started, ended) = marks(&marks_path);
            started == ended
        })
        .await
        .unwrap_or_else(|e| panic!("{series}: {e}"));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let left = probe_pods(ctrd.socket()).await;
        assert!(
            left.is_empty(),
            "{series}: probe sandboxes left after shutdown: {left:?}\n{text}"
        );
    }
);
