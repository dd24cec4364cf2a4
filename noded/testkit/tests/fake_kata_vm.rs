//! The bootable fake Kata release with the real QEMU (TCG): `kata-runtime factory init` builds a VM
//! template (memory + device state on a tmpfs) the way Kata's factory does, and the fake shim, under a
//! private containerd, starts each sandbox's VM as a clone of that template when the handler's config
//! enables templating, cold otherwise, and cold when the template's state is damaged (never a broken
//! clone). noded's own `/proc` scanner must classify those QEMU processes the same way.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use noded::containerd::apply::{self, Request};
use noded::containerd::handler::KataHandler;
use noded::containerd::image::{self, DEFAULT_BUSYBOX, PAUSE_IMAGE};
use noded::containerd::restart::Restart;
use noded::cri::{CriClient, PodSpec};
use noded::observe::procscan::{Scanner, VmRole};
use testkit::containerd::{self as series_ctrd, Series};
use testkit::fake_kata::{FakeKata, QEMU_SYSTEM};
use testkit::kata_guest::is_mountpoint;

const SHIM: &str = env!("CARGO_BIN_EXE_fake-kata-shim");
const RUNTIME: &str = env!("CARGO_BIN_EXE_fake-kata-runtime");
/// A cold boot under TCG takes seconds on an idle machine, much longer on a loaded one.
const POD_TIMEOUT: Duration = Duration::from_secs(180);

fn prerequisites() -> bool {
    testkit::require::require_root()
        && testkit::require::require(QEMU_SYSTEM).is_some()
        && testkit::require::require("/usr/sbin/runc").is_some()
        && testkit::require::require(DEFAULT_BUSYBOX).is_some()
}

/// Unmounts a template tmpfs (lazily: a clone may still map it) whatever the test's outcome.
struct MountGuard(PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        while is_mountpoint(&self.0) {
            if nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH).is_err() {
                break;
            }
        }
    }
}

/// Kills every QEMU whose command line names `root` (the test's temp dir), whatever the outcome.
struct QemuGuard(PathBuf);

impl QemuGuard {
    fn pids(&self) -> Vec<i32> {
        qemu_pids_under(&self.0)
    }
}

impl Drop for QemuGuard {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn cmdline(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

fn qemu_pids_under(root: &Path) -> Vec<i32> {
    let root = root.display().to_string();
    std::fs::read_dir("/proc")
        .expect("read /proc")
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let argv = cmdline(*pid);
            argv.first()
                .is_some_and(|a| a.ends_with("qemu-system-x86_64"))
                && argv.iter().any(|a| a.contains(&root))
        })
        .collect()
}

/// The release's source config turned into a templating one, as noded's warm config derivation does:
/// `initrd` instead of `image`, `enable_template = true`, the template under the test's temp dir.
fn warm_config(kata: &FakeKata, template: &Path) -> PathBuf {
    let source = std::fs::read_to_string(kata.qemu_config()).expect("read qemu config");
    let image = kata.root.join("share/kata-containers/kata-containers.img");
    let initrd = kata
        .root
        .join("share/kata-containers/kata-containers-initrd.img");
    let warm = source
        .replace(
            &format!("image = \"{}\"", image.display()),
            &format!("initrd = \"{}\"", initrd.display()),
        )
        .replace("#enable_template = true", "enable_template = true")
        .replace(
            "#template_path = \"/run/vc/vm/template\"",
            &format!("template_path = \"{}\"", template.display()),
        );
    assert!(
        warm.contains("initrd = ")
            && !warm.contains("image = ")
            && warm.contains(&template.display().to_string()),
        "the release's configuration-qemu.toml changed shape:\n{source}"
    );
    let path = kata
        .root
        .join("share/defaults/kata-containers/configuration-qemu-warm.toml");
    std::fs::write(&path, warm).expect("write warm config");
    path
}

fn runtime(kata: &FakeKata, config: &Path, verb: &str) -> std::process::Output {
    Command::new(kata.root.join("bin/kata-runtime"))
        .arg("--config")
        .arg(config)
        .args(["factory", verb])
        .output()
        .expect("run kata-runtime")
}

fn bootable(tmp: &Path) -> FakeKata {
    let root = tmp.join("opt/kata");
    FakeKata::write_bootable(&root, &root, "3.18.0", Path::new(SHIM), Path::new(RUNTIME))
}

