//! A real `dbus-daemon` on a private socket in a temp dir, and the `fake-systemd` binary serving
//! `org.freedesktop.systemd1` on it. Dropping either kills its process (and removes the temp dir).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// How long a started daemon may take to say it is ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// A bus where any local user may own any name and send anything: only the test's processes reach its
/// socket, which lives in the test's temp dir.
const CONFIG: &str = r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>@LISTEN@</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
  </policy>
</busconfig>
"#;

/// `dbus-daemon` on PATH. Missing: the test fails under `CI=true`, elsewhere it is skipped with a
/// message (None).
pub fn require_dbus_daemon() -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("dbus-daemon"))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "required component `dbus-daemon` is missing (CI=true: failing instead of skipping; scripts/install-deps.sh installs it)"
        );
        eprintln!("SKIP: `dbus-daemon` not installed");
    }
    found
}

/// Reads the first line a child prints on stdout, or fails after `timeout` (with its stderr).
fn first_line(stdout: ChildStdout, timeout: Duration, what: &str) -> Result<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let mut reader = BufReader::new(stdout);
        let read = reader.read_line(&mut line).map(|_| line);
        let _ = tx.send(read);
        // Keep draining so the child never blocks on a full pipe.
        let _ = std::io::copy(&mut reader, &mut std::io::sink());
    });
    match rx.recv_timeout(timeout) {
        Ok(Ok(line)) if !line.trim().is_empty() => Ok(line.trim().to_owned()),
        Ok(Ok(_)) => bail!("{what} exited before it was ready"),
        Ok(Err(e)) => bail!("reading {what}'s stdout: {e}"),
        Err(_) => bail!("{what} was not ready within {timeout:?}"),
    }
}

fn stop(child: &mut Child) {
    // SIGTERM first: fake-systemd exits cleanly on it; dbus-daemon too.
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    for _ in 0..100 {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s.trim().to_owned()
}

/// A private `dbus-daemon --nofork` listening on `<tmp>/bus.sock`.
pub struct DbusDaemon {
    child: Child,
    address: String,
    dir: tempfile::TempDir,
}

impl DbusDaemon {
    /// Starts the daemon with `binary` (see [`require_dbus_daemon`]) and waits until it prints its address.
    pub fn start(binary: &Path) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("testkit-dbus-")
            .tempdir_in("/tmp")
            .context("create the bus temp dir")?;
        let config = dir.path().join("bus.conf");
        let socket = dir.path().join("bus.sock");
        let listen = format!("unix:path={}", socket.display());
        std::fs::write(&config, CONFIG.replace("@LISTEN@", &listen))
            .with_context(|| format!("write {}", config.display()))?;
        let mut child = Command::new(binary)
            .arg("--nofork")
            .arg("--nopidfile")
            .arg("--nosyslog")
            .arg(format!("--config-file={}", config.display()))
            .arg(format!("--address={listen}"))
            .arg("--print-address=1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {}", binary.display()))?;
        let stdout = child.stdout.take().context("dbus-daemon stdout")?;
        match first_line(stdout, READY_TIMEOUT, "dbus-daemon") {
            Ok(address) => Ok(Self {
                child,
                address,
                dir,
            }),
            Err(e) => {
                stop(&mut child);
                let stderr = stderr_of(&mut child);
                Err(anyhow::anyhow!("{e:#}: {stderr}"))
            }
        }
    }

    /// The address as the daemon printed it (`unix:path=…,guid=…`).
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for DbusDaemon {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// `fake-systemd` owning `org.freedesktop.systemd1` on a [`DbusDaemon`].
pub struct FakeSystemd {
    child: Child,
    log: PathBuf,
}

impl FakeSystemd {
    /// Starts `binary` (testkit's fake-systemd) on `bus` for `unit`, running `restart_command` on
    /// `RestartUnit`; returns once it owns the name. Calls are logged to `log`.
    pub fn start(
        binary: &Path,
        bus: &str,
        unit: &str,
        restart_command: &str,
        log: &Path,
    ) -> Result<Self> {
        let mut child = Command::new(binary)
            .args([
                "--bus",
                bus,
                "--unit",
                unit,
                "--restart-command",
                restart_command,
            ])
            .arg("--log")
            .arg(log)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("spawn {}", binary.display()))?;
        let stdout = child.stdout.take().context("fake-systemd stdout")?;
        match first_line(stdout, READY_TIMEOUT, "fake-systemd") {
            Ok(line) if line == "ready" => Ok(Self {
                child,
                log: log.to_path_buf(),
            }),
            Ok(other) => {
                stop(&mut child);
                bail!("fake-systemd printed `{other}` instead of `ready`")
            }
            Err(e) => {
                stop(&mut child);
                let stderr = stderr_of(&mut child);
                Err(anyhow::anyhow!("{e:#}: {stderr}"))
            }
        }
    }

    /// Every line of the call log so far.
    pub fn log_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// The (unit, mode) of every `RestartUnit` call so far.
    pub fn restart_calls(&self) -> Vec<(String, String)> {
        self.log_lines()
            .iter()
            .filter_map(|l| {
                let mut words = l.strip_prefix("RestartUnit ")?.split(' ');
                Some((words.next()?.to_owned(), words.next()?.to_owned()))
            })
            .collect()
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for FakeSystemd {
    fn drop(&mut self) {
        stop(&mut self.child);
    }
}

/// A private bus with a stand-in systemd on it. Field order is drop order: systemd goes first, then
/// the bus (and its temp dir, which holds the call log).
pub struct SystemdBus {
    pub systemd: FakeSystemd,
    pub bus: DbusDaemon,
}

impl SystemdBus {
    /// A real dbus-daemon (`dbus_daemon`, see [`require_dbus_daemon`]) with fake-systemd (`fake_bin`)
    /// restarting `unit` through `restart_command`; the call log is `<bus dir>/systemd.log`.
    pub fn start(
        dbus_daemon: &Path,
        fake_bin: &Path,
        unit: &str,
        restart_command: &str,
    ) -> Result<Self> {
        let bus = DbusDaemon::start(dbus_daemon)?;
        let log = bus.dir().join("systemd.log");
        let systemd = FakeSystemd::start(fake_bin, bus.address(), unit, restart_command, &log)?;
        Ok(Self { systemd, bus })
    }

    pub fn address(&self) -> &str {
        self.bus.address()
    }
}
