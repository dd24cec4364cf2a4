//! The Task API: every container of one sandbox lives in this one shim process and runs under runc.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use containerd_shim::api::{
    ConnectRequest, ConnectResponse, CreateTaskRequest, CreateTaskResponse, DeleteRequest,
    DeleteResponse, Empty, KillRequest, PidsRequest, PidsResponse, ShutdownRequest, StartRequest,
    StartResponse, StateRequest, StateResponse, StatsRequest, StatsResponse, Status, WaitRequest,
    WaitResponse,
};
use containerd_shim::event::Event;
use containerd_shim::monitor::{Subject, Topic, monitor_subscribe};
use containerd_shim::protos::api::ProcessInfo;
use containerd_shim::protos::events::task::{TaskCreate, TaskDelete, TaskExit, TaskStart};
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::protos::ttrpc::error::get_rpc_status;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::util::timestamp;
use containerd_shim::{Context, ExitSignal, Task, TtrpcContext, TtrpcResult, error, info, warn};

use super::options;
use super::runc::{Runc, Stdio3};
use super::vm::Vms;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Phase {
    Created,
    Running,
    Stopped,
}

struct Container {
    bundle: String,
    pid: u32,
    phase: Phase,
    exit_status: u32,
    exited_at: Option<Timestamp>,
    stdin: String,
    stdout: String,
    stderr: String,
}

#[derive(Default)]
struct Table {
    containers: HashMap<String, Container>,
}

struct Inner {
    namespace: String,
    runc: Runc,
    table: Mutex<Table>,
    // Signalled whenever a container stops: Wait blocks on it.
    stopped: Condvar,
    publisher: Mutex<RemotePublisher>,
    exit: Arc<ExitSignal>,
    vms: Vms,
}

#[derive(Clone)]
pub struct TaskService {
    inner: Arc<Inner>,
}

impl TaskService {
    pub fn new(
        namespace: &str,
        runc: Runc,
        publisher: RemotePublisher,
        exit: Arc<ExitSignal>,
    ) -> Self {
        let inner = Arc::new(Inner {
            namespace: namespace.to_owned(),
            runc,
            table: Mutex::new(Table::default()),
            stopped: Condvar::new(),
            publisher: Mutex::new(publisher),
            exit,
            vms: Vms::default(),
        });
        // Subscribed before the server serves, so no container's exit can be missed.
        match monitor_subscribe(Topic::All) {
            Ok(sub) => {
                let watcher = Arc::clone(&inner);
                std::thread::spawn(move || {
                    while let Ok(ev) = sub.rx.recv() {
                        if let Subject::Pid(pid) = ev.subject {
                            watcher.on_exit(pid, ev.exit_code);
                        }
                    }
                });
            }
            Err(e) => error!("cannot watch container exits: {e}"),
        }
        Self { inner }
    }
}

