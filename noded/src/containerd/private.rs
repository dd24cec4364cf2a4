//! A private containerd with its own root, state, sockets and `/run`, for local mode and tests.
//!
//! Local mode runs the installed containerd (1.6 here) with a version 2 config; tests choose the binary
//! ([`Launch`]) and write their own config (the test harness has the version 3 one) to run 1.7 and
//! 2.x the same way.
//! containerd's PATH starts with `<dir>/bin`, so per-handler shims (`containerd-shim-<handler>-v2`,
//! which containerd 1.6 resolves by name whatever `runtime_path` says) can be dropped there.
//!
//! containerd 1.6 puts shim sockets, runc state and fifos under a hard-coded `/run/containerd` whatever
//! `state` says, so it runs inside its own mount namespace with `<dir>/run` bound over `/run`. Inside that
//! namespace a small shell supervisor restarts containerd whenever it exits (unless asked to stop), which is
//! what makes an external restart command possible: [`PrivateContainerd::restart_command`] stops the running
//! containerd, waits until it is gone and until the supervisor has started a new one.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use tracing::{debug, info, warn};

/// How long [`PrivateContainerd::start`] waits for containerd to answer on its socket.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a stop waits after SIGTERM before SIGKILL.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum PrivateContainerdError {
    #[error(
        "private containerd directory {0} is under /run, which the private containerd replaces with <dir>/run; choose a directory outside /run"
    )]
    DirUnderRun(PathBuf),
    #[error("private containerd directory {0} must be an absolute path")]
    DirNotAbsolute(PathBuf),
    #[error("cannot prepare {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("containerd config {path} is not valid TOML: {detail}")]
    BadConfig { path: PathBuf, detail: String },
    #[error(
        "containerd config {0} has no `grpc.address`; a private containerd must not listen on the host's /run/containerd/containerd.sock"
    )]
    NoSocket(PathBuf),
    #[error("cannot start `unshare ... containerd --config {config}`: {source}")]
    Spawn { config: PathBuf, source: io::Error },
    #[error(
        "containerd did not answer on {socket} within {timeout:?}; containerd log tail:\n{log}"
    )]
    NotReady {
        socket: PathBuf,
        timeout: Duration,
        log: String,
    },
    #[error(
        "the containerd supervisor exited ({status}) before containerd was ready; containerd log tail:\n{log}"
    )]
    Exited { status: String, log: String },
    #[error(
        "containerd exits right after starting with config {config}; containerd log tail:\n{log}"
    )]
    CrashLoop { config: PathBuf, log: String },
    #[error("restart command {script} failed ({status}): {stderr}")]
    Restart {
        script: PathBuf,
        status: String,
        stderr: String,
    },
    #[error("the private containerd is not running")]
    NotRunning,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> PrivateContainerdError + '_ {
    move |source| PrivateContainerdError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Where everything of one private containerd lives, all under one directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivateLayout {
    pub dir: PathBuf,
    /// containerd `root` (content, snapshots, metadata).
    pub root: PathBuf,
    /// containerd `state`.
    pub state: PathBuf,
    /// Bound over `/run` inside containerd's mount namespace.
    pub run: PathBuf,
    /// gRPC socket (`grpc.address`). Keep `dir` short: unix socket paths are limited to 107 bytes.
    pub socket: PathBuf,
    pub ttrpc_socket: PathBuf,
    pub debug_socket: PathBuf,
    /// `plugins."io.containerd.internal.v1.opt".path`.
    pub opt: PathBuf,
    /// CNI conf/bin dirs, private so the host's CNI config is never used.
    pub cni_conf: PathBuf,
    pub cni_bin: PathBuf,
    /// First on containerd's PATH: where per-handler shims go.
    pub bin: PathBuf,
    /// containerd's stdout/stderr (appended across restarts).
    pub log: PathBuf,
    /// PID of the containerd currently running under the supervisor.
    pub pidfile: PathBuf,
    /// Present while a stop is in progress, so the supervisor does not restart containerd.
    pub stop_marker: PathBuf,
    pub supervisor_script: PathBuf,
    /// Executable restart script, see [`PrivateContainerd::restart_command`].
    pub restart_script: PathBuf,
}

