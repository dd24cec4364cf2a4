//! The Packer template in ami/: full `packer validate` with Debian's packer 1.6.6 (offline; the
//! amazon-ebs builder is built into 1.6.6) on a copy without versions.pkr.hcl, which 1.6.6 rejects,
//! and every .pkr.hcl file, versions included, parsed with an HCL2 parser.

mod common;

use std::path::{Path, PathBuf};

fn ami_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../ami")
}

fn copy_dir(from: &Path, to: &Path, skip: &str) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("readdir") {
        let e = e.expect("entry");
        let name = e.file_name();
        if name == skip {
            continue;
        }
        let dst = to.join(&name);
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst, skip);
        } else {
            std::fs::copy(e.path(), dst).expect("copy");
        }
    }
}

fn packer_validate(dir: &Path, vars: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new("packer");
    cmd.arg("validate")
        .current_dir(dir)
        .env("CHECKPOINT_DISABLE", "1");
    for (k, v) in vars {
        cmd.arg("-var").arg(format!("{k}={v}"));
    }
    cmd.arg(".").output().expect("run packer")
}

#[test]
fn packer_validate_passes_offline_without_the_versions_file() {
    if common::require("packer").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ami");
    copy_dir(&ami_dir(), &dir, "versions.pkr.hcl");
    // The file provisioner checks its source exists.
    std::fs::create_dir_all(dir.join("artifacts")).expect("mkdir");
    let sha = "0".repeat(64);
    let out = packer_validate(&dir, &[("kata_sha256", &sha)]);
    assert!(
        out.status.success(),
        "packer validate failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The check can fail: the sha256 has no default, so leaving it out is an error.
    let out = packer_validate(&dir, &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("kata_sha256"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // And 1.6.6 really cannot take the versions file: that is why it lives alone.
    std::fs::copy(
        ami_dir().join("versions.pkr.hcl"),
        dir.join("versions.pkr.hcl"),
    )
    .expect("copy");
    let out = packer_validate(&dir, &[("kata_sha256", &sha)]);
    assert!(
        !out.status.success(),
        "packer 1.6.6 unexpectedly accepted required_plugins"
    );
}

fn blocks<'a>(body: &'a hcl::Body, ident: &str) -> Vec<&'a hcl::Block> {
    body.blocks().filter(|b| b.identifier() == ident).collect()
}

fn attr_text(body: &hcl::Body, key: &str) -> Option<String> {
    body.attributes()
        .find(|a| a.key() == key)
        .map(|a| a.expr().to_string())
}

#[test]
fn every_pkr_hcl_file_parses_and_has_the_expected_shape() {
    let mut parsed = std::collections::BTreeMap::new();
    for e in std::fs::read_dir(ami_dir()).expect("readdir") {
        let p = e.expect("entry").path();
        if p.to_string_lossy().ends_with(".pkr.hcl") {
            let text = std::fs::read_to_string(&p).expect("read");
            let body: hcl::Body =
                hcl::parse(&text).unwrap_or_else(|err| panic!("{}: {err}", p.display()));
            parsed.insert(
                p.file_name().expect("name").to_string_lossy().into_owned(),
                body,
            );
        }
    }
    assert_eq!(
        parsed.keys().collect::<Vec<_>>(),
        [
            "noded-kata.pkr.hcl",
            "variables.pkr.hcl",
            "versions.pkr.hcl"
        ]
    );

    // versions: the amazon plugin requirement, and nothing else in that file.
    let versions = &parsed["versions.pkr.hcl"];
    let packer = blocks(versions, "packer");
    assert_eq!(packer.len(), 1);
    assert_eq!(
        versions.blocks().count(),
        1,
        "versions.pkr.hcl holds only the packer block"
    );
    let plugins = blocks(packer[0].body(), "required_plugins");
    let amazon = attr_text(plugins[0].body(), "amazon").expect("amazon plugin");
    assert!(amazon.contains("github.com/hashicorp/amazon"), "{amazon}");

    // Variables the bake needs; the sha256 has no default (a bake must name its tarball's hash).
    let vars = &parsed["variables.pkr.hcl"];
    let names: Vec<String> = blocks(vars, "variable")
        .iter()
        .map(|b| b.labels()[0].as_str().to_owned())
        .collect();
    for v in [
        "kata_version",
        "kata_sha256",
        "kata_tarball",
        "artifacts_dir",
        "instance_type",
        "noded_version",
    ] {
        assert!(
            names.iter().any(|n| n == v),
            "variable {v} missing: {names:?}"
        );
    }
    let sha = blocks(vars, "variable")
        .into_iter()
        .find(|b| b.labels()[0].as_str() == "kata_sha256")
        .expect("kata_sha256");
    assert!(attr_text(sha.body(), "default").is_none());
    let instance = blocks(vars, "variable")
        .into_iter()
        .find(|b| b.labels()[0].as_str() == "instance_type")
        .expect("instance_type");
    assert!(attr_text(instance.body(), "default").is_some_and(|d| d.contains(".metal")));

    // The source: amazon-ebs from the AL2023 EKS-optimized AMI.
    let main = &parsed["noded-kata.pkr.hcl"];
    let source = blocks(main, "source");
    assert_eq!(source.len(), 1);
    assert_eq!(source[0].labels()[0].as_str(), "amazon-ebs");
    let filter = blocks(source[0].body(), "source_ami_filter");
    let filters = attr_text(filter[0].body(), "filters").expect("filters");
    assert!(
        filters.contains("amazon-eks-node-al2023-x86_64-standard-"),
        "{filters}"
    );

    // The build runs `installer bake` through the script, with the sha256 passed on.
    let build = blocks(main, "build");
    let provisioners = blocks(build[0].body(), "provisioner");
    let shell = provisioners
        .iter()
        .find(|p| attr_text(p.body(), "script").is_some())
        .expect("shell provisioner with the bake script");
    assert!(
        attr_text(shell.body(), "environment_vars").is_some_and(|e| e.contains("var.kata_sha256"))
    );
    let script = std::fs::read_to_string(ami_dir().join("scripts/bake.sh")).expect("bake.sh");
    assert!(script.contains("installer bake --kata-tarball"), "{script}");
    assert!(script.contains("--sha256 \"$KATA_SHA256\""), "{script}");
}
