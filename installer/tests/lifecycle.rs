//! bake -> boot -> check -> uninstall on a temp root, and the bad-tarball cases; every run of the real
//! `installer` binary, the Kata tarball built here from the fake layout.

mod common;

use std::path::Path;

use common::{Node, installer, run_json, snapshot};

fn bake_args(tarball: &Path, sha: &str, noded: &Path) -> Vec<String> {
    common::bake_args(
        tarball,
        sha,
        noded,
        &["--nodeadm", "always", "--containerd-config-version", "3"],
    )
}

#[test]
fn bake_boot_check_uninstall_leaves_the_root_byte_identical() {
    let node = Node::new();
    let root = node.root();
    let before = snapshot(&root);
    let (tarball, sha) = node.kata_tarball("3.27.0", |_| {});
    let noded = node.fake_noded();

    let (code, report, stderr) = run_json(&bake_args(&tarball, &sha, &noded), &root);
    assert_eq!(code, 0, "bake failed: {stderr}");
    assert_eq!(report["kata_version"], "3.27.0");
    assert_eq!(report["kata_changed"], true);

    // What bake put in place.
    assert!(root.join("opt/kata/bin/containerd-shim-kata-v2").is_file());
    assert_eq!(
        std::fs::read(root.join("usr/local/bin/noded")).expect("noded"),
        std::fs::read(&noded).expect("artifact")
    );
    assert!(root.join("usr/local/bin/installer").is_file());
    let unit =
        std::fs::read_to_string(root.join("etc/systemd/system/noded-boot.service")).expect("unit");
    assert!(unit.contains("Type=oneshot"), "{unit}");
    assert!(
        unit.contains("Before=containerd.service kubelet.service"),
        "{unit}"
    );
    assert!(
        unit.contains("After=") && unit.contains("nodeadm-config.service"),
        "{unit}"
    );
    assert!(
        unit.contains("ExecStart=/usr/local/bin/installer boot"),
        "{unit}"
    );
    assert_eq!(
        std::fs::read_link(
            root.join("etc/systemd/system/multi-user.target.wants/noded-boot.service")
        )
        .expect("enabled"),
        Path::new("/etc/systemd/system/noded-boot.service")
    );
    assert!(root.join("etc/systemd/system/noded.service").is_file());
    assert!(
        !root
            .join("etc/systemd/system/multi-user.target.wants/noded.service")
            .exists(),
        "kubernetes mode: DaemonSet runs noded"
    );
    let modules =
        std::fs::read_to_string(root.join("etc/modules-load.d/noded.conf")).expect("modules");
    assert_eq!(
        modules
            .lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>(),
        ["kvm", "vhost_net", "vhost_vsock"]
    );
    let toml = std::fs::read_to_string(root.join("etc/noded/noded.toml")).expect("noded.toml");
    noded::config::NodedConfig::parse(Path::new("noded.toml"), &toml)
        .expect("noded can load what bake wrote");
    let dropin = std::fs::read_to_string(root.join("etc/eks/nodeadm.d/50-noded-kata.yaml"))
        .expect("nodeadm drop-in");
    assert!(dropin.contains("kind: NodeConfig"), "{dropin}");
    // The inline TOML is valid containerd TOML.
    let inline: String = dropin
        .lines()
        .skip_while(|l| !l.contains("config: |"))
        .skip(1)
        .map(|l| format!("{}\n", l.trim_start()))
        .collect();
    let parsed: toml::Table = inline.parse().expect("inline TOML parses");
    assert_eq!(
        parsed["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["kata-qemu"]["runtime_type"].as_str(),
        Some("io.containerd.kata-qemu.v2")
    );
    // The same tables noded writes: the warm preset, and kata-deploy's annotations on each.
    let warm_table = &parsed["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]["kata-qemu-warm"];
    assert_eq!(
        warm_table["options"]["ConfigPath"].as_str(),
        Some("/opt/kata/share/defaults/kata-containers/configuration-qemu-warm.toml"),
        "{dropin}"
    );
    assert_eq!(
        warm_table["container_annotations"][0].as_str(),
        Some(noded::containerd::handler::CONTAINER_ANNOTATION),
        "{dropin}"
    );
    let warm = root.join("opt/kata/share/defaults/kata-containers/configuration-qemu-warm.toml");
    assert!(
        std::fs::read_to_string(&warm)
            .expect("warm config")
            .contains("enable_template = true")
    );

    // A second bake changes nothing.
    let baked = snapshot(&root);
    let (code, report, stderr) = run_json(&bake_args(&tarball, &sha, &noded), &root);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(report["kata_changed"], false);
    assert_eq!(report["written"], serde_json::json!([]));
    assert_eq!(
        snapshot(&root),
        baked,
        "second bake must not touch anything"
    );

    // boot: no /dev/kvm in this root -> warning, not failure; runtime dirs prepared.
    let (code, report, stderr) = run_json(&["boot"], &root);
    assert_eq!(code, 0, "boot failed: {stderr}");
    assert_eq!(report["kvm"], "missing");
    assert_eq!(
        report["modules_missing"],
        serde_json::json!(["vhost_vsock"])
    );
    // containerd 1.6 (this root's binary): handlers edited into config.toml in place.
    assert_eq!(report["containerd"]["changed"], true, "{report}");
    let cfg = std::fs::read_to_string(root.join("etc/containerd/config.toml")).expect("config");
    let parsed: toml::Table = cfg.parse().expect("containerd config stays valid TOML");
    let runtimes = &parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    assert!(
        runtimes.get("kata-qemu").is_some() && runtimes.get("kata-qemu-warm").is_some(),
        "{cfg}"
    );
    assert!(cfg.contains("configuration-qemu-warm.toml"), "{cfg}");
    assert!(
        cfg.contains("sandbox_image = \"registry.k8s.io/pause:3.9\""),
        "original kept: {cfg}"
    );
    assert!(root.join("run/noded").is_dir());
    assert!(root.join("run/vc/vm").is_dir());
    let (code, report, stderr) = run_json(&["boot"], &root);
    assert_eq!(code, 0, "second boot: {stderr}");
    assert_eq!(
        report["containerd"]["changed"], false,
        "boot is idempotent: {report}"
    );

    // check: KVM missing blocks; the rest is reported from this root.
    let (code, report, _) = run_json(&["check"], &root);
    assert_eq!(code, 1, "a missing /dev/kvm is a blocker: {report}");
    let status = |name: &str| {
        report["checks"]
            .as_array()
            .expect("checks")
            .iter()
            .find(|c| c["check"] == name)
            .map(|c| c["status"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("no check {name}: {report}"))
    };
    assert_eq!(status("kvm"), "blocker");
    assert_eq!(status("module kvm"), "ok");
    assert_eq!(
        status("module vhost_vsock"),
        "warn",
        "configured in modules-load.d, not loaded"
    );
    assert_eq!(status("kata"), "ok");
    assert_eq!(status("memory"), "ok");
    assert_eq!(status("nested"), "info");
    assert_eq!(status("containerd"), "ok");
    assert!(
        report["containerd_version"]
            .as_str()
            .is_some_and(|v| v.starts_with("1.")),
        "{report}"
    );
    assert_eq!(report["blockers"], 1);
    assert_eq!(report["kata"]["version"], "3.27.0");
    let out = installer()
        .arg("check")
        .arg("--root")
        .arg(&root)
        .output()
        .expect("check table");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.starts_with("CHECK"), "{table}");
    assert!(table.contains("BLOCKER"), "{table}");

    let (code, report, stderr) = run_json(&["uninstall"], &root);
    assert_eq!(code, 0, "uninstall failed: {stderr}");
    assert_eq!(report["installed"], true);
    assert_eq!(
        snapshot(&root),
        before,
        "uninstall must restore the root byte for byte"
    );

    let (code, report, _) = run_json(&["uninstall"], &root);
    assert_eq!(code, 0);
    assert_eq!(report["installed"], false);
}

#[test]
fn upgrade_swaps_the_release_and_uninstall_still_restores() {
    let node = Node::new();
    let root = node.root();
    let before = snapshot(&root);
    let noded = node.fake_noded();
    let (t1, s1) = node.kata_tarball("3.27.0", |_| {});
    let (t2, s2) = node.kata_tarball("3.28.0", |_| {});
    let (code, _, stderr) = run_json(&bake_args(&t1, &s1, &noded), &root);
    assert_eq!(code, 0, "{stderr}");
    let (code, report, stderr) = run_json(&bake_args(&t2, &s2, &noded), &root);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(report["kata_version"], "3.28.0");
    assert_eq!(report["kata_changed"], true);
    let leftovers: Vec<_> = std::fs::read_dir(root.join("opt"))
        .expect("opt")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert_eq!(
        leftovers,
        ["kata"],
        "the previous release and the staging dir are gone"
    );
    let (code, _, stderr) = run_json(&["uninstall"], &root);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(snapshot(&root), before);
}

/// Each bad input: exit 2, one line naming the file and the problem, root untouched.
fn assert_rejected(node: &Node, tarball: &Path, sha: &str, expect: &str) {
    let root = node.root();
    let before = snapshot(&root);
    let noded = node.fake_noded();
    let out = installer()
        .args(bake_args(tarball, sha, &noded))
        .arg("--root")
        .arg(&root)
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains(expect), "expected `{expect}` in: {stderr}");
    assert_eq!(snapshot(&root), before, "nothing may be half-installed");
}

#[test]
fn wrong_hash_is_rejected_before_extracting() {
    let node = Node::new();
    let (tarball, sha) = node.kata_tarball("3.27.0", |_| {});
    let wrong = format!(
        "{}{}",
        if sha.starts_with('0') { "1" } else { "0" },
        &sha[1..]
    );
    assert_rejected(&node, &tarball, &wrong, "sha256 mismatch");
    assert_rejected(&node, &tarball, "abc", "64 hexadecimal digits");
    assert_rejected(
        &node,
        &node.dir.path().join("nope.tar.gz"),
        &sha,
        "cannot read the Kata tarball",
    );
}

#[test]
fn truncated_tarball_is_rejected_with_its_own_hash() {
    let node = Node::new();
    let (tarball, _) = node.kata_tarball("3.27.0", |_| {});
    let bytes = std::fs::read(&tarball).expect("read");
    let cut = node.dir.path().join("truncated.tar.gz");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).expect("write");
    // The hash matches the truncated file: only extraction can notice.
    let sha = common::sha256(&bytes[..bytes.len() / 2]);
    assert_rejected(&node, &cut, &sha, "truncated or damaged");
}

