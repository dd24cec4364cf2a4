//! Keeps Kata's own VM template present and current.
//!
//! Kata's factory template lives on a tmpfs (`template_path`), so it is gone after every reboot, and it
//! is stale after a Kata upgrade or a change of kernel, initrd or config. When it is missing Kata does
//! not fail: it silently cold-boots every sandbox. This adapter checks the template against a
//! fingerprint recorded when it was built, rebuilds it through Kata's own tool (`kata-runtime factory
//! init`; runtime-rs's `kata-ctl` is refused, see [`KataFactory::tool`]) and reports every rebuild.

use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use toml_edit::DocumentMut;

use super::layout::KataLayout;
use super::{KataError, write_atomic};

/// Files Kata's Go runtime writes into the template directory (virtcontainers/factory/template).
pub const TEMPLATE_FILES: [&str; 2] = ["memory", "state"];

/// What the template must match; any difference means it was built from something else.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub kata_version: String,
    pub config_sha256: String,
    pub kernel_sha256: String,
    pub initrd_sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "detail")]
pub enum TemplateState {
    Current,
    /// No template files (the normal state after boot: tmpfs starts empty).
    Missing,
    /// Files exist but were built from another Kata/config/kernel/initrd, or were never recorded.
    Stale(String),
    /// Files exist and were built from the right inputs, but are not what the build left (truncated,
    /// rewritten): a clone of them would fail or, worse, boot a corrupted guest.
    Damaged(String),
}

/// Why a build happened; also the `outcome`/reason a caller puts on its counters and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EnsureAction {
    Kept,
    BuiltMissing,
    RebuiltStale,
    RebuiltDamaged,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct EnsureOutcome {
    pub action: EnsureAction,
    pub template_path: PathBuf,
    pub fingerprint: Fingerprint,
    pub tool: PathBuf,
}

/// Counts since start, for `noded_template_builds_total` and the status API.
#[derive(Debug, Default)]
pub struct FactoryCounters {
    pub built_missing: AtomicU64,
    pub rebuilt_stale: AtomicU64,
    pub rebuilt_damaged: AtomicU64,
    pub failed: AtomicU64,
}

/// How `kata-runtime factory` is run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FactoryExec {
    /// A hung template VM must not hold the keeper forever: the tool is killed after this.
    pub timeout: Duration,
}

impl Default for FactoryExec {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(120),
        }
    }
}

#[derive(Debug)]
pub struct KataFactory {
    layout: KataLayout,
    /// The config the factory is initialised from (`configuration-qemu-warm.toml`).
    config: PathBuf,
    template_path: PathBuf,
    /// Persistent record of the fingerprint the current template was built from.
    record: PathBuf,
    exec: FactoryExec,
    pub counters: FactoryCounters,
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    template_path: PathBuf,
    fingerprint: Fingerprint,
    /// What the build left, to tell a damaged template from a good one without reading the guest
    /// memory (clones map it private, so nothing legitimately writes it after the build).
    files: Option<BuiltFiles>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct BuiltFiles {
    memory_bytes: u64,
    memory_mtime_ns: i64,
    state_bytes: u64,
    state_sha256: String,
}

impl BuiltFiles {
    fn read(dir: &Path) -> Result<Self, KataError> {
        let meta =
            |p: PathBuf| std::fs::metadata(&p).map_err(|source| KataError::Io { path: p, source });
        let memory = meta(dir.join("memory"))?;
        let state = meta(dir.join("state"))?;
        Ok(Self {
            memory_bytes: memory.len(),
            memory_mtime_ns: memory
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(memory.mtime_nsec()),
            state_bytes: state.len(),
            state_sha256: sha256_file(&dir.join("state"))?,
        })
    }
}

impl KataFactory {
    /// `data_dir` is noded's persistent directory; the record must survive the reboot that empties
    /// the template tmpfs, otherwise an upgrade across a reboot could not be told from a plain boot.
    pub fn new(layout: KataLayout, config: PathBuf, data_dir: &Path) -> Result<Self, KataError> {
        let template_path = template_path_of(&config)?;
        // One record per warm config: two warm handlers must not vouch for each other's template.
        // A [[handlers]] entry's config is `.../noded/<handler>/configuration-qemu.toml` (one file
        // name for all of them): its record is named after the handler's directory.
        let own_dir = config
            .parent()
            .filter(|d| d.parent().and_then(Path::file_name) == Some("noded".as_ref()));
        let stem = own_dir
            .and_then(Path::file_name)
            .or_else(|| config.file_stem())
            .and_then(|s| s.to_str())
            .unwrap_or("configuration");
        Ok(Self {
            layout,
            template_path,
            record: data_dir
                .join("kata")
                .join(format!("factory-template.{stem}.json")),
            config,
            exec: FactoryExec::default(),
            counters: FactoryCounters::default(),
        })
    }

