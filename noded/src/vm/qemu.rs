//! The QEMU backend: command lines, the process, and template save/restore over QMP.
//!
//! Save and restore are what Kata's VM factory does (DESIGN §6): pause,
//! `migrate-set-capabilities x-ignore-shared` (guest RAM is not copied: it already is the template's
//! file), migrate the device state out; a clone starts with `-incoming defer` and takes it back with
//! `migrate-incoming`. QEMU runs under `-sandbox ...,spawn=deny`, so the state never goes through
//! `exec:` (a shell): it moves over unix sockets in the VM's own directory, on noded's side of which
//! only QEMU's pid is taken.

pub mod qmp;

use std::ffi::OsString;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use tokio::process::{Child, Command};

use self::qmp::{Capability, MigrationInfo, MigrationStatus, Qmp, QmpError};
use super::backend::{
    Accel, Backend, BackendError, Boot, Hypervisor, Identity, Launch, MachineSpec, Mapping, Vm,
    record_spawn,
};
use super::guest::{GuestConsole, GuestError};

pub const QEMU_BINARY: &str = "qemu-system-x86_64";
/// Every QMP command's deadline, and how long a new QEMU may take to open its monitor.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
const QMP_SOCKET: &str = "qmp.sock";
/// Where device state is streamed (template save, clone restore); never handed to callers. As long
/// as `console.sock`, so the path-length check of the other sockets covers it.
const MIGRATION_SOCKET: &str = "migrate.sock";
const LOG_FILE: &str = "qemu.log";
/// Deadline for QEMU to finish sending a template's state once it reported the migration done.
const SAVE_STREAM_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on a template's save (a few ms for the ~50 KB of device state).
const SAVE_TIMEOUT: Duration = Duration::from_secs(60);

/// `qemu-system-x86_64` as noded's VM backend.
#[derive(Debug, Clone)]
pub struct Qemu {
    binary: String,
}

impl Default for Qemu {
    fn default() -> Self {
        Self {
            binary: QEMU_BINARY.into(),
        }
    }
}

impl Qemu {
    async fn start(&self, launch: Launch, incoming: bool) -> Result<QemuVm, BackendError> {
        QemuVm::spawn(&self.binary, launch, incoming, QMP_TIMEOUT).await
    }
}

#[async_trait]
impl Backend for Qemu {
    fn hypervisor(&self) -> Hypervisor {
        Hypervisor::Qemu
    }

    /// `QEMU emulator version 7.2.22 (...)` → the first line.
    async fn version(&self) -> Result<String, BackendError> {
        let failed = |detail: String| BackendError::Version {
            binary: self.binary.clone(),
            detail,
        };
        let out = Command::new(&self.binary)
            .arg("--version")
            .output()
            .await
            .map_err(|e| failed(e.to_string()))?;
        if !out.status.success() {
            return Err(failed(out.status.to_string()));
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string())
    }

    fn machine_args(&self, spec: &MachineSpec, tsc_khz: Option<u64>) -> Vec<String> {
        let mut append = spec.append.clone();
        if let (Accel::Tcg, Some(khz)) = (spec.accel, tsc_khz) {
            // Under TCG the kernel's TSC calibration hangs at random without this (DESIGN §6).
            append.push_str(&format!(" tsc_early_khz={khz}"));
        }
        let mut args = vec![
            "-machine".to_string(),
            format!("q35,accel={},memory-backend=mem0", spec.accel.as_str()),
            "-m".into(),
            format!("{}M", spec.memory_mib),
            "-smp".into(),
            spec.vcpus.to_string(),
        ];
        if spec.accel == Accel::Kvm {
            args.extend(["-cpu".into(), "host".into()]);
        }
        args.extend([
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-initrd".into(),
            spec.initrd.display().to_string(),
            "-append".into(),
            append,
        ]);
        args
    }

    async fn spawn(&self, launch: Launch) -> Result<Box<dyn Vm>, BackendError> {
        Ok(Box::new(self.start(launch, false).await?))
    }

    async fn restore(
        &self,
        launch: Launch,
        state: &Path,
        timeout: Duration,
    ) -> Result<Box<dyn Vm>, BackendError> {
        let mut vm = self.start(launch, true).await?;
        match vm.load_state(state, timeout).await {
            Ok(()) => Ok(Box::new(vm)),
            Err(e) => {
                vm.kill_and_clean().await;
                Err(e)
            }
        }
    }

