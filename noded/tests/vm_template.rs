//! Real QEMU (TCG here): template build, concurrent clones that continue the template and differ from
//! each other, damaged templates.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::vm::{VmHarness, available, section};
use noded::vm::clone::{After, restore};
use noded::vm::template::{self, Damage};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_then_three_concurrent_clones_alive_and_distinct() {
    if !available() {
        return;
    }
    let h = VmHarness::new();
    let resolved = h.resolve(&section("t", 0)).await;
    let t = template::build(&*resolved.backend, &h.layout, &resolved.spec)
        .await
        .expect("template builds");
    // Files are read-only and the tmpfs is a real mount sized guest memory + 8 MiB.
    for f in [t.memory_file(), t.state_file()] {
        let mode = std::fs::metadata(&f).expect("stat").permissions().mode();
        assert_eq!(mode & 0o222, 0, "{} must be read-only", f.display());
    }
    assert_eq!(template::mounts_under(&t.dir), vec![t.dir.clone()]);
    assert!(t.manifest.state.size > 0);
    assert_eq!(
        t.manifest.memory.size,
        resolved.spec.machine.memory_mib << 20
    );
    let c = t.manifest.guest_counter;

    let (a, b, d) = tokio::join!(
        restore(&*resolved.backend, &h.layout, &t, After::Running),
        restore(&*resolved.backend, &h.layout, &t, After::Running),
        restore(&*resolved.backend, &h.layout, &t, After::Running),
    );
    let mut clones = vec![
        a.expect("clone 1"),
        b.expect("clone 2"),
        d.expect("clone 3"),
    ];
    let mut randoms = Vec::new();
    for vm in &mut clones {
        // restore() only accepts a clone whose first answer continues the template's count.
        assert_eq!(vm.counter, c + 1);
        let console = vm.vm.console().expect("console");
        let r = console
            .request("rand", Duration::from_secs(15))
            .await
            .expect("rand");
        assert_eq!(r.counter, c + 2, "guest counter continues");
        assert_eq!(r.payload.len(), 32, "16 random bytes in hex: {r:?}");
        randoms.push(r.payload);
    }
    let mut unique = randoms.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(
        unique.len(),
        3,
        "clones must not share RNG state: {randoms:?}"
    );
    assert_eq!(h.live_vms().len(), 3);
    for vm in clones {
        vm.vm.kill().await;
    }
    // Clones mapped the memory private: the template is unchanged (deep check hashes it).
    template::validate(&t.dir, &resolved.spec.fingerprint, true).expect("template intact");
    template::destroy_dir(&t.dir);
    h.assert_no_leaks();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn damaged_templates_are_detected() {
    if !available() {
        return;
    }
    let h = VmHarness::new();
    let resolved = h.resolve(&section("dmg", 0)).await;
    let fp = resolved.spec.fingerprint.clone();
    let t = template::build(&*resolved.backend, &h.layout, &resolved.spec)
        .await
        .expect("template builds");
    template::validate(&t.dir, &fp, true).expect("fresh template is valid");

    // Fingerprint mismatch: same files, other inputs (e.g. a new kernel or QEMU).
    let mut other = fp.clone();
    other.memory_mib += 1;
    assert!(matches!(
        template::validate(&t.dir, &other, false),
        Err(Damage::Fingerprint { .. })
    ));

    // Modified memory: same size, other bytes — only the hash sees it.
    let mem = t.memory_file();
    std::fs::set_permissions(&mem, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let original = {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&mem)
            .expect("open memory");
        let mut orig = vec![0u8; 4096];
        f.seek(SeekFrom::Start(1 << 20)).expect("seek");
        f.read_exact(&mut orig).expect("read");
        f.seek(SeekFrom::Start(1 << 20)).expect("seek");
        f.write_all(&vec![0xa5; 4096]).expect("write");
        orig
    };
    template::validate(&t.dir, &fp, false).expect("sizes alone cannot see modified bytes");
    assert!(matches!(
        template::validate(&t.dir, &fp, true),
        Err(Damage::Hash { file: "memory", .. })
    ));
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&mem)
            .expect("open");
        f.seek(SeekFrom::Start(1 << 20)).expect("seek");
        f.write_all(&original).expect("restore bytes");
    }
    template::validate(&t.dir, &fp, true).expect("restored bytes validate again");

    // Truncated state: detected by size, and QEMU itself refuses it (the clone is killed, reported).
    let state = t.state_file();
    std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let full = std::fs::read(&state).expect("read state");
    std::fs::write(&state, &full[..full.len() / 2]).expect("truncate");
    assert!(matches!(
        template::validate(&t.dir, &fp, false),
        Err(Damage::Size { file: "state", .. })
    ));
    let err = restore(&*resolved.backend, &h.layout, &t, After::Running)
        .await
        .err()
        .expect("a truncated state must not yield a clone");
    eprintln!("truncated state: {err}");
    assert!(h.live_vms().is_empty(), "failed clone must be killed");

    // Empty state: QEMU would wait in `inmigrate` forever; the restore deadline ends it.
    std::fs::write(&state, b"").expect("empty state");
    let err = noded::vm::clone::restore_with_timeout(
        &*resolved.backend,
        &h.layout,
        &t,
        After::Running,
        Duration::from_secs(3),
    )
    .await
    .err()
    .expect("an empty state must not yield a clone");
    eprintln!("empty state: {err}");
    assert!(h.live_vms().is_empty(), "hung clone must be killed");

    // Missing template (tmpfs empty after a reboot).
    template::destroy_dir(&t.dir);
    assert_eq!(
        template::validate(&t.dir, &fp, true).err(),
        Some(Damage::Missing)
    );
    h.assert_no_leaks();
}
