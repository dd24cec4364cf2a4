//! `apply` restarting a real private containerd 1.6 through systemd's D-Bus API, in-process: a real
//! `dbus-daemon` on a private socket, testkit's fake-systemd owning `org.freedesktop.systemd1` whose
//! `RestartUnit("containerd.service")` runs that containerd's restart script.

use std::path::{Path, PathBuf};
use std::time::Duration;

use noded::containerd::apply::{self, Request};
use noded::containerd::handler::KataHandler;
use noded::containerd::image::PAUSE_IMAGE;
use noded::containerd::private::PrivateContainerd;
use noded::containerd::restart::Restart;
use noded::containerd::systemd::SystemdTarget;
use noded::containerd::version::ContainerdVersion;
use noded::cri;
use testkit::dbus::{SystemdBus, require_dbus_daemon};

/// root, containerd + runc + unshare, dbus-daemon: None (skip) when missing, a failure under CI=true.
fn components() -> Option<PathBuf> {
    let ci = std::env::var("CI").as_deref() == Ok("true");
    if !nix::unistd::geteuid().is_root() {
        assert!(
            !ci,
            "test needs root (CI=true: failing instead of skipping)"
        );
        eprintln!("SKIP: not root");
        return None;
    }
    for bin in ["containerd", "containerd-shim-runc-v2", "runc", "unshare"] {
        let found = std::env::var_os("PATH")
            .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(bin).is_file()));
        if !found {
            assert!(
                !ci,
                "required component `{bin}` is missing (CI=true: failing instead of skipping)"
            );
            eprintln!("SKIP: `{bin}` not installed");
            return None;
        }
    }
    require_dbus_daemon()
}

fn fake_systemd() -> PathBuf {
    testkit::bins::testkit_bin("fake-systemd").expect("build testkit's fake-systemd")
}

fn request(ctrd: &PrivateContainerd, state: &Path, handlers: &[KataHandler]) -> Request {
    Request {
        config: ctrd.config_path().to_path_buf(),
        handlers: handlers.to_vec(),
        kata_root: PathBuf::from("/opt/kata"),
        state_dir: state.to_path_buf(),
        adopt: false,
        // The private containerd runs the installed binary; asking it keeps this test about restarts.
        containerd_version: Some(
            ContainerdVersion::detect(Path::new("containerd")).expect("containerd --version"),
        ),
        containerd_binary: PathBuf::from("containerd"),
        custom: Vec::new(),
        socket: Some(ctrd.socket().to_path_buf()),
    }
}

/// The bus and the host root are explicit: the test never touches the process environment, and an
/// empty host root means only the bus can tell that systemd runs.
fn target(bus: &SystemdBus, host_root: &Path) -> SystemdTarget {
    SystemdTarget {
        bus: Some(bus.address().to_owned()),
        host_root: host_root.to_path_buf(),
        timeout: Duration::from_secs(60),
        ..SystemdTarget::default()
    }
}

async fn loaded_handlers(socket: &Path) -> Vec<String> {
    // After a restart the socket answers before the CRI plugin is initialized.
    let mut client = cri::wait_ready(socket, Duration::from_secs(30))
        .await
        .expect("CRI ready");
    let status = noded::containerd::cri_plugin::status(&mut client)
        .await
        .expect("CRI status");
    status.handlers.keys().cloned().collect()
}