#[test]
fn factory_init_builds_a_template_on_a_tmpfs_and_destroy_unmounts_it() {
    if !prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let qemu = QemuGuard(tmp.path().to_path_buf());
    let template = tmp.path().join("template");
    let _mount = MountGuard(template.clone());
    let kata = bootable(tmp.path());
    let warm = warm_config(&kata, &template);

    let version = Command::new(kata.root.join("bin/kata-runtime"))
        .arg("--version")
        .output()
        .expect("--version");
    assert_eq!(
        String::from_utf8_lossy(&version.stdout),
        "kata-runtime  : 3.18.0\n   commit   : 0000000\n"
    );

    // Kata's shipped config boots from an image: templating is refused, as a bad configuration.
    let out = runtime(&kata, &kata.qemu_config(), "init");
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    let out = runtime(&kata, &warm, "init");
    assert!(
        out.status.success(),
        "factory init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        is_mountpoint(&template),
        "no tmpfs at {}",
        template.display()
    );
    let memory = std::fs::metadata(template.join("memory")).expect("memory file");
    assert_eq!(memory.len(), 256 << 20, "guest RAM file is default_memory");
    let state = std::fs::metadata(template.join("state")).expect("state file");
    assert!(state.len() > 1000, "device state of {} bytes", state.len());
    assert!(qemu.pids().is_empty(), "the template VM must have quit");
    let status = runtime(&kata, &warm, "status");
    assert_eq!(
        String::from_utf8_lossy(&status.stdout).trim(),
        "vm factory is on"
    );

    // Kata refuses to build over an existing template.
    let out = runtime(&kata, &warm, "init");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already exists"),
        "{out:?}"
    );

    let out = runtime(&kata, &warm, "destroy");
    assert!(out.status.success(), "{out:?}");
    assert!(!is_mountpoint(&template), "destroy left the tmpfs mounted");
    assert!(!template.join("state").exists());
    let status = runtime(&kata, &warm, "status");
    assert_eq!(
        String::from_utf8_lossy(&status.stdout).trim(),
        "vm factory is off"
    );

    // An upgraded release's initrd has other bytes (a new template fingerprint) and still boots.
    let initrd = kata
        .root
        .join("share/kata-containers/kata-containers-initrd.img");
    let before = std::fs::read(&initrd).expect("initrd");
    kata.upgrade("3.19.0");
    assert_ne!(before, std::fs::read(&initrd).expect("initrd"));
    let out = runtime(&kata, &warm, "init");
    assert!(
        out.status.success(),
        "factory init after upgrade: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = runtime(&kata, &warm, "destroy");
    assert!(out.status.success(), "{out:?}");

    std::fs::write(kata.root.join("fail-init"), b"").expect("fail-init");
    let out = runtime(&kata, &warm, "init");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(!is_mountpoint(&template));

    assert_eq!(
        kata.factory_calls(),
        [
            "init", "init", "status", "init", "destroy", "status", "init", "destroy", "init"
        ]
    );
}

/// The VM record of sandbox `id`, its QEMU pid, and what noded's scanner makes of it.
fn vm_of(
    kata: &FakeKata,
    id: &str,
    template: &Path,
) -> (serde_json::Value, i32, Vec<String>, VmRole) {
    let calls = kata.vm_calls();
    let record = calls
        .iter()
        .rev()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no VM recorded for sandbox {id}: {calls:?}"))
        .clone();
    let pid = record["pid"]
        .as_i64()
        .and_then(|p| i32::try_from(p).ok())
        .unwrap_or_else(|| panic!("no pid in {record}"));
    let argv = cmdline(pid);
    assert!(
        argv.iter().any(|a| a == &format!("sandbox-{id}")),
        "pid {pid} is not the VM of {id}: {argv:?}"
    );
    let report = Scanner::new("/proc", vec![template.to_path_buf()], vec![])
        .scan()
        .expect("scan /proc");
    let sandbox = report
        .sandboxes
        .iter()
        .find(|s| s.id == id)
        .unwrap_or_else(|| panic!("scanner found no sandbox {id}: {report:?}"));
    let hv = sandbox
        .hypervisor
        .as_ref()
        .unwrap_or_else(|| panic!("scanner found no hypervisor for {id}: {sandbox:?}"));
    assert_eq!(hv.pid, pid);
    (record, pid, argv, hv.role)
}

