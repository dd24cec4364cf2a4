//! `installer bake --guest-assets DIR` (issue 11: nothing downloads on a node): the guest kernel +
//! initramfs `noded guest-assets --out DIR` built (here: the same library call, real Debian packages)
//! are installed under /opt/noded/guest, pinned by sha256 in the manifest and in noded.toml (which
//! noded loads as a pinned, non-downloading guest), and removed by uninstall. A damaged directory is
//! refused before anything is written; a bake without it writes no [guest] and no [[templates]].

mod common;

use std::path::{Path, PathBuf};

use common::{Node, run_json, snapshot};
use noded::vm::assets::{self, ExportManifest};
use noded::vm::engine::GuestSource;

/// The Kata tarball and noded artifact of `node`, made once.
struct Inputs {
    tarball: PathBuf,
    sha: String,
    noded: PathBuf,
}

impl Inputs {
    fn new(node: &Node) -> Self {
        let (tarball, sha) = node.kata_tarball("3.27.0", |_| {});
        Self {
            tarball,
            sha,
            noded: node.fake_noded(),
        }
    }

    fn bake(&self, root: &Path, extra: &[&str]) -> (i32, serde_json::Value, String) {
        let mut args = vec![
            "bake".to_string(),
            "--kata-tarball".into(),
            self.tarball.display().to_string(),
            "--sha256".into(),
            self.sha.clone(),
            "--noded-binary".into(),
            self.noded.display().to_string(),
            "--nodeadm".into(),
            "never".into(),
            "--containerd-config-version".into(),
            "2".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run_json(&args, root)
    }
}

/// The real guest (Debian kernel + busybox initramfs), built once per target dir like noded's VM
/// tests do (same cache), exported as the build host would.
fn real_guest_dir(out: &Path) -> Option<ExportManifest> {
    common::require("apt-get")?;
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("noded-vm-data");
    std::fs::create_dir_all(&cache).expect("cache dir");
    let built = assets::ensure(&cache).expect("guest assets build from Debian packages");
    Some(assets::export(&built, out).expect("export"))
}

#[test]
fn bake_installs_and_pins_the_guest_and_uninstall_removes_it() {
    let node = Node::new();
    let root = node.root();
    let guest_dir = node.dir.path().join("guest");
    let Some(exported) = real_guest_dir(&guest_dir) else {
        return;
    };
    let inputs = Inputs::new(&node);
    let before = snapshot(&root);
    let guest_arg = guest_dir.display().to_string();
    let (code, report, stderr) = inputs.bake(&root, &["--guest-assets", &guest_arg]);
    assert_eq!(code, 0, "bake failed: {stderr}");
    let written: Vec<String> = report["written"]
        .as_array()
        .expect("written")
        .iter()
        .map(|v| v.as_str().unwrap_or_default().to_string())
        .collect();
    for p in ["/opt/noded/guest/vmlinux", "/opt/noded/guest/initrd.cpio"] {
        assert!(written.iter().any(|w| w == p), "{p} in {written:?}");
    }

    // The files: byte for byte what the build host exported, read-only.
    let kernel = root.join("opt/noded/guest/vmlinux");
    let initrd = root.join("opt/noded/guest/initrd.cpio");
    assert_eq!(
        std::fs::read(&kernel).expect("kernel"),
        std::fs::read(guest_dir.join(&exported.kernel)).expect("exported kernel")
    );
    assert_eq!(
        std::fs::read(&initrd).expect("initrd"),
        std::fs::read(guest_dir.join(&exported.initrd)).expect("exported initrd")
    );
    let mode = |p: &Path| {
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(p).expect("stat").permissions())
            & 0o777
    };
    assert_eq!(mode(&kernel), 0o444);

