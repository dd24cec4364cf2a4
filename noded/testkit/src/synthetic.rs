//! A synthetic `/proc` tree with many Kata-like VMs, for the scale tests and the scrape benchmark
//! (test scaffolding: lives here, not in noded).
//! It has exactly the files the scanner reads (`<pid>/cmdline`, `<pid>/smaps_rollup`, `<pid>/stat`,
//! `<pid>/status`, `meminfo`, `stat`), in the kernel's formats. As on a real node, every VM sits
//! under its root Kata shim (QEMU and virtiofsd are the shim's children); optional spoofed VMs
//! (`qemu-system-x86_64 -name sandbox-...` run by `nobody`, under no shim) must not be counted.

use std::fs;
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use noded::metrics::{ApplyOutcome, BuildOutcome, Metrics};
use noded::observe::{Observer, ObserverConfig};

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct SyntheticNode {
    pub vms: u32,
    /// Every `clone_every`-th VM is a template clone, the others cold boots (0 = all cold).
    pub clone_every: u32,
    /// Unrelated processes (kubelet, sshd, ...) the scan must skip.
    pub other_processes: u32,
    /// Processes of uid 65534 that look like Kata VMs by their command line only.
    pub spoofed_vms: u32,
    pub memory_total_kib: u64,
    pub memory_available_kib: u64,
    pub cpus: u32,
}

impl Default for SyntheticNode {
    fn default() -> Self {
        SyntheticNode {
            vms: 500,
            clone_every: 2,
            other_processes: 300,
            spoofed_vms: 0,
            memory_total_kib: 768 * 1024 * 1024,
            memory_available_kib: 512 * 1024 * 1024,
            cpus: 96,
        }
    }
}

/// Per-process memory written into each `smaps_rollup`, in KiB: (rss, pss, private_clean, private_dirty).
pub const QEMU_COLD_KIB: (u64, u64, u64, u64) = (230_000, 210_000, 1_000, 206_000);
pub const QEMU_CLONE_KIB: (u64, u64, u64, u64) = (120_000, 45_000, 500, 39_500);
pub const SHIM_KIB: (u64, u64, u64, u64) = (40_000, 30_000, 200, 28_000);
pub const VIRTIOFSD_KIB: (u64, u64, u64, u64) = (8_000, 5_000, 100, 4_000);

/// uid of the unprivileged user (`nobody`) spoofed VMs run as.
pub const NOBODY: u32 = 65534;

/// Sandbox id of VM `i`.
pub fn sandbox_id(i: u32) -> String {
    format!("{i:08x}c0ffee{i:08x}")
}

fn write_process(
    root: &Path,
    pid: u32,
    ppid: u32,
    uid: u32,
    argv: &[&str],
    mem: (u64, u64, u64, u64),
) -> io::Result<()> {
    let dir = root.join(pid.to_string());
    fs::create_dir_all(&dir)?;
    let mut cmdline = argv.join("\0");
    cmdline.push('\0');
    fs::write(dir.join("cmdline"), cmdline)?;
    let comm: String = argv[0]
        .rsplit('/')
        .next()
        .unwrap_or("x")
        .chars()
        .take(15)
        .collect();
    fs::write(
        dir.join("stat"),
        format!(
            "{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0 0 0 0 0 0 0 0 0\n"
        ),
    )?;
    fs::write(
        dir.join("status"),
        format!(
            "Name:\t{comm}\nState:\tS (sleeping)\nTgid:\t{pid}\nPid:\t{pid}\nPPid:\t{ppid}\n\
             Uid:\t{uid}\t{uid}\t{uid}\t{uid}\nGid:\t{uid}\t{uid}\t{uid}\t{uid}\n"
        ),
    )?;
    let (rss, pss, pc, pd) = mem;
    fs::write(
        dir.join("smaps_rollup"),
        format!(
            "00400000-7ffc8d1fe000 ---p 00000000 00:00 0                          [rollup]\n\
             Rss:            {rss:>8} kB\nPss:            {pss:>8} kB\nPss_Anon:       {pd:>8} kB\n\
             Pss_File:       {pc:>8} kB\nPss_Shmem:             0 kB\nShared_Clean:          0 kB\n\
             Shared_Dirty:          0 kB\nPrivate_Clean:  {pc:>8} kB\nPrivate_Dirty:  {pd:>8} kB\n\
             Referenced:     {rss:>8} kB\nAnonymous:      {pd:>8} kB\nLazyFree:              0 kB\n\
             AnonHugePages:         0 kB\nShmemPmdMapped:        0 kB\nFilePmdMapped:         0 kB\n\
             Shared_Hugetlb:        0 kB\nPrivate_Hugetlb:       0 kB\nSwap:                  0 kB\n\
             SwapPss:               0 kB\nLocked:                0 kB\n"
        ),
    )
}

