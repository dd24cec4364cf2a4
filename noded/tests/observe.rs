//! VM observation against real QEMU processes and a synthetic /proc tree of 500 VMs.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use noded::metrics::{Metrics, openmetrics_to_prometheus_text};
use noded::observe::procscan::{
    BootKind, Hypervisor, KATA_FACTORY_TEMPLATE_DIR, Origin, ProcessKind, ScanReport, Scanner,
    VmRole,
};
use noded::observe::{Observer, ObserverConfig, TemplateRef};
use testkit::process::{Proc, named_process, scan_until};
use testkit::synthetic::{self, SyntheticNode};

fn unique(tag: &str) -> String {
    format!("{tag}{}x{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u32 {
    use std::time::SystemTime;
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
}

fn qemu(args: &[String]) -> Proc {
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-S",
        "-m",
        "64M",
    ])
    .args(args);
    Proc::spawn(&mut cmd)
}

#[test]
fn real_qemu_template_clone_cold_and_kata_sandbox() {
    // The Kata shim must run as root to stand for a sandbox.
    if common::require("qemu-system-x86_64").is_none() || !common::require_root() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let tpl_dir = tmp.path().join("templates");
    std::fs::create_dir(&tpl_dir).expect("template dir");
    let mem = tpl_dir.join("memory");
    let tpl = unique("tpl");
    let backend = |share: &str| {
        format!(
            "memory-backend-file,id=mem0,size=64M,mem-path={},share={share}",
            mem.display()
        )
    };
    let s = |v: &str| v.to_string();
    let _template = qemu(&[
        s("-M"),
        s("microvm,accel=tcg,memory-backend=mem0"),
        s("-object"),
        backend("on"),
        s("-name"),
        format!("noded-{tpl}-template"),
    ]);
    // The clone maps the template's file, so it needs it created first.
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(&mem).map(|m| m.len()).unwrap_or(0) < 64 << 20 {
        assert!(
            Instant::now() < deadline,
            "template QEMU did not create its memory file"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _clone = qemu(&[
        s("-M"),
        s("microvm,accel=tcg,memory-backend=mem0"),
        s("-object"),
        backend("off"),
        s("-incoming"),
        s("defer"),
        s("-name"),
        format!("noded-{tpl}-clone1"),
    ]);
    let _cold = qemu(&[
        s("-M"),
        s("microvm,accel=tcg"),
        s("-name"),
        format!("noded-{tpl}-cold1,debug-threads=on"),
    ]);
    // noded knows its VMs by the spawn records it writes, not by their names.
    let vms_dir = tmp.path().join("vms");
    for (p, name) in [
        (&_template, format!("noded-{tpl}-template")),
        (&_clone, format!("noded-{tpl}-clone1")),
        (&_cold, format!("noded-{tpl}-cold1")),
    ] {
        let dir = vms_dir.join(&name);
        std::fs::create_dir_all(&dir).expect("vm dir");
        noded::vm::reap::VmRecord::of_pid(p.0.id(), &name)
            .expect("record of a running QEMU")
            .write(&dir)
            .expect("write record");
    }
    // A Kata-like sandbox: a root shim with -id, its QEMU (the shim's child, as Kata 3 starts it) and
    // a helper whose command line names nothing.
    let kata_id = unique("kata");
    let shm = tmp.path().join("shm");
    std::fs::create_dir(&shm).expect("shm dir");
    let kata_qemu = format!(
        "qemu-system-x86_64 -nodefaults -no-user-config -display none -S -m 64M -M microvm,accel=tcg,memory-backend=dimm1 -object memory-backend-file,id=dimm1,size=64M,mem-path={},share=on -name sandbox-{kata_id}",
        shm.display()
    );
    let _shim = named_process(
        "/opt/kata/bin/containerd-shim-kata-qemu-v2",
        &["-namespace", "k8s.io", "-id", &kata_id],
        &format!("(exec -a virtiofsd sleep 600) & (exec {kata_qemu} >/dev/null 2>&1) & wait"),
    );

    let scanner =
        Scanner::new("/proc", vec![tpl_dir.clone()], vec![tpl.clone()]).with_own_vms(&vms_dir);
    let ours = |r: &ScanReport| {
        r.sandboxes
            .iter()
            .filter(|s| s.id.contains(&tpl) || s.id == kata_id)
            .cloned()
            .collect::<Vec<_>>()
    };
    let report = scan_until(&scanner, |r| {
        let o = ours(r);
        o.len() == 4
            && o.iter().all(|s| s.hypervisor.is_some())
            // The helper is first a fork of the shim's bash, then execs into `virtiofsd`.
            && o.iter().any(|s| {
                s.id == kata_id
                    && s.processes.len() == 3
                    && s.processes.iter().any(|p| p.kind == ProcessKind::Virtiofsd)
            })
    });
    let sb = ours(&report);
    let find = |id: &str| {
        sb.iter()
            .find(|s| s.id == id)
            .unwrap_or_else(|| panic!("sandbox {id} not found in {sb:#?}"))
    };

    let t = find(&format!("noded-{tpl}-template"));
    assert_eq!(
        t.origin,
        Origin::Noded {
            template: tpl.clone()
        }
    );
    let th = t.hypervisor.as_ref().expect("template hypervisor");
    assert_eq!(th.role, VmRole::TemplateSource);
    assert_eq!(th.mem_path.as_deref(), Some(mem.as_path()));
    assert_eq!(t.boot(), None);

    let c = find(&format!("noded-{tpl}-clone1"));
    assert_eq!(c.hypervisor.as_ref().map(|h| h.role), Some(VmRole::Clone));
    assert_eq!(c.boot(), Some(BootKind::Template));

    let cold = find(&format!("noded-{tpl}-cold1"));
    assert_eq!(cold.hypervisor.as_ref().map(|h| h.role), Some(VmRole::Cold));
    assert_eq!(cold.boot(), Some(BootKind::Cold));

    let k = find(&kata_id);
    assert_eq!(k.origin, Origin::Kata);
    assert_eq!(k.handler_hint.as_deref(), Some("kata-qemu"));
    // virtio-fs style share=on on a directory is a cold boot, not a template.
    assert_eq!(k.boot(), Some(BootKind::Cold));
    let mut kinds: Vec<ProcessKind> = k.processes.iter().map(|p| p.kind).collect();
    kinds.sort_by_key(|k| format!("{k:?}"));
    assert_eq!(
        kinds,
        vec![
            ProcessKind::Hypervisor(Hypervisor::Qemu),
            ProcessKind::KataShim,
            ProcessKind::Virtiofsd
        ]
    );

    // Memory is real: a QEMU process has resident, proportional and private pages, and the
    // per-sandbox figure is the sum of its processes.
    for s in &sb {
        let q = s
            .processes
            .iter()
            .find(|p| p.kind == ProcessKind::Hypervisor(Hypervisor::Qemu))
            .and_then(|p| p.memory)
            .expect("qemu memory readable as root");
        assert!(q.rss > 0 && q.pss > 0 && q.private > 0, "{s:#?}");
        assert!(q.pss <= q.rss && q.private <= q.rss, "{s:#?}");
        let sum: u64 = s
            .processes
            .iter()
            .filter_map(|p| p.memory)
            .map(|m| m.pss)
            .sum();
        assert_eq!(s.memory.pss, sum);
    }
}

fn synthetic_tree(node: &SyntheticNode) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().expect("tempdir");
    synthetic::generate(tmp.path(), node).expect("generate synthetic /proc");
    tmp
}

fn kib(t: (u64, u64, u64, u64)) -> (u64, u64, u64) {
    (t.0 * 1024, t.1 * 1024, (t.2 + t.3) * 1024)
}

#[test]
fn synthetic_proc_with_500_vms() {
    let node = SyntheticNode::default();
    let tree = synthetic_tree(&node);
    let scanner = Scanner::new(
        tree.path(),
        vec![PathBuf::from(KATA_FACTORY_TEMPLATE_DIR)],
        vec![],
    );
    let r = scanner.scan().expect("scan");
    assert_eq!(r.sandboxes.len(), 500);
    assert_eq!(r.vanished, 0);
    assert!(r.unattributed.is_empty(), "{:?}", r.unattributed);
    let clones = r
        .sandboxes
        .iter()
        .filter(|s| s.boot() == Some(BootKind::Template))
        .count();
    let cold = r
        .sandboxes
        .iter()
        .filter(|s| s.boot() == Some(BootKind::Cold))
        .count();
    assert_eq!((clones, cold), (250, 250));
    let first = r
        .sandboxes
        .iter()
        .find(|s| s.id == synthetic::sandbox_id(0))
        .expect("sandbox 0");
    assert_eq!(first.processes.len(), 3);
    let (qr, qp, qv) = kib(synthetic::QEMU_CLONE_KIB);
    let (sr, sp, sv) = kib(synthetic::SHIM_KIB);
    let (vr, vp, vv) = kib(synthetic::VIRTIOFSD_KIB);
    assert_eq!(first.memory.rss, qr + sr + vr);
    assert_eq!(first.memory.pss, qp + sp + vp);
    assert_eq!(first.memory.private, qv + sv + vv);
}

fn observer_on(root: &Path) -> Observer {
    let config = ObserverConfig {
        proc_root: root.to_path_buf(),
        handlers: vec!["kata-qemu".into(), "kata-qemu-warm".into()],
        probe_handlers: vec!["kata-qemu".into(), "kata-qemu-warm".into()],
        probe_failure_threshold: 3,
        templates: vec![TemplateRef {
            name: "default".into(),
            runtime_handler: "kata-qemu-warm".into(),
        }],
        warm_handlers: vec!["kata-qemu-warm".into()],
        warm_template_dirs: vec![],
        template_dirs: vec![PathBuf::from(KATA_FACTORY_TEMPLATE_DIR)],
        own_vms_dir: None,
        capacity: Default::default(),
    };
    let metrics = Arc::new(Metrics::new(config.metrics_scope()));
    Observer::new(config, metrics)
}

#[test]
fn observer_figures_slots_hits_and_boot_kinds_on_500_vms() {
    let node = SyntheticNode::default();
    let tree = synthetic_tree(&node);
    let obs = observer_on(tree.path());
    // containerd said sandbox 1 (a cold boot) is kata-qemu-warm: a template miss.
    obs.record_boot("kata-qemu-warm", &synthetic::sandbox_id(1), 3.5);
    obs.record_boot("kata-qemu-warm", &synthetic::sandbox_id(0), 0.08);
    obs.observe_now().expect("observe");
    let snaps = obs.handler_snapshots();
    let warm = snaps
        .iter()
        .find(|h| h.runtime_handler == "kata-qemu-warm")
        .expect("warm handler");
    let cold = snaps
        .iter()
        .find(|h| h.runtime_handler == "kata-qemu")
        .expect("cold handler");
    assert_eq!((warm.vms_template, warm.vms_cold), (250, 1));
    assert_eq!((cold.vms_template, cold.vms_cold), (0, 249));
    let (_, cold_pss, _) = kib(synthetic::QEMU_COLD_KIB);
    let helpers = kib(synthetic::SHIM_KIB).1 + kib(synthetic::VIRTIOFSD_KIB).1;
    assert_eq!(cold.memory.pss, 249 * (cold_pss + helpers));
    // Slot cost is p90 of per-sandbox PSS, shim and virtiofsd included.
    assert!(cold.slot_cost_measured);
    assert_eq!(cold.slot_cost_bytes, cold_pss + helpers);
    let avail = node.memory_available_kib * 1024;
    let total = node.memory_total_kib * 1024;
    // 96 CPUs × 1000m / 250m = 384 VMs by CPU, 500 already run: CPU leaves no free slot.
    assert_eq!(cold.slots_total, (total / (cold_pss + helpers)).min(384));
    assert_eq!(cold.slots_free, 0);
    assert!(avail / (cold_pss + helpers) > 0);

    let text = openmetrics_to_prometheus_text(&obs.metrics().encode().expect("encode"));
    assert!(text.contains("noded_template_hits_total 250"), "{text}");
    assert!(text.contains("noded_template_misses_total 1"), "{text}");
    assert!(text.contains("noded_vm_boot_seconds_count{runtime_handler=\"kata-qemu-warm\",boot=\"cold\",outcome=\"ok\"} 1"), "{text}");
    assert!(text.contains("noded_vm_boot_seconds_count{runtime_handler=\"kata-qemu-warm\",boot=\"template\",outcome=\"ok\"} 1"), "{text}");
    assert!(
        text.contains("noded_vms{runtime_handler=\"kata-qemu\",boot=\"cold\"} 249"),
        "{text}"
    );
    // A second round over the same VMs counts no hit twice.
    obs.observe_now().expect("observe");
    let text = openmetrics_to_prometheus_text(&obs.metrics().encode().expect("encode"));
    assert!(text.contains("noded_template_hits_total 250"), "{text}");
    assert_eq!(warm.boot_p50_seconds, Some(0.08));
}

#[test]
fn processes_vanishing_mid_scan_are_skipped_not_errors() {
    // Deterministic: a process whose cmdline was read but whose smaps_rollup is gone, and one whose
    // directory holds nothing any more.
    let node = SyntheticNode {
        vms: 3,
        other_processes: 0,
        ..SyntheticNode::default()
    };
    let tree = synthetic_tree(&node);
    let qemu_of_vm1 = tree.path().join("1004");
    std::fs::remove_file(qemu_of_vm1.join("smaps_rollup")).expect("remove smaps_rollup");
    let empty = tree.path().join("99999");
    std::fs::create_dir(&empty).expect("empty pid dir");
    let r = Scanner::new(tree.path(), vec![], vec![])
        .scan()
        .expect("scan");
    assert_eq!(r.vanished, 2, "{r:#?}");
    assert_eq!(r.sandboxes.len(), 3);

    // Real: processes dying while scans run. Every scan succeeds.
    if common::require("bash").is_none() {
        return;
    }
    let tag = unique("vanish");
    let mut procs: Vec<Proc> = (0..30)
        .map(|i| {
            named_process(
                "qemu-system-x86_64",
                &["-name", &format!("sandbox-{tag}-{i}")],
                "",
            )
        })
        .collect();
    let scanner = Scanner::new("/proc", vec![], vec![]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scans = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut n = 0u32;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 5 {
                scanner
                    .scan()
                    .expect("a scan while processes exit must not fail");
                n += 1;
            }
            n
        })
    };
    for p in procs.iter_mut() {
        p.kill();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = scans.join().expect("scan thread");
    assert!(n >= 5);
    let after = Scanner::new("/proc", vec![], vec![]).scan().expect("scan");
    assert!(!after.sandboxes.iter().any(|s| s.id.contains(&tag)));
}

