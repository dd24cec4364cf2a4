//! Helpers shared by the integration tests. Each concern adds its own submodule file.
#![allow(dead_code)]

pub mod containerd;
pub mod vm;

// In their own file so crates without noded's dev-dependencies (installer tests) can include just these.
mod components;
pub use components::{require, require_root};