    fn identify(&self, argv: &[String]) -> Option<Identity> {
        if Hypervisor::of_argv0(argv.first()?) != Some(Hypervisor::Qemu) {
            return None;
        }
        let mut name = None;
        let mut incoming = false;
        let mut shared = false;
        let mut args = argv[1..].iter();
        while let Some(arg) = args.next() {
            // QEMU accepts both `-opt` and `--opt`.
            match arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) {
                Some("incoming") => incoming = true,
                Some("name") => {
                    name = args.next().map(|v| {
                        let v = v.split(',').next().unwrap_or(v);
                        v.strip_prefix("guest=").unwrap_or(v).to_string()
                    });
                }
                Some("object") => {
                    if let Some(v) = args.next()
                        && v.starts_with("memory-backend-file,")
                    {
                        shared = v.split(',').any(|p| p == "share=on");
                    }
                }
                _ => {}
            }
        }
        let boot = match (incoming, shared) {
            (true, _) => Boot::Restore,
            (false, true) => Boot::TemplateSource,
            (false, false) => Boot::Cold,
        };
        Some(Identity { name, boot })
    }
}

/// The per-VM half of the command line.
fn vm_args(launch: &Launch, incoming: bool) -> Vec<OsString> {
    let share = match launch.mapping {
        Mapping::Shared => "on",
        Mapping::Private => "off",
    };
    let mut a: Vec<OsString> = launch.machine_args.iter().map(OsString::from).collect();
    let mut push = |s: String| a.push(OsString::from(s));
    // seccomp: QEMU runs as root and parses guest-controlled device state. spawn=deny is
    // possible because state moves over unix sockets noded holds, never `exec:` (a shell).
    push("-sandbox".into());
    push("on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny".into());
    push("-object".into());
    push(format!(
        "memory-backend-file,id=mem0,size={}M,mem-path={},share={share}",
        launch.memory_mib,
        launch.memory_file.display()
    ));
    push("-device".into());
    push(format!("vmgenid,guid={}", launch.vmgenid));
    push("-name".into());
    push(format!("{},process={}", launch.name, launch.name));
    push("-qmp".into());
    push(format!(
        "unix:{},server=on,wait=off",
        launch.dir.join(QMP_SOCKET).display()
    ));
    push("-chardev".into());
    push(format!(
        "socket,id=ser0,path={},server=on,wait=off",
        launch.console_socket().display()
    ));
    push("-serial".into());
    push("chardev:ser0".into());
    if incoming {
        push("-S".into());
        push("-incoming".into());
        push("defer".into());
    }
    a
}

/// A running QEMU process that noded owns. Dropping it kills the process.
struct QemuVm {
    launch: Launch,
    child: Child,
    qmp: Option<Qmp>,
    console: Option<GuestConsole>,
}

