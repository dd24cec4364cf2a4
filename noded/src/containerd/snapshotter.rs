//! The snapshotter a handler's containers (and, on containerd 2.x, its images) use, and which
//! containerd series can honour it.
//!
//! Verified against containerd's source (tags v1.6.20, v1.7.0, v1.7.4, v2.0.0, v2.1.0, v2.1.9):
//! - `Runtime.Snapshotter` (`snapshotter` on a runtime table) exists from v1.7.0 (commit "Added support
//!   for runtime level snapshotter, issue 6657"); 1.6's `Runtime` has no such field and its TOML decoder
//!   drops the key, so a 1.6 node would silently unpack with the default snapshotter.
//! - containerd 2.x reads the runtime table's `snapshotter` for container rootfs (`RuntimeSnapshotter`)
//!   but unpacks pulled images with the images plugin's `runtime_platforms.<handler>.snapshotter`
//!   (`ImageConfig.RuntimePlatforms`, `ImagePlatform{platform, snapshotter}`). Its version 2 → 3
//!   migration does not fill `runtime_platforms` (2.1.9 looks for a `snapshot` key and writes
//!   `runtime_platform`), so noded writes it itself on every 2.x node.
//! - Built-in snapshotter plugins: blockfile from 1.7.4, erofs from 2.1.0; overlayfs, native, btrfs
//!   and devmapper in every series. nydus is an external proxy plugin (`proxy_plugins.<name>`).

use std::fmt;
use std::str::FromStr;

use super::handler::HandlerSpec;
use super::version::ContainerdVersion;

/// A snapshotter a handler can be pinned to.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(into = "String", try_from = "String")]
pub enum Snapshotter {
    Overlayfs,
    Native,
    Btrfs,
    /// Block devices from a thin pool; Firecracker's only option (no shared filesystem).
    Devmapper,
    /// Loop-mounted files, one per snapshot.
    Blockfile,
    /// EROFS blobs (experimental in containerd 2.1).
    Erofs,
    /// nydus-snapshotter through `proxy_plugins`: `nydus`, or `nydus-<suffix>` for a side-by-side
    /// install as kata-deploy names it (`MULTI_INSTALL_SUFFIX`).
    Nydus {
        suffix: Option<String>,
    },
}

impl Snapshotter {
    /// Every built-in value and plain nydus, for tests and messages.
    pub fn all() -> Vec<Snapshotter> {
        vec![
            Self::Overlayfs,
            Self::Native,
            Self::Btrfs,
            Self::Devmapper,
            Self::Blockfile,
            Self::Erofs,
            Self::Nydus { suffix: None },
        ]
    }

    /// The plugin name containerd's config uses.
    pub fn name(&self) -> String {
        match self {
            Self::Overlayfs => "overlayfs".into(),
            Self::Native => "native".into(),
            Self::Btrfs => "btrfs".into(),
            Self::Devmapper => "devmapper".into(),
            Self::Blockfile => "blockfile".into(),
            Self::Erofs => "erofs".into(),
            Self::Nydus { suffix: None } => "nydus".into(),
            Self::Nydus { suffix: Some(s) } => format!("nydus-{s}"),
        }
    }

    /// The first containerd version with this snapshotter built in (proxy plugins: any version).
    fn built_in_since(&self) -> Option<(u32, u32, u32)> {
        match self {
            Self::Blockfile => Some((1, 7, 4)),
            Self::Erofs => Some((2, 1, 0)),
            _ => None,
        }
    }

    /// Why `containerd` cannot give handler `handler` this snapshotter, if it cannot.
    pub fn check(
        &self,
        handler: &str,
        containerd: ContainerdVersion,
    ) -> Result<(), SnapshotterError> {
        let v = (containerd.major, containerd.minor, containerd.patch);
        if v < (1, 7, 0) {
            return Err(SnapshotterError::NoPerRuntimeSnapshotter {
                handler: handler.to_owned(),
                snapshotter: self.name(),
                containerd,
            });
        }
        if let Some(since) = self.built_in_since()
            && v < since
        {
            return Err(SnapshotterError::NotBuiltIn {
                handler: handler.to_owned(),
                snapshotter: self.name(),
                containerd,
                since: format!("{}.{}.{}", since.0, since.1, since.2),
            });
        }
        Ok(())
    }
}

