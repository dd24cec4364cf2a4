//! The /metrics server under hostile clients: half-sent requests are closed after the header-read
//! timeout, connections beyond the cap are closed, a slowloris plus a connection flood never stop a
//! real scrape, and /healthz reports a task that ended. The server is noded's own (`noded::http`) on
//! a 2-worker runtime like the daemon's; the clients are raw sockets in threads of this test.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use noded::http::{Health, Limits};
use noded::metrics::Metrics;
use noded::observe::{Observer, ObserverConfig};

const HALF_SENT: &[u8] = b"GET /metrics HTTP/1.1\r\nHost: victim\r\nUser-Agent: slow";

struct Server {
    addr: SocketAddr,
    health: Health,
    rt: tokio::runtime::Runtime,
}

fn observer() -> Arc<Observer> {
    let config = noded::config::NodedConfig::local_default().expect("default config");
    let observe_config = ObserverConfig::from_config(&config);
    let metrics = Arc::new(Metrics::new(observe_config.metrics_scope()));
    Arc::new(Observer::new(observe_config, metrics))
}

/// `serve` exactly as the daemon calls it (default limits), or `serve_router` with `limits`.
fn start(limits: Option<Limits>) -> Server {
    let (rt, listener, addr) = testkit::synthetic::runtime_with_listener(2);
    let health = Health::new();
    let observer = observer();
    match limits {
        None => {
            rt.spawn(noded::http::serve(
                listener,
                observer,
                std::future::pending(),
            ));
        }
        Some(limits) => {
            let app = noded::http::router_with_health(observer, health.clone());
            rt.spawn(noded::http::serve_router(
                listener,
                app,
                limits,
                std::future::pending(),
            ));
        }
    }
    Server { addr, health, rt }
}

/// One scrape on a fresh connection: status and body, or why it failed.
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let s = TcpStream::connect(addr).map_err(|e| format!("connect: {e}"))?;
    request(s, addr, path)
}

fn request(mut s: TcpStream, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| format!("read: {e}"))?;
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no HTTP head in {raw:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_string()))
}

/// Whether the server closed `s` (EOF or reset) within `wait`.
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).expect("timeout");
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
    }
}

fn half_open(addr: SocketAddr, send: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(send).expect("send half a request");
    s
}

/// A client socket bound to `ip` (any of 127.0.0.0/8 on Linux): a pod of its own, as the server sees it.
struct Client(tokio::runtime::Runtime);

impl Client {
    fn new() -> Self {
        Self(
            tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .expect("client runtime"),
        )
    }
    fn connect(&self, ip: [u8; 4], addr: SocketAddr) -> std::io::Result<TcpStream> {
        self.0.block_on(async {
            let s = tokio::net::TcpSocket::new_v4()?;
            s.bind(SocketAddr::from((ip, 0)))?;
            let s = s.connect(addr).await?.into_std()?;
            s.set_nonblocking(false)?;
            Ok(s)
        })
    }
}

/// Stops the attack threads also when an assertion fails.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A client that sends half its headers (or nothing) is closed after the header-read timeout: the
/// daemon's defaults (5 s), measured from the client's side.
#[test]
fn half_sent_requests_are_closed_after_the_header_timeout() {
    let server = start(None);
    let started = Instant::now();
    let mut slow: Vec<TcpStream> = (0..10)
        .map(|i| half_open(server.addr, if i % 2 == 0 { HALF_SENT } else { b"" }))
        .collect();
    for (i, s) in slow.iter_mut().enumerate() {
        let left = Duration::from_secs(10).saturating_sub(started.elapsed());
        assert!(
            closed_within(s, left.max(Duration::from_millis(1))),
            "half-open connection {i} still open after {:?}",
            started.elapsed()
        );
    }
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(10),
        "closed after {took:?}, header timeout is 5 s"
    );
    drop(server.rt);
}

fn count_open(conns: &mut [TcpStream]) -> usize {
    conns
        .iter_mut()
        .filter(|s| !closed_within_nonblocking(s))
        .count()
}

