//! A stand-in `org.freedesktop.systemd1` on a D-Bus bus: `Manager.RestartUnit(name, mode)` for one
//! configured unit runs a shell command asynchronously and reports the job's end with `JobRemoved`, like
//! systemd does; any other unit is `org.freedesktop.systemd1.NoSuchUnit`. Every call is appended as one
//! line to the `--log` file, which tests read.

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{Context, Result};
use clap::Parser;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath};

#[derive(Parser, Debug)]
#[command(about = "Stand-in systemd Manager on a D-Bus bus, for noded's tests")]
struct Args {
    /// D-Bus address of the bus to serve on.
    #[arg(long, env = "DBUS_SYSTEM_BUS_ADDRESS")]
    bus: String,
    /// The one unit this systemd knows.
    #[arg(long, default_value = "containerd.service")]
    unit: String,
    /// Shell command (`sh -c`) run for RestartUnit of --unit; exit 0 ends the job as "done".
    #[arg(long)]
    restart_command: String,
    /// Every call and job end is appended here, one line each.
    #[arg(long)]
    log: PathBuf,
}

#[derive(zbus::DBusError, Debug)]
#[zbus(prefix = "org.freedesktop.systemd1")]
enum ManagerError {
    #[zbus(error)]
    ZBus(zbus::Error),
    NoSuchUnit(String),
}

struct Manager {
    unit: String,
    restart_command: String,
    log: PathBuf,
    next_job: AtomicU32,
}

/// One `write` of the whole line in append mode: lines from the call and from the job never interleave.
fn append(log: &std::path::Path, line: &str) {
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| f.write_all(format!("{line}\n").as_bytes()));
    if let Err(e) = written {
        eprintln!("fake-systemd: cannot append to {}: {e}", log.display());
    }
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl Manager {
    async fn restart_unit(
        &self,
        name: String,
        mode: String,
        #[zbus(signal_emitter)] emitter: SignalEmitter<'_>,
    ) -> Result<OwnedObjectPath, ManagerError> {
        append(&self.log, &format!("RestartUnit {name} {mode}"));
        if name != self.unit {
            return Err(ManagerError::NoSuchUnit(format!("Unit {name} not found.")));
        }
        let id = self.next_job.fetch_add(1, Ordering::SeqCst);
        let job = OwnedObjectPath::try_from(format!("/org/freedesktop/systemd1/job/{id}"))
            .map_err(|e| ManagerError::ZBus(e.into()))?;
        let command = self.restart_command.clone();
        let emitter = emitter.into_owned();
        let job_path = job.clone();
        let log = self.log.clone();
        // The reply (the job path) goes out first; the job runs and ends afterwards, as in systemd.
        tokio::spawn(async move {
            let status = tokio::process::Command::new("sh")
                .args(["-c", &command])
                .stdin(std::process::Stdio::null())
                .status()
                .await;
            let result = match status {
                Ok(s) if s.success() => "done",
                _ => "failed",
            };
            append(
                &log,
                &format!("JobRemoved {id} {} {name} {result}", job_path.as_str()),
            );
            if let Err(e) =
                Manager::job_removed(&emitter, id, job_path.as_ref(), &name, result).await
            {
                append(&log, &format!("JobRemoved emit failed: {e}"));
            }
        });
        Ok(job)
    }

    #[zbus(signal)]
    async fn job_removed(
        emitter: &SignalEmitter<'_>,
        id: u32,
        job: ObjectPath<'_>,
        unit: &str,
        result: &str,
    ) -> zbus::Result<()>;
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.log)
        .with_context(|| format!("open --log {}", args.log.display()))?;
    let manager = Manager {
        unit: args.unit.clone(),
        restart_command: args.restart_command.clone(),
        log: args.log.clone(),
        next_job: AtomicU32::new(1),
    };
    let _conn = zbus::connection::Builder::address(args.bus.as_str())
        .with_context(|| format!("--bus {}", args.bus))?
        .serve_at("/org/freedesktop/systemd1", manager)?
        .name("org.freedesktop.systemd1")?
        .build()
        .await
        .with_context(|| format!("connect to {} and own org.freedesktop.systemd1", args.bus))?;
    // Ready once the name is owned (build returns after RequestName): tests wait for this line.
    println!("ready");
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = sigterm.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    Ok(())
}
