//! Issue 12, item 5 for templates: kill -9 at every persistence step of a real `noded template build`
//! (strace fault injection, no hook in the binary). Whatever the killed build left (a half-made
//! template dir, its tmpfs, a QEMU mid-boot, a spawn record), the next build converges to a valid
//! template, `destroy` removes it, and no mount or process of the run dir is left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::vm::{TEST_MEMORY_MIB, available, shared_data_dir};
use noded::vm::reap;
use noded::vm::template::mounts_under;
use testkit::strace::{Step, Strace};

/// What a template build changes on disk, plus the tmpfs mount (a kill between mount and the first
/// write leaves an empty tmpfs that the next build must take over or remove).
const STEPS: &str = "mkdir,mkdirat,rename,renameat,renameat2,symlink,symlinkat,unlink,unlinkat,rmdir,fsync,fdatasync,mount,umount2";

fn noded_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_noded"))
}

struct Tree {
    tmp: tempfile::TempDir,
}

impl Tree {
    fn new() -> Self {
        // Short path: QEMU's unix sockets live under run_dir (108-byte limit).
        let tmp = tempfile::Builder::new()
            .prefix("ntc")
            .tempdir_in("/tmp")
            .expect("tempdir");
        Self { tmp }
    }
    fn run_dir(&self) -> PathBuf {
        self.tmp.path().join("run")
    }
    fn config(&self) -> PathBuf {
        let path = self.tmp.path().join("noded.toml");
        let text = format!(
            "[daemon]\nrun_dir = {run:?}\ndata_dir = {data:?}\n\n[guest]\ndownload = true\naccel = \"tcg\"\n\n\
             [[templates]]\nname = \"t\"\nmemory_mib = {TEST_MEMORY_MIB}\nvcpus = 1\n",
            run = self.run_dir().display().to_string(),
            data = shared_data_dir().display().to_string(),
        );
        std::fs::write(&path, text).expect("write config");
        path
    }
    /// QEMU processes started for this run dir, by their spawn records and by their command line
    /// (a process killed before its record was written is only found by the latter).
    fn live_vms(&self) -> Vec<String> {
        let mut found: Vec<String> = reap::find_vms(&self.run_dir())
            .into_iter()
            .map(|(pid, name)| format!("{pid} {name}"))
            .collect();
        let marker = self.run_dir().display().to_string();
        for p in procfs::process::all_processes()
            .into_iter()
            .flatten()
            .flatten()
        {
            if let Ok(cmd) = p.cmdline()
                && cmd.first().is_some_and(|a| a.contains("qemu-system"))
                && cmd.iter().any(|a| a.contains(&marker))
            {
                found.push(format!("{} {}", p.pid, cmd.join(" ")));
            }
        }
        found.sort();
        found.dedup();
        found
    }
    fn cleanup(&self) {
        reap::kill_vms_blocking(&self.run_dir());
        for v in self.live_vms() {
            if let Some(pid) = v.split(' ').next().and_then(|p| p.parse::<i32>().ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        noded::vm::template::destroy_dir(&self.run_dir());
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn noded(config: &Path, action: &str) -> Command {
    let mut c = Command::new(noded_bin());
    c.args(["template", action, "--config"]).arg(config);
    c
}

fn run(config: &Path, action: &str) -> Output {
    noded(config, action).output().expect("run noded")
}

fn ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what}: {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn kill_9_at_every_step_of_a_template_build_converges() {
    if !available() {
        return;
    }
    let Some(strace) = Strace::require(STEPS) else {
        return;
    };
    let tree = Tree::new();
    let config = tree.config();
    // Guest assets once (cached in the shared data dir), outside the traced runs.
    ok(&run(&config, "assets"), "assets");

    let steps = strace
        .steps(
            &noded(&config, "build"),
            &tree.tmp.path().join("build.strace"),
        )
        .expect("traced build");
    // The tmpfs, the template dir and the manifest's atomic rename must be on the traced thread;
    // if they move elsewhere this list loses them and the test would test nothing.
    for syscall in ["mount", "rename"] {
        assert!(
            steps.iter().any(|s| s.syscall == syscall),
            "{syscall} not traced: {steps:?}"
        );
    }
    ok(&run(&config, "destroy"), "destroy after the traced build");

    let mut failures = Vec::new();
    for step in &steps {
        if let Err(e) = crash_and_converge(&strace, &tree, &config, step) {
            failures.push(format!("{step}: {e}"));
        }
        tree.cleanup();
    }
    assert!(
        failures.is_empty(),
        "{} of {} steps did not converge:\n{}",
        failures.len(),
        steps.len(),
        failures.join("\n")
    );
    assert!(
        tree.live_vms().is_empty(),
        "QEMU left: {:?}",
        tree.live_vms()
    );
    assert!(mounts_under(tree.tmp.path()).is_empty());
}

fn crash_and_converge(
    strace: &Strace,
    tree: &Tree,
    config: &Path,
    step: &Step,
) -> Result<(), String> {
    strace
        .kill_at(&noded(config, "build"), step)
        .map_err(|e| format!("{e:#}"))?;
    // What the killed build left must not make the next one fail or build on a torn template.
    let out = run(config, "build");
    if !out.status.success() {
        return Err(format!(
            "rebuild failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let out = run(config, "status");
    if !out.status.success() {
        return Err(format!(
            "status after rebuild: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ));
    }
    let out = run(config, "destroy");
    if !out.status.success() {
        return Err(format!(
            "destroy: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let mounts = mounts_under(&tree.run_dir());
    if !mounts.is_empty() {
        return Err(format!("mounts left after destroy: {mounts:?}"));
    }
    // The killed build's QEMU must not outlive it (nobody else would ever stop it).
    let vms = tree.live_vms();
    if !vms.is_empty() {
        return Err(format!("QEMU left after the killed build: {vms:?}"));
    }
    Ok(())
}
