//! Issue 11: nothing downloads on a node.
//! - A node config (`containerd.private = false`) pins the guest kernel + initrd by sha256 (`[guest]`, as
//!   `installer bake --guest-assets` writes it): `noded run` starts its real QEMU pool from exactly those
//!   files, and a PATH whose `apt-get`/`apt-cache`/`dpkg` record every call and fail stays unused. A
//!   tampered initrd leaves the template not ready with a one-line reason naming the file; noded keeps
//!   running and still downloads nothing.
//! - A node config with nothing pinned never downloads either (template not ready, reason given).
//! - Local mode (private containerd) still downloads, but a hanging `apt-cache` does not hold noded: a
//!   SIGTERM stops it within 5 s with exit 0 and kills the command's whole process group; and a
//!   command past `guest.command_timeout_seconds` is killed with a one-line error naming it.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use noded::api::{self, pb};

fn noded_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_noded"))
}

/// A directory with `apt-get`, `apt-cache` and `dpkg` that append their pid and command line to
/// `calls.log` (`$LOG` in the script) and then run `behaviour` (`exit 1`, or [`HANG`]).
struct FakeApt {
    bin: PathBuf,
    log: PathBuf,
}

impl FakeApt {
    fn new(dir: &Path, behaviour: &str) -> Self {
        let bin = dir.join("fake-bin");
        std::fs::create_dir_all(&bin).expect("fake bin dir");
        let log = dir.join("calls.log");
        for name in ["apt-get", "apt-cache", "dpkg"] {
            let path = bin.join(name);
            std::fs::write(
                &path,
                format!(
                    "#!/bin/sh\nLOG='{}'\necho \"$$ {name} $*\" >> \"$LOG\"\n{behaviour}\n",
                    log.display()
                ),
            )
            .expect("write fake");
            let mut perm = std::fs::metadata(&path).expect("stat").permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
            std::fs::set_permissions(&path, perm).expect("chmod");
        }
        Self { bin, log }
    }

