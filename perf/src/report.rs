//! Shared statistics and output for every benchmark.
#![allow(dead_code)] // used by the benchmarks as they land

use std::time::Duration;

/// Summary of a sample of durations, in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Stats {
    pub n: usize,
    pub min_ms: f64,
    pub median_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Stats {
    pub fn of(samples: &[Duration]) -> Stats {
        let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
        ms.sort_by(f64::total_cmp);
        let pick = |q: f64| -> f64 {
            if ms.is_empty() {
                return f64::NAN;
            }
            // Nearest-rank percentile: with few samples p99 is the maximum, which is the honest answer.
            // Float-to-int `as` saturates: a rank outside 1..=len is clamped just below.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let rank = (q * ms.len() as f64).ceil() as usize;
            ms[rank.clamp(1, ms.len()) - 1]
        };
        Stats {
            n: ms.len(),
            min_ms: ms.first().copied().unwrap_or(f64::NAN),
            median_ms: pick(0.5),
            p90_ms: pick(0.9),
            p99_ms: pick(0.99),
            max_ms: ms.last().copied().unwrap_or(f64::NAN),
        }
    }
}

/// Prints `json` on stdout and a `name | value` table on stderr.
pub fn emit(title: &str, json: &serde_json::Value, rows: &[(String, String)]) {
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    eprintln!("== {title} ==");
    for (k, v) in rows {
        eprintln!("{k:<width$}  {v}");
    }
    println!("{json}");
}

/// Runs an async benchmark on the runtime shape noded uses (2 workers).
pub fn block_on<F: std::future::Future<Output = anyhow::Result<()>>>(f: F) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(f)
}

/// `--series 1.6|1.7|2.1`.
pub fn parse_series(s: &str) -> Result<testkit::containerd::Series, String> {
    testkit::containerd::Series::all()
        .into_iter()
        .find(|x| x.name() == s)
        .ok_or_else(|| format!("unknown series `{s}` (1.6, 1.7, 2.1)"))
}
