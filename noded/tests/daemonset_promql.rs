//! Every PromQL expression of daemonset/ (dashboard panels and alert rules) evaluated by a real
//! Prometheus scraping noded's real /metrics server (the daemon's HTTP server and observer, fed by a
//! synthetic /proc as in metrics_http.rs): no error, and data returned.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::prometheus::Prometheus;
use testkit::scrape::http_get;
use testkit::synthetic;

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
    let r = http_get(
        p.addr(),
        &format!("/api/v1/query?query={}", encode(q)),
        "*/*",
    );
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
    let d = synthetic::serve(20);
    synthetic::exercise(&d.observer);
    let prom = Prometheus::start(&[&d.addr.to_string()]).expect("prometheus starts");
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
    synthetic::exercise(&d.observer);
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
