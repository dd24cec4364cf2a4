//! Hostile Kata tarballs against the real `installer bake`: each must exit 2 with one line naming
//! the entry, install nothing and leave no staging directory; the good release (gzip, xz, zstd)
//! still bakes. Tarballs are built here with the `tar` crate (raw headers, so names the crate's
//! own safe setters would reject can be written) or GNU tar.

mod common;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use common::{Node, installer, snapshot};
use tar::{Builder, EntryType, Header};

/// A gzipped tarball: optionally the good fake release first, then whatever `add` appends.
fn tarball(
    node: &Node,
    name: &str,
    good_tree: bool,
    add: impl FnOnce(&mut Builder<flate2::write::GzEncoder<File>>),
) -> (PathBuf, String) {
    let path = node.dir.path().join(format!("{name}.tar.gz"));
    let file = File::create(&path).expect("create tarball");
    let mut b = Builder::new(flate2::write::GzEncoder::new(
        file,
        flate2::Compression::fast(),
    ));
    b.follow_symlinks(false);
    if good_tree {
        let build = node.dir.path().join(format!("build-{name}"));
        common::fake_kata::FakeKata::write(
            &build.join("opt/kata"),
            &node.root().join("opt/kata"),
            "3.27.0",
        );
        b.append_dir_all("opt", build.join("opt"))
            .expect("append the good tree");
    }
    add(&mut b);
    b.into_inner()
        .expect("finish tar")
        .finish()
        .expect("finish gzip")
        .sync_all()
        .expect("sync");
    let sha = common::sha256(&std::fs::read(&path).expect("read tarball"));
    (path, sha)
}

/// One entry with a raw name and link name (no validation by the `tar` crate).
fn raw(
    b: &mut Builder<impl Write>,
    name: &[u8],
    kind: EntryType,
    mode: u32,
    link: &[u8],
    data: &[u8],
) {
    let mut h = Header::new_gnu();
    {
        let gnu = h.as_gnu_mut().expect("gnu header");
        gnu.name[..name.len()].copy_from_slice(name);
        gnu.linkname[..link.len()].copy_from_slice(link);
    }
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_700_000_000);
    h.set_size(data.len() as u64);
    if matches!(kind, EntryType::Char | EntryType::Block) {
        h.set_device_major(1).expect("major");
        h.set_device_minor(3).expect("minor");
    }
    h.set_cksum();
    b.append(&h, data).expect("append raw entry");
}

fn bake(node: &Node, tarball: &Path, sha: &str, extra: &[&str]) -> std::process::Output {
    let noded = node.fake_noded();
    installer()
        .arg("bake")
        .arg("--kata-tarball")
        .arg(tarball)
        .arg("--sha256")
        .arg(sha)
        .arg("--noded-binary")
        .arg(&noded)
        .args(["--nodeadm", "never", "--containerd-config-version", "2"])
        .args(extra)
        .arg("--root")
        .arg(node.root())
        .timeout(std::time::Duration::from_secs(120))
        .output()
        .expect("run installer bake")
}

/// Exit 2, one line naming `expect`, the root byte-identical (so nothing installed and no staging
/// directory left anywhere under it).
fn assert_refused(node: &Node, tarball: &Path, sha: &str, extra: &[&str], expect: &[&str]) {
    let before = snapshot(&node.root());
    let out = bake(node, tarball, sha, extra);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("refused as expected: {stderr}");
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    for e in expect {
        assert!(stderr.contains(e), "expected `{e}` in: {stderr}");
    }
    assert_eq!(
        snapshot(&node.root()),
        before,
        "a refused tarball must leave nothing behind: {stderr}"
    );
    assert!(!node.root().join("opt").exists(), "no opt/, no staging");
}

#[test]
fn dotdot_entry_is_refused() {
    let node = Node::new();
    let (t, sha) = tarball(&node, "dotdot", true, |b| {
        raw(
            b,
            b"opt/kata/../../etc/evil",
            EntryType::Regular,
            0o644,
            b"",
            b"x",
        )
    });
    assert_refused(&node, &t, &sha, &[], &["opt/kata/../../etc/evil", "`..`"]);
    assert!(!node.root().join("etc/evil").exists());
}

