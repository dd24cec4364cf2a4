//! Benchmark: template (being built; see the issue tracker).

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("the template benchmark is not built yet")
}