/// A Kata VM is on /proc before containerd's task event names its handler: a cold VM seen first and
/// attributed later is still counted against the handler containerd names (a miss of the warm one),
/// not against a guessed cold handler, and at once, with its boot sample.
#[test]
fn a_cold_vm_seen_before_its_boot_sample_is_a_miss_of_the_handler_containerd_names() {
    let node = SyntheticNode::default();
    let tree = synthetic_tree(&node);
    let obs = observer_on(tree.path());
    let misses = |obs: &Observer| {
        let text = openmetrics_to_prometheus_text(&obs.metrics().encode().expect("encode"));
        text.lines()
            .find_map(|l| l.strip_prefix("noded_template_misses_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .expect("misses sample")
    };
    obs.observe_now().expect("first scan: handler unknown");
    assert_eq!(misses(&obs), 0.0);
    // The miss is counted when containerd names the handler, with the boot sample, not a scan
    // later: whoever sees the boot sample also sees the miss.
    obs.record_boot("kata-qemu-warm", &synthetic::sandbox_id(1), 3.5);
    assert_eq!(misses(&obs), 1.0);
    obs.observe_now().expect("second scan: counted once");
    assert_eq!(misses(&obs), 1.0);
    // The other cold VMs never got a boot sample: after the wait, the guess (kata-qemu, no template)
    // decides, and none of them is a miss.
    for _ in 0..3 {
        obs.observe_now().expect("scan");
    }
    assert_eq!(misses(&obs), 1.0);
}

/// Two warm handlers, no word from containerd yet: a Kata clone is attributed to the handler whose
/// template directory holds its guest memory, not to the first warm handler (the Go shim's binary
/// name tells no handler on containerd 1.7+).
#[test]
fn a_kata_clone_belongs_to_the_warm_handler_whose_template_it_maps() {
    let node = SyntheticNode::default();
    let tree = synthetic_tree(&node);
    let config = ObserverConfig {
        proc_root: tree.path().to_path_buf(),
        handlers: vec![
            "kata-qemu".into(),
            "kata-qemu-warm".into(),
            "kata-qemu-warm-debug".into(),
        ],
        probe_handlers: vec!["kata-qemu".into()],
        probe_failure_threshold: 3,
        templates: vec![],
        warm_handlers: vec!["kata-qemu-warm".into(), "kata-qemu-warm-debug".into()],
        // The synthetic clones map /run/vc/vm/template/memory.
        warm_template_dirs: vec![
            (
                PathBuf::from("/run/vc/vm/template-other"),
                "kata-qemu-warm".into(),
            ),
            (
                PathBuf::from(KATA_FACTORY_TEMPLATE_DIR),
                "kata-qemu-warm-debug".into(),
            ),
        ],
        template_dirs: vec![PathBuf::from(KATA_FACTORY_TEMPLATE_DIR)],
        own_vms_dir: None,
        capacity: Default::default(),
    };
    let metrics = Arc::new(Metrics::new(config.metrics_scope()));
    let obs = Observer::new(config, metrics);
    obs.observe_now().expect("observe");
    let snaps = obs.handler_snapshots();
    let of = |h: &str| {
        snaps
            .iter()
            .find(|s| s.runtime_handler == h)
            .map(|s| s.vms_template)
            .unwrap_or_else(|| panic!("no snapshot of {h}"))
    };
    assert_eq!(of("kata-qemu-warm-debug"), 250);
    assert_eq!(of("kata-qemu-warm"), 0);
}
