//! Per-handler snapshotters against the real containerd of every series: where `config dump` of 1.6,
//! 1.7 and 2.1 reads the key noded writes, what noded refuses, goldens of the exact bytes, revert, and a
//! live 2.1/1.7 that loads a handler whose snapshotter plugin is not configured.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::config_shapes::*;
use noded::containerd::apply::{self, Strategy};
use noded::containerd::document::{ConfigDocument, ConfigVersion};
use noded::containerd::handler::{HandlerSpec, KataHandler};
use noded::containerd::restart::Restart;
use noded::containerd::snapshotter::Snapshotter;
use noded::containerd::version::ContainerdVersion;
use testkit::containerd::{Binaries, Series};
use testkit::per_series;

const IMAGES: &str = "io.containerd.cri.v1.images";
const HANDLERS: [KataHandler; 2] = [KataHandler::Qemu, KataHandler::Fc];

fn bins_and_version(series: Series) -> Option<(Binaries, ContainerdVersion)> {
    let bins = testkit::containerd::require(series)?;
    let version = bins.detect_version().expect("containerd --version");
    Some((bins, version))
}

/// `kata-qemu`'s spec with `snapshotter` (handler names and paths as noded writes them).
fn spec_with(snapshotter: Snapshotter) -> HandlerSpec {
    let mut spec = KataHandler::Qemu.spec(Path::new("/opt/kata"));
    spec.snapshotter = Some(snapshotter);
    spec
}

/// `config.toml` under `<tmp>/etc` from a fixture (`/etc/containerd` pointed into the temp dir), or
/// missing for `None`.
fn stage(tmp: &Path, fixture_name: Option<&str>) -> PathBuf {
    let etc = tmp.join("etc");
    std::fs::create_dir_all(&etc).expect("mkdir");
    let config = etc.join("config.toml");
    if let Some(name) = fixture_name {
        let text = std::fs::read_to_string(fixture(name))
            .expect("fixture")
            .replace("/etc/containerd", etc.to_str().expect("utf8"));
        std::fs::write(&config, text).expect("write fixture");
    }
    config
}

/// Writes `spec` the way `apply` does for `version`: in place for 1.x, through noded's drop-in (and an
/// `imports` line if the file has none) for 2.x.
fn render(config: &Path, spec: &HandlerSpec, version: ContainerdVersion) {
    let default = if version.merges_imports() {
        ConfigVersion::V3
    } else {
        ConfigVersion::V2
    };
    let mut main = ConfigDocument::load(config, default).expect("load");
    if version.merges_imports() {
        let dir = config.parent().expect("parent").join("config.d");
        std::fs::create_dir_all(&dir).expect("mkdir config.d");
        let pattern = format!("{}/*.toml", dir.display());
        main.add_import(&pattern);
        std::fs::write(config, main.render()).expect("write main");
        let path = dir.join("noded-kata.toml");
        let drop_in = main.drop_in(&path, std::slice::from_ref(spec), version);
        std::fs::write(&path, drop_in.render()).expect("write drop-in");
    } else {
        main.set_handler(spec, version);
        std::fs::write(config, main.render()).expect("write");
    }
}

fn get<'a>(t: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (first, rest) = path.split_first()?;
    let mut cur = t.get(*first)?;
    for seg in rest {
        cur = cur.get(*seg)?;
    }
    Some(cur)
}

