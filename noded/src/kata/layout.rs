//! The layout of a Kata static release under its root (default `/opt/kata`): what is installed, which
//! hypervisors it can drive, which version it is.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::KataError;
pub use crate::hypervisor::Hypervisor;

/// Relative paths inside a Kata root; kata-deploy and the static tarball use the same ones.
pub const SHIM: &str = "bin/containerd-shim-kata-v2";
pub const DEFAULTS_DIR: &str = "share/defaults/kata-containers";
pub const ASSETS_DIR: &str = "share/kata-containers";
pub const KATA_RUNTIME: &str = "bin/kata-runtime";
pub const KATA_CTL: &str = "bin/kata-ctl";
/// The configuration noded derives for the `kata-qemu-warm` handler, next to Kata's own.
pub const WARM_CONFIG: &str = "configuration-qemu-warm.toml";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KataLayout {
    root: PathBuf,
}

/// One `configuration-<name>.toml` found in the defaults directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct HypervisorConfig {
    /// The part of the file name after `configuration-` (`qemu`, `clh`, `fc`, `qemu-nvidia-gpu`, ...).
    pub name: String,
    /// The VMM its `[hypervisor.<x>]` table configures; `None` for one noded has no name for.
    pub hypervisor: Option<Hypervisor>,
    pub config: PathBuf,
    /// `[hypervisor.*] path` from the config, when it names one.
    pub binary: Option<PathBuf>,
    /// Whether that binary exists; a config without its VMM is not a usable hypervisor.
    pub binary_present: bool,
}

/// What `inspect` found; serialisable for `installer check --output json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KataInstall {
    pub root: PathBuf,
    pub version: Option<String>,
    pub shim: PathBuf,
    pub hypervisors: Vec<HypervisorConfig>,
    pub kernels: Vec<PathBuf>,
    pub initrds: Vec<PathBuf>,
    /// `kata-runtime` (Go runtime) or `kata-ctl` (runtime-rs), whichever drives the VM factory.
    pub factory_tool: Option<PathBuf>,
}

impl KataInstall {
    /// Hypervisors whose VMM binary is really there.
    pub fn usable_hypervisors(&self) -> impl Iterator<Item = &HypervisorConfig> {
        self.hypervisors.iter().filter(|h| h.binary_present)
    }
}

impl KataLayout {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn shim(&self) -> PathBuf {
        self.root.join(SHIM)
    }

    pub fn defaults_dir(&self) -> PathBuf {
        self.root.join(DEFAULTS_DIR)
    }

    pub fn assets_dir(&self) -> PathBuf {
        self.root.join(ASSETS_DIR)
    }

    /// `configuration-<name>.toml`, e.g. `config("qemu")`.
    pub fn config(&self, hypervisor: &str) -> PathBuf {
        self.defaults_dir()
            .join(format!("configuration-{hypervisor}.toml"))
    }

    pub fn warm_config(&self) -> PathBuf {
        self.defaults_dir().join(WARM_CONFIG)
    }

    /// The binary that runs `factory init|status|destroy`: `kata-runtime` when the Go runtime is
    /// installed, else `kata-ctl` (runtime-rs only releases).
    pub fn factory_tool(&self) -> Option<PathBuf> {
        [KATA_RUNTIME, KATA_CTL]
            .into_iter()
            .map(|p| self.root.join(p))
            .find(|p| is_executable(p))
    }

    /// Checks the shape of the install without running anything but `--version`. A root without the
    /// shim or without any configuration is not a Kata install.
    pub fn inspect(&self) -> Result<KataInstall, KataError> {
        let shim = self.shim();
        if !is_executable(&shim) {
            return Err(KataError::NotInstalled {
                root: self.root.clone(),
                missing: shim,
            });
        }
        let defaults = self.defaults_dir();
        let mut hypervisors = Vec::new();
        for path in list_dir(&defaults)? {
            let Some(name) = file_name(&path)
                .strip_prefix("configuration-")
                .and_then(|n| n.strip_suffix(".toml"))
                .map(str::to_owned)
            else {
                continue;
            };
            // Our own derived config is not a hypervisor Kata shipped.
            if file_name(&path) == WARM_CONFIG {
                continue;
            }
            let (hypervisor, binary) = hypervisor_table(&path)?;
            let binary_present = binary.as_deref().is_some_and(is_executable);
            hypervisors.push(HypervisorConfig {
                name,
                hypervisor,
                config: path,
                binary,
                binary_present,
            });
        }
        if hypervisors.is_empty() {
            return Err(KataError::NotInstalled {
                root: self.root.clone(),
                missing: defaults.join("configuration-*.toml"),
            });
        }
        hypervisors.sort_by(|a, b| a.name.cmp(&b.name));
        let assets = list_dir(&self.assets_dir())?;
        let kernels = assets
            .iter()
            .filter(|p| file_name(p).starts_with("vmlinux") || file_name(p).starts_with("vmlinuz"))
            .cloned()
            .collect();
        let initrds = assets
            .iter()
            .filter(|p| {
                let n = file_name(p);
                n.starts_with("kata-") && n.ends_with(".initrd")
                    || n.starts_with("kata-containers-initrd")
            })
            .cloned()
            .collect();
        let factory_tool = self.factory_tool();
        let version = factory_tool.as_deref().and_then(read_version);
        Ok(KataInstall {
            root: self.root.clone(),
            version,
            shim,
            hypervisors,
            kernels,
            initrds,
            factory_tool,
        })
    }

