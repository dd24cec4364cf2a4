//! The VM backend seam (issue 13): a new hypervisor is one more `vm::Backend` implementation, and
//! nothing in noded's engine changes for it.
//!
//! `Skeleton` below is such an implementation, written only against `noded::vm::backend`: its
//! "hypervisor" is a `sleep` process (spawned, recorded and reaped like any VM) and its guest is a
//! task on the VM's console socket speaking noded's guest protocol, whose request counter is saved
//! in the device state file and continues in every restore. noded's unchanged template build,
//! clone, cold boot and whole engine (pool, acquire, release, shutdown, reap) run on it. That this
//! file compiles is the proof that a backend touches no engine file; the tests prove the engine
//! drives a backend only through the trait.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use noded::config::TemplateSection;
use noded::vm::backend::{
    Accel, Backend, BackendError, Boot, Hypervisor, Identity, Launch, MachineSpec, Vm, record_spawn,
};
use noded::vm::clone::{After, cold_boot, restore};
use noded::vm::engine::{Engine, EngineOptions, GuestSource};
use noded::vm::guest::{GuestConsole, GuestError};
use noded::vm::reap;
use noded::vm::template::{self, Fingerprint, Layout, TemplateSpec};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;

/// A stand-in for the Cloud Hypervisor backend issue 13 is about.
#[derive(Debug, Default)]
struct Skeleton;

/// What the skeleton's "guest" keeps in RAM: the request counter, and whether its vCPUs run.
struct GuestRam {
    counter: AtomicU64,
    running: watch::Sender<bool>,
}

struct SkeletonVm {
    launch: Launch,
    child: tokio::process::Child,
    console: Option<GuestConsole>,
    ram: Arc<GuestRam>,
    guest: tokio::task::JoinHandle<()>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BackendError {
    let path = path.to_path_buf();
    move |source| BackendError::Io { path, source }
}

impl Skeleton {
    async fn start(
        &self,
        launch: Launch,
        counter: u64,
        running: bool,
    ) -> Result<SkeletonVm, BackendError> {
        let console = launch.socket(noded::vm::backend::CONSOLE_SOCKET)?;
        std::fs::create_dir_all(&launch.dir).map_err(io(&launch.dir))?;
        if !launch.memory_file.exists() {
            std::fs::write(&launch.memory_file, vec![0u8; 64 << 10])
                .map_err(io(&launch.memory_file))?;
        }
        let child = tokio::process::Command::new("sleep")
            .arg("3600")
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| BackendError::Spawn {
                binary: "sleep".into(),
                hint: "coreutils",
                source,
            })?;
        record_spawn(&launch, child.id())?;
        let listener = tokio::net::UnixListener::bind(&console).map_err(io(&console))?;
        let ram = Arc::new(GuestRam {
            counter: AtomicU64::new(counter),
            running: watch::channel(running).0,
        });
        let guest = tokio::spawn(play_guest(listener, ram.clone()));
        let conn = GuestConsole::connect(&console)
            .await
            .map_err(|source| BackendError::Guest {
                name: launch.name.clone(),
                source,
            })?;
        Ok(SkeletonVm {
            launch,
            child,
            console: Some(conn),
            ram,
            guest,
        })
    }
}

/// The guest: one console client at a time; `<kind> <nonce>` is answered `pong|rand <nonce>
/// <counter> [payload]` once the vCPUs run.
async fn play_guest(listener: tokio::net::UnixListener, ram: Arc<GuestRam>) {
    while let Ok((conn, _)) = listener.accept().await {
        let (r, mut w) = conn.into_split();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let mut running = ram.running.subscribe();
            if running.wait_for(|r| *r).await.is_err() {
                return;
            }
            let Some((kind, nonce)) = line.split_once(' ') else {
                continue;
            };
            let n = ram.counter.fetch_add(1, Ordering::SeqCst) + 1;
            let answer = match kind {
                "ping" => format!("pong {nonce} {n}\n"),
                "rand" => format!("rand {nonce} {n} {}\n", uuid::Uuid::new_v4().simple()),
                _ => continue,
            };
            if w.write_all(answer.as_bytes()).await.is_err() {
                break;
            }
        }
    }
}

#[async_trait]
impl Backend for Skeleton {
    fn hypervisor(&self) -> Hypervisor {
        Hypervisor::CloudHypervisor
    }

    async fn version(&self) -> Result<String, BackendError> {
        Ok("skeleton 0.1".into())
    }

    fn machine_args(&self, spec: &MachineSpec, _tsc_khz: Option<u64>) -> Vec<String> {
        vec![
            "--memory".into(),
            format!("size={}M", spec.memory_mib),
            "--kernel".into(),
            spec.kernel.display().to_string(),
        ]
    }