impl QemuVm {
    /// Spawns QEMU and connects QMP (waiting for its socket). The console is connected too, before the
    /// guest can say anything, so no answer is lost.
    async fn spawn(
        binary: &str,
        launch: Launch,
        incoming: bool,
        timeout: Duration,
    ) -> Result<Self, BackendError> {
        let qmp_path = launch.socket(QMP_SOCKET)?;
        launch.socket(super::backend::CONSOLE_SOCKET)?;
        std::fs::create_dir_all(&launch.dir).map_err(|source| BackendError::Io {
            path: launch.dir.clone(),
            source,
        })?;
        let log_path = launch.dir.join(LOG_FILE);
        let log = std::fs::File::create(&log_path).map_err(|source| BackendError::Io {
            path: log_path,
            source,
        })?;
        let mut cmd = Command::new(binary);
        if launch.dies_with_noded {
            super::backend::die_with_spawner(&mut cmd);
        }
        let child = cmd
            .args(vm_args(&launch, incoming))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            // Its own process group: a signal to noded's group (Ctrl-C, `kill -- -<pgid>`) must not
            // end a VM in use, which outlives noded.
            .process_group(0)
            .spawn()
            .map_err(|source| BackendError::Spawn {
                binary: binary.into(),
                hint: "install Debian's qemu-system-x86",
                source,
            })?;
        let mut vm = QemuVm {
            launch,
            child,
            qmp: None,
            console: None,
        };
        // Recorded before anything else can fail (dropping the Child kills QEMU): the record is how
        // a restarted noded finds this process, never its command line.
        if let Err(e) = record_spawn(&vm.launch, vm.child.id()) {
            if let Some(status) = vm.child.try_wait().ok().flatten() {
                return Err(vm.exited(status.to_string()));
            }
            return Err(e);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(status) = vm.child.try_wait().ok().flatten() {
                return Err(vm.exited(status.to_string()));
            }
            if qmp_path.exists() {
                match Qmp::connect(&qmp_path, timeout).await {
                    Ok(q) => {
                        vm.qmp = Some(q);
                        // A wrapper script may have exec'd QEMU since the spawn: record what runs now.
                        if let Err(e) = record_spawn(&vm.launch, vm.child.id()) {
                            tracing::debug!(vm = %vm.launch.name, error = %e, "VM record not refreshed");
                        }
                        break;
                    }
                    Err(QmpError::Connect { .. }) => {}
                    Err(source) => return Err(vm.control_error(source)),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(BackendError::NoSocket {
                    name: vm.launch.name.clone(),
                    what: "QMP socket",
                    timeout,
                });
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        // QEMU creates the chardev sockets before the monitor, so the console is listening by now.
        let console = GuestConsole::connect(&vm.launch.console_socket())
            .await
            .map_err(|source| BackendError::Guest {
                name: vm.launch.name.clone(),
                source,
            })?;
        vm.console = Some(console);
        Ok(vm)
    }

    fn exited(&self, status: String) -> BackendError {
        let mut stderr = crate::config::one_line(
            &std::fs::read_to_string(self.launch.dir.join(LOG_FILE)).unwrap_or_default(),
        );
        if let Some(c) = &self.console {
            let out = c.last_output();
            if !out.is_empty() {
                stderr.push_str(&format!("; guest console: {out}"));
            }
        }
        BackendError::Exited {
            name: self.launch.name.clone(),
            program: "QEMU",
            status,
            stderr,
        }
    }

    /// The error to report for `source`, naming the exit status if QEMU died.
    fn control_error(&mut self, source: QmpError) -> BackendError {
        if let Some(status) = self.child.try_wait().ok().flatten() {
            return self.exited(status.to_string());
        }
        BackendError::Control {
            name: self.launch.name.clone(),
            source: Box::new(source),
        }
    }

    /// Runs `f` on the QMP connection; a failure is reported by [`QemuVm::control_error`].
    async fn qmp<T>(
        &mut self,
        f: impl AsyncFnOnce(&mut Qmp) -> Result<T, QmpError>,
    ) -> Result<T, BackendError> {
        let r = match self.qmp.as_mut() {
            Some(q) => f(q).await,
            None => Err(QmpError::Closed {
                command: "(connection already handed off)".into(),
            }),
        };
        r.map_err(|e| self.control_error(e))
    }

    /// Loads a template's device state into this `-incoming defer` QEMU, bounded by `timeout`.
    async fn load_state(&mut self, state: &Path, timeout: Duration) -> Result<(), BackendError> {
        let channel = self.launch.socket(MIGRATION_SOCKET)?;
        // QEMU listens on a socket in the VM's own directory and noded streams the state into it.
        let uri = format!("unix:{}", channel.display());
        self.qmp(async |q| {
            q.migrate_set_capability(Capability::XIgnoreShared, true, QMP_TIMEOUT)
                .await?;
            q.migrate_incoming(&uri, QMP_TIMEOUT).await
        })
        .await?;
        let sent = tokio::time::timeout(timeout, send_state(state, &channel))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("QEMU did not take the device state within {timeout:?}"),
                ))
            });
        let _ = std::fs::remove_file(&channel);
        sent.map_err(|source| BackendError::Io {
            path: state.to_path_buf(),
            source,
        })?;
        let info = self
            .qmp(async |q| q.wait_migration(timeout, QMP_TIMEOUT).await)
            .await?;
        self.completed(info, |name, outcome| BackendError::Restore {
            name,
            outcome,
        })
    }

    fn completed(
        &self,
        info: MigrationInfo,
        err: impl FnOnce(String, String) -> BackendError,
    ) -> Result<(), BackendError> {
        if info.status == Some(MigrationStatus::Completed) {
            return Ok(());
        }
        Err(err(
            self.launch.name.clone(),
            format!("{:?}: {}", info.status, info.error_desc.unwrap_or_default()),
        ))
    }

    /// Kills QEMU and waits for it, then removes its socket directory.
    async fn kill_and_clean(mut self) {
        self.qmp = None;
        self.console = None;
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        // The directory, then the cgroup its spawn record names.
        super::reap::remove_vm_dir(&self.launch.dir);
    }
}