#[test]
fn absolute_entry_is_refused() {
    let node = Node::new();
    let target = node.dir.path().join("planted-by-absolute-path");
    let name = target.to_str().expect("utf8").to_owned();
    let (t, sha) = tarball(&node, "absolute", true, |b| {
        raw(b, name.as_bytes(), EntryType::Regular, 0o644, b"", b"x")
    });
    assert_refused(&node, &t, &sha, &[], &[&name, "absolute path"]);
    assert!(!target.exists());
}

#[test]
fn entry_through_a_symlinked_parent_is_refused() {
    let node = Node::new();
    // The link itself stays inside the Kata root; writing *through* it is what must not happen.
    let (t, sha) = tarball(&node, "symparent", true, |b| {
        raw(b, b"opt/kata/lnk", EntryType::Symlink, 0o777, b"bin", b"");
        raw(
            b,
            b"opt/kata/lnk/kata-runtime",
            EntryType::Regular,
            0o755,
            b"",
            b"#!/bin/sh\necho evil\n",
        );
    });
    assert_refused(
        &node,
        &t,
        &sha,
        &[],
        &[
            "opt/kata/lnk/kata-runtime",
            "parent `opt/kata/lnk` is a symlink",
        ],
    );
}

#[test]
fn kata_root_as_a_symlink_to_a_prefilled_world_writable_dir_is_refused() {
    let node = Node::new();
    // Another user's directory, world-writable, holding a complete (fake) Kata layout.
    let planted = node.dir.path().join("tmp-world-writable");
    common::fake_kata::FakeKata::write(&planted, &planted, "6.6.6-evil");
    std::fs::set_permissions(
        &planted,
        std::os::unix::fs::PermissionsExt::from_mode(0o1777),
    )
    .expect("chmod");
    let link = planted.to_str().expect("utf8").to_owned();
    let (t, sha) = tarball(&node, "rootlink", false, |b| {
        raw(b, b"opt/", EntryType::Directory, 0o755, b"", b"");
        raw(
            b,
            b"opt/kata",
            EntryType::Symlink,
            0o777,
            link.as_bytes(),
            b"",
        );
    });
    assert_refused(
        &node,
        &t,
        &sha,
        &[],
        &["`opt/kata`", "must be a directory", "symlink"],
    );
    assert!(node.root().join("opt/kata").symlink_metadata().is_err());
}

#[test]
fn symlink_pointing_outside_the_kata_root_is_refused() {
    let node = Node::new();
    for (name, target) in [
        ("rel", &b"../../../../etc/shadow"[..]),
        ("abs", &b"/etc/shadow"[..]),
    ] {
        let (t, sha) = tarball(&node, &format!("escape-{name}"), true, |b| {
            raw(
                b,
                b"opt/kata/share/evil",
                EntryType::Symlink,
                0o777,
                target,
                b"",
            )
        });
        assert_refused(
            &node,
            &t,
            &sha,
            &[],
            &["opt/kata/share/evil", "points outside the Kata root"],
        );
    }
}

#[test]
fn hardlink_is_refused() {
    let node = Node::new();
    let (t, sha) = tarball(&node, "hardlink", true, |b| {
        raw(
            b,
            b"opt/kata/bin/hl",
            EntryType::Link,
            0o755,
            b"opt/kata/bin/kata-runtime",
            b"",
        )
    });
    assert_refused(&node, &t, &sha, &[], &["opt/kata/bin/hl", "hardlink"]);
}

#[test]
fn device_nodes_and_fifos_are_refused() {
    let node = Node::new();
    for (name, kind, what) in [
        ("chr", EntryType::Char, "character device"),
        ("blk", EntryType::Block, "block device"),
        ("fifo", EntryType::Fifo, "FIFO"),
    ] {
        let (t, sha) = tarball(&node, name, true, |b| {
            raw(b, b"opt/kata/bin/null", kind, 0o666, b"", b"")
        });
        assert_refused(&node, &t, &sha, &[], &["opt/kata/bin/null", what]);
    }
}

