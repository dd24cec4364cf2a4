//! `[[handlers]]` end to end under a real private containerd: two handlers sharing Kata's
//! configuration-qemu.toml, each with its own settings, run a pod through the fake Kata shim, which
//! records the ConfigPath it got and the `config.d` drop-ins Kata would merge over it. Each handler
//! sees its own copy and only its own drop-in; the kata-qemu preset sees the shipped file and none.

use std::path::Path;
use std::time::Duration;

use noded::config::NodedConfig;
use noded::containerd::apply::{self, Request};
use noded::containerd::handler::KataHandler;
use noded::containerd::image::{self, DEFAULT_BUSYBOX, PAUSE_IMAGE};
use noded::containerd::restart::Restart;
use noded::cri::{CriClient, PodSpec};
use noded::kata::handlers;
use testkit::containerd::{self as series_ctrd, Series};
use testkit::fake_kata::FakeKata;

const SHIM: &str = env!("CARGO_BIN_EXE_fake-kata-shim");
const TIMEOUT: Duration = Duration::from_secs(60);

fn prerequisites() -> bool {
    testkit::require::require_runc_pods()
}

async fn handlers_read_their_own_dropins(series: Series) {
    if !prerequisites() {
        return;
    }
    let Some(bins) = series_ctrd::require(series) else {
        return;
    };
    let ctrd = series_ctrd::start(series, PAUSE_IMAGE)
        .await
        .unwrap_or_else(|e| panic!("{series}: start containerd: {e:#}"));
    let tmp = tempfile::tempdir().expect("tempdir");
    let kata_root = tmp.path().join("opt/kata");
    let kata = FakeKata::write_with_shim(&kata_root, &kata_root, "3.18.0", Path::new(SHIM));
    let data = tmp.path().join("data");
    let config = NodedConfig::parse(
        Path::new("/etc/noded/noded.toml"),
        &format!(
            "[daemon]\ndata_dir = \"{}\"\n[containerd]\nkata_root = \"{}\"\nruntimes = [\"kata-qemu\"]\n\
             [[handlers]]\nname = \"kata-qemu-a\"\nhypervisor = \"qemu\"\ndefault_vcpus = 2\n\
             [[handlers]]\nname = \"kata-qemu-b\"\nhypervisor = \"qemu\"\ndefault_memory = 4096\n",
            data.display(),
            kata_root.display()
        ),
    )
    .expect("config");
    let written = handlers::apply(
        &config.handlers,
        &config.containerd.kata_root,
        &data.join(handlers::STATE_FILE),
    )
    .expect("drop-ins");
    assert_eq!(written.written.len(), 4, "{written:?}");
    // containerd 1.6 ignores runtime_path: the shim must be found by its per-handler name.
    for name in ["kata-qemu", "kata-qemu-a", "kata-qemu-b"] {
        kata.link_shim_as(name, &ctrd.layout().bin);
    }
    image::ensure_local_images(ctrd.socket(), Path::new(DEFAULT_BUSYBOX))
        .await
        .expect("import images");
    let req = Request {
        config: ctrd.config_path().to_path_buf(),
        handlers: vec![KataHandler::Qemu],
        custom: config
            .handlers
            .iter()
            .map(|h| h.spec(&config.containerd.kata_root))
            .collect(),
        kata_root: kata_root.clone(),
        state_dir: tmp.path().join("state"),
        adopt: false,
        containerd_version: None,
        containerd_binary: bins.containerd.clone(),
        socket: Some(ctrd.socket().to_path_buf()),
    };
    let report = apply::apply(&req, &Restart::Command(ctrd.restart_command()))
        .await
        .unwrap_or_else(|e| panic!("{series}: apply: {e}\n{}", ctrd.log_tail(30)));
    assert!(
        report.restarted && report.verified,
        "{series}: handlers not loaded: {report:?}"
    );

    let mut cri = CriClient::connect(ctrd.socket()).await.expect("CRI");
    let defaults = kata_root.join("share/defaults/kata-containers");
    let expect = [
        ("kata-qemu", defaults.join("configuration-qemu.toml"), None),
        (
            "kata-qemu-a",
            defaults.join("noded/kata-qemu-a/configuration-qemu.toml"),
            Some(defaults.join("noded/kata-qemu-a/config.d/50-noded.toml")),
        ),
        (
            "kata-qemu-b",
            defaults.join("noded/kata-qemu-b/configuration-qemu.toml"),
            Some(defaults.join("noded/kata-qemu-b/config.d/50-noded.toml")),
        ),
    ];
    for (handler, config_path, dropin) in &expect {
        let pod = PodSpec::unique("handlers", handler);
        let sandbox = cri
            .run_pod(&pod, TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("{series}: {handler}: {e}\n{}", ctrd.log_tail(30)));
        let creates = kata.shim_creates();
        let create = creates
            .iter()
            .find(|c| c["id"] == sandbox.as_str())
            .unwrap_or_else(|| panic!("{series}: {handler}: no Create recorded: {creates:?}"));
        assert_eq!(
            create["config_path"],
            config_path.display().to_string(),
            "{series}: {handler}"
        );
        let dropins: Vec<String> = dropin.iter().map(|d| d.display().to_string()).collect();
        assert_eq!(
            create["dropins"],
            serde_json::json!(dropins),
            "{series}: {handler}"
        );
        assert!(create["error"].is_null(), "{create}");
        cri.remove_pod(&sandbox, TIMEOUT)
            .await
            .expect("stop and remove the pod");
    }
    kata.wait_no_shim("the sandboxes were removed").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_read_their_own_dropins_on_containerd_1_6() {
    Box::pin(handlers_read_their_own_dropins(Series::V1_6)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_read_their_own_dropins_on_containerd_1_7() {
    Box::pin(handlers_read_their_own_dropins(Series::V1_7)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handlers_read_their_own_dropins_on_containerd_2_1() {
    Box::pin(handlers_read_their_own_dropins(Series::V2_1)).await;
}