/// The snapshotter `dump` gives handler `h`'s containers (runtime table) and, on 2.x, its images
/// (`runtime_platforms`).
fn dumped(dump: &toml::Table, series: Series, h: &str) -> (Option<String>, Option<String>) {
    // containerd dumps an unset runtime snapshotter as its zero value "" (= the default one).
    let runtime = runtimes(dump, series.runtime_plugin())
        .get(h)
        .and_then(|t| t.get("snapshotter"))
        .and_then(toml::Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    let images = get(
        dump,
        &["plugins", IMAGES, "runtime_platforms", h, "snapshotter"],
    )
    .and_then(toml::Value::as_str)
    .map(str::to_owned);
    (runtime, images)
}

per_series! {
    [V1_7, V2_1]
    /// Every snapshotter the series has: the dump carries it where that series reads it (1.7: the
    /// runtime table; 2.1: the runtime table and the images plugin's `runtime_platforms`), for the
    /// series' own config shapes, including a version 2 file on 2.1 (migrated by containerd).
    fn each_snapshotter_lands_where_the_series_reads_it(series) {
        let Some((bins, version)) = bins_and_version(series) else {
            return;
        };
        let shapes: &[Option<&str>] = match series {
            Series::V2_1 => &[Some("nodeadm-v3.toml"), Some("default-1.7.toml"), None],
            _ => &[Some("default-1.7.toml"), Some("nodeadm-v2.toml"), None],
        };
        let mut rendered = 0;
        for snapshotter in Snapshotter::all()
            .into_iter()
            .chain(["nydus-328".parse().expect("suffixed nydus")])
        {
            if snapshotter.check("kata-qemu", version).is_err() {
                continue;
            }
            for shape in shapes {
                let tmp = tempfile::tempdir().expect("tempdir");
                let config = stage(tmp.path(), *shape);
                render(&config, &spec_with(snapshotter.clone()), version);
                let dump = dump(&bins, &config);
                let (runtime, images) = dumped(&dump, series, "kata-qemu");
                let want = Some(snapshotter.name());
                assert_eq!(runtime, want, "{series} {shape:?}: runtime table");
                if series.version().major >= 2 {
                    assert_eq!(images, want, "{series} {shape:?}: runtime_platforms");
                    // No platform: containerd picks the node's default, as for any other handler.
                    assert_eq!(
                        get(&dump, &["plugins", IMAGES, "runtime_platforms", "kata-qemu", "platform"])
                            .and_then(toml::Value::as_str),
                        Some(""),
                        "{series} {shape:?}"
                    );
                }
                rendered += 1;
            }
        }
        // 1.7.24: 6 built-ins without erofs + 2 nydus spellings; 2.1: all 7 + 1.
        let expected = if series == Series::V2_1 { 8 } else { 7 };
        assert_eq!(rendered, expected * shapes.len(), "{series}");
    }
}

per_series! {
    [V1_6]
    /// Why noded refuses a snapshotter on 1.6: 1.6 drops the key (its runtime table has no such field),
    /// so the handler would silently unpack with the default snapshotter.
    fn containerd_1_6_drops_a_runtime_snapshotter(series) {
        let Some((bins, version)) = bins_and_version(series) else {
            return;
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = stage(tmp.path(), Some("default-1.6.toml"));
        render(&config, &spec_with(Snapshotter::Devmapper), version);
        let text = std::fs::read_to_string(&config).expect("read");
        assert!(text.contains("snapshotter = \"devmapper\""), "{text}");
        let dump = dump(&bins, &config);
        assert!(
            runtimes(&dump, series.runtime_plugin()).contains_key("kata-qemu"),
            "the handler itself is read"
        );
        assert_eq!(
            dumped(&dump, series, "kata-qemu"),
            (None, None),
            "{series} now reads a runtime snapshotter: revisit the refusal"
        );
        for s in Snapshotter::all() {
            let e = s.check("kata-qemu", version).expect_err("refused on 1.6");
            assert!(e.to_string().contains("1.6"), "{e}");
        }
    }
}

per_series! {
    [V2_1]
    /// Why noded writes `runtime_platforms` itself on 2.x: a runtime table's snapshotter alone leaves
    /// the images plugin without an entry (2.1's version 2 → 3 migration does not derive one either).
    fn containerd_2_1_needs_runtime_platforms_written(series) {
        let Some((bins, _)) = bins_and_version(series) else {
            return;
        };
        for shape in ["nodeadm-v3.toml", "default-1.7.toml"] {
            let tmp = tempfile::tempdir().expect("tempdir");
            let config = stage(tmp.path(), Some(shape));
            // Rendered as for a 1.x containerd: runtime table only, through a drop-in.
            let v17: ContainerdVersion = "1.7.24".parse().expect("version");
            let mut main = ConfigDocument::load(&config, ConfigVersion::V3).expect("load");
            let dir = tmp.path().join("etc/config.d");
            std::fs::create_dir_all(&dir).expect("mkdir");
            main.add_import(&format!("{}/*.toml", dir.display()));
            std::fs::write(&config, main.render()).expect("write");
            let path = dir.join("noded-kata.toml");
            let d = main.drop_in(&path, &[spec_with(Snapshotter::Erofs)], v17);
            std::fs::write(&path, d.render()).expect("write drop-in");
            let dump = dump(&bins, &config);
            assert_eq!(
                dumped(&dump, series, "kata-qemu"),
                (Some("erofs".to_owned()), None),
                "{shape}: containerd now derives runtime_platforms: noded's entry may be redundant"
            );
        }
    }
}

/// apply of kata-qemu + kata-fc (devmapper): 1.6 refuses (bad input, nothing written), 1.7 and 2.1
/// write exactly the golden bytes, the dump has devmapper where the series reads it, a second apply
/// changes nothing and revert gives back the original bytes and removes noded's drop-in.
fn fc_round_trip(series: Series, fixture_name: &str) {
    let Some((bins, version)) = bins_and_version(series) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = stage(tmp.path(), Some(fixture_name));
    let before = std::fs::read(&config).expect("read");
    let state = tmp.path().join("state");
    let req = request(&config, &state, &HANDLERS, &version.to_string());
    if series == Series::V1_6 {
        let err = apply_never(&req).expect_err("1.6 refuses a snapshotter");
        let msg = err.to_string();
        assert_eq!(msg.lines().count(), 1, "{msg}");
        assert!(
            msg.contains("kata-fc") && msg.contains(&version.to_string()),
            "{msg}"
        );
        assert_eq!(
            noded::exit::ExitStatus::exit_code(&err),
            noded::exit::BAD_INPUT
        );
        assert_eq!(std::fs::read(&config).expect("read"), before);
        assert!(!state.exists(), "no state written");
        return;
    }
    let report = apply_never(&req).expect("apply");
    assert!(report.changed);
    let etc = tmp.path().join("etc");
    let unplace = |s: String| s.replace(etc.to_str().expect("utf8"), "/etc/containerd");
    let stem = fixture_name.trim_end_matches(".toml");
    let drop_in = etc.join("config.d/noded-kata.toml");
    match report.strategy {
        Strategy::InPlace => assert_golden(
            &format!("snapshotter-{stem}-{}.inplace.toml", series.name()),
            &unplace(std::fs::read_to_string(&config).expect("read")),
        ),
        Strategy::DropIn => assert_golden(
            &format!("snapshotter-{stem}-{}.dropin.toml", series.name()),
            &unplace(std::fs::read_to_string(&drop_in).expect("drop-in")),
        ),
    }
    let after = dump(&bins, &config);
    let want_images = (series.version().major >= 2).then(|| "devmapper".to_owned());
    assert_eq!(
        dumped(&after, series, "kata-fc"),
        (Some("devmapper".to_owned()), want_images),
        "{series}"
    );
    assert_eq!(
        dumped(&after, series, "kata-qemu"),
        (None, None),
        "{series}"
    );
    assert!(!apply_never(&req).expect("again").changed, "{series}");
    let reverted = revert_never(&req).expect("revert");
    assert!(reverted.changed);
    assert_eq!(std::fs::read(&config).expect("read"), before, "{series}");
    assert!(!drop_in.exists(), "{series}: drop-in removed");
    let reverted_dump = dump(&bins, &config);
    assert_eq!(
        dumped(&reverted_dump, series, "kata-fc"),
        (None, None),
        "{series}"
    );
}

per_series! {
    fn kata_fc_devmapper_round_trip_version_2_file(series) {
        fc_round_trip(series, "nodeadm-v2.toml");
    }
}
per_series! {
    [V2_1]
    fn kata_fc_devmapper_round_trip_version_3_file(series) {
        fc_round_trip(series, "nodeadm-v3.toml");
    }
}

/// An operator's own `runtime_platforms.<handler>` is foreign: refused without --adopt.
#[test]
fn foreign_runtime_platform_is_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = stage(tmp.path(), Some("nodeadm-v3.toml"));
    let mut text = std::fs::read_to_string(&config).expect("read");
    text.push_str(
        "\n[plugins.'io.containerd.cri.v1.images'.runtime_platforms.kata-fc]\nsnapshotter = \"blockfile\"\n",
    );
    std::fs::write(&config, &text).expect("write");
    let state = tmp.path().join("state");
    let mut req = request(&config, &state, &HANDLERS, "2.1.9");
    let err = apply_never(&req).expect_err("foreign");
    assert!(
        err.to_string().contains("runtime_platforms.kata-fc")
            && err.to_string().contains("--adopt"),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&config).expect("read"), text);
    req.adopt = true;
    assert!(apply_never(&req).expect("adopted").changed);
    revert_never(&req).expect("revert");
    assert_eq!(std::fs::read_to_string(&config).expect("read"), text);
}

