//! VMs handed out survive noded (issue 12, item 7): a VM in use keeps running when noded is killed
//! with -9 or stopped with SIGTERM, sits in its own cgroup outside noded's (so a container restart
//! does not kill it either), is re-adopted by the next noded (listed in use, counted against
//! `max_vms_in_use`, released with its old handle), even when its template is rebuilt meanwhile; a VM
//! in use of a template no longer configured is reaped, as are idle clones of the previous run.
//!
//! The real binary, real QEMU (TCG here), real cgroups of this machine (v1/hybrid; v2 where mounted),
//! under a cgroup name private to each test, removed at the end.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::vm::{VmHarness, available, console, shared_data_dir};
use noded::api::{self, pb};
use noded::vm::template::mounts_under;

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Kills the daemon if a test fails before it is stopped.
struct Daemon(Option<Child>);

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Daemon {
    fn start(config: &Path) -> Daemon {
        let child = Command::new(env!("CARGO_BIN_EXE_noded"))
            .args(["run", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start noded run");
        Daemon(Some(child))
    }

    fn kill_9(mut self) {
        let mut child = self.0.take().expect("child");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap daemon");
    }

    fn sigterm(mut self) {
        let mut child = self.0.take().expect("child");
        let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let status = child.wait().expect("wait");
        assert!(status.success(), "noded run exits 0 on SIGTERM: {status}");
    }

    /// Waits until the daemon reports `template` ready with a full pool; returns the whole status.
    async fn wait_pool_full(&mut self, socket: &Path, template: &str) -> pb::StatusResponse {
        for _ in 0..1200 {
            if let Some(status) = self.0.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("noded run exited early: {status}");
            }
            if let Ok(mut c) = api::connect(socket).await
                && let Ok(s) = c.status(pb::StatusRequest {}).await
            {
                let s = s.into_inner();
                if s.templates
                    .iter()
                    .any(|t| t.name == template && t.ready && t.pool_ready == t.pool_target)
                {
                    return s;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("template {template}: pool never became full");
    }
}

/// The cgroup hierarchies of this machine (v2: the root; v1/hybrid: one directory per mount).
fn hierarchies() -> Vec<PathBuf> {
    let root = Path::new(CGROUP_ROOT);
    if root.join("cgroup.controllers").exists() {
        return vec![root.to_path_buf()];
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(root)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path())
                .filter(|p| p.join("cgroup.procs").exists())
                .collect()
        })
        .unwrap_or_default();
    found.sort();
    found
}

/// A VM cgroup name private to one test. Dropping it kills whatever is still inside (only this
/// test's VMs can be) and removes the tree from every hierarchy.
struct TestCgroup {
    name: String,
}

impl TestCgroup {
    /// `None` (skip) when the cgroup filesystem cannot be written here; under CI=true that fails.
    fn new() -> Option<TestCgroup> {
        let name = format!(
            "noded-test-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let probe = hierarchies()
            .first()
            .map(|h| h.join(&name))
            .ok_or_else(|| std::io::Error::other("no cgroup hierarchy mounted"))
            .and_then(|p| std::fs::create_dir(&p).and_then(|()| std::fs::remove_dir(&p)));
        if let Err(e) = probe {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{CGROUP_ROOT} is not writable ({e}); CI=true: failing instead of skipping"
            );
            eprintln!("skipping: {CGROUP_ROOT} is not writable: {e}");
            return None;
        }
        Some(TestCgroup { name })
    }

    /// `<hierarchy>/<name>` in every hierarchy.
    fn dirs(&self) -> Vec<PathBuf> {
        hierarchies().iter().map(|h| h.join(&self.name)).collect()
    }

    /// Directories of VM `leaf` that exist.
    fn existing(&self, leaf: &str) -> Vec<PathBuf> {
        self.dirs()
            .into_iter()
            .map(|d| d.join(leaf))
            .filter(|d| d.exists())
            .collect()
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for dir in self.dirs() {
            let leaves: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map(|d| {
                    d.filter_map(Result::ok)
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path())
                        .collect()
                })
                .unwrap_or_default();
            for leaf in leaves {
                for pid in std::fs::read_to_string(leaf.join("cgroup.procs"))
                    .unwrap_or_default()
                    .lines()
                    .filter_map(|l| l.trim().parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
                for _ in 0..100 {
                    if std::fs::remove_dir(&leaf).is_ok() || !leaf.exists() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            let _ = std::fs::remove_dir(&dir);
        }
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit_once(')')
                .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

async fn wait_gone(pid: u32) -> bool {
    for _ in 0..500 {
        if !alive(pid) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

fn config(h: &VmHarness, cgroup: &TestCgroup, template: &str, memory_mib: u64) -> PathBuf {
    let path = h.path().join("noded.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[daemon]
data_dir = "{data}"
run_dir = "{run}"
api_socket = "{socket}"
metrics_listen = "127.0.0.1:0"
log_format = "text"
vm_cgroup = "{cgroup}"

[containerd]
config = "{tmp}/containerd/config.toml"
runtimes = []
apply_on_start = false

[probe]
handlers = []

[guest]
download = true

[[templates]]
name = "{template}"
memory_mib = {memory_mib}
pool_target = 1
max_vms_in_use = 1

[kubernetes]
enabled = false
"#,
            data = shared_data_dir().display(),
            run = h.run_dir.display(),
            socket = h.path().join("noded.sock").display(),
            tmp = h.path().display(),
            cgroup = cgroup.name,
        ),
    )
    .expect("write config");
    path
}

fn template<'a>(s: &'a pb::StatusResponse, name: &str) -> &'a pb::TemplateStatus {
    s.templates
        .iter()
        .find(|t| t.name == name)
        .unwrap_or_else(|| panic!("no template {name} in {s:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_in_use_survives_kill_9_in_its_own_cgroup_and_the_next_noded_releases_it() {
    if !available() {
        return;
    }
    let Some(cg) = TestCgroup::new() else {
        return;
    };
    let h = VmHarness::new();
    let socket = h.path().join("noded.sock");
    let cfg = config(&h, &cg, "d", 128);

    let mut first = Daemon::start(&cfg);
    let status = first.wait_pool_full(&socket, "d").await;
    assert_eq!(status.vm_cgroup, cg.name);
    assert_eq!(status.vm_cgroup_error, "", "cgroups are writable here");
    let mut client = api::connect(&socket).await.expect("connect");
    let vm = client
        .acquire_vm(pb::AcquireVmRequest {
            template: "d".into(),
        })
        .await
        .expect("acquire")
        .into_inner();
    let mut guest = console(Path::new(&vm.console)).await;
    let before = guest
        .ping(Duration::from_secs(15))
        .await
        .expect("guest answers")
        .counter;

    // Its own cgroup, in every hierarchy: none of noded's (its container's) any more.
    let own = std::fs::read_to_string(format!("/proc/{}/cgroup", vm.pid)).expect("cgroup");
    for line in own.lines() {
        assert!(
            line.ends_with(&format!(":/{}/{}", cg.name, vm.vm_id)),
            "VM not in its own cgroup: {line} (all: {own})"
        );
    }
    assert_eq!(cg.existing(&vm.vm_id).len(), hierarchies().len());
    // Its own process group too: a signal to noded's group (Ctrl-C) does not reach it.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", vm.pid)).expect("stat");
    let pgrp: u32 = stat
        .rsplit_once(')')
        .and_then(|(_, r)| r.split_whitespace().nth(2))
        .and_then(|p| p.parse().ok())
        .expect("pgrp field");
    assert_eq!(pgrp, vm.pid, "QEMU leads its own process group");
    let record =
        std::fs::read_to_string(h.run_dir.join("vms").join(&vm.vm_id).join("process.json"))
            .expect("spawn record");
    assert!(
        record.contains(&format!("\"vm_id\":\"{}\"", vm.vm_id)),
        "the record carries the lease: {record}"
    );

    // The pool refills; its idle clone is what the next noded must reap.
    first.wait_pool_full(&socket, "d").await;
    let idle: Vec<u32> = h
        .live_vms()
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|p| *p != vm.pid)
        .collect();
    assert_eq!(idle.len(), 1, "one idle clone besides the VM in use");
    drop(client);
    first.kill_9();
    assert!(alive(vm.pid), "the VM in use outlives noded");

    // The next noded, with the template's machine changed: it is rebuilt on a new tmpfs while the
    // adopted clone keeps mapping the old memory file.
    let cfg = config(&h, &cg, "d", 160);
    let mut second = Daemon::start(&cfg);
    let status = second.wait_pool_full(&socket, "d").await;
    let t = template(&status, "d");
    assert_eq!((t.in_use, t.max_in_use), (1, 1));
    assert_eq!(t.vms_in_use.len(), 1);
    let listed = &t.vms_in_use[0];
    assert_eq!(
        (listed.vm_id.as_str(), listed.pid, listed.adopted),
        (vm.vm_id.as_str(), vm.pid, true)
    );
    assert!(alive(vm.pid), "same process, still running");
    for pid in &idle {
        assert!(
            wait_gone(*pid).await,
            "idle clone {pid} of the first run reaped"
        );
    }
    assert_eq!(
        mounts_under(&h.run_dir).len(),
        1,
        "one template tmpfs: the rebuilt one"
    );
    let after = guest
        .ping(Duration::from_secs(15))
        .await
        .expect("the adopted guest still answers after its template was rebuilt")
        .counter;
    assert!(
        after > before,
        "same guest, counting on: {before} -> {after}"
    );

    let mut client = api::connect(&socket).await.expect("connect");
    let refused = client
        .acquire_vm(pb::AcquireVmRequest {
            template: "d".into(),
        })
        .await
        .expect_err("the adopted VM counts against max_vms_in_use = 1");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);

    drop(guest);
    client
        .release_vm(pb::ReleaseVmRequest {
            vm_id: vm.vm_id.clone(),
        })
        .await
        .expect("release with the handle of the first run");
    assert!(wait_gone(vm.pid).await, "released VM destroyed");
    assert!(!h.run_dir.join("vms").join(&vm.vm_id).exists());
    assert!(cg.existing(&vm.vm_id).is_empty(), "its cgroup is removed");
    let status = client
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    assert_eq!(template(&status, "d").in_use, 0);
    let again = client
        .acquire_vm(pb::AcquireVmRequest {
            template: "d".into(),
        })
        .await
        .expect("the slot is free again")
        .into_inner();
    client
        .release_vm(pb::ReleaseVmRequest { vm_id: again.vm_id })
        .await
        .expect("release");
    drop(client);

    second.sigterm();
    assert!(h.live_vms().is_empty(), "no QEMU after SIGTERM");
    assert!(mounts_under(&h.run_dir).is_empty(), "no template mount");
    for dir in cg.dirs() {
        assert!(!dir.exists(), "VM cgroup parent {} removed", dir.display());
    }
    h.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_keeps_a_vm_in_use_and_a_noded_without_its_template_reaps_it() {
    if !available() {
        return;
    }
    let Some(cg) = TestCgroup::new() else {
        return;
    };
    let h = VmHarness::new();
    let socket = h.path().join("noded.sock");
    let cfg = config(&h, &cg, "d", 128);

    let mut first = Daemon::start(&cfg);
    first.wait_pool_full(&socket, "d").await;
    let mut client = api::connect(&socket).await.expect("connect");
    let vm = client
        .acquire_vm(pb::AcquireVmRequest {
            template: "d".into(),
        })
        .await
        .expect("acquire")
        .into_inner();
    drop(client);
    let mut guest = console(Path::new(&vm.console)).await;
    guest
        .ping(Duration::from_secs(15))
        .await
        .expect("guest answers");

    // A clean stop (an image upgrade) keeps the VM in use, and only it.
    first.sigterm();
    let live: Vec<u32> = h.live_vms().into_iter().map(|(p, _)| p).collect();
    assert_eq!(live, vec![vm.pid], "only the VM in use is left");
    assert!(
        mounts_under(&h.run_dir).is_empty(),
        "the template tmpfs is unmounted"
    );
    guest
        .ping(Duration::from_secs(15))
        .await
        .expect("the kernel keeps the unmounted template memory for the clone mapping it");
    drop(guest);

    // The next noded has another template: the VM's own is gone from the config, so it is reaped.
    let cfg = config(&h, &cg, "e", 128);
    let mut second = Daemon::start(&cfg);
    let status = second.wait_pool_full(&socket, "e").await;
    assert!(wait_gone(vm.pid).await, "VM of a removed template reaped");
    assert!(!h.run_dir.join("vms").join(&vm.vm_id).exists());
    assert!(cg.existing(&vm.vm_id).is_empty(), "its cgroup is removed");
    assert_eq!(template(&status, "e").in_use, 0);
    assert!(!status.templates.iter().any(|t| t.name == "d"));

    second.sigterm();
    assert!(h.live_vms().is_empty(), "no QEMU after SIGTERM");
    h.assert_no_leaks();
}

/// The cgroup module against this machine's cgroups (v1/hybrid here): a process leaves the test's
/// cgroup for its own in every hierarchy, and its directories go when it is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_process_moves_into_its_own_cgroup_in_every_hierarchy() {
    if !common::require_root() {
        return;
    }
    let Some(cg) = TestCgroup::new() else {
        return;
    };
    let setting = noded::vm::cgroup::Setting::parse(&cg.name)
        .expect("valid")
        .expect("on");
    let status = noded::vm::cgroup::install(Some(&setting));
    assert_eq!(status.path, cg.name);
    assert_eq!(status.error, "");
    for dir in cg.dirs() {
        assert!(dir.is_dir(), "parent cgroup {} created", dir.display());
    }

    let mut child = Command::new("sleep").arg("600").spawn().expect("sleep");
    let pid = child.id();
    let vm_dir = Path::new("/nonexistent/vms/0123456789ab");
    let joined = noded::vm::cgroup::enter(pid, vm_dir).expect("joined a cgroup");
    assert_eq!(joined.dirs.len(), hierarchies().len(), "every hierarchy");
    assert_eq!(
        noded::vm::cgroup::enter(pid, vm_dir),
        Some(joined.clone()),
        "a second call (the record refreshed) finds it in place"
    );
    let now = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("cgroup");
    for line in now.lines() {
        assert!(
            line.ends_with(&format!(":/{}/0123456789ab", cg.name)),
            "{line}"
        );
    }
    assert_eq!(noded::vm::cgroup::status().error, "");

    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(joined.remove(), "removed once the process is gone");
    assert!(cg.existing("0123456789ab").is_empty());
    noded::vm::cgroup::remove_empty_parents();
    for dir in cg.dirs() {
        assert!(!dir.exists(), "{} removed", dir.display());
    }
    noded::vm::cgroup::install(None);
}