#[test]
fn setuid_setgid_sticky_and_world_writable_modes_are_refused() {
    let node = Node::new();
    for (name, path, kind, mode, what) in [
        (
            "suid",
            &b"opt/kata/bin/rootshell"[..],
            EntryType::Regular,
            0o4755,
            "setuid/setgid/sticky",
        ),
        (
            "sgid",
            b"opt/kata/bin/rootshell",
            EntryType::Regular,
            0o2755,
            "setuid/setgid/sticky",
        ),
        (
            "sticky",
            b"opt/kata/tmp",
            EntryType::Directory,
            0o1755,
            "setuid/setgid/sticky",
        ),
        (
            "ww-file",
            b"opt/kata/bin/rootshell",
            EntryType::Regular,
            0o666,
            "world-writable (mode 0666)",
        ),
        (
            "ww-dir",
            b"opt/kata/tmp",
            EntryType::Directory,
            0o777,
            "world-writable",
        ),
    ] {
        let (t, sha) = tarball(&node, name, true, |b| {
            raw(b, path, kind, mode, b"", b"#!/bin/sh\n")
        });
        let shown = String::from_utf8_lossy(path).into_owned();
        assert_refused(&node, &t, &sha, &[], &[&shown, what]);
    }
}

#[test]
fn a_setuid_release_file_packed_by_gnu_tar_is_refused() {
    let node = Node::new();
    let (t, sha) = node.kata_tarball("3.27.0", |tree| {
        std::fs::set_permissions(
            tree.join("bin/qemu-system-x86_64"),
            std::os::unix::fs::PermissionsExt::from_mode(0o4755),
        )
        .expect("chmod u+s");
    });
    assert_refused(
        &node,
        &t,
        &sha,
        &[],
        &["opt/kata/bin/qemu-system-x86_64", "setuid"],
    );
}

#[test]
fn entries_outside_opt_kata_are_refused() {
    let node = Node::new();
    let (t, sha) = tarball(&node, "outside", true, |b| {
        raw(
            b,
            b"etc/cron.d/evil",
            EntryType::Regular,
            0o644,
            b"",
            b"* * * * * root sh\n",
        )
    });
    assert_refused(
        &node,
        &t,
        &sha,
        &[],
        &["etc/cron.d/evil", "outside opt/kata"],
    );
}

#[test]
fn decompression_bombs_stop_at_the_caps() {
    let node = Node::new();
    let zeros = vec![0u8; 8 << 20];
    // One file above the per-file cap (its header says so: refused before a byte is written).
    let (t, sha) = tarball(&node, "bigfile", true, |b| {
        raw(
            b,
            b"opt/kata/share/big.img",
            EntryType::Regular,
            0o644,
            b"",
            &zeros,
        )
    });
    assert_refused(
        &node,
        &t,
        &sha,
        &["--max-file-bytes", "1048576"],
        &["opt/kata/share/big.img", "per-file cap"],
    );
    // Many files, each within the per-file cap, that together exceed the total: counted on what
    // was written, refused at the first byte over.
    let (t, sha) = tarball(&node, "bomb", true, |b| {
        for i in 0..6 {
            raw(
                b,
                format!("opt/kata/share/part{i}.img").as_bytes(),
                EntryType::Regular,
                0o644,
                b"",
                &zeros,
            );
        }
    });
    let size = std::fs::metadata(&t).expect("stat").len();
    assert!(size < 1 << 20, "a real bomb: {size} bytes packed");
    assert_refused(
        &node,
        &t,
        &sha,
        &["--max-total-bytes", "20971520"],
        &["decompresses to more than 20971520 bytes"],
    );
}

#[test]
fn a_fifo_as_the_tarball_is_refused_without_reading_it() {
    let node = Node::new();
    let (good, sha) = node.kata_tarball("3.27.0", |_| {});
    let fifo = node.dir.path().join("kata.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    // The attack of the issue: a writer feeding the good bytes to every reader that opens the FIFO
    // (the old bake opened it twice: once to hash, once for tar). Non-blocking opens, polled, so
    // the writer never hangs the test whatever the installer does.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (fifo, stop) = (fifo.clone(), stop.clone());
        let bytes = std::fs::read(&good).expect("read good");
        std::thread::spawn(move || {
            use std::os::unix::fs::OpenOptionsExt;
            let mut opened = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match std::fs::OpenOptions::new()
                    .write(true)
                    .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                    .open(&fifo)
                {
                    Ok(mut f) => {
                        opened += 1;
                        let _ = f.write_all(&bytes);
                    }
                    Err(_) => std::thread::sleep(std::time::Duration::from_millis(2)),
                }
            }
            opened
        })
    };
    let before = snapshot(&node.root());
    let out = bake(&node, &fifo, &sha, &[]);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    writer.join().expect("writer thread");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("kata.fifo") && stderr.contains("FIFO, not a regular file"),
        "{stderr}"
    );
    assert_eq!(snapshot(&node.root()), before);
}

