//! The containerd configurator against the real containerd of every series (`config dump` of 1.6, 1.7
//! and 2.1), golden files for the exact bytes, bad input, ownership and crash safety.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::config_shapes::*;
use noded::containerd::apply::Strategy;
use noded::containerd::handler::KataHandler;
use testkit::containerd::{Binaries, Series};
use testkit::per_series;
use testkit::strace::{PERSISTENCE_AND_WRITES, Strace};

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
fn shape_roundtrip(series: Series, fixture_name: Option<&str>) {
    shape_roundtrip_except(series, fixture_name, &[]);
}

/// The series' binaries, or None (skipped locally, a failure under CI=true).
fn series_bins(series: Series) -> Option<Binaries> {
    testkit::containerd::require(series)
}

/// A request planned for exactly the version of `bins`, as apply would find it on a node.
fn series_request(
    bins: &Binaries,
    config: &Path,
    state: &Path,
) -> noded::containerd::apply::Request {
    let version = bins.detect_version().expect("containerd --version");
    request(config, state, &HANDLERS, &version.to_string())
}

/// `may_change`: original lines noded has to rewrite (an inline `runtimes = { ... }` table is closed
/// in TOML: a new handler can only go inside it).
fn shape_roundtrip_except(series: Series, fixture_name: Option<&str>, may_change: &[&str]) {
    let Some(bins) = series_bins(series) else {
        return;
    };
    let cri = series.runtime_plugin();
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = stage(tmp.path(), fixture_name);
    let state = tmp.path().join("state");
    let before = std::fs::read(&config).ok();
    // What containerd makes of the untouched file (a missing file dumps the built-in defaults).
    let probe = tmp.path().join("probe.toml");
    std::fs::write(&probe, before.as_deref().unwrap_or_default()).expect("write probe copy");
    let mut dump_before = dump(&bins, &probe);
    // containerd lists the file itself under `imports`; the two copies have different paths.
    dump_before.remove("imports");

    let req = series_request(&bins, &config, &state);
    let report = apply_never(&req).expect("apply");
    let expected = if series.version().major >= 2 {
        Strategy::DropIn
    } else {
        Strategy::InPlace
    };
    assert_eq!(report.strategy, expected, "{series}");
    assert!(report.changed);
    assert_eq!(report.handlers, vec!["kata-qemu", "kata-qemu-warm"]);
    let after = std::fs::read_to_string(&config).expect("config written");
    // The drop-in strategy adds noded's directory to an `imports` array the file may already have.
    let may_change: Vec<&str> = match report.strategy {
        Strategy::DropIn => may_change.iter().copied().chain(["imports ="]).collect(),
        Strategy::InPlace => may_change.to_vec(),
    };
    if let Some(b) = &before {
        let kept: String = String::from_utf8_lossy(b)
            .lines()
            .filter(|l| !may_change.iter().any(|m| l.starts_with(m)))
            .map(|l| format!("{l}\n"))
            .collect();
        assert_lines_kept(&kept, &after);
    }

    let dump_after = dump(&bins, &config);
    let rts = runtimes(&dump_after, cri);
    for h in HANDLERS {
        let t = rts
            .get(h.name())
            .and_then(toml::Value::as_table)
            .unwrap_or_else(|| panic!("{series}: {} missing in dump:\n{after}", h.name()));
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
            t["container_annotations"]
                .as_array()
                .map(|a| a.iter().filter_map(toml::Value::as_str).collect::<Vec<_>>()),
            Some(vec!["io.kubernetes.container.terminationMessage*"]),
            "{series}: container_annotations"
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
        .and_then(|p| p.get_mut(cri))
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
        "{series} sees a different config apart from the kata handlers: {differences:#?}\n{after}"
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

per_series! {
    fn shape_default_1_6_fixture(series) {
        shape_roundtrip(series, Some("default-1.6.toml"));
    }
}
per_series! {
    fn shape_default_1_7(series) {
        shape_roundtrip(series, Some("default-1.7.toml"));
    }
}
per_series! {
    fn shape_nodeadm_v2(series) {
        shape_roundtrip(series, Some("nodeadm-v2.toml"));
    }
}
// A version 3 file is containerd 2.x's own; 1.x does not read it.
per_series! {
    [V2_1]
    fn shape_nodeadm_v3(series) {
        shape_roundtrip(series, Some("nodeadm-v3.toml"));
    }
}
per_series! {
    fn shape_k3s(series) {
        shape_roundtrip(series, Some("k3s.toml"));
    }
}
per_series! {
    fn shape_handwritten_dotted_single_quotes(series) {
        shape_roundtrip(series, Some("handwritten-dotted.toml"));
    }
}
per_series! {
    fn shape_handwritten_inline_tables(series) {
        shape_roundtrip_except(series, Some("handwritten-inline.toml"), &["runtimes = {"]);
    }
}
per_series! {
    [V1_6, V1_7]
    fn shape_version_1(series) {
        shape_roundtrip(series, Some("v1.toml"));
    }
}

per_series! {
    [V2_1]
    /// containerd 2.x ignores a version 1 file's plugin tables, and a drop-in would make it read them
    /// (verified with `config dump`): noded refuses as bad input and writes nothing.
    fn version_1_is_refused_on_containerd_2(series) {
        let Some(bins) = series_bins(series) else {
            return;
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = stage(tmp.path(), Some("v1.toml"));
        let before = std::fs::read(&config).expect("read");
        let alone = dump(&bins, &config);
        assert_ne!(
            alone["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"].as_str(),
            Some("registry.k8s.io/pause:3.8"),
            "{series} now reads version 1 plugin tables: revisit the refusal"
        );
        let req = series_request(&bins, &config, &tmp.path().join("state"));
        let err = apply_never(&req).expect_err("refused");
        assert!(err.to_string().contains("version 1 config"), "{err}");
        assert_eq!(
            noded::exit::ExitStatus::exit_code(&err),
            noded::exit::BAD_INPUT
        );
        assert_eq!(std::fs::read(&config).expect("read"), before);
        assert!(!tmp.path().join("etc/config.d").exists(), "no drop-in written");
    }
}
per_series! {
    fn shape_only_version_2(series) {
        shape_roundtrip(series, Some("version-only.toml"));
    }
}
per_series! {
    fn shape_empty_file(series) {
        shape_roundtrip(series, Some("empty.toml"));
    }
}
per_series! {
    fn shape_missing_file(series) {
        shape_roundtrip(series, None);
    }
}

per_series! {
    /// The live `containerd config default` of the series' binary, not a stored copy.
    fn shape_live_config_default(series) {
        let Some(bins) = series_bins(series) else {
            return;
        };
        let default = bins.config_default().expect("containerd config default");
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = stage(tmp.path(), None);
        std::fs::write(&config, &default).expect("write");
        let req = series_request(&bins, &config, &tmp.path().join("state"));
        assert!(apply_never(&req).expect("apply").changed);
        assert!(runtimes(&dump(&bins, &config), series.runtime_plugin()).contains_key("kata-qemu"));
        assert!(!apply_never(&req).expect("again").changed);
        revert_never(&req).expect("revert");
        assert_eq!(std::fs::read(&config).expect("read"), default);
    }
}

per_series! {
    /// Why containerd 1.x gets an in-place edit and 2.x a drop-in: a 1.x imported file replaces whole
    /// plugin sections, a 2.x one merges deeply. If a series stops behaving as its strategy assumes,
    /// this test fails and the strategy must be revisited.
    fn imports_merge_as_the_strategy_assumes(series) {
        let Some(bins) = series_bins(series) else {
            return;
        };
        let deep = series.version().major >= 2;
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
        // Where the series reports the sandbox image (2.x migrates a version 2 file to version 3).
        let sandbox = |d: &toml::Table| -> Option<String> {
            let v = if deep {
                &d["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"]
            } else {
                &d["plugins"][CRI]["sandbox_image"]
            };
            v.as_str().map(str::to_owned)
        };
        let only_main = dump(&bins, &main);
        assert_eq!(sandbox(&only_main).as_deref(), Some("example.local/pause:9"));
        std::fs::write(
            dropins.join("kata.toml"),
            format!(
                "version = 2\n[plugins.\"{CRI}\".containerd.runtimes.kata-qemu]\nruntime_type = \"io.containerd.kata-qemu.v2\"\n[metrics]\ngrpc_histogram = true\n"
            ),
        )
        .expect("write drop-in");
        let merged = dump(&bins, &main);
        let rts = runtimes(&merged, series.runtime_plugin());
        assert!(rts.contains_key("kata-qemu"), "{series}");
        assert_eq!(
            rts.contains_key("runc"),
            deep,
            "{series}: runc kept by a drop-in naming another handler"
        );
        assert_eq!(
            sandbox(&merged).as_deref() == Some("example.local/pause:9"),
            deep,
            "{series}: sandbox image kept by a drop-in of the same plugin"
        );
        // Top-level tables merge on every series.
        assert_eq!(
            merged["metrics"]["address"].as_str(),
            Some("127.0.0.1:1338")
        );
        assert_eq!(merged["metrics"]["grpc_histogram"].as_bool(), Some(true));
        let req = series_request(&bins, &main, &tmp.path().join("state"));
        let plan = noded::containerd::apply::plan(&req).expect("plan");
        let expected = if deep { Strategy::DropIn } else { Strategy::InPlace };
        assert_eq!(plan.strategy, expected, "{series}");
    }
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

/// `noded containerd apply` of [`HANDLERS`] on `config`, state under `state`, no restart.
fn apply_command(config: &Path, state: &Path) -> Command {
    let mut cmd = Command::new(noded_bin());
    cmd.args(["containerd", "apply", "--config"])
        .arg(config)
        .arg("--state-dir")
        .arg(state)
        .args(["--containerd-version", "1.6.20", "--restart", "never"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

fn spawn_apply(config: &Path, state: &Path) -> std::process::Child {
    apply_command(config, state)
        .spawn()
        .expect("spawn noded apply")
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

/// kill -9 on entry to every file-creating, writing, renaming and syncing syscall of a real
/// `noded containerd apply` (strace fault injection: no hook in the binary).
#[test]
fn kill_9_at_every_step_leaves_old_or_new_bytes() {
    let Some(strace) = Strace::require(PERSISTENCE_AND_WRITES) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let reference = stage(tmp.path(), Some("nodeadm-v2.toml"));
    let old = std::fs::read(&reference).expect("read");
    let steps = strace
        .steps(
            &apply_command(&reference, &tmp.path().join("ref-state")),
            &tmp.path().join("apply.strace"),
        )
        .expect("traced apply");
    let new = std::fs::read(&reference).expect("read");
    assert_ne!(old, new, "the traced apply changed the config");
    // The temp file's creation, write, fsync and rename, and the directory fsync, of both the state
    // record and the config: if these move off the main thread the list loses them.
    for syscall in ["openat", "write", "fsync", "rename"] {
        let n = steps.iter().filter(|s| s.syscall == syscall).count();
        assert!(n >= 2, "{syscall} traced {n} times: {steps:?}");
    }
    for step in &steps {
        let dir = tmp.path().join(format!("{}-{}", step.syscall, step.nth));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let config = dir.join("config.toml");
        std::fs::write(&config, &old).expect("write");
        let state = dir.join("state");
        strace
            .kill_at(&apply_command(&config, &state), step)
            .unwrap_or_else(|e| panic!("{e:#}"));
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
        let mut child = spawn_apply(&config, &state);
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
