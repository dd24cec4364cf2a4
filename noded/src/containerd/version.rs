//! Which containerd is installed: decides the config strategy (in-place edit for 1.x, drop-in for 2.x).

use std::fmt;
use std::path::Path;
use std::str::FromStr;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct ContainerdVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum VersionError {
    #[error("cannot run `{binary} --version`: {source}")]
    Spawn {
        binary: String,
        source: std::io::Error,
    },
    #[error("cannot parse a containerd version from `{0}` (expected e.g. 1.6.20 or v2.0.0)")]
    Parse(String),
}

impl ContainerdVersion {
    /// containerd ≥ 2.0 deep-merges imported files; 1.x replaces whole plugin sections with them.
    pub fn merges_imports(self) -> bool {
        self.major >= 2
    }

    /// Runs `<binary> --version` ("containerd github.com/containerd/containerd 1.6.20~ds1 <commit>").
    pub fn detect(binary: &Path) -> Result<Self, VersionError> {
        let out = std::process::Command::new(binary)
            .arg("--version")
            .output()
            .map_err(|source| VersionError::Spawn {
                binary: binary.display().to_string(),
                source,
            })?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .find_map(|w| w.parse().ok())
            .ok_or_else(|| VersionError::Parse(text.trim().to_owned()))
    }
}

impl FromStr for ContainerdVersion {
    type Err = VersionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || VersionError::Parse(s.to_owned());
        let core = s.strip_prefix('v').unwrap_or(s);
        // Distribution suffixes ("1.6.20~ds1", "1.7.2-0ubuntu1", "2.0.0-rc.1") follow the patch number.
        let core = core
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()
            .ok_or_else(err)?;
        let mut parts = core.split('.').map(str::parse::<u32>);
        let (Some(Ok(major)), Some(Ok(minor))) = (parts.next(), parts.next()) else {
            return Err(err());
        };
        let patch = match parts.next() {
            Some(Ok(p)) => p,
            None => 0,
            Some(Err(_)) => return Err(err()),
        };
        if major == 0 || major > 9 {
            return Err(err());
        }
        Ok(Self {
            major,
            minor,
            patch,
        })
    }
}

impl fmt::Display for ContainerdVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_distribution_strings() {
        let v: ContainerdVersion = "1.6.20~ds1".parse().expect("debian");
        assert_eq!((v.major, v.minor, v.patch), (1, 6, 20));
        assert!(!v.merges_imports());
        let v: ContainerdVersion = "v2.0.4".parse().expect("upstream 2.x");
        assert!(v.merges_imports());
        assert!(
            "github.com/containerd/containerd"
                .parse::<ContainerdVersion>()
                .is_err()
        );
        assert!("1".parse::<ContainerdVersion>().is_err());
    }
}
