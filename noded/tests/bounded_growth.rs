//! Unbounded growth (issue 12, item 8): label sets, queues and buffers fed from outside noded stay
//! bounded, and blocking work does not stall the async workers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use noded::metrics::{OTHER_HANDLER, openmetrics_to_prometheus_text};
use noded::observe::PENDING_MAX;
use noded::vm::guest::{GuestConsole, GuestError, MAX_LINE};
use testkit::synthetic::{self, SyntheticNode};
use tokio::io::AsyncWriteExt;

fn handler_label_values(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .split("runtime_handler=\"")
        .skip(1)
        .filter_map(|r| r.split('"').next())
        .map(String::from)
        .collect();
    v.sort();
    v.dedup();
    v
}

/// 10 000 boot samples with distinct runtime names arrive while every scan fails (no procfs at the
/// configured root): the waiting queue stops at its cap and counts the drops; once scans work, every
/// unconfigured name is reported as `other` and the observer keeps no per-name state.
#[test]
fn ten_thousand_runtime_names_while_scans_fail_stay_bounded() {
    let tree = tempfile::tempdir().expect("tempdir");
    let obs = synthetic::observer_on(tree.path(), &["kata-qemu", "kata-qemu-warm"]);
    assert!(
        obs.observe_now().is_err(),
        "an empty root cannot be observed"
    );
    const N: usize = 10_000;
    for i in 0..N {
        obs.record_boot(&format!("runtime-{i}"), &format!("sandbox-{i}"), 1.0);
        if i % 1000 == 0 {
            assert!(obs.observe_now().is_err());
        }
    }
    let (pending, dropped) = obs.pending_boot_samples();
    assert_eq!(pending, PENDING_MAX);
    assert_eq!(dropped, (N - PENDING_MAX) as u64);
    assert!(obs.handler_keys() <= 3, "{}", obs.handler_keys());

    synthetic::generate(
        tree.path(),
        &SyntheticNode {
            vms: 3,
            other_processes: 0,
            ..SyntheticNode::default()
        },
    )
    .expect("synthetic /proc");
    for _ in 0..3 {
        obs.observe_now().expect("observe");
    }
    assert_eq!(obs.pending_boot_samples().0, 0);
    let text = openmetrics_to_prometheus_text(&obs.metrics().encode().expect("encode"));
    assert_eq!(
        handler_label_values(&text),
        ["kata-qemu", "kata-qemu-warm", OTHER_HANDLER],
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "noded_vm_boot_seconds_count{{runtime_handler=\"{OTHER_HANDLER}\",boot=\"cold\",outcome=\"ok\"}} {PENDING_MAX}"
        )),
        "{text}"
    );
    let names: Vec<String> = obs
        .handler_snapshots()
        .into_iter()
        .map(|h| h.runtime_handler)
        .collect();
    assert!(names.len() <= 3, "{names:?}");
    assert!(obs.handler_keys() <= 3, "{}", obs.handler_keys());
}

fn hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .expect("VmHWM")
}

/// A guest that writes without ever ending a line (1 MiB, then endlessly) gets a bounded error, at
/// once and without noded's memory following it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_line_without_newline_is_refused_not_buffered() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("console.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind console");
    let written = Arc::new(AtomicU64::new(0));
    let w = Arc::clone(&written);
    let guest = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.expect("accept");
        let chunk = vec![b'A'; 64 * 1024];
        // 1 MiB first, then as much as the reader takes: up to 512 MiB.
        for _ in 0..(512 * 16) {
            if s.write_all(&chunk).await.is_err() {
                break;
            }
            w.fetch_add(chunk.len() as u64, Ordering::Relaxed);
        }
    });
    let before = hwm_kib();
    let mut console = GuestConsole::connect(&path).await.expect("connect");
    let started = Instant::now();
    let r = console.ping(Duration::from_secs(20)).await;
    assert!(
        matches!(r, Err(GuestError::LineTooLong { limit: MAX_LINE })),
        "{r:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(console);
    let _ = guest.await;
    let grown = hwm_kib().saturating_sub(before);
    assert!(grown < 16 * 1024, "memory grew by {grown} KiB");
    assert!(
        written.load(Ordering::Relaxed) < 64 << 20,
        "the reader kept draining the endless line"
    );
}

/// A line just under the bound still works: the answer after it is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_but_bounded_lines_pass() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("console.sock");
    let listener = tokio::net::UnixListener::bind(&path).expect("bind console");
    let guest = tokio::spawn(async move {
        let (s, _) = listener.accept().await.expect("accept");
        let (r, mut w) = s.into_split();
        let mut lines = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(r));
        let req = lines.next_line().await.expect("read").expect("request");
        let nonce = req.split_whitespace().nth(1).expect("nonce").to_string();
        let noise = "k".repeat(MAX_LINE - 1);
        w.write_all(format!("{noise}\npong {nonce} 7\n").as_bytes())
            .await
            .expect("answer");
        w.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let mut console = GuestConsole::connect(&path).await.expect("connect");
    let a = console.ping(Duration::from_secs(5)).await.expect("answer");
    assert_eq!(a.counter, 7);
    guest.await.expect("guest");
}

/// `containerd --version` (here a binary that takes a second to answer) runs off the async
/// workers: a single-threaded runtime keeps ticking while it runs.
#[test]
fn containerd_version_does_not_block_the_runtime() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("containerd");
    std::fs::write(
        &bin,
        "#!/bin/sh\nsleep 1\necho 'containerd github.com/containerd/containerd 1.7.24 abcdef'\n",
    )
    .expect("write fake containerd");
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let ticks = Arc::new(AtomicU64::new(0));
        let t = Arc::clone(&ticks);
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(10)).await;
                t.fetch_add(1, Ordering::Relaxed);
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let at_start = ticks.load(Ordering::Relaxed);
        let started = Instant::now();
        let v = noded::containerd::version::ContainerdVersion::detect_running(
            None,
            &bin,
            &dir.path().join("version-cache.json"),
        )
        .await
        .expect("version");
        let took = started.elapsed();
        let during = ticks.load(Ordering::Relaxed) - at_start;
        ticker.abort();
        assert_eq!((v.major, v.minor), (1, 7));
        assert!(took >= Duration::from_millis(900), "{took:?}");
        assert!(
            during >= 30,
            "the runtime ticked {during} times in {took:?}: `containerd --version` blocked it"
        );
    });
}