#[test]
fn tarball_without_the_shim_is_not_a_kata_release() {
    let node = Node::new();
    let (tarball, sha) = node.kata_tarball("3.27.0", |tree| {
        std::fs::remove_file(tree.join("bin/containerd-shim-kata-v2")).expect("rm shim");
    });
    assert_rejected(&node, &tarball, &sha, "not a Kata static release");
}

#[test]
fn tarball_without_any_hypervisor_binary_is_rejected() {
    let node = Node::new();
    let (tarball, sha) = node.kata_tarball("3.27.0", |tree| {
        std::fs::remove_file(tree.join("bin/qemu-system-x86_64")).expect("rm qemu");
    });
    assert_rejected(&node, &tarball, &sha, "no hypervisor binary");
}

#[test]
fn foreign_kata_root_is_not_overwritten() {
    let node = Node::new();
    std::fs::create_dir_all(node.root().join("opt/kata/bin")).expect("mkdir");
    std::fs::write(
        node.root().join("opt/kata/bin/containerd-shim-kata-v2"),
        b"kata-deploy's",
    )
    .expect("w");
    let (tarball, sha) = node.kata_tarball("3.27.0", |_| {});
    assert_rejected(
        &node,
        &tarball,
        &sha,
        "was not installed by `installer bake`",
    );
}

#[test]
fn boot_before_bake_is_bad_input() {
    let node = Node::new();
    let before = snapshot(&node.root());
    let (code, _, stderr) = run_json(&["boot"], &node.root());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not baked"), "{stderr}");
    assert_eq!(snapshot(&node.root()), before);
}
