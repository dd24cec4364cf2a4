//! Crash-safe replacement of containerd's config files: a crash at any point leaves either the old
//! or the new bytes. The implementation is the workspace's one, [`crate::fsutil`]; these are its
//! names in the containerd adapter.

pub use crate::fsutil::{
    FsError as WriteError, clean_stale_temps, remove_durable, resolve_target, write_atomic,
};