impl Inner {
    fn table(&self) -> MutexGuard<'_, Table> {
        // A panicking RPC must not wedge every other one: the table stays consistent per entry.
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish(&self, event: impl Event + 'static) {
        let topic = event.topic();
        let publisher = self
            .publisher
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) =
            publisher.publish(Context::default(), &topic, &self.namespace, Box::new(event))
        {
            warn!("cannot publish {topic}: {e}");
        }
    }

    /// A reaped child: when it is a container's init, the container has stopped.
    fn on_exit(&self, pid: i32, code: i32) {
        let mut table = self.table();
        let Some((id, c)) = table
            .containers
            .iter_mut()
            .find(|(_, c)| i64::from(c.pid) == i64::from(pid) && c.phase != Phase::Stopped)
        else {
            return;
        };
        c.phase = Phase::Stopped;
        c.exit_status = u32::try_from(code).unwrap_or(255);
        c.exited_at = Some(now());
        let event = TaskExit {
            container_id: id.clone(),
            id: id.clone(),
            pid: c.pid,
            exit_status: c.exit_status,
            exited_at: c.exited_at.clone().into(),
            ..Default::default()
        };
        info!("container {id} (pid {pid}) exited {code}");
        // Published under the lock so a TaskExit never overtakes the TaskStart of the same task.
        self.publish(event);
        self.stopped.notify_all();
    }

    fn create(&self, req: &CreateTaskRequest) -> Result<u32, String> {
        if req.terminal {
            return Err("the fake Kata shim has no terminal support".to_owned());
        }
        if !req.checkpoint.is_empty() {
            return Err("the fake Kata shim cannot restore checkpoints".to_owned());
        }
        let config_path = options::config_path(req.options.as_ref());
        let checked = match &config_path {
            Ok(Some(path)) => options::check_config(path),
            Ok(None) => Ok(()),
            Err(e) => Err(e.clone()),
        };
        let recorded_path = config_path.as_ref().ok().and_then(Option::as_deref);
        options::record_create(
            &req.id,
            &req.bundle,
            recorded_path,
            checked.as_ref().err().map(String::as_str),
        );
        checked?;

        let bundle = Path::new(&req.bundle);
        // Kata starts the VM with the sandbox (pause) container; the pod's other containers join it.
        let is_sandbox = super::sandbox_of(bundle).is_none_or(|s| s == req.id);
        let booted_vm = match recorded_path {
            Some(path) if is_sandbox && super::vm::enabled() => {
                self.vms.boot(&req.id, path)?;
                true
            }
            _ => false,
        };
        let rootfs = bundle.join("rootfs");
        if !req.rootfs.is_empty() {
            std::fs::create_dir_all(&rootfs)
                .map_err(|e| format!("cannot create {}: {e}", rootfs.display()))?;
        }
        for m in &req.rootfs {
            containerd_shim::mount::mount_rootfs(
                Some(m.type_.as_str()),
                Some(m.source.as_str()),
                &m.options,
                &rootfs,
            )
            .map_err(|e| {
                format!(
                    "cannot mount {} rootfs at {}: {e}",
                    m.type_,
                    rootfs.display()
                )
            })?;
        }
        let created = (|| {
            let stdio = Stdio3 {
                stdin: open_stdio(&req.stdin)?,
                stdout: open_stdio(&req.stdout)?,
                stderr: open_stdio(&req.stderr)?,
            };
            let pid_file = bundle.join("init.pid");
            self.runc.create(
                &req.id,
                bundle,
                &pid_file,
                &bundle.join("runc-log.json"),
                stdio,
            )?;
            let pid = std::fs::read_to_string(&pid_file)
                .map_err(|e| format!("cannot read {}: {e}", pid_file.display()))?;
            pid.trim()
                .parse::<u32>()
                .map_err(|e| format!("{}: not a pid ({e})", pid_file.display()))
        })();
        match created {
            Ok(pid) => Ok(pid),
            Err(e) => {
                let _ = self.runc.run(&["delete", "--force", &req.id]);
                unmount(&rootfs);
                if booted_vm {
                    self.vms.stop(&req.id);
                }
                Err(e)
            }
        }
    }
}

