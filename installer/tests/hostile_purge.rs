//! `installer uninstall --purge` against a noded.toml whose `data_dir`/`run_dir` point at the root
//! itself, system directories, parents of noded's own dirs or through symlinks: exit 2, one line
//! naming noded.toml and the field, and not one byte of the root removed. noded's own dirs are
//! still purged. Every run is the real `installer` binary on a baked temp root.

mod common;

use std::path::{Path, PathBuf};

use common::{Node, installer, snapshot};

fn run<S: AsRef<std::ffi::OsStr>>(args: &[S], root: &Path) -> (i32, String) {
    let out = installer()
        .args(args)
        .arg("--root")
        .arg(root)
        .output()
        .expect("run installer");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A node root after `installer bake`, with a file of the operator's in /etc and one outside the
/// root that a symlink could lead to.
fn baked() -> (Node, PathBuf) {
    let node = Node::new();
    let root = node.root();
    let (tarball, sha) = node.kata_tarball("3.27.0", |_| {});
    let noded = node.fake_noded();
    let (code, stderr) = run(
        &common::bake_args(
            &tarball,
            &sha,
            &noded,
            &["--nodeadm", "always", "--containerd-config-version", "3"],
        ),
        &root,
    );
    assert_eq!(code, 0, "bake: {stderr}");
    std::fs::write(root.join("etc/operator-canary"), b"keep me").expect("canary");
    (node, root)
}

fn set_dirs(root: &Path, data_dir: &str, run_dir: &str) {
    let toml = root.join("etc/noded/noded.toml");
    let text = std::fs::read_to_string(&toml).expect("noded.toml");
    let text = text
        .replace(
            "data_dir = \"/var/lib/noded\"",
            &format!("data_dir = {data_dir:?}"),
        )
        .replace(
            "run_dir = \"/run/noded\"",
            &format!("run_dir = {run_dir:?}"),
        );
    std::fs::write(&toml, text).expect("write noded.toml");
}

fn assert_refused(root: &Path, field: &str) {
    let before = snapshot(root);
    let (code, stderr) = run(&["uninstall", "--purge"], root);
    assert_eq!(code, 2, "refused with exit 2: {stderr}");
    let line = stderr.trim_end();
    assert!(!line.contains('\n'), "one line: {stderr}");
    assert!(
        line.contains("noded.toml") && line.contains(field) && line.contains("nothing removed"),
        "names the file and {field}: {stderr}"
    );
    assert!(
        root.join("etc/operator-canary").exists(),
        "the root was purged"
    );
    assert_eq!(snapshot(root), before, "nothing removed or changed");
}

#[test]
fn purge_of_the_root_itself_is_refused() {
    let (_node, root) = baked();
    set_dirs(&root, "/", "/run/noded");
    assert_refused(&root, "daemon.data_dir");
}

#[test]
fn purge_of_system_dirs_and_parents_is_refused() {
    for (data, run_dir, field) in [
        ("/etc", "/run/noded", "daemon.data_dir"),
        ("/var/lib", "/run/noded", "daemon.data_dir"),
        ("/var/lib/noded", "/run", "daemon.run_dir"),
        ("/var/lib/noded", "/run/noded/../../etc", "daemon.run_dir"),
        (
            "/var/lib/noded/../../../usr",
            "/run/noded",
            "daemon.data_dir",
        ),
        ("/opt", "/run/noded", "daemon.data_dir"),
    ] {
        let (_node, root) = baked();
        set_dirs(&root, data, run_dir);
        assert_refused(&root, field);
    }
}

/// noded's own path, but reached through a symlink out of the root: never followed. The data dir
/// (which holds the installer's manifest) is moved out and linked back, so the installation is still
/// found through the link; the run dir's parent is linked out.
#[test]
fn purge_through_a_symlink_is_refused() {
    let (node, root) = baked();
    let outside = node.dir.path().join("outside-state");
    std::fs::rename(root.join("var/lib/noded"), &outside).expect("move the data dir out");
    std::fs::write(outside.join("precious"), b"not noded's").expect("write");
    std::os::unix::fs::symlink(&outside, root.join("var/lib/noded")).expect("symlink");
    assert_refused(&root, "symlink");
    assert!(outside.join("precious").exists());

    let (node, root) = baked();
    let outside = node.dir.path().join("outside-run");
    std::fs::create_dir_all(outside.join("noded")).expect("mkdir");
    std::fs::write(outside.join("noded/precious"), b"not noded's").expect("write");
    std::fs::remove_dir_all(root.join("run")).expect("rm run");
    std::os::unix::fs::symlink(&outside, root.join("run")).expect("symlink");
    assert_refused(&root, "symlink");
    assert!(outside.join("noded/precious").exists());
}

/// The ordinary case still works: noded's own state directories are removed.
#[test]
fn purge_removes_nodeds_own_dirs() {
    let (_node, root) = baked();
    for d in ["var/lib/noded/state", "run/noded/templates"] {
        std::fs::create_dir_all(root.join(d)).expect("mkdir");
        std::fs::write(root.join(d).join("f"), b"x").expect("write");
    }
    let (code, stderr) = run(&["uninstall", "--purge"], &root);
    assert_eq!(code, 0, "{stderr}");
    assert!(!root.join("var/lib/noded").exists());
    assert!(!root.join("run/noded").exists());
    assert!(root.join("etc/operator-canary").exists());
    assert!(root.join("var/lib").is_dir() && root.join("run").is_dir());
}
