//! `noded containerd plan|apply|revert`: argument types and output. The work is in `apply`.

use std::path::{Path, PathBuf};

use super::apply::{self, ApplyError, Plan, Report, Request};
use super::handler::parse_handlers;
use super::restart::Restart;
use super::version::ContainerdVersion;
use crate::exit::{self, ExitStatus};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PlanOptions {
    /// containerd's config file (created when missing).
    #[arg(long)]
    pub config: PathBuf,
    /// Handler to register (repeatable): kata-qemu, kata-qemu-warm, kata-clh, kata-fc.
    #[arg(long = "runtime")]
    pub runtimes: Vec<String>,
    #[arg(long, default_value = "/opt/kata")]
    pub kata_root: PathBuf,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub target: Target,
    /// Take over existing handler tables of the same name that noded did not write.
    #[arg(long)]
    pub adopt: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ApplyOptions {
    #[command(flatten)]
    pub plan: PlanOptions,
    /// auto | never | systemd | command:CMD
    #[arg(long, default_value = "auto")]
    pub restart: String,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RevertOptions {
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long, default_value = "auto")]
    pub restart: String,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
    #[command(flatten)]
    pub target: Target,
}

/// Where noded records what it wrote, and which containerd it writes for (plan, apply and revert).
#[derive(Debug, Clone, clap::Args)]
pub struct Target {
    /// Where noded keeps its ownership record and the backup of the original bytes.
    #[arg(long, default_value = "/var/lib/noded")]
    pub state_dir: PathBuf,
    /// containerd version to plan for, instead of asking `containerd --version` (e.g. 2.0.0).
    #[arg(long)]
    pub containerd_version: Option<String>,
    #[arg(long, default_value = "containerd")]
    pub containerd_binary: PathBuf,
    /// containerd's socket, asked for its version while containerd runs (default: the config's
    /// `grpc.address`); `containerd --version` only where nothing answers there.
    #[arg(long)]
    pub containerd_socket: Option<PathBuf>,
}

impl Target {
    fn socket(&self, config: &Path) -> PathBuf {
        self.containerd_socket
            .clone()
            .unwrap_or_else(|| apply::config_socket(config))
    }
}

/// A bad argument: exit 2 with one line.
fn bad(message: impl std::fmt::Display) -> u8 {
    eprintln!("noded: {message}");
    exit::BAD_INPUT
}

fn fail(e: &ApplyError) -> u8 {
    eprintln!("noded: {e}");
    e.exit_code()
}

fn parse_version(v: Option<&str>) -> Result<Option<ContainerdVersion>, String> {
    v.map(|s| s.parse().map_err(|e| format!("--containerd-version: {e}")))
        .transpose()
}

fn request(o: &PlanOptions) -> Result<Request, String> {
    Ok(Request {
        config: o.config.clone(),
        handlers: parse_handlers(&o.runtimes).map_err(|e| format!("--runtime: {e}"))?,
        // `--runtime` names presets only; [[handlers]] come from noded.toml (`noded run`, the installer).
        custom: Vec::new(),
        kata_root: o.kata_root.clone(),
        state_dir: o.target.state_dir.clone(),
        adopt: o.adopt,
        containerd_version: parse_version(o.target.containerd_version.as_deref())?,
        containerd_binary: o.target.containerd_binary.clone(),
        socket: Some(o.target.socket(&o.config)),
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, u8> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("noded: cannot start async runtime: {e}");
            exit::RUNTIME_FAILURE
        })
}

pub fn plan(o: &PlanOptions) -> u8 {
    let req = match request(o) {
        Ok(r) => r,
        Err(m) => return bad(m),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let plan = rt
        .block_on(req.resolved())
        .and_then(|req| apply::plan(&req));
    match plan {
        Ok(p) => {
            print_plan(&p, o.output);
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

pub fn apply(o: &ApplyOptions) -> u8 {
    let (req, restart) = match (request(&o.plan), o.restart.parse::<Restart>()) {
        (Ok(r), Ok(s)) => (r, s),
        (Err(m), _) => return bad(m),
        (_, Err(e)) => return bad(e),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    match rt.block_on(apply::apply(&req, &restart)) {
        Ok(r) => {
            print_report(&r, o.plan.output);
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

pub fn revert(o: &RevertOptions) -> u8 {
    let restart = match o.restart.parse::<Restart>() {
        Ok(r) => r,
        Err(e) => return bad(e),
    };
    let version = match parse_version(o.target.containerd_version.as_deref()) {
        Ok(v) => v,
        Err(m) => return bad(m),
    };
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let socket = o.target.socket(&o.config);
    let run = apply::revert_with(
        &o.config,
        &o.target.state_dir,
        &restart,
        version,
        &o.target.containerd_binary,
        Some(&socket),
    );
    match rt.block_on(run) {
        Ok(r) => {
            print_report(&r, o.output);
            exit::OK
        }
        Err(e) => fail(&e),
    }
}

fn print_plan(p: &Plan, output: OutputFormat) {
    let files: Vec<&Path> = p
        .files
        .iter()
        .filter(|f| f.changed())
        .map(|f| f.path.as_path())
        .collect();
    match output {
        OutputFormat::Json => {
            let v = serde_json::json!({
                "changed": p.changed(),
                "handlers": p.touched(),
                "actions": p.actions,
                "strategy": p.strategy,
                "containerd_version": p.containerd_version.to_string(),
                "config_version": p.config_version.number(),
                "files": files,
                "restart_needed": p.effective_change(),
            });
            println!("{v}");
        }
        OutputFormat::Text => {
            println!(
                "containerd {} · config version {} · strategy {:?}",
                p.containerd_version,
                p.config_version.number(),
                p.strategy
            );
            for a in &p.actions {
                println!("  {:<16} {:?}", a.handler, a.action);
            }
            if p.changed() {
                for f in files {
                    println!("  would write {}", f.display());
                }
                if p.effective_change() {
                    println!("  containerd restart needed");
                }
            } else {
                println!("  no change");
            }
        }
    }
}

fn print_report(r: &Report, output: OutputFormat) {
    match output {
        OutputFormat::Json => match serde_json::to_string(r) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("noded: cannot encode report: {e}"),
        },
        OutputFormat::Text => {
            if !r.changed {
                println!(
                    "no change (containerd {}, {:?})",
                    r.containerd_version, r.strategy
                );
            } else {
                println!("changed: {}", r.handlers.join(", "));
                for f in &r.files {
                    println!("  wrote {}", f.display());
                }
                if r.restarted {
                    println!("  containerd restarted; handlers verified through CRI status");
                }
            }
            if let Some(w) = &r.warning {
                println!("  warning: {w}");
            }
        }
    }
}
