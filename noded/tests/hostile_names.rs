//! Hostile names and paths in noded.toml and on disk against the real `noded` binary: a template named
//! `../../victim`, an absolute path or a QEMU option string must stop noded at load (exit 2, one
//! line naming the file and the field) and never reach the filesystem; a symlink planted at a
//! template directory or at the templates directory itself must not redirect `template destroy`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use noded::config::NodedConfig;

fn noded_bin() -> PathBuf {
    std::env::var_os("NODED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_noded")))
}

/// `<tmp>/run` (noded's run_dir) and `<tmp>/outside/victim`, a directory with a file and a subdir
/// that belong to somebody else.
struct Tree {
    tmp: tempfile::TempDir,
}

impl Tree {
    fn new() -> Self {
        let tmp = tempfile::tempdir().expect("tempdir");
        let victim = tmp.path().join("outside/victim");
        std::fs::create_dir_all(victim.join("sub")).expect("mkdir victim");
        std::fs::write(victim.join("precious"), b"not noded's").expect("write victim");
        std::fs::set_permissions(
            victim.join("precious"),
            std::fs::Permissions::from_mode(0o644),
        )
        .expect("chmod");
        std::fs::set_permissions(victim.join("sub"), std::fs::Permissions::from_mode(0o755))
            .expect("chmod");
        std::fs::create_dir_all(tmp.path().join("run")).expect("mkdir run");
        Self { tmp }
    }
    fn run_dir(&self) -> PathBuf {
        self.tmp.path().join("run")
    }
    fn victim(&self) -> PathBuf {
        self.tmp.path().join("outside/victim")
    }
    /// The victim exactly as created: content and modes (a chmod through a symlink shows here).
    fn assert_victim_intact(&self) {
        let v = self.victim();
        assert_eq!(
            std::fs::read(v.join("precious")).expect("victim file still there"),
            b"not noded's"
        );
        let mode = |p: &Path| std::fs::metadata(p).expect("stat").permissions().mode() & 0o7777;
        assert_eq!(mode(&v.join("precious")), 0o644, "victim file chmod'ed");
        assert_eq!(mode(&v.join("sub")), 0o755, "victim subdir chmod'ed");
    }
    fn config(&self, template_name: &str) -> PathBuf {
        let path = self.tmp.path().join("noded.toml");
        let text = format!(
            "[daemon]\nrun_dir = {run:?}\ndata_dir = {data:?}\n\n[[templates]]\nname = {template_name:?}\n",
            run = self.run_dir().display().to_string(),
            data = self.tmp.path().join("data").display().to_string(),
        );
        std::fs::write(&path, text).expect("write config");
        path
    }
}