#[async_trait]
impl Vm for QemuVm {
    fn launch(&self) -> &Launch {
        &self.launch
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn console(&mut self) -> Result<&mut GuestConsole, BackendError> {
        let name = self.launch.name.clone();
        self.console.as_mut().ok_or(BackendError::Guest {
            name,
            source: GuestError::Closed,
        })
    }

    /// A guest kernel panic ends QEMU (`-no-reboot`): its log and the console's last lines say why.
    async fn console_failed(&mut self, source: GuestError, grace: Duration) -> BackendError {
        if !grace.is_zero() {
            let _ = tokio::time::timeout(grace, self.child.wait()).await;
        }
        if let Some(status) = self.child.try_wait().ok().flatten() {
            return self.exited(status.to_string());
        }
        BackendError::Guest {
            name: self.launch.name.clone(),
            source,
        }
    }

    async fn save(&mut self, state: &Path) -> Result<(), BackendError> {
        // QEMU runs with `-sandbox spawn=deny`, so `exec:cat > state` is out: QEMU sends the state
        // to a socket noded listens on, and only QEMU's own pid is accepted there.
        let channel = self.launch.socket(MIGRATION_SOCKET)?;
        let receiver = receive_state(&channel, state, self.pid())?;
        let uri = format!("unix:{}", channel.display());
        let r = self
            .qmp(async |q| {
                q.stop(QMP_TIMEOUT).await?;
                q.migrate_set_capability(Capability::XIgnoreShared, true, QMP_TIMEOUT)
                    .await?;
                q.migrate(&uri, QMP_TIMEOUT).await?;
                q.wait_migration(SAVE_TIMEOUT, QMP_TIMEOUT).await
            })
            .await;
        let info = match r {
            Ok(i) => i,
            Err(e) => {
                receiver.abort();
                let _ = std::fs::remove_file(&channel);
                return Err(e);
            }
        };
        // QEMU closes the connection once the stream is complete; the file is whole after that.
        let received = tokio::time::timeout(SAVE_STREAM_TIMEOUT, receiver).await;
        let _ = std::fs::remove_file(&channel);
        self.completed(info, |name, outcome| BackendError::Save { name, outcome })?;
        match received {
            Ok(Ok(r)) => r,
            Ok(Err(join)) => Err(std::io::Error::other(join.to_string())),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "QEMU did not close the migration stream",
            )),
        }
        .map_err(|source| BackendError::Io {
            path: state.to_path_buf(),
            source,
        })
    }

    async fn pause(&mut self) -> Result<(), BackendError> {
        self.qmp(async |q| q.stop(QMP_TIMEOUT).await).await
    }

    async fn resume(&mut self) -> Result<(), BackendError> {
        self.qmp(async |q| q.cont(QMP_TIMEOUT).await).await
    }

    fn hand_off(&mut self) {
        // QEMU accepts one client per socket; QMP itself is never handed out (it can run host
        // commands as root through `migrate exec:`).
        self.qmp = None;
        self.console = None;
    }

    async fn quit(mut self: Box<Self>, timeout: Duration) {
        if let Some(q) = self.qmp.as_mut() {
            let _ = q.quit(timeout).await;
        }
        if tokio::time::timeout(timeout, self.child.wait())
            .await
            .is_err()
        {
            tracing::warn!(vm = %self.launch.name, "QEMU did not quit; killing it");
        }
        self.kill_and_clean().await;
    }

    async fn kill(self: Box<Self>) {
        self.kill_and_clean().await;
    }
}

