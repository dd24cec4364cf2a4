//! containerd of every series a node may run, for tests: 1.6 (installed from Debian bookworm), 1.7
//! (Debian trixie) and 2.1 (Debian sid). 1.7 and 2.1 are fetched once with `apt-get download` and
//! unpacked with `dpkg -x` into the workspace target dir (never installed system-wide; DESIGN §10).
//!
//! [`start`] runs a private containerd of a series through noded's own
//! [`PrivateContainerd`](noded::containerd::private::PrivateContainerd): the product code already owns
//! the mount namespace, supervisor, restart script and cleanup (local mode uses them), so the test
//! side only chooses the binaries, the config version and a temp dir ([`TempContainerd`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, anyhow, bail};
use noded::containerd::document::ConfigVersion;
use noded::containerd::private::{self, Launch, PrivateContainerd, PrivateLayout};
use noded::containerd::version::ContainerdVersion;

/// A containerd release series a node may run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Series {
    V1_6,
    V1_7,
    V2_1,
}

impl Series {
    /// Every series, oldest first.
    pub fn all() -> [Series; 3] {
        [Series::V1_6, Series::V1_7, Series::V2_1]
    }

    /// The newest series of each major version: where the expensive tests run.
    pub fn per_major() -> [Series; 2] {
        [Series::V1_6, Series::V2_1]
    }

    /// `1.6`, `1.7`, `2.1`.
    pub fn name(self) -> &'static str {
        match self {
            Series::V1_6 => "1.6",
            Series::V1_7 => "1.7",
            Series::V2_1 => "2.1",
        }
    }

    /// Debian suite whose `containerd` package is this series (None: the installed one).
    fn suite(self) -> Option<&'static str> {
        match self {
            Series::V1_6 => None,
            Series::V1_7 => Some("trixie"),
            Series::V2_1 => Some("sid"),
        }
    }

    /// A version inside the series, for `Request::containerd_version` where a test pins it.
    pub fn version(self) -> ContainerdVersion {
        let (major, minor) = match self {
            Series::V1_6 => (1, 6),
            Series::V1_7 => (1, 7),
            Series::V2_1 => (2, 1),
        };
        ContainerdVersion {
            major,
            minor,
            patch: 0,
        }
    }

    /// The config version a new config for this series gets (2 for 1.x, 3 for 2.x).
    pub fn config_version(self) -> ConfigVersion {
        if self.version().major >= 2 {
            ConfigVersion::V3
        } else {
            ConfigVersion::V2
        }
    }

    /// The CRI plugin whose `containerd.runtimes` map holds the handlers in a `config dump`.
    pub fn runtime_plugin(self) -> &'static str {
        self.config_version().cri_runtime_plugin()
    }

    fn matches(self, v: ContainerdVersion) -> bool {
        let want = self.version();
        (v.major, v.minor) == (want.major, want.minor)
    }
}

impl fmt::Display for Series {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "containerd {}", self.name())
    }
}

/// The binaries of one series.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub series: Series,
    pub containerd: PathBuf,
    pub shim: PathBuf,
    pub ctr: PathBuf,
}

impl Binaries {
    /// The directory holding this series' `containerd-shim-runc-v2`: containerd finds shims on PATH.
    pub fn bin_dir(&self) -> &Path {
        self.shim.parent().unwrap_or(Path::new("/usr/bin"))
    }

    /// How [`PrivateContainerd`] runs this series.
    pub fn launch(&self) -> Launch {
        Launch {
            containerd: self.containerd.clone(),
            path_prefix: vec![self.bin_dir().to_path_buf()],
        }
    }

    /// `containerd --version` of these binaries.
    pub fn detect_version(&self) -> Result<ContainerdVersion> {
        ContainerdVersion::detect(&self.containerd)
            .with_context(|| format!("{}", self.containerd.display()))
    }

