//! `noded run` with a template: kill -9 leaves VMs and a tmpfs behind, the next start reaps them;
//! SIGTERM stops cleanly (no QEMU, no mount, no socket left).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::vm::{VmHarness, available, shared_data_dir};
use noded::api::{self, pb};
use noded::vm::template::mounts_under;

/// Kills the daemon if a test fails before it is stopped.
struct Daemon(Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start(config: &Path) -> Daemon {
    let child = Command::new(env!("CARGO_BIN_EXE_noded"))
        .args(["run", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start noded run");
    Daemon(Some(child))
}

/// Waits until the daemon reports its template ready with a full pool.
async fn wait_pool_full(socket: &Path, daemon: &mut Daemon) -> pb::TemplateStatus {
    for _ in 0..600 {
        if let Some(status) = daemon.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("noded run exited early: {status}");
        }
        if let Ok(mut c) = api::connect(socket).await
            && let Ok(s) = c.status(pb::StatusRequest {}).await
            && let Some(t) = s.into_inner().templates.first().cloned()
            && t.ready
            && t.pool_ready == t.pool_target
        {
            return t;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    panic!("template pool never became full");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_leftovers_are_reaped_and_sigterm_stops_cleanly() {
    if !available() {
        return;
    }
    let h = VmHarness::new();
    let socket = h.path().join("noded.sock");
    let config = h.path().join("noded.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[daemon]
data_dir = "{data}"
run_dir = "{run}"
api_socket = "{socket}"
metrics_listen = "127.0.0.1:0"
log_format = "text"

[containerd]
config = "{tmp}/containerd/config.toml"
runtimes = []
apply_on_start = false

[probe]
handlers = []

[guest]
download = true

[[templates]]
name = "d"
memory_mib = 128
pool_target = 2

[kubernetes]
enabled = false
"#,
            data = shared_data_dir().display(),
            run = h.run_dir.display(),
            socket = socket.display(),
            tmp = h.path().display(),
        ),
    )
    .expect("write config");

    let mut first = start(&config);
    wait_pool_full(&socket, &mut first).await;
    let orphans = h.live_vms();
    assert_eq!(orphans.len(), 2, "two pooled clones: {orphans:?}");
    assert_eq!(mounts_under(&h.run_dir).len(), 1, "the template tmpfs");

    // kill -9: nothing gets a chance to clean up.
    let mut child = first.0.take().expect("child");
    child.kill().expect("SIGKILL");
    child.wait().expect("reap daemon");
    assert_eq!(h.live_vms().len(), 2, "the orphans outlive their daemon");

    let mut second = start(&config);
    wait_pool_full(&socket, &mut second).await;
    let now = h.live_vms();
    for (pid, name) in &orphans {
        assert!(
            !now.iter().any(|(p, _)| p == pid),
            "orphan {name} (pid {pid}) was not reaped: {now:?}"
        );
    }
    assert_eq!(now.len(), 2, "only the new pool's clones: {now:?}");

    // SIGTERM: clean stop.
    let mut child = second.0.take().expect("child");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
    let status = child.wait().expect("wait");
    assert!(status.success(), "noded run exits 0 on SIGTERM: {status}");
    assert!(h.live_vms().is_empty(), "no QEMU after SIGTERM");
    assert!(
        mounts_under(&h.run_dir).is_empty(),
        "no template mount after SIGTERM"
    );
    assert!(!socket.exists(), "API socket removed");
    h.assert_no_leaks();
}
