//! `[[handlers]]` drop-ins on a fake Kata root: two handlers sharing one shipped configuration each
//! get their own copy and `config.d/`, Kata's own files stay byte-identical, a second apply writes
//! nothing, a bad key writes nothing, and revert leaves the tree exactly as the release shipped it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use noded::config::NodedConfig;
use noded::kata::handlers::{self, STATE_FILE};
use testkit::fake_kata::FakeKata;

/// Every file under `dir` (symlinks as their target) with its bytes: what "byte-identical" means.
fn tree(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read_dir").flatten() {
            let p = e.path();
            let ft = e.file_type().expect("file type");
            if ft.is_dir() {
                out.insert(p.clone(), b"<dir>".to_vec());
                stack.push(p);
            } else if ft.is_symlink() {
                let target = std::fs::read_link(&p).expect("readlink");
                out.insert(p, target.into_os_string().into_encoded_bytes());
            } else {
                out.insert(p.clone(), std::fs::read(&p).expect("read"));
            }
        }
    }
    out
}

fn config(kata_root: &Path, data_dir: &Path, handlers: &str) -> NodedConfig {
    let text = format!(
        "[daemon]\ndata_dir = \"{}\"\n[containerd]\nkata_root = \"{}\"\nruntimes = [\"kata-qemu\"]\n{handlers}",
        data_dir.display(),
        kata_root.display()
    );
    NodedConfig::parse(Path::new("/etc/noded/noded.toml"), &text).expect("config")
}

const TWO: &str = r#"
[[handlers]]
name = "kata-qemu-big"
hypervisor = "qemu"
default_vcpus = 4
default_memory = 8192
agent_https_proxy = "http://proxy.internal:3128"
agent_no_proxy = "10.0.0.0/8"
[handlers.kata.hypervisor.qemu]
machine_type = "microvm"

[[handlers]]
name = "kata-qemu-dbg"
hypervisor = "qemu"
enable_debug = true

[[handlers]]
name = "kata-clh-plain"
hypervisor = "clh"
"#;

#[test]
fn dropins_per_handler_no_rewrite_and_byte_identical_revert() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("opt/kata");
    FakeKata::write(&root, &root, "3.18.0");
    let data = tmp.path().join("var/lib/noded");
    let shipped = tree(&root);
    let c = config(&root, &data, TWO);
    let state = data.join(STATE_FILE);

    let first = handlers::apply(&c.handlers, &c.containerd.kata_root, &state).expect("apply");
    let noded_dir = root.join("share/defaults/kata-containers/noded");
    let big = noded_dir.join("kata-qemu-big");
    let dbg = noded_dir.join("kata-qemu-dbg");
    assert_eq!(
        first.written,
        vec![
            big.join("config.d/50-noded.toml"),
            big.join("configuration-qemu.toml"),
            dbg.join("config.d/50-noded.toml"),
            dbg.join("configuration-qemu.toml"),
        ]
    );
    // A handler without settings uses the shipped file: no copy, no drop-in.
    assert_eq!(
        c.handlers[2].spec(&root).config_path,
        root.join("share/defaults/kata-containers/configuration-clh.toml")
    );
    assert_eq!(
        c.handlers[0].spec(&root).config_path,
        big.join("configuration-qemu.toml")
    );
    // Kata's own files are untouched; the copies are the shipped bytes.
    let after = tree(&root);
    for (p, bytes) in &shipped {
        assert_eq!(after.get(p), Some(bytes), "{} changed", p.display());
    }
    let shipped_qemu = root.join("share/defaults/kata-containers/configuration-qemu.toml");
    assert_eq!(
        std::fs::read(big.join("configuration-qemu.toml")).expect("copy"),
        std::fs::read(&shipped_qemu).expect("shipped")
    );
    // Each handler reads only its own settings.
    let big_dropin: toml::Table =
        toml::from_str(&std::fs::read_to_string(big.join("config.d/50-noded.toml")).expect("read"))
            .expect("toml");
    let q = &big_dropin["hypervisor"]["qemu"];
    assert_eq!(q["default_vcpus"].as_integer(), Some(4));
    assert_eq!(q["machine_type"].as_str(), Some("microvm"));
    assert_eq!(
        q["kernel_params"].as_str(),
        Some("agent.https_proxy=http://proxy.internal:3128 agent.no_proxy=10.0.0.0/8")
    );
    assert!(big_dropin.get("runtime").is_none());
    let dbg_dropin: toml::Table =
        toml::from_str(&std::fs::read_to_string(dbg.join("config.d/50-noded.toml")).expect("read"))
            .expect("toml");
    assert_eq!(dbg_dropin["runtime"]["enable_debug"].as_bool(), Some(true));
    assert_eq!(
        dbg_dropin["hypervisor"]["qemu"]["enable_debug"].as_bool(),
        Some(true)
    );
    assert!(
        dbg_dropin["hypervisor"]["qemu"]
            .get("default_vcpus")
            .is_none()
    );
    // Atomic writes leave no temp file behind.
    for (p, _) in tree(&noded_dir) {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        assert!(
            !name.starts_with(".noded-tmp"),
            "temp left: {}",
            p.display()
        );
    }

    // Again: nothing written, same inode (no rename).
    let ino = |p: &Path| std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(p).expect("stat"));
    let before = ino(&big.join("config.d/50-noded.toml"));
    let again = handlers::apply(&c.handlers, &c.containerd.kata_root, &state).expect("again");
    assert!(!again.changed(), "{again:?}");
    assert_eq!(ino(&big.join("config.d/50-noded.toml")), before);

    // A typo in one handler: refused naming it, and nothing changes for any handler.
    let typo = config(
        &root,
        &data,
        &format!("{TWO}[handlers.kata.hypervisor.clh]\nmachine_tipe = \"x\"\n"),
    );
    let tree_before = tree(&root);
    let err = handlers::apply(&typo.handlers, &typo.containerd.kata_root, &state)
        .expect_err("unknown Kata key");
    let msg = err.to_string();
    assert!(
        msg.contains("handlers.kata-clh-plain.kata.hypervisor.clh.machine_tipe")
            && msg.contains("configuration-clh.toml")
            && !msg.contains('\n'),
        "{msg}"
    );
    assert_eq!(
        noded::exit::ExitStatus::exit_code(&err),
        noded::exit::BAD_INPUT
    );
    assert_eq!(tree(&root), tree_before);

    // One handler dropped: only its files go.
    let fewer = config(&root, &data, &TWO.replace("enable_debug = true", ""));
    let o = handlers::apply(&fewer.handlers, &fewer.containerd.kata_root, &state).expect("fewer");
    assert_eq!(
        o.removed,
        vec![
            dbg.join("config.d/50-noded.toml"),
            dbg.join("configuration-qemu.toml")
        ]
    );
    assert!(!dbg.exists());
    assert!(big.join("config.d/50-noded.toml").is_file());

    // Revert: the Kata tree is exactly what the release shipped, and the record is gone.
    let r = handlers::revert(&state).expect("revert");
    assert!(r.kept_modified.is_empty(), "{r:?}");
    assert_eq!(tree(&root), shipped);
    assert!(!state.exists());
}

