//! Installer test helpers: a node-like root tree, a Kata tarball built from the fake Kata layout, and a
//! byte-exact snapshot of a tree.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

pub use testkit::fake_kata;
pub use testkit::require::require;

pub const ORIGINAL_CONTAINERD: &str = "# containerd config shipped by the image\nversion = 2\n\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.k8s.io/pause:3.9\"\n";

/// A temp dir holding `root/` (the node) and `build/` (tarball sources).
pub struct Node {
    pub dir: tempfile::TempDir,
}

impl Node {
    /// A root that looks like a node before bake: /etc with an existing containerd config and an
    /// operator's own file where bake writes one, /proc fixtures, /usr/local without bin/.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        for d in [
            "etc/containerd",
            "etc/modules-load.d",
            "etc/systemd/system",
            "usr/local",
            "proc",
            "run",
            "var/lib",
        ] {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
        }
        std::fs::write(root.join("etc/containerd/config.toml"), ORIGINAL_CONTAINERD).expect("w");
        // Not ours: must be backed up by bake and restored by uninstall, byte for byte, mode too.
        std::fs::write(
            root.join("etc/modules-load.d/noded.conf"),
            "# operator's own file\nbr_netfilter\n",
        )
        .expect("w");
        std::fs::set_permissions(
            root.join("etc/modules-load.d/noded.conf"),
            std::fs::Permissions::from_mode(0o600),
        )
        .expect("chmod");
        std::fs::write(
            root.join("proc/modules"),
            "kvm 1142784 0 - Live 0x0000000000000000\nvhost_net 36864 0 - Live 0x0000000000000000\n",
        )
        .expect("w");
        std::fs::write(
            root.join("proc/meminfo"),
            "MemTotal:       24683600 kB\nMemFree:        21000000 kB\nMemAvailable:   23000000 kB\n",
        )
        .expect("w");
        // The node's containerd is the real Debian one (check runs `containerd --version`).
        if let Some(real) = require("containerd") {
            std::fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
            std::os::unix::fs::symlink(real, root.join("usr/bin/containerd")).expect("symlink");
        }
        std::fs::write(
            root.join("proc/cpuinfo"),
            "processor\t: 0\nflags\t\t: fpu vme de pse vmx\n",
        )
        .expect("w");
        Self { dir }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// `kata-static-<version>.tar.gz` with the real `opt/kata/...` layout; configs name the node's
    /// install path. `mutate` can damage the tree before packing.
    pub fn kata_tarball(&self, version: &str, mutate: impl FnOnce(&Path)) -> (PathBuf, String) {
        let build = self.dir.path().join(format!("build-{version}"));
        let tree = build.join("opt/kata");
        fake_kata::FakeKata::write(&tree, &self.root().join("opt/kata"), version);
        mutate(&tree);
        let tarball = self
            .dir
            .path()
            .join(format!("kata-static-{version}-amd64.tar.gz"));
        let sha = fake_kata::pack_release(&build, &tarball).expect("pack the Kata tarball");
        (tarball, sha)
    }

    pub fn fake_noded(&self) -> PathBuf {
        let p = self.dir.path().join("noded-artifact");
        std::fs::write(&p, b"\x7fELF fake noded binary").expect("w");
        p
    }
}

pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// path -> (type, mode, content hash or link target): any difference in bytes, mode or shape shows.
pub fn snapshot(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, String>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .expect("readdir")
        .map(|e| e.expect("entry").path())
        .collect();
    entries.sort();
    for p in entries {
        let meta = std::fs::symlink_metadata(&p).expect("meta");
        let rel = p.strip_prefix(root).expect("prefix").to_path_buf();
        let mode = meta.mode() & 0o7777;
        let desc = if meta.file_type().is_symlink() {
            format!(
                "link {}",
                std::fs::read_link(&p).expect("readlink").display()
            )
        } else if meta.is_dir() {
            walk(root, &p, out);
            format!("dir {mode:o}")
        } else {
            format!(
                "file {mode:o} {}",
                sha256(&std::fs::read(&p).expect("read"))
            )
        };
        out.insert(rel, desc);
    }
}

/// `installer bake` of `tarball` (its sha256 `sha`) installing the noded artifact `noded`, then the
/// test's own flags.
pub fn bake_args(tarball: &Path, sha: &str, noded: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "bake",
        "--kata-tarball",
        tarball.to_str().expect("utf8"),
        "--sha256",
        sha,
        "--noded-binary",
        noded.to_str().expect("utf8"),
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

/// `containerd.runtimes` of the noded.toml bake wrote under `root` (noded must load the file).
pub fn baked_runtimes(root: &Path) -> Vec<String> {
    let toml = std::fs::read_to_string(root.join("etc/noded/noded.toml")).expect("noded.toml");
    let config = noded::config::NodedConfig::parse(Path::new("noded.toml"), &toml)
        .unwrap_or_else(|e| panic!("{e}\n{toml}"));
    config
        .containerd
        .runtimes
        .iter()
        .map(|h| h.name().to_owned())
        .collect()
}

pub fn installer() -> assert_cmd::Command {
    assert_cmd::Command::cargo_bin("installer").expect("installer binary")
}

/// `installer <args> --root <root> --output json`: exit code, parsed stdout (Null if not JSON), stderr.
pub fn run_json<S: AsRef<std::ffi::OsStr>>(
    args: &[S],
    root: &Path,
) -> (i32, serde_json::Value, String) {
    let out = installer()
        .args(args)
        .arg("--root")
        .arg(root)
        .arg("--output")
        .arg("json")
        .output()
        .expect("run installer");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let json = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out.status.code().unwrap_or(-1), json, stderr)
}
