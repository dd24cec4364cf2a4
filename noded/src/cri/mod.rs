//! CRI, whatever runtime serves it: the client ([`CriClient`]), runtime status, and the probe sandbox
//! that proves a runtime handler runs pods ([`probe`]). Nothing here depends on which runtime answers on
//! the socket; the runtime's own configuration is behind [`crate::runtime::RuntimeConfigurator`].
//!
//! containerd-specific clients stay in [`crate::containerd`], because they speak containerd's own API or
//! formats rather than CRI:
//! - `containerd::cri_plugin`: the handler table containerd's CRI plugin loaded, read from the verbose
//!   `Status` info, whose JSON shape is containerd's (verification after a restart, tests);
//! - `containerd::version`: the Version service of containerd's API;
//! - `containerd::image`: importing the local probe/pause image through containerd's content and
//!   images services (local mode and tests; CRI can only pull);
//! - `observe::latency`, the boot-latency event follower: containerd's events service (its envelope
//!   timestamps) plus the `io.cri-containerd.*` labels and extensions containerd's CRI plugin stores on
//!   containers. Another runtime needs its own source of boot samples there.

mod client;
pub mod probe;
mod status;

pub use client::{ContainerInfo, CriClient, CriError, PodSpec, RPC_TIMEOUT, wait_ready};
pub use status::{CriStatus, CriVersion, RuntimeCondition, runtime_ready};