/// Counts open connections until the caps hold (`capped`), at most 4 s; the last count otherwise.
/// The server accepts and evicts in its own tasks: a connection still in the listen backlog, or not
/// yet evicted, looks open from here. Counts only go down (a closed connection stays closed), so the
/// first count within the caps is the earliest. 4 s: before the 5 s header timeout closes the kept
/// connections too.
fn count_until<T>(mut count: impl FnMut() -> T, capped: impl Fn(&T) -> bool) -> (T, Duration) {
    let started = Instant::now();
    loop {
        let n = count();
        if capped(&n) || started.elapsed() > Duration::from_secs(4) {
            return (n, started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// 200 idle connections from one address: at most 16 (the per-address cap) stay open. 50 from each
/// of 4 more addresses: at most 64 in all, the newest of each address kept.
#[test]
fn connections_beyond_the_caps_are_closed() {
    let server = start(None);
    let client = Client::new();
    let mut one: Vec<TcpStream> = (0..200)
        .map(|_| {
            let mut s = client
                .connect([127, 0, 0, 1], server.addr)
                .expect("connect");
            s.write_all(HALF_SENT).expect("send");
            s
        })
        .collect();
    let (open, after) = count_until(|| count_open(&mut one), |&open| open <= 16);
    assert!(
        open <= 16,
        "{open} of 200 idle connections from one address open after {after:?} (cap 16)"
    );
    assert!(open > 0, "the newest connections are kept");
    assert!(
        !closed_within_nonblocking(&one[199]),
        "the newest connection is kept"
    );

    let mut by_ip: Vec<Vec<TcpStream>> = (2..=5)
        .map(|last| {
            (0..50)
                .map(|_| {
                    let mut s = client
                        .connect([127, 0, 0, last], server.addr)
                        .expect("connect");
                    s.write_all(HALF_SENT).expect("send");
                    s
                })
                .collect()
        })
        .collect();
    let ((open_one, open_each), after) = count_until(
        || {
            let open_one = count_open(&mut one);
            let open_each: Vec<usize> = by_ip.iter_mut().map(|c| count_open(c)).collect();
            (open_one, open_each)
        },
        |(open_one, open_each)| {
            open_one + open_each.iter().sum::<usize>() <= 64 && open_each.iter().all(|&n| n <= 16)
        },
    );
    let total = open_one + open_each.iter().sum::<usize>();
    assert!(
        total <= 64,
        "{total} open in all after {after:?} (cap 64): {open_one} + {open_each:?}"
    );
    assert!(
        open_each.iter().all(|&n| n > 0 && n <= 16),
        "every address keeps some, none over 16: {open_each:?}"
    );
}

/// A slowloris (50 half-open connections from each of 4 addresses, re-opened as soon as the server
/// closes one) plus a connect-and-hold flood from a fifth, while a scraper from its own address
/// (Prometheus' pod) takes 10 scrapes on fresh connections: every scrape answers 200 with the
/// metrics, median < 50 ms, none over 1 s.
#[test]
fn scrapes_answer_during_slowloris_and_connection_flood() {
    let server = start(None);
    let addr = server.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let _stop = StopOnDrop(Arc::clone(&stop));
    let attack_conns = Arc::new(AtomicUsize::new(0));

    let slowloris = {
        let stop = Arc::clone(&stop);
        let opened = Arc::clone(&attack_conns);
        std::thread::spawn(move || {
            let client = Client::new();
            let mut conns: Vec<(usize, TcpStream)> = Vec::new();
            let mut per_ip = [0usize; 4];
            while !stop.load(Ordering::Relaxed) {
                conns.retain_mut(|(ip, s)| {
                    let closed = closed_within_nonblocking(s);
                    if closed {
                        per_ip[*ip] -= 1;
                    }
                    !closed
                });
                for (ip, n) in per_ip.iter_mut().enumerate() {
                    while *n < 50 {
                        let Ok(mut s) = client.connect(
                            [127, 0, 0, 1 + u8::try_from(ip).expect("a few source IPs")],
                            addr,
                        ) else {
                            break;
                        };
                        let _ = s.write_all(HALF_SENT);
                        conns.push((ip, s));
                        *n += 1;
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // A real slowloris trickles a byte now and then to look alive.
                for (_, s) in &mut conns {
                    let _ = s.write_all(b"w");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let flood = {
        let stop = Arc::clone(&stop);
        let opened = Arc::clone(&attack_conns);
        std::thread::spawn(move || {
            let client = Client::new();
            let mut held: std::collections::VecDeque<TcpStream> = Default::default();
            while !stop.load(Ordering::Relaxed) {
                for _ in 0..20 {
                    if let Ok(s) = client.connect([127, 0, 0, 5], addr) {
                        held.push_back(s);
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                    if held.len() > 300 {
                        held.pop_front();
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // Let the attack fill every slot first.
    std::thread::sleep(Duration::from_secs(1));
    // Attack connections opened so far, before each scrape and after the last (printed per scrape
    // so a failure shows when the attack stalled).
    let mut marks = Vec::new();
    let scraper = Client::new();
    let mut times = Vec::new();
    for i in 0..10 {
        marks.push(attack_conns.load(Ordering::Relaxed));
        let t = Instant::now();
        let result = scraper
            .connect([127, 0, 0, 9], addr)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|s| request(s, addr, "/metrics"));
        let took = t.elapsed();
        let (status, body) =
            result.unwrap_or_else(|e| panic!("scrape {i} failed after {took:?}: {e}"));
        assert_eq!(status, 200, "scrape {i}: {body}");
        assert!(
            body.contains("noded_"),
            "scrape {i}: not the metrics: {body}"
        );
        times.push(took);
        std::thread::sleep(Duration::from_millis(100));
    }
    marks.push(attack_conns.load(Ordering::Relaxed));
    stop.store(true, Ordering::Relaxed);
    slowloris.join().expect("slowloris thread");
    flood.join().expect("flood thread");

    times.sort();
    let per_scrape: Vec<usize> = marks.windows(2).map(|w| w[1] - w[0]).collect();
    eprintln!(
        "scrape times under attack: {times:?}; attack connections opened during each scrape and its pause: {per_scrape:?}"
    );
    // How many a machine opens varies tenfold: thousands when idle, 265 in all on a busy 2-core CI
    // box, where connects stall in SYN retries once the flood fills the accept queue (idle runs
    // show such stalls too, as scrape intervals with none). At least 100 means the server had to
    // turn away connections beyond its 64-connection cap while the scrapes ran.
    let during: usize = per_scrape.iter().sum();
    assert!(
        during >= 100,
        "the attack was not running during the scrapes: {per_scrape:?} connections opened per scrape"
    );
    assert!(
        times[times.len() / 2] < Duration::from_millis(50),
        "median scrape {:?} under attack: {times:?}",
        times[times.len() / 2]
    );
    assert!(
        times[times.len() - 1] < Duration::from_secs(1),
        "slowest scrape {:?}",
        times[times.len() - 1]
    );
}

fn closed_within_nonblocking(s: &TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return true;
    }
    let mut buf = [0u8; 64];
    let closed = match (&*s).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != ErrorKind::WouldBlock,
    };
    let _ = s.set_nonblocking(false);
    closed
}

/// /healthz is ok while every registered task runs and 503 naming the task once one ends: returned,
/// panicked, or a watched handle that was aborted.
#[test]
fn healthz_names_a_task_that_ended() {
    let server = start(Some(Limits::default()));
    let health = server.health.clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let _probe = {
        let _enter = server.rt.enter();
        health.spawn("probe-loop", async move {
            let _ = done_rx.await;
        })
    };
    let watched = {
        let _enter = server.rt.enter();
        let inner = tokio::spawn(std::future::pending::<()>());
        health.watch("boot-events", inner)
    };
    assert_eq!(
        get(server.addr, "/healthz").expect("healthz"),
        (200, "ok\n".to_string())
    );

    done_tx.send(()).expect("end the task");
    let body = wait_for_503(server.addr);
    assert!(body.contains("probe-loop: task ended"), "{body}");
    assert!(!body.contains("boot-events"), "{body}");

    {
        let _enter = server.rt.enter();
        health.spawn("observer", async { panic!("observer task panics") });
    }
    watched.abort();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = get(server.addr, "/healthz").expect("healthz");
        if status == 503 && body.contains("observer: task ended") && body.contains("boot-events") {
            break;
        }
        assert!(Instant::now() < deadline, "{status} {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_503(addr: SocketAddr) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (status, body) = get(addr, "/healthz").expect("healthz");
        if status == 503 {
            return body;
        }
        assert!(Instant::now() < deadline, "still {status} {body}");
        std::thread::sleep(Duration::from_millis(20));
    }
}
