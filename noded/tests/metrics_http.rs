//! `/metrics`, `/healthz`, `/readyz` served by `noded run`, checked by promtool and scraped by a real
//! Prometheus.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use noded::metrics::FAMILIES;
use testkit::prometheus::Prometheus;
use testkit::scrape::http_get;
use testkit::synthetic;

const OPENMETRICS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

#[test]
fn metrics_endpoint_formats_and_promtool_is_clean() {
    let Some(promtool) = common::require("promtool") else {
        return;
    };
    let d = synthetic::serve(20);
    synthetic::exercise(&d.observer);

    let om = http_get(d.addr, "/metrics", OPENMETRICS_ACCEPT);
    assert_eq!(om.status, 200);
    assert_eq!(
        om.content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(om.body.ends_with("# EOF\n"), "{}", om.body);
    assert!(om.body.contains("# TYPE noded_template_hits counter"));

    let text = http_get(d.addr, "/metrics", "text/plain");
    assert_eq!(text.status, 200);
    assert!(text.content_type.starts_with("text/plain; version=0.0.4"));
    for family in FAMILIES {
        assert!(
            text.body
                .lines()
                .any(|l| !l.starts_with('#') && l.starts_with(family)),
            "{family} missing:\n{}",
            text.body
        );
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let file = tmp.path().join("metrics.txt");
    std::fs::write(&file, &text.body).expect("write");
    let out = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(std::fs::File::open(&file).expect("open"))
        .output()
        .expect("run promtool");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}"
    );
}

#[test]
fn healthz_and_readyz_follow_the_probes() {
    let d = synthetic::serve(3);
    let h = http_get(d.addr, "/healthz", "*/*");
    assert_eq!((h.status, h.body.as_str()), (200, "ok\n"));

    let r = http_get(d.addr, "/readyz", "*/*");
    assert_eq!(r.status, 503);
    assert!(
        r.body.contains("kata-qemu: no probe has run yet"),
        "{}",
        r.body
    );

    d.observer
        .record_probe("kata-qemu", true, Duration::from_millis(800), None);
    d.observer.record_probe(
        "kata-qemu-warm",
        false,
        Duration::from_millis(12),
        Some("failed to start shim: binary not installed".into()),
    );
    let r = http_get(d.addr, "/readyz", "*/*");
    assert_eq!(r.status, 503);
    assert!(
        r.body
            .contains("kata-qemu-warm: failed to start shim: binary not installed"),
        "{}",
        r.body
    );
    assert!(!r.body.contains("kata-qemu:"), "{}", r.body);

    d.observer
        .record_probe("kata-qemu-warm", true, Duration::from_millis(700), None);
    let r = http_get(d.addr, "/readyz", "*/*");
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
    let m = http_get(d.addr, "/metrics", "text/plain").body;
    assert!(
        m.contains("noded_runtime_ready{runtime_handler=\"kata-qemu-warm\"} 1"),
        "{m}"
    );
    assert!(m.contains("noded_vm_boot_seconds_count{runtime_handler=\"kata-qemu-warm\",boot=\"template\",outcome=\"failed\"} 1"), "{m}");

    // A proven node stays ready while a failure streak is below probe.failure_threshold (3), as the
    // node taint stays off; at the threshold both say not ready.
    for n in 1..=3 {
        d.observer.record_probe(
            "kata-qemu",
            false,
            Duration::from_millis(10),
            Some("shim died".into()),
        );
        let r = http_get(d.addr, "/readyz", "*/*");
        let want = if n < 3 { 200 } else { 503 };
        assert_eq!(r.status, want, "after {n} failure(s): {}", r.body);
    }
    let r = http_get(d.addr, "/readyz", "*/*");
    assert!(r.body.contains("kata-qemu: shim died"), "{}", r.body);
    d.observer
        .record_probe("kata-qemu", true, Duration::from_millis(700), None);
    assert_eq!(http_get(d.addr, "/readyz", "*/*").status, 200);
}

