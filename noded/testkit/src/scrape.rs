//! Reads a noded `/metrics` endpoint the way a quick check does (one GET, Prometheus text) and picks
//! samples out of it. For a real scraper see [`crate::prometheus`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Result;

/// The DaemonSet pod's `/metrics` on the node (hostNetwork: port 9464, from the manifest).
pub const NODE_METRICS: &str = "127.0.0.1:9464";

/// One `GET /metrics` on `addr`; the whole response (headers included) as text.
pub fn scrape(addr: &str) -> Result<String> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: node\r\nConnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

/// Polls `done` every 200 ms until it holds (returns how long that took) or `timeout` passes.
pub async fn wait_until(
    timeout: Duration,
    what: &str,
    mut done: impl FnMut() -> bool,
) -> Result<Duration> {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if done() {
            return Ok(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    anyhow::bail!("{what}: not reached within {timeout:?}")
}

/// Scrapes the node's `/metrics` every 500 ms until `name{labels}` is at least `at_least`.
pub async fn wait_node_metric(
    name: &str,
    labels: &[(&str, &str)],
    at_least: f64,
    timeout: Duration,
) -> Result<()> {
    let start = std::time::Instant::now();
    let mut last = String::new();
    while start.elapsed() < timeout {
        if let Ok(m) = scrape(NODE_METRICS) {
            if metric(&m, name, labels).is_some_and(|v| v >= at_least) {
                return Ok(());
            }
            last = grep(&m, name);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    anyhow::bail!("{name}{labels:?} never reached {at_least}: {last}")
}

/// The sum of the samples `name{…}` whose labels include every pair of `labels`; `None` if none.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if !labels
            .iter()
            .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        let Some(value) = rest.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else {
            continue;
        };
        found = Some(found.unwrap_or(0.0) + value);
    }
    found
}

/// Every sample line of `name`, joined (for error messages).
pub fn grep(text: &str, name: &str) -> String {
    text.lines()
        .filter(|l| l.starts_with(name))
        .collect::<Vec<_>>()
        .join(" | ")
}

/// One HTTP response as [`http_get`] reads it.
pub struct HttpResponse {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// GET `path` from `addr` with an `Accept` header (HTTP/1.1, Connection: close).
pub fn http_get(addr: SocketAddr, path: &str, accept: &str) -> HttpResponse {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )
    .expect("send");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read");
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("http head");
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    HttpResponse {
        status,
        content_type,
        body,
    }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n + 2 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

/// A free TCP port on loopback (released before returning; fine for a test's own server).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_and_sums_labelled_samples() {
        let text = "# HELP x\nnoded_b_total{outcome=\"ok\"} 2\nnoded_b_total{outcome=\"failed\"} 1\nnoded_b_total_x 9\nnoded_c 4\n";
        assert_eq!(metric(text, "noded_b_total", &[]), Some(3.0));
        assert_eq!(
            metric(text, "noded_b_total", &[("outcome", "ok")]),
            Some(2.0)
        );
        assert_eq!(metric(text, "noded_c", &[]), Some(4.0));
        assert_eq!(metric(text, "noded_d", &[]), None);
    }
}