#[test]
fn revert_keeps_a_file_someone_changed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let root = tmp.path().join("opt/kata");
    FakeKata::write(&root, &root, "3.18.0");
    let data = tmp.path().join("data");
    let c = config(
        &root,
        &data,
        "[[handlers]]\nname = \"kata-h\"\nhypervisor = \"qemu\"\ndefault_vcpus = 2\n",
    );
    let state = data.join(STATE_FILE);
    handlers::apply(&c.handlers, &c.containerd.kata_root, &state).expect("apply");
    let dropin = c.handlers[0].dropin_path(&root);
    std::fs::write(&dropin, "# operator edit\n").expect("edit");
    let r = handlers::revert(&state).expect("revert");
    assert_eq!(r.kept_modified, vec![dropin.clone()]);
    assert_eq!(
        std::fs::read_to_string(&dropin).expect("kept"),
        "# operator edit\n"
    );
}

/// `[[handlers]]` entries as the real containerd of each series reads them: a runtime-rs dragonball
/// handler with settings (runtime-rs shim, noded's configuration copy) and a plain Go Cloud
/// Hypervisor one (shipped file) next to the kata-qemu preset; apply again writes nothing, revert
/// removes the file noded created.
fn custom_entries_in_dump(series: testkit::containerd::Series) {
    let Some(bins) = testkit::containerd::require(series) else {
        return;
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let config_file = tmp.path().join("etc/config.toml");
    std::fs::create_dir_all(tmp.path().join("etc")).expect("mkdir");
    let c = config(
        Path::new("/opt/kata"),
        &tmp.path().join("data"),
        "[[handlers]]\nname = \"kata-db-rs\"\nruntime = \"rust\"\nhypervisor = \"dragonball\"\ndefault_memory = 1024\n\n[[handlers]]\nname = \"kata-clh-go\"\nhypervisor = \"clh\"\n",
    );
    let version = bins.detect_version().expect("containerd --version");
    let req = noded::containerd::apply::Request {
        config: config_file.clone(),
        handlers: c.kata_handlers(),
        custom: c
            .handlers
            .iter()
            .map(|h| h.spec(&c.containerd.kata_root))
            .collect(),
        kata_root: c.containerd.kata_root.clone(),
        state_dir: tmp.path().join("state"),
        adopt: false,
        containerd_version: Some(version),
        containerd_binary: bins.containerd.clone(),
        socket: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let never = noded::containerd::restart::Restart::Never;
    let report = rt
        .block_on(noded::containerd::apply::apply(&req, &never))
        .unwrap_or_else(|e| panic!("{series}: apply: {e}"));
    assert!(report.changed);
    let dump = bins
        .dump(&config_file)
        .unwrap_or_else(|e| panic!("{series}: {e:#}"));
    let rts = dump
        .get("plugins")
        .and_then(|p| p.get(series.runtime_plugin()))
        .and_then(|p| p.get("containerd"))
        .and_then(|p| p.get("runtimes"))
        .and_then(toml::Value::as_table)
        .unwrap_or_else(|| panic!("{series}: no runtimes in dump: {dump:#?}"));
    let db = &rts["kata-db-rs"];
    assert_eq!(
        db["runtime_type"].as_str(),
        Some("io.containerd.kata-db-rs.v2")
    );
    assert_eq!(
        db["runtime_path"].as_str(),
        Some("/opt/kata/runtime-rs/bin/containerd-shim-kata-v2")
    );
    assert_eq!(
        db["options"]["ConfigPath"].as_str(),
        Some(
            "/opt/kata/share/defaults/kata-containers/noded/kata-db-rs/configuration-dragonball.toml"
        )
    );
    assert_eq!(
        db["container_annotations"].as_array().map(Vec::len),
        Some(1),
        "{series}: {db}"
    );
    assert_eq!(
        db["pod_annotations"].as_array().and_then(|a| a[0].as_str()),
        Some("io.katacontainers.*")
    );
    let clh = &rts["kata-clh-go"];
    assert_eq!(
        clh["runtime_path"].as_str(),
        Some("/opt/kata/bin/containerd-shim-kata-v2")
    );
    assert_eq!(
        clh["options"]["ConfigPath"].as_str(),
        Some("/opt/kata/share/defaults/kata-containers/configuration-clh.toml")
    );
    assert!(rts.contains_key("kata-qemu"), "{series}: preset kept");
    let again = rt
        .block_on(noded::containerd::apply::apply(&req, &never))
        .expect("again");
    assert!(!again.changed, "{series}: {again:?}");
    rt.block_on(noded::containerd::apply::revert_with(
        &config_file,
        &req.state_dir,
        &never,
        req.containerd_version,
        &bins.containerd,
        None,
    ))
    .unwrap_or_else(|e| panic!("{series}: revert: {e}"));
    assert!(
        !config_file.exists(),
        "{series}: revert removes the file noded created"
    );
}

testkit::per_series! {
    fn custom_handlers_dump(series) {
        custom_entries_in_dump(series);
    }
}

/// Side by side (issue 14 item 4): a canary handler on a second Kata root gets its shim, its
/// configuration copy and its drop-in under that root; dropping it removes exactly its files and
/// leaves the other root's handler as it was.
#[test]
fn two_kata_roots_side_by_side() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let current = tmp.path().join("opt/kata");
    let canary = tmp.path().join("opt/kata-3.28");
    FakeKata::write(&current, &current, "3.27.0");
    FakeKata::write(&canary, &canary, "3.28.0");
    let shipped_canary = tree(&canary);
    let data = tmp.path().join("data");
    let both = format!(
        "[[handlers]]\nname = \"kata-qemu-big\"\nhypervisor = \"qemu\"\ndefault_vcpus = 4\n\n\
         [[handlers]]\nname = \"kata-qemu-big-328\"\nhypervisor = \"qemu\"\ndefault_vcpus = 4\nkata_root = \"{}\"\n",
        canary.display()
    );
    let c = config(&current, &data, &both);
    let state = data.join(STATE_FILE);
    handlers::apply(&c.handlers, &c.containerd.kata_root, &state).expect("apply");
    let spec = c.handlers[1].spec(&c.containerd.kata_root);
    assert_eq!(
        spec.runtime_path,
        canary.join("bin/containerd-shim-kata-v2")
    );
    assert_eq!(
        spec.config_path,
        canary
            .join("share/defaults/kata-containers/noded/kata-qemu-big-328/configuration-qemu.toml")
    );
    assert!(c.handlers[1].dropin_path(&canary).is_file());
    let current_after = tree(&current);

    // The canary is over: only its files go; the current root is untouched.
    let one = config(
        &current,
        &data,
        "[[handlers]]\nname = \"kata-qemu-big\"\nhypervisor = \"qemu\"\ndefault_vcpus = 4\n",
    );
    let o = handlers::apply(&one.handlers, &one.containerd.kata_root, &state).expect("one");
    assert!(o.removed.iter().all(|p| p.starts_with(&canary)), "{o:?}");
    assert_eq!(o.removed.len(), 2, "{o:?}");
    assert_eq!(tree(&canary), shipped_canary);
    assert_eq!(tree(&current), current_after);
}
