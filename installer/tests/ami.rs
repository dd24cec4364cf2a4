//! The Packer template in ami/: full `packer validate` with Debian's packer 1.6.6 (offline; the
//! amazon-ebs builder is built into 1.6.6) on a copy without versions.pkr.hcl, which 1.6.6 rejects,
//! and every .pkr.hcl file, versions included, parsed with an HCL2 parser. The Kata handler list
//! (`kata_runtimes`) is followed from Packer's evaluation of the provisioner's environment through
//! bake.sh's check to the noded.toml `installer bake` writes.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
    // kata_runtimes is a list: an override in HCL list syntax validates, a bare map does not.
    let out = packer_validate(
        &dir,
        &[
            ("kata_sha256", &sha),
            ("kata_runtimes", r#"["kata-qemu", "kata-clh"]"#),
        ],
    );
    assert!(
        out.status.success(),
        "kata_runtimes override:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = packer_validate(
        &dir,
        &[("kata_sha256", &sha), ("kata_runtimes", r#"{a = "b"}"#)],
    );
    assert!(!out.status.success(), "a map accepted as kata_runtimes");

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
    // The AMI bakes Cloud Hypervisor next to the QEMU pair unless the build says otherwise.
    let runtimes = blocks(vars, "variable")
        .into_iter()
        .find(|b| b.labels()[0].as_str() == "kata_runtimes")
        .expect("variable kata_runtimes");
    assert_eq!(
        attr_text(runtimes.body(), "type").as_deref(),
        Some("list(string)")
    );
    assert_eq!(
        strings(attr_expr(runtimes.body(), "default").expect("kata_runtimes default")),
        ["kata-qemu", "kata-qemu-warm", "kata-clh"]
    );
    assert!(
        attr_text(runtimes.body(), "description").is_some_and(|d| d.contains("--runtimes")),
        "kata_runtimes needs a description naming the installer option"
    );

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
    // The handler list reaches bake.sh as one comma-separated variable (its value: the packer
    // console test below), and the AMI's tags record it.
    assert_eq!(
        env_template(main, "KATA_RUNTIMES"),
        r#"KATA_RUNTIMES=${join(",", var.kata_runtimes)}"#
    );
    let tags = attr_text(source[0].body(), "tags").expect("tags");
    assert!(tags.contains("var.kata_runtimes"), "{tags}");
    let script = std::fs::read_to_string(ami_dir().join("scripts/bake.sh")).expect("bake.sh");
    assert!(script.contains("installer bake --kata-tarball"), "{script}");
    let bake = bake_command(&script);
    assert!(bake.contains("--sha256 \"$KATA_SHA256\""), "{bake}");
    assert!(bake.contains("--runtimes \"$KATA_RUNTIMES\""), "{bake}");
}

fn attr_expr<'a>(body: &'a hcl::Body, key: &str) -> Option<&'a hcl::Expression> {
    body.attributes().find(|a| a.key() == key).map(|a| a.expr())
}

/// The elements of an HCL array of plain strings.
fn strings(expr: &hcl::Expression) -> Vec<String> {
    let hcl::Expression::Array(items) = expr else {
        panic!("not an array: {expr}");
    };
    items
        .iter()
        .map(|i| match i {
            hcl::Expression::String(s) => s.clone(),
            other => panic!("not a plain string: {other}"),
        })
        .collect()
}

fn parse_main() -> hcl::Body {
    let text = std::fs::read_to_string(ami_dir().join("noded-kata.pkr.hcl")).expect("read");
    hcl::parse(&text).expect("noded-kata.pkr.hcl parses")
}

/// The raw template of `NAME=...` in the bake provisioner's environment_vars.
fn env_template(main: &hcl::Body, name: &str) -> String {
    let build = blocks(main, "build");
    let shell = blocks(build[0].body(), "provisioner")
        .into_iter()
        .find(|p| attr_text(p.body(), "script").is_some())
        .expect("shell provisioner with the bake script");
    let hcl::Expression::Array(vars) =
        attr_expr(shell.body(), "environment_vars").expect("environment_vars")
    else {
        panic!("environment_vars is not a list");
    };
    let prefix = format!("{name}=");
    let found: Vec<String> = vars
        .iter()
        .filter_map(|v| match v {
            hcl::Expression::TemplateExpr(t) => Some(t.to_string()),
            hcl::Expression::String(s) => Some(s.clone()),
            _ => None,
        })
        .filter(|t| t.starts_with(&prefix))
        .collect();
    assert_eq!(found.len(), 1, "{name} in environment_vars: {found:?}");
    found[0].clone()
}

/// The `./installer bake` command of bake.sh, continuation lines joined.
fn bake_command(script: &str) -> String {
    let start = script
        .find("./installer bake ")
        .expect("bake.sh runs ./installer bake");
    let mut cmd = String::new();
    for line in script[start..].lines() {
        match line.trim_end().strip_suffix('\\') {
            Some(head) => cmd.push_str(head),
            None => {
                cmd.push_str(line);
                break;
            }
        }
    }
    cmd
}

