//! k3s/rke2: the configurator of their embedded containerd (`[containerd] flavour`), through the
//! `RuntimeConfigurator` trait. The template noded writes is rendered the way k3s renders it
//! (`{{ template "base" . }}` replaced by a base config the test supplies) and read back with the real
//! `containerd config dump` of 1.7 and 2.1; the restart goes to the flavour's unit on a real D-Bus to
//! testkit's fake systemd, whose restart renders the template and restarts a real private containerd.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::config_shapes::{dump, fixture, runtimes};
use noded::config::NodedConfig;
use noded::containerd::embedded::{
    BASE_INCLUDE, EmbeddedContainerd, Flavour, TEMPLATE_V2, TEMPLATE_V3,
};
use noded::containerd::handler::KataHandler;
use noded::containerd::image::PAUSE_IMAGE;
use noded::containerd::restart::Restart;
use noded::containerd::systemd::SystemdTarget;
use noded::runtime::{Access, RuntimeConfigurator};
use testkit::containerd::{Binaries, Series};
use testkit::dbus::{SystemdBus, require_dbus_daemon};
use testkit::per_series;

const HANDLERS: [KataHandler; 2] = [KataHandler::Qemu, KataHandler::QemuWarm];

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

/// noded.toml of a node of `flavour`, under the installer-style `root` (no restart, not running).
fn configurator(root: &Path, flavour: Flavour, bins: &Binaries) -> EmbeddedContainerd {
    let text = format!(
        "[containerd]\nflavour = \"{}\"\n[daemon]\ndata_dir = \"/var/lib/noded\"\n",
        flavour.as_str()
    );
    let config = NodedConfig::parse(Path::new("noded.toml"), &text).expect("noded.toml");
    let access = Access {
        root: Some(root.to_path_buf()),
        ..Access::default()
    };
    let mut c = EmbeddedContainerd::new(&config, &access, flavour);
    c.version = Some(bins.detect_version().expect("containerd --version"));
    c
}

fn containerd_dir(root: &Path, flavour: Flavour) -> PathBuf {
    let data = match flavour {
        Flavour::Rke2 | Flavour::Rke2Server => "var/lib/rancher/rke2",
        _ => "var/lib/rancher/k3s",
    };
    root.join(data).join("agent/etc/containerd")
}

/// What k3s does at start with the template: `base` is its built-in config; nothing else in these
/// templates is a template action but comments.
fn render_as_k3s(template: &str, base: &str) -> String {
    let mut out = String::new();
    for line in template.split_inclusive('\n') {
        if line.trim() == "{{ template \"base\" . }}" {
            out.push_str(base);
            if !base.ends_with('\n') {
                out.push('\n');
            }
        } else if line.trim().starts_with("{{/*") {
            continue;
        } else {
            assert!(!line.contains("{{"), "unexpected action in {line:?}");
            out.push_str(line);
        }
    }
    out
}

/// The base config k3s would put in place of `{{ template "base" . }}`: for containerd 1.x a
/// k3s-generated version 2 config, for 2.x the series' own default (version 3).
fn base_for(series: Series, bins: &Binaries) -> String {
    if series.version().major >= 2 {
        String::from_utf8(bins.config_default().expect("config default")).expect("utf8")
    } else {
        std::fs::read_to_string(fixture("k3s.toml")).expect("k3s fixture")
    }
}

/// Renders `template` with `base`, dumps it with the series' containerd and checks every handler
/// (and runc) is where containerd reads it.
fn assert_dump_has_handlers(
    series: Series,
    bins: &Binaries,
    template: &Path,
    base: &str,
    kata_root: &Path,
) {
    let text = std::fs::read_to_string(template).expect("template");
    let rendered = template.with_extension("rendered.toml");
    std::fs::write(&rendered, render_as_k3s(&text, base)).expect("write rendered");
    let d = dump(bins, &rendered);
    let rts = runtimes(&d, series.runtime_plugin());
    for h in HANDLERS {
        let spec = h.spec(kata_root);
        let t = rts
            .get(h.name())
            .and_then(toml::Value::as_table)
            .unwrap_or_else(|| panic!("{series}: {} missing in the dump of:\n{text}", h.name()));
        assert_eq!(t["runtime_type"].as_str(), Some(spec.runtime_type.as_str()));
        assert_eq!(
            t["options"]["ConfigPath"].as_str(),
            spec.config_path.to_str()
        );
        assert_eq!(t["privileged_without_host_devices"].as_bool(), Some(true));
    }
    assert!(rts.contains_key("runc"), "{series}: runc kept: {rts:?}");
}

