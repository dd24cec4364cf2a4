//! The containerd configurator against the real containerd 1.6 binary (`config dump`), golden files
//! for containerd 2.x shapes, bad input, ownership and crash safety.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::config_shapes::*;
use noded::containerd::handler::KataHandler;

const CRI: &str = "io.containerd.grpc.v1.cri";
const HANDLERS: [KataHandler; 2] = [KataHandler::Qemu, KataHandler::QemuWarm];

/// Copies a fixture to `<tmp>/etc/config.toml` (or leaves it missing for `None`).
fn stage(tmp: &Path, fixture_name: Option<&str>) -> PathBuf {
    let dir = tmp.join("etc");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let config = dir.join("config.toml");
    if let Some(name) = fixture_name {
        std::fs::copy(fixture(name), &config).expect("copy fixture");
    }
    config
}

/// apply → dump shows the handlers and every original setting → apply again changes nothing →
/// revert gives back the original bytes.
fn shape_roundtrip(fixture_name: Option<&str>) {
    shape_roundtrip_except(fixture_name, &[]);
}

/// `may_change`: original lines noded has to rewrite (an inline `runtimes = { ... }` table is closed
/// in TOML: a new handler can only go inside it).
fn shape_roundtrip_except(fixture_name: Option<&str>, may_change: &[&str]) {
    if common::require("containerd").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = stage(tmp.path(), fixture_name);
    let state = tmp.path().join("state");
    let before = std::fs::read(&config).ok();
    // What containerd makes of the untouched file (a missing file dumps the built-in defaults).
    let probe = tmp.path().join("probe.toml");
    std::fs::write(&probe, before.as_deref().unwrap_or_default()).expect("write probe copy");
    let mut dump_before = dump(&probe);
    // containerd lists the file itself under `imports`; the two copies have different paths.
    dump_before.remove("imports");

    let req = request(&config, &state, &HANDLERS, "1.6.20");
    let report = apply_never(&req).expect("apply");
    assert!(report.changed);
    assert_eq!(report.handlers, vec!["kata-qemu", "kata-qemu-warm"]);
    let after = std::fs::read_to_string(&config).expect("config written");
    if let Some(b) = &before {
        let kept: String = String::from_utf8_lossy(b)
            .lines()
            .filter(|l| !may_change.iter().any(|m| l.starts_with(m)))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_lines_kept(&kept, &after);
    }

    let dump_after = dump(&config);
    let rts = runtimes(&dump_after, CRI);
    for h in HANDLERS {
        let t = rts
            .get(h.name())
            .and_then(toml::Value::as_table)
            .unwrap_or_else(|| panic!("{} missing in dump:\n{after}", h.name()));
        let spec = h.spec(Path::new("/opt/kata"));
        assert_eq!(t["runtime_type"].as_str(), Some(spec.runtime_type.as_str()));
        assert_eq!(
            t["runtime_path"].as_str(),
            Some("/opt/kata/bin/containerd-shim-kata-v2")
        );
        assert_eq!(t["privileged_without_host_devices"].as_bool(), Some(true));
        assert_eq!(
            t["pod_annotations"].as_array().map(Vec::len),
            Some(1),
            "pod_annotations"
        );
        assert_eq!(
            t["options"]["ConfigPath"].as_str(),
            Some(spec.config_path.to_str().expect("utf8"))
        );
    }
    // Every setting that was there before is still there, unchanged.
    let mut without_ours = dump_after.clone();
    without_ours.remove("imports");
    if let Some(rt) = without_ours
        .get_mut("plugins")
        .and_then(|p| p.get_mut(CRI))
        .and_then(|c| c.get_mut("containerd"))
        .and_then(|c| c.get_mut("runtimes"))
        .and_then(toml::Value::as_table_mut)
    {
        for h in HANDLERS {
            rt.remove(h.name());
        }
    }
    let differences = diff_ignoring_zero_defaults(&without_ours, &dump_before);
    assert!(
        differences.is_empty(),
        "containerd sees a different config apart from the kata handlers: {differences:#?}\n{after}"
    );

    let mtime = std::fs::metadata(&config)
        .and_then(|m| m.modified())
        .expect("mtime");
    let again = apply_never(&req).expect("second apply");
    assert!(
        !again.changed,
        "second apply must change nothing: {again:?}"
    );
    assert_eq!(std::fs::read_to_string(&config).expect("read"), after);
    assert_eq!(
        std::fs::metadata(&config)
            .and_then(|m| m.modified())
            .expect("mtime"),
        mtime,
        "no write on the unchanged path"
    );

    let reverted = revert_never(&req).expect("revert");
    assert!(reverted.changed);
    match before {
        Some(b) => assert_eq!(
            sha(&std::fs::read(&config).expect("read")),
            sha(&b),
            "revert restores the original bytes"
        ),
        None => assert!(!config.exists(), "revert removes a file noded created"),
    }
}

