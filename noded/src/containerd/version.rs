//! Which containerd is installed: decides the config strategy (in-place edit for 1.x, drop-in for 2.x).
//!
//! A running containerd is asked through its Version API ([`ContainerdVersion::query`]): noded's
//! DaemonSet image has no containerd binary, and a binary found on some PATH may not be the daemon that
//! reads the config. `containerd --version` is only for where containerd is not running yet (`installer
//! boot`, or local mode before noded starts its private containerd).

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
    #[error("containerd at {socket}: Version API: {detail}")]
    Api { socket: String, detail: String },
}

/// How long [`ContainerdVersion::query`] waits for the daemon to answer.
pub const QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

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

/// What identifies an installed binary cheaply: if path, size and mtime match, so does its version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct BinaryId {
    path: std::path::PathBuf,
    size: u64,
    mtime_ns: i128,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct Cached {
    binary: BinaryId,
    version: ContainerdVersion,
}

fn binary_id(binary: &Path) -> Option<BinaryId> {
    let path = if binary.components().count() > 1 {
        binary.to_path_buf()
    } else {
        std::env::split_paths(&std::env::var_os("PATH")?)
            .map(|d| d.join(binary))
            .find(|p| p.is_file())?
    };
    let meta = std::fs::metadata(&path).ok()?;
    let mtime = meta.modified().ok()?;
    let mtime_ns = match mtime.duration_since(std::time::UNIX_EPOCH) {
        Ok(d) => i128::try_from(d.as_nanos()).unwrap_or(i128::MAX),
        Err(e) => -i128::try_from(e.duration().as_nanos()).unwrap_or(i128::MAX),
    };
    Some(BinaryId {
        path,
        size: meta.len(),
        mtime_ns,
    })
}

impl ContainerdVersion {
    /// Asks the containerd listening on `socket` for its version (containerd's `version` service).
    pub async fn query(socket: &Path) -> Result<Self, VersionError> {
        let api = |detail: String| VersionError::Api {
            socket: socket.display().to_string(),
            detail,
        };
        let ask = async {
            let channel = containerd_client::connect(socket)
                .await
                .map_err(|e| api(format!("cannot connect: {e}")))?;
            containerd_client::services::v1::version_client::VersionClient::new(channel)
                .version(())
                .await
                .map_err(|s| api(s.message().to_owned()))
        };
        let reply = tokio::time::timeout(QUERY_TIMEOUT, ask)
            .await
            .map_err(|_| api(format!("no answer within {QUERY_TIMEOUT:?}")))??
            .into_inner();
        reply.version.parse()
    }

    /// The daemon's answer when `socket` is given and containerd listens there; otherwise (no socket
    /// file, nobody listening: containerd not started yet) `binary --version` through the cache.
    pub async fn detect_running(
        socket: Option<&Path>,
        binary: &Path,
        cache: &Path,
    ) -> Result<Self, VersionError> {
        if let Some(socket) = socket
            && socket.exists()
        {
            match Self::query(socket).await {
                Ok(v) => return Ok(v),
                // A socket file nobody listens on is a stopped containerd: fall back to the binary.
                Err(VersionError::Api { detail, .. }) if detail.starts_with("cannot connect") => {
                    tracing::debug!(socket = %socket.display(), %detail, "containerd not answering; asking the binary");
                }
                Err(e) => return Err(e),
            }
        }
        // Runs the Go binary and waits for it: never on the async workers (2 threads).
        let (b, c) = (binary.to_path_buf(), cache.to_path_buf());
        tokio::task::spawn_blocking(move || Self::detect_cached(&b, &c))
            .await
            .map_err(|e| VersionError::Spawn {
                binary: binary.display().to_string(),
                source: std::io::Error::other(e),
            })?
    }

    /// Like [`detect`](Self::detect), but remembers the answer in `cache` keyed by the binary's path,
    /// size and mtime: starting the Go binary costs ~30-50 ms, the whole no-change apply ~1 ms. An
    /// upgraded containerd has a new mtime, so the cache cannot go stale.
    pub fn detect_cached(binary: &Path, cache: &Path) -> Result<Self, VersionError> {
        let id = binary_id(binary);
        if let Some(id) = &id
            && let Ok(bytes) = std::fs::read(cache)
            && let Ok(c) = serde_json::from_slice::<Cached>(&bytes)
            && &c.binary == id
        {
            return Ok(c.version);
        }
        let version = Self::detect(binary)?;
        if let Some(binary) = id
            && let Ok(bytes) = serde_json::to_vec(&Cached { binary, version })
        {
            // A cache that cannot be written only costs the next run the slow path.
            let _ = super::atomic::write_atomic(cache, &bytes, 0o644);
        }
        Ok(version)
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

#[cfg(test)]
mod cache_tests {
    use super::*;

    /// A fake `containerd` script: the cache answers while the binary is unchanged, and a replaced
    /// binary (new size/mtime) is asked again.
    #[test]
    fn cache_follows_the_binary() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("containerd");
        let calls = dir.path().join("calls");
        let write = |v: &str| {
            std::fs::write(
                &bin,
                format!("#!/bin/sh\necho x >> {}\necho containerd github.com/containerd/containerd {v} abc\n", calls.display()),
            )
            .expect("write fake");
            std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        };
        let cache = dir.path().join("cache.json");
        write("1.6.20");
        let count = || {
            std::fs::read_to_string(&calls)
                .map(|s| s.lines().count())
                .unwrap_or(0)
        };
        assert_eq!(
            ContainerdVersion::detect_cached(&bin, &cache)
                .expect("v")
                .minor,
            6
        );
        assert_eq!(
            ContainerdVersion::detect_cached(&bin, &cache)
                .expect("v")
                .minor,
            6
        );
        assert_eq!(count(), 1, "second call served from the cache");
        write("v2.0.44");
        assert_eq!(
            ContainerdVersion::detect_cached(&bin, &cache)
                .expect("v")
                .major,
            2
        );
        assert_eq!(count(), 2, "a replaced binary is asked again");
    }

    /// No containerd on the socket (no file, or a file nobody listens on): the binary is asked.
    #[tokio::test]
    async fn a_socket_nobody_answers_falls_back_to_the_binary() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("containerd");
        std::fs::write(
            &bin,
            "#!/bin/sh\necho containerd github.com/containerd/containerd 1.7.24~ds1 x\n",
        )
        .expect("write fake");
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let cache = dir.path().join("cache.json");
        let missing = dir.path().join("none.sock");
        let v = ContainerdVersion::detect_running(Some(&missing), &bin, &cache)
            .await
            .expect("binary asked");
        assert_eq!((v.major, v.minor), (1, 7));
        // A stale socket file: bound once, its listener gone.
        let stale = dir.path().join("stale.sock");
        drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
        assert!(stale.exists());
        let v = ContainerdVersion::detect_running(Some(&stale), &bin, &cache)
            .await
            .expect("binary asked");
        assert_eq!(v.minor, 7);
    }
}
