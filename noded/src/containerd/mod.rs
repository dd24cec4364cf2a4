//! containerd: config model and edit, restart, verification, and a private containerd for local mode.

pub mod apply;
pub mod atomic;
pub mod cli;
pub mod cri_plugin;
pub mod document;
pub mod handler;
pub mod image;
pub mod manage;
pub mod private;
pub mod restart;
pub mod state;
pub mod systemd;
pub mod version;
