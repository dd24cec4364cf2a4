//! noded's systemd restart (zbus, in-process) against fake-systemd on a real private dbus-daemon: the
//! job's result decides success, unknown units are D-Bus errors, `auto` finds systemd by its bus name.

use std::path::{Path, PathBuf};
use std::time::Duration;

use noded::containerd::restart::Restart;
use noded::containerd::systemd::{SystemdError, SystemdTarget};
use testkit::dbus::{DbusDaemon, SystemdBus, require_dbus_daemon};

const FAKE: &str = env!("CARGO_BIN_EXE_fake-systemd");

fn target(bus: &str, host_root: &Path) -> SystemdTarget {
    SystemdTarget {
        bus: Some(bus.to_owned()),
        // An empty host root: only the bus can say that systemd runs.
        host_root: host_root.to_path_buf(),
        timeout: Duration::from_secs(20),
        ..SystemdTarget::default()
    }
}

fn start(restart_command: &str) -> Option<(SystemdBus, tempfile::TempDir)> {
    let dbus = require_dbus_daemon()?;
    let bus = SystemdBus::start(
        &dbus,
        Path::new(FAKE),
        "containerd.service",
        restart_command,
    )
    .expect("dbus-daemon + fake-systemd start");
    Some((bus, tempfile::tempdir().expect("tempdir")))
}

#[tokio::test]
async fn restart_waits_for_the_job_and_runs_the_command_once() {
    let marker_dir = tempfile::tempdir().expect("tempdir");
    let marker = marker_dir.path().join("restarted");
    // Slow enough that returning before the job ends would miss the marker.
    let cmd = format!("sleep 0.5; echo x >> {}", marker.display());
    let Some((bus, root)) = start(&cmd) else {
        return;
    };
    target(bus.address(), root.path())
        .restart()
        .await
        .expect("restart through fake systemd");
    assert_eq!(
        std::fs::read_to_string(&marker).expect("the restart command ran before restart returned"),
        "x\n"
    );
    assert_eq!(
        bus.systemd.restart_calls(),
        vec![("containerd.service".to_owned(), "replace".to_owned())],
        "{:?}",
        bus.systemd.log_lines()
    );
}

#[tokio::test]
async fn a_failed_job_is_an_error_naming_its_result() {
    let Some((bus, root)) = start("echo broken >&2; exit 3") else {
        return;
    };
    let err = Restart::Systemd(target(bus.address(), root.path()))
        .run()
        .await
        .expect_err("a failed job must fail the restart");
    let msg = err.to_string();
    assert!(msg.contains("result `failed`"), "{msg}");
    assert!(msg.contains("containerd.service"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
}

#[tokio::test]
async fn an_unknown_unit_is_systemds_no_such_unit_error() {
    let Some((bus, root)) = start("true") else {
        return;
    };
    let t = SystemdTarget {
        unit: "k3s.service".into(),
        ..target(bus.address(), root.path())
    };
    let err = t
        .restart()
        .await
        .expect_err("fake systemd knows only containerd");
    assert!(matches!(err, SystemdError::Call { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("org.freedesktop.systemd1.NoSuchUnit"), "{msg}");
    assert!(msg.contains("k3s.service"), "{msg}");
    assert_eq!(
        bus.systemd.restart_calls(),
        vec![("k3s.service".to_owned(), "replace".to_owned())]
    );
}

#[tokio::test]
async fn auto_resolves_to_systemd_when_its_name_is_owned_on_the_bus() {
    let Some((bus, root)) = start("true") else {
        return;
    };
    let t = target(bus.address(), root.path());
    assert!(!root.path().join("run/systemd/system").exists());
    assert_eq!(
        Restart::Auto(t.clone()).resolve().await,
        Some(Restart::Systemd(t.clone()))
    );
    assert!(Restart::Auto(t).run().await.expect("auto restart"));
    assert_eq!(bus.systemd.restart_calls().len(), 1);
}

#[tokio::test]
async fn auto_on_a_bus_without_systemd_restarts_nothing() {
    let Some(dbus) = require_dbus_daemon() else {
        return;
    };
    let bus = DbusDaemon::start(&dbus).expect("dbus-daemon starts");
    let root = tempfile::tempdir().expect("tempdir");
    let auto = Restart::Auto(target(bus.address(), root.path()));
    assert_eq!(auto.resolve().await, None);
    assert!(!auto.run().await.expect("no systemd is not an error"));
}

/// The harness cleans up: both processes are gone once the guard drops.
#[test]
fn dropping_the_guard_kills_both_processes() {
    let Some(dbus) = require_dbus_daemon() else {
        return;
    };
    let bus =
        SystemdBus::start(&dbus, Path::new(FAKE), "containerd.service", "true").expect("start");
    let pids = [bus.bus.pid(), bus.systemd.pid()];
    let dir: PathBuf = bus.bus.dir().to_path_buf();
    drop(bus);
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "pid {pid} still runs"
        );
    }
    assert!(!dir.exists(), "{} removed", dir.display());
}