    /// PATH with the fakes first.
    fn path(&self) -> String {
        format!(
            "{}:{}",
            self.bin.display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    fn calls(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Pids the fakes logged, plus the `sleep` grandchildren they recorded.
    fn pids(&self) -> Vec<i32> {
        self.calls()
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("pid=").or(Some(w)))
            .filter_map(|w| w.parse().ok())
            .collect()
    }
}

/// Hangs with a grandchild, like apt-get waiting for its download methods.
const HANG: &str = "sleep 1000 &\necho \"pid=$!\" >> \"$LOG\"\nwait";

/// Alive = exists and is not a zombie (an orphan killed here may wait for an init that reaps late).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .is_none_or(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// `noded run` with its log in a file; Drop kills it if a test fails first.
struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    fn start(config: &Path, dir: &Path, path_env: &str) -> Self {
        let log = dir.join(format!(
            "noded-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        let out = std::fs::File::create(&log).expect("log file");
        let child = Command::new(noded_bin())
            .args(["run", "--config"])
            .arg(config)
            .current_dir(dir)
            .env("PATH", path_env)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .expect("start noded run");
        Self {
            child: Some(child),
            log,
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn assert_running(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!("noded run exited: {status}\n{}", self.log_text());
        }
    }

    /// SIGTERM; returns how long noded took to exit, asserting exit 0.
    fn sigterm(&mut self) -> Duration {
        let mut child = self.child.take().expect("running");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        let sent = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            if sent.elapsed() > Duration::from_secs(30) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("noded ignored SIGTERM for 30 s\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let took = sent.elapsed();
        assert!(
            status.success(),
            "noded run exits 0 on SIGTERM: {status}\n{}",
            self.log_text()
        );
        took
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The daemon's template status once `done` accepts it.
async fn wait_template(
    socket: &Path,
    daemon: &mut Daemon,
    timeout: Duration,
    done: impl Fn(&pb::TemplateStatus) -> bool,
) -> pb::TemplateStatus {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        daemon.assert_running();
        if let Ok(mut c) = api::connect(socket).await
            && let Ok(s) = c.status(pb::StatusRequest {}).await
            && let Some(t) = s.into_inner().templates.first().cloned()
        {
            if done(&t) {
                return t;
            }
            last = Some(t);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!(
        "template never reached the expected state; last: {last:?}\n{}",
        daemon.log_text()
    );
}

/// A node-shaped noded.toml (host containerd, nothing applied, no probes) with `extra` appended.
fn node_config(dir: &Path, name: &str, data_dir: &Path, extra: &str) -> PathBuf {
    let config = dir.join(name);
    std::fs::write(
        &config,
        format!(
            r#"[daemon]
data_dir = "{data}"
run_dir = "{dir}/run"
api_socket = "{dir}/noded.sock"
metrics_listen = "127.0.0.1:0"
log_format = "text"

[containerd]
config = "{dir}/containerd/config.toml"
runtimes = []
private = false
apply_on_start = false

[probe]
handlers = []

[kubernetes]
enabled = false

{extra}
"#,
            data = data_dir.display(),
            dir = dir.display(),
        ),
    )
    .expect("write config");
    config
}

const TEMPLATE: &str = "[[templates]]\nname = \"p\"\nmemory_mib = 128\npool_target = 1\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_guest_starts_the_pool_without_apt_and_a_tampered_initrd_is_not_ready() {
    if !common::vm::available() {
        return;
    }
    let h = common::vm::VmHarness::new();
    let dir = h.path().to_path_buf();

    // The build host's step: `noded guest-assets --out DIR` (real apt, cached in the shared data dir).
    let build_cfg = node_config(
        &dir,
        "build.toml",
        &common::vm::shared_data_dir(),
        "[guest]\ndownload = true\n",
    );
    let out = dir.join("guest");
    let built = Command::new(noded_bin())
        .args(["guest-assets", "--out"])
        .arg(&out)
        .arg("--config")
        .arg(&build_cfg)
        .output()
        .expect("noded guest-assets");
    assert!(
        built.status.success(),
        "noded guest-assets: {}",
        String::from_utf8_lossy(&built.stderr)
    );
    let manifest: noded::vm::assets::ExportManifest =
        serde_json::from_slice(&std::fs::read(out.join("guest-assets.json")).expect("manifest"))
            .expect("manifest parses");
    let kernel = out.join(&manifest.kernel);
    let initrd = out.join(&manifest.initrd);
    assert_eq!(
        noded::vm::assets::sha256_file(&kernel).expect("hash"),
        manifest.kernel_sha256
    );
    assert_eq!(
        noded::vm::assets::sha256_file(&initrd).expect("hash"),
        manifest.initrd_sha256
    );

    // The node: its own empty data dir (no cache to fall back on) and apt that records and fails.
    let fake = FakeApt::new(&dir, "exit 1");
    let node_data = dir.join("node-data");
    let pinned = format!(
        "[guest]\nkernel = \"{}\"\nkernel_sha256 = \"{}\"\ninitrd = \"{}\"\ninitrd_sha256 = \"{}\"\n\n{TEMPLATE}",
        kernel.display(),
        manifest.kernel_sha256,
        initrd.display(),
        manifest.initrd_sha256
    );
    let config = node_config(&dir, "node.toml", &node_data, &pinned);
    let socket = dir.join("noded.sock");
    let mut daemon = Daemon::start(&config, &dir, &fake.path());
    let t = wait_template(&socket, &mut daemon, Duration::from_secs(300), |t| {
        t.ready && t.pool_ready == t.pool_target
    })
    .await;
    assert_eq!(t.pool_target, 1);
    assert!(t.not_ready_reason.is_empty(), "{t:?}");
    assert_eq!(
        h.live_vms().len(),
        1,
        "one pooled clone: {:?}",
        h.live_vms()
    );
    // The clone boots exactly the pinned files.
    let cmdlines: Vec<String> = h
        .live_vms()
        .iter()
        .map(|(pid, _)| std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default())
        .collect();
    assert!(
        cmdlines
            .iter()
            .all(|c| c.contains(&*kernel.to_string_lossy())
                && c.contains(&*initrd.to_string_lossy())),
        "{cmdlines:?}"
    );
    daemon.sigterm();
    assert_eq!(
        fake.calls(),
        "",
        "a node must never run apt-get/apt-cache/dpkg"
    );
    assert!(h.live_vms().is_empty(), "no QEMU after SIGTERM");

    // One byte of the initrd changed: not ready, reason names the file, noded keeps running.
    let mut bytes = std::fs::read(&initrd).expect("read initrd");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&initrd, &bytes).expect("tamper");
    let mut daemon = Daemon::start(&config, &dir, &fake.path());
    let t = wait_template(&socket, &mut daemon, Duration::from_secs(60), |t| {
        !t.not_ready_reason.is_empty()
    })
    .await;
    assert!(!t.ready);
    let reason = &t.not_ready_reason;
    assert!(
        reason.starts_with(&format!(
            "{}: pinned guest initrd: sha256 ",
            initrd.display()
        )),
        "{reason}"
    );
    assert!(reason.contains(&manifest.initrd_sha256), "{reason}");
    assert!(!reason.contains('\n'), "{reason}");
    // Still up a while later (metrics, API), still nothing downloaded, no VM started.
    tokio::time::sleep(Duration::from_secs(2)).await;
    daemon.assert_running();
    let log = daemon.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("template not ready") && l.contains(&*initrd.to_string_lossy())),
        "{log}"
    );
    assert!(h.live_vms().is_empty(), "{:?}", h.live_vms());
    daemon.sigterm();
    assert_eq!(
        fake.calls(),
        "",
        "a node must never run apt-get/apt-cache/dpkg"
    );
    h.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_with_nothing_pinned_never_downloads() {
    let dir = tempfile::Builder::new()
        .prefix("nga")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let fake = FakeApt::new(dir.path(), "exit 1");
    let config = node_config(dir.path(), "node.toml", &dir.path().join("data"), TEMPLATE);
    let socket = dir.path().join("noded.sock");
    let mut daemon = Daemon::start(&config, dir.path(), &fake.path());
    let t = wait_template(&socket, &mut daemon, Duration::from_secs(60), |t| {
        !t.not_ready_reason.is_empty()
    })
    .await;
    assert!(!t.ready);
    assert!(
        t.not_ready_reason.contains("no guest kernel/initrd")
            && t.not_ready_reason.contains("[guest]"),
        "{}",
        t.not_ready_reason
    );
    daemon.sigterm();
    assert_eq!(
        fake.calls(),
        "",
        "a node must never run apt-get/apt-cache/dpkg"
    );
}

/// Local mode: a private containerd (as `noded run` without --config starts), a template, nothing
/// pinned, so noded downloads; the fake `apt-cache` hangs with a grandchild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_hanging_download_stops_local_mode_promptly() {
    if !common::containerd::available() {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("ngl")
        .tempdir_in("/tmp")
        .expect("tempdir");
    let d = dir.path();
    let fake = FakeApt::new(d, HANG);
    let config = d.join("noded.toml");
    std::fs::write(
        &config,
        format!(
            r#"[daemon]
data_dir = "{d}/data"
run_dir = "{d}/data/run"
api_socket = "{d}/data/run/noded.sock"
metrics_listen = "127.0.0.1:0"
log_format = "text"

[containerd]
config = "{d}/data/containerd/config.toml"
kata_root = "{d}/data/kata"
socket = "{d}/data/containerd/containerd.sock"
runtimes = ["kata-qemu", "kata-qemu-warm"]
private = true

[probe]
handlers = ["runc"]
interval_seconds = 30
image = "noded.local/probe:1"

[kubernetes]
enabled = false

{TEMPLATE}"#,
            d = d.display()
        ),
    )
    .expect("write config");
    let mut daemon = Daemon::start(&config, d, &fake.path());
    // The download is running once the fake logged itself and its grandchild.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fake.calls().contains("pid=") {
        daemon.assert_running();
        assert!(
            Instant::now() < deadline,
            "no download started\n{}",
            daemon.log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(fake.calls().contains("apt-cache show"), "{}", fake.calls());
    let pids = fake.pids();
    assert_eq!(
        pids.len(),
        2,
        "the fake and its grandchild: {}",
        fake.calls()
    );
    let took = daemon.sigterm();
    assert!(
        took < Duration::from_secs(5),
        "noded took {took:?} to stop during a download\n{}",
        daemon.log_text()
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    for p in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(left.is_empty(), "apt processes left behind: {left:?}");
    assert!(
        !fake.calls().contains("apt-get download"),
        "nothing after the hanging call: {}",
        fake.calls()
    );
}

#[test]
fn a_command_past_its_timeout_is_one_line_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeApt::new(dir.path(), HANG);
    let config = node_config(
        dir.path(),
        "local.toml",
        &dir.path().join("data"),
        "[guest]\ndownload = true\ncommand_timeout_seconds = 1\n",
    );
    let started = Instant::now();
    let out = Command::new(noded_bin())
        .args(["guest-assets", "--out"])
        .arg(dir.path().join("out"))
        .arg("--config")
        .arg(&config)
        .env("PATH", fake.path())
        .output()
        .expect("noded guest-assets");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("noded guest-assets: `apt-cache show --no-all-versions linux-image-amd64` timed out after 1s"),
        "{stderr}"
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    let pids = fake.pids();
    assert_eq!(pids.len(), 2, "{}", fake.calls());
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        pids.iter().all(|p| !alive(*p)),
        "timed-out command left: {pids:?}"
    );
    assert!(!dir.path().join("out/guest-assets.json").exists());
}

#[test]
fn a_bad_guest_section_exits_2_naming_the_field() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sha = "a".repeat(64);
    for (extra, field) in [
        (
            "[guest]\nkernel = \"/k\"\ninitrd = \"/i\"\ninitrd_sha256 = \"SHA\"\n",
            "guest.kernel_sha256",
        ),
        (
            "[guest]\nkernel = \"/k\"\nkernel_sha256 = \"xyz\"\ninitrd = \"/i\"\ninitrd_sha256 = \"SHA\"\n",
            "guest.kernel_sha256",
        ),
        (
            "[guest]\nkernel = \"k\"\nkernel_sha256 = \"SHA\"\ninitrd = \"/i\"\ninitrd_sha256 = \"SHA\"\n",
            "guest.kernel",
        ),
        (
            "[guest]\nkernel = \"/k\"\nkernel_sha256 = \"SHA\"\n",
            "guest",
        ),
        (
            "[guest]\nkernel = \"/k\"\nkernel_sha256 = \"SHA\"\ninitrd = \"/i\"\ninitrd_sha256 = \"SHA\"\ndownload = true\n",
            "guest.download",
        ),
        (
            "[guest]\ncommand_timeout_seconds = 0\n",
            "guest.command_timeout_seconds",
        ),
    ] {
        let config = node_config(
            dir.path(),
            "bad.toml",
            &dir.path().join("data"),
            &extra.replace("SHA", &sha),
        );
        let out = Command::new(noded_bin())
            .args(["run", "--config"])
            .arg(&config)
            .output()
            .expect("noded run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&format!("{}: {field}", config.display())),
            "{extra}: {stderr}"
        );
        assert!(!dir.path().join("data").exists(), "nothing created");
    }
}

#[test]
fn ctrl_c_during_a_cli_download_kills_the_command_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let fake = FakeApt::new(dir.path(), HANG);
    let config = node_config(
        dir.path(),
        "local.toml",
        &dir.path().join("data"),
        "[guest]\ndownload = true\n",
    );
    let child = Command::new(noded_bin())
        .args(["guest-assets", "--out"])
        .arg(dir.path().join("out"))
        .arg("--config")
        .arg(&config)
        .env("PATH", fake.path())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("noded guest-assets");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !fake.calls().contains("pid=") {
        assert!(Instant::now() < deadline, "no download started");
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids = fake.pids();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    let sent = Instant::now();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).expect("SIGINT");
    let out = child.wait_with_output().expect("wait");
    assert!(
        sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        sent.elapsed()
    );
    assert_eq!(out.status.code(), Some(130), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|p| alive(*p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let left: Vec<i32> = pids.iter().copied().filter(|p| alive(*p)).collect();
    for p in &left {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*p),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    assert!(left.is_empty(), "apt processes left behind: {left:?}");
}