/// A template noded creates: `{{ template "base" . }}` + its block, in the file the series' k3s/rke2
/// reads; the dump has the handlers; a second apply writes nothing; revert deletes the file.
fn created_template(series: Series, flavour: Flavour) {
    let Some(bins) = testkit::containerd::require(series) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = configurator(tmp.path(), flavour, &bins);
    let dir = containerd_dir(tmp.path(), flavour);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let expected = dir.join(if series.version().major >= 2 {
        TEMPLATE_V3
    } else {
        TEMPLATE_V2
    });
    let plan = block_on(c.plan(&HANDLERS)).expect("plan");
    assert!(plan.changed && plan.restart_needed, "{plan:?}");
    assert_eq!(plan.files, vec![expected.clone()]);
    assert!(!expected.exists(), "plan writes nothing");

    let change = block_on(c.apply(&HANDLERS)).expect("apply");
    assert!(change.changed && !change.restarted, "{change:?}");
    assert!(change.warning.is_some(), "not restarted: says so");
    let written = std::fs::read_to_string(&expected).expect("template written");
    assert!(written.starts_with(BASE_INCLUDE), "{written}");
    assert_dump_has_handlers(
        series,
        &bins,
        &expected,
        &base_for(series, &bins),
        &c.kata_root,
    );

    let again = block_on(c.apply(&HANDLERS)).expect("re-apply");
    assert!(!again.changed, "{again:?}");
    assert_eq!(std::fs::read_to_string(&expected).expect("read"), written);
    assert_eq!(written.matches("kata-qemu-warm]").count(), 1, "{written}");

    let revert = block_on(c.revert()).expect("revert");
    assert!(revert.changed, "{revert:?}");
    assert!(!expected.exists(), "noded's own template removed");
    let nothing = block_on(c.revert()).expect("second revert");
    assert!(!nothing.changed);
}

per_series! {
    [V1_7, V2_1]
    fn k3s_created_template(series) {
        created_template(series, Flavour::K3s);
    }
}

per_series! {
    [V1_7, V2_1]
    fn rke2_created_template(series) {
        created_template(series, Flavour::Rke2);
    }
}

/// An operator's template (comments, a template comment action, no final newline) keeps every byte;
/// a changed handler set replaces only noded's block; revert gives back the exact original bytes.
fn operator_template(series: Series, flavour: Flavour) {
    let Some(bins) = testkit::containerd::require(series) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = configurator(tmp.path(), flavour, &bins);
    let dir = containerd_dir(tmp.path(), flavour);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (name, plugin) = if series.version().major >= 2 {
        (TEMPLATE_V3, "'io.containerd.cri.v1.runtime'")
    } else {
        (TEMPLATE_V2, "\"io.containerd.grpc.v1.cri\"")
    };
    let path = dir.join(name);
    let original = format!(
        "# operator's template\n{{{{/* keep the base */}}}}\n{BASE_INCLUDE}\n[plugins.{plugin}.containerd.runtimes.'custom']\n  runtime_type = \"io.containerd.runc.v2\""
    );
    std::fs::write(&path, &original).expect("write template");

    block_on(c.apply(&HANDLERS)).expect("apply");
    let written = std::fs::read_to_string(&path).expect("read");
    assert!(written.starts_with(&original), "{written}");
    assert_dump_has_handlers(series, &bins, &path, &base_for(series, &bins), &c.kata_root);

    let fewer = block_on(c.apply(&[KataHandler::Qemu])).expect("apply one");
    assert!(fewer.changed);
    let one = std::fs::read_to_string(&path).expect("read");
    assert!(
        one.starts_with(&original) && !one.contains("kata-qemu-warm"),
        "{one}"
    );

    block_on(c.revert()).expect("revert");
    assert_eq!(
        std::fs::read_to_string(&path).expect("read"),
        original,
        "byte-identical"
    );
}

