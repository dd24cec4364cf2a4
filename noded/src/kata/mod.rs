//! Kata Containers adapter: the install layout under a Kata root, the derived `kata-qemu-warm`
//! configuration, and keeping Kata's own VM factory template present and current.

pub(crate) mod factory;
pub mod handlers;
pub mod keeper;
pub(crate) mod layout;
pub mod warm;

use std::path::{Path, PathBuf};

pub use factory::{
    EnsureAction, EnsureOutcome, FactoryExec, Fingerprint, KataFactory, TemplateState,
    in_mount_namespace,
};
pub use layout::{Hypervisor, KataInstall, KataLayout};
pub use warm::{WarmOptions, WarmOutcome, WarmSharedFs};

/// A handler served from Kata's VM factory template, whose template noded keeps built: the
/// kata-qemu-warm preset or a `[[handlers]]` entry with `warm = true`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmTarget {
    /// The runtime handler (and the `template` label of its metrics).
    pub name: String,
    /// The Kata release whose `kata-runtime` builds the template.
    pub kata_root: PathBuf,
    /// The configuration its shim and `kata-runtime factory init` read (`[factory]` enabled).
    pub config: PathBuf,
    /// Where that configuration puts the template (`[factory] template_path`).
    pub template_path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum KataError {
    #[error("{root}: not a Kata install ({missing} is missing)")]
    NotInstalled { root: PathBuf, missing: PathBuf },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    InvalidConfig { path: PathBuf, message: String },
    #[error(
        "{0}: cannot tell the Kata version (bin/kata-runtime --version or bin/kata-ctl version failed)"
    )]
    NoVersion(PathBuf),
    #[error(
        "{0}: neither bin/kata-runtime nor bin/kata-ctl is installed; cannot build the VM template"
    )]
    NoFactoryTool(PathBuf),
    #[error("`{tool} factory {verb}` failed (exit {status:?}): {stderr}")]
    FactoryCommand {
        tool: PathBuf,
        verb: String,
        status: Option<i32>,
        stderr: String,
    },
    #[error(
        "{0}: this Kata install has only runtime-rs's kata-ctl, whose `factory` ignores the warm configuration (KATA_CONF_FILE); noded builds templates with the Go runtime's kata-runtime only"
    )]
    RuntimeRsFactory(PathBuf),
    #[error("`{tool} factory init` succeeded but left no template in {path} (memory + state)")]
    TemplateNotCreated { tool: PathBuf, path: PathBuf },
}

impl crate::exit::ExitStatus for KataError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::NotInstalled { .. } | Self::InvalidConfig { .. } => crate::exit::BAD_INPUT,
            _ => crate::exit::RUNTIME_FAILURE,
        }
    }
}

/// Kata's config and template record, replaced crash-safely by the workspace's one writer: exact
/// mode, and a temp name ([`crate::fsutil::TEMP_PREFIX`]) the next write removes after a crash, so
/// a kill leaves nothing in Kata's config directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), KataError> {
    crate::fsutil::write_atomic_with(path, bytes, crate::fsutil::WriteOptions::exact(mode)).map_err(
        |e| KataError::Io {
            path: e.path,
            source: e.source,
        },
    )
}
