//! containerd: config model and edit, restart, verification, and a private containerd for local mode.

pub mod cli;
pub mod cri;
pub mod image;
pub mod private;
