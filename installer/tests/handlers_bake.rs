//! `installer bake --handlers FILE`: the [[handlers]] land in the baked noded.toml, `installer boot`
//! writes their Kata drop-ins and registers them with containerd, a second boot and a re-bake rewrite
//! nothing, uninstall leaves the root byte for byte as before; a bad handlers file is exit 2, one line.

mod common;

use std::path::Path;

use common::{Node, installer, run_json, snapshot};

fn bake_args(tarball: &Path, sha: &str, noded: &Path, handlers: &Path) -> Vec<String> {
    common::bake_args(
        tarball,
        sha,
        noded,
        &[
            "--nodeadm",
            "never",
            "--handlers",
            handlers.to_str().expect("utf8"),
        ],
    )
}

const HANDLERS: &str = "[[handlers]]\nname = \"kata-qemu-big\"\nhypervisor = \"qemu\"\ndefault_vcpus = 4\n\n[[handlers]]\nname = \"kata-clh\"\nhypervisor = \"clh\"\n";

#[test]
fn baked_handlers_boot_rebake_and_uninstall() {
    let node = Node::new();
    let root = node.root();
    let before = snapshot(&root);
    let (tarball, sha) = node.kata_tarball("3.27.0", |_| {});
    let noded = node.fake_noded();
    let handlers = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(handlers.path(), HANDLERS).expect("write");

    let (code, _, stderr) = run_json(&bake_args(&tarball, &sha, &noded, handlers.path()), &root);
    assert_eq!(code, 0, "bake failed: {stderr}");
    let toml = std::fs::read_to_string(root.join("etc/noded/noded.toml")).expect("noded.toml");
    let config = noded::config::NodedConfig::parse(Path::new("noded.toml"), &toml).expect("loads");
    assert_eq!(config.handlers.len(), 2, "{toml}");
    assert_eq!(
        std::fs::read_link(root.join("usr/local/bin/containerd-shim-kata-qemu-big-v2"))
            .expect("1.6 shim link"),
        Path::new("/opt/kata/bin/containerd-shim-kata-v2")
    );

    let (code, report, stderr) = run_json(&["boot"], &root);
    assert_eq!(code, 0, "boot failed: {stderr}");
    let own = root.join("opt/kata/share/defaults/kata-containers/noded/kata-qemu-big");
    assert_eq!(
        report["handler_dropins"]["written"],
        serde_json::json!([
            own.join("config.d/50-noded.toml"),
            own.join("configuration-qemu.toml")
        ]),
        "{report}"
    );
    let cfg = std::fs::read_to_string(root.join("etc/containerd/config.toml")).expect("config");
    let parsed: toml::Table = cfg.parse().expect("valid TOML");
    let runtimes = &parsed["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    let big = runtimes
        .get("kata-qemu-big")
        .expect("kata-qemu-big registered");
    assert!(
        big["options"]["ConfigPath"]
            .as_str()
            .is_some_and(|p| p.ends_with("noded/kata-qemu-big/configuration-qemu.toml")),
        "{cfg}"
    );
    assert!(
        runtimes["kata-clh"]["options"]["ConfigPath"]
            .as_str()
            .is_some_and(|p| p.ends_with("kata-containers/configuration-clh.toml")),
        "{cfg}"
    );

    // Second boot and a re-bake: nothing rewritten.
    let booted = snapshot(&root);
    let (code, report, stderr) = run_json(&["boot"], &root);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(report["handler_dropins"]["written"], serde_json::json!([]));
    let (code, _, stderr) = run_json(&bake_args(&tarball, &sha, &noded, handlers.path()), &root);
    assert_eq!(code, 0, "re-bake: {stderr}");
    let (code, _, stderr) = run_json(&["boot"], &root);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(snapshot(&root), booted, "re-bake + boot changed something");

    let (code, _, stderr) = run_json(&["uninstall"], &root);
    assert_eq!(code, 0, "uninstall failed: {stderr}");
    assert_eq!(
        snapshot(&root),
        before,
        "uninstall must restore the root byte for byte"
    );
}

#[test]
fn bad_handlers_file_is_exit_2_one_line() {
    let node = Node::new();
    let root = node.root();
    let before = snapshot(&root);
    let (tarball, sha) = node.kata_tarball("3.27.0", |_| {});
    let noded = node.fake_noded();
    for (text, needle) in [
        (
            "[[handlers]]\nname = \"kata-h\"\nhypervisor = \"qemu\"\nvcpus = 2\n",
            "vcpus",
        ),
        ("[daemon]\ndata_dir = \"/x\"\n", "daemon"),
        (
            "[[handlers]]\nname = \"kata-h\"\nhypervisor = \"dragonball\"\n",
            "handlers[0].hypervisor",
        ),
    ] {
        let handlers = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(handlers.path(), text).expect("write");
        let out = installer()
            .args(bake_args(&tarball, &sha, &noded, handlers.path()))
            .arg("--root")
            .arg(&root)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{text}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(
            stderr.contains(&handlers.path().display().to_string()) && stderr.contains(needle),
            "{needle}: {stderr}"
        );
    }
    assert_eq!(
        snapshot(&root),
        before,
        "a refused bake leaves the root as it was"
    );
}

/// The nodeadm drop-in's inline TOML (`config: |`), parsed.
fn nodeadm_inline(root: &Path) -> (String, toml::Table) {
    let dropin = std::fs::read_to_string(root.join("etc/eks/nodeadm.d/50-noded-kata.yaml"))
        .expect("nodeadm drop-in");
    let inline: String = dropin
        .lines()
        .skip_while(|l| !l.contains("config: |"))
        .skip(1)
        .map(|l| format!("{}\n", l.trim_start()))
        .collect();
    let parsed = inline.parse().expect("inline TOML parses");
    (dropin, parsed)
}

#[test]
fn bake_runtimes_sets_the_presets_shims_and_nodeadm_dropin() {
    let node = Node::new();
    let root = node.root();
    let before = snapshot(&root);
    let (tarball, sha) = node.kata_tarball("3.27.0", |_| {});
    let noded = node.fake_noded();
    let args = |runtimes: &'static str| -> Vec<String> {
        common::bake_args(
            &tarball,
            &sha,
            &noded,
            &[
                "--nodeadm",
                "always",
                "--containerd-config-version",
                "3",
                "--runtimes",
                runtimes,
            ],
        )
    };

    // Refused lists first: exit 2, the problem on one line, nothing under the root.
    for (bad, needle) in [
        ("", "''"),
        ("kata-bogus", "kata-bogus"),
        ("kata-qemu,", "''"),
    ] {
        let out = installer()
            .args(args(bad))
            .arg("--root")
            .arg(&root)
            .output()
            .expect("run");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad:?}: {stderr}");
        // A usage error is one line, like every other bad input (noded::exit::parse_args).
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{bad:?}: {stderr}");
        assert!(
            lines[0].contains("--runtimes")
                && lines[0].contains(needle)
                && lines[0]
                    .contains("expected one of kata-qemu, kata-qemu-warm, kata-clh, kata-fc"),
            "{bad:?}: {stderr}"
        );
    }
    assert_eq!(
        snapshot(&root),
        before,
        "a refused --runtimes leaves the root as it was"
    );

    let (code, _, stderr) = run_json(&args("kata-qemu,kata-clh"), &root);
    assert_eq!(code, 0, "bake failed: {stderr}");
    assert_eq!(common::baked_runtimes(&root), ["kata-qemu", "kata-clh"]);
    assert_eq!(
        std::fs::read_link(root.join("usr/local/bin/containerd-shim-kata-clh-v2"))
            .expect("kata-clh shim link"),
        Path::new("/opt/kata/bin/containerd-shim-kata-v2")
    );
    assert!(
        root.join("usr/local/bin/containerd-shim-kata-qemu-warm-v2")
            .symlink_metadata()
            .is_err(),
        "no shim link for a handler that is not baked"
    );

    // nodeadm renders containerd's config at every boot: the drop-in carries exactly the baked
    // handlers, in config version 3's CRI runtime plugin.
    let (dropin, parsed) = nodeadm_inline(&root);
    let runtimes = parsed["plugins"]["io.containerd.cri.v1.runtime"]["containerd"]["runtimes"]
        .as_table()
        .expect("runtimes table");
    assert_eq!(
        runtimes
            .keys()
            .map(String::as_str)
            .collect::<std::collections::BTreeSet<_>>(),
        ["kata-clh", "kata-qemu"].into(),
        "{dropin}"
    );
    assert_eq!(
        runtimes["kata-clh"]["runtime_type"].as_str(),
        Some("io.containerd.kata-clh.v2"),
        "{dropin}"
    );
    assert!(
        runtimes["kata-clh"]["options"]["ConfigPath"]
            .as_str()
            .is_some_and(|p| p.ends_with("/configuration-clh.toml")),
        "{dropin}"
    );
    assert!(!runtimes.contains_key("kata-qemu-warm"), "{dropin}");
}

/// `installer check` counts the memory of every Kata template the node will keep: the preset's and
/// one per warm `[[handlers]]` entry (its default_memory + 8 MiB of tmpfs).
#[test]
fn check_counts_a_template_per_warm_handler() {
    let node = Node::new();
    let root = node.root();
    let (tarball, sha) = node.kata_tarball("3.27.0", |_| {});
    let noded = node.fake_noded();
    let need = |handlers: &str| {
        let file = tempfile::NamedTempFile::new().expect("tmp");
        std::fs::write(file.path(), handlers).expect("write");
        let (code, _, stderr) = run_json(&bake_args(&tarball, &sha, &noded, file.path()), &root);
        assert_eq!(code, 0, "bake: {stderr}");
        let (_, report, _) = run_json(&["check"], &root);
        report["template_memory_bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("{report}"))
    };
    let cold = need("[[handlers]]\nname = \"kata-qemu-big\"\nhypervisor = \"qemu\"\n");
    let warm = need(
        "[[handlers]]\nname = \"kata-qemu-big\"\nhypervisor = \"qemu\"\nwarm = true\ndefault_memory = 512\n",
    );
    assert_eq!(warm - cold, (512 + 8) * 1024 * 1024);
}
