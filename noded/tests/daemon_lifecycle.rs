//! `noded run` driven from the outside, as kubelet drives it:
//! - a typo in noded.toml exits 2 at load with one stderr line naming the file and the field, before
//!   anything is created;
//! - SIGTERM or SIGINT at any moment of a local-mode startup (private containerd 1.6, runc probe with the
//!   imported probe image) ends noded with exit 0 within 15 s, and nothing it started survives it: no
//!   process, no mount, no answering containerd socket.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use testkit::scrape::free_port;

/// How long noded may take to stop after the signal (kubelet's grace period is 30 s; the private
/// containerd's own stop timeout is 10 s).
const EXIT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a trigger may take to happen before the case fails. A start takes ~1 s here; less than
/// the 30 s probe interval, so a first probe that fails (the node unready for a whole interval) fails
/// the case instead of passing late.
const TRIGGER_TIMEOUT: Duration = Duration::from_secs(20);

/// A noded.toml shaped like `local-default.toml` with every path under `dir`, no templates (no QEMU),
/// Kubernetes off, and the given extra lines at the end of `[containerd]`.
fn config_text(dir: &Path, port: u16, containerd_extra: &str) -> String {
    let d = dir.display();
    format!(
        r#"[daemon]
data_dir = "{d}/data"
run_dir = "{d}/data/run"
api_socket = "{d}/data/run/noded.sock"
metrics_listen = "127.0.0.1:{port}"
log_format = "text"

[containerd]
config = "{d}/data/containerd/config.toml"
kata_root = "{d}/data/kata"
socket = "{d}/data/containerd/containerd.sock"
private = true
{containerd_extra}

[probe]
handlers = ["runc"]
interval_seconds = 30
image = "noded.local/probe:1"

[kubernetes]
enabled = false
"#
    )
}

fn noded_bin() -> PathBuf {
    assert_cmd::cargo::cargo_bin("noded")
}

// ---------------------------------------------------------------------------------------------------
// Config errors: exit 2 at load.

