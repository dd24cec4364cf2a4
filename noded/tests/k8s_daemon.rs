//! `noded run` with Kubernetes enabled but the API server unreachable: metrics and health keep being
//! served (the publisher is its own task) and SIGTERM stops the daemon cleanly.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::scrape::free_port;

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// GET `path`; `None` while nothing listens yet.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let code = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, out))
}

fn wait_http(port: u16, path: &str) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(r) = http_get(port, path) {
            return r;
        }
        assert!(Instant::now() < deadline, "{path} never answered");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn api_server_down_does_not_stop_metrics_or_health() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Something that refuses connections: a port we bound and released.
    let dead_api = free_port();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: http://127.0.0.1:{dead_api}\n\
             contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\ncurrent-context: c\nusers:\n- name: u\n  user:\n    token: t\n"
        ),
    )
    .expect("kubeconfig");
    let port = free_port();
    let data = dir.path().join("data");
    let config = dir.path().join("noded.toml");
    std::fs::write(
        &config,
        format!(
            "[daemon]\ndata_dir = \"{d}\"\nrun_dir = \"{d}/run\"\napi_socket = \"{d}/run/noded.sock\"\n\
             metrics_listen = \"127.0.0.1:{port}\"\nlog_format = \"text\"\n\n\
             [containerd]\nconfig = \"{d}/containerd/config.toml\"\nruntimes = [\"kata-qemu\"]\n\
             socket = \"{d}/containerd/containerd.sock\"\nprivate = false\napply_on_start = false\n\n\
             [probe]\nhandlers = [\"runc\"]\n\n\
             [kubernetes]\nenabled = true\nnode_name = \"kata-node-1\"\n",
            d = data.display()
        ),
    )
    .expect("config");
    let stderr_path = dir.path().join("noded.stderr");
    let stderr_text = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let child = Command::new(env!("CARGO_BIN_EXE_noded"))
        .args(["run", "--config"])
        .arg(&config)
        .env("KUBECONFIG", &kubeconfig)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
        .spawn()
        .expect("spawn noded");
    let mut daemon = Daemon(child);

    let (code, _) = wait_http(port, "/healthz");
    assert_eq!(code, 200);
    let (code, body) = wait_http(port, "/metrics");
    assert_eq!(code, 200);
    assert!(body.contains("noded_"), "{body}");
    // Still serving after the publisher has failed a few times against the dead API server. Its
    // syncs run in its own task: waited for, not a fixed time after /metrics first answered.
    let deadline = Instant::now() + Duration::from_secs(60);
    while stderr_text().matches("Kubernetes sync failed").count() < 2 {
        assert!(
            Instant::now() < deadline,
            "the publisher did not fail twice against the dead API server within 60 s:\n{}",
            stderr_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(wait_http(port, "/healthz").0, 200);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(daemon.0.id()).expect("pid")),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    let status = daemon.0.wait().expect("wait");
    let stderr = stderr_text();
    assert!(
        status.success(),
        "noded exited with {status}; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains("Kubernetes sync failed"),
        "the publisher must have tried and failed against the dead API server:\n{stderr}"
    );
    assert!(
        stderr.contains("node left as it is"),
        "shutdown must leave the node alone:\n{stderr}"
    );
}