    async fn spawn(&self, launch: Launch) -> Result<Box<dyn Vm>, BackendError> {
        Ok(Box::new(self.start(launch, 0, true).await?))
    }

    async fn restore(
        &self,
        launch: Launch,
        state: &Path,
        _timeout: Duration,
    ) -> Result<Box<dyn Vm>, BackendError> {
        let bytes = std::fs::read(state).map_err(io(state))?;
        let counter = <[u8; 8]>::try_from(bytes.as_slice()).map_err(|_| BackendError::Restore {
            name: launch.name.clone(),
            outcome: format!("{} bytes of state, expected 8", bytes.len()),
        })?;
        Ok(Box::new(
            self.start(launch, u64::from_le_bytes(counter), false)
                .await?,
        ))
    }

    fn identify(&self, argv: &[String]) -> Option<Identity> {
        if argv.first()?.rsplit('/').next()? != "skeleton" {
            return None;
        }
        let name = argv
            .windows(2)
            .find(|w| w[0] == "--name")
            .map(|w| w[1].clone());
        let boot = if argv.iter().any(|a| a == "--restore") {
            Boot::Restore
        } else {
            Boot::Cold
        };
        Some(Identity { name, boot })
    }
}

#[async_trait]
impl Vm for SkeletonVm {
    fn launch(&self) -> &Launch {
        &self.launch
    }

    fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    fn console(&mut self) -> Result<&mut GuestConsole, BackendError> {
        let name = self.launch.name.clone();
        self.console.as_mut().ok_or(BackendError::Guest {
            name,
            source: GuestError::Closed,
        })
    }

    async fn console_failed(&mut self, source: GuestError, _grace: Duration) -> BackendError {
        BackendError::Guest {
            name: self.launch.name.clone(),
            source,
        }
    }

    async fn save(&mut self, state: &Path) -> Result<(), BackendError> {
        self.ram.running.send_replace(false);
        let counter = self.ram.counter.load(Ordering::SeqCst);
        std::fs::write(state, counter.to_le_bytes()).map_err(io(state))
    }

    async fn pause(&mut self) -> Result<(), BackendError> {
        self.ram.running.send_replace(false);
        Ok(())
    }

    async fn resume(&mut self) -> Result<(), BackendError> {
        self.ram.running.send_replace(true);
        Ok(())
    }

    fn hand_off(&mut self) {
        self.console = None;
    }

    async fn quit(self: Box<Self>, _timeout: Duration) {
        self.kill().await;
    }

    async fn kill(mut self: Box<Self>) {
        self.guest.abort();
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        // Like every backend's kill: the directory, then whatever cgroup its spawn record names.
        reap::remove_vm_dir(&self.launch.dir);
    }
}

/// A short run dir under /tmp (unix socket paths are short), torn down also when a test fails.
struct RunDir {
    tmp: tempfile::TempDir,
    layout: Layout,
}

