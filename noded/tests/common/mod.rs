//! Helpers shared by the integration tests. Each concern adds its own submodule file.
#![allow(dead_code)]

pub mod config_shapes;
pub mod containerd;
pub mod vm;

pub use testkit::require::{require, require_root};