#[test]
fn shape_default_1_6_fixture() {
    shape_roundtrip(Some("default-1.6.toml"));
}
#[test]
fn shape_default_1_7() {
    shape_roundtrip(Some("default-1.7.toml"));
}
#[test]
fn shape_nodeadm_v2() {
    shape_roundtrip(Some("nodeadm-v2.toml"));
}
#[test]
fn shape_k3s() {
    shape_roundtrip(Some("k3s.toml"));
}
#[test]
fn shape_handwritten_dotted_single_quotes() {
    shape_roundtrip(Some("handwritten-dotted.toml"));
}
#[test]
fn shape_handwritten_inline_tables() {
    shape_roundtrip_except(Some("handwritten-inline.toml"), &["runtimes = {"]);
}
#[test]
fn shape_version_1() {
    shape_roundtrip(Some("v1.toml"));
}
#[test]
fn shape_only_version_2() {
    shape_roundtrip(Some("version-only.toml"));
}
#[test]
fn shape_empty_file() {
    shape_roundtrip(Some("empty.toml"));
}
#[test]
fn shape_missing_file() {
    shape_roundtrip(None);
}

/// The live `containerd config default` of the installed binary, not a stored copy.
#[test]
fn shape_live_config_default() {
    if common::require("containerd").is_none() {
        return;
    }
    let out = Command::new("containerd")
        .args(["config", "default"])
        .output()
        .expect("containerd config default");
    assert!(out.status.success());
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = stage(tmp.path(), None);
    std::fs::write(&config, &out.stdout).expect("write");
    let req = request(&config, &tmp.path().join("state"), &HANDLERS, "1.6.20");
    assert!(apply_never(&req).expect("apply").changed);
    assert!(runtimes(&dump(&config), CRI).contains_key("kata-qemu"));
    assert!(!apply_never(&req).expect("again").changed);
    revert_never(&req).expect("revert");
    assert_eq!(std::fs::read(&config).expect("read"), out.stdout);
}