/// Listens on `channel` for QEMU's outgoing migration and writes the stream to `state`. Only QEMU's
/// own pid (SO_PEERCRED) is taken: anything else connecting first is dropped, not recorded.
fn receive_state(
    channel: &Path,
    state: &Path,
    qemu_pid: Option<u32>,
) -> Result<tokio::task::JoinHandle<std::io::Result<()>>, BackendError> {
    let _ = std::fs::remove_file(channel);
    let listener = tokio::net::UnixListener::bind(channel).map_err(|source| BackendError::Io {
        path: channel.to_path_buf(),
        source,
    })?;
    let state = state.to_path_buf();
    Ok(tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let mut conn = loop {
            let (conn, _) = listener.accept().await?;
            let pid = conn.peer_cred().ok().and_then(|c| c.pid());
            if qemu_pid.is_some() && pid.and_then(|p| u32::try_from(p).ok()) == qemu_pid {
                break conn;
            }
            tracing::warn!(
                ?pid,
                "migration socket: connection from another process dropped"
            );
        };
        let mut file = tokio::fs::File::create(&state).await?;
        tokio::io::copy(&mut conn, &mut file).await?;
        file.flush().await
    }))
}

/// Streams the template's device state into QEMU's incoming migration socket.
async fn send_state(state: &Path, channel: &Path) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let bytes = tokio::fs::read(state).await?;
    let mut conn = tokio::net::UnixStream::connect(channel).await?;
    conn.write_all(&bytes).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn launch(mapping: Mapping) -> Launch {
        let spec = MachineSpec {
            accel: Accel::Tcg,
            memory_mib: 128,
            vcpus: 1,
            kernel: PathBuf::from("/k"),
            initrd: PathBuf::from("/i"),
            append: super::super::guest::GUEST_APPEND.into(),
        };
        Launch {
            name: "noded-t-abc".into(),
            dir: PathBuf::from("/run/noded/vms/abc"),
            memory_file: PathBuf::from("/run/noded/templates/t/memory"),
            memory_mib: 128,
            mapping,
            machine_args: Qemu::default().machine_args(&spec, Some(2_000_000)),
            vmgenid: uuid::Uuid::nil(),
            dies_with_noded: false,
        }
    }

    fn argv(launch: &Launch, incoming: bool) -> Vec<String> {
        std::iter::once(QEMU_BINARY.to_string())
            .chain(
                vm_args(launch, incoming)
                    .into_iter()
                    .map(|a| a.to_string_lossy().into_owned()),
            )
            .collect()
    }

    #[test]
    fn rendered_command_lines_read_back_as_their_boot() {
        let q = Qemu::default();
        for (mapping, incoming, boot) in [
            (Mapping::Shared, false, Boot::TemplateSource),
            (Mapping::Private, true, Boot::Restore),
            (Mapping::Private, false, Boot::Cold),
        ] {
            let id = q.identify(&argv(&launch(mapping), incoming));
            assert_eq!(
                id,
                Some(Identity {
                    name: Some("noded-t-abc".into()),
                    boot
                })
            );
        }
        assert_eq!(q.identify(&["/usr/bin/cloud-hypervisor".into()]), None);
        assert_eq!(q.identify(&[]), None);
    }

    #[test]
    fn sandboxed_and_tsc_hint_only_under_tcg() {
        let a = argv(&launch(Mapping::Private), true);
        let sandbox = a.iter().position(|x| x == "-sandbox").expect("-sandbox");
        assert!(a[sandbox + 1].contains("spawn=deny"), "{a:?}");
        assert!(a.iter().any(|x| x.contains("tsc_early_khz=2000000")));
        assert!(!a.iter().any(|x| x.starts_with("exec:")));
        let kvm = MachineSpec {
            accel: Accel::Kvm,
            memory_mib: 128,
            vcpus: 1,
            kernel: PathBuf::from("/k"),
            initrd: PathBuf::from("/i"),
            append: String::new(),
        };
        let m = Qemu::default().machine_args(&kvm, Some(2_000_000));
        assert!(!m.iter().any(|x| x.contains("tsc_early_khz")));
        assert!(m.windows(2).any(|w| w == ["-cpu", "host"]));
    }
}
