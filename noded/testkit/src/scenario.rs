//! Building blocks of node-in-a-box runs shared by the test and `perf nodeboot`: the inputs a node gets
//! from outside (the DaemonSet image archive, the Kata release tarball, the baked installer) and a box
//! booted the way an AMI-launched node boots.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::containerd::{Binaries, Series};
use crate::fake_api::{FakeApi, HttpServer};
use crate::kubelet::{PodOptions, PodRunner};
use crate::nodebox::NodeBox;

/// The workspace root (this crate lives at `noded/testkit`).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The DaemonSet manifest every box runs, parsed as kubelet would get it.
pub fn daemonset_manifest() -> PathBuf {
    workspace().join("daemonset/daemonset.yaml")
}

/// The image `scripts/build-image.sh` writes (the DaemonSet's own image). Built here when missing,
/// under a lock so parallel tests build once; the script itself skips the work when its inputs are
/// unchanged.
///
/// `NODED_TEST_IMAGE_ARCHIVE` names an archive built beforehand (scripts/test.sh builds it once, outside
/// nextest's per-test timeouts) and is used as is.
pub fn image_archive() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NODED_TEST_IMAGE_ARCHIVE") {
        let p = PathBuf::from(p);
        if !p.is_file() {
            bail!("NODED_TEST_IMAGE_ARCHIVE={}: not a file", p.display());
        }
        return Ok(p);
    }
    let out = crate::containerd::target_dir().join("image/noded-image.oci.tar");
    let lock_path = crate::containerd::target_dir().join(".build-image.lock");
    std::fs::create_dir_all(crate::containerd::target_dir())?;
    let lock = std::fs::File::create(&lock_path)?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("lock {}: {e}", lock_path.display()))?;
    let status = std::process::Command::new(workspace().join("scripts/build-image.sh"))
        .arg("--output")
        .arg(&out)
        .current_dir(workspace())
        .status()
        .context("run scripts/build-image.sh")?;
    if !status.success() || !out.is_file() {
        bail!("scripts/build-image.sh failed ({status})");
    }
    Ok(out)
}

/// `kubectl kustomize` of daemonset/ with the named Components of daemonset/examples, as an
/// operator's kustomization adds them (`resources: [base]`, `components: [...]`): every document.
pub fn kustomize(components: &[&str]) -> Result<String> {
    let kubectl = crate::require::require("kubectl").context("kubectl is not installed")?;
    let k = tempfile::Builder::new().prefix("kustomize-").tempdir()?;
    let daemonset_dir = workspace().join("daemonset");
    std::os::unix::fs::symlink(&daemonset_dir, k.path().join("base"))?;
    let mut text = String::from("resources:\n  - base\ncomponents:\n");
    for c in components {
        std::os::unix::fs::symlink(daemonset_dir.join("examples").join(c), k.path().join(c))?;
        text.push_str(&format!("  - {c}\n"));
    }
    std::fs::write(k.path().join("kustomization.yaml"), text)?;
    let out = std::process::Command::new(kubectl)
        .arg("kustomize")
        .arg(k.path())
        .output()
        .context("run kubectl kustomize")?;
    if !out.status.success() {
        bail!(
            "kubectl kustomize with {components:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).context("kustomize output is not UTF-8")
}

/// The DaemonSet of [`kustomize`] with `components`, written alone to `dir/daemonset.yaml` (what
/// [`Booted::pod_from`] runs).
pub fn daemonset_with_components(dir: &Path, components: &[&str]) -> Result<PathBuf> {
    let rendered = kustomize(components)?;
    let ds = rendered
        .split("\n---\n")
        .find(|doc| doc.lines().any(|l| l == "kind: DaemonSet"))
        .context("no DaemonSet in the kustomize output")?;
    let path = dir.join("daemonset.yaml");
    std::fs::write(&path, ds)?;
    Ok(path)
}

/// The image tag the DaemonSet manifest names.
pub fn manifest_image() -> Result<String> {
    let ds = crate::kubelet::read_daemonset(&daemonset_manifest())?;
    ds.spec
        .template
        .spec
        .and_then(|s| s.containers.into_iter().next())
        .and_then(|c| c.image)
        .context("daemonset.yaml: no container image")
}

/// The `installer` binary of this checkout (built by cargo with the workspace's binaries).
pub fn installer_binary() -> Result<PathBuf> {
    crate::bins::workspace_bin("installer", "installer")
}

/// A fake Kata static release tarball (`opt/kata/...`, installed at `/opt/kata`) whose shim is the
/// compiled fake shim. Returns (tarball, sha256).
pub fn kata_tarball(dir: &Path, version: &str) -> Result<(PathBuf, String)> {
    let build = dir.join(format!("kata-build-{version}"));
    let tree = build.join("opt/kata");
    let shim = crate::fake_kata::shim_binary()?;
    crate::fake_kata::FakeKata::write_with_shim(&tree, Path::new("/opt/kata"), version, &shim);
    let tarball = dir.join(format!("kata-static-{version}-amd64.tar.gz"));
    let sha = crate::fake_kata::pack_release(&build, &tarball)?;
    Ok((tarball, sha))
}

/// Like [`kata_tarball`], but the release boots real QEMU VMs ([`FakeKata::write_bootable`]): its
/// `kata-runtime factory init` builds a real template and its shim boots each sandbox as a clone of it
/// or cold.
///
/// [`FakeKata::write_bootable`]: crate::fake_kata::FakeKata::write_bootable
pub fn bootable_kata_tarball(dir: &Path, version: &str) -> Result<(PathBuf, String)> {
    let build = dir.join(format!("kata-build-{version}"));
    let tree = build.join("opt/kata");
    crate::fake_kata::FakeKata::write_bootable(
        &tree,
        Path::new("/opt/kata"),
        version,
        &crate::fake_kata::shim_binary()?,
        &crate::fake_kata::runtime_binary()?,
    );
    let tarball = dir.join(format!("kata-static-{version}-amd64.tar.gz"));
    let sha = crate::fake_kata::pack_release(&build, &tarball)?;
    Ok((tarball, sha))
}

/// What a node-in-a-box test needs before it boots a box: root, the series' containerd binaries and the
/// DaemonSet image. `None` = skipped (outside CI); under `CI=true` a missing piece fails the test.
pub fn box_prerequisites(series: Series) -> Option<(Binaries, PathBuf)> {
    if !crate::require::require_root() {
        return None;
    }
    let bins = crate::containerd::require(series)?;
    match image_archive() {
        Ok(a) => Some((bins, a)),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "the DaemonSet image cannot be built (CI=true): {e:#}"
            );
            eprintln!("SKIP: no DaemonSet image: {e:#}");
            None
        }
    }
}

