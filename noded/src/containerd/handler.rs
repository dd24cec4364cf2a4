//! The Kata runtime handlers noded registers and the exact containerd keys each one gets.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use super::snapshotter::Snapshotter;
use super::version::ContainerdVersion;
use crate::hypervisor::Hypervisor;

/// A Kata runtime handler noded knows how to register. Names match kata-deploy's, so existing
/// RuntimeClasses and pod specs keep working after a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(into = "String")]
pub enum KataHandler {
    Qemu,
    QemuWarm,
    Clh,
    Fc,
}

impl KataHandler {
    pub const ALL: [KataHandler; 4] = [Self::Qemu, Self::QemuWarm, Self::Clh, Self::Fc];

    pub fn name(self) -> &'static str {
        match self {
            Self::Qemu => "kata-qemu",
            Self::QemuWarm => "kata-qemu-warm",
            Self::Clh => "kata-clh",
            Self::Fc => "kata-fc",
        }
    }

    /// The VMM this handler's Kata configuration drives.
    pub fn hypervisor(self) -> Hypervisor {
        match self {
            Self::Qemu | Self::QemuWarm => Hypervisor::Qemu,
            Self::Clh => Hypervisor::CloudHypervisor,
            Self::Fc => Hypervisor::Firecracker,
        }
    }

    /// Suffix of Kata's `configuration-<x>.toml`; `qemu-warm` is the file noded derives itself.
    pub fn config_flavour(self) -> &'static str {
        match self {
            Self::QemuWarm => "qemu-warm",
            other => other.hypervisor().name(),
        }
    }

    /// Served from Kata's VM factory template (clones), so noded keeps that template built.
    pub fn is_warm(self) -> bool {
        self == Self::QemuWarm
    }

    /// What this handler's containerd runtime table must contain.
    pub fn spec(self, kata_root: &Path) -> HandlerSpec {
        HandlerSpec {
            name: self.name().to_owned(),
            runtime_type: format!("io.containerd.{}.v2", self.name()),
            runtime_path: kata_root.join("bin/containerd-shim-kata-v2"),
            config_path: kata_root.join(format!(
                "share/defaults/kata-containers/configuration-{}.toml",
                self.config_flavour()
            )),
            // Firecracker has no shared filesystem: Kata needs a block-device snapshotter for it.
            snapshotter: (self.hypervisor() == Hypervisor::Firecracker)
                .then_some(Snapshotter::Devmapper),
        }
    }
}

impl fmt::Display for KataHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl From<KataHandler> for String {
    fn from(h: KataHandler) -> String {
        h.name().to_owned()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown runtime handler `{0}`: expected one of kata-qemu, kata-qemu-warm, kata-clh, kata-fc"
)]
pub struct UnknownHandler(pub String);

impl FromStr for KataHandler {
    type Err = UnknownHandler;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|h| h.name() == s)
            .ok_or_else(|| UnknownHandler(s.to_owned()))
    }
}

/// The one entry of every handler's `container_annotations`, as kata-deploy registers its handlers.
pub const CONTAINER_ANNOTATION: &str = "io.kubernetes.container.terminationMessage*";

/// The keys of one handler's runtime table (DESIGN section 5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandlerSpec {
    pub name: String,
    pub runtime_type: String,
    pub runtime_path: PathBuf,
    pub config_path: PathBuf,
    /// Rendered by [`to_table`](Self::to_table) (runtime table, containerd >= 1.7) and, on containerd
    /// 2.x, also as the images plugin's `runtime_platforms` entry ([`crate::containerd::document`]).
    pub snapshotter: Option<Snapshotter>,
}