fn replace_calls(n: usize) -> Vec<(String, String)> {
    vec![("containerd.service".to_owned(), "replace".to_owned()); n]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_restarts_containerd_through_systemd_over_dbus() {
    let Some(dbus_daemon) = components() else {
        return;
    };
    let ctrd = testkit::containerd::start_temp(PAUSE_IMAGE)
        .await
        .expect("private containerd starts");
    let bus = SystemdBus::start(
        &dbus_daemon,
        &fake_systemd(),
        "containerd.service",
        &ctrd.restart_command(),
    )
    .expect("dbus-daemon + fake-systemd start");
    let dir = tempfile::tempdir().expect("tempdir");
    let host_root = dir.path().join("host");
    std::fs::create_dir(&host_root).expect("empty host root");
    let state = dir.path().join("state");
    let pid_before = ctrd.containerd_pid().expect("containerd pid");
    assert!(
        !loaded_handlers(ctrd.socket())
            .await
            .contains(&"kata-qemu".to_owned())
    );

    let req = request(&ctrd, &state, &[KataHandler::Qemu, KataHandler::QemuWarm]);
    let report = apply::apply(&req, &Restart::Systemd(target(&bus, &host_root)))
        .await
        .unwrap_or_else(|e| panic!("apply: {e}\n{}", ctrd.log_tail(20)));
    assert!(report.changed, "{report:?}");
    assert!(report.restarted, "{report:?}");
    assert!(report.verified, "{report:?}");
    assert_eq!(
        bus.systemd.restart_calls(),
        replace_calls(1),
        "{:?}",
        bus.systemd.log_lines()
    );
    let pid_after = ctrd.containerd_pid().expect("containerd pid");
    assert_ne!(pid_before, pid_after, "containerd was restarted");
    let loaded = loaded_handlers(ctrd.socket()).await;
    for h in ["kata-qemu", "kata-qemu-warm", "runc"] {
        assert!(loaded.contains(&h.to_owned()), "{h} loaded: {loaded:?}");
    }

    // Unchanged: nothing written, no call to systemd, same containerd.
    let report = apply::apply(&req, &Restart::Systemd(target(&bus, &host_root)))
        .await
        .expect("second apply");
    assert!(!report.changed && !report.restarted, "{report:?}");
    assert_eq!(bus.systemd.restart_calls(), replace_calls(1));
    assert_eq!(ctrd.containerd_pid(), Some(pid_after));

    // auto: no init marker under the host root, but org.freedesktop.systemd1 is owned on the bus.
    let auto = Restart::Auto(target(&bus, &host_root));
    assert_eq!(
        auto.resolve().await,
        Some(Restart::Systemd(target(&bus, &host_root)))
    );
    let req = request(&ctrd, &state, &[KataHandler::Qemu, KataHandler::Clh]);
    let report = apply::apply(&req, &auto).await.expect("apply with auto");
    assert!(report.restarted && report.verified, "{report:?}");
    assert_eq!(bus.systemd.restart_calls(), replace_calls(2));
    assert_ne!(ctrd.containerd_pid(), Some(pid_after), "restarted again");
    let loaded = loaded_handlers(ctrd.socket()).await;
    assert!(loaded.contains(&"kata-clh".to_owned()), "{loaded:?}");
    assert!(!loaded.contains(&"kata-qemu-warm".to_owned()), "{loaded:?}");
}

/// systemd reports the restart job `failed`: apply fails naming that result and puts the config back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_systemd_job_fails_apply_and_rolls_back() {
    let Some(dbus_daemon) = components() else {
        return;
    };
    let ctrd = testkit::containerd::start_temp(PAUSE_IMAGE)
        .await
        .expect("private containerd starts");
    let bus = SystemdBus::start(
        &dbus_daemon,
        &fake_systemd(),
        "containerd.service",
        "echo 'containerd.service: start-limit-hit' >&2; exit 1",
    )
    .expect("dbus-daemon + fake-systemd start");
    let dir = tempfile::tempdir().expect("tempdir");
    let original = std::fs::read(ctrd.config_path()).expect("read config");
    let pid_before = ctrd.containerd_pid().expect("containerd pid");

    let req = request(&ctrd, &dir.path().join("state"), &[KataHandler::Qemu]);
    let err = apply::apply(&req, &Restart::Systemd(target(&bus, dir.path())))
        .await
        .expect_err("a failed restart job must fail apply");
    let msg = err.to_string();
    assert!(msg.contains("result `failed`"), "{msg}");
    assert!(msg.contains("previous config was restored"), "{msg}");
    assert_eq!(msg.lines().count(), 1, "{msg}");
    assert_eq!(
        std::fs::read(ctrd.config_path()).expect("read config"),
        original,
        "config rolled back"
    );
    // The rollback asked systemd again (and that failed too); containerd itself was never touched.
    assert_eq!(bus.systemd.restart_calls(), replace_calls(2));
    assert_eq!(ctrd.containerd_pid(), Some(pid_before));
}