    /// The installed Kata version, from `kata-runtime --version` or `kata-ctl version`.
    pub fn version(&self) -> Option<String> {
        self.factory_tool().as_deref().and_then(read_version)
    }
}

fn file_name(p: &Path) -> &str {
    p.file_name().and_then(|n| n.to_str()).unwrap_or_default()
}

fn list_dir(dir: &Path) -> Result<Vec<PathBuf>, KataError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(KataError::Io {
                path: dir.to_path_buf(),
                source,
            });
        }
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| KataError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

pub(crate) fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The first `[hypervisor.<x>]` table of a Kata config: which VMM `<x>` is, and its `path`.
fn hypervisor_table(config: &Path) -> Result<(Option<Hypervisor>, Option<PathBuf>), KataError> {
    let text = std::fs::read_to_string(config).map_err(|source| KataError::Io {
        path: config.to_path_buf(),
        source,
    })?;
    let doc: toml_edit::DocumentMut =
        text.parse()
            .map_err(|e: toml_edit::TomlError| KataError::InvalidConfig {
                path: config.to_path_buf(),
                message: crate::config::one_line(&e.to_string()),
            })?;
    let table = doc
        .get("hypervisor")
        .and_then(|h| h.as_table_like())
        .and_then(|h| h.iter().next());
    let hypervisor = table.and_then(|(key, _)| Hypervisor::of_kata_table(key));
    let path = table
        .and_then(|(_, t)| t.get("path"))
        .and_then(|p| p.as_str())
        .map(PathBuf::from);
    Ok((hypervisor, path))
}

/// Kata prints e.g. `kata-runtime  : 3.27.0` (Go) or `kata-ctl version: 3.27.0` (runtime-rs).
fn read_version(tool: &Path) -> Option<String> {
    let arg = if file_name(tool) == "kata-ctl" {
        "version"
    } else {
        "--version"
    };
    let out = Command::new(tool).arg(arg).output().ok()?;
    if !out.status.success() {
        return None;
    }
    parse_version(&String::from_utf8_lossy(&out.stdout))
}

pub(crate) fn parse_version(text: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        let key = key.trim();
        (key.starts_with("kata-runtime") || key.starts_with("kata-ctl") || key == "version")
            .then(|| value.split_whitespace().next().map(str::to_owned))
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_formats() {
        assert_eq!(
            parse_version("kata-runtime  : 3.27.0\n   commit   : abc\n   OCI specs: 1.1\n"),
            Some("3.27.0".into())
        );
        assert_eq!(
            parse_version("kata-ctl version: 3.5.0-rc0\n"),
            Some("3.5.0-rc0".into())
        );
        assert_eq!(parse_version("nothing here\n"), None);
    }

    #[test]
    fn the_hypervisor_table_names_the_vmm() {
        let dir = tempfile::tempdir().expect("tempdir");
        for (table, expected) in [
            ("qemu", Some(Hypervisor::Qemu)),
            ("clh", Some(Hypervisor::CloudHypervisor)),
            ("firecracker", Some(Hypervisor::Firecracker)),
            ("dragonball", None),
        ] {
            let config = dir.path().join(format!("configuration-{table}.toml"));
            std::fs::write(
                &config,
                format!("[hypervisor.{table}]\npath = \"/v/{table}\"\n"),
            )
            .expect("write config");
            let (hypervisor, path) = hypervisor_table(&config).expect("parse");
            assert_eq!(hypervisor, expected, "{table}");
            assert_eq!(path, Some(PathBuf::from(format!("/v/{table}"))));
        }
    }
}