impl PrivateLayout {
    pub fn new(dir: &Path) -> Self {
        let p = |name: &str| dir.join(name);
        Self {
            dir: dir.to_path_buf(),
            root: p("root"),
            state: p("state"),
            run: p("run"),
            socket: p("containerd.sock"),
            ttrpc_socket: p("containerd.sock.ttrpc"),
            debug_socket: p("debug.sock"),
            opt: p("opt"),
            cni_conf: p("cni/net.d"),
            cni_bin: p("cni/bin"),
            bin: p("bin"),
            log: p("containerd.log"),
            pidfile: p("containerd.pid"),
            stop_marker: p("supervisor.stop"),
            supervisor_script: p("supervise.sh"),
            restart_script: p("restart.sh"),
        }
    }

    fn check(&self) -> Result<(), PrivateContainerdError> {
        if !self.dir.is_absolute() {
            return Err(PrivateContainerdError::DirNotAbsolute(self.dir.clone()));
        }
        if self.dir.starts_with("/run") {
            return Err(PrivateContainerdError::DirUnderRun(self.dir.clone()));
        }
        Ok(())
    }

    fn create_dirs(&self) -> Result<(), PrivateContainerdError> {
        for d in [
            &self.dir,
            &self.root,
            &self.state,
            &self.run,
            &self.opt,
            &self.cni_conf,
            &self.cni_bin,
            &self.bin,
        ] {
            std::fs::create_dir_all(d).map_err(io_err(d))?;
        }
        Ok(())
    }
}

/// What every private containerd config starts with, whatever its version: its own root, state,
/// sockets and opt dir, and CRI required (without CRI the instance is useless to noded).
pub fn config_head(layout: &PrivateLayout, version: u8) -> String {
    let q = |p: &Path| toml_quote(&p.display().to_string());
    format!(
        r#"version = {version}
root = {root}
state = {state}
required_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = {socket}

[ttrpc]
  address = {ttrpc}

[debug]
  address = {debug}

[metrics]
  address = ""

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = {opt}
"#,
        root = q(&layout.root),
        state = q(&layout.state),
        socket = q(&layout.socket),
        ttrpc = q(&layout.ttrpc_socket),
        debug = q(&layout.debug_socket),
        opt = q(&layout.opt),
    )
}

/// The containerd 1.6 config (version 2) that works for a private instance on this kind of machine (see
/// DESIGN section 10): own paths, CRI required, runc with cgroupfs, overlayfs, `restrict_oom_score_adj`
/// (without it runc cannot write oom_score_adj here and every sandbox fails).
pub fn default_config(layout: &PrivateLayout, sandbox_image: &str) -> String {
    let q = |p: &Path| toml_quote(&p.display().to_string());
    format!(
        r#"{head}
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = {sandbox}
    netns_mounts_under_state_dir = true
    disable_apparmor = true
    restrict_oom_score_adj = true

    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = {cni_bin}
      conf_dir = {cni_conf}

    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes]

        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
          runtime_type = "io.containerd.runc.v2"

          [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
            SystemdCgroup = false
"#,
        head = config_head(layout, 2),
        sandbox = toml_quote(sandbox_image),
        cni_bin = q(&layout.cni_bin),
        cni_conf = q(&layout.cni_conf),
    )
}

/// Which containerd binary runs and what goes on its PATH after `<dir>/bin`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The containerd binary (a bare name is looked up on PATH).
    pub containerd: PathBuf,
    /// Directories put on containerd's PATH right after `<dir>/bin`, e.g. where the matching
    /// `containerd-shim-runc-v2` of a non-installed containerd lives.
    pub path_prefix: Vec<PathBuf>,
}

impl Default for Launch {
    fn default() -> Self {
        Self {
            containerd: PathBuf::from("containerd"),
            path_prefix: Vec::new(),
        }
    }
}

fn toml_quote(s: &str) -> String {
    toml_edit::Value::from(s).to_string().trim().to_string()
}

