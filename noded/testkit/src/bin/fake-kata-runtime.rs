//! `bin/kata-runtime` of a bootable fake Kata release (`testkit::fake_kata::FakeKata::write_bootable`):
//! `--version`, and `--config F factory init|destroy|status` doing what Kata's Go
//! `virtcontainers/factory/template` does, with the real QEMU (see `testkit::kata_guest`).
//!
//! Every call but `--version` is recorded as `kata-runtime <args>` in `<release>/calls.log` first, like
//! the release's recording scripts. A `<release>/fail-init` file makes `factory init` fail as a QEMU
//! that cannot boot would. Errors are one line on stderr: exit 2 for bad usage or configuration, 1 for a
//! failure to build the template.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitCode};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use testkit::kata_guest::{self, BadConfig, QemuConfig, Role, TEMPLATE_STATE_MIB, Vm};

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = release_root();
    if args.first().map(String::as_str) != Some("--version")
        && let Some(root) = &root
    {
        record(root, &format!("kata-runtime {}", args.join(" ")));
    }
    match run(&args, root.as_deref()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "kata-runtime: {}",
                noded::config::one_line(&format!("{e:#}"))
            );
            if e.downcast_ref::<BadConfig>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// `<release>/bin/kata-runtime` → `<release>`.
fn release_root() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.to_path_buf())
}

fn record(root: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(root.join("calls.log"))
    {
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}

fn run(args: &[String], root: Option<&Path>) -> Result<()> {
    let usage = || {
        BadConfig(
            "usage: kata-runtime --version | --config FILE factory init|destroy|status".into(),
        )
    };
    let mut args = args.iter().map(String::as_str);
    let mut config = None;
    match args.next() {
        Some("--version") => {
            let version = root
                .map(|r| r.join("fake-version"))
                .and_then(|p| std::fs::read_to_string(p).ok())
                .unwrap_or_default();
            println!("kata-runtime  : {}", version.trim());
            println!("   commit   : 0000000");
            return Ok(());
        }
        Some("--config") => {
            config = Some(PathBuf::from(args.next().ok_or_else(usage)?));
            if args.next() != Some("factory") {
                return Err(usage().into());
            }
        }
        Some("factory") => {}
        Some(other) => bail!(BadConfig(format!("unknown command {other}"))),
        None => return Err(usage().into()),
    }
    let verb = args.next().ok_or_else(usage)?;
    // Kata's own default configuration when --config is not given.
    let config = config.unwrap_or_else(|| {
        root.map(|r| r.join("share/defaults/kata-containers/configuration.toml"))
            .unwrap_or_default()
    });
    match verb {
        "init" => {
            if let Some(root) = root
                && root.join("fail-init").exists()
            {
                bail!("qemu: failed to boot template VM");
            }
            let cfg = QemuConfig::load(&config)?;
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?;
            rt.block_on(init(&cfg))
        }
        "destroy" => destroy(&QemuConfig::load(&config)?),
        "status" => {
            let cfg = QemuConfig::load(&config)?;
            if cfg.template_exists() {
                println!("vm factory is on");
            } else {
                println!("vm factory is off");
            }
            Ok(())
        }
        other => bail!(BadConfig(format!("unknown factory verb {other}"))),
    }
}

async fn init(cfg: &QemuConfig) -> Result<()> {
    if !cfg.enable_template {
        bail!(BadConfig(format!(
            "{}: [factory] enable_template is not true: no VM factory to initialise",
            cfg.source.display()
        )));
    }
    if cfg.initrd.is_none() {
        bail!(BadConfig(format!(
            "{}: [hypervisor.qemu] initrd is not set: VM templating needs an initrd (image= is not supported)",
            cfg.source.display()
        )));
    }
    let tp = &cfg.template_path;
    if cfg.template_exists() {
        bail!("a VM template already exists in {}", tp.display());
    }
    std::fs::create_dir_all(tp).with_context(|| format!("create {}", tp.display()))?;
    let size = cfg.memory_mib + TEMPLATE_STATE_MIB;
    nix::mount::mount(
        Some("tmpfs"),
        tp,
        Some("tmpfs"),
        nix::mount::MsFlags::MS_NOSUID | nix::mount::MsFlags::MS_NODEV,
        Some(format!("size={size}M").as_str()),
    )
    .with_context(|| format!("mount a {size} MiB tmpfs at {}", tp.display()))?;
    let built = build(cfg).await;
    if built.is_err() {
        // Like Kata's template.close(): nothing half-built stays behind.
        let _ = nix::mount::umount2(tp, nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(tp);
    }
    built
}

async fn build(cfg: &QemuConfig) -> Result<()> {
    let memory = cfg.memory_file();
    std::fs::File::create(&memory).with_context(|| format!("create {}", memory.display()))?;
    let id = uuid::Uuid::new_v4().simple().to_string();
    let dir = Path::new(kata_guest::VM_RUN_DIR).join(&id);
    let mut child: Option<Child> = None;
    let mut spawn = |mut cmd: std::process::Command| {
        let c = cmd.spawn()?;
        let pid = c.id();
        child = Some(c);
        Ok(pid)
    };
    let started = Vm::start(
        cfg,
        Role::Template,
        &format!("sandbox-{id}"),
        &dir,
        &mut spawn,
    )
    .await;
    let result = match started {
        Ok(mut vm) => {
            let saved = kata_guest::save_template(&mut vm, cfg).await;
            if saved.is_ok() {
                let _ = vm.qmp.quit(Duration::from_secs(5)).await;
            }
            saved.map(drop)
        }
        Err(e) => Err(e),
    };
    if let Some(mut c) = child {
        // After a save QEMU quits by itself (given a few seconds); after a failure it is killed.
        let deadline = std::time::Instant::now()
            + if result.is_ok() {
                Duration::from_secs(5)
            } else {
                Duration::ZERO
            };
        while c.try_wait().ok().flatten().is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);
    result?;
    if !cfg.template_exists() {
        bail!("QEMU saved no state in {}", cfg.template_path.display());
    }
    Ok(())
}

fn destroy(cfg: &QemuConfig) -> Result<()> {
    let tp = &cfg.template_path;
    if kata_guest::is_mountpoint(tp) {
        // Detached: clones still map the memory file and keep the tmpfs alive until they exit.
        nix::mount::umount2(tp, nix::mount::MntFlags::MNT_DETACH)
            .with_context(|| format!("unmount {}", tp.display()))?;
    }
    match std::fs::remove_dir_all(tp) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove {}", tp.display())),
    }
}
