//! Clones: the template's machine with its memory file mapped private (copy-on-write), device state
//! loaded by the backend ([`Backend::restore`]), a fresh vmgenid GUID, and acceptance only once the
//! guest answers a request whose counter continues the template's. Also the cold boot of the same
//! guest (pool misses and the benchmark's baseline).

use std::time::{Duration, Instant};

use super::backend::{Backend, BackendError, Launch, MachineSpec, Mapping, Vm};
use super::guest::GuestError;
use super::template::{Layout, Template, new_vm_id};

/// An empty state file leaves QEMU in `inmigrate` forever: this bounds the wait.
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a VM whose console failed is given to exit, so its log can explain the failure.
const EXIT_GRACE: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    #[error("clone {id} of {template}: {source}")]
    Backend {
        id: String,
        template: String,
        source: BackendError,
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
    pub vm: Box<dyn Vm>,
    /// Spawn → vCPUs running (`cont` returned, or first answer for a cold boot).
    pub to_running: Duration,
    /// Spawn → the guest answered a request.
    pub to_answer: Duration,
    /// Last guest counter seen by noded.
    pub counter: u64,
}

/// Restores a clone of `template`. On any failure the VM is killed before returning.
pub async fn restore(
    backend: &dyn Backend,
    layout: &Layout,
    template: &Template,
    after: After,
) -> Result<StartedVm, CloneError> {
    restore_with_timeout(backend, layout, template, after, RESTORE_TIMEOUT).await
}

/// [`restore`] with an explicit bound on loading the device state.
#[tracing::instrument(name = "clone", skip_all, fields(template = %template.manifest.name, vm))]
pub async fn restore_with_timeout(
    backend: &dyn Backend,
    layout: &Layout,
    template: &Template,
    after: After,
    restore_timeout: Duration,
) -> Result<StartedVm, CloneError> {
    let id = new_vm_id();
    tracing::Span::current().record("vm", id.as_str());
    let name = template.manifest.name.clone();
    let err = |source| CloneError::Backend {
        id: id.clone(),
        template: name.clone(),
        source,
    };
    let launch = Launch {
        name: layout.vm_name(&name, &id),
        dir: layout.vms_dir().join(&id),
        memory_file: template.memory_file(),
        memory_mib: template.manifest.memory_mib,
        mapping: Mapping::Private,
        machine_args: template.manifest.machine_args.clone(),
        vmgenid: uuid::Uuid::new_v4(),
        dies_with_noded: false,
    };
    let t0 = Instant::now();
    let mut vm = backend
        .restore(launch, &template.state_file(), restore_timeout)
        .await
        .map_err(err)?;
    let expected = template.manifest.guest_counter + 1;
    let accepted = async {
        vm.resume().await?;
        let to_running = t0.elapsed();
        let answer = match vm.console()?.ping(ANSWER_TIMEOUT).await {
            Ok(a) => a,
            Err(source) => return Err(vm.console_failed(source, Duration::ZERO).await),
        };
        let to_answer = t0.elapsed();
        if after == After::Paused {
            vm.pause().await?;
        }
        Ok::<_, BackendError>((to_running, to_answer, answer))
    }
    .await;
    let (to_running, to_answer, answer) = match accepted {
        Ok(v) => v,
        Err(e) => {
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

/// Boots the guest cold (no template): the baseline clones are compared with, and what a pool miss
/// costs. Its RAM is a private file mapping in the VM's own directory, removed with the VM.
#[tracing::instrument(name = "cold_boot", skip_all, fields(template = %template_name, vm))]
pub async fn cold_boot(
    backend: &dyn Backend,
    layout: &Layout,
    template_name: &str,
    spec: &MachineSpec,
    tsc_khz: Option<u64>,
    boot_timeout: Duration,
) -> Result<StartedVm, CloneError> {
    let id = new_vm_id();
    tracing::Span::current().record("vm", id.as_str());
    let dir = layout.vms_dir().join(&id);
    let launch = Launch {
        name: layout.vm_name(template_name, &id),
        memory_file: dir.join("memory"),
        dir,
        memory_mib: spec.memory_mib,
        mapping: Mapping::Private,
        machine_args: backend.machine_args(spec, tsc_khz),
        vmgenid: uuid::Uuid::new_v4(),
        dies_with_noded: false,
    };
    let err = |source| CloneError::Backend {
        id: id.clone(),
        template: template_name.to_string(),
        source,
    };
    let t0 = Instant::now();
    let mut vm = backend.spawn(launch).await.map_err(err)?;
    // The vCPUs run from the start: "running" for a cold VM is the hypervisor being up.
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
    let (to_answer, answer) = match answered {
        Ok(a) => a,
        Err(source) => {
            // A dying VM gets a moment to exit so its log explains the failure.
            let e = vm.console_failed(source, EXIT_GRACE).await;
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