/// Reads `grpc.address` from a containerd config.
fn socket_of(config: &Path) -> Result<PathBuf, PrivateContainerdError> {
    let text = std::fs::read_to_string(config).map_err(io_err(config))?;
    let doc: toml::Table =
        text.parse()
            .map_err(|e: toml::de::Error| PrivateContainerdError::BadConfig {
                path: config.to_path_buf(),
                detail: e.message().to_string(),
            })?;
    doc.get("grpc")
        .and_then(|g| g.get("address"))
        .and_then(|a| a.as_str())
        .filter(|a| !a.is_empty())
        .map(PathBuf::from)
        .ok_or_else(|| PrivateContainerdError::NoSocket(config.to_path_buf()))
}

fn sh_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// A running private containerd. Dropping it kills containerd, its shims and every container they run,
/// and waits (briefly) until they are gone.
#[derive(Debug)]
pub struct PrivateContainerd {
    layout: PrivateLayout,
    config: PathBuf,
    socket: PathBuf,
    launch: Launch,
    supervisor: Option<Child>,
}

impl PrivateContainerd {
    /// Starts containerd with a config the caller wrote. The config's `grpc.address` is the socket waited
    /// for; its root/state/addresses should be under `dir` (see [`PrivateLayout`]).
    pub async fn start(dir: &Path, config: &Path) -> Result<Self, PrivateContainerdError> {
        Self::start_with(dir, config, &Launch::default()).await
    }

    /// Like [`start`](Self::start), running `launch`'s containerd.
    pub async fn start_with(
        dir: &Path,
        config: &Path,
        launch: &Launch,
    ) -> Result<Self, PrivateContainerdError> {
        let layout = PrivateLayout::new(dir);
        layout.check()?;
        layout.create_dirs()?;
        let socket = socket_of(config)?;
        let config = std::path::absolute(config).map_err(io_err(config))?;
        write_scripts(&layout, &config, &socket, launch)?;
        let mut me = Self {
            layout,
            config,
            socket,
            launch: launch.clone(),
            supervisor: None,
        };
        me.spawn_supervisor()?;
        me.wait_ready(None, READY_TIMEOUT).await?;
        info!(socket = %me.socket.display(), config = %me.config.display(), "private containerd ready");
        Ok(me)
    }

