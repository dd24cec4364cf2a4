//! The hypervisors noded knows by name. One type for Kata's runtime handlers and configurations,
//! the `/proc` scan and noded's own VM engine, so "which VMM is this" is answered the same way
//! everywhere.
//!
//! The names are Kata's short ones (`qemu`, `clh`, `fc`): what runtime handler names (`kata-clh`),
//! configuration files (`configuration-clh.toml`) and metric labels already use.

use std::fmt;
use std::str::FromStr;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Hypervisor {
    #[serde(rename = "qemu")]
    Qemu,
    #[serde(rename = "clh")]
    CloudHypervisor,
    #[serde(rename = "fc")]
    Firecracker,
}

impl Hypervisor {
    pub const ALL: [Hypervisor; 3] = [Self::Qemu, Self::CloudHypervisor, Self::Firecracker];

    /// Kata's short name: `qemu`, `clh`, `fc`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Qemu => "qemu",
            Self::CloudHypervisor => "clh",
            Self::Firecracker => "fc",
        }
    }

    /// The hypervisor a process runs, by argv[0]'s file name; `None` for anything else.
    pub fn of_argv0(argv0: &str) -> Option<Hypervisor> {
        let name = argv0.rsplit('/').next().unwrap_or(argv0);
        if name.starts_with("qemu-system-") || name == "qemu-kvm" {
            Some(Self::Qemu)
        } else if name == "cloud-hypervisor" {
            Some(Self::CloudHypervisor)
        } else if name == "firecracker" || name == "jailer" {
            Some(Self::Firecracker)
        } else {
            None
        }
    }

    /// The hypervisor a Kata configuration drives, from its `[hypervisor.<key>]` table; `None` for
    /// VMMs noded has no name for (dragonball, stratovirt, remote).
    pub fn of_kata_table(key: &str) -> Option<Hypervisor> {
        match key {
            "qemu" => Some(Self::Qemu),
            "clh" | "cloud-hypervisor" => Some(Self::CloudHypervisor),
            "fc" | "firecracker" => Some(Self::Firecracker),
            _ => None,
        }
    }
}

impl fmt::Display for Hypervisor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown hypervisor `{0}`: expected one of qemu, clh, fc")]
pub struct UnknownHypervisor(pub String);

impl FromStr for Hypervisor {
    type Err = UnknownHypervisor;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|h| h.name() == s)
            .ok_or_else(|| UnknownHypervisor(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_display_serde_and_from_str() {
        for h in Hypervisor::ALL {
            assert_eq!(h.to_string().parse::<Hypervisor>(), Ok(h));
            let json = serde_json::to_string(&h).expect("serialize");
            assert_eq!(json, format!("\"{}\"", h.name()));
            assert_eq!(serde_json::from_str::<Hypervisor>(&json).ok(), Some(h));
        }
        assert!("cloud-hypervisor".parse::<Hypervisor>().is_err());
    }

    #[test]
    fn processes_and_kata_tables() {
        assert_eq!(
            Hypervisor::of_argv0("/usr/bin/qemu-system-x86_64"),
            Some(Hypervisor::Qemu)
        );
        assert_eq!(
            Hypervisor::of_argv0("/opt/kata/bin/cloud-hypervisor"),
            Some(Hypervisor::CloudHypervisor)
        );
        assert_eq!(
            Hypervisor::of_argv0("jailer"),
            Some(Hypervisor::Firecracker)
        );
        assert_eq!(Hypervisor::of_argv0("containerd-shim-kata-v2"), None);
        assert_eq!(
            Hypervisor::of_kata_table("firecracker"),
            Some(Hypervisor::Firecracker)
        );
        assert_eq!(Hypervisor::of_kata_table("dragonball"), None);
    }
}
