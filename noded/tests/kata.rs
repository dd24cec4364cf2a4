//! Kata adapter against a fake Kata root whose binaries are shell scripts recording their calls.

mod common;

use std::sync::atomic::Ordering;

use noded::kata::{
    EnsureAction, KataError, KataFactory, KataLayout, TemplateState, WarmOptions, WarmSharedFs,
    warm,
};
use testkit::fake_kata::FakeKata;

fn fake(version: &str) -> (tempfile::TempDir, FakeKata) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("opt/kata");
    let kata = FakeKata::write(&root, &root, version);
    (dir, kata)
}

fn warm_opts(dir: &tempfile::TempDir) -> WarmOptions {
    WarmOptions {
        template_path: dir.path().join("run/vc/vm/template"),
        ..WarmOptions::default()
    }
}

#[test]
fn inspect_reports_layout_version_and_usable_hypervisors() {
    let (_dir, kata) = fake("3.27.0");
    let install = KataLayout::new(&kata.root).inspect().expect("inspect");
    assert_eq!(install.version.as_deref(), Some("3.27.0"));
    assert_eq!(install.shim, kata.root.join("bin/containerd-shim-kata-v2"));
    let names: Vec<_> = install
        .hypervisors
        .iter()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(names, ["clh", "qemu"]);
    let usable: Vec<_> = install
        .usable_hypervisors()
        .map(|h| h.name.as_str())
        .collect();
    assert_eq!(usable, ["qemu"], "clh's binary is not installed");
    assert_eq!(
        install.initrds,
        [kata
            .root
            .join("share/kata-containers/kata-ubuntu-noble.initrd")]
    );
    assert_eq!(install.kernels.len(), 2, "{:?}", install.kernels);
    assert_eq!(
        install.factory_tool,
        Some(kata.root.join("bin/kata-runtime"))
    );
}

#[test]
fn inspect_rejects_a_root_without_the_shim() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = KataLayout::new(dir.path())
        .inspect()
        .expect_err("empty root");
    assert!(matches!(err, KataError::NotInstalled { .. }), "{err}");
    assert!(err.to_string().contains("containerd-shim-kata-v2"), "{err}");
}

#[test]
fn warm_config_enables_templating_and_keeps_everything_else() {
    let (dir, kata) = fake("3.27.0");
    let layout = KataLayout::new(&kata.root);
    let opts = warm_opts(&dir);
    let out = warm::derive(&layout, &opts).expect("derive");
    assert!(out.changed);
    assert_eq!(out.path, layout.warm_config());
    let text = std::fs::read_to_string(&out.path).expect("read");
    let doc: toml_edit::DocumentMut = text.parse().expect("valid TOML");

    let qemu = &doc["hypervisor"]["qemu"];
    assert!(
        qemu.get("image").is_none(),
        "image must be removed:\n{text}"
    );
    assert_eq!(
        qemu["initrd"].as_str(),
        Some(
            kata.root
                .join("share/kata-containers/kata-ubuntu-noble.initrd")
                .to_str()
                .expect("utf8")
        )
    );
    assert_eq!(qemu["shared_fs"].as_str(), Some("virtio-9p"));
    assert_eq!(doc["factory"]["enable_template"].as_bool(), Some(true));
    assert_eq!(
        doc["factory"]["template_path"].as_str(),
        opts.template_path.to_str()
    );
    assert_eq!(doc["factory"]["vm_cache_number"].as_integer(), Some(0));

    // Kata's comments, including inline ones on edited keys, survive; untouched lines are verbatim.
    assert!(
        text.contains("shared_fs = \"virtio-9p\" # keep this comment"),
        "{text}"
    );
    assert!(text.contains("default_memory = 2048 # guest RAM"), "{text}");
    let source = std::fs::read_to_string(layout.config("qemu")).expect("read source");
    for line in source.lines().filter(|l| {
        !l.starts_with("image") && !l.starts_with("shared_fs") && !l.starts_with("vm_cache")
    }) {
        assert!(text.contains(line), "line lost: {line:?}\n{text}");
    }

    // Idempotent: same bytes, no write.
    let mtime = std::fs::metadata(&out.path)
        .and_then(|m| m.modified())
        .expect("mtime");
    let again = warm::derive(&layout, &opts).expect("derive again");
    assert!(!again.changed);
    assert_eq!(std::fs::read_to_string(&out.path).expect("read"), text);
    assert_eq!(
        std::fs::metadata(&out.path)
            .and_then(|m| m.modified())
            .expect("mtime"),
        mtime
    );

    // The warm config is not reported as a hypervisor Kata shipped.
    let install = layout.inspect().expect("inspect");
    assert!(install.hypervisors.iter().all(|h| h.name != "qemu-warm"));
}

