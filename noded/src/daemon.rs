//! `noded run`: wires the runtime manager, template pool, observers, metrics and Kubernetes publisher.

use std::path::Path;

pub fn run_cli(_config: Option<&Path>) -> u8 {
    crate::exit::RUNTIME_FAILURE
}
