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
//!
//! [`FakeKata::write_bootable`] makes a release that runs real VMs with Debian's QEMU (TCG):
//! `bin/kata-runtime` is the compiled `fake-kata-runtime` (its `factory init` builds a real VM
//! template on a tmpfs) and the shim boots one VM per sandbox, cloned from that template or cold
//! (see [`crate::kata_guest`] and [`crate::shim::vm`]).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
        install_binary(shim, &dest);
        kata
    }

    /// A release that boots real VMs (root and Debian's `qemu-system-x86_64` needed):
    /// - `share/kata-containers/vmlinux-<kernel version>` (a Debian kernel, PVH-bootable) with the
    ///   `vmlinux.container` symlink; `kata-ubuntu-noble.initrd` (the busybox initramfs whose `/init`
    ///   answers `ping`), `kata-containers-initrd.img` -> it (Kata's default initrd name), a decoy
    ///   `kata-ubuntu-noble-confidential.initrd` (not bootable; sorts first, as in a real release) and
    ///   `kata-containers.img`;
    /// - `configuration-qemu.toml` as Kata ships it (`image = ...`, no `initrd`, templating off),
    ///   with `default_memory = 256` so TCG clones stay cheap;
    /// - `bin/qemu-system-x86_64`: a script exec'ing Debian's QEMU ([`QEMU_WRAPPER`]);
    /// - `bin/kata-runtime`: a copy of `runtime` (the compiled `fake-kata-runtime`,
    ///   [`runtime_binary`]); `bin/containerd-shim-kata-v2`: a copy of `shim` ([`shim_binary`]);
    /// - the `boots-vms` marker the shim checks before booting VMs.
    ///
    /// Calls are recorded in `calls.log` as with [`FakeKata::write`]; each sandbox VM adds a JSON line
    /// ([`FakeKata::vm_calls`]). Panics if the guest assets cannot be built.
    pub fn write_bootable(
        dir: &Path,
        installed_at: &Path,
        version: &str,
        shim: &Path,
        runtime: &Path,
    ) -> Self {
        let kata = Self::write_with_shim(dir, installed_at, version, shim);
        let guest = crate::kata_guest::guest_assets().unwrap_or_else(|e| panic!("{e:#}"));
        let bin = dir.join("bin");
        let assets = dir.join("share/kata-containers");
        for f in [
            bin.join("kata-runtime"),
            bin.join("qemu-system-x86_64"),
            assets.join("vmlinux-6.12.28-153"),
            assets.join("vmlinux.container"),
            assets.join("kata-ubuntu-noble.initrd"),
            assets.join("kata-containers.img"),
        ] {
            std::fs::remove_file(&f).unwrap_or_else(|e| panic!("remove {}: {e}", f.display()));
        }
        install_binary(runtime, &bin.join("kata-runtime"));
        exe(&bin.join("qemu-system-x86_64"), QEMU_WRAPPER);
        let kernel_version = guest
            .kernel_package
            .strip_prefix("linux-image-")
            .unwrap_or(&guest.kernel_package);
        let kernel_name = format!("vmlinux-{kernel_version}");
        std::fs::copy(&guest.kernel, assets.join(&kernel_name))
            .unwrap_or_else(|e| panic!("copy {}: {e}", guest.kernel.display()));
        std::os::unix::fs::symlink(&kernel_name, assets.join("vmlinux.container"))
            .expect("symlink");
        std::fs::copy(&guest.initrd, assets.join("kata-ubuntu-noble.initrd"))
            .unwrap_or_else(|e| panic!("copy {}: {e}", guest.initrd.display()));
        std::os::unix::fs::symlink(
            "kata-ubuntu-noble.initrd",
            assets.join(crate::kata_guest::DEFAULT_INITRD),
        )
        .expect("symlink");
        std::fs::write(
            assets.join("kata-ubuntu-noble-confidential.initrd"),
            b"decoy: the confidential-guest initrd, not an initramfs this fake can boot\n",
        )
        .expect("write");
        std::fs::write(assets.join("kata-containers.img"), b"image v1").expect("write");
        let config = kata.qemu_config();
        let text = std::fs::read_to_string(&config).expect("read config");
        let text = text.replace("default_memory = 2048", "default_memory = 256");
        std::fs::write(&config, text).expect("write config");
        std::fs::write(dir.join(crate::shim::vm::BOOTABLE_MARKER), b"").expect("write marker");
        kata
    }

    /// `share/defaults/kata-containers/configuration-qemu.toml`.
    pub fn qemu_config(&self) -> PathBuf {
        self.root
            .join("share/defaults/kata-containers/configuration-qemu.toml")
    }

    /// Whether this release was written by [`FakeKata::write_bootable`].
    pub fn is_bootable(&self) -> bool {
        self.root.join(crate::shim::vm::BOOTABLE_MARKER).exists()
    }

    /// Every sandbox VM the shim started: `{"call":"vm","id":<sandbox id>,"boot":"template"|"cold"|
    /// "failed","reason":<why>,"pid":<QEMU pid or null>}`.
    pub fn vm_calls(&self) -> Vec<serde_json::Value> {
        self.calls()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["call"] == "vm")
            .collect()
    }

    /// The shim binary of this release.
    pub fn shim(&self) -> PathBuf {
        self.root.join("bin/containerd-shim-kata-v2")
    }

    /// Live processes running this release's shim binary.
    pub fn shim_pids(&self) -> Vec<i32> {
        let want = std::fs::canonicalize(self.shim()).expect("canonical shim path");
        std::fs::read_dir("/proc")
            .expect("read /proc")
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| {
                std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| exe == want)
            })
            .collect()
    }

    /// Waits up to 10 s for this release's shims to exit (they do after containerd's Shutdown call
    /// returned, in their own time); panics naming `after` and the pids if any is left.
    pub async fn wait_no_shim(&self, after: &str) {
        let _ = crate::scrape::wait_until(Duration::from_secs(10), "shims exited", || {
            self.shim_pids().is_empty()
        })
        .await;
        assert_eq!(
            self.shim_pids(),
            Vec::<i32>::new(),
            "shim processes left after {after}"
        );
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

    /// What a Kata upgrade changes: the version the binaries report and the guest assets. A bootable
    /// release's initrd stays bootable: the initramfs plus an appended archive naming the version.
    pub fn upgrade(&self, version: &str) {
        std::fs::write(self.root.join("fake-version"), format!("{version}\n")).expect("write");
        let initrd = self
            .root
            .join("share/kata-containers/kata-ubuntu-noble.initrd");
        let bytes = if self.is_bootable() {
            let guest = crate::kata_guest::guest_assets().unwrap_or_else(|e| panic!("{e:#}"));
            let mut bytes = std::fs::read(&guest.initrd)
                .unwrap_or_else(|e| panic!("read {}: {e}", guest.initrd.display()));
            bytes.extend(crate::kata_guest::cpio_with_file(
                "etc/kata-version",
                format!("{version}\n").as_bytes(),
            ));
            bytes
        } else {
            format!("initrd {version}").into_bytes()
        };
        std::fs::write(&initrd, bytes).expect("write");
    }
}

