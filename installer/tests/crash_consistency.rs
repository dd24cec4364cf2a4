//! kill -9 at every persistence step of `installer bake`, `boot` and `uninstall`, and of the
//! side-by-side release's `bake --kata-root` and `uninstall --kata-root`: strace's fault
//! injection delivers SIGKILL on entry to the Nth mkdir/rename/symlink/unlink/fsync... of a real
//! run (no test hook in the binary). After each kill the next run must converge, and uninstall must
//! then leave the root byte-identical to before bake.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Node, snapshot};
use testkit::strace::{PERSISTENCE, Step, Strace};

/// The side-by-side (canary) release's root, as in side_by_side.rs.
const CANARY: &str = "/opt/kata-3.28";
const INSTALLER_DIR: &str = "var/lib/noded/installer";

/// One installer invocation on the bed's root.
#[derive(Debug, Clone, Copy)]
enum Run {
    /// The main bake, without `--handlers`.
    Bake,
    /// The main bake with `--handlers`; `canary`: one of them runs from [`CANARY`].
    BakeHandlers {
        canary: bool,
    },
    Boot,
    Uninstall,
    /// `bake --kata-root CANARY` of another release.
    CanaryBake,
    /// `uninstall --kata-root CANARY`.
    CanaryUninstall,
}

impl Run {
    fn name(self) -> &'static str {
        match self {
            Self::Bake => "bake",
            Self::BakeHandlers { canary: true } => "bake --handlers (canary)",
            Self::BakeHandlers { canary: false } => "bake --handlers (no canary)",
            Self::Boot => "boot",
            Self::Uninstall => "uninstall",
            Self::CanaryBake => "bake --kata-root",
            Self::CanaryUninstall => "uninstall --kata-root",
        }
    }
}

struct Bed {
    node: Node,
    pristine: PathBuf,
    tarball: PathBuf,
    sha: String,
    canary_tarball: PathBuf,
    canary_sha: String,
    noded: PathBuf,
    strace: Strace,
}