    pub fn layout(&self) -> &PrivateLayout {
        &self.layout
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    pub fn dir(&self) -> &Path {
        &self.layout.dir
    }

    /// The containerd binary and PATH this instance runs with.
    pub fn launch(&self) -> &Launch {
        &self.launch
    }

    /// PID of the containerd process currently running, if any.
    pub fn containerd_pid(&self) -> Option<i32> {
        read_pid(&self.layout.pidfile)
    }

    /// An absolute path to an executable script that restarts this containerd and returns once the old
    /// process has exited, the new one has created its socket and its CRI plugin has logged that it is ready
    /// (exit 1 with a message on stderr if that
    /// takes more than ~20 s). Use it as `noded containerd apply --restart command:<this>`; it needs no
    /// arguments, no noded and no environment. The restarted containerd reads the same config path.
    pub fn restart_command(&self) -> String {
        self.layout.restart_script.display().to_string()
    }

    /// The last `lines` lines of containerd's log (for error messages and failing tests).
    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.layout.log, lines)
    }

    /// Restarts containerd through [`restart_command`](Self::restart_command) and waits until it answers.
    pub async fn restart(&mut self) -> Result<(), PrivateContainerdError> {
        if self.supervisor.is_none() {
            return self.start_again().await;
        }
        let old = self.containerd_pid();
        let script = self.layout.restart_script.clone();
        let out = tokio::process::Command::new(&script)
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(io_err(&script))?;
        if !out.status.success() {
            return Err(PrivateContainerdError::Restart {
                script,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        self.wait_ready(old, READY_TIMEOUT).await
    }

    /// Stops containerd: SIGTERM, then SIGKILL after [`STOP_TIMEOUT`]. Shims and their containers keep
    /// running (as with a real containerd); [`start_again`](Self::start_again) reattaches to them.
    pub async fn stop(&mut self) -> Result<(), PrivateContainerdError> {
        let Some(mut child) = self.supervisor.take() else {
            return Ok(());
        };
        let marker = &self.layout.stop_marker;
        std::fs::write(marker, b"").map_err(io_err(marker))?;
        if let Some(pid) = self.containerd_pid() {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => {
                    debug!(%status, "containerd supervisor exited");
                    break;
                }
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    warn!("containerd did not stop within {STOP_TIMEOUT:?}; killing it");
                    kill_group(&mut child);
                    break;
                }
            }
        }
        let _ = std::fs::remove_file(&self.layout.pidfile);
        Ok(())
    }

    /// Starts containerd again after [`stop`](Self::stop), with the same config path.
    pub async fn start_again(&mut self) -> Result<(), PrivateContainerdError> {
        if self.supervisor.is_some() {
            return Ok(());
        }
        self.spawn_supervisor()?;
        self.wait_ready(None, READY_TIMEOUT).await
    }

    fn spawn_supervisor(&mut self) -> Result<(), PrivateContainerdError> {
        let _ = std::fs::remove_file(&self.layout.stop_marker);
        let _ = std::fs::remove_file(&self.layout.pidfile);
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "/bin/sh"])
            .arg(&self.layout.supervisor_script)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            // Own process group: Drop kills supervisor + containerd with one killpg.
            .process_group(0)
            .spawn()
            .map_err(|source| PrivateContainerdError::Spawn {
                config: self.config.clone(),
                source,
            })?;
        debug!(pid = child.id(), "containerd supervisor started");
        self.supervisor = Some(child);
        Ok(())
    }

    /// Waits until a containerd other than `old_pid` answers `Version` on the socket.
    async fn wait_ready(
        &mut self,
        old_pid: Option<i32>,
        timeout: Duration,
    ) -> Result<(), PrivateContainerdError> {
        let deadline = Instant::now() + timeout;
        let mut first_pid = None;
        loop {
            if let Some(child) = self.supervisor.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                self.supervisor = None;
                return Err(PrivateContainerdError::Exited {
                    status: status.to_string(),
                    log: self.log_tail(30),
                });
            }
            let pid = self.containerd_pid();
            if pid.is_some() && pid != old_pid {
                match first_pid {
                    None => first_pid = pid,
                    // The supervisor had to start it again: containerd exits on this config.
                    Some(first) if pid != Some(first) => {
                        return Err(PrivateContainerdError::CrashLoop {
                            config: self.config.clone(),
                            log: self.log_tail(30),
                        });
                    }
                    Some(_) => {}
                }
                if answers(&self.socket).await {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(PrivateContainerdError::NotReady {
                    socket: self.socket.clone(),
                    timeout,
                    log: self.log_tail(30),
                });
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Kills everything synchronously: containerd, its shims (found by our socket on their command line)
    /// and the containers whose runc state lives under our `/run`. Idempotent.
    pub fn kill_all(&mut self) {
        let mut victims = Vec::new();
        if let Some(mut child) = self.supervisor.take() {
            let _ = std::fs::write(&self.layout.stop_marker, b"");
            // containerd is in the supervisor's process group but not its zombie to wait for: watch its pid.
            victims.extend(self.containerd_pid());
            kill_group(&mut child);
        }
        // Containers first: with their shim gone they would be orphaned, not killed.
        for state in runc_states(&self.layout.run) {
            if let Some(pid) = state.live_init_pid() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                victims.push(pid);
            }
        }
        for pid in shims_of(&self.socket) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            victims.push(pid);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        let alive = |victims: &[i32]| -> Vec<i32> {
            victims
                .iter()
                .copied()
                .filter(|p| Path::new(&format!("/proc/{p}")).exists())
                .collect()
        };
        let mut left = alive(&victims);
        while !left.is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
            left = alive(&left);
        }
        if !left.is_empty() {
            // Killed but not gone (a zombie nobody reaps, a process stuck in the kernel): said, not
            // hidden, so a leftover is traced back here.
            tracing::warn!(pids = ?left, "private containerd: killed processes still present after 3 s");
        }
        // runc leaves the cgroups of killed containers behind; they are empty now.
        for state in runc_states(&self.layout.run) {
            for path in state.cgroup_paths {
                let _ = std::fs::remove_dir(path);
            }
        }
        let _ = std::fs::remove_file(&self.layout.pidfile);
    }
}