/// `installer bake` in the box (the AMI build) of the Kata release `tarball`, without nodeadm.
pub fn bake(nodebox: &NodeBox, installer: &Path, tarball: &Path, sha256: &str) -> Result<()> {
    nodebox.installer(
        installer,
        &[
            "bake",
            "--kata-tarball",
            &tarball.to_string_lossy(),
            "--sha256",
            sha256,
            "--nodeadm",
            "never",
        ],
    )?;
    Ok(())
}

/// Which fake Kata release the box bakes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KataRelease {
    /// Sandboxes run with runc; no VM (fast).
    Runc,
    /// Sandboxes are real QEMU VMs, cloned from Kata's factory template when the config enables it.
    Bootable,
}

/// Everything outside the node a box needs: the fake API server with a node carrying the startup
/// taint, the stand-in systemd on a real D-Bus whose socket is the node's `/run/dbus/system_bus_socket`.
pub struct Outside {
    pub api: FakeApi,
    pub http: HttpServer,
    pub kubeconfig: PathBuf,
    pub bus: crate::dbus::SystemdBus,
    pub dir: tempfile::TempDir,
}

/// A booted box: the AMI was baked, `installer boot` ran before containerd, containerd runs and holds
/// the pause image and the DaemonSet image (kubelet pulled it), nothing else.
pub struct Booted {
    pub nodebox: NodeBox,
    pub outside: Outside,
    pub image: String,
    pub boot_report: serde_json::Value,
    /// When `installer boot` started (a node launched from the baked AMI begins here).
    pub boot_started: Instant,
}

pub async fn boot(series: Series, bins: Binaries, archive: &Path) -> Result<Booted> {
    boot_with(series, bins, archive, KataRelease::Runc).await
}

pub async fn boot_with(
    series: Series,
    bins: Binaries,
    archive: &Path,
    kata: KataRelease,
) -> Result<Booted> {
    boot_baked(series, bins, archive, |nodebox, installer, dir| {
        let (tarball, sha) = match kata {
            KataRelease::Runc => kata_tarball(dir, "3.99.0-box")?,
            KataRelease::Bootable => bootable_kata_tarball(dir, "3.99.0-box")?,
        };
        bake(nodebox, installer, &tarball, &sha)
    })
    .await
}

