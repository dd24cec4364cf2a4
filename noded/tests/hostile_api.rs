//! Hostile callers of the node API (issue 12, item 7): the socket is never reachable by others while
//! it is created and nothing planted at its path is followed; callers outside
//! `daemon.api_allowed_uids` are closed at accept; an AcquireVm flood stays within `max_vms_in_use`;
//! the caller is never told about a QMP socket; every QEMU runs under `-sandbox` with spawn denied.

mod common;

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::vm::{VmHarness, available, console, section};
use noded::api::{self, NodeService, pb};
use noded::vm::engine::Engine;

const READY: Duration = Duration::from_secs(300);
const NOBODY: u32 = 65534;

fn private_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("napi")
        .tempdir_in("/tmp")
        .expect("tempdir")
}

#[tokio::test]
async fn bind_refuses_what_is_planted_at_the_path_and_replaces_a_stale_socket() {
    let tmp = private_dir();
    let socket = tmp.path().join("noded.sock");

    // A symlink to a file someone wants noded to clobber (or chmod): refused, neither followed
    // nor removed.
    let victim = tmp.path().join("victim");
    std::fs::write(&victim, "precious").expect("victim");
    std::os::unix::fs::symlink(&victim, &socket).expect("symlink");
    let err = api::bind(&socket)
        .err()
        .expect("a symlink at the socket path must be refused");
    assert!(err.to_string().contains("symlink"), "{err}");
    assert!(
        std::fs::symlink_metadata(&socket)
            .expect("still there")
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        std::fs::read_to_string(&victim).expect("victim"),
        "precious"
    );
    std::fs::remove_file(&socket).expect("rm symlink");

    // A dangling symlink (bind(2) would create the socket at its target).
    let elsewhere = tmp.path().join("elsewhere.sock");
    std::os::unix::fs::symlink(&elsewhere, &socket).expect("symlink");
    assert!(api::bind(&socket).is_err(), "dangling symlink refused");
    assert!(!elsewhere.exists(), "nothing created at the symlink target");
    std::fs::remove_file(&socket).expect("rm symlink");

    // A regular file: refused, left as it is.
    std::fs::write(&socket, "not a socket").expect("file");
    let err = api::bind(&socket)
        .err()
        .expect("a regular file at the socket path must be refused");
    assert!(err.to_string().contains("not a socket"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&socket).expect("file"),
        "not a socket"
    );
    std::fs::remove_file(&socket).expect("rm file");

    // A stale socket of a previous run is replaced; the new one is 0600 and the staging dir is gone.
    let stale = std::os::unix::net::UnixListener::bind(&socket).expect("stale socket");
    drop(stale);
    let listener = api::bind(&socket).expect("stale socket replaced");
    let meta = std::fs::symlink_metadata(&socket).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    let entries: Vec<_> = std::fs::read_dir(tmp.path())
        .expect("readdir")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert!(
        entries
            .iter()
            .all(|n| !n.to_string_lossy().contains(".bind-")),
        "staging dir left behind: {entries:?}"
    );
    drop(listener);
}

/// Watches `dir` while the API socket is bound again and again, with umask 0 (the worst an operator
/// could leave): no socket and no directory is ever seen there that others could reach. The old
/// bind-then-chmod left a 0777 socket at the path for a moment.
#[test]
fn the_socket_is_never_reachable_by_others_while_it_is_created() {
    let tmp = private_dir();
    let socket = tmp.path().join("noded.sock");
    // Process-wide, but nextest runs each test in its own process.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::empty());
    let stop = Arc::new(AtomicBool::new(false));
    let seen = {
        let stop = Arc::clone(&stop);
        let dir = tmp.path().to_path_buf();
        std::thread::spawn(move || {
            let mut exposed = Vec::new();
            let mut looks = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for e in entries.flatten() {
                    let Ok(m) = std::fs::symlink_metadata(e.path()) else {
                        continue;
                    };
                    looks += 1;
                    let kind = m.file_type();
                    if (kind.is_socket() || kind.is_dir()) && m.permissions().mode() & 0o077 != 0 {
                        exposed.push((e.path(), m.permissions().mode() & 0o777));
                    }
                }
            }
            (exposed, looks)
        })
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for _ in 0..300 {
        let l = rt.block_on(async { api::bind(&socket) }).expect("bind");
        drop(l);
    }
    stop.store(true, Ordering::Relaxed);
    let (exposed, looks) = seen.join().expect("watcher");
    nix::sys::stat::umask(old);
    assert!(looks > 0, "the watcher saw nothing at all");
    assert!(
        exposed.is_empty(),
        "reachable by others during bind ({} sightings), e.g. {:?}",
        exposed.len(),
        &exposed[..exposed.len().min(3)]
    );
}