impl Drop for PrivateContainerd {
    fn drop(&mut self) {
        self.kill_all();
    }
}

fn kill_group(child: &mut Child) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// containerd answers `Version`, and its CRI plugin (if loaded) has finished initializing: until then
/// every CRI call fails with "server is not initialized yet".
async fn answers(socket: &Path) -> bool {
    let probe = async {
        let channel = containerd_client::connect(socket).await.ok()?;
        containerd_client::services::v1::version_client::VersionClient::new(channel.clone())
            .version(())
            .await
            .ok()?;
        let cri = k8s_cri::v1::runtime_service_client::RuntimeServiceClient::new(channel)
            .version(k8s_cri::v1::VersionRequest {
                version: "v1".into(),
            })
            .await;
        match cri {
            Ok(_) => Some(()),
            Err(s) if s.code() == tonic::Code::Unimplemented => Some(()),
            Err(_) => None,
        }
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), probe).await,
        Ok(Some(_))
    )
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The last `lines` lines of the log, preceded by the last few error/fatal/exit lines that fell out of
/// them: the supervisor restarts a containerd that exits, and the next start's plugin lines would
/// otherwise push the reason out of the tail.
fn log_tail(path: &Path, lines: usize) -> String {
    const REASONS: usize = 5;
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    // containerd's own exit message (`containerd: ...`) is not a logrus line.
    let is_reason = |l: &&&str| {
        l.contains("level=fatal") || l.contains("level=error") || !l.starts_with("time=")
    };
    let mut earlier: Vec<&str> = all[..start]
        .iter()
        .rev()
        .filter(is_reason)
        .take(REASONS)
        .copied()
        .collect();
    earlier.reverse();
    let tail = all[start..].join("\n");
    if earlier.is_empty() {
        tail
    } else {
        format!("{}\n...\n{tail}", earlier.join("\n"))
    }
}

