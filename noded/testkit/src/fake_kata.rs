//! A fake Kata static release: the real directory layout, with shell scripts for the binaries that
//! record every call (in `<release>/calls.log`) and create the template files like Kata's factory
//! would. Used by noded's kata adapter tests, the installer tests (to build a Kata tarball) and the
//! node-in-a-box.
//!
//! The shim, `bin/containerd-shim-kata-v2`, is either a recording script ([`FakeKata::write`]: for
//! tests that never start a sandbox) or the compiled fake shim of this crate
//! ([`FakeKata::write_with_shim`]), a real containerd shim that runs sandboxes with runc and checks
//! Kata's `ConfigPath`. Inside testkit's own integration tests its path is
//! `env!("CARGO_BIN_EXE_fake-kata-shim")`; other crates cannot name another package's binary, so
//! [`shim_binary`] builds it once with cargo and returns its path.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::Result;

pub const QEMU_CONFIG: &str = r#"# Copyright (c) 2017-2019 Intel Corporation
#
# SPDX-License-Identifier: Apache-2.0
#
# XXX: WARNING: this file is auto-generated.

[hypervisor.qemu]
path = "@ROOT@/bin/qemu-system-x86_64"
kernel = "@ROOT@/share/kata-containers/vmlinux.container"
image = "@ROOT@/share/kata-containers/kata-containers.img"
machine_type = "q35"

# Default memory size in MiB for SB/VM.
default_memory = 2048 # guest RAM

# Shared file system type:
#   - virtio-fs (default)
#   - virtio-9p
#   - virtio-fs-nydus
#   - none
shared_fs = "virtio-fs" # keep this comment
virtio_fs_daemon = "@ROOT@/libexec/virtiofsd"

[agent.kata]
dial_timeout = 45

[runtime]
enable_debug = false

[factory]
# VM templating support. Once enabled, new VMs are created from template
# using vm cloning.
#
# Note: Requires "initrd=" to be set ("image=" is not supported).
#
# Default false
#enable_template = true

# Specifies the path of template.
#
# Default "/run/vc/vm/template"
#template_path = "/run/vc/vm/template"

# The number of caches of VMCache:
vm_cache_number = 0
"#;

const CLH_CONFIG: &str = r#"[hypervisor.clh]
path = "@ROOT@/bin/cloud-hypervisor"
kernel = "@ROOT@/share/kata-containers/vmlinux.container"
"#;

/// `kata-runtime`: `--version`, and `--config F factory init|destroy|status`. init writes the two files
/// Kata's template factory leaves in template_path (read from the config, like Kata does).
const KATA_RUNTIME: &str = r#"#!/bin/sh
here=$(cd "$(dirname "$0")/.." && pwd)
# --version is a read-only query (version detection); only state-changing calls are recorded.
[ "$1" = "--version" ] || echo "kata-runtime $*" >> "$here/calls.log"
if [ "$1" = "--version" ]; then
  echo "kata-runtime  : $(cat "$here/fake-version")"
  echo "   commit   : 0000000"
  exit 0
fi
cfg=""
if [ "$1" = "--config" ]; then cfg="$2"; shift 2; fi
[ "$1" = "factory" ] || { echo "unknown command $1" >&2; exit 1; }
tp=$(sed -n 's/^template_path *= *"\(.*\)"/\1/p' "$cfg")
[ -n "$tp" ] || tp=/run/vc/vm/template
case "$2" in
  init)
    if [ -f "$here/fail-init" ]; then echo "qemu: failed to boot template VM" >&2; exit 1; fi
    if [ -f "$tp/state" ]; then echo "template already exists" >&2; exit 1; fi
    mkdir -p "$tp"
    head -c 4096 /dev/zero > "$tp/memory"
    echo "device-state" > "$tp/state"
    ;;
  destroy) rm -f "$tp/memory" "$tp/state" ;;
  status) [ -f "$tp/state" ] && echo "vm factory is on" || echo "vm factory is off" ;;
  *) echo "unknown factory verb $2" >&2; exit 1 ;;
esac
"#;

const RECORDING_SCRIPT: &str = r#"#!/bin/sh
here=$(cd "$(dirname "$0")/.." && pwd)
echo "$(basename "$0") $*" >> "$here/calls.log"
"#;

pub struct FakeKata {
    pub root: PathBuf,
}

