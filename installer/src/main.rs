//! `installer`: bakes noded + Kata into a node image, prepares containerd at boot, checks a node,
//! and uninstalls exactly what it installed. Every subcommand works on `--root DIR` (default `/`).

mod archive;
mod assets;
mod bake;
mod boot;
mod check;
mod containerd_step;
mod guest;
mod host;
mod manifest;
mod relocate;
mod root;
mod uninstall;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use noded::exit::ExitStatus;
use serde::Serialize;

#[derive(Parser)]
#[command(
    name = "installer",
    version,
    about = "Install noded + Kata on a node image"
)]
struct Cli {
    /// Filesystem root to work on (an image mount, or a temp tree in tests).
    #[arg(long, global = true, default_value = "/")]
    root: PathBuf,
    #[arg(long, global = true, value_enum, default_value_t = Output::Text)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Install a verified Kata release, noded, systemd units, module and nodeadm config.
    Bake(bake::BakeOptions),
    /// Boot-time step (noded-boot.service): KVM/modules check, containerd config, runtime dirs.
    Boot,
    /// Preflight report; exits 1 when something blocks Kata VMs.
    Check,
    /// Remove exactly what bake and boot wrote; revert containerd's config byte-identically.
    Uninstall {
        /// Also remove noded's own state (data_dir, run_dir) that the daemon created.
        #[arg(long)]
        purge: bool,
        /// Remove only the side-by-side release `installer bake --kata-root DIR` installed there.
        #[arg(long, conflicts_with = "purge")]
        kata_root: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = match noded::exit::parse_args::<Cli>("installer") {
        Ok(c) => c,
        Err(code) => return ExitCode::from(code),
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let root = root::Root::new(&cli.root);
    let code = match cli.command {
        Command::Bake(o) => finish(cli.output, bake::bake(&root, &o), |r| {
            format!(
                "kata {} ({}); wrote {} file(s), {} unchanged\n",
                r.kata_version.as_deref().unwrap_or("unknown version"),
                if r.kata_changed {
                    "installed"
                } else {
                    "unchanged"
                },
                r.written.len(),
                r.unchanged.len()
            )
        }),
        Command::Boot => finish(cli.output, boot::boot(&root), |r| {
            let mut s = format!(
                "containerd config {} ({}); {} ms\n",
                r.containerd.config.display(),
                if r.containerd.changed {
                    "changed"
                } else {
                    "unchanged"
                },
                r.elapsed_ms
            );
            for w in &r.warnings {
                s.push_str(&format!("warning: {w}\n"));
            }
            s
        }),
        Command::Check => {
            let report = check::check(&root);
            if let Err(e) = print(cli.output, &report, check::CheckReport::table) {
                eprintln!("installer: {e}");
                return ExitCode::from(noded::exit::RUNTIME_FAILURE);
            }
            if report.blockers > 0 {
                noded::exit::RUNTIME_FAILURE
            } else {
                noded::exit::OK
            }
        }
        Command::Uninstall { purge, kata_root } => {
            let result = match &kata_root {
                Some(dir) => uninstall::uninstall_release(&root, dir),
                None => uninstall::uninstall(&root, purge),
            };
            finish(cli.output, result, |r| {
                let mut s = if r.installed {
                    format!(
                        "removed {} installed item(s); containerd config {}\n",
                        r.removed_entries,
                        if r.containerd_reverted {
                            "reverted"
                        } else {
                            "untouched"
                        }
                    )
                } else {
                    "nothing installed\n".to_owned()
                };
                for w in &r.warnings {
                    s.push_str(&format!("warning: {w}\n"));
                }
                s
            })
        }
    };
    ExitCode::from(code)
}

/// One line on stderr for errors (they name the file and the problem); the report on stdout.
fn finish<T: Serialize, E: std::fmt::Display + ExitStatus>(
    output: Output,
    result: Result<T, E>,
    text: impl Fn(&T) -> String,
) -> u8 {
    match result {
        Ok(report) => match print(output, &report, text) {
            Ok(()) => noded::exit::OK,
            Err(e) => {
                eprintln!("installer: {e}");
                noded::exit::RUNTIME_FAILURE
            }
        },
        Err(e) => {
            eprintln!("installer: {}", noded::config::one_line(&e.to_string()));
            e.exit_code()
        }
    }
}

fn print<T: Serialize>(
    output: Output,
    report: &T,
    text: impl Fn(&T) -> String,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string(report)?),
        Output::Text => print!("{}", text(report)),
    }
    Ok(())
}