#[test]
fn warm_config_shared_fs_none_and_missing_initrd() {
    let (dir, kata) = fake("3.27.0");
    let layout = KataLayout::new(&kata.root);
    let opts = WarmOptions {
        shared_fs: WarmSharedFs::None,
        ..warm_opts(&dir)
    };
    let out = warm::derive(&layout, &opts).expect("derive");
    let text = std::fs::read_to_string(&out.path).expect("read");
    assert!(text.contains("shared_fs = \"none\""), "{text}");

    std::fs::remove_file(
        kata.root
            .join("share/kata-containers/kata-ubuntu-noble.initrd"),
    )
    .expect("rm initrd");
    std::fs::remove_file(&out.path).expect("rm warm");
    let err = warm::derive(&layout, &opts).expect_err("no initrd anywhere");
    assert!(err.to_string().contains("initrd"), "{err}");
    assert!(!out.path.exists(), "nothing written on error");
}

#[test]
fn factory_builds_after_boot_keeps_when_current_rebuilds_after_upgrade() {
    let (dir, kata) = fake("3.27.0");
    let layout = KataLayout::new(&kata.root);
    let opts = warm_opts(&dir);
    let warm = warm::derive(&layout, &opts).expect("derive");
    let data = dir.path().join("var/lib/noded");
    let factory = KataFactory::new(layout.clone(), warm.path.clone(), &data).expect("factory");
    assert_eq!(factory.template_path(), opts.template_path);

    // Fresh boot: tmpfs empty.
    let fp = factory.fingerprint().expect("fingerprint");
    assert_eq!(factory.state(&fp), TemplateState::Missing);
    let out = factory.ensure().expect("ensure");
    assert_eq!(out.action, EnsureAction::BuiltMissing);
    assert_eq!(out.fingerprint.kata_version, "3.27.0");
    assert!(opts.template_path.join("memory").is_file());
    assert!(opts.template_path.join("state").is_file());
    assert_eq!(kata.factory_calls(), ["init"]);
    let init = kata
        .calls()
        .into_iter()
        .find(|c| c.ends_with("factory init"))
        .expect("init");
    assert!(
        init.contains(&format!("--config {}", warm.path.display())),
        "factory must use the warm config: {init}"
    );

    // Current: nothing runs.
    let out = factory.ensure().expect("ensure");
    assert_eq!(out.action, EnsureAction::Kept);
    assert_eq!(kata.factory_calls(), ["init"]);

    // Reboot: the tmpfs is empty again, the record on disk survives.
    std::fs::remove_dir_all(&opts.template_path).expect("simulate reboot");
    let out = factory.ensure().expect("ensure");
    assert_eq!(out.action, EnsureAction::BuiltMissing);
    assert_eq!(kata.factory_calls(), ["init", "init"]);

    // Upgrade: new version and initrd; the old template must be destroyed and rebuilt.
    kata.upgrade("3.28.0");
    let fp = factory.fingerprint().expect("fingerprint");
    match factory.state(&fp) {
        TemplateState::Stale(why) => {
            assert!(why.contains("3.27.0 -> 3.28.0"), "{why}");
            assert!(why.contains("initrd changed"), "{why}");
        }
        other => panic!("expected stale, got {other:?}"),
    }
    let out = factory.ensure().expect("ensure");
    assert_eq!(out.action, EnsureAction::RebuiltStale);
    assert_eq!(kata.factory_calls(), ["init", "init", "destroy", "init"]);
    assert_eq!(factory.counters.built_missing.load(Ordering::Relaxed), 2);
    assert_eq!(factory.counters.rebuilt_stale.load(Ordering::Relaxed), 1);

    // A config change (e.g. a new warm config after editing Kata's) is stale too.
    let mut text = std::fs::read_to_string(&warm.path).expect("read");
    text.push_str("\n# operator edit\n");
    std::fs::write(&warm.path, text).expect("write");
    assert!(
        matches!(factory.state(&factory.fingerprint().expect("fp")), TemplateState::Stale(w) if w.contains("config changed"))
    );
}

