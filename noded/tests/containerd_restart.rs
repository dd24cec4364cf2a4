//! `noded containerd apply|revert` against a running private containerd of every series (1.6, 1.7,
//! 2.1): the version comes from the daemon's Version API (the `containerd` on PATH is 1.6 whatever
//! runs), restart only on change, CRI verification, running containers surviving the restart, and
//! rollback when verification fails.

mod common;

use std::path::Path;
use std::process::Command;

use common::config_shapes::noded_bin;
use testkit::per_series;

fn noded(args: &[&str]) -> (i32, serde_json::Value, String) {
    let out = Command::new(noded_bin())
        .args(args)
        .output()
        .expect("run noded");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(stdout.trim()).unwrap_or(serde_json::Value::Null);
    (
        out.status.code().unwrap_or(-1),
        json,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn handlers(socket: &Path) -> Vec<String> {
    // After a restart the socket answers before the CRI plugin is initialized.
    let mut cri = noded::cri::wait_ready(socket, std::time::Duration::from_secs(30))
        .await
        .expect("CRI ready");
    let status = noded::containerd::cri_plugin::status(&mut cri)
        .await
        .expect("CRI status");
    status.handlers.keys().cloned().collect()
}

per_series! {
async fn apply_restarts_verifies_and_running_containers_survive(series) {
    let Some(ctrd) = common::containerd::start_series(series).await else {
        return;
    };
    let socket = ctrd.socket().to_path_buf();
    let config = ctrd.config_path().to_path_buf();
    let original = std::fs::read(&config).expect("read config");
    let state = tempfile::tempdir().expect("state dir");
    let pod = common::containerd::start_sleeper(&socket, "runc").await;
    let sleeper_pids = common::containerd::sleeper_pids(&pod);
    assert!(!sleeper_pids.is_empty(), "no process of the sleeper found");
    assert!(!handlers(&socket).await.contains(&"kata-qemu".to_owned()));
    let pid_before = ctrd.containerd_pid().expect("containerd pid");

    let restart = format!("command:{}", ctrd.restart_command());
    let args = |sub: &'static str| -> Vec<String> {
        let mut a: Vec<String> = vec![
            "containerd".into(),
            sub.into(),
            "--config".into(),
            config.display().to_string(),
            "--state-dir".into(),
            state.path().display().to_string(),
            "--restart".into(),
            restart.clone(),
            "--output".into(),
            "json".into(),
        ];
        if sub == "apply" {
            a.extend(["--runtime", "kata-qemu", "--runtime", "kata-qemu-warm"].map(String::from));
        }
        a
    };
    let run = |sub: &'static str| {
        let a = args(sub);
        noded(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };

    let (code, report, stderr) = run("apply");
    assert_eq!(code, 0, "{stderr}\n{}", ctrd.log_tail(20));
    assert_eq!(report["changed"], true, "{report}");
    assert_eq!(report["restarted"], true, "{report}");
    assert_eq!(report["verified"], true, "{report}");
    // Asked from the running daemon, not from the `containerd` on PATH.
    let version = report["containerd_version"].as_str().unwrap_or_default();
    assert!(
        version.starts_with(&format!("{}.", series.name())),
        "{series}: {report}"
    );
    let strategy = if series.version().major >= 2 { "drop-in" } else { "in-place" };
    assert_eq!(report["strategy"], strategy, "{report}");
    let loaded = handlers(&socket).await;
    assert!(
        loaded.contains(&"kata-qemu".to_owned()) && loaded.contains(&"kata-qemu-warm".to_owned()),
        "{loaded:?}"
    );
    assert!(loaded.contains(&"runc".to_owned()), "runc kept: {loaded:?}");
    let pid_after = ctrd.containerd_pid().expect("containerd pid");
    assert_ne!(pid_before, pid_after, "containerd was restarted");
    // The runc container started before the restart is still running, same processes.
    common::containerd::assert_running(&socket, &pod.container_id).await;
    for pid in &sleeper_pids {
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} survived"
        );
    }

    // Idempotent: nothing written, nothing restarted.
    let (code, report, stderr) = run("apply");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(report["changed"], false, "{report}");
    assert_eq!(report["restarted"], false, "{report}");
    assert_eq!(
        ctrd.containerd_pid(),
        Some(pid_after),
        "no restart on the unchanged path"
    );

    // Revert: exact bytes back, containerd restarted without the handlers, container still running.
    let (code, report, stderr) = run("revert");
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(report["restarted"], true, "{report}");
    assert_eq!(std::fs::read(&config).expect("read"), original);
    let loaded = handlers(&socket).await;
    assert!(!loaded.contains(&"kata-qemu".to_owned()), "{loaded:?}");
    common::containerd::assert_running(&socket, &pod.container_id).await;
    common::containerd::remove(&socket, &pod).await;
}
}

per_series! {
[V1_6, V2_1]
/// containerd restarts but does not load what noded wrote (here: it reads another file, as when a
/// unit's --config points elsewhere): noded restores the file, restarts again and exits 1. The
/// expensive rollback runs on one series per major version.
async fn failed_verification_rolls_back(series) {
    let Some(ctrd) = common::containerd::start_series(series).await else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let edited = dir.path().join("config.toml");
    let original = std::fs::read(ctrd.config_path()).expect("read");
    std::fs::write(&edited, &original).expect("copy config");
    let restart = format!("command:{}", ctrd.restart_command());
    let state = dir.path().join("state");
    let (code, _, stderr) = noded(&[
        "containerd",
        "apply",
        "--config",
        edited.to_str().expect("utf8"),
        "--state-dir",
        state.to_str().expect("utf8"),
        "--restart",
        &restart,
        "--runtime",
        "kata-qemu",
        "--output",
        "json",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("does not list runtime handler `kata-qemu`"),
        "{stderr}"
    );
    assert!(stderr.contains("previous config was restored"), "{stderr}");
    assert_eq!(
        std::fs::read(&edited).expect("read"),
        original,
        "rolled back"
    );
    assert!(
        !handlers(ctrd.socket())
            .await
            .contains(&"kata-qemu".to_owned())
    );
    assert!(
        !dir.path().join("config.d/noded-kata.toml").exists(),
        "{series}: the drop-in is rolled back too"
    );
}
}

/// The restart itself fails: rollback, exit 1, the reason on one line.
#[test]
fn failed_restart_rolls_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("config.toml");
    let original = b"version = 2\n# keep me\n".to_vec();
    std::fs::write(&config, &original).expect("write");
    let (code, _, stderr) = noded(&[
        "containerd",
        "apply",
        "--config",
        config.to_str().expect("utf8"),
        "--state-dir",
        dir.path().join("state").to_str().expect("utf8"),
        "--containerd-version",
        "1.6.20",
        "--restart",
        "command:echo unit containerd.service not found >&2; exit 5",
    ]);
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("unit containerd.service not found"),
        "{stderr}"
    );
    assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
    assert_eq!(std::fs::read(&config).expect("read"), original);
}