    // The manifest pins them: the guest record and the file entries carry the sha256.
    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(root.join("var/lib/noded/installer/manifest.json")).expect("manifest"),
    )
    .expect("manifest json");
    assert_eq!(manifest["guest"]["kernel"], "/opt/noded/guest/vmlinux");
    assert_eq!(manifest["guest"]["kernel_sha256"], exported.kernel_sha256);
    assert_eq!(manifest["guest"]["initrd"], "/opt/noded/guest/initrd.cpio");
    assert_eq!(manifest["guest"]["initrd_sha256"], exported.initrd_sha256);
    let entry_sha = |p: &str| {
        manifest["entries"]
            .as_array()
            .expect("entries")
            .iter()
            .find(|e| e["path"] == p)
            .map(|e| e["sha256"].clone())
    };
    assert_eq!(
        entry_sha("/opt/noded/guest/vmlinux"),
        Some(serde_json::Value::from(exported.kernel_sha256.clone()))
    );
    assert_eq!(
        entry_sha("/opt/noded/guest/initrd.cpio"),
        Some(serde_json::Value::from(exported.initrd_sha256.clone()))
    );

    // noded.toml: noded loads it as a pinned guest (no download) with a template pool using it.
    let toml_path = root.join("etc/noded/noded.toml");
    let cfg = noded::config::NodedConfig::load(&toml_path).expect("noded loads the baked toml");
    assert_eq!(
        cfg.guest.kernel.as_deref(),
        Some(Path::new("/opt/noded/guest/vmlinux"))
    );
    assert_eq!(
        cfg.guest.kernel_sha256.as_deref(),
        Some(exported.kernel_sha256.as_str())
    );
    assert_eq!(
        cfg.guest.initrd_sha256.as_deref(),
        Some(exported.initrd_sha256.as_str())
    );
    assert_eq!(cfg.guest.download, Some(false));
    assert!(!cfg.guest_download());
    assert_eq!(cfg.templates.len(), 1);
    assert!(cfg.templates[0].kernel.is_none());
    match GuestSource::from_config(&cfg) {
        GuestSource::Pinned(p) => {
            // Under --root the node path is below the root: what noded would verify there.
            let pin = assets::Pinned {
                kernel: root.join(p.kernel.strip_prefix("/").expect("absolute")),
                initrd: root.join(p.initrd.strip_prefix("/").expect("absolute")),
                ..p
            };
            assets::verify_pinned(&pin).expect("the installed files match their pins");
        }
        other => panic!("baked config must pin the guest, got {other:?}"),
    }

    // Idempotent: a second bake leaves the guest alone.
    let (code, report, stderr) = inputs.bake(&root, &["--guest-assets", &guest_arg]);
    assert_eq!(code, 0, "{stderr}");
    let unchanged = report["unchanged"].to_string();
    assert!(
        unchanged.contains("/opt/noded/guest/vmlinux"),
        "{unchanged}"
    );

    // A re-bake without --guest-assets: no pin, no pool, and the old files are gone.
    let (code, _, stderr) = inputs.bake(&root, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        !kernel.exists() && !initrd.exists(),
        "previous guest files removed"
    );
    let text = std::fs::read_to_string(&toml_path).expect("toml");
    assert!(
        !text.contains("[guest]") && !text.contains("[[templates]]"),
        "{text}"
    );
    let manifest = std::fs::read_to_string(root.join("var/lib/noded/installer/manifest.json"))
        .expect("manifest");
    assert!(!manifest.contains("/opt/noded/guest/vmlinux"), "{manifest}");
    assert!(!manifest.contains("\"guest\""), "{manifest}");
    // And back: the guest is installed again.
    let (code, _, stderr) = inputs.bake(&root, &["--guest-assets", &guest_arg]);
    assert_eq!(code, 0, "{stderr}");
    assert!(kernel.is_file() && initrd.is_file());

    let (code, _, stderr) = run_json(&["uninstall"], &root);
    assert_eq!(code, 0, "uninstall failed: {stderr}");
    assert!(!root.join("opt/noded").exists(), "guest dir removed");
    assert_eq!(snapshot(&root), before, "uninstall restores the root");
}