/// `packer console` evaluating one expression against the template's variables (offline).
fn packer_console(dir: &Path, expr: &str, vars: &[(&str, &str)]) -> String {
    let mut cmd = Command::new("packer");
    cmd.arg("console")
        .current_dir(dir)
        .env("CHECKPOINT_DISABLE", "1");
    for (k, v) in vars {
        cmd.arg("-var").arg(format!("{k}={v}"));
    }
    let mut child = cmd
        .arg(".")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run packer console");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(format!("{expr}\n").as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("wait");
    assert!(
        out.status.success(),
        "packer console {expr}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// bake.sh with PATH pointing nowhere and a clean environment: only bash builtins can run, so the
/// checks at its top are exercised and nothing after them can touch the host (no mktemp under
/// /root, no copy, no installer). Exit code and stderr.
fn bake_sh_checks(bash: &Path, staging: &Path, runtimes: Option<&str>) -> (i32, String) {
    let empty = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(bash);
    cmd.arg(ami_dir().join("scripts/bake.sh"))
        .env_clear()
        .env("PATH", empty.path())
        .env("STAGING", staging)
        .env("KATA_TARBALL", "kata-static-3.27.0-amd64.tar.xz")
        .env("KATA_SHA256", "0".repeat(64));
    if let Some(r) = runtimes {
        cmd.env("KATA_RUNTIMES", r);
    }
    let out = cmd.output().expect("run bash");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn kata_runtimes_from_packer_through_bake_sh_into_noded_toml() {
    let (Some(_), Some(bash)) = (common::require("packer"), common::require("bash")) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("ami");
    copy_dir(&ami_dir(), &dir, "versions.pkr.hcl");
    std::fs::create_dir_all(dir.join("artifacts")).expect("mkdir");
    let sha = "0".repeat(64);

    // Packer evaluates the provisioner's own template text: the default, and an override.
    let template = format!("\"{}\"", env_template(&parse_main(), "KATA_RUNTIMES"));
    let default = packer_console(&dir, &template, &[("kata_sha256", &sha)]);
    assert_eq!(default, "KATA_RUNTIMES=kata-qemu,kata-qemu-warm,kata-clh");
    let pair = packer_console(
        &dir,
        &template,
        &[
            ("kata_sha256", &sha),
            ("kata_runtimes", r#"["kata-qemu", "kata-clh"]"#),
        ],
    );
    assert_eq!(pair, "KATA_RUNTIMES=kata-qemu,kata-clh");
    let default = default.strip_prefix("KATA_RUNTIMES=").expect("prefix");

    // bake.sh accepts what Packer passes: it gets past the handler check to the next one (a missing
    // upload dir), and a name list it refuses stops it before that, exit 2, one line.
    let missing = tmp.path().join("no-upload-dir");
    for ok in [default, "kata-qemu,kata-clh"] {
        let (code, stderr) = bake_sh_checks(&bash, &missing, Some(ok));
        assert_eq!(code, 2, "{ok}: {stderr}");
        assert!(
            stderr.contains("must be a directory") && !stderr.contains("KATA_RUNTIMES"),
            "{ok}: {stderr}"
        );
    }
    // An existing upload dir: a refused list must leave it (bake.sh deletes it on exit once past
    // its checks).
    let staging = tmp.path().join("upload");
    std::fs::create_dir(&staging).expect("mkdir");
    std::fs::write(staging.join("installer"), b"not run").expect("write");
    for (bad, needle) in [
        (Some("kata-qemu;touch /tmp/x"), "may hold only"),
        (Some("kata-qemu kata-clh"), "may hold only"),
        (Some("KATA-CLH"), "may hold only"),
        (Some("kata-qemu,$(id)"), "may hold only"),
        (Some("kata-qemu\nkata-clh"), "may hold only"),
        (Some(""), "empty"),
        (None, "empty"),
    ] {
        let (code, stderr) = bake_sh_checks(&bash, &staging, bad);
        assert_eq!(code, 2, "{bad:?}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{bad:?}: {stderr}");
        assert!(
            stderr.starts_with("bake.sh: KATA_RUNTIMES") && stderr.contains(needle),
            "{bad:?}: {stderr}"
        );
        assert!(
            staging.join("installer").is_file(),
            "{bad:?}: upload dir touched"
        );
    }

    // And `installer bake --runtimes` with Packer's default writes exactly that list, kata-clh
    // included, into the baked noded.toml.
    let node = common::Node::new();
    let root = node.root();
    let (tarball, sha) = node.kata_tarball("3.27.0", |_| {});
    let noded = node.fake_noded();
    let (code, _, stderr) = common::run_json(
        &common::bake_args(
            &tarball,
            &sha,
            &noded,
            &[
                "--mode",
                "kubernetes",
                "--nodeadm",
                "never",
                "--runtimes",
                default,
            ],
        ),
        &root,
    );
    assert_eq!(code, 0, "bake --runtimes {default}: {stderr}");
    assert_eq!(
        common::baked_runtimes(&root),
        ["kata-qemu", "kata-qemu-warm", "kata-clh"]
    );
}
