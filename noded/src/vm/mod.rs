//! VM engine: QEMU command builder, QMP client, templates, clones and the pre-forked pool.
//!
//! Entry point for other modules: [`engine::Engine`] (start, acquire, release, snapshot, shutdown).

pub mod assets;
pub mod cli;
pub mod clone;
pub mod engine;
pub mod guest;
pub mod pool;
pub mod qemu;
pub mod qmp;
pub mod reap;
pub mod template;