impl Task for TaskService {
    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: CreateTaskRequest,
    ) -> TtrpcResult<CreateTaskResponse> {
        info!("create {} in {}", req.id, req.bundle);
        // Held through runc create so the exit watcher cannot look the new pid up too early.
        let mut table = self.inner.table();
        if table.containers.contains_key(&req.id) {
            return Err(get_rpc_status(
                Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        let pid = self.inner.create(&req).map_err(|e| {
            error!("create {}: {e}", req.id);
            get_rpc_status(Code::FAILED_PRECONDITION, e)
        })?;
        table.containers.insert(
            req.id.clone(),
            Container {
                bundle: req.bundle.clone(),
                pid,
                phase: Phase::Created,
                exit_status: 0,
                exited_at: None,
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
            },
        );
        self.inner.publish(TaskCreate {
            container_id: req.id.clone(),
            bundle: req.bundle.clone(),
            rootfs: req.rootfs.clone(),
            pid,
            ..Default::default()
        });
        Ok(CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn start(&self, _ctx: &TtrpcContext, req: StartRequest) -> TtrpcResult<StartResponse> {
        no_exec(&req.exec_id)?;
        let mut table = self.inner.table();
        let c = find(&mut table, &req.id)?;
        if c.phase != Phase::Created {
            return Err(get_rpc_status(
                Code::FAILED_PRECONDITION,
                format!("container {} is {:?}, not created", req.id, c.phase),
            ));
        }
        let pid = c.pid;
        self.inner
            .runc
            .check(&["start", &req.id])
            .map_err(|e| get_rpc_status(Code::UNKNOWN, e))?;
        c.phase = Phase::Running;
        self.inner.publish(TaskStart {
            container_id: req.id.clone(),
            pid,
            ..Default::default()
        });
        Ok(StartResponse {
            pid,
            ..Default::default()
        })
    }

    fn state(&self, _ctx: &TtrpcContext, req: StateRequest) -> TtrpcResult<StateResponse> {
        no_exec(&req.exec_id)?;
        let mut table = self.inner.table();
        let c = find(&mut table, &req.id)?;
        Ok(StateResponse {
            id: req.id.clone(),
            bundle: c.bundle.clone(),
            pid: c.pid,
            status: match c.phase {
                Phase::Created => Status::CREATED,
                Phase::Running => Status::RUNNING,
                Phase::Stopped => Status::STOPPED,
            }
            .into(),
            stdin: c.stdin.clone(),
            stdout: c.stdout.clone(),
            stderr: c.stderr.clone(),
            exit_status: c.exit_status,
            exited_at: c.exited_at.clone().into(),
            ..Default::default()
        })
    }

    fn wait(&self, _ctx: &TtrpcContext, req: WaitRequest) -> TtrpcResult<WaitResponse> {
        no_exec(&req.exec_id)?;
        let mut table = self.inner.table();
        loop {
            let c = find(&mut table, &req.id)?;
            if c.phase == Phase::Stopped {
                return Ok(WaitResponse {
                    exit_status: c.exit_status,
                    exited_at: c.exited_at.clone().into(),
                    ..Default::default()
                });
            }
            table = self
                .inner
                .stopped
                .wait(table)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    fn kill(&self, _ctx: &TtrpcContext, req: KillRequest) -> TtrpcResult<Empty> {
        no_exec(&req.exec_id)?;
        let phase = find(&mut self.inner.table(), &req.id)?.phase;
        if phase == Phase::Stopped {
            return Ok(Empty::default());
        }
        let signal = req.signal.to_string();
        let mut args = vec!["kill"];
        if req.all {
            args.push("--all");
        }
        args.extend([req.id.as_str(), signal.as_str()]);
        let out = self
            .inner
            .runc
            .run(&args)
            .map_err(|e| get_rpc_status(Code::UNKNOWN, e))?;
        // runc refuses to signal a container whose init just went away: that is a stop, not an error.
        if out.code != 0 && !out.stderr.contains("not running") {
            return Err(get_rpc_status(
                Code::UNKNOWN,
                format!(
                    "runc kill {} exited {}: {}",
                    req.id,
                    out.code,
                    out.stderr.trim()
                ),
            ));
        }
        Ok(Empty::default())
    }

    fn delete(&self, _ctx: &TtrpcContext, req: DeleteRequest) -> TtrpcResult<DeleteResponse> {
        no_exec(&req.exec_id)?;
        let mut table = self.inner.table();
        let c = find(&mut table, &req.id)?;
        if c.phase == Phase::Running {
            return Err(get_rpc_status(
                Code::FAILED_PRECONDITION,
                format!("container {} is still running", req.id),
            ));
        }
        // --force also covers a created-but-never-started container (its init is still parked).
        self.inner
            .runc
            .check(&["delete", "--force", &req.id])
            .map_err(|e| get_rpc_status(Code::UNKNOWN, e))?;
        unmount(&Path::new(&c.bundle).join("rootfs"));
        // The sandbox's VM goes with its sandbox container (a no-op for other containers).
        self.inner.vms.stop(&req.id);
        let (pid, exit_status) = (c.pid, c.exit_status);
        let exited_at = c.exited_at.clone().unwrap_or_else(now);
        table.containers.remove(&req.id);
        self.inner.publish(TaskDelete {
            container_id: req.id.clone(),
            id: req.id.clone(),
            pid,
            exit_status,
            exited_at: Some(exited_at.clone()).into(),
            ..Default::default()
        });
        Ok(DeleteResponse {
            pid,
            exit_status,
            exited_at: Some(exited_at).into(),
            ..Default::default()
        })
    }

    fn pids(&self, _ctx: &TtrpcContext, req: PidsRequest) -> TtrpcResult<PidsResponse> {
        let pid = find(&mut self.inner.table(), &req.id)?.pid;
        Ok(PidsResponse {
            processes: vec![ProcessInfo {
                pid,
                ..Default::default()
            }],
            ..Default::default()
        })
    }

    fn stats(&self, _ctx: &TtrpcContext, req: StatsRequest) -> TtrpcResult<StatsResponse> {
        find(&mut self.inner.table(), &req.id)?;
        Ok(StatsResponse::default())
    }

    fn close_io(
        &self,
        _ctx: &TtrpcContext,
        _req: containerd_shim::api::CloseIORequest,
    ) -> TtrpcResult<Empty> {
        Ok(Empty::default())
    }

    fn update(
        &self,
        _ctx: &TtrpcContext,
        _req: containerd_shim::api::UpdateTaskRequest,
    ) -> TtrpcResult<Empty> {
        // A VM-based runtime applies resources inside the guest; there is nothing to check here.
        Ok(Empty::default())
    }

    fn connect(&self, _ctx: &TtrpcContext, req: ConnectRequest) -> TtrpcResult<ConnectResponse> {
        let task_pid = self
            .inner
            .table()
            .containers
            .get(&req.id)
            .map_or(0, |c| c.pid);
        Ok(ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: "fake-kata".to_owned(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, _req: ShutdownRequest) -> TtrpcResult<Empty> {
        // containerd asks after every task's delete; the sandbox's shim serves its other
        // containers until the last one is gone.
        if self.inner.table().containers.is_empty() {
            info!("last container gone, shutting down");
            self.inner.vms.stop_all();
            self.inner.exit.signal();
        }
        Ok(Empty::default())
    }
}

fn find<'a>(table: &'a mut Table, id: &str) -> TtrpcResult<&'a mut Container> {
    table
        .containers
        .get_mut(id)
        .ok_or_else(|| get_rpc_status(Code::NOT_FOUND, format!("container {id} not found")))
}

fn no_exec(exec_id: &str) -> TtrpcResult<()> {
    if exec_id.is_empty() {
        return Ok(());
    }
    Err(get_rpc_status(
        Code::UNIMPLEMENTED,
        format!("exec {exec_id}: the fake Kata shim runs no exec processes"),
    ))
}

fn now() -> Timestamp {
    timestamp().unwrap_or_default()
}

/// containerd hands stdio as fifo paths it reads (or writes, for stdin). Opened read-write: on
/// Linux that never blocks, whether or not containerd has its end open yet. An empty path means
/// the process gets no such stream.
fn open_stdio(path: &str) -> Result<File, String> {
    let path = path.strip_prefix("file://").unwrap_or(path);
    let path = if path.is_empty() { "/dev/null" } else { path };
    if path.contains("://") {
        return Err(format!(
            "stdio {path}: only fifo or file paths are supported"
        ));
    }
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| format!("cannot open stdio {path}: {e}"))
}

fn unmount(rootfs: &Path) {
    if let Some(target) = rootfs.to_str()
        && let Err(e) = containerd_shim::mount::umount_recursive(Some(target), libc::MNT_DETACH)
    {
        warn!("cannot unmount {target}: {e}");
    }
}
