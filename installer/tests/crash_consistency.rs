//! kill -9 at every persistence step of `installer bake`, `boot` and `uninstall`: strace's fault
//! injection delivers SIGKILL on entry to the Nth mkdir/rename/symlink/unlink/fsync... of a real
//! run (no test hook in the binary). After each kill the next run must converge, and uninstall must
//! then leave the root byte-identical to before bake.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Node, snapshot};
use testkit::strace::{PERSISTENCE, Step, Strace};

struct Bed {
    node: Node,
    pristine: PathBuf,
    tarball: PathBuf,
    sha: String,
    noded: PathBuf,
    strace: Strace,
}

impl Bed {
    fn new() -> Option<Self> {
        let strace = Strace::require(PERSISTENCE)?;
        let node = Node::new();
        let (tarball, sha) = node.kata_tarball("3.27.0", |_| {});
        let noded = node.fake_noded();
        // The installer is placed where bake would install it, so bake does not copy its own
        // (large, debug) binary on every run; it is a pre-existing file bake never touches.
        let bin = node.root().join("usr/local/bin/installer");
        std::fs::create_dir_all(bin.parent().expect("parent")).expect("mkdir");
        let built = assert_cmd::cargo::cargo_bin("installer");
        if std::fs::hard_link(&built, &bin).is_err() {
            std::fs::copy(&built, &bin).expect("copy installer");
        }
        let pristine = node.dir.path().join("pristine");
        cp_a(&node.root(), &pristine);
        Some(Self {
            node,
            pristine,
            tarball,
            sha,
            noded,
            strace,
        })
    }

    fn root(&self) -> PathBuf {
        self.node.root()
    }

    fn reset(&self) {
        std::fs::remove_dir_all(self.root()).expect("rm root");
        cp_a(&self.pristine, &self.root());
    }

    fn args(&self, what: &str) -> Vec<String> {
        let mut a = vec![what.to_owned()];
        if what == "bake" {
            for s in [
                "--kata-tarball",
                self.tarball.to_str().expect("utf8"),
                "--sha256",
                &self.sha,
                "--noded-binary",
                self.noded.to_str().expect("utf8"),
                "--nodeadm",
                "always",
                "--containerd-config-version",
                "2",
            ] {
                a.push(s.to_owned());
            }
        }
        a.push("--root".into());
        a.push(self.root().to_str().expect("utf8").to_owned());
        a
    }

    fn command(&self, what: &str) -> Command {
        let mut c = Command::new(self.root().join("usr/local/bin/installer"));
        c.args(self.args(what));
        c
    }

    fn run(&self, what: &str) -> std::process::Output {
        self.command(what).output().expect("run installer")
    }

    fn ok(&self, what: &str, context: &str) {
        let out = self.run(what);
        assert!(
            out.status.success(),
            "{what} after {context}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The sequence of persistence steps of one clean run.
    fn steps(&self, what: &str) -> Vec<Step> {
        let log = self.node.dir.path().join(format!("{what}.strace"));
        self.strace
            .steps(&self.command(what), &log)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"))
    }

    /// Runs `what` killed (SIGKILL) on entry to the given step; asserts it really died there.
    fn killed_at(&self, what: &str, step: &Step) {
        self.strace
            .kill_at(&self.command(what), step)
            .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    }
}

/// `cp -a` of a root without copying the (large) installer binary: it is hard-linked instead.
fn cp_a(from: &Path, to: &Path) {
    let bin = Path::new("usr/local/bin/installer");
    let hold = from.with_extension("installer-hold");
    let had = std::fs::rename(from.join(bin), &hold).is_ok();
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp -a");
    if had {
        std::fs::rename(&hold, from.join(bin)).expect("put the binary back");
        if std::fs::hard_link(from.join(bin), to.join(bin)).is_err() {
            std::fs::copy(from.join(bin), to.join(bin)).expect("copy installer");
        }
    }
    assert!(st.success());
}

/// The root without the installer binary (hashing it on every snapshot is slow and it never
/// changes) and without the manifest's bytes (key order of a converged manifest may differ).
fn state(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut s = snapshot(root);
    s.remove(Path::new("usr/local/bin/installer"));
    if let Some(v) = s.get_mut(Path::new("var/lib/noded/installer/manifest.json")) {
        *v = "manifest".into();
    }
    s
}

#[test]
fn kill_9_at_every_step_of_bake_converges() {
    let Some(bed) = Bed::new() else { return };
    let before = state(&bed.root());
    let steps = bed.steps("bake");
    assert!(steps.len() > 10, "too few steps traced: {steps:?}");
    let baked = state(&bed.root());
    for step in &steps {
        bed.reset();
        bed.killed_at("bake", step);
        let ctx = format!("bake killed at {step}");
        // Uninstall straight after the kill removes exactly what was written. (A second killed
        // run for the re-run below: copying the root would change inodes the intent log names.)
        bed.ok("uninstall", &ctx);
        assert_eq!(state(&bed.root()), before, "uninstall after {ctx}");
        bed.reset();
        bed.killed_at("bake", step);
        bed.ok("bake", &ctx);
        assert_eq!(state(&bed.root()), baked, "re-run bake after {ctx}");
        bed.ok("uninstall", &ctx);
        assert_eq!(state(&bed.root()), before, "uninstall after re-run, {ctx}");
    }
}

#[test]
fn kill_9_at_every_step_of_boot_and_uninstall_converges() {
    let Some(bed) = Bed::new() else { return };
    let before = state(&bed.root());
    bed.ok("bake", "clean");
    let baked_root = bed.node.dir.path().join("baked");
    cp_a(&bed.root(), &baked_root);
    let boot_steps = bed.steps("boot");
    let booted = state(&bed.root());
    let booted_root = bed.node.dir.path().join("booted");
    cp_a(&bed.root(), &booted_root);
    let uninstall_steps = bed.steps("uninstall");
    assert_eq!(state(&bed.root()), before);
    assert!(!boot_steps.is_empty() && uninstall_steps.len() > 5);

    let restore = |from: &Path| {
        std::fs::remove_dir_all(bed.root()).expect("rm root");
        cp_a(from, &bed.root());
    };
    for step in &boot_steps {
        let ctx = format!("boot killed at {step}");
        restore(&baked_root);
        bed.killed_at("boot", step);
        bed.ok("boot", &ctx);
        assert_eq!(state(&bed.root()), booted, "re-run boot after {ctx}");
        restore(&baked_root);
        bed.killed_at("boot", step);
        bed.ok("uninstall", &ctx);
        assert_eq!(state(&bed.root()), before, "uninstall after {ctx}");
    }
    for step in &uninstall_steps {
        let ctx = format!("uninstall killed at {step}");
        restore(&booted_root);
        bed.killed_at("uninstall", step);
        bed.ok("uninstall", &ctx);
        assert_eq!(state(&bed.root()), before, "re-run uninstall after {ctx}");
    }
}