#[test]
fn factory_failure_is_an_error_and_counted_never_silent() {
    let (dir, kata) = fake("3.27.0");
    let layout = KataLayout::new(&kata.root);
    let warm = warm::derive(&layout, &warm_opts(&dir)).expect("derive");
    let factory = KataFactory::new(layout, warm.path, &dir.path().join("data")).expect("factory");
    std::fs::write(kata.root.join("fail-init"), b"").expect("arm failure");
    let err = factory.ensure().expect_err("init fails");
    let msg = err.to_string();
    assert!(msg.contains("factory init"), "{msg}");
    assert!(msg.contains("failed to boot template VM"), "{msg}");
    assert_eq!(factory.counters.failed.load(Ordering::Relaxed), 1);

    // A template directory without a record (built by someone else) is not trusted.
    std::fs::remove_file(kata.root.join("fail-init")).expect("disarm");
    let tp = factory.template_path().to_path_buf();
    std::fs::create_dir_all(&tp).expect("mkdir");
    std::fs::write(tp.join("memory"), b"x").expect("w");
    std::fs::write(tp.join("state"), b"x").expect("w");
    let out = factory.ensure().expect("ensure");
    assert_eq!(out.action, EnsureAction::RebuiltStale);
}

#[test]
fn factory_requires_the_warm_config() {
    let (dir, kata) = fake("3.27.0");
    let layout = KataLayout::new(&kata.root);
    let err = KataFactory::new(layout.clone(), layout.config("qemu"), dir.path())
        .expect_err("plain qemu config has no template enabled");
    assert!(err.to_string().contains("enable_template"), "{err}");
}

#[test]
fn a_damaged_template_is_rebuilt_never_kept() {
    let (dir, kata) = fake("3.27.0");
    let layout = KataLayout::new(&kata.root);
    let opts = warm_opts(&dir);
    let warm = warm::derive(&layout, &opts).expect("derive");
    let factory = KataFactory::new(layout, warm.path, &dir.path().join("data")).expect("factory");
    assert_eq!(
        factory.ensure().expect("build").action,
        EnsureAction::BuiltMissing
    );
    let fp = factory.fingerprint().expect("fp");
    assert_eq!(factory.state(&fp), TemplateState::Current);

    // Same size, other bytes: the saved device state no longer matches what the build left.
    let state = opts.template_path.join("state");
    let len = std::fs::metadata(&state).expect("stat").len();
    std::fs::write(&state, vec![b'x'; usize::try_from(len).expect("len")]).expect("corrupt");
    match factory.state(&fp) {
        TemplateState::Damaged(why) => assert!(why.contains("state"), "{why}"),
        other => panic!("expected damaged, got {other:?}"),
    }
    let out = factory.ensure().expect("rebuild");
    assert_eq!(out.action, EnsureAction::RebuiltDamaged);
    assert_eq!(factory.state(&fp), TemplateState::Current);
    assert_eq!(factory.counters.rebuilt_damaged.load(Ordering::Relaxed), 1);

    // A truncated memory file is damage too.
    std::fs::write(opts.template_path.join("memory"), b"short").expect("truncate");
    assert!(matches!(factory.state(&fp), TemplateState::Damaged(w) if w.contains("memory")));
    assert_eq!(kata.factory_calls(), ["init", "destroy", "init"]);
}