per_series! {
    [V1_7, V2_1]
    fn k3s_operator_template(series) {
        operator_template(series, Flavour::K3s);
    }
}

per_series! {
    [V1_7, V2_1]
    fn rke2_operator_template(series) {
        operator_template(series, Flavour::Rke2Server);
    }
}

/// Hostile or broken templates: one line naming the file, nothing written (template, state dir).
#[test]
fn hostile_templates_are_refused_before_any_write() {
    let Some(bins) = testkit::containerd::require(Series::V2_1) else {
        return;
    };
    let cases = [
        ("{{ template \"base\" .\n", "never closed"),
        (
            "{{ template \"base\" . }}\n{{ if .NodeConfig.Docker }}\n",
            "never closed with `{{ end }}`",
        ),
        (
            "{{ template \"base\" . }}\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.kata-qemu]\n",
            "`kata-qemu` is already defined",
        ),
        ("x = 1\n# END noded\n", "without its begin marker"),
    ];
    for (text, expect) in cases {
        let tmp = tempfile::tempdir().expect("tempdir");
        let c = configurator(tmp.path(), Flavour::K3s, &bins);
        let dir = containerd_dir(tmp.path(), Flavour::K3s);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let path = dir.join(TEMPLATE_V3);
        std::fs::write(&path, text).expect("write");
        let err = block_on(c.apply(&HANDLERS)).expect_err(text);
        let msg = err.to_string();
        assert!(msg.contains(expect), "{msg}");
        assert!(msg.starts_with(&path.display().to_string()), "{msg}");
        assert_eq!(msg.lines().count(), 1, "{msg}");
        assert!(noded::exit::ExitStatus::exit_code(&err) > 0);
        assert_eq!(std::fs::read_to_string(&path).expect("read"), text);
        assert!(
            !tmp.path().join("var/lib/noded").exists(),
            "no ownership record written"
        );
    }
}

#[test]
fn flavour_is_a_typed_setting_with_the_distributions_defaults() {
    let c = NodedConfig::parse(Path::new("n.toml"), "[containerd]\nflavour = \"rke2\"\n")
        .expect("rke2");
    assert_eq!(
        c.containerd.config,
        Path::new("/var/lib/rancher/rke2/agent/etc/containerd/config.toml")
    );
    assert_eq!(
        c.containerd.socket,
        Path::new("/run/k3s/containerd/containerd.sock")
    );
    let custom = NodedConfig::parse(
        Path::new("n.toml"),
        "[containerd]\nflavour = \"k3s\"\nconfig = \"/data/k3s/agent/etc/containerd/config.toml\"\n",
    )
    .expect("custom data dir");
    assert_eq!(
        custom.containerd.config,
        Path::new("/data/k3s/agent/etc/containerd/config.toml")
    );
    let err = NodedConfig::parse(
        Path::new("n.toml"),
        "[containerd]\nflavour = \"k3s\"\nprivate = true\n",
    )
    .expect_err("k3s and local mode");
    assert!(err.to_string().contains("containerd.private"), "{err}");
    let err = NodedConfig::parse(Path::new("n.toml"), "[containerd]\nflavour = \"k3z\"\n")
        .expect_err("unknown flavour");
    let msg = err.to_string();
    assert!(
        msg.contains("containerd.flavour") && msg.contains("k3z"),
        "{msg}"
    );
    assert_eq!(msg.lines().count(), 1, "{msg}");
}

/// root, dbus-daemon and the series: None (skip) when missing, a failure under CI=true.
fn restart_components(series: Series) -> Option<(PathBuf, Binaries)> {
    if !nix::unistd::geteuid().is_root() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "test needs root (CI=true: failing instead of skipping)"
        );
        eprintln!("SKIP: not root");
        return None;
    }
    let bins = testkit::containerd::require(series)?;
    Some((require_dbus_daemon()?, bins))
}

