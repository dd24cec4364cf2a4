//! The fake Kata shim (`containerd-shim-kata-v2` of the fake Kata release): a real containerd
//! runtime v2 shim, built on the `containerd-shim` crate, that accepts Kata's runtime options and
//! runs containers with Debian's runc instead of in a VM.
//!
//! What makes it stand in for Kata where runc's shim cannot:
//! - Create takes `runtimeoptions.v1.Options` and fails, naming the path, unless its ConfigPath is a
//!   readable file; every Create is recorded in `<release>/calls.log` (one JSON line).
//! - One shim process per pod: containers whose spec names another sandbox
//!   (`io.kubernetes.cri.sandbox-id`) join that sandbox's shim, as Kata's do.
//! - In a bootable release, the sandbox's Create starts a real QEMU VM (a template clone or a cold
//!   boot, recorded in `calls.log`) that lives until the sandbox container is deleted ([`vm`]).
//!
//! The crate is pinned to 0.11, the last release serving the task v2 API with a bare address
//! reply to `start`: containerd 1.6 and 1.7 speak only v2, 2.x accepts v2 as well.

mod options;
mod runc;
mod task;
pub mod vm;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim::api::DeleteResponse;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::synchronous::util::write_address;
use containerd_shim::util::timestamp;
use containerd_shim::{Config, Error, ExitSignal, Flags, Shim, StartOpts, info, socket_address};

pub use options::{RUNTIME_OPTIONS, RuntimeOptions, calls_log, release_root};

/// The runtime id containerd knows Kata's shim by (`io.containerd.kata.v2`).
pub const RUNTIME_ID: &str = "io.containerd.kata.v2";

/// The annotation containerd's CRI plugin (1.x and 2.x) puts on every container of a pod.
pub const SANDBOX_ID_ANNOTATION: &str = "io.kubernetes.cri.sandbox-id";

/// The shim binary's `main`.
pub fn main() {
    containerd_shim::run::<Service>(RUNTIME_ID, None);
}

pub struct Service {
    namespace: String,
    id: String,
    bundle: PathBuf,
    exit: Arc<ExitSignal>,
}

impl Shim for Service {
    type T = task::TaskService;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        // containerd runs `start` and `delete` in the bundle; `-bundle` is only sometimes passed.
        let bundle = if args.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&args.bundle)
        };
        Self {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let grouping = sandbox_of(&self.bundle).unwrap_or_else(|| opts.id.clone());
        let address = socket_address(&opts.address, &opts.namespace, &grouping);
        if grouping != opts.id && serving(&address) {
            info!("{} joins the shim of sandbox {grouping}", opts.id);
        } else {
            // A shim serving `address` already (a sandbox's) makes the spawned one hand it back
            // and exit, so a race between two starts still ends with one shim per sandbox.
            let (_pid, spawned) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
            if spawned != address {
                return Err(Error::Other(format!(
                    "shim socket {spawned} differs from the expected {address}"
                )));
            }
        }
        // containerd reads it back from the bundle to reconnect after its own restart.
        write_address(&address)?;
        Ok(address)
    }

    fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        // The shim is gone (or never served): clean what it may have left, like runc's shim does.
        let runc = runc::Runc::new(runc_root(&self.namespace));
        let _ = runc.run(&["delete", "--force", &self.id]);
        let rootfs = self.bundle.join("rootfs");
        if let Some(target) = rootfs.to_str() {
            let _ = containerd_shim::mount::umount_recursive(Some(target), libc::MNT_DETACH);
        }
        Ok(DeleteResponse {
            // What containerd reports for a task whose shim died: killed.
            exit_status: 128 + 9,
            exited_at: Some(timestamp()?).into(),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        task::TaskService::new(
            &self.namespace,
            runc::Runc::new(runc_root(&self.namespace)),
            publisher,
            Arc::clone(&self.exit),
        )
    }
}

/// runc's state for this shim's containers, `/run/containerd/runc/<namespace>`: under containerd's
/// state root like the shim sockets (tests bind a private dir over `/run`), and the same root runc's
/// shim uses, so whatever cleans up after runc's shim (noded's `PrivateContainerd::kill_all`, an
/// operator's `runc --root … list`) sees these containers too. Container ids are unique per
/// namespace, so the two shims never collide in it.
fn runc_root(namespace: &str) -> PathBuf {
    Path::new(containerd_shim::SOCKET_ROOT)
        .join("runc")
        .join(namespace)
}

/// The sandbox a container belongs to, from its OCI spec's annotations.
fn sandbox_of(bundle: &Path) -> Option<String> {
    let text = std::fs::read_to_string(bundle.join("config.json")).ok()?;
    let spec: serde_json::Value = serde_json::from_str(&text).ok()?;
    spec["annotations"][SANDBOX_ID_ANNOTATION]
        .as_str()
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

fn serving(address: &str) -> bool {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    std::os::unix::net::UnixStream::connect(path).is_ok()
}