#[test]
fn runtime_rs_kata_ctl_is_refused_with_one_line() {
    let (dir, kata) = fake("3.27.0");
    let layout = KataLayout::new(&kata.root);
    let warm = warm::derive(&layout, &warm_opts(&dir)).expect("derive");
    // A runtime-rs-only release: kata-ctl, no kata-runtime.
    std::fs::rename(
        kata.root.join("bin/kata-runtime"),
        kata.root.join("bin/kata-ctl"),
    )
    .expect("rename");
    let factory = KataFactory::new(layout, warm.path, &dir.path().join("data")).expect("factory");
    let err = factory.ensure().expect_err("kata-ctl must be refused");
    assert!(matches!(err, KataError::RuntimeRsFactory(_)), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("kata-ctl") && msg.contains("KATA_CONF_FILE"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
    assert!(kata.factory_calls().is_empty(), "nothing was run");
}

#[test]
fn a_hung_factory_tool_is_killed_after_the_timeout() {
    use std::os::unix::fs::PermissionsExt;
    let (dir, kata) = fake("3.27.0");
    let layout = KataLayout::new(&kata.root);
    let warm = warm::derive(&layout, &warm_opts(&dir)).expect("derive");
    let tool = kata.root.join("bin/kata-runtime");
    // Answers --version (the fingerprint needs it) and hangs on `factory init`.
    std::fs::write(
        &tool,
        "#!/bin/sh\nif [ \"$1\" = --version ]; then echo 'kata-runtime  : 3.27.0'; exit 0; fi\nexec sleep 600\n",
    )
    .expect("write");
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let factory = KataFactory::new(layout, warm.path, &dir.path().join("data"))
        .expect("factory")
        .with_exec(noded::kata::FactoryExec {
            timeout: std::time::Duration::from_millis(500),
        });
    let started = std::time::Instant::now();
    let err = factory.ensure().expect_err("hung tool");
    assert!(err.to_string().contains("killed after"), "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
}

#[test]
fn warm_initrd_is_the_configs_or_katas_default_never_a_guess() {
    let (dir, kata) = fake("3.27.0");
    let assets = kata.root.join("share/kata-containers");
    // A release ships a confidential initrd that sorts before everything else.
    std::fs::write(assets.join("kata-cc-confidential.initrd"), b"cc").expect("write");
    let layout = KataLayout::new(&kata.root);
    let err = warm::derive(&layout, &warm_opts(&dir)).expect_err("two candidates, no default");
    let msg = err.to_string();
    assert!(
        msg.contains("several candidates") && msg.contains("kata-cc-confidential.initrd"),
        "{msg}"
    );
    assert!(!msg.contains('\n'), "{msg}");
    // Kata's default name wins over both.
    std::os::unix::fs::symlink(
        "kata-ubuntu-noble.initrd",
        assets.join(warm::DEFAULT_INITRD),
    )
    .expect("symlink");
    let out = warm::derive(&layout, &warm_opts(&dir)).expect("default initrd");
    assert_eq!(out.initrd, assets.join(warm::DEFAULT_INITRD));
}

#[test]
fn keeper_check_builds_then_keeps_and_reports_failures_as_invalid() {
    use noded::kata::keeper::{KeeperSettings, TemplateCheck, check_once};
    let (dir, kata) = fake("3.27.0");
    let layout = KataLayout::new(&kata.root);
    let opts = warm_opts(&dir);
    warm::derive(&layout, &opts).expect("derive");
    let target = noded::kata::WarmTarget {
        name: "kata-qemu-warm".into(),
        kata_root: kata.root.clone(),
        config: layout.warm_config(),
        template_path: opts.template_path.clone(),
    };
    let settings = KeeperSettings {
        handlers: vec![target.clone()],
        data_dir: dir.path().join("data"),
        check_interval: std::time::Duration::from_secs(1),
        exec: noded::kata::FactoryExec::default(),
        // Noded's own namespace: taken as "run here", no setns needed.
        mount_namespace: Some("/proc/self/ns/mnt".into()),
    };
    assert_eq!(
        check_once(&settings, &target),
        TemplateCheck::Valid {
            action: EnsureAction::BuiltMissing
        }
    );
    assert_eq!(
        check_once(&settings, &target),
        TemplateCheck::Valid {
            action: EnsureAction::Kept
        }
    );
    std::fs::remove_dir_all(&opts.template_path).expect("reboot");
    std::fs::write(kata.root.join("fail-init"), b"").expect("arm");
    match check_once(&settings, &target) {
        TemplateCheck::Invalid { reason } => {
            assert!(reason.contains("failed to boot template VM"), "{reason}")
        }
        other => panic!("expected invalid, got {other:?}"),
    }
}

/// A `[[handlers]]` entry with `warm = true`: noded derives its templating configuration in the
/// handler's own directory (settings as a drop-in over it), the keeper builds its template in its own
/// template path with its own record, and the preset's template and record are not touched.
#[test]
fn a_warm_handler_gets_its_own_template_config_template_and_record() {
    use noded::config::NodedConfig;
    use noded::kata::keeper::{KeeperSettings, TemplateCheck, check_once};
    let (dir, kata) = fake("3.27.0");
    let data = dir.path().join("data");
    let template = dir.path().join("run/vc/vm/template-kata-qemu-small");
    let config = NodedConfig::parse(
        std::path::Path::new("noded.toml"),
        &format!(
            "[containerd]\nkata_root = \"{}\"\nruntimes = [\"kata-qemu\"]\n\
             [[handlers]]\nname = \"kata-qemu-small\"\nhypervisor = \"qemu\"\nwarm = true\n\
             template_path = \"{}\"\ndefault_memory = 512\n",
            kata.root.display(),
            template.display()
        ),
    )
    .expect("noded.toml");
    let targets = config.warm_targets();
    assert_eq!(targets.len(), 1, "{targets:?}");
    let t = &targets[0];
    let own = kata
        .root
        .join("share/defaults/kata-containers/noded/kata-qemu-small");
    assert_eq!(t.config, own.join("configuration-qemu.toml"));
    assert_eq!(t.template_path, template);

    let state = data.join(noded::kata::handlers::STATE_FILE);
    noded::kata::handlers::apply(&config.handlers, &kata.root, &state).expect("apply");
    let text = std::fs::read_to_string(&t.config).expect("warm copy");
    let copy: toml::Table = text.parse().expect("TOML");
    assert_eq!(copy["factory"]["enable_template"].as_bool(), Some(true));
    assert_eq!(
        copy["factory"]["template_path"].as_str(),
        Some(template.to_str().expect("utf8"))
    );
    assert!(copy["hypervisor"]["qemu"].get("image").is_none(), "{text}");
    assert!(
        copy["hypervisor"]["qemu"]["initrd"].as_str().is_some(),
        "{text}"
    );
    assert!(text.contains("for the kata-qemu-small handler"), "{text}");
    let dropin: toml::Table = std::fs::read_to_string(own.join("config.d/50-noded.toml"))
        .expect("drop-in")
        .parse()
        .expect("TOML");
    assert_eq!(
        dropin["hypervisor"]["qemu"]["default_memory"].as_integer(),
        Some(512)
    );

    let settings = KeeperSettings {
        handlers: targets.clone(),
        data_dir: data.clone(),
        check_interval: std::time::Duration::from_secs(1),
        exec: noded::kata::FactoryExec::default(),
        mount_namespace: Some("/proc/self/ns/mnt".into()),
    };
    assert_eq!(
        check_once(&settings, t),
        TemplateCheck::Valid {
            action: EnsureAction::BuiltMissing
        }
    );
    assert!(template.join("state").is_file(), "no template built");
    assert!(
        data.join("kata/factory-template.kata-qemu-small.json")
            .is_file(),
        "record not named after the handler"
    );
    assert!(
        !data
            .join("kata/factory-template.configuration-qemu.json")
            .exists()
    );
    assert!(
        kata.calls()
            .iter()
            .any(|c| c.contains(&format!("--config {} factory init", t.config.display()))),
        "{:?}",
        kata.calls()
    );
    assert_eq!(
        check_once(&settings, t),
        TemplateCheck::Valid {
            action: EnsureAction::Kept
        }
    );
    // A setting that changes the template (its drop-in) makes the recorded template stale.
    let changed = NodedConfig::parse(
        std::path::Path::new("noded.toml"),
        &format!(
            "[containerd]\nkata_root = \"{}\"\nruntimes = [\"kata-qemu\"]\n\
             [[handlers]]\nname = \"kata-qemu-small\"\nhypervisor = \"qemu\"\nwarm = true\n\
             template_path = \"{}\"\ndefault_memory = 768\n",
            kata.root.display(),
            template.display()
        ),
    )
    .expect("noded.toml");
    noded::kata::handlers::apply(&changed.handlers, &kata.root, &state).expect("apply");
    match check_once(&settings, t) {
        TemplateCheck::Valid { action } => assert_ne!(action, EnsureAction::Kept, "{action:?}"),
        other => panic!("rebuild expected, got {other:?}"),
    }
}

/// The keeper runs in the host's mount namespace from inside the DaemonSet pod: paths and processes
/// resolve there, noded's own threads stay where they are.
#[test]
fn in_mount_namespace_sees_and_runs_in_the_other_namespace() {
    use std::io::BufRead;
    if !testkit::require::require_root() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    let script = format!(
        "mount -t tmpfs none {m} && echo inside > {m}/f && echo ready && exec sleep 60",
        m = mnt.display()
    );
    let mut holder = std::process::Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("unshare");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut line = String::new();
    std::io::BufReader::new(holder.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read");
    let holder = Kill(holder);
    assert_eq!(line.trim(), "ready");
    let ns = std::path::PathBuf::from(format!("/proc/{}/ns/mnt", holder.0.id()));
    let f = mnt.join("f");
    assert!(!f.exists(), "the tmpfs is only in the other namespace");
    let (read, ran) = noded::kata::in_mount_namespace(Some(&ns), || {
        let read = std::fs::read_to_string(&f).map_err(|source| KataError::Io {
            path: f.clone(),
            source,
        })?;
        let out = std::process::Command::new("cat")
            .arg(&f)
            .output()
            .map_err(|source| KataError::Io {
                path: "cat".into(),
                source,
            })?;
        Ok((read, String::from_utf8_lossy(&out.stdout).into_owned()))
    })
    .expect("enter");
    assert_eq!((read.trim(), ran.trim()), ("inside", "inside"));
    assert!(!f.exists(), "noded's own namespace is unchanged afterwards");
}