/// apply restarts the flavour's unit through systemd's D-Bus API; the fake systemd's restart does what
/// the unit does (render the template into containerd's config, restart containerd); the handlers are
/// then served; revert restarts the same unit and they are gone.
async fn restart_through_the_unit(series: Series, flavour: Flavour) {
    let Some((dbus_daemon, bins)) = restart_components(series) else {
        return;
    };
    let ctrd = testkit::containerd::start(series, PAUSE_IMAGE)
        .await
        .expect("private containerd starts");
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("etc-containerd");
    std::fs::create_dir_all(&dir).expect("mkdir");
    let base = tmp.path().join("base.toml");
    std::fs::copy(ctrd.config_path(), &base).expect("keep the base config");
    // The unit's start: the v3 template, else the v2 one, else the built-in config; then containerd.
    let restart = format!(
        "T={d}/{TEMPLATE_V3}; [ -f \"$T\" ] || T={d}/{TEMPLATE_V2}; \
         if [ -f \"$T\" ]; then sed -e '/^{{{{ template \"base\" \\. }}}}$/{{r {b}' -e 'd}}' \"$T\" > {cfg}; \
         else cp {b} {cfg}; fi && {r}",
        d = dir.display(),
        b = base.display(),
        cfg = ctrd.config_path().display(),
        r = ctrd.restart_command(),
    );
    let bus = SystemdBus::start(
        &dbus_daemon,
        &testkit::bins::testkit_bin("fake-systemd").expect("fake-systemd"),
        flavour.unit(),
        &restart,
    )
    .expect("dbus-daemon + fake-systemd");
    let host_root = tmp.path().join("host");
    std::fs::create_dir(&host_root).expect("host root");
    let target = SystemdTarget {
        bus: Some(bus.address().to_owned()),
        host_root,
        timeout: Duration::from_secs(60),
        // Aimed at the flavour's unit by the configurator.
        ..SystemdTarget::default()
    };
    let c = EmbeddedContainerd {
        flavour,
        dir: dir.clone(),
        socket: Some(ctrd.socket().to_path_buf()),
        listen: ctrd.socket().to_path_buf(),
        binary: bins.containerd.clone(),
        kata_root: PathBuf::from("/opt/kata"),
        custom: Vec::new(),
        state_dir: tmp.path().join("state"),
        restart: noded::containerd::embedded::restart_for(
            &Restart::Systemd(target),
            flavour.unit(),
        ),
        // Asked: the embedded containerd's Version API on its socket.
        version: None,
    };
    let version = c.version().await.expect("version over the socket");
    assert!(
        version.starts_with(&format!("{}.", series.version().major)),
        "{version}"
    );
    let pid_before = ctrd.containerd_pid();

    let change = c
        .apply(&HANDLERS)
        .await
        .unwrap_or_else(|e| panic!("apply: {e}\n{}", ctrd.log_tail(20)));
    assert!(
        change.changed && change.restarted && change.verified,
        "{change:?}"
    );
    let calls = vec![(flavour.unit().to_owned(), "replace".to_owned())];
    assert_eq!(
        bus.systemd.restart_calls(),
        calls,
        "{:?}",
        bus.systemd.log_lines()
    );
    assert_ne!(ctrd.containerd_pid(), pid_before, "containerd restarted");

    let again = c.apply(&HANDLERS).await.expect("re-apply");
    assert!(!again.changed && !again.restarted, "{again:?}");
    assert_eq!(
        bus.systemd.restart_calls().len(),
        1,
        "no restart without a change"
    );

    let revert = c.revert().await.expect("revert");
    assert!(revert.changed && revert.restarted, "{revert:?}");
    assert_eq!(bus.systemd.restart_calls().len(), 2);
    let mut cri = noded::cri::wait_ready(ctrd.socket(), Duration::from_secs(30))
        .await
        .expect("CRI ready");
    let status = noded::containerd::cri_plugin::status(&mut cri)
        .await
        .expect("CRI status");
    assert!(
        !status.handlers.contains_key("kata-qemu"),
        "{:?}",
        status.handlers.keys()
    );
    assert!(status.handlers.contains_key("runc"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn k3s_agent_restart_on_containerd_2_1() {
    restart_through_the_unit(Series::V2_1, Flavour::K3s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rke2_agent_restart_on_containerd_1_7() {
    restart_through_the_unit(Series::V1_7, Flavour::Rke2).await;
}

/// A full template without the base include (an operator's copy of a version 2 config) in the v3
/// file: noded's tables follow the template's own `version = 2`, and containerd 2.1 reads them.
#[test]
fn a_full_version_2_template_gets_version_2_tables() {
    let series = Series::V2_1;
    let Some(bins) = testkit::containerd::require(series) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = configurator(tmp.path(), Flavour::K3s, &bins);
    let dir = containerd_dir(tmp.path(), Flavour::K3s);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let path = dir.join(TEMPLATE_V3);
    let original = std::fs::read_to_string(fixture("k3s.toml")).expect("fixture");
    std::fs::write(&path, &original).expect("write");
    block_on(c.apply(&HANDLERS)).expect("apply");
    let written = std::fs::read_to_string(&path).expect("read");
    assert!(
        written.contains("[plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.kata-qemu]"),
        "{written}"
    );
    assert_dump_has_handlers(series, &bins, &path, "", &c.kata_root);
    block_on(c.revert()).expect("revert");
    assert_eq!(std::fs::read_to_string(&path).expect("read"), original);
}

/// containerd 2.x reads the v2 template only while no v3 template exists: when one appears, noded's
/// tables move there and its block leaves the v2 template (whose bytes are the operator's again).
#[test]
fn a_new_v3_template_takes_over_from_the_v2_one() {
    let Some(bins) = testkit::containerd::require(Series::V2_1) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = configurator(tmp.path(), Flavour::Rke2, &bins);
    let dir = containerd_dir(tmp.path(), Flavour::Rke2);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let (v2, v3) = (dir.join(TEMPLATE_V2), dir.join(TEMPLATE_V3));
    let v2_original = format!("{BASE_INCLUDE}# operator's v2 additions\n");
    std::fs::write(&v2, &v2_original).expect("write v2");
    block_on(c.apply(&HANDLERS)).expect("apply into v2");
    assert!(
        std::fs::read_to_string(&v2)
            .expect("v2")
            .contains("kata-qemu")
    );
    assert!(!v3.exists());

    std::fs::write(&v3, BASE_INCLUDE).expect("operator adds v3");
    let change = block_on(c.apply(&HANDLERS)).expect("apply into v3");
    assert!(change.changed, "{change:?}");
    assert_eq!(change.files, vec![v3.clone(), v2.clone()]);
    assert_eq!(std::fs::read_to_string(&v2).expect("v2"), v2_original);
    assert_dump_has_handlers(
        Series::V2_1,
        &bins,
        &v3,
        &base_for(Series::V2_1, &bins),
        &c.kata_root,
    );
    assert!(!block_on(c.apply(&HANDLERS)).expect("again").changed);
    block_on(c.revert()).expect("revert");
    assert_eq!(std::fs::read_to_string(&v3).expect("v3"), BASE_INCLUDE);
    assert_eq!(std::fs::read_to_string(&v2).expect("v2"), v2_original);
}

/// A handler with a snapshotter (kata-fc: devmapper) in a k3s template: containerd 1.7 reads it from
/// the runtime table; 2.1 from the runtime table and the images plugin's `runtime_platforms`, both
/// in noded's block. Revert takes both away.
fn snapshotter_in_the_template(series: Series) {
    let Some(bins) = testkit::containerd::require(series) else {
        return;
    };
    let handlers = [KataHandler::Qemu, KataHandler::Fc];
    let tmp = tempfile::tempdir().expect("tempdir");
    let c = configurator(tmp.path(), Flavour::K3s, &bins);
    let dir = containerd_dir(tmp.path(), Flavour::K3s);
    std::fs::create_dir_all(&dir).expect("mkdir");
    block_on(c.apply(&handlers)).expect("apply");
    let template = dir.join(if series.version().major >= 2 {
        TEMPLATE_V3
    } else {
        TEMPLATE_V2
    });
    let text = std::fs::read_to_string(&template).expect("template");
    let rendered = template.with_extension("rendered.toml");
    std::fs::write(&rendered, render_as_k3s(&text, &base_for(series, &bins))).expect("write");
    let d = dump(&bins, &rendered);
    let fc = &runtimes(&d, series.runtime_plugin())["kata-fc"];
    assert_eq!(fc["snapshotter"].as_str(), Some("devmapper"), "{text}");
    let platform = d["plugins"]
        .get("io.containerd.cri.v1.images")
        .and_then(|i| i.get("runtime_platforms"))
        .and_then(|p| p.get("kata-fc"));
    if series.version().major >= 2 {
        let platform =
            platform.unwrap_or_else(|| panic!("no runtime_platforms.kata-fc in:\n{text}"));
        assert_eq!(platform["snapshotter"].as_str(), Some("devmapper"));
    } else {
        assert!(platform.is_none(), "1.7 has no images plugin entry");
    }
    block_on(c.revert()).expect("revert");
    assert!(!template.exists(), "noded's own template removed");
}

per_series! {
    [V1_7, V2_1]
    fn snapshotter_reaches_the_embedded_containerd(series) {
        snapshotter_in_the_template(series);
    }
}

/// noded.toml's `[[handlers]]` reach the embedded containerd too: the block registers them after the
/// presets, and the series' dump has them (a handler without settings points at the shipped file; one
/// with settings at noded's own copy).
fn custom_handlers_in_the_template(series: Series) {
    let Some(bins) = testkit::containerd::require(series) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let text = "[containerd]\nflavour = \"k3s\"\n[daemon]\ndata_dir = \"/var/lib/noded\"\n\n\
                [[handlers]]\nname = \"kata-clh-plain\"\nhypervisor = \"clh\"\n\n\
                [[handlers]]\nname = \"kata-qemu-big\"\nhypervisor = \"qemu\"\ndefault_vcpus = 4\n";
    let config = NodedConfig::parse(Path::new("noded.toml"), text).expect("noded.toml");
    let access = Access {
        root: Some(tmp.path().to_path_buf()),
        ..Access::default()
    };
    let mut c = EmbeddedContainerd::new(&config, &access, Flavour::K3s);
    c.version = Some(bins.detect_version().expect("containerd --version"));
    let dir = containerd_dir(tmp.path(), Flavour::K3s);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let change = block_on(c.apply(&HANDLERS)).expect("apply");
    for name in ["kata-clh-plain", "kata-qemu-big"] {
        assert!(change.handlers.iter().any(|h| h == name), "{change:?}");
    }
    let template = dir.join(if series.version().major >= 2 {
        TEMPLATE_V3
    } else {
        TEMPLATE_V2
    });
    let written = std::fs::read_to_string(&template).expect("template");
    let rendered = template.with_extension("rendered.toml");
    std::fs::write(&rendered, render_as_k3s(&written, &base_for(series, &bins))).expect("write");
    let d = dump(&bins, &rendered);
    let rts = runtimes(&d, series.runtime_plugin());
    for spec in &c.custom {
        let t = rts
            .get(&spec.name)
            .and_then(toml::Value::as_table)
            .unwrap_or_else(|| {
                panic!("{series}: {} missing in the dump of:\n{written}", spec.name)
            });
        assert_eq!(
            t["options"]["ConfigPath"].as_str(),
            spec.config_path.to_str(),
            "{}",
            spec.name
        );
    }
    let plain = c
        .custom
        .iter()
        .find(|s| s.name == "kata-clh-plain")
        .expect("plain");
    let big = c
        .custom
        .iter()
        .find(|s| s.name == "kata-qemu-big")
        .expect("big");
    assert!(
        plain.config_path.ends_with("configuration-clh.toml"),
        "{plain:?}"
    );
    assert!(
        big.config_path
            .to_string_lossy()
            .contains("/noded/kata-qemu-big/"),
        "{big:?}"
    );
    assert!(rts.contains_key("kata-qemu"), "presets kept");
}

per_series! {
    [V1_7, V2_1]
    fn custom_handlers_reach_the_embedded_containerd(series) {
        custom_handlers_in_the_template(series);
    }
}
