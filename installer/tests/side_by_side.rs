//! Two Kata releases on one node (issue 14 item 4): `installer bake --kata-root /opt/kata-3.28` puts a
//! canary release beside /opt/kata, relocated to its prefix; `[[handlers]]` with `kata_root` run from
//! it after `installer boot`; `uninstall --kata-root` removes exactly that release (refused while a
//! handler still uses it), and a full uninstall still leaves the root byte for byte as before.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::{Node, run_json, snapshot};

const CANARY: &str = "/opt/kata-3.28";

fn handlers(with_canary: bool) -> String {
    let mut s = String::from(
        "[[handlers]]\nname = \"kata-qemu-big\"\nhypervisor = \"qemu\"\ndefault_vcpus = 4\n",
    );
    if with_canary {
        s.push_str(&format!(
            "\n[[handlers]]\nname = \"kata-qemu-328\"\nhypervisor = \"qemu\"\nkata_root = \"{CANARY}\"\ndefault_memory = 1024\n"
        ));
    }
    s
}

fn main_bake(node: &Node, tarball: &Path, sha: &str, handlers: &Path) -> (i32, String) {
    let noded = node.fake_noded();
    let (code, _, stderr) = run_json(
        &common::bake_args(
            tarball,
            sha,
            &noded,
            &[
                "--nodeadm",
                "never",
                "--handlers",
                handlers.to_str().expect("utf8"),
            ],
        ),
        &node.root(),
    );
    (code, stderr)
}

fn canary_bake(node: &Node, tarball: &Path, sha: &str) -> (i32, serde_json::Value, String) {
    run_json(
        &[
            "bake",
            "--kata-root",
            CANARY,
            "--kata-tarball",
            tarball.to_str().expect("utf8"),
            "--sha256",
            sha,
        ],
        &node.root(),
    )
}