impl FakeKata {
    /// Writes the layout at `dir`; config paths name `installed_at` (where the tree will live, which
    /// differs from `dir` when the tree is packed into a tarball).
    pub fn write(dir: &Path, installed_at: &Path, version: &str) -> Self {
        let sub = |s: &str| s.replace("@ROOT@", &installed_at.display().to_string());
        let defaults = dir.join("share/defaults/kata-containers");
        let assets = dir.join("share/kata-containers");
        for d in [
            dir.join("bin"),
            dir.join("libexec"),
            defaults.clone(),
            assets.clone(),
        ] {
            std::fs::create_dir_all(d).expect("mkdir");
        }
        exe(&dir.join("bin/kata-runtime"), KATA_RUNTIME);
        exe(&dir.join("bin/containerd-shim-kata-v2"), RECORDING_SCRIPT);
        exe(&dir.join("bin/qemu-system-x86_64"), RECORDING_SCRIPT);
        exe(&dir.join("libexec/virtiofsd"), RECORDING_SCRIPT);
        std::fs::write(dir.join("fake-version"), format!("{version}\n")).expect("write");
        std::fs::write(defaults.join("configuration-qemu.toml"), sub(QEMU_CONFIG)).expect("write");
        std::fs::write(defaults.join("configuration-clh.toml"), sub(CLH_CONFIG)).expect("write");
        std::fs::write(assets.join("vmlinux-6.12.28-153"), b"kernel v1").expect("write");
        std::os::unix::fs::symlink("vmlinux-6.12.28-153", assets.join("vmlinux.container"))
            .expect("symlink");
        std::fs::write(assets.join("kata-ubuntu-noble.initrd"), b"initrd v1").expect("write");
        std::fs::write(assets.join("kata-containers.img"), b"image v1").expect("write");
        Self {
            root: dir.to_path_buf(),
        }
    }

    /// Like [`FakeKata::write`], but `bin/containerd-shim-kata-v2` is a copy of `shim`, the
    /// compiled fake shim (a copy, not a link, so the tree can be packed into a tarball). The
    /// shim records each Create as a JSON line in the same `calls.log` ([`FakeKata::shim_creates`]).
    pub fn write_with_shim(dir: &Path, installed_at: &Path, version: &str, shim: &Path) -> Self {
        let kata = Self::write(dir, installed_at, version);
        let dest = dir.join("bin/containerd-shim-kata-v2");
        std::fs::remove_file(&dest).expect("remove the recording shim");
        std::fs::copy(shim, &dest)
            .unwrap_or_else(|e| panic!("copy fake shim {}: {e}", shim.display()));
        std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        kata
    }

    /// The shim binary of this release.
    pub fn shim(&self) -> PathBuf {
        self.root.join("bin/containerd-shim-kata-v2")
    }

    /// Makes the shim resolvable as `containerd-shim-<handler>-v2` in `bin_dir` (a directory on
    /// containerd's PATH): containerd 1.6 ignores `runtime_path` and looks shims up by name, which
    /// is why kata-deploy installs per-handler names.
    pub fn link_shim_as(&self, handler: &str, bin_dir: &Path) -> PathBuf {
        std::fs::create_dir_all(bin_dir).expect("mkdir shim dir");
        let link = bin_dir.join(format!("containerd-shim-{handler}-v2"));
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(self.shim(), &link).expect("symlink shim");
        link
    }

    /// Every Create the compiled shim received (the JSON lines of `calls.log`).
    pub fn shim_creates(&self) -> Vec<serde_json::Value> {
        self.calls()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["call"] == "create")
            .collect()
    }

    /// Every recorded call, one line each (`kata-runtime --config ... factory init`).
    pub fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.root.join("calls.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn factory_calls(&self) -> Vec<String> {
        self.calls()
            .into_iter()
            .filter(|c| c.contains(" factory "))
            .map(|c| c.rsplit(' ').next().unwrap_or_default().to_owned())
            .collect()
    }

    /// What a Kata upgrade changes: the version the binaries report and the guest assets.
    pub fn upgrade(&self, version: &str) {
        std::fs::write(self.root.join("fake-version"), format!("{version}\n")).expect("write");
        std::fs::write(
            self.root
                .join("share/kata-containers/kata-ubuntu-noble.initrd"),
            format!("initrd {version}"),
        )
        .expect("write");
    }
}

fn exe(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write script");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
}

/// The compiled fake shim for crates other than testkit (which cannot use
/// `env!("CARGO_BIN_EXE_fake-kata-shim")`); see [`crate::bins::testkit_bin`].
pub fn shim_binary() -> Result<PathBuf> {
    crate::bins::testkit_bin("fake-kata-shim")
}

/// Packs `build/opt` (a release tree written by [`FakeKata`]) into the gzipped tarball `out`, as Kata's
/// static releases are shaped; returns its sha256 (what `installer bake --sha256` checks).
pub fn pack_release(build: &Path, out: &Path) -> Result<String> {
    use anyhow::{Context, bail};
    use sha2::Digest;
    let st = std::process::Command::new("tar")
        .arg("-czf")
        .arg(out)
        .arg("-C")
        .arg(build)
        .arg("opt")
        .status()
        .context("tar")?;
    if !st.success() {
        bail!("tar -czf {} failed", out.display());
    }
    let bytes = std::fs::read(out).with_context(|| format!("read {}", out.display()))?;
    Ok(hex::encode(sha2::Sha256::digest(&bytes)))
}
