//! Real QEMU (TCG here): the pre-forked pool behind the gRPC API, refill, damaged templates never
//! handed out, and the daemon's orphan reaping after kill -9 / clean stop on SIGTERM.

mod common;

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::vm::{VmHarness, available, console, section};
use noded::api::{self, NodeService, pb};
use noded::vm::engine::Engine;
use noded::vm::template::{MANIFEST, Manifest};

const READY: Duration = Duration::from_secs(300);

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_acquire_release_refill_over_grpc() {
    if !available() {
        return;
    }
    let h = VmHarness::new();
    let engine = Engine::start(h.options(vec![section("pool", 2)]))
        .await
        .expect("engine starts");
    assert!(
        engine.wait_ready(READY).await,
        "template built and pool filled"
    );
    let counter = engine
        .pool("pool")
        .expect("pool")
        .template()
        .expect("template")
        .manifest
        .guest_counter;

    let socket = h.path().join("api.sock");
    let listener = api::bind(&socket).expect("bind");
    let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(api::serve(
        listener,
        NodeService::new(Some(Arc::clone(&engine))),
        async {
            let _ = stop_rx.await;
        },
    ));
    let mut client = api::connect(&socket).await.expect("connect");

    let status = client
        .status(pb::StatusRequest {})
        .await
        .expect("status")
        .into_inner();
    let t = &status.templates[0];
    assert_eq!(
        (t.name.as_str(), t.ready, t.pool_ready, t.pool_target),
        ("pool", true, 2, 2)
    );
    assert_eq!(t.builds, 1);

    let mut vms = Vec::new();
    let mut randoms = Vec::new();
    for i in 0..2u64 {
        let vm = client
            .acquire_vm(pb::AcquireVmRequest {
                template: String::new(),
            })
            .await
            .expect("acquire")
            .into_inner();
        assert!(vm.from_pool, "a warm pool hands out pre-forked clones");
        assert!(alive(vm.pid));
        // The caller owns the console now; the guest continues the template's count (the pool
        // validated it once: +1, this request: +2).
        let mut c = console(Path::new(&vm.console)).await;
        let r = c
            .request("rand", Duration::from_secs(15))
            .await
            .expect("guest answers");
        assert_eq!(
            r.counter,
            counter + 2,
            "acquire {i}: clone continues the template"
        );
        randoms.push(r.payload);
        vms.push(vm);
    }
    assert_ne!(randoms[0], randoms[1], "clones differ after restore");

    // Refill in the background after the acquires.
    assert!(engine.wait_ready(READY).await, "pool refills");
    let snap = engine.snapshot().remove(0);
    assert_eq!(
        (snap.pool_ready, snap.in_use, snap.hits, snap.misses),
        (2, 2, 2, 0)
    );

    for vm in &vms {
        client
            .release_vm(pb::ReleaseVmRequest {
                vm_id: vm.vm_id.clone(),
            })
            .await
            .expect("release");
        assert!(wait_gone(vm.pid).await, "released VM is destroyed");
    }
    let again = client
        .release_vm(pb::ReleaseVmRequest {
            vm_id: vms[0].vm_id.clone(),
        })
        .await
        .expect_err("released VMs are never reused");
    assert_eq!(again.code(), tonic::Code::NotFound);
    let unknown = client
        .acquire_vm(pb::AcquireVmRequest {
            template: "nope".into(),
        })
        .await
        .expect_err("unknown template");
    assert_eq!(unknown.code(), tonic::Code::NotFound);

    // `noded status` talks to the same socket.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_noded"))
        .args(["status", "--output", "json", "--socket"])
        .arg(&socket)
        .output()
        .expect("run noded status");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(json["templates"][0]["name"], "pool");
    assert_eq!(json["templates"][0]["hits"], 2);

    let _ = stop.send(());
    server.await.expect("join").expect("server ran");
    assert!(!socket.exists(), "socket removed on stop");
    engine.shutdown().await;
    h.assert_no_leaks();
}