/// The CLI: kata-fc against containerd 1.6 and erofs-less versions exits 2 with one line.
#[test]
fn cli_refuses_kata_fc_on_1_6_with_one_line() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let config = stage(tmp.path(), Some("nodeadm-v2.toml"));
    let before = std::fs::read(&config).expect("read");
    let state = tmp.path().join("state");
    for sub in ["plan", "apply"] {
        let mut cmd = Command::new(noded_bin());
        cmd.args(["containerd", sub, "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .args([
                "--containerd-version",
                "1.6.20",
                "--runtime",
                "kata-qemu",
                "--runtime",
                "kata-fc",
            ]);
        if sub == "apply" {
            cmd.args(["--restart", "never"]);
        }
        let out = cmd.output().expect("run noded");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{sub}: {stderr}");
        assert_eq!(stderr.trim_end().lines().count(), 1, "{sub}: {stderr}");
        assert!(
            stderr.contains("handler `kata-fc`")
                && stderr.contains("devmapper")
                && stderr.contains("1.6.20"),
            "{sub}: {stderr}"
        );
        assert_eq!(std::fs::read(&config).expect("read"), before);
        assert!(!state.exists());
    }
}

per_series! {
    [V1_7, V2_1]
    /// A live containerd loads and serves a handler pinned to devmapper although no devmapper pool is
    /// configured (the plugin fails to initialise and is skipped): CRI comes back ready after noded's
    /// restart and lists the handler; pulls for it would fail, which is the operator's pool to set up.
    async fn live_containerd_serves_a_handler_whose_snapshotter_is_unconfigured(series) {
        if common::containerd::available_series(series).is_none() {
            return;
        }
        let ctrd = testkit::containerd::start(series, noded::containerd::image::PAUSE_IMAGE)
            .await
            .unwrap_or_else(|e| panic!("private {series}: {e:#}"));
        let bins = testkit::containerd::binaries(series).expect("binaries");
        let version = bins.detect_version().expect("version");
        // The premise: this containerd has no devmapper pool, so its devmapper plugin is not loaded.
        let plugins = Command::new(&bins.ctr)
            .arg("--address")
            .arg(ctrd.socket())
            .args(["plugins", "ls"])
            .output()
            .expect("ctr plugins ls");
        let listing = String::from_utf8_lossy(&plugins.stdout);
        let devmapper = listing
            .lines()
            .find(|l| l.contains("io.containerd.snapshotter.v1") && l.contains("devmapper"))
            .unwrap_or_else(|| panic!("{series}: no devmapper plugin in:\n{listing}"));
        assert!(
            devmapper
                .split_whitespace()
                .last()
                .is_some_and(|status| status == "skip" || status == "error"),
            "{series}: devmapper is loaded here, the test proves nothing: {devmapper}"
        );
        let config = ctrd.config_path().to_path_buf();
        let state = ctrd.dir().join("noded-state");
        let mut req = request(&config, &state, &HANDLERS, &version.to_string());
        req.socket = Some(ctrd.socket().to_path_buf());
        let restart = Restart::Command(ctrd.restart_command());
        let report = apply::apply(&req, &restart).await.expect("apply + verify");
        assert!(report.restarted && report.verified, "{report:?}");
        let mut cri = noded::cri::CriClient::connect(ctrd.socket()).await.expect("cri");
        let status = noded::containerd::cri_plugin::status(&mut cri).await.expect("status");
        assert!(status.runtime_ready(), "{series}: {status:?}");
        assert_eq!(
            status.handlers.get("kata-fc").map(|h| h.snapshotter.as_str()),
            Some("devmapper"),
            "{series}"
        );
        if series.version().major >= 2 {
            assert!(status.runtime_handlers.contains(&"kata-fc".to_owned()), "{status:?}");
        }
        apply::revert_with(
            &config,
            &state,
            &restart,
            Some(version),
            &bins.containerd,
            Some(ctrd.socket()),
        )
        .await
        .expect("revert");
    }
}