struct Served {
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), api::ApiError>>>,
}

impl Served {
    async fn start(dir: &Path, service: NodeService) -> Self {
        let socket = dir.join("noded.sock");
        let listener = api::bind(&socket).expect("bind");
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(api::serve(listener, service, async {
            let _ = rx.await;
        }));
        Self {
            socket,
            stop: Some(stop),
            task: Some(task),
        }
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("join").expect("server ran");
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// `noded status --socket S` run as `uid`: the real client binary, as another user.
async fn status_as(socket: &Path, uid: u32) -> std::process::Output {
    let socket = socket.to_path_buf();
    tokio::task::spawn_blocking(move || {
        use std::os::unix::process::CommandExt;
        Command::new(env!("CARGO_BIN_EXE_noded"))
            .args(["status", "--socket"])
            .arg(&socket)
            .uid(uid)
            .gid(uid)
            .output()
            .expect("run noded status")
    })
    .await
    .expect("join")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_outside_the_allowed_uids_are_closed_at_accept() {
    if !common::require_root() {
        return;
    }
    let tmp = private_dir();
    // Widen what the filesystem allows (an operator's chmod): only the uid check stands between
    // uid 65534 and the API.
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let served = Served::start(tmp.path(), NodeService::new(None)).await;
    std::fs::set_permissions(&served.socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");

    let root = status_as(&served.socket, 0).await;
    assert!(
        root.status.success(),
        "root may call: {}",
        String::from_utf8_lossy(&root.stderr)
    );
    let nobody = status_as(&served.socket, NOBODY).await;
    assert!(
        !nobody.status.success(),
        "uid {NOBODY} got an answer: {}",
        String::from_utf8_lossy(&nobody.stdout)
    );
    served.stop().await;

    // The same caller in the allow-list is served: the refusal above was the uid check.
    let served = Served::start(
        tmp.path(),
        NodeService::new(None).with_allowed_uids(vec![0, NOBODY]),
    )
    .await;
    std::fs::set_permissions(&served.socket, std::fs::Permissions::from_mode(0o666))
        .expect("chmod socket");
    let nobody = status_as(&served.socket, NOBODY).await;
    assert!(
        nobody.status.success(),
        "an allowed uid is served: {}",
        String::from_utf8_lossy(&nobody.stderr)
    );
    served.stop().await;
}

fn cmdline(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

/// What a QMP server says first on connect; a console says nothing until asked.
async fn greets_like_qmp(path: &Path) -> bool {
    use tokio::io::AsyncReadExt;
    let Ok(mut s) = tokio::net::UnixStream::connect(path).await else {
        return false;
    };
    let mut buf = vec![0u8; 256];
    match tokio::time::timeout(Duration::from_millis(700), s.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).contains("\"QMP\""),
        _ => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acquire_flood_stays_within_the_cap_and_callers_get_no_qmp() {
    if !available() {
        return;
    }
    const CAP: u32 = 3;
    const FLOOD: usize = 40;
    let h = VmHarness::new();
    let mut s = section("flood", 1);
    s.max_vms_in_use = CAP;
    let engine = Engine::start(h.options(vec![s])).await.expect("engine");
    assert!(engine.wait_ready(READY).await, "template built, pool full");
    let served = Served::start(h.path(), NodeService::new(Some(Arc::clone(&engine)))).await;
    let client = api::connect(&served.socket).await.expect("connect");

    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..FLOOD {
        let mut c = client.clone();
        flood.spawn(async move {
            c.acquire_vm(pb::AcquireVmRequest {
                template: "flood".into(),
            })
            .await
        });
    }
    let mut granted = Vec::new();
    let mut exhausted = 0;
    while let Some(r) = flood.join_next().await {
        match r.expect("join") {
            Ok(vm) => granted.push(vm.into_inner()),
            Err(status) if status.code() == tonic::Code::ResourceExhausted => {
                assert!(
                    status.message().contains("max_vms_in_use"),
                    "one clear message: {}",
                    status.message()
                );
                exhausted += 1;
            }
            Err(other) => panic!("unexpected AcquireVm failure: {other}"),
        }
    }
    assert_eq!(granted.len(), CAP as usize, "the flood got exactly the cap");
    assert_eq!(exhausted, FLOOD - CAP as usize);
    let in_use = engine.snapshot().remove(0).in_use;
    assert_eq!(in_use, CAP);
    // Idle clones are bounded by pool_target (1), VMs in use by the cap.
    let live = h.live_vms();
    assert!(
        live.len() <= CAP as usize + 1,
        "QEMU processes beyond cap + pool: {live:?}"
    );

    for vm in &granted {
        // Every QEMU noded started runs under seccomp, with spawning (exec:) denied.
        let args = cmdline(vm.pid);
        let i = args
            .iter()
            .position(|a| a == "-sandbox")
            .unwrap_or_else(|| panic!("no -sandbox in {args:?}"));
        for want in [
            "on",
            "spawn=deny",
            "elevateprivileges=deny",
            "obsolete=deny",
        ] {
            assert!(
                args[i + 1].split(',').any(|o| o == want),
                "-sandbox {} lacks {want}",
                args[i + 1]
            );
        }
        // The only path the caller is told about is the console, which is no QMP monitor, and no
        // field of the answer names the QMP socket.
        let told = [&vm.vm_id, &vm.template, &vm.console];
        assert!(
            told.iter().all(|s| !s.contains("qmp")),
            "QMP path in the answer: {vm:?}"
        );
        assert!(!greets_like_qmp(Path::new(&vm.console)).await);
        let mut c = console(Path::new(&vm.console)).await;
        c.ping(Duration::from_secs(15))
            .await
            .expect("the console reaches the guest");
    }

    // A released VM frees its slot: the next acquire succeeds, one more is refused again.
    let mut c = client.clone();
    c.release_vm(pb::ReleaseVmRequest {
        vm_id: granted[0].vm_id.clone(),
    })
    .await
    .expect("release");
    let again = c
        .acquire_vm(pb::AcquireVmRequest {
            template: "flood".into(),
        })
        .await
        .expect("a released slot is free again")
        .into_inner();
    let refused = c
        .acquire_vm(pb::AcquireVmRequest {
            template: "flood".into(),
        })
        .await
        .expect_err("at the cap again");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);

    for vm in granted.iter().skip(1).chain([&again]) {
        c.release_vm(pb::ReleaseVmRequest {
            vm_id: vm.vm_id.clone(),
        })
        .await
        .expect("release");
    }
    assert_eq!(engine.snapshot().remove(0).in_use, 0);
    drop(c);
    drop(client);
    served.stop().await;
    engine.shutdown().await;
    h.assert_no_leaks();
}

#[test]
fn config_api_allowed_uids_and_max_vms_in_use() {
    use noded::config::NodedConfig;
    let path = Path::new("noded.toml");
    let defaults = NodedConfig::parse(path, "[[templates]]\nname = \"t\"\n").expect("defaults");
    assert_eq!(defaults.daemon.api_allowed_uids, vec![0]);
    assert_eq!(defaults.templates[0].max_vms_in_use, 16);

    let set = NodedConfig::parse(
        path,
        "[daemon]\napi_allowed_uids = [0, 1000]\n[[templates]]\nname = \"t\"\nmax_vms_in_use = 4\n",
    )
    .expect("set");
    assert_eq!(set.daemon.api_allowed_uids, vec![0, 1000]);
    assert_eq!(set.templates[0].max_vms_in_use, 4);

    let err = NodedConfig::parse(path, "[[templates]]\nname = \"t\"\nmax_vms_in_use = 0\n")
        .expect_err("a cap of 0 is refused at load");
    let msg = err.to_string();
    assert!(msg.contains("templates[0].max_vms_in_use"), "{msg}");
    assert_eq!(
        noded::exit::ExitStatus::exit_code(&err),
        noded::exit::BAD_INPUT
    );
    let err = NodedConfig::parse(path, "[daemon]\napi_allowed_uids = [-1]\n")
        .expect_err("a negative uid is refused");
    assert!(err.to_string().contains("api_allowed_uids"), "{err}");
}