fn write_scripts(
    layout: &PrivateLayout,
    config: &Path,
    socket: &Path,
    launch: &Launch,
) -> Result<(), PrivateContainerdError> {
    let path: String = std::iter::once(&layout.bin)
        .chain(&launch.path_prefix)
        .map(|d| format!("{}:", sh_quote(d)))
        .collect();
    let supervisor = format!(
        r#"# containerd supervisor (written by noded): runs inside a private mount namespace.
mount --bind {run} /run || exit 1
# Per-handler shims dropped into <dir>/bin are found before anything else.
PATH={path}"$PATH"
export PATH
while :; do
  {containerd} --config {config} >>{log} 2>&1 &
  echo $! > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}
  wait $!
  [ -e {stop} ] && exit 0
  # containerd exited on its own or was restarted: start it again (not in a tight loop on a bad config).
  sleep 0.2
done
"#,
        run = sh_quote(&layout.run),
        containerd = sh_quote(&launch.containerd),
        config = sh_quote(config),
        log = sh_quote(&layout.log),
        pidfile = sh_quote(&layout.pidfile),
        stop = sh_quote(&layout.stop_marker),
    );
    let restart = format!(
        r#"#!/bin/sh
# Restarts the private containerd in {dir} (written by noded): its supervisor starts a new containerd as
# soon as the old one exits. Returns once the new one has created its socket and its CRI plugin is ready.
pidfile={pidfile}
sock={sock}
log={logq}
old=$(cat "$pidfile" 2>/dev/null)
if [ -z "$old" ]; then echo "private containerd in {dir} is not running" >&2; exit 1; fi
# The CRI plugin answers "server is not initialized yet" until it has recovered its state, which can be
# after the socket is up; it logs this line right before it becomes ready.
cri_ready() {{ grep -c 'msg="Start streaming server"' "$log" 2>/dev/null || true; }}
cri_before=$(cri_ready)
kill -TERM "$old" 2>/dev/null
i=0
while kill -0 "$old" 2>/dev/null; do
  i=$((i+1))
  if [ "$i" -eq 200 ]; then kill -KILL "$old" 2>/dev/null; fi
  if [ "$i" -ge 400 ]; then echo "containerd $old did not exit" >&2; exit 1; fi
  sleep 0.05
done
i=0
while :; do
  new=$(cat "$pidfile" 2>/dev/null)
  if [ -n "$new" ] && [ "$new" != "$old" ] && [ -S "$sock" ]; then break; fi
  i=$((i+1))
  if [ "$i" -ge 400 ]; then echo "containerd did not come back (see {log})" >&2; exit 1; fi
  sleep 0.05
done
i=0
while [ "$(cri_ready)" -le "$cri_before" ]; do
  i=$((i+1))
  # A config without the CRI plugin never logs it: the socket being up is all there is to wait for.
  if [ "$i" -ge 300 ]; then echo "containerd is up but its CRI plugin did not report ready (see {log})" >&2; exit 0; fi
  sleep 0.05
done
sleep 0.05
"#,
        dir = layout.dir.display(),
        pidfile = sh_quote(&layout.pidfile),
        sock = sh_quote(socket),
        log = layout.log.display(),
        logq = sh_quote(&layout.log),
    );
    std::fs::write(&layout.supervisor_script, supervisor)
        .map_err(io_err(&layout.supervisor_script))?;
    std::fs::write(&layout.restart_script, restart).map_err(io_err(&layout.restart_script))?;
    std::fs::set_permissions(
        &layout.restart_script,
        std::fs::Permissions::from_mode(0o755),
    )
    .map_err(io_err(&layout.restart_script))?;
    Ok(())
}

/// The bits of runc's `state.json` needed to kill a container and remove its cgroups.
struct RuncState {
    init_pid: i32,
    init_start: u64,
    cgroup_paths: Vec<PathBuf>,
}

impl RuncState {
    /// The init PID if that process still exists and is the same process (start time matches).
    fn live_init_pid(&self) -> Option<i32> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.init_pid)).ok()?;
        // Field 22 (starttime) counted after the `(comm)` field, which may contain spaces.
        let after = stat.rsplit_once(')')?.1;
        let start: u64 = after.split_whitespace().nth(19)?.parse().ok()?;
        (start == self.init_start).then_some(self.init_pid)
    }
}

fn runc_states(run: &Path) -> Vec<RuncState> {
    let mut out = Vec::new();
    let Ok(namespaces) = std::fs::read_dir(run.join("containerd/runc")) else {
        return out;
    };
    for ns in namespaces.flatten() {
        let Ok(containers) = std::fs::read_dir(ns.path()) else {
            continue;
        };
        for c in containers.flatten() {
            let Ok(text) = std::fs::read_to_string(c.path().join("state.json")) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) else {
                continue;
            };
            let init_pid = v["init_process_pid"].as_i64().unwrap_or(0);
            let init_start = v["init_process_start"].as_u64().unwrap_or(0);
            let cgroup_paths = v["cgroup_paths"]
                .as_object()
                .map(|m| {
                    m.values()
                        .filter_map(|p| p.as_str().map(PathBuf::from))
                        .collect()
                })
                .unwrap_or_default();
            if let Ok(init_pid) = i32::try_from(init_pid)
                && init_pid > 0
            {
                out.push(RuncState {
                    init_pid,
                    init_start,
                    cgroup_paths,
                });
            }
        }
    }
    out
}

/// Shim processes started by the containerd listening on `socket` (they carry `-address <socket>`).
fn shims_of(socket: &Path) -> Vec<i32> {
    let want = socket.to_string_lossy();
    crate::proctable::pids_where(Path::new("/proc"), |argv| {
        let is_shim = argv.first().is_some_and(|a| a.contains("containerd-shim"));
        is_shim && argv.windows(2).any(|w| w[0] == "-address" && w[1] == want)
    })
}