    pub fn with_exec(mut self, exec: FactoryExec) -> Self {
        self.exec = exec;
        self
    }

    pub fn template_path(&self) -> &Path {
        &self.template_path
    }

    /// The fingerprint of what a template built now would be built from.
    pub fn fingerprint(&self) -> Result<Fingerprint, KataError> {
        let text = read(&self.config)?;
        let doc: DocumentMut = parse(&self.config, &text)?;
        let qemu = doc
            .get("hypervisor")
            .and_then(|h| h.get("qemu"))
            .ok_or_else(|| KataError::InvalidConfig {
                path: self.config.clone(),
                message: "no [hypervisor.qemu] table".into(),
            })?;
        let asset = |key: &str| -> Result<String, KataError> {
            let p = qemu
                .get(key)
                .and_then(|v| v.as_str())
                .filter(|s| !s.is_empty())
                .ok_or_else(|| KataError::InvalidConfig {
                    path: self.config.clone(),
                    message: format!("[hypervisor.qemu] {key} is not set"),
                })?;
            sha256_file(Path::new(p))
        };
        Ok(Fingerprint {
            kata_version: self
                .layout
                .version()
                .ok_or_else(|| KataError::NoVersion(self.layout.root().to_path_buf()))?,
            config_sha256: config_sha256(&self.config, &text)?,
            kernel_sha256: asset("kernel")?,
            initrd_sha256: asset("initrd")?,
        })
    }

    /// Compares the template on disk with `want`.
    pub fn state(&self, want: &Fingerprint) -> TemplateState {
        let complete = TEMPLATE_FILES.iter().all(|f| {
            std::fs::metadata(self.template_path.join(f)).is_ok_and(|m| m.is_file() && m.len() > 0)
        });
        if !complete {
            return TemplateState::Missing;
        }
        match std::fs::read(&self.record)
            .ok()
            .and_then(|b| serde_json::from_slice::<Record>(&b).ok())
        {
            None => TemplateState::Stale("no record of what the template was built from".into()),
            Some(r) if r.template_path != self.template_path => TemplateState::Stale(format!(
                "recorded for {}, configured {}",
                r.template_path.display(),
                self.template_path.display()
            )),
            Some(r) => match diff(&r.fingerprint, want) {
                Some(what) => TemplateState::Stale(what),
                None => match (r.files, BuiltFiles::read(&self.template_path)) {
                    (None, _) => TemplateState::Stale(
                        "recorded by an older noded without file checksums".into(),
                    ),
                    (Some(_), Err(e)) => TemplateState::Damaged(e.to_string()),
                    (Some(built), Ok(now)) => match damage(&built, &now) {
                        None => TemplateState::Current,
                        Some(what) => TemplateState::Damaged(what),
                    },
                },
            },
        }
    }

    /// Makes sure a current template exists, building or rebuilding it as needed. Every build is
    /// logged at warn level and counted: a missing template means cold boots until it is back.
    pub fn ensure(&self) -> Result<EnsureOutcome, KataError> {
        let span = tracing::info_span!("kata_factory", template = %self.template_path.display());
        let _g = span.enter();
        let tool = self.tool()?;
        let fingerprint = self.fingerprint()?;
        let action = match self.state(&fingerprint) {
            TemplateState::Current => EnsureAction::Kept,
            TemplateState::Missing => {
                tracing::warn!(
                    "Kata VM template missing: building it (sandboxes cold-boot meanwhile)"
                );
                EnsureAction::BuiltMissing
            }
            TemplateState::Stale(why) => {
                tracing::warn!(reason = %why, "Kata VM template stale: rebuilding it");
                self.destroy_files(&tool);
                EnsureAction::RebuiltStale
            }
            TemplateState::Damaged(why) => {
                tracing::warn!(reason = %why, "Kata VM template damaged: rebuilding it");
                self.destroy_files(&tool);
                EnsureAction::RebuiltDamaged
            }
        };
        if action != EnsureAction::Kept {
            if let Err(e) = self.build(&tool, &fingerprint) {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
            match action {
                EnsureAction::BuiltMissing => &self.counters.built_missing,
                EnsureAction::RebuiltDamaged => &self.counters.rebuilt_damaged,
                _ => &self.counters.rebuilt_stale,
            }
            .fetch_add(1, Ordering::Relaxed);
        }
        Ok(EnsureOutcome {
            action,
            template_path: self.template_path.clone(),
            fingerprint,
            tool,
        })
    }

    /// The tool that builds templates for this install. runtime-rs's `kata-ctl factory` reads its
    /// own default configuration (`[hypervisor.qemu.factory]`) and ignores `KATA_CONF_FILE`, so a
    /// template it built would not be the one the warm config describes: refused, not guessed.
    fn tool(&self) -> Result<PathBuf, KataError> {
        let tool = self
            .layout
            .factory_tool()
            .ok_or_else(|| KataError::NoFactoryTool(self.layout.root().to_path_buf()))?;
        if tool.file_name().is_some_and(|n| n == "kata-ctl") {
            return Err(KataError::RuntimeRsFactory(tool));
        }
        Ok(tool)
    }

    /// Kata refuses `init` over an existing template: destroy first. A failing destroy (nothing
    /// mounted) is fine, `init` decides; whatever files are left are removed so `init` starts clean.
    fn destroy_files(&self, tool: &Path) {
        let _ = std::fs::remove_file(&self.record);
        if let Err(e) = self.run(tool, "destroy") {
            tracing::debug!("factory destroy before rebuild: {e}");
        }
        for f in TEMPLATE_FILES {
            let _ = std::fs::remove_file(self.template_path.join(f));
        }
    }

    /// Removes the template and the record (uninstall, or `noded template destroy`).
    pub fn destroy(&self) -> Result<(), KataError> {
        if let Ok(tool) = self.tool() {
            self.run(&tool, "destroy")?;
        }
        match std::fs::remove_file(&self.record) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(KataError::Io {
                path: self.record.clone(),
                source,
            }),
        }
    }