per_series! {
    [V2_1]
    /// A handler dropped from the set takes its `runtime_platforms` entry with it (noded's drop-in is
    /// rendered whole); revert still gives back the original bytes.
    fn dropped_handler_takes_its_runtime_platform_along(series) {
        let Some((bins, version)) = bins_and_version(series) else {
            return;
        };
        let tmp = tempfile::tempdir().expect("tempdir");
        let config = stage(tmp.path(), Some("nodeadm-v3.toml"));
        let before = std::fs::read(&config).expect("read");
        let state = tmp.path().join("state");
        let v = version.to_string();
        apply_never(&request(&config, &state, &HANDLERS, &v)).expect("apply both");
        let report = apply_never(&request(&config, &state, &[KataHandler::Qemu], &v))
            .expect("apply kata-qemu only");
        assert!(report.changed);
        let dropped = report
            .actions
            .iter()
            .find(|a| a.handler == "kata-fc")
            .map(|a| a.action);
        assert_eq!(dropped, Some(apply::Action::Remove), "{report:?}");
        let drop_in = tmp.path().join("etc/config.d/noded-kata.toml");
        let text = std::fs::read_to_string(&drop_in).expect("drop-in");
        assert!(!text.contains("runtime_platforms"), "{text}");
        let dump = dump(&bins, &config);
        assert!(!runtimes(&dump, series.runtime_plugin()).contains_key("kata-fc"));
        assert_eq!(
            get(&dump, &["plugins", IMAGES, "runtime_platforms", "kata-fc"]),
            None,
            "{series}"
        );
        revert_never(&request(&config, &state, &[KataHandler::Qemu], &v)).expect("revert");
        assert_eq!(std::fs::read(&config).expect("read"), before);
        assert!(!drop_in.exists());
    }
}
