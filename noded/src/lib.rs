//! noded: makes bare-metal Kubernetes nodes ready to run Kata Containers VMs fast.
//!
//! One module per concern; `main.rs` only parses the command line and calls into here.

pub mod api;
pub mod config;
pub mod containerd;
pub mod cri;
pub mod daemon;
pub mod exit;
pub mod fsutil;
pub mod http;
pub mod hypervisor;
pub mod k8s;
pub mod kata;
pub mod metrics;
pub(crate) mod names;
pub mod observe;
pub mod proctable;
pub mod runtime;
pub mod vm;