    fn build(&self, tool: &Path, fingerprint: &Fingerprint) -> Result<(), KataError> {
        // A record left from an older template must not vouch for a half-built new one.
        let _ = std::fs::remove_file(&self.record);
        self.run(tool, "init")?;
        if !TEMPLATE_FILES
            .iter()
            .all(|f| self.template_path.join(f).is_file())
        {
            return Err(KataError::TemplateNotCreated {
                tool: tool.to_path_buf(),
                path: self.template_path.clone(),
            });
        }
        let record = Record {
            template_path: self.template_path.clone(),
            fingerprint: fingerprint.clone(),
            files: Some(BuiltFiles::read(&self.template_path)?),
        };
        let json = serde_json::to_vec_pretty(&record).map_err(|e| KataError::InvalidConfig {
            path: self.record.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&self.record, &json, 0o644)?;
        tracing::info!(tool = %tool.display(), "Kata VM template built");
        Ok(())
    }

    /// `kata-runtime --config <cfg> factory <verb>`, killed after `exec.timeout`.
    fn run(&self, tool: &Path, verb: &str) -> Result<(), KataError> {
        let io = |source| KataError::Io {
            path: tool.to_path_buf(),
            source,
        };
        let mut child = Command::new(tool)
            .arg("--config")
            .arg(&self.config)
            .args(["factory", verb])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(io)?;
        // Drained on a thread: a chatty tool must not block on a full pipe while we wait for it.
        let stderr = child.stderr.take().map(|mut e| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = e.read_to_string(&mut s);
                s
            })
        });
        let deadline = Instant::now() + self.exec.timeout;
        let status = loop {
            if let Some(st) = child.try_wait().map_err(io)? {
                break Some(st);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        match status {
            Some(st) if st.success() => Ok(()),
            Some(st) => Err(KataError::FactoryCommand {
                tool: tool.to_path_buf(),
                verb: verb.to_owned(),
                status: st.code(),
                stderr: crate::config::one_line(stderr.trim()),
            }),
            None => Err(KataError::FactoryCommand {
                tool: tool.to_path_buf(),
                verb: verb.to_owned(),
                status: None,
                stderr: format!("killed after {:?}", self.exec.timeout),
            }),
        }
    }
}

/// Runs `f` with every path resolved in the mount namespace `ns` (e.g. `/proc/1/ns/mnt`: the host's,
/// seen from a `hostPID` pod), and every process it starts in that namespace. Kata's tools, QEMU, the
/// template tmpfs and a freshly baked `/opt/kata` are the host's: a pod's hostPath bind mount keeps
/// showing the directory an `installer bake` has since replaced, and noded's image has no libc for a
/// tool that is not static. `None`, or the namespace noded runs in already, = run `f` here.
///
/// setns(CLONE_NEWNS) is refused to a thread sharing its filesystem context, i.e. to every thread of
/// a multi-threaded noded: a thread of its own unshares that context, enters, runs `f` and ends,
/// taking the namespace with it. noded's other threads never leave their own.
pub fn in_mount_namespace<T: Send>(
    ns: Option<&Path>,
    f: impl FnOnce() -> Result<T, KataError> + Send,
) -> Result<T, KataError> {
    let Some(path) = ns else { return f() };
    let io = |source| KataError::Io {
        path: path.to_path_buf(),
        source,
    };
    let target = std::fs::metadata(path).map_err(io)?;
    let own = std::fs::metadata("/proc/self/ns/mnt").map_err(io)?;
    if (target.dev(), target.ino()) == (own.dev(), own.ino()) {
        return f();
    }
    let file = std::fs::File::open(path).map_err(io)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                use nix::sched::{CloneFlags, setns, unshare};
                let enter = |e: nix::Error| KataError::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::from(e),
                };
                unshare(CloneFlags::CLONE_FS).map_err(enter)?;
                setns(&file, CloneFlags::CLONE_NEWNS).map_err(enter)?;
                nix::unistd::chdir("/").map_err(enter)?;
                f()
            })
            .join()
            .unwrap_or_else(|_| {
                Err(KataError::Io {
                    path: path.to_path_buf(),
                    source: std::io::Error::other("the thread running in this namespace panicked"),
                })
            })
    })
}

