//! Benchmark: apply (being built; see the issue tracker).

#[derive(Debug, clap::Args)]
pub struct Args {}

pub fn run(_args: &Args) -> anyhow::Result<()> {
    anyhow::bail!("the apply benchmark is not built yet")
}