/// A small but well-formed export (ELF magic, newc magic) for the refusal cases.
fn fake_guest_dir(dir: &Path) -> ExportManifest {
    std::fs::create_dir_all(dir).expect("mkdir");
    std::fs::write(dir.join("vmlinux"), b"\x7fELF fake kernel").expect("w");
    std::fs::write(dir.join("initrd.cpio"), b"070701 fake initrd").expect("w");
    let m = ExportManifest {
        format: 1,
        kernel: "vmlinux".into(),
        kernel_sha256: assets::sha256_file(&dir.join("vmlinux")).expect("hash"),
        kernel_package: "linux-image-test=1".into(),
        initrd: "initrd.cpio".into(),
        initrd_sha256: assets::sha256_file(&dir.join("initrd.cpio")).expect("hash"),
    };
    std::fs::write(
        dir.join("guest-assets.json"),
        serde_json::to_vec(&m).expect("json"),
    )
    .expect("w");
    m
}

type Damage = Box<dyn Fn(&Path)>;

#[test]
fn a_damaged_guest_dir_is_refused_before_anything_is_written() {
    let node = Node::new();
    let root = node.root();
    let inputs = Inputs::new(&node);
    let before = snapshot(&root);
    let dir = node.dir.path().join("guest");
    let dir_arg = dir.display().to_string();
    let cases: Vec<(&str, Damage, String)> = vec![
        (
            "initrd changed after export",
            Box::new(|d: &Path| std::fs::write(d.join("initrd.cpio"), b"070701 other").expect("w")),
            format!("{}: sha256 ", dir.join("initrd.cpio").display()),
        ),
        (
            "kernel missing",
            Box::new(|d: &Path| std::fs::remove_file(d.join("vmlinux")).expect("rm")),
            format!("{}: ", dir.join("vmlinux").display()),
        ),
        (
            "no manifest",
            Box::new(|d: &Path| std::fs::remove_file(d.join("guest-assets.json")).expect("rm")),
            format!("{}: ", dir.join("guest-assets.json").display()),
        ),
        (
            "a path instead of a file name",
            Box::new(|d: &Path| {
                let mut m: ExportManifest =
                    serde_json::from_slice(&std::fs::read(d.join("guest-assets.json")).expect("r"))
                        .expect("json");
                m.kernel = "../../etc/passwd".into();
                std::fs::write(
                    d.join("guest-assets.json"),
                    serde_json::to_vec(&m).expect("j"),
                )
                .expect("w");
            }),
            "is not a file name in the directory".into(),
        ),
    ];
    for (what, damage, expected) in cases {
        let _ = std::fs::remove_dir_all(&dir);
        fake_guest_dir(&dir);
        damage(&dir);
        let (code, _, stderr) = inputs.bake(&root, &["--guest-assets", &dir_arg]);
        assert_eq!(code, 2, "{what}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{what}: {stderr}");
        assert!(stderr.contains(&expected), "{what}: {stderr}");
        assert!(stderr.contains("nothing was installed"), "{what}: {stderr}");
        assert_eq!(snapshot(&root), before, "{what}: nothing written");
    }
}

#[test]
fn bake_without_guest_assets_has_no_pool() {
    let node = Node::new();
    let root = node.root();
    let (code, _, stderr) = Inputs::new(&node).bake(&root, &[]);
    assert_eq!(code, 0, "{stderr}");
    let text = std::fs::read_to_string(root.join("etc/noded/noded.toml")).expect("toml");
    assert!(!text.contains("[guest]"), "{text}");
    assert!(!text.contains("[[templates]]"), "{text}");
    let cfg = noded::config::NodedConfig::parse(Path::new("noded.toml"), &text).expect("parses");
    assert!(cfg.templates.is_empty());
    assert!(!cfg.guest_download(), "a node never downloads");
    assert!(!root.join("opt/noded").exists());
    let manifest = std::fs::read_to_string(root.join("var/lib/noded/installer/manifest.json"))
        .expect("manifest");
    assert!(!manifest.contains("\"guest\""), "{manifest}");
}
