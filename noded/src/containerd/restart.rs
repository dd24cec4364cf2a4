//! Restarting containerd, only when the effective config changed, and waiting for it to come back.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::{Duration, Instant};

use tracing::{info, warn};

/// `--restart auto|never|systemd|command:CMD`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Restart {
    /// systemd when the host runs it, otherwise report that a restart is needed.
    Auto,
    Never,
    Systemd,
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
            "auto" => Ok(Self::Auto),
            "never" => Ok(Self::Never),
            "systemd" => Ok(Self::Systemd),
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
    #[error("containerd socket {socket} did not answer within {waited:?} after the restart")]
    SocketTimeout { socket: PathBuf, waited: Duration },
}

const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
pub const SOCKET_TIMEOUT: Duration = Duration::from_secs(30);

impl Restart {
    /// The method that will actually run, or None when containerd is not to be restarted.
    fn resolve(&self) -> Option<Restart> {
        match self {
            Self::Never => None,
            Self::Auto if Path::new("/run/systemd/system").exists() => Some(Self::Systemd),
            Self::Auto => None,
            other => Some(other.clone()),
        }
    }

    /// Restarts containerd. Ok(false) when the strategy says not to (the caller reports that the new
    /// handlers are not loaded until containerd restarts).
    pub async fn run(&self) -> Result<bool, RestartError> {
        let Some(method) = self.resolve() else {
            return Ok(false);
        };
        let (program, args): (&str, Vec<String>) = match &method {
            // systemd's D-Bus API (busctl is part of systemd itself); systemctl below if that fails.
            Self::Systemd => (
                "busctl",
                [
                    "call",
                    "org.freedesktop.systemd1",
                    "/org/freedesktop/systemd1",
                    "org.freedesktop.systemd1.Manager",
                    "RestartUnit",
                    "ss",
                    "containerd.service",
                    "replace",
                ]
                .map(String::from)
                .to_vec(),
            ),
            Self::Command(cmd) => ("sh", vec!["-c".into(), cmd.clone()]),
            Self::Auto | Self::Never => return Ok(false),
        };
        info!(method = ?method, "restarting containerd");
        let first = run_command(program, &args).await;
        match (&method, first) {
            (_, Ok(())) => Ok(true),
            (Self::Systemd, Err(e)) => {
                warn!("D-Bus restart failed ({e}); trying systemctl");
                run_command(
                    "systemctl",
                    &["restart".into(), "containerd.service".into()],
                )
                .await
                .map(|()| true)
            }
            (_, Err(e)) => Err(e),
        }
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
}