/// `snapshot` without the paths under `prefix` (a node path).
fn without(snap: &BTreeMap<PathBuf, String>, prefix: &str) -> BTreeMap<PathBuf, String> {
    let p = Path::new(prefix.trim_start_matches('/'));
    snap.iter()
        .filter(|(k, _)| !k.starts_with(p))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[test]
fn canary_release_beside_the_main_one_and_uninstall_of_exactly_it() {
    let node = Node::new();
    let root = node.root();
    let pristine = snapshot(&root);
    let (main_tar, main_sha) = node.kata_tarball("3.27.0", |_| {});
    let (canary_tar, canary_sha) = node.kata_tarball("3.28.0", |_| {});
    let with = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(with.path(), handlers(true)).expect("write");
    let without_canary = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(without_canary.path(), handlers(false)).expect("write");

    let (code, stderr) = main_bake(&node, &main_tar, &main_sha, with.path());
    assert_eq!(code, 0, "main bake: {stderr}");
    // `installer check` names the handler whose release is not there yet.
    let handler_check = |name: &str| {
        let (_, report, stderr) = run_json(&["check"], &root);
        report["checks"]
            .as_array()
            .and_then(|c| {
                c.iter()
                    .find(|i| {
                        i["check"] == "handler"
                            && i["detail"].as_str().is_some_and(|d| d.starts_with(name))
                    })
                    .cloned()
            })
            .unwrap_or_else(|| panic!("no handler check for {name}: {report} {stderr}"))
    };
    let missing = handler_check("kata-qemu-328");
    assert_eq!(missing["status"], "blocker", "{missing}");
    assert!(
        missing["detail"]
            .as_str()
            .is_some_and(|d| d.contains("/opt/kata-3.28 missing")),
        "{missing}"
    );
    let (code, report, stderr) = canary_bake(&node, &canary_tar, &canary_sha);
    assert_eq!(code, 0, "canary bake: {stderr}");
    assert_eq!(report["kata_version"], "3.28.0", "{report}");
    assert_eq!(report["kata_changed"], true, "{report}");

    let present = handler_check("kata-qemu-328");
    assert_eq!(present["status"], "ok", "{present}");
    assert!(
        present["detail"]
            .as_str()
            .is_some_and(|d| d.contains("3.28.0")),
        "{present}"
    );
    let main_handler = handler_check("kata-qemu-big");
    assert!(
        main_handler["detail"]
            .as_str()
            .is_some_and(|d| d.contains("3.27.0")),
        "{main_handler}"
    );

    // The canary's configs name its own prefix, never the main release's files.
    let canary = root.join(CANARY.trim_start_matches('/'));
    let cfg = std::fs::read_to_string(
        canary.join("share/defaults/kata-containers/configuration-qemu.toml"),
    )
    .expect("canary config");
    assert!(cfg.contains("/opt/kata-3.28/bin/"), "{cfg}");
    assert!(!cfg.contains("/opt/kata/"), "{cfg}");
    assert_eq!(
        std::fs::read_to_string(root.join("opt/kata/fake-version")).expect("main version"),
        "3.27.0\n"
    );
    // containerd 1.6 finds the canary handler's shim by name.
    assert_eq!(
        std::fs::read_link(root.join("usr/local/bin/containerd-shim-kata-qemu-328-v2"))
            .expect("shim link"),
        Path::new("/opt/kata-3.28/bin/containerd-shim-kata-v2")
    );

    // Boot: the canary handler runs from its root, with its own drop-in there.
    let (code, _, stderr) = run_json(&["boot"], &root);
    assert_eq!(code, 0, "boot: {stderr}");
    let config: toml::Table = std::fs::read_to_string(root.join("etc/containerd/config.toml"))
        .expect("config")
        .parse()
        .expect("TOML");
    let runtimes = &config["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"];
    let h = &runtimes["kata-qemu-328"];
    assert!(
        h["runtime_path"]
            .as_str()
            .is_some_and(|p| p.ends_with("/opt/kata-3.28/bin/containerd-shim-kata-v2")),
        "{h}"
    );
    assert!(
        h["options"]["ConfigPath"].as_str().is_some_and(|p| p
            .ends_with("/opt/kata-3.28/share/defaults/kata-containers/noded/kata-qemu-328/configuration-qemu.toml")),
        "{h}"
    );
    let dropin =
        canary.join("share/defaults/kata-containers/noded/kata-qemu-328/config.d/50-noded.toml");
    let d: toml::Table = std::fs::read_to_string(&dropin)
        .expect("canary drop-in")
        .parse()
        .expect("TOML");
    assert_eq!(
        d["hypervisor"]["qemu"]["default_memory"].as_integer(),
        Some(1024)
    );

    // Baking the same canary again changes nothing.
    let booted = snapshot(&root);
    let (code, report, stderr) = canary_bake(&node, &canary_tar, &canary_sha);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(report["kata_changed"], false, "{report}");
    assert_eq!(
        snapshot(&root),
        booted,
        "re-bake of the canary changed files"
    );

    // Bad --kata-root values and flags of the main bake: exit 2, one line, nothing changed.
    for (args, expect) in [
        (vec!["--kata-root", "/opt/kata"], "main Kata root"),
        (vec!["--kata-root", "/opt/kata/next"], "overlaps"),
        (vec!["--kata-root", "/opt"], "overlaps"),
        (vec!["--kata-root", "opt/kata-x"], "absolute"),
        (vec!["--kata-root", "/opt/../kata-x"], "absolute"),
        (
            vec!["--kata-root", "/opt/kata-x", "--handlers", "/dev/null"],
            "cannot be used with",
        ),
    ] {
        let mut all = vec![
            "bake",
            "--kata-tarball",
            canary_tar.to_str().expect("utf8"),
            "--sha256",
            &canary_sha,
        ];
        all.extend(args.iter().copied());
        let (code, _, stderr) = run_json(&all, &root);
        assert_eq!(code, 2, "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
        assert_eq!(snapshot(&root), booted, "{args:?} changed files");
    }

    // Uninstall of the canary is refused while a handler runs from it, and of an unknown root.
    let (code, _, stderr) = run_json(&["uninstall", "--kata-root", CANARY], &root);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("kata-qemu-328"), "{stderr}");
    let (code, _, stderr) = run_json(&["uninstall", "--kata-root", "/opt/kata-9"], &root);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("not a release"), "{stderr}");
    let (code, _, stderr) = run_json(&["uninstall", "--kata-root", "/opt/kata"], &root);
    assert_eq!(code, 2, "{stderr}");
    assert_eq!(snapshot(&root), booted, "refused uninstalls changed files");

    // The operator drops the canary handler (re-bake) and boots: its link, containerd entry and
    // drop-in go; then uninstall --kata-root removes the release and nothing else.
    let (code, stderr) = main_bake(&node, &main_tar, &main_sha, without_canary.path());
    assert_eq!(code, 0, "re-bake without the canary: {stderr}");
    assert!(
        root.join("usr/local/bin/containerd-shim-kata-qemu-328-v2")
            .symlink_metadata()
            .is_err(),
        "the dropped handler's shim link is left"
    );
    let (code, _, stderr) = run_json(&["boot"], &root);
    assert_eq!(code, 0, "boot: {stderr}");
    let cfg = std::fs::read_to_string(root.join("etc/containerd/config.toml")).expect("config");
    assert!(!cfg.contains("kata-qemu-328"), "{cfg}");
    assert!(!dropin.exists(), "the dropped handler's drop-in is left");
    let before_removal = snapshot(&root);
    let (code, _, stderr) = run_json(&["uninstall", "--kata-root", CANARY], &root);
    assert_eq!(code, 0, "uninstall --kata-root: {stderr}");
    assert!(!canary.exists(), "{CANARY} left");
    assert_eq!(
        snapshot(&root)
            .into_iter()
            .filter(|(k, _)| !k.starts_with("var/lib/noded/installer"))
            .collect::<BTreeMap<_, _>>(),
        without(&before_removal, CANARY)
            .into_iter()
            .filter(|(k, _)| !k.starts_with("var/lib/noded/installer"))
            .collect::<BTreeMap<_, _>>(),
        "uninstall --kata-root touched more than the canary"
    );

    // The canary can come back, and a full uninstall removes both releases and restores the root.
    let (code, _, stderr) = canary_bake(&node, &canary_tar, &canary_sha);
    assert_eq!(code, 0, "{stderr}");
    let (code, _, stderr) = run_json(&["uninstall"], &root);
    assert_eq!(code, 0, "uninstall: {stderr}");
    assert_eq!(snapshot(&root), pristine, "uninstall must restore the root");
}
