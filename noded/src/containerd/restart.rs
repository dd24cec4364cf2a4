//! Restarting containerd, only when the effective config changed, and waiting for it to come back.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use tracing::info;

use super::systemd::{SystemdError, SystemdTarget};

/// `--restart auto|never|systemd|command:CMD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// systemd when the host runs it (see [`SystemdTarget::host_runs_systemd`]), otherwise report that a
    /// restart is needed.
    Auto(SystemdTarget),
    Never,
    /// `RestartUnit` on the host's systemd over D-Bus, waiting for the job to finish.
    Systemd(SystemdTarget),
    /// A shell command that restarts containerd and returns once it has (exit 0).
    Command(String),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--restart `{0}`: expected auto, never, systemd or command:CMD")]
pub struct BadRestart(pub String);

impl FromStr for Restart {
    type Err = BadRestart;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Self::auto()),
            "never" => Ok(Self::Never),
            "systemd" => Ok(Self::systemd()),
            _ => match s.strip_prefix("command:") {
                Some(cmd) if !cmd.trim().is_empty() => Ok(Self::Command(cmd.to_owned())),
                _ => Err(BadRestart(s.to_owned())),
            },
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestartError {
    #[error("restart command `{command}` failed: {detail}")]
    Command { command: String, detail: String },
    #[error(transparent)]
    Systemd(#[from] SystemdError),
    #[error("containerd socket {socket} did not answer within {waited:?} after the restart")]
    SocketTimeout { socket: PathBuf, waited: Duration },
}

const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

impl Restart {
    /// `auto` on the host's system bus for containerd.service.
    pub fn auto() -> Self {
        Self::Auto(SystemdTarget::default())
    }

    /// `systemd` on the host's system bus for containerd.service.
    pub fn systemd() -> Self {
        Self::Systemd(SystemdTarget::default())
    }

    /// The method that will actually run, or None when containerd is not to be restarted.
    pub async fn resolve(&self) -> Option<Restart> {
        match self {
            Self::Never => None,
            Self::Auto(target) if target.host_runs_systemd().await => {
                Some(Self::Systemd(target.clone()))
            }
            Self::Auto(_) => None,
            other => Some(other.clone()),
        }
    }

    /// Restarts containerd. Ok(false) when the strategy says not to (the caller reports that the new
    /// handlers are not loaded until containerd restarts).
    pub async fn run(&self) -> Result<bool, RestartError> {
        let Some(method) = self.resolve().await else {
            return Ok(false);
        };
        info!(method = ?method, "restarting containerd");
        match &method {
            Self::Systemd(target) => target.restart().await?,
            Self::Command(cmd) => run_command("sh", &["-c".into(), cmd.clone()]).await?,
            Self::Auto(_) | Self::Never => return Ok(false),
        }
        Ok(true)
    }
}

async fn run_command(program: &str, args: &[String]) -> Result<(), RestartError> {
    let command = std::iter::once(program.to_owned())
        .chain(args.iter().cloned())
        .collect::<Vec<_>>()
        .join(" ");
    let fail = |detail: String| RestartError::Command {
        command: command.clone(),
        detail,
    };
    let child = tokio::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(COMMAND_TIMEOUT, child)
        .await
        .map_err(|_| fail(format!("no exit within {COMMAND_TIMEOUT:?}")))?
        .map_err(|e| fail(e.to_string()))?;
    if out.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        Err(fail(format!(
            "{}: {}",
            out.status,
            crate::config::one_line(stderr.trim())
        )))
    }
}

/// Waits until containerd's gRPC socket accepts connections.
pub async fn wait_for_socket(socket: &Path, timeout: Duration) -> Result<(), RestartError> {
    let start = Instant::now();
    loop {
        if tokio::net::UnixStream::connect(socket).await.is_ok() {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(RestartError::SocketTimeout {
                socket: socket.to_path_buf(),
                waited: timeout,
            });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_strategies() {
        assert_eq!("never".parse::<Restart>(), Ok(Restart::Never));
        assert_eq!("auto".parse::<Restart>(), Ok(Restart::auto()));
        assert_eq!(
            "systemd".parse::<Restart>(),
            Ok(Restart::Systemd(SystemdTarget {
                bus: None,
                unit: "containerd.service".into(),
                host_root: "/proc/1/root".into(),
                timeout: Duration::from_secs(120),
            }))
        );
        assert_eq!(
            "command:systemctl restart containerd".parse::<Restart>(),
            Ok(Restart::Command("systemctl restart containerd".into()))
        );
        assert!("command:".parse::<Restart>().is_err());
        assert!("reboot".parse::<Restart>().is_err());
    }

    #[tokio::test]
    async fn failing_command_is_an_error_with_its_stderr() {
        let err = Restart::Command("echo boom >&2; exit 3".into())
            .run()
            .await
            .expect_err("exit 3 must fail");
        assert!(err.to_string().contains("boom"), "{err}");
    }

    fn target_in(dir: &std::path::Path) -> SystemdTarget {
        SystemdTarget {
            // Nothing listens there: the bus is unreachable.
            bus: Some(format!("unix:path={}", dir.join("no-bus").display())),
            host_root: dir.to_path_buf(),
            timeout: Duration::from_secs(5),
            ..SystemdTarget::default()
        }
    }

    #[tokio::test]
    async fn auto_without_systemd_on_the_host_restarts_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let auto = Restart::Auto(target_in(dir.path()));
        assert_eq!(auto.resolve().await, None);
        assert!(!auto.run().await.expect("no restart is not an error"));
    }

    #[tokio::test]
    async fn auto_follows_the_host_init_marker() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("run/systemd/system")).expect("marker");
        let target = target_in(dir.path());
        assert_eq!(
            Restart::Auto(target.clone()).resolve().await,
            Some(Restart::Systemd(target))
        );
    }

    #[tokio::test]
    async fn systemd_on_an_unreachable_bus_is_a_one_line_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let target = target_in(dir.path());
        let address = target.bus_address();
        let err = Restart::Systemd(target)
            .run()
            .await
            .expect_err("no bus there");
        let msg = err.to_string();
        assert!(msg.contains(&address), "{msg}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
    }
}