#[test]
fn a_symlink_or_device_as_the_tarball_is_refused() {
    let node = Node::new();
    let (good, sha) = node.kata_tarball("3.27.0", |_| {});
    let link = node.dir.path().join("kata-link.tar.gz");
    std::os::unix::fs::symlink(&good, &link).expect("symlink");
    assert_refused(&node, &link, &sha, &[], &["kata-link.tar.gz", "symlink"]);
    assert_refused(
        &node,
        Path::new("/dev/zero"),
        &sha,
        &[],
        &["/dev/zero", "character device"],
    );
}

#[test]
fn a_hostile_file_with_the_wrong_digest_is_reported_as_the_wrong_file() {
    let node = Node::new();
    let (t, _) = tarball(&node, "wrongsum", true, |b| {
        raw(b, b"opt/kata/bin/null", EntryType::Char, 0o666, b"", b"")
    });
    assert_refused(&node, &t, &"0".repeat(64), &[], &["sha256 mismatch"]);
}

#[test]
fn the_good_release_bakes_from_gzip_xz_and_zstd() {
    let node = Node::new();
    let (gz, gz_sha) = node.kata_tarball("3.27.0", |_| {});
    // The same tar stream, recompressed: Kata ships .tar.xz (and .tar.zst in newer releases).
    let mut tar_bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut flate2::read::MultiGzDecoder::new(File::open(&gz).expect("open")),
        &mut tar_bytes,
    )
    .expect("gunzip");
    let plain = node.dir.path().join("kata.tar");
    std::fs::write(&plain, &tar_bytes).expect("write tar");
    let xz = node.dir.path().join("kata.tar.xz");
    let xz_bin = common::require("xz").expect("xz (xz-utils) packs the .tar.xz release");
    let st = std::process::Command::new(xz_bin)
        .args(["-k", "-T1", "-6"])
        .arg(&plain)
        .status()
        .expect("xz");
    assert!(st.success());
    let zst = node.dir.path().join("kata.tar.zst");
    let mut packed = Vec::new();
    ruzstd::encoding::compress(
        &tar_bytes[..],
        &mut packed,
        ruzstd::encoding::CompressionLevel::Fastest,
    );
    std::fs::write(&zst, &packed).expect("write zst");

    let sha = |p: &Path| common::sha256(&std::fs::read(p).expect("read"));
    for (t, s) in [
        (gz.clone(), gz_sha),
        (xz.clone(), sha(&xz)),
        (zst.clone(), sha(&zst)),
        (plain.clone(), sha(&plain)),
    ] {
        let before = snapshot(&node.root());
        let out = bake(&node, &t, &s, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{}: {stderr}", t.display());
        let root = node.root();
        assert!(root.join("opt/kata/bin/containerd-shim-kata-v2").is_file());
        let meta = std::fs::symlink_metadata(root.join("opt/kata")).expect("opt/kata");
        assert!(meta.is_dir(), "a real directory");
        assert_eq!(
            std::fs::read_link(root.join("opt/kata/share/kata-containers/vmlinux.container"))
                .expect("link kept"),
            Path::new("vmlinux-6.12.28-153")
        );
        let staging: Vec<_> = std::fs::read_dir(root.join("opt"))
            .expect("opt")
            .map(|e| e.expect("e").file_name())
            .collect();
        assert_eq!(staging, ["kata"], "no staging left");
        let out = installer()
            .arg("uninstall")
            .arg("--root")
            .arg(&root)
            .output()
            .expect("uninstall");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(snapshot(&root), before, "{}", t.display());
    }
}