fn damage(built: &BuiltFiles, now: &BuiltFiles) -> Option<String> {
    let mut what = Vec::new();
    if built.memory_bytes != now.memory_bytes {
        what.push(format!(
            "memory is {} bytes, the build left {}",
            now.memory_bytes, built.memory_bytes
        ));
    } else if built.memory_mtime_ns != now.memory_mtime_ns {
        what.push("memory was written after the build".to_string());
    }
    if built.state_bytes != now.state_bytes || built.state_sha256 != now.state_sha256 {
        what.push("state differs from what the build saved".to_string());
    }
    (!what.is_empty()).then(|| what.join(", "))
}

fn diff(have: &Fingerprint, want: &Fingerprint) -> Option<String> {
    let mut what = Vec::new();
    if have.kata_version != want.kata_version {
        what.push(format!(
            "kata version {} -> {}",
            have.kata_version, want.kata_version
        ));
    }
    for (name, a, b) in [
        ("config", &have.config_sha256, &want.config_sha256),
        ("kernel", &have.kernel_sha256, &want.kernel_sha256),
        ("initrd", &have.initrd_sha256, &want.initrd_sha256),
    ] {
        if a != b {
            what.push(format!("{name} changed"));
        }
    }
    (!what.is_empty()).then(|| what.join(", "))
}

/// What Kata builds a template from: the configuration and the drop-ins merged over it (the
/// regular files of `config.d/` beside the symlink-resolved path, by name; see kata/handlers.rs).
/// Without drop-ins this is the sha256 of the file alone, as records before drop-ins have it.
fn config_sha256(config: &Path, text: &str) -> Result<String, KataError> {
    let resolved = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
    let dir = resolved
        .parent()
        .map(|p| p.join("config.d"))
        .unwrap_or_default();
    let mut dropins: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(entries) => entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
            .map(|e| e.path())
            .collect(),
        Err(_) => Vec::new(),
    };
    if dropins.is_empty() {
        return Ok(crate::fsutil::sha256_bytes(text.as_bytes()));
    }
    dropins.sort();
    let mut all = text.as_bytes().to_vec();
    for d in dropins {
        all.push(0);
        all.extend_from_slice(d.file_name().unwrap_or_default().as_encoded_bytes());
        all.push(0);
        all.extend(read(&d)?.into_bytes());
    }
    Ok(crate::fsutil::sha256_bytes(&all))
}

fn template_path_of(config: &Path) -> Result<PathBuf, KataError> {
    let text = read(config)?;
    let doc = parse(config, &text)?;
    let factory = doc.get("factory");
    if factory
        .and_then(|f| f.get("enable_template"))
        .and_then(|v| v.as_bool())
        != Some(true)
    {
        return Err(KataError::InvalidConfig {
            path: config.to_path_buf(),
            message: "[factory] enable_template is not true; derive the warm config first".into(),
        });
    }
    Ok(factory
        .and_then(|f| f.get("template_path"))
        .and_then(|v| v.as_str())
        .map_or_else(
            || PathBuf::from(super::warm::DEFAULT_TEMPLATE_PATH),
            PathBuf::from,
        ))
}

fn read(path: &Path) -> Result<String, KataError> {
    std::fs::read_to_string(path).map_err(|source| KataError::Io {
        path: path.to_path_buf(),
        source,
    })
}

fn parse(path: &Path, text: &str) -> Result<DocumentMut, KataError> {
    text.parse()
        .map_err(|e: toml_edit::TomlError| KataError::InvalidConfig {
            path: path.to_path_buf(),
            message: crate::config::one_line(&e.to_string()),
        })
}

fn sha256_file(path: &Path) -> Result<String, KataError> {
    crate::fsutil::sha256_file(path).map_err(|source| KataError::Io {
        path: path.to_path_buf(),
        source,
    })
}
