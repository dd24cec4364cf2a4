//! Helpers shared by the integration tests. Each concern adds its own submodule file.
#![allow(dead_code)]

pub mod config_shapes;
pub mod containerd;
pub mod vm;

mod require;
pub use require::{require, require_root};
