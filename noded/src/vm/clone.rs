//! Clones: the template's machine with its memory file mapped private (copy-on-write), device state
//! loaded with `migrate-incoming`, a fresh vmgenid GUID, and acceptance only once the guest answers a
//! request whose counter continues the template's. Also the cold boot of the same guest (pool misses
//! and the benchmark's baseline).

use std::time::{Duration, Instant};

use super::guest::GuestError;
use super::qemu::{MachineSpec, Mapping, QemuError, VmLaunch, VmProcess};
use super::qmp::{Capability, MigrationStatus, QmpError};
use super::template::{Layout, Template, new_vm_id};

const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// An empty state file leaves QEMU in `inmigrate` forever: this bounds the wait.
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("clone {id} of {template}: {source}")]
    Qemu {
        id: String,
        template: String,
        source: QemuError,
    },
    #[error("clone {id} of {template}: restoring device state ended as {status:?}: {detail}")]
    Restore {
        id: String,
        template: String,
        status: Option<MigrationStatus>,
        detail: String,
    },
    #[error(
        "clone {id} of {template}: guest answered with counter {got}, expected {expected} (not a restored template: it cold-booted or its memory is damaged)"
    )]
    Counter {
        id: String,
        template: String,
        expected: u64,
        got: u64,
    },
}

/// Whether a restored clone is left running or paused (the pool's mode; both are measured in perf).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum After {
    Running,
    Paused,
}

/// A VM noded started, with how long it took.
pub struct StartedVm {
    pub id: String,
    pub template: String,
    /// Template generation it was cloned from; `None` for a cold boot.
    pub generation: Option<String>,
    pub vm: VmProcess,
    /// Spawn → vCPUs running (`cont` returned, or first answer for a cold boot).
    pub to_running: Duration,
    /// Spawn → the guest answered a request.
    pub to_answer: Duration,
    /// Last guest counter seen by noded.
    pub counter: u64,
}

/// Restores a clone of `template`. On any failure the QEMU process is killed before returning.
pub async fn restore(
    layout: &Layout,
    template: &Template,
    after: After,
) -> Result<StartedVm, CloneError> {
    restore_with_timeout(layout, template, after, RESTORE_TIMEOUT).await
}

/// [`restore`] with an explicit bound on loading the device state.
#[tracing::instrument(name = "clone", skip_all, fields(template = %template.manifest.name, vm))]
pub async fn restore_with_timeout(
    layout: &Layout,
    template: &Template,
    after: After,
    restore_timeout: Duration,
) -> Result<StartedVm, CloneError> {
    let id = new_vm_id();
    tracing::Span::current().record("vm", id.as_str());
    let name = template.manifest.name.clone();
    let err = |source| CloneError::Qemu {
        id: id.clone(),
        template: name.clone(),
        source,
    };
    let launch = VmLaunch {
        name: layout.vm_name(&name, &id),
        dir: layout.vms_dir().join(&id),
        memory_file: template.memory_file(),
        mapping: Mapping::Private,
        incoming: true,
        vmgenid: uuid::Uuid::new_v4(),
    };
    let t0 = Instant::now();
    let mut vm = VmProcess::spawn(
        launch,
        &template.manifest.machine_args,
        template.manifest.memory_mib,
        QMP_TIMEOUT,
    )
    .await
    .map_err(err)?;
    let state = template.state_file();
    let channel = vm.launch.migration_socket();
    // QEMU runs with `-sandbox spawn=deny`, so `exec:cat state` is out: QEMU listens on a socket in
    // the VM's own directory and noded streams the state file into it.
    let restored = async {
        let q = vm.qmp()?;
        let r = async {
            q.migrate_set_capability(Capability::XIgnoreShared, true, QMP_TIMEOUT)
                .await?;
            q.migrate_incoming(&format!("unix:{}", channel.display()), QMP_TIMEOUT)
                .await
        }
        .await;
        if let Err(e) = r {
            return Err(vm.qmp_error(e));
        }
        let sent = tokio::time::timeout(restore_timeout, send_state(&state, &channel))
            .await
            .unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("QEMU did not take the device state within {restore_timeout:?}"),
                ))
            });
        let _ = std::fs::remove_file(&channel);
        if let Err(source) = sent {
            return Err(QemuError::Io {
                path: state.clone(),
                source,
            });
        }
        let r = vm.qmp()?.wait_migration(restore_timeout, QMP_TIMEOUT).await;
        r.map_err(|e: QmpError| vm.qmp_error(e))
    }
    .await;
    let info = match restored {
        Ok(i) => i,
        Err(e) => {
            vm.kill().await;
            return Err(err(e));
        }
    };
    if info.status != Some(MigrationStatus::Completed) {
        vm.kill().await;
        return Err(CloneError::Restore {
            id,
            template: name,
            status: info.status,
            detail: info.error_desc.unwrap_or_default(),
        });
    }
    let expected = template.manifest.guest_counter + 1;
    let accepted = async {
        vm.qmp()?
            .cont(QMP_TIMEOUT)
            .await
            .map_err(|e| QemuError::Qmp {
                name: String::new(),
                source: e,
            })?;
        let to_running = t0.elapsed();
        let answer =
            vm.console()?
                .ping(ANSWER_TIMEOUT)
                .await
                .map_err(|source| QemuError::Guest {
                    name: String::new(),
                    source,
                })?;
        let to_answer = t0.elapsed();
        if after == After::Paused {
            vm.qmp()?
                .stop(QMP_TIMEOUT)
                .await
                .map_err(|e| QemuError::Qmp {
                    name: String::new(),
                    source: e,
                })?;
        }
        Ok::<_, QemuError>((to_running, to_answer, answer))
    }
    .await;
    let (to_running, to_answer, answer) = match accepted {
        Ok(v) => v,
        Err(e) => {
            let e = match e {
                QemuError::Qmp { source, .. } => vm.qmp_error(source),
                other => other,
            };
            vm.kill().await;
            return Err(err(e));
        }
    };
    if answer.counter != expected {
        vm.kill().await;
        return Err(CloneError::Counter {
            id,
            template: name,
            expected,
            got: answer.counter,
        });
    }
    tracing::debug!(?to_running, ?to_answer, "clone accepted");
    Ok(StartedVm {
        id,
        template: name,
        generation: Some(template.manifest.generation.clone()),
        vm,
        to_running,
        to_answer,
        counter: answer.counter,
    })
}