impl RunDir {
    fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("nseam")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let layout = Layout::new(&tmp.path().join("run")).expect("layout");
        std::fs::write(tmp.path().join("vmlinux"), b"kernel").expect("kernel");
        std::fs::write(tmp.path().join("initrd"), b"initrd").expect("initrd");
        Self { tmp, layout }
    }

    fn file(&self, name: &str) -> PathBuf {
        self.tmp.path().join(name)
    }

    fn machine(&self) -> MachineSpec {
        MachineSpec {
            accel: Accel::Tcg,
            memory_mib: 16,
            vcpus: 1,
            kernel: self.file("vmlinux"),
            initrd: self.file("initrd"),
            append: noded::vm::guest::GUEST_APPEND.into(),
        }
    }

    fn assert_nothing_left(&self) {
        assert_eq!(
            reap::find_vms(&self.layout.run_dir),
            vec![],
            "VM processes left"
        );
        assert_eq!(
            template::mounts_under(self.tmp.path()),
            Vec::<PathBuf>::new(),
            "mounts left"
        );
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        reap::kill_vms_blocking(&self.layout.run_dir);
        template::destroy_dir(&self.layout.run_dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_clone_and_cold_boot_run_on_another_backend() {
    // Templates live on a tmpfs noded mounts.
    if !testkit::require::require_root() {
        return;
    }
    let run = RunDir::new();
    let backend = Skeleton;
    let machine = run.machine();
    let spec = TemplateSpec {
        name: "seam".into(),
        fingerprint: Fingerprint::new(
            &backend,
            backend.version().await.expect("version"),
            &machine,
            "k".into(),
            "i".into(),
        ),
        machine,
        tsc_khz: None,
    };
    let t = template::build(&backend, &run.layout, &spec)
        .await
        .expect("template builds on the skeleton");
    assert_eq!(
        t.manifest.machine_args,
        backend.machine_args(&spec.machine, None),
        "the manifest keeps the backend's own rendering"
    );
    assert!(t.manifest.guest_counter >= 1);
    template::validate(&t.dir, &spec.fingerprint, true).expect("template valid");

    // A clone's first answer continues the template's count: the state went through the backend.
    let mut clone = restore(&backend, &run.layout, &t, After::Paused)
        .await
        .expect("clone");
    assert_eq!(clone.counter, t.manifest.guest_counter + 1);
    assert_eq!(
        clone.generation.as_deref(),
        Some(t.manifest.generation.as_str())
    );
    clone.vm.resume().await.expect("resume");
    let r = clone
        .vm
        .console()
        .expect("console")
        .request("rand", Duration::from_secs(5))
        .await
        .expect("rand");
    assert_eq!(r.counter, t.manifest.guest_counter + 2);

    let cold = cold_boot(
        &backend,
        &run.layout,
        "seam",
        &spec.machine,
        None,
        Duration::from_secs(10),
    )
    .await
    .expect("cold boot");
    assert_eq!(cold.generation, None);
    let mut live: Vec<u32> = reap::find_vms(&run.layout.run_dir)
        .into_iter()
        .map(|(pid, _)| pid)
        .collect();
    live.sort_unstable();
    let mut ours = vec![
        clone.vm.pid().expect("clone pid"),
        cold.vm.pid().expect("cold pid"),
    ];
    ours.sort_unstable();
    assert_eq!(live, ours, "both VMs carry spawn records");

    // A damaged state is refused by the backend and leaves no process.
    let state = t.state_file();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&state, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    }
    std::fs::write(&state, b"").expect("empty state");
    restore(&backend, &run.layout, &t, After::Running)
        .await
        .err()
        .expect("an empty state yields no clone");

    clone.vm.kill().await;
    cold.vm.kill().await;
    template::destroy_dir(&t.dir);
    run.assert_nothing_left();

    let argv = |s: &str| s.split(' ').map(String::from).collect::<Vec<_>>();
    assert_eq!(
        backend.identify(&argv("/usr/bin/skeleton --name noded-seam-1 --restore")),
        Some(Identity {
            name: Some("noded-seam-1".into()),
            boot: Boot::Restore
        })
    );
    assert_eq!(backend.identify(&argv("qemu-system-x86_64 -name x")), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_engine_runs_a_pool_on_another_backend() {
    if !testkit::require::require_root() {
        return;
    }
    let run = RunDir::new();
    let section: TemplateSection = toml::from_str(&format!(
        "name = 'seam'\nmemory_mib = 16\npool_target = 2\nkernel = '{}'\ninitrd = '{}'\n",
        run.file("vmlinux").display(),
        run.file("initrd").display()
    ))
    .expect("template section");
    let opts = EngineOptions {
        data_dir: run.file("data"),
        run_dir: run.layout.run_dir.clone(),
        templates: vec![section],
        mode: After::Paused,
        health_interval: Duration::from_secs(3600),
        accel: Some(Accel::Tcg),
        observer: None,
        guest: GuestSource::Off,
        vm_cgroup: None,
    };
    let engine = Engine::start_with(Arc::new(Skeleton), opts)
        .await
        .expect("engine starts on the skeleton");
    let result = async {
        assert!(
            engine.wait_ready(Duration::from_secs(30)).await,
            "pool full"
        );
        assert_eq!(engine.backend().hypervisor(), Hypervisor::CloudHypervisor);
        let t = engine.pool("").expect("pool").template().expect("template");
        let vm = engine.acquire("").await.expect("acquire");
        assert!(vm.from_pool && !vm.cold, "{vm:?}");
        assert_eq!(
            vm.console,
            run.layout.vms_dir().join(&vm.vm_id).join("console.sock")
        );
        // The console was handed over: the caller talks to the guest, which continues the count.
        let mut console = GuestConsole::connect(&vm.console).await.expect("console");
        let a = console.ping(Duration::from_secs(5)).await.expect("ping");
        assert_eq!(a.counter, t.manifest.guest_counter + 2);
        drop(console);
        engine.release(&vm.vm_id).await.expect("release");
        assert!(engine.release(&vm.vm_id).await.is_err(), "released twice");
    }
    .await;
    engine.shutdown().await;
    run.assert_nothing_left();
    result
}