/// Writes the tree under `root` (which must exist and be empty).
pub fn generate(root: &Path, node: &SyntheticNode) -> io::Result<()> {
    fs::write(
        root.join("meminfo"),
        format!(
            "MemTotal:       {} kB\nMemFree:        {} kB\nMemAvailable:   {} kB\nBuffers:               0 kB\nCached:                0 kB\n",
            node.memory_total_kib, node.memory_available_kib, node.memory_available_kib
        ),
    )?;
    let mut stat = String::from("cpu  1 0 1 1 0 0 0 0 0 0\n");
    for c in 0..node.cpus {
        stat.push_str(&format!("cpu{c} 1 0 1 1 0 0 0 0 0 0\n"));
    }
    fs::write(root.join("stat"), stat)?;
    let mut pid = 1000;
    for i in 0..node.other_processes {
        write_process(
            root,
            pid,
            1,
            0,
            &["/usr/bin/some-daemon", "--flag", &i.to_string()],
            (10_000, 9_000, 0, 8_000),
        )?;
        pid += 1;
    }
    for i in 0..node.vms {
        let id = sandbox_id(i);
        let shim = pid;
        write_process(
            root,
            shim,
            1,
            0,
            &[
                "/opt/kata/bin/containerd-shim-kata-v2",
                "-namespace",
                "k8s.io",
                "-address",
                "/run/containerd/containerd.sock",
                "-publish-binary",
                "/usr/bin/containerd",
                "-id",
                &id,
            ],
            SHIM_KIB,
        )?;
        let clone = node.clone_every > 0 && i % node.clone_every == 0;
        let name = format!("sandbox-{id},debug-threads=on");
        let qmp = format!("unix:/run/vc/vm/{id}/qmp.sock,server=on,wait=off");
        let mem = if clone {
            "memory-backend-file,id=dimm1,size=2048M,mem-path=/run/vc/vm/template/memory"
                .to_string()
        } else {
            "memory-backend-file,id=dimm1,size=2048M,mem-path=/dev/shm,share=on".to_string()
        };
        let mut argv = vec![
            "/opt/kata/bin/qemu-system-x86_64",
            "-name",
            &name,
            "-uuid",
            "b0f3c1a2-0000-4000-8000-000000000000",
            "-machine",
            "q35,accel=kvm,nvdimm=on",
            "-cpu",
            "host,pmu=off",
            "-qmp",
            &qmp,
            "-m",
            "2048M,slots=10,maxmem=773410M",
            "-object",
            &mem,
            "-numa",
            "node,memdev=dimm1",
            "-kernel",
            "/opt/kata/share/kata-containers/vmlinux.container",
        ];
        if clone {
            argv.extend(["-incoming", "defer"]);
        }
        // Kata 3 starts QEMU without -daemonize: it stays the shim's child.
        write_process(
            root,
            shim + 1,
            shim,
            0,
            &argv,
            if clone { QEMU_CLONE_KIB } else { QEMU_COLD_KIB },
        )?;
        let sock = format!("--socket-path=/run/vc/vm/{id}/vhost-fs.sock");
        let shared = format!("--shared-dir=/run/kata-containers/shared/sandboxes/{id}/shared");
        write_process(
            root,
            shim + 2,
            shim,
            0,
            &[
                "/opt/kata/libexec/virtiofsd",
                &sock,
                &shared,
                "--cache=auto",
            ],
            VIRTIOFSD_KIB,
        )?;
        pid += 3;
    }
    for i in 0..node.spoofed_vms {
        let name = format!("sandbox-spoof{i:08x},debug-threads=on");
        write_process(
            root,
            pid,
            1,
            NOBODY,
            &[
                "/usr/bin/qemu-system-x86_64",
                "-name",
                &name,
                "-object",
                "memory-backend-file,id=dimm1,size=2048M,mem-path=/dev/shm,share=on",
            ],
            QEMU_COLD_KIB,
        )?;
        pid += 1;
    }
    Ok(())
}