/// Why containerd 1.x gets an in-place edit: an imported file replaces whole plugin sections. If this
/// ever stops being true for the installed containerd, this test fails and the strategy must be revisited.
#[test]
fn containerd_1x_imports_replace_whole_plugin_sections() {
    if common::require("containerd").is_none() {
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let dropins = tmp.path().join("config.d");
    std::fs::create_dir_all(&dropins).expect("mkdir");
    let main = tmp.path().join("config.toml");
    std::fs::write(
        &main,
        format!(
            "version = 2\nimports = [\"{}/*.toml\"]\n\n[plugins.\"{CRI}\"]\nsandbox_image = \"example.local/pause:9\"\n\n[plugins.\"{CRI}\".containerd.runtimes.runc]\nruntime_type = \"io.containerd.runc.v2\"\n[plugins.\"{CRI}\".containerd.runtimes.runc.options]\nSystemdCgroup = true\n\n[metrics]\naddress = \"127.0.0.1:1338\"\n",
            dropins.display()
        ),
    )
    .expect("write main");
    let only_main = dump(&main);
    assert_eq!(
        only_main["plugins"][CRI]["sandbox_image"].as_str(),
        Some("example.local/pause:9")
    );
    std::fs::write(
        dropins.join("kata.toml"),
        format!(
            "version = 2\n[plugins.\"{CRI}\".containerd.runtimes.kata-qemu]\nruntime_type = \"io.containerd.kata-qemu.v2\"\n[metrics]\ngrpc_histogram = true\n"
        ),
    )
    .expect("write drop-in");
    let merged = dump(&main);
    let rts = runtimes(&merged, CRI);
    assert!(rts.contains_key("kata-qemu"));
    assert!(
        !rts.contains_key("runc"),
        "containerd 1.x kept runc: imports now merge deeply, revisit the in-place strategy"
    );
    assert_ne!(
        merged["plugins"][CRI]["sandbox_image"].as_str(),
        Some("example.local/pause:9"),
        "sandbox_image survived the drop-in: imports now merge deeply"
    );
    // Top-level tables do merge.
    assert_eq!(
        merged["metrics"]["address"].as_str(),
        Some("127.0.0.1:1338")
    );
    assert_eq!(merged["metrics"]["grpc_histogram"].as_bool(), Some(true));
    // And so noded plans an in-place edit for this containerd.
    let req = request(&main, &tmp.path().join("state"), &HANDLERS, "1.6.20");
    let plan = noded::containerd::apply::plan(&req).expect("plan");
    assert_eq!(plan.strategy, noded::containerd::apply::Strategy::InPlace);
}

/// containerd 2.x shapes (not installable here): text-level goldens of the drop-in strategy.
fn drop_in_golden(fixture_name: &str, golden_prefix: &str) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let etc = tmp.path().join("etc");
    std::fs::create_dir_all(&etc).expect("mkdir");
    let config = etc.join("config.toml");
    let placeholder = "/etc/containerd";
    let text = std::fs::read_to_string(fixture(fixture_name))
        .expect("fixture")
        .replace(placeholder, etc.to_str().expect("utf8"));
    std::fs::write(&config, &text).expect("write");
    let req = request(&config, &tmp.path().join("state"), &HANDLERS, "2.0.4");
    let report = apply_never(&req).expect("apply");
    assert!(report.changed);
    assert_eq!(
        report.strategy,
        noded::containerd::apply::Strategy::DropIn,
        "containerd 2.x gets a drop-in"
    );
    let drop_in = etc.join("config.d/noded-kata.toml");
    let unplace = |s: String| s.replace(etc.to_str().expect("utf8"), placeholder);
    assert_golden(
        &format!("{golden_prefix}.dropin.toml"),
        &unplace(std::fs::read_to_string(&drop_in).expect("drop-in written")),
    );
    let main_after = std::fs::read_to_string(&config).expect("main");
    assert_lines_kept(&text, &main_after);
    assert_golden(
        &format!("{golden_prefix}.main.toml"),
        &unplace(main_after.clone()),
    );
    assert!(!apply_never(&req).expect("again").changed);
    revert_never(&req).expect("revert");
    assert!(!drop_in.exists(), "revert removes noded's drop-in");
    assert_eq!(std::fs::read_to_string(&config).expect("main"), text);
}

#[test]
fn golden_nodeadm_v3_drop_in() {
    drop_in_golden("nodeadm-v3.toml", "nodeadm-v3");
}

#[test]
fn golden_v3_without_imports_gets_import_line() {
    drop_in_golden("v3-no-imports.toml", "v3-no-imports");
}

/// In-place goldens: exact bytes for the shapes whose style must be kept (quoting, dotted, inline).
#[test]
fn golden_in_place_shapes() {
    for name in [
        "nodeadm-v2",
        "handwritten-dotted",
        "handwritten-inline",
        "v1",
        "empty",
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = stage(tmp.path(), Some(&format!("{name}.toml")));
        let req = request(&config, &tmp.path().join("state"), &HANDLERS, "1.6.20");
        apply_never(&req).expect("apply");
        assert_golden(
            &format!("{name}.inplace.toml"),
            &std::fs::read_to_string(&config).expect("read"),
        );
    }
}