    /// `containerd --config F config dump`, parsed: what this series makes of the file.
    pub fn dump(&self, config: &Path) -> Result<toml::Table> {
        let out = Command::new(&self.containerd)
            .arg("--config")
            .arg(config)
            .args(["config", "dump"])
            .output()
            .with_context(|| format!("run {} config dump", self.containerd.display()))?;
        if !out.status.success() {
            bail!(
                "{} --config {} config dump failed: {}",
                self.containerd.display(),
                config.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        toml::from_str(&String::from_utf8_lossy(&out.stdout))
            .with_context(|| format!("config dump of {} is not TOML", config.display()))
    }

    /// `containerd config default` of this series.
    pub fn config_default(&self) -> Result<Vec<u8>> {
        let out = Command::new(&self.containerd)
            .args(["config", "default"])
            .output()
            .with_context(|| format!("run {} config default", self.containerd.display()))?;
        if !out.status.success() {
            bail!(
                "{} config default failed: {}",
                self.containerd.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }
}

/// The binaries of `series`: the installed ones for 1.6, else a cached `apt-get download` of the
/// series' Debian suite (fetched on first use; concurrent tests wait for one fetch).
pub fn binaries(series: Series) -> Result<Binaries> {
    let bins = match series.suite() {
        None => Binaries {
            series,
            containerd: PathBuf::from("/usr/bin/containerd"),
            shim: PathBuf::from("/usr/bin/containerd-shim-runc-v2"),
            ctr: PathBuf::from("/usr/bin/ctr"),
        },
        Some(suite) => {
            let root = fetched(series, suite)?;
            let usr = root.join("usr/bin");
            Binaries {
                series,
                containerd: usr.join("containerd"),
                shim: usr.join("containerd-shim-runc-v2"),
                ctr: usr.join("ctr"),
            }
        }
    };
    for b in [&bins.containerd, &bins.shim, &bins.ctr] {
        if !b.is_file() {
            bail!("{series}: {} is missing", b.display());
        }
    }
    Ok(bins)
}

/// Like [`binaries`], but a missing series (no network, no apt) skips the test with a message, and
/// fails it under `CI=true` (a green CI run must mean every series ran).
pub fn require(series: Series) -> Option<Binaries> {
    match binaries(series) {
        Ok(b) => Some(b),
        Err(e) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{series} is not available (CI=true: failing instead of skipping): {e:#}"
            );
            eprintln!("SKIP: {series} not available: {e:#}");
            None
        }
    }
}

/// The workspace target dir: `CARGO_TARGET_DIR`, else the `target` directory holding the running test
/// executable, else `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(d);
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(d) = exe.ancestors().find(|a| a.join("CACHEDIR.TAG").is_file())
    {
        return d.to_path_buf();
    }
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target")
}

/// `<target>/containerd-dist/<series>`: the unpacked package, created once.
fn fetched(series: Series, suite: &str) -> Result<PathBuf> {
    let base = target_dir().join("containerd-dist");
    let dest = base.join(series.name());
    if dest.join("usr/bin/containerd").is_file() {
        return Ok(dest);
    }
    std::fs::create_dir_all(&base).with_context(|| format!("create {}", base.display()))?;
    let lock_path = base.join(format!(".{}.lock", series.name()));
    let lock_file = std::fs::File::create(&lock_path)
        .with_context(|| format!("create {}", lock_path.display()))?;
    // Parallel tests (other processes too) fetch once: whoever gets the lock fetches, the others find
    // the result when they get it.
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow!("lock {}: {e}", lock_path.display()))?;
    if dest.join("usr/bin/containerd").is_file() {
        return Ok(dest);
    }
    let work = tempfile::Builder::new()
        .prefix(&format!(".fetch-{}-", series.name()))
        .tempdir_in(&base)
        .with_context(|| format!("temp dir in {}", base.display()))?;
    let deb = apt_download(work.path(), suite)?;
    let unpacked = work.path().join("root");
    run(Command::new("dpkg").arg("-x").arg(&deb).arg(&unpacked))?;
    let bins = Binaries {
        series,
        containerd: unpacked.join("usr/bin/containerd"),
        shim: unpacked.join("usr/bin/containerd-shim-runc-v2"),
        ctr: unpacked.join("usr/bin/ctr"),
    };
    let version = bins.detect_version()?;
    if !series.matches(version) {
        bail!(
            "containerd/{suite} is {version}, not {}: Debian moved on; update Series",
            series.name()
        );
    }
    // Atomic: a reader sees either no directory or a complete one.
    std::fs::rename(&unpacked, &dest)
        .with_context(|| format!("rename {} to {}", unpacked.display(), dest.display()))?;
    eprintln!(
        "fetched containerd {version} (Debian {suite}) into {}",
        dest.display()
    );
    Ok(dest)
}

/// `apt-get download containerd` from one Debian suite, with a private sources list, lists and cache.
fn apt_download(work: &Path, suite: &str) -> Result<PathBuf> {
    let sources = work.join("sources.list");
    std::fs::write(
        &sources,
        format!("deb http://deb.debian.org/debian {suite} main\n"),
    )
    .with_context(|| format!("write {}", sources.display()))?;
    let lists = work.join("lists");
    let cache = work.join("cache");
    for d in [lists.join("partial"), cache.join("archives/partial")] {
        std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
    }
    let opt = |k: &str, v: &Path| format!("{k}={}", v.display());
    let apt = |sub: &str| {
        let mut c = Command::new("apt-get");
        c.args(["-q", "-o"])
            .arg(opt("Dir::Etc::SourceList", &sources))
            .args(["-o", "Dir::Etc::SourceParts=/dev/null", "-o"])
            .arg(opt("Dir::State::Lists", &lists))
            .arg("-o")
            .arg(opt("Dir::Cache", &cache))
            // Only the package lists: no translations or DEP-11 metadata to download.
            .args([
                "-o",
                "Acquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
                "-o",
                "Acquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false",
                "-o",
                "Acquire::IndexTargets::deb::DEP-11-icons-small::DefaultEnabled=false",
                "-o",
                "Acquire::Languages=none",
                // apt-get download writes into the current directory, which `_apt` cannot enter.
                "-o",
                "APT::Sandbox::User=root",
            ])
            .arg(sub)
            .current_dir(work);
        c
    };
    run(&mut apt("update"))?;
    run(apt("download").arg(format!("containerd/{suite}")))?;
    std::fs::read_dir(work)
        .with_context(|| format!("list {}", work.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("containerd_") && n.ends_with(".deb"))
        })
        .ok_or_else(|| {
            anyhow!(
                "apt-get download containerd/{suite} left no .deb in {}",
                work.display()
            )
        })
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .output()
        .with_context(|| format!("run {:?}", cmd.get_program()))?;
    if !out.status.success() {
        bail!(
            "{:?} {:?} failed ({}): {}",
            cmd.get_program(),
            cmd.get_args().collect::<Vec<_>>(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A private containerd in a temp dir of its own under /tmp (short: socket paths are limited to 107
/// bytes). Dropping it kills containerd, its shims and containers, then removes the directory.
#[derive(Debug)]
pub struct TempContainerd {
    // Declaration order is drop order: containerd is gone before its directory is removed.
    ctrd: PrivateContainerd,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for TempContainerd {
    type Target = PrivateContainerd;
    fn deref(&self) -> &PrivateContainerd {
        &self.ctrd
    }
}

impl std::ops::DerefMut for TempContainerd {
    fn deref_mut(&mut self) -> &mut PrivateContainerd {
        &mut self.ctrd
    }
}

/// The installed containerd (1.6) with the version 2 default config, in a fresh temp dir.
pub async fn start_temp(sandbox_image: &str) -> Result<TempContainerd> {
    start_temp_with(sandbox_image, ConfigVersion::V2, &Launch::default()).await
}

/// Writes the default private config of `version` into a fresh temp dir under /tmp and starts
/// `launch`'s containerd with it.
pub async fn start_temp_with(
    sandbox_image: &str,
    version: ConfigVersion,
    launch: &Launch,
) -> Result<TempContainerd> {
    start_in_temp(launch, |layout| {
        default_config_for(version, layout, sandbox_image)
    })
    .await
}

/// Starts `launch`'s containerd in a fresh temp dir under /tmp with the config `config` writes for
/// that dir's layout.
async fn start_in_temp(
    launch: &Launch,
    config: impl FnOnce(&PrivateLayout) -> String,
) -> Result<TempContainerd> {
    let dir = tempfile::Builder::new()
        .prefix("noded-ctrd-")
        .tempdir_in("/tmp")
        .context("temp dir for a private containerd")?;
    let path = dir.path().join("config.toml");
    std::fs::write(&path, config(&PrivateLayout::new(dir.path())))
        .with_context(|| format!("write {}", path.display()))?;
    let ctrd = PrivateContainerd::start_with(dir.path(), &path, launch).await?;
    Ok(TempContainerd { ctrd, _dir: dir })
}

/// Writes the default private config of `series` into a fresh temp dir under /tmp and starts that
/// series' containerd with it (`<dir>/bin` first on its PATH, then the series' own shim). The temp dir
/// is removed when the returned containerd is dropped.
pub async fn start(series: Series, sandbox_image: &str) -> Result<TempContainerd> {
    let bins = binaries(series)?;
    start_temp_with(sandbox_image, series.config_version(), &bins.launch()).await
}

/// Like [`start`], with `runtime` registered as one more runc handler whose runc is `binary` (e.g. a
/// wrapper that makes every runc call slow).
pub async fn start_with_runc_handler(
    series: Series,
    sandbox_image: &str,
    runtime: &str,
    binary: &Path,
) -> Result<TempContainerd> {
    let bins = binaries(series)?;
    let table = format!(
        "plugins.{}.containerd.runtimes.{runtime}",
        toml_quote(series.runtime_plugin())
    );
    start_in_temp(&bins.launch(), |layout| {
        format!(
            "{}\n[{table}]\n  runtime_type = \"io.containerd.runc.v2\"\n\n\
             [{table}.options]\n  BinaryName = {}\n  SystemdCgroup = false\n",
            default_config_for(series.config_version(), layout, sandbox_image),
            toml_quote(&binary.display().to_string()),
        )
    })
    .await
}

/// The default private config of `series` for `dir` (version 2 for 1.x, version 3 for 2.x).
pub fn default_config(series: Series, dir: &Path, sandbox_image: &str) -> String {
    default_config_for(
        series.config_version(),
        &PrivateLayout::new(dir),
        sandbox_image,
    )
}

/// The default private config for a config version: noded's own (version 2, containerd 1.x, what
/// local mode writes) or [`default_config_v3`] (version 3, containerd 2.x).
pub fn default_config_for(
    version: ConfigVersion,
    layout: &PrivateLayout,
    sandbox_image: &str,
) -> String {
    match version {
        ConfigVersion::V3 => default_config_v3(layout, sandbox_image),
        _ => private::default_config(layout, sandbox_image),
    }
}

fn toml_quote(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// The containerd 2.x config (version 3) with the same recipe as noded's version 2 default: the CRI
/// plugin is split into `io.containerd.cri.v1.images` (the sandbox image is `pinned_images.sandbox`
/// there) and `io.containerd.cri.v1.runtime` (runtimes, CNI, the sandbox settings).
pub fn default_config_v3(layout: &PrivateLayout, sandbox_image: &str) -> String {
    let q = |p: &Path| toml_quote(&p.display().to_string());
    format!(
        r#"{head}
  [plugins."io.containerd.cri.v1.images"]
    snapshotter = "overlayfs"

    [plugins."io.containerd.cri.v1.images".pinned_images]
      sandbox = {sandbox}

  [plugins."io.containerd.cri.v1.runtime"]
    netns_mounts_under_state_dir = true
    disable_apparmor = true
    restrict_oom_score_adj = true

    [plugins."io.containerd.cri.v1.runtime".cni]
      bin_dirs = [{cni_bin}]
      conf_dir = {cni_conf}

    [plugins."io.containerd.cri.v1.runtime".containerd]
      default_runtime_name = "runc"

      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes]

        [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
          runtime_type = "io.containerd.runc.v2"

          [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
            SystemdCgroup = false
"#,
        head = noded::containerd::private::config_head(layout, 3),
        sandbox = toml_quote(sandbox_image),
        cni_bin = q(&layout.cni_bin),
        cni_conf = q(&layout.cni_conf),
    )
}

/// One test per series: `per_series!(fn name(series) { ... })` expands to a module `name` with the
/// tests `V1_6`, `V1_7` and `V2_1`, each calling the body with its [`Series`]. A leading list picks
/// series (`per_series!([V1_6, V2_1] async fn ...)`, for tests too expensive for every series).
/// `async fn` bodies run on a two-worker tokio runtime.
#[macro_export]
macro_rules! per_series {
    ($(#[$m:meta])* fn $name:ident($s:ident) $body:block) => {
        $crate::per_series!([V1_6, V1_7, V2_1] $(#[$m])* fn $name($s) $body);
    };
    ($(#[$m:meta])* async fn $name:ident($s:ident) $body:block) => {
        $crate::per_series!([V1_6, V1_7, V2_1] $(#[$m])* async fn $name($s) $body);
    };
    ([$($v:ident),+] $(#[$m:meta])* fn $name:ident($s:ident) $body:block) => {
        $(#[$m])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            fn run($s: $crate::containerd::Series) $body
            $(
                #[test]
                #[allow(non_snake_case)]
                fn $v() {
                    run($crate::containerd::Series::$v)
                }
            )+
        }
    };
    ([$($v:ident),+] $(#[$m:meta])* async fn $name:ident($s:ident) $body:block) => {
        $(#[$m])*
        mod $name {
            #[allow(unused_imports)]
            use super::*;
            async fn run($s: $crate::containerd::Series) $body
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[allow(non_snake_case)]
                async fn $v() {
                    Box::pin(run($crate::containerd::Series::$v)).await
                }
            )+
        }
    };
}