#[test]
fn config_typos_exit_2_at_load_and_create_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    // (file, its text (None: the file does not exist), what the one stderr line must name besides the file)
    let cases: [(&str, Option<String>, &[&str]); 5] = [
        (
            "restart.toml",
            Some(config_text(
                tmp.path(),
                port,
                "runtimes = [\"kata-qemu\"]\nrestart = \"sytemd\"",
            )),
            &["containerd.restart", "sytemd"],
        ),
        (
            "runtimes.toml",
            Some(config_text(
                tmp.path(),
                port,
                "runtimes = [\"kata-qmeu\"]\nrestart = \"never\"",
            )),
            &["containerd.runtimes", "kata-qmeu"],
        ),
        (
            "syntax.toml",
            // Unterminated string on line 13 (the first line of `containerd_extra`).
            Some(config_text(tmp.path(), port, "restart = \"never")),
            &["line 13", "restart"],
        ),
        (
            "unknown.toml",
            Some(config_text(tmp.path(), port, "restrat = \"never\"")),
            &["restrat"],
        ),
        ("missing.toml", None, &["cannot read"]),
    ];
    let mut failures = Vec::new();
    for (name, text, must_name) in &cases {
        let path = tmp.path().join(name);
        if let Some(text) = text {
            std::fs::write(&path, text).expect("write config");
        }
        let out = assert_cmd::Command::new(noded_bin())
            .args(["run", "--config"])
            .arg(&path)
            .env("NO_COLOR", "1")
            // A config that wrongly loads would start a daemon: do not wait for it forever.
            .timeout(Duration::from_secs(20))
            .output()
            .expect("run noded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        let prefix = format!("noded: {}: ", path.display());
        let ok = out.status.code() == Some(2)
            && out.stdout.is_empty()
            && lines.len() == 1
            && lines[0].starts_with(&prefix)
            && must_name.iter().all(|m| lines[0].contains(m));
        eprintln!(
            "{name}: exit {:?}: {}",
            out.status.code(),
            stderr.trim_end()
        );
        if !ok {
            failures.push(format!(
                "{name}: want exit 2 and one stderr line starting with {prefix:?} naming {must_name:?}; \
                 got {:?}, stdout {:?}, stderr {stderr:?}",
                out.status,
                String::from_utf8_lossy(&out.stdout)
            ));
        }
        let data = tmp.path().join("data");
        if data.exists() {
            failures.push(format!("{name}: {} was created", data.display()));
        }
        // Nothing but the configs themselves may appear next to them (sockets, logs, .noded-data).
        let mut extra: Vec<String> = std::fs::read_dir(tmp.path())
            .expect("read tempdir")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !cases.iter().any(|(c, _, _)| c == n))
            .collect();
        extra.sort();
        if !extra.is_empty() {
            failures.push(format!("{name}: created {extra:?}"));
        }
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            failures.push(format!(
                "{name}: something listens on the metrics port {port}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------------
// Signals during startup.

/// When the signal is sent.
#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// As soon as noded has a handler for the signal (caught or blocked in /proc/PID/status): the
    /// earliest moment it can do anything about it, "0 ms".
    HandlerInstalled,
    /// A fixed delay after spawn.
    After(u64),
    /// When noded's log has this line (a startup milestone).
    Log(&'static str),
    /// containerd has been spawned (its pidfile exists) and is not necessarily answering yet.
    ContainerdSpawned,
    /// A probe sandbox is in flight: a shim of our containerd runs.
    ShimRunning,
    /// `/readyz` answers 200: startup is over and the runc probe passed.
    Ready,
}

struct Outcome {
    label: String,
    sent_after: Duration,
    exited_after: Duration,
    during_startup: bool,
    last_milestone: String,
}

/// Log lines that mark the startup phases, in order.
const MILESTONES: &[&str] = &[
    "noded starting",
    "serving /metrics",
    "containerd config written",
    "private containerd configured",
    "private containerd ready",
    "image imported image=noded.local/probe:1",
    "image imported image=noded.local/pause:1",
    "node API listening",
    "following containerd events",
    "probe passed",
];

/// One process of the table.
#[derive(Debug, Clone)]
struct ProcInfo {
    pid: i32,
    ppid: i32,
    state: char,
    comm: String,
    cmdline: String,
}

fn processes() -> Vec<ProcInfo> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_string();
        let mut rest = stat[close + 1..].split_whitespace();
        let state = rest.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = rest.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        out.push(ProcInfo {
            pid,
            ppid,
            state,
            comm,
            cmdline,
        });
    }
    out
}

/// Live processes that belong to a case: their command line names its directory (containerd, the
/// supervisor shell, shims), or they descend from this test process (this process is a child
/// subreaper, so whatever noded's children orphan — shims, containers whose command line is just
/// `/pause` — ends up here). Zombies are dead and are not counted; `noded` processes are the tests' own
/// children, waited for by whoever spawned them.
fn leftovers(dir: &Path) -> Vec<ProcInfo> {
    let me = std::process::id().cast_signed();
    let all = processes();
    let needle = dir.display().to_string();
    let descends_from_me = |p: &ProcInfo| {
        let mut ppid = p.ppid;
        for _ in 0..64 {
            if ppid == me {
                return true;
            }
            match all.iter().find(|q| q.pid == ppid) {
                Some(q) => ppid = q.ppid,
                None => return false,
            }
        }
        false
    };
    all.iter()
        .filter(|p| p.pid != me && p.state != 'Z' && p.comm != "noded")
        .filter(|p| p.cmdline.contains(&needle) || descends_from_me(p))
        .cloned()
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    text.lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|m| Path::new(m).starts_with(dir))
        })
        .map(str::to_string)
        .collect()
}