/// The QEMU a bootable release's `bin/qemu-system-x86_64` runs.
pub const QEMU_SYSTEM: &str = "/usr/bin/qemu-system-x86_64";

/// `bin/qemu-system-x86_64` of a bootable release. Not a symlink: installers refuse links out of the
/// Kata root. Not a copy: Debian's QEMU finds its accelerator modules and firmware relative to its
/// own location. `exec -a` keeps the release's path as argv[0], so the process's command line reads
/// like a real release's QEMU (`/opt/kata/bin/qemu-system-x86_64 ...`).
pub const QEMU_WRAPPER: &str = r#"#!/bin/bash
exec -a "$0" /usr/bin/qemu-system-x86_64 "$@"
"#;

/// Copies a compiled binary into a release without its debug info (debug builds are ~300 MB, and
/// releases are packed into tarballs); a plain copy where `strip` is missing.
fn install_binary(src: &Path, dest: &Path) {
    let stripped = std::process::Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(dest)
        .arg(src)
        .status()
        .is_ok_and(|s| s.success());
    if !stripped {
        std::fs::copy(src, dest)
            .unwrap_or_else(|e| panic!("copy {} to {}: {e}", src.display(), dest.display()));
    }
    std::fs::set_permissions(dest, std::fs::Permissions::from_mode(0o755)).expect("chmod");
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

/// The compiled `fake-kata-runtime` (`bin/kata-runtime` of [`FakeKata::write_bootable`]), built like
/// [`shim_binary`].
pub fn runtime_binary() -> Result<PathBuf> {
    crate::bins::testkit_bin("fake-kata-runtime")
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
