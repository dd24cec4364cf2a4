//! `noded` command line: parses arguments and calls the library. Nothing else lives here.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use noded::containerd::cli::{ApplyOptions, OutputFormat, PlanOptions, RevertOptions};

#[derive(Parser)]
#[command(name = "noded", version, about = "Kata Containers node daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (DaemonSet, or local mode on the embedded default without --config).
    Run {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Register Kata runtime handlers in containerd's configuration.
    #[command(subcommand)]
    Containerd(ContainerdCommand),
    /// Build, inspect or destroy VM templates.
    Template {
        #[command(subcommand)]
        action: TemplateAction,
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
    /// Build the guest kernel + initramfs from Debian packages into DIR for `installer bake --guest-assets`.
    GuestAssets {
        #[arg(long)]
        out: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Show node status from a running daemon.
    Status {
        #[arg(long, default_value = "/run/noded/noded.sock")]
        socket: PathBuf,
        #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
        output: OutputFormat,
    },
}

#[derive(Subcommand)]
enum ContainerdCommand {
    /// Show what apply would change, without writing.
    Plan(PlanOptions),
    /// Write the handlers, restart containerd if the effective config changed, verify.
    Apply(ApplyOptions),
    /// Restore the original bytes of the config noded changed.
    Revert(RevertOptions),
}

#[derive(Subcommand, Clone, Copy)]
enum TemplateAction {
    Build,
    Status,
    Destroy,
    /// Build only the guest kernel + initramfs from Debian packages (cached under daemon.data_dir).
    Assets,
}

fn main() -> ExitCode {
    let cli = match noded::exit::parse_args::<Cli>("noded") {
        Ok(c) => c,
        Err(code) => return ExitCode::from(code),
    };
    let code = match cli.command {
        Command::Run { config } => noded::daemon::run_cli(config.as_deref()),
        Command::Containerd(ContainerdCommand::Plan(o)) => noded::containerd::cli::plan(&o),
        Command::Containerd(ContainerdCommand::Apply(o)) => noded::containerd::cli::apply(&o),
        Command::Containerd(ContainerdCommand::Revert(o)) => noded::containerd::cli::revert(&o),
        Command::Template { action, config } => {
            let action = match action {
                TemplateAction::Build => noded::vm::cli::TemplateAction::Build,
                TemplateAction::Status => noded::vm::cli::TemplateAction::Status,
                TemplateAction::Destroy => noded::vm::cli::TemplateAction::Destroy,
                TemplateAction::Assets => noded::vm::cli::TemplateAction::Assets,
            };
            noded::vm::cli::template(action, config.as_deref())
        }
        Command::GuestAssets { out, config } => noded::vm::assets::cli(&out, config.as_deref()),
        Command::Status { socket, output } => noded::api::status_cli(&socket, output),
    };
    ExitCode::from(code)
}
