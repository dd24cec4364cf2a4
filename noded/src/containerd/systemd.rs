//! Restarting a unit through the host's systemd over D-Bus, in-process.
//!
//! The DaemonSet image has neither `systemctl` nor `busctl`, and its own `/run` says nothing about the
//! host; what it has is the host's system bus socket (mounted at the default path below) and, through
//! hostPID, the host's init at `/proc/1`.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use tracing::{debug, info};
use zbus::zvariant::OwnedObjectPath;

/// Where the DaemonSet mounts the host's system bus socket (also the usual host path).
pub const DEFAULT_SYSTEM_BUS: &str = "unix:path=/run/dbus/system_bus_socket";
pub const DEFAULT_UNIT: &str = "containerd.service";
/// The host's root as a hostPID container sees it: PID 1 is the host's init.
pub const HOST_ROOT: &str = "/proc/1/root";
/// Restarting containerd waits for running shims to be reattached; systemd's own default stop timeout
/// is 90 s, so this leaves room for a slow stop plus the start.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(120);
const SYSTEMD_NAME: &str = "org.freedesktop.systemd1";

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait Manager {
    fn restart_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;

    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        job: zbus::zvariant::ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
}

/// Which systemd, on which bus, restarts which unit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SystemdTarget {
    /// D-Bus address of the system bus; None: `DBUS_SYSTEM_BUS_ADDRESS`, else [`DEFAULT_SYSTEM_BUS`].
    pub bus: Option<String>,
    pub unit: String,
    /// The host's root directory; systemd is the host's init when `<host_root>/run/systemd/system` exists.
    pub host_root: PathBuf,
    /// Upper bound for connecting, the call and the job together.
    pub timeout: Duration,
}

impl Default for SystemdTarget {
    fn default() -> Self {
        Self {
            bus: None,
            unit: DEFAULT_UNIT.to_owned(),
            host_root: PathBuf::from(HOST_ROOT),
            timeout: JOB_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    #[error("cannot connect to the system bus at {address}: {detail}")]
    Connect { address: String, detail: String },
    #[error("systemd RestartUnit(\"{unit}\", \"replace\") on {address} failed: {detail}")]
    Call {
        unit: String,
        address: String,
        detail: String,
    },
    #[error("systemd job {job} restarting {unit} ended with result `{result}` (expected `done`)")]
    JobFailed {
        unit: String,
        job: String,
        result: String,
    },
    #[error("systemd did not finish restarting {unit} within {waited:?} (bus {address})")]
    Timeout {
        unit: String,
        address: String,
        waited: Duration,
    },
    #[error(
        "the system bus at {address} closed before systemd reported the end of job {job} restarting {unit}"
    )]
    SignalsEnded {
        unit: String,
        address: String,
        job: String,
    },
}

fn one_line(e: &impl std::fmt::Display) -> String {
    crate::config::one_line(e.to_string().trim())
}

impl SystemdTarget {
    /// The default target on the bus at `address`.
    pub fn on_bus(address: impl Into<String>) -> Self {
        Self {
            bus: Some(address.into()),
            ..Self::default()
        }
    }

    pub fn bus_address(&self) -> String {
        match &self.bus {
            Some(a) => a.clone(),
            None => std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
                .ok()
                .filter(|a| !a.trim().is_empty())
                .unwrap_or_else(|| DEFAULT_SYSTEM_BUS.to_owned()),
        }
    }

    async fn connect(&self, address: &str) -> Result<zbus::Connection, SystemdError> {
        let fail = |e: zbus::Error| SystemdError::Connect {
            address: address.to_owned(),
            detail: one_line(&e),
        };
        zbus::connection::Builder::address(address)
            .map_err(fail)?
            .build()
            .await
            .map_err(fail)
    }

    /// Whether the host runs systemd: its init's `/run/systemd/system` exists, or systemd's name has an
    /// owner on the bus (either suffices; the second covers a stand-in systemd and hosts whose /proc/1 is
    /// not visible). An unreachable bus counts as no.
    pub async fn host_runs_systemd(&self) -> bool {
        let marker = self.host_root.join("run/systemd/system");
        if marker.is_dir() {
            debug!(marker = %marker.display(), "systemd is the host's init");
            return true;
        }
        let address = self.bus_address();
        let owned = tokio::time::timeout(self.timeout, async {
            let conn = self.connect(&address).await.ok()?;
            let dbus = zbus::fdo::DBusProxy::new(&conn).await.ok()?;
            let name = zbus::names::BusName::try_from(SYSTEMD_NAME).ok()?;
            dbus.name_has_owner(name).await.ok()
        })
        .await
        .ok()
        .flatten()
        .unwrap_or(false);
        debug!(%address, owned, "{SYSTEMD_NAME} on the system bus");
        owned
    }

    /// `RestartUnit(unit, "replace")`, then waits for systemd to report that job finished as `done`.
    pub async fn restart(&self) -> Result<(), SystemdError> {
        let address = self.bus_address();
        tokio::time::timeout(self.timeout, self.restart_inner(&address))
            .await
            .map_err(|_| SystemdError::Timeout {
                unit: self.unit.clone(),
                address: address.clone(),
                waited: self.timeout,
            })?
    }

    async fn restart_inner(&self, address: &str) -> Result<(), SystemdError> {
        let conn = self.connect(address).await?;
        let call_err = |e: zbus::Error| SystemdError::Call {
            unit: self.unit.clone(),
            address: address.to_owned(),
            detail: one_line(&e),
        };
        let manager = ManagerProxy::new(&conn).await.map_err(call_err)?;
        // Subscribed before the call: a fast job may end before the call's reply is read.
        let mut removed = manager.receive_job_removed().await.map_err(call_err)?;
        let job = manager
            .restart_unit(&self.unit, "replace")
            .await
            .map_err(call_err)?;
        info!(unit = %self.unit, job = %job.as_str(), %address, "systemd restart job queued");
        while let Some(signal) = removed.next().await {
            let Ok(args) = signal.args() else { continue };
            if args.job.as_str() != job.as_str() {
                continue;
            }
            return if args.result == "done" {
                info!(unit = %self.unit, job = %job.as_str(), "systemd restart job done");
                Ok(())
            } else {
                Err(SystemdError::JobFailed {
                    unit: self.unit.clone(),
                    job: job.to_string(),
                    result: args.result.to_owned(),
                })
            };
        }
        Err(SystemdError::SignalsEnded {
            unit: self.unit.clone(),
            address: address.to_owned(),
            job: job.to_string(),
        })
    }
}