fn destroy(config: &Path) -> (i32, String, String) {
    let out = Command::new(noded_bin())
        .args(["template", "destroy", "--config"])
        .arg(config)
        .output()
        .expect("run noded");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Names that would leave `run_dir/templates` or reach QEMU's option parser: refused at load.
#[test]
fn hostile_template_names_are_refused_at_load_and_touch_nothing() {
    let tree = Tree::new();
    let absolute = tree.victim().display().to_string();
    let names = [
        "../../outside/victim",
        "../../../outside/victim",
        absolute.as_str(),
        "victim,share=on,mem-path=/etc",
        "a,b",
        "Victim",
        "",
        "vic\ntim",
    ];
    for name in names {
        let config = tree.config(name);
        let (code, stdout, stderr) = destroy(&config);
        assert_eq!(code, 2, "{name:?}: stdout {stdout} stderr {stderr}");
        let line = stderr.trim_end();
        assert!(!line.contains('\n'), "{name:?}: one line: {stderr}");
        assert!(
            line.starts_with(&config.display().to_string()) && line.contains("templates[0].name"),
            "{name:?}: names the file and the field: {stderr}"
        );
        tree.assert_victim_intact();
        assert!(
            !tree.run_dir().join("templates").exists(),
            "{name:?}: nothing created under run_dir"
        );
    }
}

/// `noded run` loads the same way: a hostile name never starts the daemon.
#[test]
fn run_refuses_a_hostile_template_name() {
    let tree = Tree::new();
    let config = tree.config("../../outside/victim");
    let out = Command::new(noded_bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .expect("run noded");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("templates[0].name"), "{stderr}");
    tree.assert_victim_intact();
}

/// Every name field of noded.toml, one line each naming the field; a valid config still loads.
#[test]
fn every_name_field_is_checked() {
    let base = "[daemon]\nrun_dir = \"/run/x\"\n";
    let cases = [
        ("[[templates]]\nname = \"a/b\"\n", "templates[0].name"),
        (
            "[[templates]]\nname = \"ok\"\nruntime_handler = \"kata,x\"\n",
            "templates[0].runtime_handler",
        ),
        (
            "[[templates]]\nname = \"ok\"\n[[templates]]\nname = \"ok\"\n",
            "templates[1].name",
        ),
        ("[probe]\nhandlers = [\"../x\"]\n", "probe.handlers"),
        (
            "[kubernetes]\nnode_name = \"../../namespaces/kube-system\"\n",
            "kubernetes.node_name",
        ),
    ];
    for (extra, field) in cases {
        let text = format!("{base}{extra}");
        let e = NodedConfig::parse(Path::new("/etc/noded/noded.toml"), &text)
            .expect_err(&format!("accepted: {text}"))
            .to_string();
        assert!(
            e.starts_with("/etc/noded/noded.toml: ") && e.contains(field) && !e.contains('\n'),
            "{field}: {e}"
        );
    }
    let ok = format!(
        "{base}[[templates]]\nname = \"default\"\n[[templates]]\nname = \"big-2\"\n\
         [probe]\nhandlers = [\"kata-qemu\"]\n[kubernetes]\nnode_name = \"ip-10-0-0-1.ec2.internal\"\n"
    );
    NodedConfig::parse(Path::new("ok.toml"), &ok).expect("valid names load");
}

/// A valid name whose directory is a symlink planted by someone else: destroy refuses, the link's
/// target keeps its files and modes (the old code chmod'ed everything in it to 0600).
#[test]
fn destroy_does_not_follow_a_symlinked_template_dir() {
    let tree = Tree::new();
    let templates = tree.run_dir().join("templates");
    std::fs::create_dir_all(&templates).expect("mkdir");
    std::os::unix::fs::symlink(tree.victim(), templates.join("victim")).expect("plant symlink");
    let (code, stdout, stderr) = destroy(&tree.config("victim"));
    assert_ne!(code, 0, "refused: stdout {stdout} stderr {stderr}");
    assert!(stderr.contains("refusing"), "{stderr}");
    tree.assert_victim_intact();
}

/// The templates directory itself a symlink out of run_dir: destroy must not remove through it.
#[test]
fn destroy_does_not_follow_a_symlinked_templates_dir() {
    let tree = Tree::new();
    std::os::unix::fs::symlink(
        tree.victim().parent().expect("outside"),
        tree.run_dir().join("templates"),
    )
    .expect("plant symlink");
    let (code, stdout, stderr) = destroy(&tree.config("victim"));
    assert_ne!(code, 0, "refused: stdout {stdout} stderr {stderr}");
    assert!(stderr.contains("refusing"), "{stderr}");
    tree.assert_victim_intact();
}

/// A mount below a path a hostile name points at stays mounted (the old code detached it). Needs
/// root for the tmpfs; unmounted again by a guard on every exit.
#[test]
fn hostile_name_does_not_unmount_outside_run_dir() {
    if !testkit::require::require_root() {
        return;
    }
    let tree = Tree::new();
    let mnt = tree.victim().join("sub");
    nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        Some("size=1m"),
    )
    .expect("mount tmpfs");
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
        }
    }
    let _guard = Unmount(mnt.clone());
    std::fs::write(mnt.join("inside-mount"), b"x").expect("write into tmpfs");
    let (code, _, stderr) = destroy(&tree.config("../../outside/victim"));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        noded::vm::template::mounts_under(&mnt).contains(&mnt),
        "the victim's mount is still there"
    );
    assert!(mnt.join("inside-mount").exists());
}