/// Like [`boot_with`], with the AMI build done by `ami`: it gets the box, the installer binary and
/// the outside directory (for tarballs and other inputs) and runs `installer bake` as it needs.
pub async fn boot_baked(
    series: Series,
    bins: Binaries,
    archive: &Path,
    ami: impl FnOnce(&NodeBox, &Path, &Path) -> Result<()>,
) -> Result<Booted> {
    let nodebox = NodeBox::new(series, bins)?;
    let dir = tempfile::Builder::new()
        .prefix("nodebox-outside-")
        .tempdir_in("/tmp")?;
    let installer = installer_binary()?;
    // AMI bake: Kata release, units, noded.toml, per-handler shim links.
    ami(&nodebox, &installer, dir.path())?;
    // The box's "host" is the holder's mount namespace, not PID 1's: the DaemonSet pod (hostPID) must
    // run Kata's factory tool there, where a node's noded.toml says `/proc/1/ns/mnt`.
    point_kata_at_box(&nodebox)?;
    // Node boot: noded-boot.service before containerd.service.
    let boot_started = Instant::now();
    let boot_report = nodebox.installer(&nodebox.path("/usr/local/bin/installer"), &["boot"])?;
    // D-Bus first (a node's dbus.service comes up before containerd), then containerd.
    let dbus_daemon = crate::dbus::require_dbus_daemon().context("dbus-daemon is not installed")?;
    let bus = crate::dbus::SystemdBus::start(
        &dbus_daemon,
        &crate::bins::testkit_bin("fake-systemd")?,
        "containerd.service",
        &nodebox.restart_command(),
    )?;
    // The node's system bus socket is where the DaemonSet mounts it from.
    let socket = bus
        .address()
        .strip_prefix("unix:path=")
        .and_then(|a| a.split(',').next())
        .context("bus address is not unix:path=")?;
    std::fs::create_dir_all(nodebox.path("/run/dbus"))?;
    std::os::unix::fs::symlink(socket, nodebox.path("/run/dbus/system_bus_socket"))?;
    nodebox.start_containerd().await?;
    nodebox.import_image(&pause_archive(dir.path()).await?)?;
    nodebox.import_image(archive)?;
    let image = manifest_image()?;
    let api = FakeApi::new(crate::fake_api::fresh_node());
    let http = api.serve_http()?;
    let kubeconfig = http.kubeconfig(dir.path())?;
    Ok(Booted {
        nodebox,
        outside: Outside {
            api,
            http,
            kubeconfig,
            bus,
            dir,
        },
        image,
        boot_report,
        boot_started,
    })
}

/// Appends the box's mount namespace as `kata.factory_mount_namespace` to the baked noded.toml (the
/// only line of the baked node configuration a box changes; see [`boot`]). Idempotent.
pub fn point_kata_at_box(nodebox: &NodeBox) -> Result<()> {
    let path = nodebox.path("/etc/noded/noded.toml");
    let mut text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    if !text.contains("factory_mount_namespace") {
        text.push_str(&format!(
            "\n# node-in-a-box: the box's host namespace is its holder's, not PID 1's\n[kata]\nfactory_mount_namespace = \"{}\"\n",
            nodebox.mount_namespace().display()
        ));
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    }
    Ok(())
}

/// Sets `kata.template_check_seconds` in the box's noded.toml (before the DaemonSet pod starts), so a
/// test or benchmark sees the keeper react in seconds instead of a node's 30 s.
pub fn set_kata_check_seconds(nodebox: &NodeBox, seconds: u64) -> Result<()> {
    point_kata_at_box(nodebox)?;
    let path = nodebox.path("/etc/noded/noded.toml");
    let text = std::fs::read_to_string(&path)?;
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with("template_check_seconds"))
        .collect();
    let text = kept.join("\n").replace(
        "[kata]",
        &format!("[kata]\ntemplate_check_seconds = {seconds}"),
    );
    std::fs::write(&path, text + "\n")?;
    Ok(())
}

/// Empties Kata's factory template as a reboot does (its tmpfs is unmounted).
pub fn wipe_kata_template(nodebox: &NodeBox) -> Result<()> {
    wipe_kata_template_at(nodebox, noded::kata::warm::DEFAULT_TEMPLATE_PATH)
}