/// Reaps zombies orphaned onto this (subreaper) process while noded shuts down: noded's own cleanup
/// waits until its victims' /proc entries are gone, so they must not linger as our zombies. `noded`
/// zombies are left to the `Child` that spawned them.
struct Reaper {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reaper {
    fn start() -> Self {
        nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let me = std::process::id().cast_signed();
            while !flag.load(Ordering::Relaxed) {
                for p in processes() {
                    if p.ppid == me && p.state == 'Z' && p.comm != "noded" {
                        let _ = nix::sys::wait::waitpid(
                            Pid::from_raw(p.pid),
                            Some(nix::sys::wait::WaitPidFlag::WNOHANG),
                        );
                    }
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One `noded run` in its own temp dir. Drop kills noded and everything left under the dir (processes
/// by command line and our orphans, mounts), also when the case failed.
struct Case {
    dir: tempfile::TempDir,
    config: PathBuf,
    log: PathBuf,
    socket: PathBuf,
    pidfile: PathBuf,
    metrics: SocketAddr,
    child: Option<Child>,
}

impl Case {
    fn new() -> Self {
        // Short path: containerd's sockets live under it (unix socket paths are limited to 107 bytes).
        let dir = tempfile::Builder::new()
            .prefix("ndl-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let port = free_port();
        let config = dir.path().join("noded.toml");
        std::fs::write(
            &config,
            config_text(
                dir.path(),
                port,
                "runtimes = [\"kata-qemu\", \"kata-qemu-warm\"]\nrestart = \"auto\"",
            ),
        )
        .expect("write noded.toml");
        let data = dir.path().join("data");
        Self {
            config,
            log: dir.path().join("noded.log"),
            socket: data.join("containerd/containerd.sock"),
            pidfile: data.join("containerd/containerd.pid"),
            metrics: SocketAddr::from(([127, 0, 0, 1], port)),
            dir,
            child: None,
        }
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).expect("create log");
        let child = Command::new(noded_bin())
            .args(["run", "--config"])
            .arg(&self.config)
            .current_dir(self.dir.path())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn noded");
        self.child = Some(child);
    }

    fn pid(&self) -> Pid {
        let child = self.child.as_ref().expect("spawned");
        Pid::from_raw(i32::try_from(child.id()).expect("pid fits i32"))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    fn handles(&self, signal: Signal) -> bool {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid())) else {
            return false;
        };
        let bit = 1u64 << (signal as i32 - 1);
        ["SigCgt:", "SigBlk:"].iter().any(|field| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                .is_some_and(|mask| mask & bit != 0)
        })
    }

    fn ready(&self) -> bool {
        http_status(self.metrics, "/readyz") == Some(200)
    }

    fn shim_running(&self) -> bool {
        let needle = self.socket.display().to_string();
        processes()
            .iter()
            .any(|p| p.cmdline.contains("containerd-shim") && p.cmdline.contains(&needle))
    }

    /// Waits for `trigger`; Err if noded exited first or it did not happen in time.
    fn wait_for(
        &mut self,
        trigger: Trigger,
        signal: Signal,
        started: Instant,
    ) -> Result<(), String> {
        loop {
            let hit = match trigger {
                Trigger::HandlerInstalled => self.handles(signal),
                Trigger::After(ms) => started.elapsed() >= Duration::from_millis(ms),
                Trigger::Log(line) => self.log_text().contains(line),
                Trigger::ContainerdSpawned => self.pidfile.exists(),
                Trigger::ShimRunning => self.shim_running(),
                Trigger::Ready => self.ready(),
            };
            if hit {
                return Ok(());
            }
            if !self.running() {
                return Err(format!("noded exited before {trigger:?}"));
            }
            if started.elapsed() > TRIGGER_TIMEOUT {
                return Err(format!(
                    "{trigger:?} did not happen within {TRIGGER_TIMEOUT:?}"
                ));
            }
            // Fine-grained: the early phases last tens of milliseconds.
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Kills every process left under the dir or orphaned to us, and unmounts what is mounted there.
    fn sweep(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Until two scans in a row find nothing: a process mid-fork or mid-exec (`runc init`, the
        // supervisor's `sleep`) can appear after the scan that killed its parent.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut quiet = 0;
        while quiet < 2 && Instant::now() < deadline {
            let left = leftovers(self.dir.path());
            if left.is_empty() {
                quiet += 1;
            } else {
                quiet = 0;
            }
            for p in left {
                let _ = kill(Pid::from_raw(p.pid), Signal::SIGKILL);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        for line in mounts_under(self.dir.path()).iter().rev() {
            if let Some(m) = line.split_whitespace().nth(4) {
                let _ = nix::mount::umount2(m, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        self.sweep();
    }
}

/// Status code of a GET, None if nothing answers.
fn http_status(addr: SocketAddr, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Runs one case: start, signal at `trigger`, then check exit status and leftovers.
fn run_case(trigger: Trigger, signal: Signal) -> Result<Outcome, String> {
    let label = format!("{signal:?} at {trigger:?}");
    let mut case = Case::new();
    let started = Instant::now();
    case.spawn();
    let fail = |case: &Case, what: String| {
        format!(
            "{label}: {what}\n--- noded log ({}) ---\n{}",
            case.log.display(),
            case.log_text()
        )
    };
    if let Err(e) = case.wait_for(trigger, signal, started) {
        return Err(fail(&case, e));
    }
    let sent_after = started.elapsed();
    let before_signal = case.log_text();
    kill(case.pid(), signal).map_err(|e| fail(&case, format!("kill: {e}")))?;
    let status = loop {
        let child = case.child.as_mut().expect("spawned");
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < sent_after + EXIT_TIMEOUT => {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(None) => {
                let left = leftovers(case.dir.path());
                case.sweep();
                return Err(fail(
                    &case,
                    format!(
                        "still running {EXIT_TIMEOUT:?} after {signal:?} (killed); processes: {left:#?}"
                    ),
                ));
            }
            Err(e) => return Err(fail(&case, format!("wait: {e}"))),
        }
    };
    let exited_after = started.elapsed() - sent_after;
    case.child = None;
    let mut problems = Vec::new();
    if status.code() != Some(0) {
        problems.push(format!("exit status {status}, want 0"));
    }
    let left = leftovers(case.dir.path());
    if !left.is_empty() {
        problems.push(format!("processes left: {left:#?}"));
    }
    let mounts = mounts_under(case.dir.path());
    if !mounts.is_empty() {
        problems.push(format!("mounts left: {mounts:#?}"));
    }
    if std::os::unix::net::UnixStream::connect(&case.socket).is_ok() {
        problems.push(format!("{} still answers", case.socket.display()));
    }
    if TcpStream::connect(case.metrics).is_ok() {
        problems.push(format!("{} still answers", case.metrics));
    }
    if !problems.is_empty() {
        return Err(fail(&case, problems.join("\n")));
    }
    let log = case.log_text();
    let last_milestone = MILESTONES
        .iter()
        .rev()
        .find(|m| before_signal.contains(*m))
        .map_or("(none)", |m| m)
        .to_string();
    Ok(Outcome {
        label,
        sent_after,
        exited_after,
        during_startup: log.contains("shutdown requested during startup"),
        last_milestone,
    })
}

/// Every startup phase, by fixed delays and by the milestones themselves (so each phase is hit
/// whatever this machine's speed), then once after startup; SIGINT at the two richest moments.
#[test]
fn signal_at_any_moment_of_startup_stops_cleanly() {
    if !common::containerd::available() {
        return;
    }
    let _reaper = Reaper::start();
    let cases: &[(Trigger, Signal)] = &[
        (Trigger::HandlerInstalled, Signal::SIGTERM),
        (Trigger::After(50), Signal::SIGTERM),
        (Trigger::After(150), Signal::SIGTERM),
        (Trigger::After(300), Signal::SIGTERM),
        (Trigger::After(600), Signal::SIGTERM),
        (Trigger::After(1000), Signal::SIGTERM),
        (Trigger::After(2000), Signal::SIGTERM),
        (Trigger::Log("containerd config written"), Signal::SIGTERM),
        (Trigger::ContainerdSpawned, Signal::SIGTERM),
        (Trigger::Log("private containerd ready"), Signal::SIGTERM),
        (
            Trigger::Log("image imported image=noded.local/probe:1"),
            Signal::SIGTERM,
        ),
        (Trigger::Log("node API listening"), Signal::SIGTERM),
        (Trigger::ShimRunning, Signal::SIGTERM),
        (Trigger::Ready, Signal::SIGTERM),
        (Trigger::ContainerdSpawned, Signal::SIGINT),
        (Trigger::ShimRunning, Signal::SIGINT),
        (Trigger::Ready, Signal::SIGINT),
    ];
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for &(trigger, signal) in cases {
        match run_case(trigger, signal) {
            Ok(o) => report.push(format!(
                "{:<60} sent {:>5} ms  exit {:>4} ms  {:<15} last: {}",
                o.label,
                o.sent_after.as_millis(),
                o.exited_after.as_millis(),
                if o.during_startup {
                    "during startup"
                } else {
                    "after startup"
                },
                o.last_milestone
            )),
            Err(e) => {
                report.push(format!("FAILED {signal:?} at {trigger:?}"));
                failures.push(e);
            }
        }
    }
    eprintln!("{}", report.join("\n"));
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The leftover checks above can fail: SIGKILL (no cleanup possible) while a probe sandbox runs leaves
/// the private containerd, its supervisor, the shim and the sandbox's container, and each is seen —
/// the container by descent alone (its command line does not name the dir).
#[test]
fn sigkill_leaves_what_the_checks_detect() {
    if !common::containerd::available() {
        return;
    }
    let _reaper = Reaper::start();
    let mut case = Case::new();
    let started = Instant::now();
    case.spawn();
    case.wait_for(Trigger::ShimRunning, Signal::SIGTERM, started)
        .unwrap_or_else(|e| panic!("{e}\n{}", case.log_text()));
    // The sandbox's container starts right after its shim. Its own process, not `runc init` on the way
    // to becoming it (comm `runc:[..]` or `exe`), seen twice so it is not a passing fork; its command
    // line does not name the dir.
    let deadline = Instant::now() + Duration::from_secs(10);
    let needle = case.dir.path().display().to_string();
    let containers = |c: &Case| -> Vec<i32> {
        leftovers(c.dir.path())
            .into_iter()
            .filter(|p| {
                !p.cmdline.contains(&needle) && !p.comm.starts_with("runc") && p.comm != "exe"
            })
            .map(|p| p.pid)
            .collect()
    };
    let container = loop {
        let first = containers(&case);
        std::thread::sleep(Duration::from_millis(20));
        let second = containers(&case);
        if let Some(pid) = first.iter().find(|p| second.contains(p)) {
            break *pid;
        }
        assert!(
            Instant::now() < deadline,
            "no sandbox container appeared: {:#?}\n{}",
            leftovers(case.dir.path()),
            case.log_text()
        );
    };
    kill(case.pid(), Signal::SIGKILL).expect("SIGKILL");
    let _ = case.child.as_mut().expect("spawned").wait();
    case.child = None;
    let left = leftovers(case.dir.path());
    let has = |what: &str| left.iter().any(|p| p.cmdline.contains(what));
    assert!(has("containerd --config"), "containerd: {left:#?}");
    assert!(has("supervise.sh"), "supervisor: {left:#?}");
    assert!(has("containerd-shim"), "shim: {left:#?}");
    assert!(
        left.iter().any(|p| p.pid == container),
        "the sandbox's container (pid {container}), found by descent: {left:#?}"
    );
    assert!(
        std::os::unix::net::UnixStream::connect(&case.socket).is_ok(),
        "containerd still answers"
    );
    // Drop sweeps it all; prove it did.
    let dir = case.dir.path().to_path_buf();
    case.sweep();
    let after = leftovers(&dir);
    assert!(after.is_empty(), "the sweep left {after:#?}");
}