/// v3 in place (containerd 2.x without imports is still edited through a drop-in, so the only way
/// single-quoted v3 keys get written into the main file is a 1.x-planned v3 file): quoting kept.
#[test]
fn v3_single_quoted_keys_are_kept_in_place() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = stage(tmp.path(), Some("v3-no-imports.toml"));
    let req = request(&config, &tmp.path().join("state"), &HANDLERS, "1.7.0");
    apply_never(&req).expect("apply");
    let text = std::fs::read_to_string(&config).expect("read");
    assert!(
        text.contains("[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kata-qemu]"),
        "{text}"
    );
    assert!(!text.contains("\"io.containerd.cri.v1.runtime\""), "{text}");
}

fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(noded_bin())
        .args(args)
        .output()
        .expect("run noded");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Bad input: exit 2, one line naming the file and the problem, nothing written anywhere.
#[test]
fn bad_input_exits_2_with_one_line_and_writes_nothing() {
    let cases: &[(&str, &[u8], &str)] = &[
        ("syntax", b"version = 2\n[plugins\n", "invalid TOML"),
        ("version99", b"version = 99\n", "unsupported `version = 99`"),
        ("versionstr", b"version = \"2\"\n", "`version` is a string"),
        (
            "plugin-string",
            b"version = 2\n[plugins]\n\"io.containerd.grpc.v1.cri\" = \"oops\"\n",
            "is a string, expected a table",
        ),
        (
            "runtimes-string",
            b"version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\nruntimes = 3\n",
            "runtimes` is an integer",
        ),
        ("not-utf8", b"version = 2\n# \xff\xfe\n", "not valid UTF-8"),
    ];
    for (name, bytes, needle) in cases {
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = tmp.path().join("config.toml");
        std::fs::write(&config, bytes).expect("write");
        let state = tmp.path().join("state");
        for sub in ["plan", "apply"] {
            let (code, stdout, stderr) = run_cli(
                &[
                    "containerd",
                    sub,
                    "--config",
                    config.to_str().expect("utf8"),
                    "--state-dir",
                    state.to_str().expect("utf8"),
                    "--containerd-version",
                    "1.6.20",
                    "--restart",
                    "never",
                    "--output",
                    "json",
                ]
                .into_iter()
                .filter(|a| sub == "apply" || (*a != "--restart" && *a != "never"))
                .collect::<Vec<_>>(),
            );
            assert_eq!(code, 2, "{name}/{sub}: stderr {stderr}");
            assert!(stdout.is_empty(), "{name}/{sub}: stdout {stdout}");
            assert_eq!(
                stderr.trim_end().lines().count(),
                1,
                "{name}/{sub}: {stderr}"
            );
            assert!(
                stderr.contains(config.to_str().expect("utf8")),
                "{name}: {stderr}"
            );
            assert!(
                stderr.contains(needle),
                "{name}: want {needle:?} in {stderr}"
            );
            assert_eq!(
                &std::fs::read(&config).expect("read"),
                bytes,
                "{name}: bytes kept"
            );
            assert!(!state.exists(), "{name}: no state written");
        }
    }
    // Unreadable: the path is a directory.
    let tmp = tempfile::tempdir().expect("tempdir");
    let (code, _, stderr) = run_cli(&[
        "containerd",
        "plan",
        "--config",
        tmp.path().to_str().expect("utf8"),
        "--containerd-version",
        "1.6.20",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("cannot read"), "{stderr}");
    // Unknown handler and bad restart strategy are bad input too.
    let (code, _, stderr) = run_cli(&[
        "containerd",
        "plan",
        "--config",
        "/nonexistent/x.toml",
        "--runtime",
        "kata-foo",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("kata-foo"), "{stderr}");
    let (code, _, stderr) = run_cli(&[
        "containerd",
        "apply",
        "--config",
        "/nonexistent/x.toml",
        "--restart",
        "reboot",
    ]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("reboot"), "{stderr}");
}

/// A handler noded did not write is reported, never overwritten, unless --adopt.
#[test]
fn foreign_handler_is_refused_then_adopted() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = tmp.path().join("config.toml");
    let original = format!(
        "version = 2\n[plugins.\"{CRI}\".containerd.runtimes.kata-qemu]\nruntime_type = \"io.containerd.kata.v2\"\n"
    );
    std::fs::write(&config, &original).expect("write");
    let state = tmp.path().join("state");
    let args = |adopt: bool| {
        let mut a = vec![
            "containerd".to_owned(),
            "apply".into(),
            "--config".into(),
            config.display().to_string(),
            "--state-dir".into(),
            state.display().to_string(),
            "--containerd-version".into(),
            "1.6.20".into(),
            "--restart".into(),
            "never".into(),
            "--runtime".into(),
            "kata-qemu".into(),
            "--output".into(),
            "json".into(),
        ];
        if adopt {
            a.push("--adopt".into());
        }
        a
    };
    let refs = |v: &Vec<String>| {
        v.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\u{0}")
    };
    let call = |v: Vec<String>| {
        let joined = refs(&v);
        run_cli(&joined.split('\u{0}').collect::<Vec<_>>())
    };
    let (code, _, stderr) = call(args(false));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("was not written by noded") && stderr.contains("--adopt"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&config).expect("read"), original);
    let (code, stdout, stderr) = call(args(true));
    assert_eq!(code, 0, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(v["changed"], true);
    assert_eq!(v["handlers"], serde_json::json!(["kata-qemu"]));
    // Adopted: owned now, a plain apply no longer complains; revert restores the foreign table.
    let (code, stdout, _) = call(args(false));
    assert_eq!(code, 0);
    assert!(stdout.contains("\"changed\":false"), "{stdout}");
    let req = request(&config, &state, &[KataHandler::Qemu], "1.6.20");
    revert_never(&req).expect("revert");
    assert_eq!(std::fs::read_to_string(&config).expect("read"), original);
}

/// Handlers noded wrote but no longer wants are removed; others are never touched.
#[test]
fn dropped_handler_is_removed_and_others_kept() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = stage(tmp.path(), Some("nodeadm-v2.toml"));
    let state = tmp.path().join("state");
    let all = [KataHandler::Qemu, KataHandler::QemuWarm, KataHandler::Clh];
    apply_never(&request(&config, &state, &all, "1.6.20")).expect("apply 3");
    let report =
        apply_never(&request(&config, &state, &[KataHandler::Qemu], "1.6.20")).expect("apply 1");
    assert!(report.changed);
    let text = std::fs::read_to_string(&config).expect("read");
    assert!(text.contains("runtimes.kata-qemu]"));
    assert!(
        !text.contains("kata-clh") && !text.contains("kata-qemu-warm"),
        "{text}"
    );
    assert!(text.contains("runtimes.runc]"), "runc is not noded's: kept");
}

