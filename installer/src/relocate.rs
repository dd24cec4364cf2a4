//! A Kata static release moved to another prefix (`installer bake --kata-root /opt/kata-3.28`).
//!
//! Kata's tarball is built for `/opt/kata`: its configuration files name the shim's VMM, kernel,
//! image and virtiofsd there, and its QEMU looks for firmware under the prefix it was compiled with.
//! Installed elsewhere, the release would silently run the main release's files. As kata-deploy's
//! multi-install does (`tools/packaging/kata-deploy/scripts/kata-deploy.sh`, `install_artifacts` and
//! `adjust_qemu_cmdline`), every configuration's `/opt/kata/` is rewritten to the new prefix and each
//! bundled QEMU is started through a wrapper that passes `-L <prefix>/share/kata-qemu/qemu/`. This
//! happens in the private staging copy, before the tree is verified and renamed into place, so the
//! installed tree is the relocated one from its first byte.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::assets::KATA_ROOT;
use crate::root::IoError;

/// Suffix of the QEMU wrapper written next to each bundled `qemu-system-*`.
pub const QEMU_WRAPPER_SUFFIX: &str = "-relocated";

/// Rewrites the staged release at `staged` (unpacked from the tarball) for `prefix`.
pub fn relocate(staged: &Path, prefix: &Path) -> Result<(), IoError> {
    let new_prefix = format!("{}/", prefix.display());
    let old_prefix = format!("{KATA_ROOT}/");
    // QEMU wrappers first, so the configs can name them.
    let firmware = staged.join("share/kata-qemu/qemu");
    let mut wrapped = Vec::new();
    if firmware.is_dir() {
        let bin = staged.join("bin");
        for e in std::fs::read_dir(&bin).map_err(IoError::at(&bin))? {
            let e = e.map_err(IoError::at(&bin))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let ft = e.file_type().map_err(IoError::at(&e.path()))?;
            if !ft.is_file()
                || !name.starts_with("qemu-system-")
                || name.ends_with(QEMU_WRAPPER_SUFFIX)
            {
                continue;
            }
            let wrapper = bin.join(format!("{name}{QEMU_WRAPPER_SUFFIX}"));
            let script = format!(
                "#!/bin/sh\n\
                 # Written by `installer bake --kata-root`: this QEMU was built for {KATA_ROOT} and\n\
                 # would load that release's firmware; -L points it at its own.\n\
                 exec {p}bin/{name} \"$@\" -L {p}share/kata-qemu/qemu/\n",
                p = new_prefix
            );
            std::fs::write(&wrapper, script).map_err(IoError::at(&wrapper))?;
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))
                .map_err(IoError::at(&wrapper))?;
            wrapped.push(name);
        }
    }
    let defaults = staged.join("share/defaults/kata-containers");
    let mut stack = vec![defaults];
    while let Some(dir) = stack.pop() {
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(IoError::at(&dir)(e)),
        };
        for e in entries {
            let e = e.map_err(IoError::at(&dir))?;
            let path = e.path();
            let ft = e.file_type().map_err(IoError::at(&path))?;
            // Symlinks (configuration.toml -> configuration-qemu.toml) point at files rewritten here.
            if ft.is_dir() {
                stack.push(path);
                continue;
            }
            if !ft.is_file() || path.extension().is_none_or(|x| x != "toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).map_err(IoError::at(&path))?;
            let mut out = text.replace(&old_prefix, &new_prefix);
            for name in &wrapped {
                out = out.replace(
                    &format!("\"{new_prefix}bin/{name}\""),
                    &format!("\"{new_prefix}bin/{name}{QEMU_WRAPPER_SUFFIX}\""),
                );
            }
            if out != text {
                std::fs::write(&path, out).map_err(IoError::at(&path))?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(dir: &Path, firmware: bool) {
        let defaults = dir.join("share/defaults/kata-containers/runtime-rs");
        std::fs::create_dir_all(&defaults).expect("mkdir");
        std::fs::create_dir_all(dir.join("bin")).expect("mkdir");
        std::fs::write(dir.join("bin/qemu-system-x86_64"), b"qemu").expect("qemu");
        if firmware {
            std::fs::create_dir_all(dir.join("share/kata-qemu/qemu")).expect("mkdir");
        }
        std::fs::write(
            defaults.join("../configuration-qemu.toml"),
            "[hypervisor.qemu]\npath = \"/opt/kata/bin/qemu-system-x86_64\"\n\
             valid_hypervisor_paths = [\"/opt/kata/bin/qemu-system-x86_64\"]\n\
             kernel = \"/opt/kata/share/kata-containers/vmlinux.container\"\n\
             # /opt/kata-other/ is not this prefix\nx = \"/opt/kata-other/y\"\n",
        )
        .expect("write");
        std::fs::write(
            defaults.join("configuration-dragonball.toml"),
            "[hypervisor.dragonball]\nkernel = \"/opt/kata/share/kata-containers/vmlinux\"\n",
        )
        .expect("write");
        std::os::unix::fs::symlink(
            "configuration-qemu.toml",
            dir.join("share/defaults/kata-containers/configuration.toml"),
        )
        .expect("symlink");
    }

    #[test]
    fn configs_name_the_new_prefix_and_qemu_gets_its_own_firmware() {
        let tmp = tempfile::tempdir().expect("tempdir");
        release(tmp.path(), true);
        relocate(tmp.path(), Path::new("/opt/kata-3.28")).expect("relocate");
        let qemu = std::fs::read_to_string(
            tmp.path()
                .join("share/defaults/kata-containers/configuration-qemu.toml"),
        )
        .expect("read");
        let cfg: toml::Table = qemu.parse().expect("still TOML");
        let hv = &cfg["hypervisor"]["qemu"];
        assert_eq!(
            hv["path"].as_str(),
            Some("/opt/kata-3.28/bin/qemu-system-x86_64-relocated")
        );
        assert_eq!(
            hv["valid_hypervisor_paths"][0].as_str(),
            Some("/opt/kata-3.28/bin/qemu-system-x86_64-relocated")
        );
        assert_eq!(
            hv["kernel"].as_str(),
            Some("/opt/kata-3.28/share/kata-containers/vmlinux.container")
        );
        assert_eq!(hv["x"].as_str(), Some("/opt/kata-other/y"));
        let rs = std::fs::read_to_string(
            tmp.path()
                .join("share/defaults/kata-containers/runtime-rs/configuration-dragonball.toml"),
        )
        .expect("read");
        assert!(
            rs.contains("\"/opt/kata-3.28/share/kata-containers/vmlinux\""),
            "{rs}"
        );
        let wrapper = tmp.path().join("bin/qemu-system-x86_64-relocated");
        let script = std::fs::read_to_string(&wrapper).expect("wrapper");
        assert!(
            script.contains(
                "exec /opt/kata-3.28/bin/qemu-system-x86_64 \"$@\" -L /opt/kata-3.28/share/kata-qemu/qemu/"
            ),
            "{script}"
        );
        let mode = std::fs::metadata(&wrapper)
            .expect("stat")
            .permissions()
            .mode();
        assert_eq!(mode & 0o111, 0o111);
        // The symlink still points at the (rewritten) file by its relative name.
        assert_eq!(
            std::fs::read_link(
                tmp.path()
                    .join("share/defaults/kata-containers/configuration.toml")
            )
            .expect("link"),
            Path::new("configuration-qemu.toml")
        );
    }

    #[test]
    fn without_bundled_firmware_qemu_is_used_directly() {
        let tmp = tempfile::tempdir().expect("tempdir");
        release(tmp.path(), false);
        relocate(tmp.path(), Path::new("/srv/kata-canary")).expect("relocate");
        let qemu = std::fs::read_to_string(
            tmp.path()
                .join("share/defaults/kata-containers/configuration-qemu.toml"),
        )
        .expect("read");
        assert!(
            qemu.contains("path = \"/srv/kata-canary/bin/qemu-system-x86_64\""),
            "{qemu}"
        );
        assert!(!tmp.path().join("bin/qemu-system-x86_64-relocated").exists());
    }
}
