//! noded's test harness, as a crate of its own: the node-in-a-box (a box root laid out like an EKS
//! AL2023 node, the node's real containerd of each series, a kubelet stand-in running the DaemonSet's
//! pod), the fake Kata release, the fake systemd on a real D-Bus, and the fake Kubernetes API server.
//! Nothing here ships in noded's binaries.

pub mod bins;
pub mod containerd;
pub mod dbus;
pub mod fake_api;
pub mod fake_kata;
pub mod kata_guest;
pub mod kubelet;
pub mod nodebox;
pub mod process;
pub mod prometheus;
pub mod require;
pub mod scenario;
pub mod scrape;
pub mod shim;
pub mod strace;
pub mod synthetic;
