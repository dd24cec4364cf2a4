//! containerd: config model and edit, restart, version, verification, and a private containerd for local
//! mode. Its [`configurator::ContainerdConfigurator`] is what the daemon and the installer reach through
//! [`crate::runtime::RuntimeConfigurator`]; CRI itself (client, probe) is runtime-agnostic and lives
//! in [`crate::cri`]. What stays here although it talks to containerd over gRPC is containerd's own
//! API or format: `cri_plugin` (the handler table in containerd's verbose CRI status), `version`
//! (containerd's Version service), `image` (import through containerd's content and images services).

pub mod apply;
pub mod atomic;
pub mod cli;
pub(crate) mod configurator;
pub mod cri_plugin;
pub mod document;
pub mod embedded;
pub mod handler;
pub mod image;
pub(crate) mod manage;
pub mod private;
pub mod restart;
pub mod snapshotter;
pub(crate) mod state;
pub mod systemd;
pub mod version;
