//! `noded containerd plan|apply|revert`.

use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, clap::Args)]
pub struct PlanOptions {
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long = "runtime")]
    pub runtimes: Vec<String>,
    #[arg(long, default_value = "/opt/kata")]
    pub kata_root: PathBuf,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ApplyOptions {
    #[command(flatten)]
    pub plan: PlanOptions,
    #[arg(long, default_value = "auto")]
    pub restart: String,
    #[arg(long)]
    pub adopt: bool,
}

#[derive(Debug, Clone, clap::Args)]
pub struct RevertOptions {
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long, default_value = "auto")]
    pub restart: String,
    #[arg(long, value_enum, default_value_t = OutputFormat::Text)]
    pub output: OutputFormat,
}

pub fn plan(_o: &PlanOptions) -> u8 {
    crate::exit::RUNTIME_FAILURE
}
pub fn apply(_o: &ApplyOptions) -> u8 {
    crate::exit::RUNTIME_FAILURE
}
pub fn revert(_o: &RevertOptions) -> u8 {
    crate::exit::RUNTIME_FAILURE
}
