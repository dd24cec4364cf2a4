//! Helpers for the observe / metrics tests: processes killed on drop, a tiny HTTP/1.1 GET.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A child process (group) killed and reaped when dropped, also when the test fails.
pub struct Proc(pub Child);

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // Own process group so helpers the child starts die with it.
        cmd.process_group(0);
        Proc(cmd.spawn().expect("spawn test process"))
    }

    pub fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).expect("pid fits i32")
    }

    pub fn kill(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.pid());
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `bash -c 'exec -a ARGV0 sleep 600'`-like: a process whose command line starts with `argv0` and
/// carries `args`, that does nothing. A script (`script`) runs instead of sleeping when given.
pub fn named_process(argv0: &str, args: &[&str], script: &str) -> Proc {
    let body = if script.is_empty() {
        "sleep 600; true"
    } else {
        script
    };
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("exec -a {argv0} bash -c '{body}' \"$@\""))
        .arg("bash")
        .args(args);
    Proc::spawn(&mut cmd)
}

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
