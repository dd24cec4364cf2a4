//! VM engine: templates, clones and the pre-forked pool, written against a hypervisor [`Backend`]
//! (`backend.rs`); QEMU (`qemu.rs`) is the backend noded ships.
//!
//! Entry point for other modules: [`engine::Engine`] (start, acquire, release, snapshot, shutdown).

use std::sync::Arc;

pub mod assets;
pub mod backend;
pub mod cgroup;
pub mod cli;
pub mod clone;
pub mod engine;
pub mod guest;
pub(crate) mod pool;
pub mod qemu;
pub mod reap;
pub mod template;

pub use backend::Backend;

/// The backend templates are built and VMs started with: the one place that names a hypervisor.
pub fn default_backend() -> Arc<dyn Backend> {
    Arc::new(qemu::Qemu::default())
}