impl Bed {
    fn new() -> Option<Self> {
        let strace = Strace::require(PERSISTENCE)?;
        let node = Node::new();
        let (tarball, sha) = node.kata_tarball("3.27.0", |_| {});
        let (canary_tarball, canary_sha) = node.kata_tarball("3.28.0", |_| {});
        let noded = node.fake_noded();
        for canary in [true, false] {
            std::fs::write(
                node.dir.path().join(handlers_name(canary)),
                handlers(canary),
            )
            .expect("write handlers");
        }
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
            canary_tarball,
            canary_sha,
            noded,
            strace,
        })
    }

    fn root(&self) -> PathBuf {
        self.node.root()
    }

    /// Replaces the root with a copy of `from` (a root kept by [`Self::keep`]).
    fn restore(&self, from: &Path) {
        std::fs::remove_dir_all(self.root()).expect("rm root");
        cp_a(from, &self.root());
    }

    fn reset(&self) {
        self.restore(&self.pristine);
    }

    /// A copy of the root as it is now, to start runs from.
    fn keep(&self, name: &str) -> PathBuf {
        let to = self.node.dir.path().join(name);
        cp_a(&self.root(), &to);
        to
    }

    fn args(&self, run: Run) -> Vec<String> {
        let path = |p: &Path| p.to_str().expect("utf8").to_owned();
        let main_bake = || {
            [
                "bake",
                "--kata-tarball",
                &path(&self.tarball),
                "--sha256",
                &self.sha,
                "--noded-binary",
                &path(&self.noded),
                "--nodeadm",
                "always",
                "--containerd-config-version",
                "2",
            ]
            .map(str::to_owned)
            .to_vec()
        };
        let mut a: Vec<String> = match run {
            Run::Bake => main_bake(),
            Run::BakeHandlers { canary } => {
                let mut a = main_bake();
                a.push("--handlers".into());
                a.push(path(&self.node.dir.path().join(handlers_name(canary))));
                a
            }
            Run::Boot => vec!["boot".into()],
            Run::Uninstall => vec!["uninstall".into()],
            Run::CanaryBake => [
                "bake",
                "--kata-root",
                CANARY,
                "--kata-tarball",
                &path(&self.canary_tarball),
                "--sha256",
                &self.canary_sha,
            ]
            .map(str::to_owned)
            .to_vec(),
            Run::CanaryUninstall => ["uninstall", "--kata-root", CANARY]
                .map(str::to_owned)
                .to_vec(),
        };
        a.push("--root".into());
        a.push(path(&self.root()));
        a
    }

    fn command(&self, run: Run) -> Command {
        let mut c = Command::new(self.root().join("usr/local/bin/installer"));
        c.args(self.args(run));
        c
    }

    fn run(&self, run: Run) -> std::process::Output {
        self.command(run).output().expect("run installer")
    }

    fn ok(&self, run: Run, context: &str) {
        let out = self.run(run);
        assert!(
            out.status.success(),
            "{} after {context}: {}",
            run.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The sequence of persistence steps of one clean run.
    fn steps(&self, run: Run) -> Vec<Step> {
        self.traced(run).into_iter().map(|(s, _)| s).collect()
    }

    /// The steps of one clean run, each with its line of strace's log (the call's arguments).
    fn traced(&self, run: Run) -> Vec<(Step, String)> {
        let log = self
            .node
            .dir
            .path()
            .join(format!("{}.strace", run.name().replace(' ', "_")));
        let steps = self
            .strace
            .steps(&self.command(run), &log)
            .unwrap_or_else(|e| panic!("{}: {e:#}", run.name()));
        let text = std::fs::read_to_string(&log).expect("read the strace log");
        // The lines `Strace::steps` counted, in its order (it skips strace's own notes).
        let lines: Vec<String> = text
            .lines()
            .filter(|l| l.split('(').next().is_some_and(|n| !n.contains(' ')))
            .map(str::to_owned)
            .collect();
        assert_eq!(lines.len(), steps.len(), "{}: {text}", run.name());
        steps.into_iter().zip(lines).collect()
    }

    /// Runs `run` killed (SIGKILL) on entry to the given step; asserts it really died there.
    fn killed_at(&self, run: Run, step: &Step) {
        self.strace
            .kill_at(&self.command(run), step)
            .unwrap_or_else(|e| panic!("{}: {e:#}", run.name()));
    }
}

/// What the runs after a kill must make of its leftovers; given the step and "<run> killed at
/// <step>" for its messages.
type Check<'a> = dyn Fn(&Step, &str) + 'a;

/// kill -9 at every step of `run`: for each step and each check, `start` puts the root where the
/// run begins, the run is killed at the step, and the check asserts what the next runs make of
/// the leftovers. One killed run per check: a check cannot start from a copy of another's
/// leftovers (copying the root would change inodes the intent log names).
fn at_every_step(bed: &Bed, run: Run, steps: &[Step], start: impl Fn(), checks: &[&Check<'_>]) {
    for step in steps {
        let ctx = format!("{} killed at {step}", run.name());
        for check in checks {
            start();
            bed.killed_at(run, step);
            check(step, &ctx);
        }
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

/// `snap` without the paths under `node_path`.
fn without(snap: &BTreeMap<PathBuf, String>, node_path: &str) -> BTreeMap<PathBuf, String> {
    let p = Path::new(node_path.trim_start_matches('/'));
    snap.iter()
        .filter(|(k, _)| !k.starts_with(p))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// `snap`'s paths under `node_path` (itself included).
fn under(snap: &BTreeMap<PathBuf, String>, node_path: &str) -> BTreeMap<PathBuf, String> {
    let p = Path::new(node_path.trim_start_matches('/'));
    snap.iter()
        .filter(|(k, _)| k.starts_with(p))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The release records of the root's manifest (`kata`, `releases`) and its pending `intents`.
fn releases(root: &Path) -> serde_json::Value {
    let path = root.join(INSTALLER_DIR).join("manifest.json");
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("read the manifest"))
            .expect("manifest JSON");
    serde_json::json!({
        "kata": m["kata"],
        "releases": m["releases"],
        "intents": m["intents"],
    })
}

/// Kata staging dirs under the node's /opt (a killed run's must not outlive the next run).
fn staging_dirs(root: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(root.join("opt"))
        .map(|list| {
            list.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(".kata-staging-")
                })
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn handlers_name(canary: bool) -> String {
    format!("handlers-canary-{canary}.toml")
}

/// `[[handlers]]` for the main bake; with `canary`, one runs from [`CANARY`].
fn handlers(canary: bool) -> String {
    let mut s = String::from(
        "[[handlers]]\nname = \"kata-qemu-big\"\nhypervisor = \"qemu\"\ndefault_vcpus = 4\n",
    );
    if canary {
        s.push_str(&format!(
            "\n[[handlers]]\nname = \"kata-qemu-328\"\nhypervisor = \"qemu\"\nkata_root = \"{CANARY}\"\ndefault_memory = 1024\n"
        ));
    }
    s
}

#[test]
fn kill_9_at_every_step_of_bake_converges() {
    let Some(bed) = Bed::new() else { return };
    let before = state(&bed.root());
    let steps = bed.steps(Run::Bake);
    assert!(steps.len() > 10, "too few steps traced: {steps:?}");
    let baked = state(&bed.root());
    at_every_step(
        &bed,
        Run::Bake,
        &steps,
        || bed.reset(),
        &[
            // Uninstall straight after the kill removes exactly what was written.
            &|_, ctx| {
                bed.ok(Run::Uninstall, ctx);
                assert_eq!(state(&bed.root()), before, "uninstall after {ctx}");
            },
            &|_, ctx| {
                bed.ok(Run::Bake, ctx);
                assert_eq!(state(&bed.root()), baked, "re-run bake after {ctx}");
                bed.ok(Run::Uninstall, ctx);
                assert_eq!(state(&bed.root()), before, "uninstall after re-run, {ctx}");
            },
        ],
    );
}

#[test]
fn kill_9_at_every_step_of_boot_and_uninstall_converges() {
    let Some(bed) = Bed::new() else { return };
    let before = state(&bed.root());
    bed.ok(Run::Bake, "clean");
    let baked_root = bed.keep("baked");
    let boot_steps = bed.steps(Run::Boot);
    let booted = state(&bed.root());
    let booted_root = bed.keep("booted");
    let uninstall_steps = bed.steps(Run::Uninstall);
    assert_eq!(state(&bed.root()), before);
    assert!(!boot_steps.is_empty() && uninstall_steps.len() > 5);

    at_every_step(
        &bed,
        Run::Boot,
        &boot_steps,
        || bed.restore(&baked_root),
        &[
            &|_, ctx| {
                bed.ok(Run::Boot, ctx);
                assert_eq!(state(&bed.root()), booted, "re-run boot after {ctx}");
            },
            &|_, ctx| {
                bed.ok(Run::Uninstall, ctx);
                assert_eq!(state(&bed.root()), before, "uninstall after {ctx}");
            },
        ],
    );
    at_every_step(
        &bed,
        Run::Uninstall,
        &uninstall_steps,
        || bed.restore(&booted_root),
        &[&|_, ctx| {
            bed.ok(Run::Uninstall, ctx);
            assert_eq!(state(&bed.root()), before, "re-run uninstall after {ctx}");
        }],
    );
}

/// A canary release baked beside a completed main bake: after a kill at any step the same canary
/// bake, run again, leaves exactly what a clean one does (the relocated tree, its record, no
/// staging dir), and a full uninstall still restores the pristine root.
#[test]
fn kill_9_at_every_step_of_a_canary_bake_converges() {
    let Some(bed) = Bed::new() else { return };
    let before = state(&bed.root());
    bed.ok(Run::Bake, "clean");
    let baked_root = bed.keep("baked");
    let steps = bed.steps(Run::CanaryBake);
    // The tree's flush (syncfs) and rename into place are among the traced steps: the install
    // ran on the traced thread.
    assert!(
        steps.iter().any(|s| s.syscall == "syncfs") && steps.len() > 5,
        "too few steps traced: {steps:?}"
    );
    let canary_baked = state(&bed.root());
    let canary_tree = under(&canary_baked, CANARY);
    assert!(canary_tree.len() > 5, "{CANARY} not baked: {canary_tree:?}");
    let canary_records = releases(&bed.root());
    assert_eq!(
        canary_records["releases"][0]["root"], CANARY,
        "{canary_records}"
    );

    at_every_step(
        &bed,
        Run::CanaryBake,
        &steps,
        || bed.restore(&baked_root),
        &[&|_, ctx| {
            bed.ok(Run::CanaryBake, ctx);
            let now = state(&bed.root());
            assert_eq!(
                under(&now, CANARY),
                canary_tree,
                "{CANARY} after re-run, {ctx}"
            );
            assert_eq!(now, canary_baked, "re-run canary bake after {ctx}");
            assert_eq!(
                releases(&bed.root()),
                canary_records,
                "manifest records after re-run, {ctx}"
            );
            assert_eq!(
                staging_dirs(&bed.root()),
                Vec::<PathBuf>::new(),
                "after re-run, {ctx}"
            );
            bed.ok(Run::Uninstall, ctx);
            assert_eq!(state(&bed.root()), before, "uninstall after re-run, {ctx}");
        }],
    );
}

/// `uninstall --kata-root` of a canary no handler uses any more: after a kill at any step, running
/// it again removes the canary root and nothing else, and a full uninstall restores the pristine
/// root. The killed run forgets the release in its last manifest save, after the tree is gone:
/// killed before that save's rename, the release is still recorded and the re-run finishes the
/// removal (exit 0); killed after it, everything is done and the re-run finds no such release
/// (exit 2, "not a release", as for any root bake never installed).
#[test]
fn kill_9_at_every_step_of_a_canary_uninstall_converges() {
    let Some(bed) = Bed::new() else { return };
    let before = state(&bed.root());
    bed.ok(Run::BakeHandlers { canary: true }, "clean");
    bed.ok(Run::CanaryBake, "clean");
    // Retired as the operator guide says: re-baked without the handler that used it.
    bed.ok(Run::BakeHandlers { canary: false }, "clean");
    let retired_root = bed.keep("retired");
    let retired = state(&bed.root());
    assert!(
        bed.root().join(CANARY.trim_start_matches('/')).is_dir(),
        "{CANARY} not baked"
    );
    let traced = bed.traced(Run::CanaryUninstall);
    // Compared without the installer's own dir (the manifest and its backups).
    let outside = |s: &BTreeMap<PathBuf, String>| without(s, INSTALLER_DIR);
    let removed = outside(&without(&retired, CANARY));
    assert_eq!(
        outside(&state(&bed.root())),
        removed,
        "clean uninstall --kata-root"
    );
    let forgotten_at = traced
        .iter()
        .rposition(|(s, line)| {
            s.syscall.starts_with("rename")
                && line.contains("/var/lib/noded/installer/manifest.json\"")
        })
        .unwrap_or_else(|| panic!("no manifest save traced: {traced:#?}"));
    let steps: Vec<Step> = traced.into_iter().map(|(s, _)| s).collect();
    assert!(
        steps
            .iter()
            .filter(|s| s.syscall == "unlinkat" || s.syscall == "rmdir")
            .count()
            > 3,
        "the tree's removal is not among the traced steps: {steps:?}"
    );

    at_every_step(
        &bed,
        Run::CanaryUninstall,
        &steps,
        || bed.restore(&retired_root),
        &[
            &|step, ctx| {
                let out = bed.run(Run::CanaryUninstall);
                let stderr = String::from_utf8_lossy(&out.stderr);
                let at = steps.iter().position(|s| s == step).expect("a traced step");
                if at > forgotten_at {
                    assert_eq!(out.status.code(), Some(2), "re-run after {ctx}: {stderr}");
                    assert!(
                        stderr.contains("not a release"),
                        "re-run after {ctx}: {stderr}"
                    );
                } else {
                    assert!(out.status.success(), "re-run after {ctx}: {stderr}");
                }
                assert!(
                    !bed.root().join(CANARY.trim_start_matches('/')).exists(),
                    "{CANARY} left after re-run, {ctx}"
                );
                assert_eq!(outside(&state(&bed.root())), removed, "re-run after {ctx}");
                assert_eq!(
                    releases(&bed.root())["releases"],
                    serde_json::Value::Null,
                    "the release is still recorded after re-run, {ctx}"
                );
                bed.ok(Run::Uninstall, ctx);
                assert_eq!(state(&bed.root()), before, "uninstall after re-run, {ctx}");
            },
            &|_step, ctx| {
                // The operator bakes the canary again instead: never a half-removed tree taken for the
                // installed release (a kill while its files were deleted), always the whole release.
                bed.ok(Run::CanaryBake, ctx);
                assert_eq!(
                    outside(&state(&bed.root())),
                    outside(&retired),
                    "canary re-baked after {ctx}"
                );
                bed.ok(Run::Uninstall, ctx);
                assert_eq!(state(&bed.root()), before, "uninstall after re-bake, {ctx}");
            },
        ],
    );
}
