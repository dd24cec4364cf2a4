//! One real QEMU VM per sandbox, started like Kata's shim does (see `crate::kata_guest`): a clone of
//! the VM factory's template when the config enables templating and the template is there, else a cold
//! boot — the fallback Kata takes silently and noded must notice. The containers still run under runc;
//! the VM is what the host sees of a Kata sandbox (its QEMU process, command line and memory).
//!
//! Only releases written by `FakeKata::write_bootable` (marked by [`BOOTABLE_MARKER`]) boot VMs: the
//! other fake releases name a recording script as their QEMU.
//!
//! QEMU is this shim's child. containerd-shim's SIGCHLD thread reaps every child, so a killed VM is
//! waited for by watching its pid disappear. QEMU is spawned from one long-lived thread through
//! `setpriv --pdeathsig KILL`, so it dies with the shim even if the shim is SIGKILLed (a parent-death
//! signal fires when the spawning *thread* exits, hence not from a short-lived RPC thread).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use containerd_shim::{info, warn};

use super::options;
use crate::kata_guest::{self, QemuConfig, Role, VM_RUN_DIR, Vm};

/// Present at the root of a release whose shim boots VMs.
pub const BOOTABLE_MARKER: &str = "boots-vms";

struct Running {
    pid: u32,
    dir: PathBuf,
}

/// The VMs of this shim's sandboxes, by sandbox id.
#[derive(Default)]
pub struct Vms {
    running: Mutex<HashMap<String, Running>>,
}

/// Whether this shim's release boots VMs.
pub fn enabled() -> bool {
    options::release_root().is_some_and(|r| r.join(BOOTABLE_MARKER).exists())
}

impl Vms {
    /// Starts the VM of sandbox `id` from the Kata config at `config_path`. An unreadable config, or a
    /// cold boot that fails too, fails the sandbox's Create (as Kata's would).
    pub fn boot(&self, id: &str, config_path: &str) -> Result<(), String> {
        let cfg = QemuConfig::load(Path::new(config_path)).map_err(|e| format!("{e:#}"))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        let dir = Path::new(VM_RUN_DIR).join(id);
        let name = format!("sandbox-{id}");
        let mut spawn = spawn_kept;

        let reason = if !cfg.enable_template {
            format!("{}: [factory] enable_template is off", cfg.source.display())
        } else if cfg.initrd.is_none() {
            format!(
                "{}: templating needs [hypervisor.qemu] initrd",
                cfg.source.display()
            )
        } else if !cfg.template_exists() {
            format!(
                "no VM template in {} (memory and state)",
                cfg.template_path.display()
            )
        } else {
            let cloned = rt.block_on(async {
                let mut vm = Vm::start(&cfg, Role::Clone, &name, &dir, &mut spawn).await?;
                match kata_guest::restore_clone(&mut vm, &cfg).await {
                    Ok(counter) => Ok((vm.pid, counter)),
                    Err(e) => {
                        // A state QEMU cannot load makes it exit: give it a moment to say why.
                        kata_guest::wait_gone(vm.pid, Duration::from_millis(500));
                        let said = vm.log();
                        stop_pid(vm.pid, &dir);
                        Err(e.context(format!("QEMU said: {said}")))
                    }
                }
            });
            match cloned {
                Ok((pid, counter)) => {
                    let reason = format!(
                        "cloned from the template in {} (guest counter {counter})",
                        cfg.template_path.display()
                    );
                    info!("sandbox {id}: {reason}, QEMU pid {pid}");
                    options::record_vm(id, "template", &reason, Some(pid));
                    self.insert(id, pid, dir);
                    return Ok(());
                }
                Err(e) => format!(
                    "template clone failed: {}",
                    noded::config::one_line(&format!("{e:#}"))
                ),
            }
        };
        warn!("sandbox {id}: cold boot: {reason}");
        let booted = rt.block_on(async {
            let mut vm = Vm::start(&cfg, Role::Cold, &name, &dir, &mut spawn).await?;
            match vm.wait_ready(kata_guest::BOOT_TIMEOUT).await {
                Ok(_) => Ok(vm.pid),
                Err(e) => {
                    stop_pid(vm.pid, &dir);
                    Err(e)
                }
            }
        });
        match booted {
            Ok(pid) => {
                options::record_vm(id, "cold", &reason, Some(pid));
                self.insert(id, pid, dir);
                Ok(())
            }
            Err(e) => {
                let e = format!("cannot boot the VM of sandbox {id}: {e:#}");
                options::record_vm(id, "failed", &format!("{reason}; {e}"), None);
                Err(noded::config::one_line(&e))
            }
        }
    }

    fn insert(&self, id: &str, pid: u32, dir: PathBuf) {
        self.lock().insert(id.to_owned(), Running { pid, dir });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Running>> {
        self.running
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Kills the VM of sandbox `id`, if it has one, and waits for it to be reaped.
    pub fn stop(&self, id: &str) {
        let vm = self.lock().remove(id);
        if let Some(vm) = vm {
            info!("sandbox {id}: stopping its VM (QEMU pid {})", vm.pid);
            stop_pid(vm.pid, &vm.dir);
        }
    }

    pub fn stop_all(&self) {
        let all: Vec<(String, Running)> = self.lock().drain().collect();
        for (id, vm) in all {
            info!("sandbox {id}: stopping its VM (QEMU pid {})", vm.pid);
            stop_pid(vm.pid, &vm.dir);
        }
    }
}

fn stop_pid(pid: u32, dir: &Path) {
    kata_guest::kill(pid);
    if !kata_guest::wait_gone(pid, Duration::from_secs(5)) {
        warn!("QEMU pid {pid} still there 5 s after SIGKILL");
    }
    let _ = std::fs::remove_dir_all(dir);
}

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<u32>>);

/// Spawns `cmd` from the shim's long-lived spawner thread (see the module docs) and returns its pid.
fn spawn_kept(cmd: Command) -> std::io::Result<u32> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                // The Child is dropped unwaited: containerd-shim's reaper collects the exit.
                let _ = reply.send(cmd.spawn().map(|c| c.id()));
            }
        });
        Mutex::new(tx)
    });
    let (tx, rx) = mpsc::channel();
    sender
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send((cmd, tx))
        .map_err(|_| std::io::Error::other("the VM spawner thread is gone"))?;
    rx.recv()
        .map_err(|_| std::io::Error::other("the VM spawner thread is gone"))?
}
