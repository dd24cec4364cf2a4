//! A real Prometheus (Debian's `prometheus`) scraping given targets every second, for tests that prove
//! what a cluster's Prometheus would see.

use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    /// Starts Prometheus with one job `noded` scraping `targets` (host:port) every second.
    pub fn start(targets: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("testkit-prom-")
            .tempdir_in("/tmp")?;
        let config = dir.path().join("prometheus.yml");
        let list = targets
            .iter()
            .map(|t| format!("'{t}'"))
            .collect::<Vec<_>>()
            .join(", ");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: noded\n    static_configs:\n      - targets: [{list}]\n"
            ),
        )?;
        // Bind-and-release picks a free port; Prometheus binds it right after.
        let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("spawn prometheus (Debian package `prometheus`)")?;
        Ok(Self {
            child,
            addr,
            _dir: dir,
        })
    }

    /// Where its HTTP API listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Instant query; the `data.result` array.
    pub async fn query(&self, q: &str) -> Result<Vec<serde_json::Value>> {
        let encoded: String = q
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let body = http_get(self.addr, &format!("/api/v1/query?query={encoded}")).await?;
        let v: serde_json::Value =
            serde_json::from_str(&body).with_context(|| format!("query {q}: {body}"))?;
        Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Polls `q` until it returns at least one series.
    pub async fn wait_query(&self, q: &str, timeout: Duration) -> Result<Vec<serde_json::Value>> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match self.query(q).await {
                Ok(r) if !r.is_empty() => return Ok(r),
                Ok(_) => last = "empty result".into(),
                Err(e) => last = format!("{e:#}"),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        bail!("Prometheus query `{q}` had no data after {timeout:?}: {last}")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A minimal HTTP/1.0 GET (Prometheus' API on loopback): the body.
async fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf);
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default())
}