/// Streams the template's device state into QEMU's incoming migration socket.
async fn send_state(state: &std::path::Path, channel: &std::path::Path) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let bytes = tokio::fs::read(state).await?;
    let mut conn = tokio::net::UnixStream::connect(channel).await?;
    conn.write_all(&bytes).await?;
    conn.shutdown().await
}

/// Boots the guest cold (no template): the baseline clones are compared with, and what a pool miss
/// costs. Its RAM is a private file mapping in the VM's own directory, removed with the VM.
#[tracing::instrument(name = "cold_boot", skip_all, fields(template = %template_name, vm))]
pub async fn cold_boot(
    layout: &Layout,
    template_name: &str,
    spec: &MachineSpec,
    tsc_khz: Option<u64>,
    boot_timeout: Duration,
) -> Result<StartedVm, CloneError> {
    let id = new_vm_id();
    tracing::Span::current().record("vm", id.as_str());
    let dir = layout.vms_dir().join(&id);
    let launch = VmLaunch {
        name: layout.vm_name(template_name, &id),
        memory_file: dir.join("memory"),
        dir,
        mapping: Mapping::Private,
        incoming: false,
        vmgenid: uuid::Uuid::new_v4(),
    };
    let err = |source| CloneError::Qemu {
        id: id.clone(),
        template: template_name.to_string(),
        source,
    };
    let t0 = Instant::now();
    let mut vm = VmProcess::spawn(
        launch,
        &spec.machine_args(tsc_khz),
        spec.memory_mib,
        QMP_TIMEOUT,
    )
    .await
    .map_err(err)?;
    // QEMU runs the vCPUs from the start: "running" for a cold VM is QMP answering.
    let to_running = t0.elapsed();
    let t0 = tokio::time::Instant::from_std(t0);
    let answered = match vm.console() {
        Ok(c) => match c.wait_first(boot_timeout).await {
            // The first answer is readiness; the follow-up ping only drains requests sent while
            // booting and reads the guest's counter.
            Ok(first) => c
                .ping(ANSWER_TIMEOUT)
                .await
                .map(|a| (first.duration_since(t0), a)),
            Err(e) => Err(e),
        },
        Err(_) => Err(GuestError::Closed),
    };
    let answered = match answered {
        Ok(a) => Ok(a),
        Err(source) => {
            // Give a dying QEMU a moment to exit so its log explains the failure.
            let _ = tokio::time::timeout(Duration::from_millis(500), vm.child.wait()).await;
            Err(vm.guest_error(source))
        }
    };
    let (to_answer, answer) = match answered {
        Ok(a) => a,
        Err(e) => {
            vm.kill().await;
            return Err(err(e));
        }
    };
    Ok(StartedVm {
        id,
        template: template_name.to_string(),
        generation: None,
        vm,
        to_running,
        to_answer,
        counter: answer.counter,
    })
}