impl HandlerSpec {
    /// The handler as a TOML table body, in the order an operator reads it.
    pub fn to_table(&self) -> toml_edit::Table {
        let mut t = toml_edit::Table::new();
        t.insert("runtime_type", toml_edit::value(self.runtime_type.as_str()));
        t.insert(
            "runtime_path",
            toml_edit::value(self.runtime_path.to_string_lossy().as_ref()),
        );
        t.insert("privileged_without_host_devices", toml_edit::value(true));
        let mut annotations = toml_edit::Array::new();
        annotations.push("io.katacontainers.*");
        t.insert("pod_annotations", toml_edit::value(annotations));
        // As kata-deploy writes it (tools/packaging/kata-deploy/binary/src/runtime/containerd.rs):
        // the kubelet's termination-message annotations reach the shim.
        let mut container = toml_edit::Array::new();
        container.push(CONTAINER_ANNOTATION);
        t.insert("container_annotations", toml_edit::value(container));
        if let Some(s) = &self.snapshotter {
            t.insert("snapshotter", toml_edit::value(s.name()));
        }
        let mut options = toml_edit::Table::new();
        options.insert(
            "ConfigPath",
            toml_edit::value(self.config_path.to_string_lossy().as_ref()),
        );
        t.insert("options", toml_edit::Item::Table(options));
        t
    }
}

impl HandlerSpec {
    /// The body of `[plugins."io.containerd.cri.v1.images".runtime_platforms.<name>]` that containerd
    /// 2.x needs to unpack this handler's images with its snapshotter (None: no snapshotter pinned).
    /// `platform` stays unset: containerd then uses the node's default platform, as for every other
    /// handler; naming one here would pin an architecture.
    pub fn runtime_platform_table(&self) -> Option<toml_edit::Table> {
        let snapshotter = self.snapshotter.as_ref()?;
        let mut t = toml_edit::Table::new();
        t.insert("snapshotter", toml_edit::value(snapshotter.name()));
        Some(t)
    }
}

/// containerd 1.x's built-in `runc` handler as an explicit table, for when noded creates the runtimes
/// map (which replaces the built-in one): runc's effective config must not change. 1.7 gives the
/// built-in runc `sandbox_mode = "podsandbox"`; a table without it would read as `""`.
pub fn builtin_runc_table(containerd: ContainerdVersion) -> toml_edit::Table {
    let mut runc = toml_edit::Table::new();
    runc.insert("runtime_type", toml_edit::value("io.containerd.runc.v2"));
    if containerd.major == 1 && containerd.minor >= 7 {
        runc.insert("sandbox_mode", toml_edit::value("podsandbox"));
    }
    runc
}

/// Parses `--runtime` values; an empty list means the default pair.
pub fn parse_handlers(names: &[String]) -> Result<Vec<KataHandler>, UnknownHandler> {
    let handlers: Vec<KataHandler> = names.iter().map(|n| n.parse()).collect::<Result<_, _>>()?;
    Ok(normalize(&handlers))
}

/// The handlers to register: sorted, each once; an empty list means the default pair.
pub fn normalize(handlers: &[KataHandler]) -> Vec<KataHandler> {
    let mut out: Vec<KataHandler> = if handlers.is_empty() {
        vec![KataHandler::Qemu, KataHandler::QemuWarm]
    } else {
        handlers.to_vec()
    };
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_points_into_kata_root() {
        let s = KataHandler::QemuWarm.spec(Path::new("/opt/kata"));
        assert_eq!(s.runtime_type, "io.containerd.kata-qemu-warm.v2");
        assert_eq!(
            s.config_path,
            Path::new("/opt/kata/share/defaults/kata-containers/configuration-qemu-warm.toml")
        );
        assert_eq!(s.snapshotter, None);
        assert_eq!(
            KataHandler::Fc.spec(Path::new("/k")).snapshotter,
            Some(Snapshotter::Devmapper)
        );
    }

    #[test]
    fn parse_rejects_unknown_and_dedups() {
        assert!(parse_handlers(&["kata-foo".into()]).is_err());
        let hs = parse_handlers(&["kata-clh".into(), "kata-qemu".into(), "kata-clh".into()])
            .expect("valid");
        assert_eq!(hs, vec![KataHandler::Qemu, KataHandler::Clh]);
    }
}
