//! Async QMP client over a unix socket.
//!
//! Why a small typed client instead of the `qapi` crate: noded needs nine commands, and every one of
//! them must carry a timeout (an empty migration state file leaves QEMU in `inmigrate` forever and
//! QEMU never answers a hung `query-migrate` with an error). `qapi` generates bindings for the whole
//! QAPI schema of one QEMU release (a large, slow-to-compile dependency tied to that schema), its
//! tokio support goes through its own stream/event abstraction without per-call deadlines, and it would
//! still need the same timeout wrapper around each call. A hundred lines of serde over a line-delimited
//! JSON socket give typed replies for exactly what we use, skip asynchronous events correctly and make
//! the deadline part of every call's signature.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket {path}: cannot connect: {source}")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP `{command}`: no answer within {timeout:?} (QEMU hung or died)")]
    Timeout { command: String, timeout: Duration },
    #[error("QMP `{command}`: connection error: {source}")]
    Io {
        command: String,
        source: std::io::Error,
    },
    #[error("QMP `{command}`: QEMU closed the connection (process exited?)")]
    Closed { command: String },
    #[error("QMP `{command}`: QEMU returned {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP `{command}`: unexpected reply {reply}: {source}")]
    Decode {
        command: String,
        reply: String,
        source: serde_json::Error,
    },
}

/// `query-status` reply.
#[derive(Debug, Clone, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    pub status: String,
}

/// `query-migrate` reply (only the fields noded acts on).
#[derive(Debug, Clone, Deserialize)]
pub struct MigrationInfo {
    /// Absent before any migration was started.
    #[serde(default)]
    pub status: Option<MigrationStatus>,
    #[serde(rename = "error-desc", default)]
    pub error_desc: Option<String>,
    #[serde(rename = "total-time", default)]
    pub total_time_ms: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationStatus {
    None,
    Setup,
    Cancelling,
    Cancelled,
    Active,
    PostcopyActive,
    PostcopyPaused,
    PostcopyRecover,
    Completed,
    Failed,
    Colo,
    PreSwitchover,
    Device,
    WaitUnplug,
}

impl MigrationStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

#[derive(Debug, Clone, Copy)]
pub enum Capability {
    /// RAM blocks backed by a shared file are not copied: the whole point of templates.
    XIgnoreShared,
}

impl Capability {
    fn name(self) -> &'static str {
        match self {
            Self::XIgnoreShared => "x-ignore-shared",
        }
    }
}

