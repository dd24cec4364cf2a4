//! Spoofed processes (issue 12, item 2): a process's command line is no identity. Processes that only
//! *look* like Kata VMs or like noded's VMs are neither counted by the observer nor killed by the
//! reaper; a VM under a root Kata shim is counted, and a real leftover QEMU of noded is still reaped.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use noded::hypervisor::Hypervisor;
use noded::metrics::openmetrics_to_prometheus_text;
use noded::observe::procscan::{BootKind, Origin, ProcessKind, Scanner};
use noded::vm::backend::{Backend, Launch, Mapping};
use noded::vm::qemu::Qemu;
use noded::vm::reap::{self, VmRecord};
use testkit::process::{Proc, named_process, scan_until};
use testkit::synthetic::{self, SyntheticNode};

fn tag() -> String {
    format!("{}x{}", std::process::id(), rand::random::<u32>())
}

/// `named_process`, run as uid/gid 65534 (`nobody`) with no supplementary groups.
fn nobody_process(argv0: &str, args: &[&str], script: &str) -> Proc {
    let body = if script.is_empty() {
        "sleep 600; true"
    } else {
        script
    };
    let mut cmd = Command::new("setpriv");
    cmd.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "bash",
        "-c",
    ])
    .arg(format!("exec -a {argv0} bash -c '{body}' \"$@\""))
    .arg("bash")
    .args(args)
    .current_dir("/");
    Proc::spawn(&mut cmd)
}

