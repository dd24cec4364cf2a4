//! Benchmarks. Each prints one JSON object on stdout and a human table on stderr; variants that are
//! compared (clone vs cold boot, ...) run side by side in one invocation because the machines are noisy.

mod apply;
mod kata_warm;
mod metrics;
mod nodeboot;
mod ready;
mod report;
mod template;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "perf")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// `noded containerd apply` on an already-configured file (no-change path).
    Apply(apply::Args),
    /// Cold boot vs template clone of the same guest, memory, pool acquire.
    Template(template::Args),
    /// `/metrics` scrape time with many synthetic VMs, daemon RSS.
    Metrics(metrics::Args),
    /// `noded run` start → runtime proven → startup taint removed.
    Ready(ready::Args),
    /// Node-in-a-box: installer boot → DaemonSet pod → taint lifted, per containerd series; fault run.
    Nodeboot(nodeboot::Args),
    /// Node-in-a-box with the bootable fake Kata: warm (template clone) vs cold pod sandbox start
    /// through CRI, and the template rebuild after a reboot.
    KataWarm(kata_warm::Args),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().bench {
        Bench::Apply(a) => apply::run(&a),
        Bench::Template(a) => template::run(&a),
        Bench::Metrics(a) => metrics::run(&a),
        Bench::Ready(a) => ready::run(&a),
        Bench::Nodeboot(a) => nodeboot::run(&a),
        Bench::KataWarm(a) => kata_warm::run(&a),
    }
}