/// noded's `/metrics` + health server and observer, wired as `noded run` wires them, over a
/// synthetic `/proc` of `vms` VMs, in this process: the test drives probes and events through the
/// same [`Observer`] the server serves.
pub struct ServedNode {
    pub addr: SocketAddr,
    pub observer: Arc<Observer>,
    pub rt: tokio::runtime::Runtime,
    _tree: tempfile::TempDir,
}

/// Starts a [`ServedNode`] (local-mode defaults, probes for `kata-qemu` and `kata-qemu-warm`, the
/// template accounted to `kata-qemu-warm`, a scan every 500 ms). Panics on failure: test setup.
pub fn serve(vms: u32) -> ServedNode {
    let tree = tempfile::tempdir().expect("tempdir");
    let proc_root = tree.path().join("proc");
    fs::create_dir(&proc_root).expect("proc dir");
    generate(
        &proc_root,
        &SyntheticNode {
            vms,
            other_processes: 10,
            ..SyntheticNode::default()
        },
    )
    .expect("synthetic proc");
    let mut config = noded::config::NodedConfig::local_default().expect("default config");
    config.templates[0].runtime_handler = "kata-qemu-warm".into();
    config.probe.handlers = vec!["kata-qemu".into(), "kata-qemu-warm".into()];
    config.observe.proc_root = proc_root;
    let observe_config = ObserverConfig::from_config(&config);
    let metrics = Arc::new(Metrics::new(observe_config.metrics_scope()));
    let observer = Arc::new(Observer::new(observe_config, metrics));
    let (rt, listener, addr) = runtime_with_listener(1);
    rt.spawn(noded::http::serve(
        listener,
        Arc::clone(&observer),
        std::future::pending(),
    ));
    rt.spawn(Arc::clone(&observer).run(Duration::from_millis(500)));
    ServedNode {
        addr,
        observer,
        rt,
        _tree: tree,
    }
}

/// A multi-thread runtime of `workers` worker threads and noded's metrics listener
/// (`noded::http::bind`) on a free loopback port, where the test serves noded's HTTP server.
pub fn runtime_with_listener(
    workers: usize,
) -> (tokio::runtime::Runtime, tokio::net::TcpListener, SocketAddr) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(noded::http::bind(SocketAddr::from(([127, 0, 0, 1], 0))))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    (rt, listener, addr)
}

/// An [`Observer`] of `proc_root` (a synthetic tree or `/proc`) for `handlers`, probing the first
/// one; no templates, template directories or spawn records.
pub fn observer_on(proc_root: &Path, handlers: &[&str]) -> Observer {
    let config = ObserverConfig {
        proc_root: proc_root.to_path_buf(),
        handlers: handlers.iter().map(|h| (*h).to_owned()).collect(),
        probe_handlers: handlers.iter().take(1).map(|h| (*h).to_owned()).collect(),
        probe_failure_threshold: 3,
        templates: vec![],
        warm_handlers: vec![],
        warm_template_dirs: vec![],
        template_dirs: vec![],
        own_vms_dir: None,
        capacity: Default::default(),
    };
    let metrics = Arc::new(Metrics::new(config.metrics_scope()));
    Observer::new(config, metrics)
}

/// Drives every code path that feeds a metric family, as the daemon's components do.
pub fn exercise(observer: &Observer) {
    let m = observer.metrics();
    m.record_apply(ApplyOutcome::Changed);
    m.record_apply(ApplyOutcome::Unchanged);
    m.record_containerd_restart();
    m.record_template_build(BuildOutcome::Ok);
    m.set_template_ready("default", true);
    m.set_template_pool("default", 2, 2);
    m.observe_template_acquire(0.0012);
    observer.record_boot("kata-qemu-warm", &sandbox_id(0), 0.07);
    observer.record_probe("kata-qemu", true, Duration::from_millis(900), None);
    observer.record_probe(
        "kata-qemu-warm",
        false,
        Duration::from_millis(15),
        Some("no runtime for \"kata-qemu-warm\" is configured".into()),
    );
    observer.observe_now().expect("observe");
}