fn argv_of(pid: i32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|c| *c == 0)
                .filter(|a| !a.is_empty())
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Waits until `pid` runs with `argv0` (the spawned shell has exec'd).
fn wait_argv0(pid: i32, argv0: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while argv_of(pid).first().map(String::as_str) != Some(argv0) {
        assert!(
            Instant::now() < deadline,
            "pid {pid} never ran as {argv0}: {:?}",
            argv_of(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn uid_of(pid: i32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| reap::parse_stat(&s))
        .is_some_and(|(state, _)| state != 'Z' && state != 'X')
}

fn prerequisites() -> bool {
    common::require("bash").is_some()
        && common::require("setpriv").is_some()
        && common::require_root()
}

/// The real /proc: spoofed hypervisors (uid 65534, a non-root "shim", a root QEMU-named process under
/// no shim, a `noded-x-1` without a spawn record) are unattributed; the child of a root shim is a VM.
#[test]
fn spoofed_vms_on_real_proc_are_not_counted_but_a_root_shims_child_is() {
    if !prerequisites() {
        return;
    }
    let t = tag();
    let run = tempfile::tempdir().expect("run dir");
    let vms_dir = run.path().join("vms");
    std::fs::create_dir_all(vms_dir.join("x")).expect("vms dir");
    let qmp = format!("{}/x/qmp.sock", vms_dir.display());

    let evil = format!("sandbox-evil{t}");
    let spoof = nobody_process(
        "qemu-system-x86_64",
        &[
            "-name",
            &evil,
            "-object",
            "memory-backend-file,id=m,size=2048M,mem-path=/dev/shm,share=on",
        ],
        "",
    );
    let fake_noded = nobody_process(
        "qemu-system-x86_64",
        &["-name", "noded-x-1", "-qmp", &qmp],
        "",
    );
    // A "shim" run by nobody, with a QEMU-named child: naming a process after Kata's shim is free.
    let evil_shim_id = format!("evilshim{t}");
    let evil_shim = nobody_process(
        "/opt/kata/bin/containerd-shim-kata-qemu-v2",
        &["-namespace", "k8s.io", "-id", &evil_shim_id],
        "(exec -a qemu-system-x86_64 sleep 600) & wait",
    );
    // Root, but under no shim.
    let orphan = format!("sandbox-orphan{t}");
    let root_orphan = named_process("qemu-system-x86_64", &["-name", &orphan], "");
    // The real thing: a root shim whose child is the hypervisor (as Kata 3 starts QEMU).
    let good = format!("good{t}");
    let good_shim = named_process(
        "/opt/kata/bin/containerd-shim-kata-v2",
        &["-namespace", "k8s.io", "-id", &good],
        "(exec -a qemu-system-x86_64 sleep 600) & wait",
    );
    for p in [&spoof, &fake_noded, &root_orphan] {
        wait_argv0(p.pid(), "qemu-system-x86_64");
    }
    // Until it has exec'd, the shim is still setpriv, running as root.
    wait_argv0(
        evil_shim.pid(),
        "/opt/kata/bin/containerd-shim-kata-qemu-v2",
    );
    assert_eq!(uid_of(spoof.pid()), Some(synthetic::NOBODY));
    assert_eq!(uid_of(evil_shim.pid()), Some(synthetic::NOBODY));

    let scanner = Scanner::new("/proc", vec![], vec!["x".into()]).with_own_vms(&vms_dir);
    let spoofed = [spoof.pid(), fake_noded.pid(), root_orphan.pid()];
    let report = scan_until(&scanner, |r| {
        r.sandboxes
            .iter()
            .any(|s| s.id == good && s.hypervisor.is_some())
            && spoofed
                .iter()
                .all(|pid| r.unattributed.iter().any(|p| p.pid == *pid))
            && r.unattributed
                .iter()
                .any(|p| p.pid == evil_shim.pid() && p.kind == ProcessKind::KataShim)
    });
    let sb = report
        .sandboxes
        .iter()
        .find(|s| s.id == good)
        .unwrap_or_else(|| panic!("the root shim's sandbox is missing: {report:#?}"));
    assert_eq!(sb.origin, Origin::Kata);
    let hv = sb.hypervisor.as_ref().expect("hypervisor of the root shim");
    assert_eq!(hv.kind, Hypervisor::Qemu);
    assert_eq!(sb.boot(), Some(BootKind::Cold));
    assert_eq!(
        argv_of(good_shim.pid()).first().map(String::as_str),
        Some("/opt/kata/bin/containerd-shim-kata-v2")
    );

    for s in &report.sandboxes {
        assert!(
            !s.id.contains(&t) || s.id == good,
            "spoofed process counted as sandbox {}: {s:#?}",
            s.id
        );
        assert!(
            !matches!(s.origin, Origin::Noded { .. }),
            "a process without a spawn record counted as noded's VM: {s:#?}"
        );
    }
    for pid in spoofed {
        assert!(
            report.unattributed.iter().any(|p| p.pid == pid),
            "spoofed pid {pid} is not reported as unattributed: {:#?}",
            report.unattributed
        );
    }
    assert!(
        report
            .unattributed
            .iter()
            .any(|p| p.pid == evil_shim.pid() && p.kind == ProcessKind::KataShim),
        "the nobody shim is not unattributed: {:#?}",
        report.unattributed
    );
}

fn figures(spoofed_vms: u32) -> (String, u64, u64, u64, usize) {
    let tree = tempfile::tempdir().expect("tempdir");
    synthetic::generate(
        tree.path(),
        &SyntheticNode {
            vms: 20,
            clone_every: 0,
            other_processes: 5,
            spoofed_vms,
            ..SyntheticNode::default()
        },
    )
    .expect("synthetic /proc");
    let obs = synthetic::observer_on(tree.path(), &["kata-qemu"]);
    let scan = obs.observe_now().expect("observe");
    let text = openmetrics_to_prometheus_text(&obs.metrics().encode().expect("encode"));
    let vms: Vec<String> = text
        .lines()
        .filter(|l| {
            l.starts_with("noded_vms{")
                || l.starts_with("noded_vm_slots{")
                || l.starts_with("noded_vm_host_memory_bytes{")
        })
        .map(String::from)
        .collect();
    // Label sets are encoded in hash order.
    let mut vms = vms;
    vms.sort();
    let h = obs
        .handler_snapshots()
        .into_iter()
        .find(|h| h.runtime_handler == "kata-qemu")
        .expect("kata-qemu");
    (
        vms.join("\n"),
        h.vms,
        h.slots_total,
        h.memory.pss,
        scan.unattributed.len(),
    )
}

/// A synthetic node with 50 spoofed VMs (uid 65534, under no shim) reports exactly the VM count, slots,
/// memory (the figures behind `noded.io/vm-slots` and the RuntimeClass overhead) of the clean node.
#[test]
fn spoofed_vms_change_no_count_slot_or_overhead_figure() {
    let clean = figures(0);
    let spoofed = figures(50);
    assert_eq!(clean.1, 20, "{clean:?}");
    assert_eq!(clean.4, 0);
    assert_eq!(spoofed.4, 50, "every spoofed VM is reported unattributed");
    assert_eq!(clean.0, spoofed.0, "metrics moved by spoofed processes");
    assert_eq!(
        (clean.1, clean.2, clean.3),
        (spoofed.1, spoofed.2, spoofed.3)
    );
}

/// noded's start-up reap kills a real leftover QEMU (recorded at spawn) and nothing else: not a
/// process named `noded-x-1`, not a QEMU-named process whose arguments hold the run dir, not a process
/// whose pid a stale or forged record names with another start time or executable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_reap_kills_recorded_qemu_only() {
    if !prerequisites() || common::require("qemu-system-x86_64").is_none() {
        return;
    }
    let h = common::vm::VmHarness::new();
    let run = h.run_dir.clone();
    let vms = h.layout.vms_dir();
    std::fs::create_dir_all(&vms).expect("vms dir");
    let run_arg = format!("{}/vms/x/qmp.sock", run.display());

    // The process the old reaper SIGKILLed, and its closer lookalike.
    let named = nobody_process("noded-x-1", &["-name", "noded-x-1", &run_arg], "");
    let lookalike = named_process(
        "qemu-system-x86_64",
        &[
            "-name",
            "noded-x-1",
            "-qmp",
            &format!("unix:{run_arg},server=on"),
        ],
        "",
    );
    wait_argv0(named.pid(), "noded-x-1");
    wait_argv0(lookalike.pid(), "qemu-system-x86_64");

    // Records that name live processes which are not what was recorded.
    let victim = named_process("sleep-victim", &[], "");
    wait_argv0(victim.pid(), "sleep-victim");
    let victim_pid = u32::try_from(victim.pid()).expect("pid");
    let honest = VmRecord::of_pid(victim_pid, "noded-d-stale").expect("record");
    for (dir, record) in [
        // pid recycled: same pid, another start time.
        (
            "stale",
            VmRecord {
                starttime: honest.starttime + 1,
                ..honest.clone()
            },
        ),
        // forged: right pid and start time, but the recorded executable is QEMU.
        (
            "forged",
            VmRecord {
                exe: "/usr/bin/qemu-system-x86_64".into(),
                ..honest.clone()
            },
        ),
    ] {
        let d = vms.join(dir);
        std::fs::create_dir_all(&d).expect("record dir");
        record.write(&d).expect("write record");
    }

    // A real QEMU started by noded's own spawn path, left behind as by a noded killed with -9.
    let machine = [
        "-machine",
        "q35,accel=tcg,memory-backend=mem0",
        "-m",
        "64M",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
    ]
    .map(String::from);
    let launch = Launch {
        name: h.layout.vm_name("d", "leftover1"),
        dir: vms.join("leftover1"),
        memory_file: run.join("leftover1.mem"),
        memory_mib: 64,
        mapping: Mapping::Private,
        machine_args: machine.to_vec(),
        vmgenid: uuid::Uuid::new_v4(),
        dies_with_noded: false,
    };
    let vm = Qemu::default().spawn(launch).await.expect("spawn QEMU");
    let qemu_pid = vm.pid().expect("QEMU pid");
    // No Drop: the process outlives its owner like an orphan of a killed noded.
    std::mem::forget(vm);
    assert_eq!(
        reap::find_vms(&run),
        vec![(qemu_pid, h.layout.vm_name("d", "leftover1"))],
        "only the recorded QEMU is noded's"
    );

    let engine = noded::vm::engine::Engine::start(h.options(vec![]))
        .await
        .expect("engine start (reaps)");
    assert_eq!(engine.reaped.processes, vec![qemu_pid]);
    let i_qemu = i32::try_from(qemu_pid).expect("pid");
    let deadline = Instant::now() + Duration::from_secs(10);
    while alive(i_qemu) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!alive(i_qemu), "the leftover QEMU survived the reap");
    for (what, p) in [
        ("noded-x-1", &named),
        ("QEMU lookalike", &lookalike),
        ("record victim", &victim),
    ] {
        assert!(
            alive(p.pid()),
            "{what} (pid {}) was killed by the reap",
            p.pid()
        );
    }
    engine.shutdown().await;
    for p in [&named, &lookalike, &victim] {
        assert!(
            alive(p.pid()),
            "pid {} was killed by the engine shutdown",
            p.pid()
        );
    }
    drop((named, lookalike, victim));
    h.assert_no_leaks();
}
