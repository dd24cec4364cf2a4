//! Every PromQL expression of daemonset/ (dashboard panels and alert rules) evaluated by a real
//! Prometheus scraping noded's real /metrics server (the daemon's HTTP server and observer, fed by a
//! synthetic /proc as in metrics_http.rs): no error, and data returned.

mod common;
#[path = "common/observe.rs"]
mod observe_util;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use noded::metrics::{ApplyOutcome, BuildOutcome, Metrics};
use noded::observe::{Observer, ObserverConfig};
use observe_util::{Proc, free_port, http_get};
use testkit::synthetic::{self, SyntheticNode};

/// `noded run` on a config whose /proc is a synthetic tree, in a thread of this test process, so
/// the test controls probes and events through the same `Observer` the daemon serves.
struct Daemon {
    addr: SocketAddr,
    observer: Arc<Observer>,
    _rt: tokio::runtime::Runtime,
    _tree: tempfile::TempDir,
}

fn start_daemon(vms: u32) -> Daemon {
    let tree = tempfile::tempdir().expect("tempdir");
    let proc_root = tree.path().join("proc");
    std::fs::create_dir(&proc_root).expect("proc dir");
    synthetic::generate(
        &proc_root,
        &SyntheticNode {
            vms,
            other_processes: 10,
            ..SyntheticNode::default()
        },
    )
    .expect("synthetic proc");
    let mut config = noded::config::NodedConfig::local_default().expect("default config");
    config.templates[0].runtime_handler = "kata-qemu-warm".into();
    config.probe.handlers = vec!["kata-qemu".into(), "kata-qemu-warm".into()];
    config.observe.proc_root = proc_root;
    let observe_config = ObserverConfig::from_config(&config);
    let metrics = Arc::new(Metrics::new(observe_config.metrics_scope()));
    let observer = Arc::new(Observer::new(observe_config, metrics));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = rt
        .block_on(noded::http::bind(SocketAddr::from(([127, 0, 0, 1], 0))))
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    rt.spawn(noded::http::serve(
        listener,
        Arc::clone(&observer),
        std::future::pending(),
    ));
    rt.spawn(Arc::clone(&observer).run(Duration::from_millis(500)));
    Daemon {
        addr,
        observer,
        _rt: rt,
        _tree: tree,
    }
}

/// Drives every code path that feeds a family, as the daemon's components do.
fn exercise(observer: &Observer) {
    let m = observer.metrics();
    m.record_apply(ApplyOutcome::Changed);
    m.record_apply(ApplyOutcome::Unchanged);
    m.record_containerd_restart();
    m.record_template_build(BuildOutcome::Ok);
    m.set_template_ready("default", true);
    m.set_template_pool("default", 2, 2);
    m.observe_template_acquire(0.0012);
    observer.record_boot("kata-qemu-warm", &synthetic::sandbox_id(0), 0.07);
    observer.record_probe("kata-qemu", true, Duration::from_millis(900), None);
    observer.record_probe(
        "kata-qemu-warm",
        false,
        Duration::from_millis(15),
        Some("no runtime for \"kata-qemu-warm\" is configured".into()),
    );
    observer.observe_now().expect("observe");
}

struct Prometheus {
    _proc: Proc,
    addr: SocketAddr,
}

fn start_prometheus(dir: &Path, target: SocketAddr) -> Prometheus {
    let config = dir.join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: noded\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .expect("prometheus config");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let proc = Proc::spawn(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .current_dir(dir),
    );
    Prometheus { _proc: proc, addr }
}

fn encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn query(p: &Prometheus, q: &str) -> serde_json::Value {
    let r = http_get(p.addr, &format!("/api/v1/query?query={}", encode(q)), "*/*");
    serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{q}: {e}: {}", r.body))
}

/// Alert expressions filter with a threshold (empty when healthy); `bool` keeps every series so the
/// test sees whether the expression has data at all. Only scalar comparisons (operator then digit).
fn with_bool(expr: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let two: String = chars[i..(i + 2).min(chars.len())].iter().collect();
        let op_len = if ["==", ">=", "<="].contains(&two.as_str()) {
            2
        } else if chars[i] == '>' || chars[i] == '<' {
            1
        } else {
            0
        };
        if op_len > 0 {
            let rest: String = chars[i + op_len..].iter().collect();
            if rest.trim_start().starts_with(|c: char| c.is_ascii_digit()) {
                out.push_str(&chars[i..i + op_len].iter().collect::<String>());
                out.push_str(" bool");
                i += op_len;
                continue;
            }
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

fn daemonset_exprs() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemonset");
    let mut exprs = Vec::new();
    let dash: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("dashboards/noded.json")).expect("dashboard"),
    )
    .expect("json");
    for p in dash["panels"].as_array().expect("panels") {
        for t in p["targets"].as_array().expect("targets") {
            let e = t["expr"]
                .as_str()
                .expect("expr")
                .replace("$__rate_interval", "1m")
                .replace("$node", ".*");
            exprs.push((format!("panel {}", p["title"]), e));
        }
    }
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(dir.join("prometheusrule.yaml"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rule: serde_json::Value = serde_json::from_slice(&out.stdout).expect("rule json");
    for g in rule["spec"]["groups"].as_array().expect("groups") {
        for r in g["rules"].as_array().expect("rules") {
            exprs.push((
                format!("alert {}", r["alert"]),
                r["expr"].as_str().expect("expr").to_owned(),
            ));
        }
    }
    exprs
}

#[test]
fn every_dashboard_and_alert_expression_returns_data_from_a_real_prometheus() {
    if common::require("prometheus").is_none() || common::require("python3").is_none() {
        return;
    }
    let exprs = daemonset_exprs();
    assert!(exprs.len() >= 15, "{exprs:?}");
    let d = start_daemon(20);
    exercise(&d.observer);
    let dir = tempfile::tempdir().expect("tempdir");
    let prom = start_prometheus(dir.path(), d.addr);
    // Wait until noded's series are stored and enough scrapes exist for rate() over 1m.
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut first = None;
    while Instant::now() < deadline {
        let ok = std::panic::catch_unwind(|| query(&prom, "count(noded_vms)")).ok();
        if ok.is_some_and(|v| {
            v["data"]["result"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
        }) {
            let since = *first.get_or_insert_with(Instant::now);
            if since.elapsed() > Duration::from_secs(6) {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(first.is_some(), "Prometheus never stored noded's series");
    // Counters move between scrapes so rate()/increase() have something to see.
    exercise(&d.observer);
    std::thread::sleep(Duration::from_secs(3));
    let mut failures = Vec::new();
    for (name, expr) in &exprs {
        for q in [expr.clone(), with_bool(expr)] {
            let v = query(&prom, &q);
            if v["status"] != "success" {
                failures.push(format!("{name}: error {v} for {q}"));
            }
        }
        let v = query(&prom, &with_bool(expr));
        if v["data"]["result"].as_array().is_none_or(Vec::is_empty) {
            failures.push(format!("{name}: no data for {}", with_bool(expr)));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