/// Refuses the first spec whose snapshotter `containerd` cannot honour. Every configurator calls it
/// before writing (a key containerd would ignore is worse than a clear refusal).
pub fn check_specs(
    specs: &[HandlerSpec],
    containerd: ContainerdVersion,
) -> Result<(), SnapshotterError> {
    for spec in specs {
        if let Some(s) = &spec.snapshotter {
            s.check(&spec.name, containerd)?;
        }
    }
    Ok(())
}

impl fmt::Display for Snapshotter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name())
    }
}

impl From<Snapshotter> for String {
    fn from(s: Snapshotter) -> String {
        s.name()
    }
}

/// A handler's snapshotter that the node's containerd cannot honour: bad input, exit 2.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SnapshotterError {
    #[error(
        "unknown snapshotter `{0}`: expected one of overlayfs, native, btrfs, devmapper, blockfile, erofs, nydus, nydus-<suffix>"
    )]
    Unknown(String),
    #[error(
        "handler `{handler}`: snapshotter `{snapshotter}` needs containerd 1.7 or later (containerd {containerd} has no per-runtime snapshotter and would ignore the key)"
    )]
    NoPerRuntimeSnapshotter {
        handler: String,
        snapshotter: String,
        containerd: ContainerdVersion,
    },
    #[error(
        "handler `{handler}`: snapshotter `{snapshotter}` is built into containerd {since} and later, not containerd {containerd}"
    )]
    NotBuiltIn {
        handler: String,
        snapshotter: String,
        containerd: ContainerdVersion,
        since: String,
    },
}

impl FromStr for Snapshotter {
    type Err = SnapshotterError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "overlayfs" => Self::Overlayfs,
            "native" => Self::Native,
            "btrfs" => Self::Btrfs,
            "devmapper" => Self::Devmapper,
            "blockfile" => Self::Blockfile,
            "erofs" => Self::Erofs,
            "nydus" => Self::Nydus { suffix: None },
            other => match other.strip_prefix("nydus-") {
                // The suffix becomes part of a plugin name and a TOML key: keep it to what
                // kata-deploy's suffixes use.
                Some(suffix)
                    if !suffix.is_empty()
                        && suffix
                            .chars()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-') =>
                {
                    Self::Nydus {
                        suffix: Some(suffix.to_owned()),
                    }
                }
                _ => return Err(SnapshotterError::Unknown(other.to_owned())),
            },
        })
    }
}

impl TryFrom<String> for Snapshotter {
    type Error = SnapshotterError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> ContainerdVersion {
        s.parse().expect("version")
    }

    #[test]
    fn names_round_trip() {
        for s in Snapshotter::all() {
            assert_eq!(s.name().parse::<Snapshotter>().expect("parses"), s);
        }
        assert_eq!(
            "nydus-328".parse::<Snapshotter>().expect("suffix"),
            Snapshotter::Nydus {
                suffix: Some("328".into())
            }
        );
        for bad in [
            "",
            "zfs",
            "aufs",
            "nydus-",
            "nydus-A",
            "nydus-x y",
            "Overlayfs",
        ] {
            assert!(bad.parse::<Snapshotter>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn series_support() {
        for s in Snapshotter::all() {
            let e = s.check("kata-x", v("1.6.20")).expect_err("1.6 refuses");
            assert!(e.to_string().contains("kata-x") && e.to_string().contains("1.6.20"));
            assert!(s.check("kata-x", v("2.1.9")).is_ok(), "{s}");
        }
        assert!(Snapshotter::Blockfile.check("h", v("1.7.3")).is_err());
        assert!(Snapshotter::Blockfile.check("h", v("1.7.4")).is_ok());
        assert!(Snapshotter::Erofs.check("h", v("2.0.4")).is_err());
        assert!(Snapshotter::Erofs.check("h", v("1.7.24")).is_err());
        assert!(Snapshotter::Devmapper.check("h", v("1.7.0")).is_ok());
    }
}
