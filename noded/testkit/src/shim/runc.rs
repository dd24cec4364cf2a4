//! Running the Debian `runc` binary from inside the shim.
//!
//! The shim is a subreaper and containerd-shim's SIGCHLD thread reaps *every* child with
//! `waitpid(-1)`, so `Command::wait` would race it and see ECHILD. Every runc invocation therefore
//! subscribes to the crate's exit monitor before spawning and takes its exit code from there.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use containerd_shim::monitor::{Topic, monitor_subscribe, wait_pid};

/// The container's stdio as runc create hands it to the container's init.
pub struct Stdio3 {
    pub stdin: File,
    pub stdout: File,
    pub stderr: File,
}

/// `runc --root <root>`: one root per containerd namespace, private to this shim so it never sees
/// (or is seen by) containerd's own runc shim.
pub struct Runc {
    binary: PathBuf,
    root: PathBuf,
}

/// What a finished runc call left behind.
pub struct Outcome {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Runc {
    pub fn new(root: PathBuf) -> Self {
        Self {
            binary: find_runc(),
            root,
        }
    }

    /// `runc create`: the container's init inherits `stdio`; runc's own errors go to `log` (JSON
    /// lines), because its stderr *is* the container's stderr here.
    pub fn create(
        &self,
        id: &str,
        bundle: &Path,
        pid_file: &Path,
        log: &Path,
        stdio: Stdio3,
    ) -> Result<(), String> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.root)
            .arg("--log")
            .arg(log)
            .arg("--log-format")
            .arg("json")
            .arg("create")
            .arg("--bundle")
            .arg(bundle)
            .arg("--pid-file")
            .arg(pid_file)
            .arg(id)
            .stdin(Stdio::from(stdio.stdin))
            .stdout(Stdio::from(stdio.stdout))
            .stderr(Stdio::from(stdio.stderr));
        let sub = monitor_subscribe(Topic::Pid).map_err(|e| format!("monitor: {e}"))?;
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        // Drops our copies of the fifos: only the container keeps them open.
        drop(cmd);
        let code = wait_pid(child_pid(&child), sub);
        if code == 0 {
            return Ok(());
        }
        Err(format!(
            "runc create {id} exited {code}: {}",
            last_log_error(log).unwrap_or_else(|| "no message in runc's log".to_owned())
        ))
    }

    /// Any other runc subcommand, output captured.
    pub fn run(&self, args: &[&str]) -> Result<Outcome, String> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--root")
            .arg(&self.root)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let sub = monitor_subscribe(Topic::Pid).map_err(|e| format!("monitor: {e}"))?;
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run {}: {e}", self.binary.display()))?;
        let pid = child_pid(&child);
        let out = child.stdout.take();
        let err = child.stderr.take();
        let err_reader = std::thread::spawn(move || read_all(err));
        let stdout = read_all(out);
        let stderr = err_reader.join().unwrap_or_default();
        let code = wait_pid(pid, sub);
        Ok(Outcome {
            code,
            stdout,
            stderr,
        })
    }

    /// `run`, failing with runc's own message when it exits non-zero.
    pub fn check(&self, args: &[&str]) -> Result<Outcome, String> {
        let out = self.run(args)?;
        if out.code != 0 {
            return Err(format!(
                "runc {} exited {}: {}",
                args.join(" "),
                out.code,
                out.stderr.trim()
            ));
        }
        Ok(out)
    }
}

fn child_pid(child: &std::process::Child) -> i32 {
    i32::try_from(child.id()).unwrap_or(i32::MAX)
}

fn read_all(r: Option<impl Read>) -> String {
    let mut s = String::new();
    if let Some(mut r) = r {
        let _ = r.read_to_string(&mut s);
    }
    s
}

/// runc writes `{"level":"error","msg":"...","time":"..."}` lines; the last error is the cause.
fn last_log_error(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    text.lines()
        .rev()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["level"] == "error")
        .and_then(|v| v["msg"].as_str().map(str::to_owned))
}

/// `/usr/sbin/runc` (Debian), else the first `runc` on PATH. When there is none, the bare name
/// stays, and the first call fails naming it.
fn find_runc() -> PathBuf {
    let debian = PathBuf::from("/usr/sbin/runc");
    if debian.is_file() {
        return debian;
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("runc"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("runc"))
}
