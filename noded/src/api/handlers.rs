//! The handler part of Status: the observer's per-handler snapshots as protobuf rows, and the
//! table `noded status` prints from them. Lives in the API layer so the observer exposes plain
//! data and never depends on the protobuf types (no api <-> observe cycle).

use std::fmt::Write as _;

use super::{StatusProvider, pb};
use crate::observe::{HandlerSnapshot, Observer};

/// One handler's row of the Status RPC.
pub fn handler_status(h: &HandlerSnapshot) -> pb::HandlerStatus {
    pb::HandlerStatus {
        runtime_handler: h.runtime_handler.clone(),
        ready: h.ready,
        last_probe_error: h
            .probe
            .as_ref()
            .and_then(|p| p.error.clone())
            .unwrap_or_default(),
        last_probe_seconds: h.probe.as_ref().map_or(0.0, |p| p.seconds),
        slots_total: h.slots_total,
        slots_free: h.slots_free,
        vms: h.vms,
        vms_template: h.vms_template,
        vms_cold: h.vms_cold,
        pss_bytes: h.memory.pss,
        rss_bytes: h.memory.rss,
        private_bytes: h.memory.private,
        boot_p50_seconds: h.boot_p50_seconds.unwrap_or(0.0),
        boot_p90_seconds: h.boot_p90_seconds.unwrap_or(0.0),
    }
}

/// The handler part of the Status RPC (`noded status`).
impl StatusProvider for Observer {
    fn fill(&self, status: &mut pb::StatusResponse) {
        status.handlers = self
            .handler_snapshots()
            .iter()
            .map(handler_status)
            .collect();
    }
}

/// The handler table of `noded status` (from the Status RPC's handlers).
pub fn render_handler_table(handlers: &[pb::HandlerStatus]) -> String {
    fn mib(b: u64) -> String {
        format!("{:.0}Mi", b as f64 / (1024.0 * 1024.0))
    }
    fn ms(s: f64) -> String {
        if s > 0.0 {
            format!("{:.0}ms", s * 1e3)
        } else {
            "-".into()
        }
    }
    let header = [
        "HANDLER", "READY", "SLOTS", "VMS", "TEMPLATE", "COLD", "PSS", "RSS", "PRIVATE",
        "BOOT-P50", "BOOT-P90", "PROBE",
    ];
    let rows: Vec<[String; 12]> = handlers
        .iter()
        .map(|h| {
            let probe = if h.ready {
                format!("ok {}", ms(h.last_probe_seconds))
            } else if h.last_probe_error.is_empty() {
                "not proven".into()
            } else {
                format!("failed: {}", h.last_probe_error)
            };
            [
                h.runtime_handler.clone(),
                if h.ready { "yes" } else { "no" }.into(),
                format!("{}/{}", h.slots_free, h.slots_total),
                h.vms.to_string(),
                h.vms_template.to_string(),
                h.vms_cold.to_string(),
                mib(h.pss_bytes),
                mib(h.rss_bytes),
                mib(h.private_bytes),
                ms(h.boot_p50_seconds),
                ms(h.boot_p90_seconds),
                probe,
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let last = cells.len() - 1;
        for (i, (c, w)) in cells.iter().zip(&widths).enumerate() {
            if i == last {
                let _ = write!(out, "{c}");
            } else {
                let _ = write!(out, "{c:<w$}  ");
            }
        }
        out.push('\n');
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}