fn make_writable(p: &Path) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_templates_are_counted_rebuilt_and_never_handed_out() {
    if !available() {
        return;
    }
    let h = VmHarness::new();
    let engine = Engine::start(h.options(vec![section("dmg", 1)]))
        .await
        .expect("engine starts");
    assert!(engine.wait_ready(READY).await);
    let pool = engine.pool("dmg").expect("pool");
    let gen0 = pool
        .template()
        .expect("template")
        .manifest
        .generation
        .clone();

    // 1. Truncated state: the hot path's size check catches it; the pooled clone of that template
    //    is not handed out, the VM is cold-booted instead (a miss), and the template is rebuilt.
    let t = pool.template().expect("template");
    make_writable(&t.state_file());
    let full = std::fs::read(t.state_file()).expect("state");
    std::fs::write(t.state_file(), &full[..full.len() / 2]).expect("truncate");
    let vm = engine.acquire("dmg").await.expect("a VM is still served");
    assert!(
        !vm.from_pool && vm.cold,
        "damaged template must not yield the VM: {vm:?}"
    );
    engine.release(&vm.vm_id).await.expect("release");
    assert!(engine.wait_ready(READY).await, "rebuilt");
    let s = engine.snapshot().remove(0);
    assert_eq!((s.damaged, s.misses, s.builds_ok), (1, 1, 2), "{s:?}");
    let t1 = pool.template().expect("rebuilt template");
    assert_ne!(t1.manifest.generation, gen0);

    // 2. Modified memory (same size): found by the health check's hash.
    make_writable(&t1.memory_file());
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(t1.memory_file())
            .expect("open memory");
        f.seek(SeekFrom::Start(4 << 20)).expect("seek");
        f.write_all(&[0x5a; 8192]).expect("garble");
    }
    let damage = pool.check_health().await.expect("modified memory detected");
    assert_eq!(damage.kind(), "hash", "{damage}");
    assert!(pool.template().is_none(), "not usable while rebuilding");
    assert!(engine.wait_ready(READY).await, "rebuilt");
    let t2 = pool.template().expect("rebuilt template");
    assert_ne!(t2.manifest.generation, t1.manifest.generation);

    // 3. Fingerprint mismatch (the manifest says it was built from other inputs).
    let path = t2.dir.join(MANIFEST);
    make_writable(&path);
    let mut m: Manifest =
        serde_json::from_slice(&std::fs::read(&path).expect("manifest")).expect("parse");
    m.fingerprint.hypervisor_version = "QEMU emulator version 0.0".into();
    std::fs::write(&path, serde_json::to_vec(&m).expect("json")).expect("write manifest");
    let damage = pool
        .check_health()
        .await
        .expect("fingerprint mismatch detected");
    assert_eq!(damage.kind(), "fingerprint", "{damage}");
    assert!(engine.wait_ready(READY).await, "rebuilt");

    let s = engine.snapshot().remove(0);
    assert_eq!((s.damaged, s.builds_ok, s.hits), (3, 4, 0), "{s:?}");
    // Every VM handed out or pooled now comes from the last, valid template.
    let vm = engine.acquire("dmg").await.expect("acquire");
    assert!(vm.from_pool);
    assert_eq!(pool.check_health().await, None, "current template is valid");
    engine.release(&vm.vm_id).await.expect("release");
    engine.shutdown().await;
    h.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_stays_within_its_memory_budget() {
    if !available() {
        return;
    }
    let h = VmHarness::new();
    let mut sec = section("budget", 6);
    // Room for a couple of idle clones (each costs tens of MiB of host memory), not six.
    sec.pool_memory_budget_mib = 100;
    let engine = Engine::start(h.options(vec![sec]))
        .await
        .expect("engine starts");
    assert!(
        engine.wait_ready(READY).await,
        "pool filled up to its budget"
    );
    let s = engine.snapshot().remove(0);
    let template_bytes = 128u64 << 20;
    assert!(s.pool_ready >= 1, "{s:?}");
    assert!(s.pool_ready < 6, "budget must stop the refill: {s:?}");
    assert!(
        s.memory_bytes - template_bytes <= 100 << 20,
        "idle clones exceed the budget: {s:?}"
    );
    engine.shutdown().await;
    h.assert_no_leaks();
}