/// One QMP session. Calls are sequential (`&mut self`), which is all a VM's owner needs.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_id: u64,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities, all within `timeout`.
    pub async fn connect(path: &Path, timeout: Duration) -> Result<Self, QmpError> {
        let stream = tokio::time::timeout(timeout, UnixStream::connect(path))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "connect".into(),
                timeout,
            })?
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            next_id: 1,
        };
        let greeting = tokio::time::timeout(timeout, qmp.read_message("greeting"))
            .await
            .map_err(|_| QmpError::Timeout {
                command: "greeting".into(),
                timeout,
            })??;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Closed {
                command: "greeting".into(),
            });
        }
        qmp.execute_raw("qmp_capabilities", None, timeout).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self, command: &str) -> Result<Value, QmpError> {
        let mut line = String::new();
        loop {
            line.clear();
            let n = self
                .reader
                .read_line(&mut line)
                .await
                .map_err(|source| QmpError::Io {
                    command: command.into(),
                    source,
                })?;
            if n == 0 {
                return Err(QmpError::Closed {
                    command: command.into(),
                });
            }
            let trimmed = line.trim();
            if trimmed.is_empty() {
                continue;
            }
            return serde_json::from_str(trimmed).map_err(|source| QmpError::Decode {
                command: command.into(),
                reply: trimmed.into(),
                source,
            });
        }
    }

    /// Sends one command and returns its `return` value. Events that arrive in between are logged and
    /// skipped; a reply carrying another id (a previous call that timed out) is skipped too.
    pub async fn execute_raw(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QmpError> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(b'\n');
        let fut = async {
            self.writer
                .write_all(&bytes)
                .await
                .map_err(|source| QmpError::Io {
                    command: command.into(),
                    source,
                })?;
            loop {
                let v = self.read_message(command).await?;
                if let Some(event) = v.get("event") {
                    tracing::debug!(qmp_event = %event, "QMP event");
                    continue;
                }
                if v.get("id").and_then(Value::as_u64) != Some(id) {
                    continue;
                }
                if let Some(err) = v.get("error") {
                    return Err(QmpError::Command {
                        command: command.into(),
                        class: err
                            .get("class")
                            .and_then(Value::as_str)
                            .unwrap_or("Error")
                            .into(),
                        desc: err
                            .get("desc")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .into(),
                    });
                }
                return Ok(v.get("return").cloned().unwrap_or(Value::Null));
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| QmpError::Timeout {
                command: command.into(),
                timeout,
            })?
    }

    async fn execute<T: DeserializeOwned>(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<T, QmpError> {
        let v = self.execute_raw(command, arguments, timeout).await?;
        serde_json::from_value(v.clone()).map_err(|source| QmpError::Decode {
            command: command.into(),
            reply: v.to_string(),
            source,
        })
    }

    pub async fn stop(&mut self, timeout: Duration) -> Result<(), QmpError> {
        self.execute_raw("stop", None, timeout).await.map(drop)
    }

    pub async fn cont(&mut self, timeout: Duration) -> Result<(), QmpError> {
        self.execute_raw("cont", None, timeout).await.map(drop)
    }

    pub async fn quit(&mut self, timeout: Duration) -> Result<(), QmpError> {
        match self.execute_raw("quit", None, timeout).await {
            // QEMU may close the socket before its reply reaches us.
            Ok(_) | Err(QmpError::Closed { .. }) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn query_status(&mut self, timeout: Duration) -> Result<StatusInfo, QmpError> {
        self.execute("query-status", None, timeout).await
    }

    pub async fn query_migrate(&mut self, timeout: Duration) -> Result<MigrationInfo, QmpError> {
        self.execute("query-migrate", None, timeout).await
    }

    pub async fn migrate_set_capability(
        &mut self,
        capability: Capability,
        state: bool,
        timeout: Duration,
    ) -> Result<(), QmpError> {
        let args = json!({ "capabilities": [{ "capability": capability.name(), "state": state }] });
        self.execute_raw("migrate-set-capabilities", Some(args), timeout)
            .await
            .map(drop)
    }

    pub async fn migrate(&mut self, uri: &str, timeout: Duration) -> Result<(), QmpError> {
        self.execute_raw("migrate", Some(json!({ "uri": uri })), timeout)
            .await
            .map(drop)
    }

    pub async fn migrate_incoming(&mut self, uri: &str, timeout: Duration) -> Result<(), QmpError> {
        self.execute_raw("migrate-incoming", Some(json!({ "uri": uri })), timeout)
            .await
            .map(drop)
    }

    /// Polls `query-migrate` until the migration reaches a terminal state or `deadline` passes; every
    /// poll has its own `call_timeout`.
    pub async fn wait_migration(
        &mut self,
        deadline: Duration,
        call_timeout: Duration,
    ) -> Result<MigrationInfo, QmpError> {
        let start = tokio::time::Instant::now();
        let mut interval = Duration::from_micros(500);
        loop {
            let info = self.query_migrate(call_timeout).await?;
            if info.status.is_some_and(MigrationStatus::is_terminal) {
                return Ok(info);
            }
            if start.elapsed() >= deadline {
                return Err(QmpError::Timeout {
                    command: format!("query-migrate (last status {:?})", info.status),
                    timeout: deadline,
                });
            }
            tokio::time::sleep(interval).await;
            interval = (interval * 2).min(Duration::from_millis(20));
        }
    }
}