/// Metric names Prometheus has stored, or None while it is starting.
fn stored_names(p: &Prometheus) -> Option<Vec<String>> {
    let r = std::panic::catch_unwind(|| http_get(p.addr(), "/api/v1/label/__name__/values", "*/*"))
        .ok()?;
    if r.status != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&r.body).ok()?;
    Some(
        v["data"]
            .as_array()?
            .iter()
            .filter_map(|n| n.as_str().map(String::from))
            .collect(),
    )
}

#[test]
fn real_prometheus_scrapes_every_family() {
    if common::require("prometheus").is_none() {
        return;
    }
    let d = synthetic::serve(50);
    synthetic::exercise(&d.observer);
    let prom = Prometheus::start(&[&d.addr.to_string()]).expect("prometheus starts");
    // Histograms are stored as _bucket/_sum/_count series.
    let expected: Vec<String> = FAMILIES
        .iter()
        .map(|f| {
            if f.ends_with("_seconds") {
                format!("{f}_count")
            } else {
                f.to_string()
            }
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut missing = expected.clone();
    while Instant::now() < deadline {
        if let Some(names) = stored_names(&prom) {
            missing = expected
                .iter()
                .filter(|e| !names.contains(e))
                .cloned()
                .collect();
            if missing.is_empty() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(missing.is_empty(), "Prometheus never stored {missing:?}");
    // The values made it too, not only the names.
    let q = http_get(prom.addr(), "/api/v1/query?query=sum(noded_vms)", "*/*");
    let v: serde_json::Value = serde_json::from_str(&q.body).expect("query json");
    assert_eq!(v["data"]["result"][0]["value"][1], "50", "{}", q.body);
}

#[test]
fn noded_status_shows_handler_figures_as_table_and_json() {
    let d = synthetic::serve(4);
    synthetic::exercise(&d.observer);
    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("noded.sock");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = {
        let _enter = d.rt.enter();
        let listener = noded::api::bind(&socket).expect("bind api socket");
        let service =
            noded::api::NodeService::new(None).with_provider(Arc::clone(&d.observer) as _);
        d.rt.spawn(noded::api::serve(listener, service, async {
            let _ = stopped.await;
        }))
    };

    let out = assert_cmd::Command::cargo_bin("noded")
        .expect("noded binary")
        .args(["status", "--socket"])
        .arg(&socket)
        .output()
        .expect("noded status");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let header = table
        .lines()
        .find(|l| l.starts_with("HANDLER"))
        .unwrap_or_else(|| panic!("no handler table:\n{table}"));
    for col in ["SLOTS", "VMS", "PSS", "BOOT-P50", "BOOT-P90", "PROBE"] {
        assert!(header.contains(col), "{header}");
    }
    let warm = table
        .lines()
        .find(|l| l.starts_with("kata-qemu-warm "))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(warm.contains("failed: no runtime for"), "{warm}");
    assert!(
        warm.contains("70ms"),
        "boot p50 of the recorded 70 ms boot: {warm}"
    );

    let out = assert_cmd::Command::cargo_bin("noded")
        .expect("noded binary")
        .args(["status", "--output", "json", "--socket"])
        .arg(&socket)
        .output()
        .expect("noded status --output json");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    let handlers = v["handlers"].as_array().expect("handlers");
    let warm = handlers
        .iter()
        .find(|h| h["runtime_handler"] == "kata-qemu-warm")
        .expect("warm handler in JSON");
    assert_eq!(warm["vms_template"], 2, "{warm}");
    assert_eq!(warm["ready"], false);
    assert!(warm["slots_total"].as_u64().expect("slots") > 0, "{warm}");
    assert!(warm["pss_bytes"].as_u64().expect("pss") > 0, "{warm}");
    let cold = handlers
        .iter()
        .find(|h| h["runtime_handler"] == "kata-qemu")
        .expect("kata-qemu in JSON");
    assert_eq!(
        (cold["vms_cold"].as_u64(), cold["ready"].as_bool()),
        (Some(2), Some(true))
    );
    let _ = stop.send(());
    let _ = d.rt.block_on(server);
}