/// Someone (nodeadm at boot) rewrites config.toml after noded: the next apply re-adds the handlers and
/// treats the rewritten bytes as the original that revert restores.
#[test]
fn external_rewrite_becomes_the_new_original() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = stage(tmp.path(), Some("nodeadm-v2.toml"));
    let state = tmp.path().join("state");
    let req = request(&config, &state, &HANDLERS, "1.6.20");
    apply_never(&req).expect("apply");
    let rewritten = std::fs::read_to_string(fixture("nodeadm-v2.toml"))
        .expect("fixture")
        .replace("pause:3.5", "pause:3.10");
    std::fs::write(&config, &rewritten).expect("rewrite");
    assert!(apply_never(&req).expect("re-apply").changed);
    revert_never(&req).expect("revert");
    assert_eq!(std::fs::read_to_string(&config).expect("read"), rewritten);
}

fn spawn_apply(config: &Path, state: &Path, pause_at: Option<&str>) -> std::process::Child {
    let mut cmd = Command::new(noded_bin());
    cmd.args(["containerd", "apply", "--config"])
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .args(["--containerd-version", "1.6.20", "--restart", "never"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(step) = pause_at {
        cmd.env("NODED_TEST_PAUSE_AT", step);
    }
    cmd.spawn().expect("spawn noded apply")
}

/// The file is always either the old or the new bytes and parses; a later apply converges and revert
/// still restores the original.
fn assert_old_or_new(config: &Path, old: &[u8], new: &[u8]) {
    let now = std::fs::read(config).expect("config readable");
    assert!(
        now == old || now == new,
        "torn file:\n{}",
        String::from_utf8_lossy(&now)
    );
    toml::from_str::<toml::Table>(std::str::from_utf8(&now).expect("utf8")).expect("parses");
}

#[test]
fn kill_9_at_every_step_leaves_old_or_new_bytes() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reference = stage(tmp.path(), Some("nodeadm-v2.toml"));
    let old = std::fs::read(&reference).expect("read");
    apply_never(&request(
        &reference,
        &tmp.path().join("ref-state"),
        &HANDLERS,
        "1.6.20",
    ))
    .expect("apply");
    let new = std::fs::read(&reference).expect("read");
    for step in [
        "temp-created",
        "temp-written",
        "temp-synced",
        "state-saved",
        "renamed",
        "file-written",
    ] {
        let dir = tmp.path().join(step);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = dir.join("config.toml");
        std::fs::write(&config, &old).expect("write");
        let state = dir.join("state");
        let mut child = spawn_apply(&config, &state, Some(step));
        let mut stderr = child.stderr.take().expect("stderr");
        let mut seen = String::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !seen.contains("paused at") {
            use std::io::Read;
            let mut buf = [0u8; 256];
            let n = stderr.read(&mut buf).expect("read stderr");
            assert!(
                n > 0 && std::time::Instant::now() < deadline,
                "never paused at {step}: {seen}"
            );
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        child.kill().expect("kill -9");
        child.wait().expect("reap");
        assert_old_or_new(&config, &old, &new);
        // Recovery: apply converges to the new bytes, revert gives back the original.
        let req = request(&config, &state, &HANDLERS, "1.6.20");
        apply_never(&req).unwrap_or_else(|e| panic!("apply after kill at {step}: {e}"));
        assert_eq!(
            std::fs::read(&config).expect("read"),
            new,
            "after kill at {step}"
        );
        revert_never(&req).expect("revert");
        assert_eq!(
            std::fs::read(&config).expect("read"),
            old,
            "revert after kill at {step}"
        );
        let leftovers: Vec<_> = std::fs::read_dir(&dir)
            .expect("ls")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".noded-tmp"))
            .collect();
        assert!(
            leftovers.is_empty(),
            "temp files left after recovery at {step}"
        );
    }
}

#[test]
fn kill_9_at_random_delays_never_tears_the_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let reference = stage(tmp.path(), Some("k3s.toml"));
    let old = std::fs::read(&reference).expect("read");
    apply_never(&request(
        &reference,
        &tmp.path().join("ref-state"),
        &HANDLERS,
        "1.6.20",
    ))
    .expect("apply");
    let new = std::fs::read(&reference).expect("read");
    for i in 0..40u64 {
        let dir = tmp.path().join(format!("r{i}"));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = dir.join("config.toml");
        std::fs::write(&config, &old).expect("write");
        let state = dir.join("state");
        let mut child = spawn_apply(&config, &state, None);
        // Spread the kills over the process's whole life (start-up dominates: a few ms).
        std::thread::sleep(Duration::from_micros((i * 397) % 12_000));
        let _ = child.kill();
        child.wait().expect("reap");
        assert_old_or_new(&config, &old, &new);
        let req = request(&config, &state, &HANDLERS, "1.6.20");
        apply_never(&req).expect("apply converges");
        revert_never(&req).expect("revert");
        assert_eq!(std::fs::read(&config).expect("read"), old, "round {i}");
    }
}
