//! Benchmark: `/metrics` scrape time with many VMs on the node, and the serving daemon's RSS.
//!
//! The server is the real `noded run` code path (`noded::daemon::run_cli`) in a child process, with
//! `observe.proc_root` pointing at a synthetic /proc tree of `--vms` Kata sandboxes (shim + QEMU +
//! virtiofsd each) and a 1 s scan interval, so scrapes race with scans as they do on a busy node.
//! Besides the HTTP scrape, the in-process cost of one observation round (scan + accounting +
//! metrics update) and of one render are measured on the same tree.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use noded::metrics::Metrics;
use noded::observe::{Observer, ObserverConfig};
use testkit::synthetic::{self, SyntheticNode};

use crate::report::{Stats, emit};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Synthetic VMs on the node.
    #[arg(long, default_value_t = 500)]
    vms: u32,
    /// Timed scrapes of /metrics.
    #[arg(long, default_value_t = 300)]
    scrapes: usize,
    /// Timed in-process observation rounds.
    #[arg(long, default_value_t = 30)]
    rounds: usize,
    /// Internal: run as the serving daemon with this noded.toml.
    #[arg(long, hide = true)]
    serve_config: Option<PathBuf>,
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn run(args: &Args) -> anyhow::Result<()> {
    if let Some(config) = &args.serve_config {
        let code = noded::daemon::run_cli(Some(config));
        std::process::exit(i32::from(code));
    }
    let tmp = tempfile::tempdir()?;
    let proc_root = tmp.path().join("proc");
    std::fs::create_dir(&proc_root)?;
    let node = SyntheticNode {
        vms: args.vms,
        ..SyntheticNode::default()
    };
    synthetic::generate(&proc_root, &node)?;

    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let config = write_config(tmp.path(), &proc_root, addr)?;
    let mut server = Server(
        Command::new(std::env::current_exe()?)
            .args(["metrics", "--serve-config"])
            .arg(&config)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .context("start the serving daemon")?,
    );
    wait_for_vms(&mut server, addr, args.vms)?;

    let mut scrape = Vec::with_capacity(args.scrapes);
    let mut bytes = 0;
    for _ in 0..args.scrapes {
        let t = Instant::now();
        let body = get(addr, "/metrics")?;
        scrape.push(t.elapsed());
        bytes = body.len();
    }
    let (rss_kib, hwm_kib) = rss_of(server.0.id())?;
    drop(server);

    // In-process: one observation round (scan + accounting + gauges) and one render.
    let mut cfg = ObserverConfig::from_config(&noded::config::NodedConfig::load(&config)?);
    cfg.proc_root = proc_root.clone();
    let metrics = Arc::new(Metrics::new(cfg.metrics_scope()));
    let observer = Observer::new(cfg, Arc::clone(&metrics));
    let mut observe = Vec::with_capacity(args.rounds);
    let mut render = Vec::with_capacity(args.rounds);
    for _ in 0..args.rounds {
        let t = Instant::now();
        let scan = observer.observe_now()?;
        observe.push(t.elapsed());
        if scan.sandboxes.len() != args.vms as usize {
            bail!(
                "scan found {} sandboxes, expected {}",
                scan.sandboxes.len(),
                args.vms
            );
        }
        let t = Instant::now();
        let _ = metrics.encode()?;
        render.push(t.elapsed());
    }

    let scrape = Stats::of(&scrape);
    let observe = Stats::of(&observe);
    let render = Stats::of(&render);
    let rss_mib = rss_kib as f64 / 1024.0;
    let hwm_mib = hwm_kib as f64 / 1024.0;
    let json = serde_json::json!({
        "bench": "metrics",
        "vms": args.vms,
        "processes": args.vms * 3 + node.other_processes,
        "scrape": scrape,
        "scrape_bytes": bytes,
        "observe_round": observe,
        "render": render,
        "server_rss_mib": rss_mib,
        "server_peak_rss_mib": hwm_mib,
        "targets": {"scrape_ms": 50, "rss_mib": 30},
    });
    let rows = vec![
        (
            "VMs (processes scanned)".into(),
            format!("{} ({})", args.vms, args.vms * 3 + node.other_processes),
        ),
        (
            "scrape median / p99 ms".into(),
            format!(
                "{:.2} / {:.2}  (n={}, {} bytes)",
                scrape.median_ms, scrape.p99_ms, scrape.n, bytes
            ),
        ),
        (
            "observe round median / p99 ms".into(),
            format!(
                "{:.2} / {:.2}  (scan+account+gauges)",
                observe.median_ms, observe.p99_ms
            ),
        ),
        (
            "render median / p99 ms".into(),
            format!("{:.3} / {:.3}", render.median_ms, render.p99_ms),
        ),
        (
            "server RSS / peak MiB".into(),
            format!("{rss_mib:.1} / {hwm_mib:.1}"),
        ),
    ];
    emit("metrics scrape", &json, &rows);
    Ok(())
}

fn write_config(dir: &Path, proc_root: &Path, addr: SocketAddr) -> anyhow::Result<PathBuf> {
    let d = dir.display();
    let text = format!(
        r#"[daemon]
data_dir = "{d}/data"
run_dir = "{d}/run"
api_socket = "{d}/run/noded.sock"
metrics_listen = "{addr}"
log_format = "text"

[containerd]
config = "{d}/containerd/config.toml"
socket = "{d}/containerd/containerd.sock"
runtimes = ["kata-qemu", "kata-qemu-warm"]
private = false
apply_on_start = false

[kubernetes]
enabled = false

[observe]
proc_root = "{p}"
interval_seconds = 1
"#,
        p = proc_root.display()
    );
    let path = dir.join("noded.toml");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Waits until the daemon serves and its first scan has counted every VM.
fn wait_for_vms(server: &mut Server, addr: SocketAddr, vms: u32) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = server.0.try_wait()? {
            bail!("the serving daemon exited early: {status}");
        }
        if let Ok(body) = get(addr, "/metrics") {
            let counted: u64 = body
                .lines()
                .filter(|l| l.starts_with("noded_vms{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                .sum();
            if counted == u64::from(vms) {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            bail!("the daemon did not report {vms} VMs within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// GET with the Accept header Prometheus sends; returns the body.
fn get(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let raw = String::from_utf8(raw)?;
    let (head, body) = raw.split_once("\r\n\r\n").context("no HTTP head")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("GET {path}: {}", head.lines().next().unwrap_or(""));
    }
    Ok(body.to_string())
}

fn rss_of(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| {
                l.strip_prefix(k)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
    };
    Ok((field("VmRSS:"), field("VmHWM:")))
}
