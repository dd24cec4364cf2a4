//! `noded containerd apply` on an already-configured node: the path every boot and every DaemonSet
//! restart takes. Target < 50 ms, no write (mtime unchanged), no restart.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use noded::containerd::apply::{self, Request};
use noded::containerd::handler::KataHandler;
use noded::containerd::restart::Restart;

use crate::report::{Stats, emit};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Rounds per variant.
    #[arg(long, default_value_t = 50)]
    rounds: usize,
    /// The noded binary for the end-to-end variant (default: next to this benchmark's binary).
    #[arg(long)]
    noded: Option<PathBuf>,
}

fn noded_binary(args: &Args) -> anyhow::Result<PathBuf> {
    if let Some(p) = &args.noded {
        return Ok(p.clone());
    }
    let me = std::env::current_exe()?;
    let p = me.with_file_name("noded");
    if !p.exists() {
        bail!(
            "{} not found: `cargo build --release -p noded` first, or pass --noded",
            p.display()
        );
    }
    Ok(p)
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    let noded = noded_binary(args)?;
    let tmp = tempfile::tempdir()?;
    let config = tmp.path().join("config.toml");
    let state = tmp.path().join("state");
    // A realistic starting point: the installed containerd's own default config.
    let default = Command::new("containerd")
        .args(["config", "default"])
        .output()
        .context("containerd config default")?;
    std::fs::write(&config, &default.stdout)?;
    let req = Request {
        config: config.clone(),
        handlers: vec![KataHandler::Qemu, KataHandler::QemuWarm],
        kata_root: PathBuf::from("/opt/kata"),
        state_dir: state.clone(),
        adopt: false,
        containerd_version: None,
        containerd_binary: PathBuf::from("containerd"),
        custom: Vec::new(),
        socket: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let first = rt.block_on(apply::apply(&req, &Restart::Never))?;
    if !first.changed {
        bail!("the first apply should have changed the file");
    }
    let mtime = std::fs::metadata(&config)?.modified()?;
    let bytes = std::fs::read(&config)?;

    let mut cli = Vec::with_capacity(args.rounds);
    for _ in 0..args.rounds {
        let t = Instant::now();
        let out = Command::new(&noded)
            .args(["containerd", "apply", "--config"])
            .arg(&config)
            .arg("--state-dir")
            .arg(&state)
            .args(["--restart", "never", "--output", "json"])
            .output()?;
        cli.push(t.elapsed());
        if !out.status.success()
            || !String::from_utf8_lossy(&out.stdout).contains("\"changed\":false")
        {
            bail!(
                "apply on a configured file changed something: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
    let mut lib = Vec::with_capacity(args.rounds);
    let mut lib_known_version = Vec::with_capacity(args.rounds);
    let known = Request {
        containerd_version: Some(first.containerd_version.parse()?),
        ..req.clone()
    };
    for _ in 0..args.rounds {
        let t = Instant::now();
        let r = rt.block_on(apply::apply(&req, &Restart::Never))?;
        lib.push(t.elapsed());
        let t = Instant::now();
        let r2 = rt.block_on(apply::apply(&known, &Restart::Never))?;
        lib_known_version.push(t.elapsed());
        if r.changed || r2.changed {
            bail!("apply on a configured file changed something");
        }
    }
    let unchanged =
        std::fs::metadata(&config)?.modified()? == mtime && std::fs::read(&config)? == bytes;
    let (c, l, k) = (
        Stats::of(&cli),
        Stats::of(&lib),
        Stats::of(&lib_known_version),
    );
    let json = serde_json::json!({
        "benchmark": "containerd_apply_unchanged",
        "rounds": args.rounds,
        "config_bytes": bytes.len(),
        "cli_ms": c,
        "library_ms": l,
        "library_version_known_ms": k,
        "file_unchanged": unchanged,
        "target_ms": 50.0,
        "cli_p99_under_target": c.p99_ms < 50.0,
    });
    let row = |name: &str, s: &Stats| {
        (
            name.to_owned(),
            format!(
                "median {:.2} ms  p99 {:.2} ms  max {:.2} ms",
                s.median_ms, s.p99_ms, s.max_ms
            ),
        )
    };
    emit(
        "containerd apply, already configured (no change path)",
        &json,
        &[
            row("noded CLI (process + containerd --version)", &c),
            row("library (detects version)", &l),
            row("library (version known)", &k),
            ("mtime and bytes unchanged".into(), unchanged.to_string()),
        ],
    );
    if !unchanged {
        bail!("the no-change path wrote the file");
    }
    Ok(())
}
