//! Helpers for tests that run real QEMU guests (TCG here): shared cached guest assets, a private run
//! dir per test, and cleanup + leak assertions that also run when a test fails.

use std::path::{Path, PathBuf};

use std::time::Duration;

use noded::config::TemplateSection;
use noded::vm::clone::After;
use noded::vm::engine::{EngineOptions, ResolvedTemplate, resolve};
use noded::vm::reap;
use noded::vm::template::{Layout, mounts_under};

/// Guest memory used by tests: small, so three clones and a template fit on a CI runner.
pub const TEST_MEMORY_MIB: u64 = 128;

/// Guest assets are built once per target dir and shared by every test (they come from apt).
pub fn shared_data_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("noded-vm-data");
    std::fs::create_dir_all(&dir).expect("create shared data dir");
    dir
}

/// Real QEMU + root (mounts) are needed; skipped locally when missing, failing under CI=true.
pub fn available() -> bool {
    super::require("qemu-system-x86_64").is_some()
        && super::require("apt-get").is_some()
        && super::require_root()
}

pub fn section(name: &str, pool_target: u32) -> TemplateSection {
    TemplateSection {
        name: name.into(),
        runtime_handler: "kata-qemu-warm".into(),
        memory_mib: TEST_MEMORY_MIB,
        vcpus: 1,
        kernel: None,
        initrd: None,
        pool_target,
        pool_memory_budget_mib: 1024,
        max_vms_in_use: noded::config::default_max_vms_in_use(),
    }
}

/// A private run dir (short path under /tmp: unix socket paths are limited to 107 bytes). Dropping it
/// kills every QEMU carrying its marker, unmounts everything under it and removes it.
pub struct VmHarness {
    pub tmp: Option<tempfile::TempDir>,
    pub run_dir: PathBuf,
    pub layout: Layout,
}

impl VmHarness {
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("nvm")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let run_dir = tmp.path().join("run");
        let layout = Layout::new(&run_dir).expect("layout");
        Self {
            tmp: Some(tmp),
            run_dir: layout.run_dir.clone(),
            layout,
        }
    }

    pub fn path(&self) -> &Path {
        self.tmp.as_ref().map(|t| t.path()).expect("tempdir alive")
    }

    pub fn options(&self, templates: Vec<TemplateSection>) -> EngineOptions {
        EngineOptions {
            data_dir: shared_data_dir(),
            run_dir: self.run_dir.clone(),
            templates,
            mode: After::Paused,
            health_interval: Duration::from_secs(3600),
            accel: None,
            observer: None,
            guest: noded::vm::engine::GuestSource::download(),
            vm_cgroup: None,
        }
    }

    pub async fn resolve(&self, section: &TemplateSection) -> ResolvedTemplate {
        resolve(&self.options(vec![section.clone()]), section, &self.layout)
            .await
            .expect("resolve template inputs")
            .0
    }

    /// QEMU processes of this harness that are still alive.
    pub fn live_vms(&self) -> Vec<(u32, String)> {
        reap::find_vms(&self.layout.run_dir)
    }

    fn cleanup(&mut self) {
        reap::kill_vms_blocking(&self.layout.run_dir);
        if let Some(tmp) = &self.tmp {
            noded::vm::template::destroy_dir(&tmp.path().join("run"));
        }
    }

    /// The suite-end check, run explicitly at the end of every VM test: no QEMU, no mount and no
    /// directory of this harness is left behind.
    pub fn assert_no_leaks(mut self) {
        let tmp_path = self.path().to_path_buf();
        let vms = self.live_vms();
        let mounts = mounts_under(&tmp_path);
        self.cleanup();
        if let Some(tmp) = self.tmp.take() {
            tmp.close().expect("remove temp dir");
        }
        assert!(vms.is_empty(), "QEMU processes leaked: {vms:?}");
        assert!(mounts.is_empty(), "mounts leaked: {mounts:?}");
        assert!(
            !tmp_path.exists(),
            "temp dir leaked: {}",
            tmp_path.display()
        );
    }
}

impl Drop for VmHarness {
    fn drop(&mut self) {
        self.cleanup();
    }
}

/// Test-side guest console: connects to a VM's console socket and talks the guest protocol.
pub async fn console(path: &Path) -> noded::vm::guest::GuestConsole {
    // QEMU's chardev accepts the next client once the previous owner has disconnected.
    let mut last = None;
    for _ in 0..200 {
        match noded::vm::guest::GuestConsole::connect(path).await {
            Ok(c) => return c,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("cannot connect to console {}: {last:?}", path.display());
}