/// [`wipe_kata_template`] of the template at `dir` (a warm `[[handlers]]` entry's).
pub fn wipe_kata_template_at(nodebox: &NodeBox, dir: &str) -> Result<()> {
    let out = nodebox.run("umount", &[dir])?;
    if !out.status.success() {
        bail!(
            "umount {dir}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// An OCI archive of the pause image the box's containerd config names (busybox-based, built here).
async fn pause_archive(dir: &Path) -> Result<PathBuf> {
    let path = dir.join("pause.oci.tar");
    noded::containerd::image::write_layout_tar(
        Path::new(noded::containerd::image::DEFAULT_BUSYBOX),
        &[crate::nodebox::PAUSE_IMAGE],
        &path,
    )?;
    Ok(path)
}

impl Booted {
    /// The DaemonSet's pod as kubelet runs it on this node, with the API server's kubeconfig injected
    /// (a real kubelet injects `KUBERNETES_SERVICE_*` and the service account token instead).
    pub fn pod(&self, image: Option<&str>) -> Result<PodRunner> {
        self.pod_from(&daemonset_manifest(), image)
    }

    /// [`Booted::pod`] of another rendering of the DaemonSet (e.g. with a kustomize Component,
    /// [`daemonset_with_components`]).
    pub fn pod_from(&self, manifest: &Path, image: Option<&str>) -> Result<PodRunner> {
        let ds = crate::kubelet::read_daemonset(manifest)?;
        let holder_root = self.nodebox.path("/");
        let mut opts = PodOptions::new(crate::fake_api::NODE)
            .check_path(move |p| holder_root.join(p.strip_prefix("/").unwrap_or(p)))
            .env("KUBECONFIG", "/etc/noded-test/kubeconfig")
            .mount(
                &self.outside.kubeconfig,
                Path::new("/etc/noded-test/kubeconfig"),
                true,
            )
            .log_root(&self.outside.dir.path().join("pods"));
        if let Some(i) = image {
            opts = opts.image(i);
        }
        Ok(PodRunner::new(
            &self.nodebox.containerd_socket(),
            &ds,
            opts,
        )?)
    }

    /// The baked installer, copied outside the box (uninstall removes the node's own copy).
    pub fn installer_copy(&self) -> Result<PathBuf> {
        let copy = self.outside.dir.path().join("installer");
        std::fs::copy(self.nodebox.path("/usr/local/bin/installer"), &copy)
            .context("copy the baked installer")?;
        Ok(copy)
    }

    /// `installer uninstall` on the node; then none of `gone` (node paths) is left, and the node's
    /// containerd, restarted by its unit, still runs runc pods.
    pub async fn uninstall_leaves_runc(&self, gone: &[&str]) -> Result<()> {
        self.nodebox
            .installer(&self.installer_copy()?, &["uninstall"])?;
        for g in gone {
            if self.nodebox.path(g).exists() {
                bail!("{g} left after uninstall");
            }
        }
        self.nodebox.stop_containerd()?;
        self.nodebox.start_containerd().await?;
        let outcome = noded::cri::probe::probe(
            &self.nodebox.containerd_socket(),
            "runc",
            &noded::cri::probe::ProbeOptions::sandbox_only(),
        )
        .await;
        if !outcome.ok {
            bail!("runc pod after uninstall: {outcome:?}");
        }
        Ok(())
    }

    /// Runs a pod sandbox on `handler` through the node's CRI and returns how the fake Kata shim of
    /// the release at `kata_root` (a node path) booted its VM (its `vm_calls` record); the sandbox is
    /// removed once noded published the VM's boot sample under `handler` (and with it the VM's
    /// template hit or miss), which it can only do while a scan sees the VM alive.
    pub async fn run_kata_pod(
        &self,
        handler: &str,
        name: &str,
        kata_root: &str,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        const BOOTS: &str = "noded_vm_boot_seconds_count";
        let by_handler = [("runtime_handler", handler)];
        let before = crate::scrape::metric(
            &crate::scrape::scrape(crate::scrape::NODE_METRICS)?,
            BOOTS,
            &by_handler,
        )
        .unwrap_or(0.0);
        let mut cri = noded::cri::CriClient::connect(&self.nodebox.containerd_socket()).await?;
        let mut spec = noded::cri::PodSpec::unique(name, handler);
        spec.host_network = true;
        let id = cri.run_pod(&spec, timeout).await?;
        let vm = crate::fake_kata::FakeKata {
            root: self.nodebox.path(kata_root),
        }
        .vm_calls()
        .into_iter()
        .rfind(|v| v["id"] == id.as_str())
        .with_context(|| format!("no VM recorded for sandbox {id}"))?;
        let counted =
            crate::scrape::wait_node_metric(BOOTS, &by_handler, before + 1.0, timeout).await;
        cri.remove_pod(&id, timeout).await?;
        counted.with_context(|| format!("the VM of sandbox {id} was not counted"))?;
        Ok(vm)
    }

    /// Waits until the fake API server's node has no startup taint; returns how long that took.
    pub async fn wait_taint_lifted(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if !self.outside.api.state().has_startup_taint() {
                return Ok(start.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        bail!("startup taint still on the node after {timeout:?}")
    }
}
