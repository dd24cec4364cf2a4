//! Issue 14 on the node's own path, once per containerd series (1.6, 1.7, 2.1): the AMI bakes the
//! preset set the AMI ships (kata-qemu, kata-qemu-warm, kata-clh), `[[handlers]]` with Kata settings,
//! and a canary Kata release in its own root (`installer bake --kata-root /opt/kata-3.28`);
//! `installer boot` runs before the node's containerd; the DaemonSet pod, rendered with the
//! `kata-canary` Component by `kubectl kustomize`, probes every handler and lifts the taint. The fake
//! Kata shim records, per sandbox, which configuration and drop-ins it would read and (by the
//! release its binary lives in) which Kata ran it. Then the canary is retired the way an operator
//! does it: re-bake without its handler, boot, `uninstall --kata-root`; the main release and the
//! other handlers keep working; a full uninstall leaves no Kata.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use noded::containerd::cri_plugin;
use noded::cri::probe::{ProbeOptions, probe};
use noded::cri::{CriClient, PodSpec};
use testkit::containerd::Series;
use testkit::fake_kata::FakeKata;
use testkit::nodebox::NodeBox;
use testkit::scenario::{Booted, boot_baked, daemonset_with_components, kata_tarball};

const CANARY: &str = "/opt/kata-3.28";
const PRESETS: [&str; 3] = ["kata-qemu", "kata-qemu-warm", "kata-clh"];
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The operator's `[[handlers]]`: one tuned on the main release, one on the canary.
fn handlers(with_canary: bool) -> String {
    let mut s = String::from(
        r#"[[handlers]]
name = "kata-qemu-tuned"
hypervisor = "qemu"
default_vcpus = 2
default_memory = 3072
enable_debug = true
enable_annotations = ["default_memory"]
kernel_params = "quiet"
agent_https_proxy = "http://proxy.internal:3128"
[handlers.kata.agent.kata]
dial_timeout = 90
"#,
    );
    if with_canary {
        s.push_str(&format!(
            "\n[[handlers]]\nname = \"kata-qemu-328\"\nhypervisor = \"qemu\"\nkata_root = \"{CANARY}\"\ndefault_memory = 1024\n"
        ));
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_in_a_box_handlers_containerd_1_6() {
    run(Series::V1_6).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_in_a_box_handlers_containerd_1_7() {
    run(Series::V1_7).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_in_a_box_handlers_containerd_2_1() {
    run(Series::V2_1).await;
}

/// Inputs of the AMI build, kept for the re-bake that retires the canary.
struct Ami {
    tarball: String,
    sha: String,
}

fn bake_main(nodebox: &NodeBox, installer: &Path, ami: &Ami, handlers_file: &Path) -> Result<()> {
    nodebox.installer(
        installer,
        &[
            "bake",
            "--kata-tarball",
            &ami.tarball,
            "--sha256",
            &ami.sha,
            "--nodeadm",
            "never",
            "--runtimes",
            &PRESETS.join(","),
            "--handlers",
            &handlers_file.to_string_lossy(),
        ],
    )?;
    Ok(())
}

async fn run(series: Series) {
    let Some((bins, archive)) = testkit::scenario::box_prerequisites(series) else {
        return;
    };
    if testkit::require::require("kubectl").is_none() {
        return;
    }
    let mut main_ami = None;
    let b = boot_baked(series, bins, &archive, |nodebox, installer, dir| {
        let (tarball, sha) = kata_tarball(dir, "3.99.0-box")?;
        let ami = Ami {
            tarball: tarball.to_string_lossy().into_owned(),
            sha,
        };
        let file = dir.join("handlers.toml");
        std::fs::write(&file, handlers(true))?;
        bake_main(nodebox, installer, &ami, &file)?;
        // The canary: another build of the release, packed for /opt/kata like every Kata tarball.
        let canary_dir = dir.join("canary");
        std::fs::create_dir_all(&canary_dir)?;
        let (canary, canary_sha) = kata_tarball(&canary_dir, "3.28.0-canary")?;
        let report = nodebox.installer(
            installer,
            &[
                "bake",
                "--kata-root",
                CANARY,
                "--kata-tarball",
                &canary.to_string_lossy(),
                "--sha256",
                &canary_sha,
            ],
        )?;
        ensure!(
            report["kata_version"] == "3.28.0-canary",
            "canary bake: {report}"
        );
        main_ami = Some(ami);
        Ok(())
    })
    .await
    .expect("box boots");
    let ami = main_ami.expect("bake ran");
    if let Err(e) = Box::pin(scenario(&b, &ami)).await {
        panic!(
            "{series}: {e:#}\n--- containerd log ---\n{}",
            testkit::nodebox::tail(&b.nodebox.containerd_log(), 40),
        );
    }
}

/// Creates the fake shim of the release at `root` recorded: config path → drop-ins it would merge.
fn creates(b: &Booted, root: &str) -> BTreeMap<String, Vec<String>> {
    FakeKata {
        root: b.nodebox.path(root),
    }
    .shim_creates()
    .iter()
    .filter_map(|c| {
        let path = c["config_path"].as_str()?.to_owned();
        let dropins = c["dropins"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|d| d.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        Some((path, dropins))
    })
    .collect()
}

fn toml_at(b: &Booted, node_path: &str) -> Result<toml::Table> {
    let text = std::fs::read_to_string(b.nodebox.path(node_path))
        .with_context(|| format!("read {node_path}"))?;
    text.parse()
        .with_context(|| format!("{node_path} is not TOML"))
}

async fn scenario(b: &Booted, ami: &Ami) -> Result<()> {
    let api = &b.outside.api;
    let socket = b.nodebox.containerd_socket();
    let tuned_dir = "/opt/kata/share/defaults/kata-containers/noded/kata-qemu-tuned";
    let canary_dir = format!("{CANARY}/share/defaults/kata-containers/noded/kata-qemu-328");

    // 0. Boot wrote every handler into containerd's config before containerd started.
    let mut cri = CriClient::connect(&socket).await?;
    let status = cri_plugin::status(&mut cri).await?;
    for h in PRESETS.iter().chain(&["kata-qemu-tuned", "kata-qemu-328"]) {
        ensure!(
            status.handlers.contains_key(*h),
            "containerd did not load {h}: {:?}",
            status.handlers.keys()
        );
    }
    // The canary's release names its own prefix (relocated at bake), never the main release's.
    let canary_cfg = std::fs::read_to_string(b.nodebox.path(format!(
        "{CANARY}/share/defaults/kata-containers/configuration-qemu.toml"
    )))?;
    ensure!(
        canary_cfg.contains("\"/opt/kata-3.28/bin/qemu-system-x86_64\"")
            && !canary_cfg.contains("/opt/kata/"),
        "canary configuration not relocated:\n{canary_cfg}"
    );

    // 1. The DaemonSet (base + kata-canary Component) lifts the taint once every handler passed.
    let manifest = daemonset_with_components(b.outside.dir.path(), &["kata-canary"])?;
    let mut pod = b.pod_from(&manifest, None)?;
    pod.start().await?;
    b.wait_taint_lifted(BOOT_TIMEOUT)
        .await
        .with_context(|| format!("noded log:\n{}", testkit::nodebox::tail(&pod.logs(), 40)))?;
    pod.wait_ready(Duration::from_secs(30)).await?;

    // 2. Each handler's sandbox read its own configuration and drop-ins, from its own release.
    let main = creates(b, "/opt/kata");
    let kata_defaults = "/opt/kata/share/defaults/kata-containers";
    for (config, dropins) in [
        (format!("{kata_defaults}/configuration-qemu.toml"), vec![]),
        (
            format!("{kata_defaults}/configuration-qemu-warm.toml"),
            vec![],
        ),
        (format!("{kata_defaults}/configuration-clh.toml"), vec![]),
        (
            format!("{tuned_dir}/configuration-qemu.toml"),
            vec![format!("{tuned_dir}/config.d/50-noded.toml")],
        ),
    ] {
        ensure!(
            main.get(&config) == Some(&dropins),
            "main release: no sandbox with {config} and drop-ins {dropins:?}; recorded: {main:?}"
        );
    }
    ensure!(
        !main.keys().any(|k| k.starts_with(CANARY)),
        "the main release's shim ran a canary handler: {main:?}"
    );
    let canary = creates(b, CANARY);
    let canary_config = format!("{canary_dir}/configuration-qemu.toml");
    ensure!(
        canary.get(&canary_config) == Some(&vec![format!("{canary_dir}/config.d/50-noded.toml")]),
        "canary release: no sandbox with {canary_config}; recorded: {canary:?}"
    );
    ensure!(
        canary.len() == 1,
        "the canary's shim ran other handlers: {canary:?}"
    );

    // 3. What the drop-ins say is what noded.toml said; Kata's own files are as shipped.
    let tuned = toml_at(b, &format!("{tuned_dir}/config.d/50-noded.toml"))?;
    let qemu = &tuned["hypervisor"]["qemu"];
    ensure!(
        qemu["default_vcpus"].as_integer() == Some(2)
            && qemu["default_memory"].as_integer() == Some(3072)
            && qemu["enable_debug"].as_bool() == Some(true)
            && qemu["enable_annotations"][0].as_str() == Some("default_memory")
            && qemu["kernel_params"]
                .as_str()
                .is_some_and(|k| k.ends_with("quiet agent.https_proxy=http://proxy.internal:3128"))
            && tuned["agent"]["kata"]["dial_timeout"].as_integer() == Some(90)
            && tuned["agent"]["kata"]["enable_debug"].as_bool() == Some(true)
            && tuned["runtime"]["enable_debug"].as_bool() == Some(true),
        "kata-qemu-tuned drop-in: {tuned}"
    );
    let canary_dropin = toml_at(b, &format!("{canary_dir}/config.d/50-noded.toml"))?;
    ensure!(
        canary_dropin["hypervisor"]["qemu"]["default_memory"].as_integer() == Some(1024),
        "kata-qemu-328 drop-in: {canary_dropin}"
    );
    let shipped = std::fs::read_to_string(
        b.nodebox
            .path(format!("{kata_defaults}/configuration-qemu.toml")),
    )?;
    ensure!(
        shipped == testkit::fake_kata::QEMU_CONFIG.replace("@ROOT@", "/opt/kata"),
        "Kata's shipped configuration-qemu.toml was edited"
    );
    // containerd's entries carry kata-deploy's annotations.
    let cfg_text = std::fs::read_to_string(b.nodebox.path("/etc/containerd/config.toml"))?;
    let dropin_text =
        std::fs::read_to_string(b.nodebox.path("/etc/containerd/config.d/noded-kata.toml"))
            .unwrap_or_default();
    ensure!(
        [cfg_text.as_str(), dropin_text.as_str()]
            .iter()
            .any(|t| t.contains(noded::containerd::handler::CONTAINER_ANNOTATION)),
        "no container_annotations in containerd's config"
    );
    {
        let st = api.state();
        for rc in PRESETS.iter().chain(&["kata-qemu-tuned", "kata-qemu-328"]) {
            ensure!(
                st.runtime_classes.contains_key(*rc),
                "RuntimeClass {rc} not published: {:?}",
                st.runtime_classes.keys()
            );
        }
    }

    // 4. A workload on the canary runs from the canary's shim.
    let before = creates(b, CANARY).len();
    let mut workload = PodSpec::unique("canary-workload", "kata-qemu-328");
    workload.host_network = true;
    let id = cri.run_pod(&workload, Duration::from_secs(60)).await?;
    ensure!(
        testkit::nodebox::sandbox_ready(&mut cri, &id).await?,
        "canary workload sandbox not ready"
    );
    let after = FakeKata {
        root: b.nodebox.path(CANARY),
    }
    .shim_creates()
    .len();
    ensure!(
        after > before,
        "the canary workload did not run on the canary's shim"
    );
    cri.remove_pod(&id, Duration::from_secs(30)).await?;
    pod.delete().await?;

    // 5. Retire the canary: re-bake without its handler (a new AMI, or in place), boot (containerd
    //    stopped, as at a node boot), uninstall exactly that release.
    let installer = b.installer_copy()?;
    let file = b.outside.dir.path().join("handlers-no-canary.toml");
    std::fs::write(&file, handlers(false))?;
    b.nodebox.stop_containerd()?;
    bake_main(&b.nodebox, &installer, ami, &file)?;
    testkit::scenario::point_kata_at_box(&b.nodebox)?;
    b.nodebox
        .installer(&b.nodebox.path("/usr/local/bin/installer"), &["boot"])?;
    let refused = b
        .nodebox
        .command(&installer)
        .args(["--root", "/", "uninstall", "--kata-root", "/opt/kata"])
        .output()?;
    ensure!(
        refused.status.code() == Some(2),
        "uninstall --kata-root /opt/kata must be refused: {refused:?}"
    );
    b.nodebox
        .installer(&installer, &["uninstall", "--kata-root", CANARY])?;
    ensure!(!b.nodebox.path(CANARY).exists(), "{CANARY} left");
    ensure!(
        !b.nodebox
            .path("/usr/local/bin/containerd-shim-kata-qemu-328-v2")
            .exists(),
        "the canary's shim link is left"
    );
    b.nodebox.start_containerd().await?;
    let mut cri = CriClient::connect(&socket).await?;
    let status = cri_plugin::status(&mut cri).await?;
    ensure!(
        !status.handlers.contains_key("kata-qemu-328"),
        "containerd still has the canary handler"
    );
    for h in ["kata-qemu-tuned", "kata-clh"] {
        let outcome = probe(&socket, h, &ProbeOptions::sandbox_only()).await;
        ensure!(outcome.ok, "{h} after the canary's removal: {outcome:?}");
    }

    // 6. Full uninstall: no Kata left, runc pods still run.
    b.uninstall_leaves_runc(&[
        "/opt/kata",
        "/usr/local/bin/containerd-shim-kata-clh-v2",
        "/usr/local/bin/containerd-shim-kata-qemu-tuned-v2",
        "/etc/noded/noded.toml",
    ])
    .await?;
    Ok(())
}