async fn run_pod(
    cri: &mut CriClient,
    handler: KataHandler,
    ctrd_log: impl Fn() -> String,
) -> String {
    let pod = PodSpec::unique("fake-kata-vm", handler.name());
    cri.run_pod(&pod, POD_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox on {}: {e}\n{}", handler.name(), ctrd_log()))
}

fn wait_gone(pid: i32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while testkit::kata_guest::alive(u32::try_from(pid).expect("pid"))
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !testkit::kata_guest::alive(u32::try_from(pid).expect("pid")),
        "QEMU {pid} outlived its sandbox"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_clone_the_template_or_boot_cold() {
    if !prerequisites() {
        return;
    }
    let Some(bins) = series_ctrd::require(Series::V1_6) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let qemu = QemuGuard(tmp.path().to_path_buf());
    let template = tmp.path().join("template");
    let _mount = MountGuard(template.clone());
    let kata = bootable(tmp.path());
    let warm = warm_config(&kata, &template);

    // Built before containerd starts: its private mount namespace copies the host's mounts at start.
    let out = runtime(&kata, &warm, "init");
    assert!(
        out.status.success(),
        "factory init: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ctrd = series_ctrd::start(Series::V1_6, PAUSE_IMAGE)
        .await
        .unwrap_or_else(|e| panic!("start containerd: {e:#}"));
    let handlers = vec![KataHandler::Qemu, KataHandler::QemuWarm];
    for h in &handlers {
        kata.link_shim_as(h.name(), &ctrd.layout().bin);
    }
    image::ensure_local_images(ctrd.socket(), Path::new(DEFAULT_BUSYBOX))
        .await
        .expect("import images");
    let req = Request {
        config: ctrd.config_path().to_path_buf(),
        handlers,
        kata_root: kata.root.clone(),
        state_dir: tmp.path().join("state"),
        adopt: false,
        containerd_version: None,
        containerd_binary: bins.containerd.clone(),
        custom: Vec::new(),
        socket: Some(ctrd.socket().to_path_buf()),
    };
    let report = apply::apply(&req, &Restart::Command(ctrd.restart_command()))
        .await
        .unwrap_or_else(|e| panic!("apply: {e}\n{}", ctrd.log_tail(30)));
    assert!(
        report.restarted && report.verified,
        "handlers not loaded: {report:?}"
    );
    let mut cri = CriClient::connect(ctrd.socket()).await.expect("CRI");
    let log = || ctrd.log_tail(30);

    // Templating config with a template: a clone.
    let warm_pod = Box::pin(run_pod(&mut cri, KataHandler::QemuWarm, log)).await;
    let (record, clone_pid, argv, role) = vm_of(&kata, &warm_pod, &template);
    eprintln!("warm sandbox VM: {record}");
    assert_eq!(record["boot"], "template", "{record}");
    assert!(argv.iter().any(|a| a == "-incoming"), "{argv:?}");
    assert!(
        argv.iter()
            .any(|a| a.contains("share=off") && a.contains(&template.display().to_string())),
        "clone must map the template memory private: {argv:?}"
    );
    assert_eq!(role, VmRole::Clone);

    // Kata's shipped config (no templating): cold, while the clone still runs.
    let cold_pod = Box::pin(run_pod(&mut cri, KataHandler::Qemu, log)).await;
    let (record, cold_pid, argv, role) = vm_of(&kata, &cold_pod, &template);
    eprintln!("plain sandbox VM: {record}");
    assert_eq!(record["boot"], "cold", "{record}");
    assert!(
        record["reason"]
            .as_str()
            .is_some_and(|r| r.contains("enable_template")),
        "{record}"
    );
    assert!(!argv.iter().any(|a| a == "-incoming"), "{argv:?}");
    assert_eq!(role, VmRole::Cold);

    for (pod, pid) in [(&warm_pod, clone_pid), (&cold_pod, cold_pid)] {
        cri.remove_pod(pod, POD_TIMEOUT).await.expect("remove pod");
        wait_gone(pid);
    }

    // A damaged device state: the clone fails to restore and the sandbox boots cold instead.
    std::fs::write(template.join("state"), b"QEVM garbage, not a device state")
        .expect("corrupt state");
    let damaged_pod = Box::pin(run_pod(&mut cri, KataHandler::QemuWarm, log)).await;
    let (record, pid, argv, role) = vm_of(&kata, &damaged_pod, &template);
    eprintln!("sandbox VM on a damaged template: {record}");
    assert_eq!(record["boot"], "cold", "{record}");
    assert!(
        record["reason"]
            .as_str()
            .is_some_and(|r| r.contains("template clone failed")),
        "{record}"
    );
    assert!(!argv.iter().any(|a| a == "-incoming"), "{argv:?}");
    assert_eq!(role, VmRole::Cold);
    cri.remove_pod(&damaged_pod, POD_TIMEOUT)
        .await
        .expect("remove pod");
    wait_gone(pid);

    let vms: Vec<String> = kata
        .vm_calls()
        .iter()
        .map(|c| c["boot"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(vms, ["template", "cold", "cold"]);
    assert_eq!(qemu.pids(), Vec::<i32>::new(), "QEMU processes left");

    drop(ctrd);
    let out = runtime(&kata, &warm, "destroy");
    assert!(out.status.success(), "{out:?}");
    assert!(!is_mountpoint(&template), "destroy left the tmpfs mounted");
}
