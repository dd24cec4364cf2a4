//! Hostile shapes of the files noded edits: containerd's config.toml as a symlink (EKS-style images
//! link it elsewhere) must be edited where containerd reads it, the link kept; a symlink planted at a
//! temp-file name must never be written through, chmod'ed or chown'ed.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::config_shapes::{fixture, noded_bin, runtimes};
use noded::containerd::atomic::write_atomic;
use testkit::containerd::Series;

const VERSION: &str = "1.7.20";

fn noded(args: &[&str], config: &Path, state: &Path) -> (i32, String) {
    let out = Command::new(noded_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .args(["--containerd-version", VERSION, "--restart", "never"])
        .output()
        .expect("run noded");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777
}

/// apply through `link` edits `target` (what containerd reads through the link, checked with the
/// real containerd when installed), keeps the link and the target's mode; revert restores the
/// target's bytes, the link still in place.
fn edited_through_the_link(link_target: impl Fn(&Path) -> PathBuf) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let etc = tmp.path().join("etc/containerd");
    let real_dir = tmp.path().join("eks");
    std::fs::create_dir_all(&etc).expect("mkdir");
    std::fs::create_dir_all(&real_dir).expect("mkdir");
    let target = real_dir.join("containerd-config.toml");
    let original = std::fs::read(fixture("nodeadm-v2.toml")).expect("fixture");
    std::fs::write(&target, &original).expect("write target");
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let link = etc.join("config.toml");
    let pointer = link_target(&target);
    std::os::unix::fs::symlink(&pointer, &link).expect("symlink");
    let state = tmp.path().join("state");

    let (code, stderr) = noded(&["containerd", "apply"], &link, &state);
    assert_eq!(code, 0, "apply: {stderr}");
    let meta = std::fs::symlink_metadata(&link).expect("lstat link");
    assert!(
        meta.file_type().is_symlink(),
        "the link was replaced by a file"
    );
    assert_eq!(std::fs::read_link(&link).expect("readlink"), pointer);
    let edited = std::fs::read_to_string(&target).expect("read target");
    assert!(
        edited.contains("runtimes.kata-qemu]"),
        "target not edited:\n{edited}"
    );
    assert_eq!(mode(&target), 0o640, "target mode kept");
    let leftovers: Vec<_> = std::fs::read_dir(&real_dir)
        .expect("ls")
        .chain(std::fs::read_dir(&etc).expect("ls"))
        .map(|e| e.expect("entry").file_name())
        .filter(|n| n.to_string_lossy().starts_with(".noded-tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");

    if let Some(bins) = testkit::containerd::require(Series::V1_7) {
        let dump = common::config_shapes::dump(&bins, &link);
        let rts = runtimes(&dump, Series::V1_7.runtime_plugin());
        assert!(
            rts.contains_key("kata-qemu"),
            "containerd reads the handlers: {rts:?}"
        );
    }

    let (code, stderr) = noded(&["containerd", "revert"], &link, &state);
    assert_eq!(code, 0, "revert: {stderr}");
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("lstat")
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read(&target).expect("read"),
        original,
        "revert restores the target"
    );
}

#[test]
fn relative_symlinked_config_is_edited_at_its_target() {
    edited_through_the_link(|_| PathBuf::from("../../eks/containerd-config.toml"));
}

#[test]
fn absolute_symlinked_config_is_edited_at_its_target() {
    edited_through_the_link(Path::to_path_buf);
}

/// A link to a file that does not exist yet: apply creates the target (containerd will read it),
/// revert removes it again and leaves the link as it found it.
#[test]
fn dangling_symlinked_config_gets_its_target_created_and_removed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let target = tmp.path().join("elsewhere/config.toml");
    std::fs::create_dir_all(target.parent().expect("parent")).expect("mkdir");
    let link = tmp.path().join("config.toml");
    std::os::unix::fs::symlink(&target, &link).expect("symlink");
    let state = tmp.path().join("state");
    let (code, stderr) = noded(&["containerd", "apply"], &link, &state);
    assert_eq!(code, 0, "apply: {stderr}");
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("lstat")
            .file_type()
            .is_symlink()
    );
    assert!(
        std::fs::read_to_string(&target)
            .expect("target created")
            .contains("kata-qemu"),
        "target holds the handlers"
    );
    let (code, stderr) = noded(&["containerd", "revert"], &link, &state);
    assert_eq!(code, 0, "revert: {stderr}");
    assert!(!target.exists(), "created target removed");
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("lstat")
            .file_type()
            .is_symlink()
    );
}

/// Someone planted symlinks at the temp names an earlier noded used (`.noded-tmp.<name>.<pid>`, the
/// pid being this process) pointing at a file of theirs: the write must neither fill nor chmod nor
/// chown that file, and the config must end up a regular file with the new bytes and its old mode.
#[test]
fn planted_symlink_at_the_temp_name_is_not_written_through() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let victim_dir = tmp.path().join("victim");
    std::fs::create_dir(&victim_dir).expect("mkdir");
    let victim = victim_dir.join("shadow");
    std::fs::write(&victim, b"victim bytes").expect("write victim");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let victim_owner = std::fs::metadata(&victim).expect("stat").uid();

    let dir = tmp.path().join("etc");
    std::fs::create_dir(&dir).expect("mkdir");
    let config = dir.join("config.toml");
    std::fs::write(&config, b"old").expect("write config");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let planted = dir.join(format!(".noded-tmp.config.toml.{}", std::process::id()));
    std::os::unix::fs::symlink(&victim, &planted).expect("plant");

    write_atomic(&config, b"new bytes", 0o644).expect("write");

    assert_eq!(
        std::fs::read(&victim).expect("victim"),
        b"victim bytes",
        "written through"
    );
    assert_eq!(mode(&victim), 0o644, "victim chmod'ed");
    assert_eq!(
        std::fs::metadata(&victim).expect("stat").uid(),
        victim_owner
    );
    let meta = std::fs::symlink_metadata(&config).expect("lstat");
    assert!(meta.file_type().is_file(), "config must be a regular file");
    assert_eq!(std::fs::read(&config).expect("read"), b"new bytes");
    assert_eq!(mode(&config), 0o600, "config mode kept");
}

/// A hard link to someone's file planted at the temp name: its bytes and mode stay theirs.
#[test]
fn planted_hardlink_at_the_temp_name_is_not_written_through() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, b"theirs").expect("write victim");
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let config = tmp.path().join("config.toml");
    let planted = tmp
        .path()
        .join(format!(".noded-tmp.config.toml.{}", std::process::id()));
    std::fs::hard_link(&victim, &planted).expect("plant");
    write_atomic(&config, b"ours", 0o644).expect("write");
    assert_eq!(std::fs::read(&config).expect("read"), b"ours");
    assert_eq!(mode(&config), 0o644);
    assert_eq!(
        std::fs::read(&victim).expect("victim"),
        b"theirs",
        "written through"
    );
    assert_eq!(mode(&victim), 0o640, "victim chmod'ed");
}
