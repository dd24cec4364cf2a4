//! gRPC node API on a unix socket (proto/noded.proto).

use std::path::Path;

use crate::containerd::cli::OutputFormat;

pub mod pb {
    tonic::include_proto!("noded.v1");
}

pub fn status_cli(_socket: &Path, _output: OutputFormat) -> u8 {
    crate::exit::RUNTIME_FAILURE
}
