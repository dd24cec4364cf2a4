//! Keeps Kata's own VM template present and current.
//!
//! Kata's factory template lives on a tmpfs (`template_path`), so it is gone after every reboot, and it
//! is stale after a Kata upgrade or a change of kernel, initrd or config. When it is missing Kata does
//! not fail: it silently cold-boots every sandbox. This adapter checks the template against a
//! fingerprint recorded when it was built, rebuilds it through Kata's own tool (`kata-runtime factory
//! init`, or `kata-ctl factory init` on runtime-rs releases) and reports every rebuild.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
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
}

/// Why a build happened; also the `outcome`/reason a caller puts on its counters and events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EnsureAction {
    Kept,
    BuiltMissing,
    RebuiltStale,
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
    pub failed: AtomicU64,
}

#[derive(Debug)]
pub struct KataFactory {
    layout: KataLayout,
    /// The config the factory is initialised from (`configuration-qemu-warm.toml`).
    config: PathBuf,
    template_path: PathBuf,
    /// Persistent record of the fingerprint the current template was built from.
    record: PathBuf,
    pub counters: FactoryCounters,
}

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    template_path: PathBuf,
    fingerprint: Fingerprint,
}

impl KataFactory {
    /// `data_dir` is noded's persistent directory; the record must survive the reboot that empties
    /// the template tmpfs, otherwise an upgrade across a reboot could not be told from a plain boot.
    pub fn new(layout: KataLayout, config: PathBuf, data_dir: &Path) -> Result<Self, KataError> {
        let template_path = template_path_of(&config)?;
        Ok(Self {
            layout,
            config,
            template_path,
            record: data_dir.join("kata").join("factory-template.json"),
            counters: FactoryCounters::default(),
        })
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
            config_sha256: hex::encode(Sha256::digest(text.as_bytes())),
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
                None => TemplateState::Current,
                Some(what) => TemplateState::Stale(what),
            },
        }
    }

    /// Makes sure a current template exists, building or rebuilding it as needed. Every build is
    /// logged at warn level and counted: a missing template means cold boots until it is back.
    pub fn ensure(&self) -> Result<EnsureOutcome, KataError> {
        let span = tracing::info_span!("kata_factory", template = %self.template_path.display());
        let _g = span.enter();
        let tool = self
            .layout
            .factory_tool()
            .ok_or_else(|| KataError::NoFactoryTool(self.layout.root().to_path_buf()))?;
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
                // Kata refuses `init` over an existing template; destroy first. A failing destroy
                // (nothing mounted) is fine, `init` decides.
                let _ = self.run(&tool, "destroy");
                EnsureAction::RebuiltStale
            }
        };
        if action != EnsureAction::Kept {
            if let Err(e) = self.build(&tool, &fingerprint) {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                return Err(e);
            }
            match action {
                EnsureAction::BuiltMissing => &self.counters.built_missing,
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

    /// Removes the template and the record (uninstall, or `noded template destroy`).
    pub fn destroy(&self) -> Result<(), KataError> {
        if let Some(tool) = self.layout.factory_tool() {
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
        };
        let json = serde_json::to_vec_pretty(&record).map_err(|e| KataError::InvalidConfig {
            path: self.record.clone(),
            message: e.to_string(),
        })?;
        write_atomic(&self.record, &json, 0o644)?;
        tracing::info!(tool = %tool.display(), "Kata VM template built");
        Ok(())
    }

    /// `kata-runtime --config <cfg> factory <verb>`; `kata-ctl` takes the config from
    /// `KATA_CONF_FILE` (runtime-rs) instead of a flag.
    fn run(&self, tool: &Path, verb: &str) -> Result<(), KataError> {
        let mut cmd = Command::new(tool);
        if tool.file_name().is_some_and(|n| n == "kata-ctl") {
            cmd.env("KATA_CONF_FILE", &self.config);
        } else {
            cmd.arg("--config").arg(&self.config);
        }
        cmd.args(["factory", verb]);
        let out = cmd.output().map_err(|source| KataError::Io {
            path: tool.to_path_buf(),
            source,
        })?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            return Err(KataError::FactoryCommand {
                tool: tool.to_path_buf(),
                verb: verb.to_owned(),
                status: out.status.code(),
                stderr: crate::config::one_line(stderr.trim()),
            });
        }
        Ok(())
    }
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

pub fn sha256_file(path: &Path) -> Result<String, KataError> {
    let mut f = std::fs::File::open(path).map_err(|source| KataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|source| KataError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(hex::encode(h.finalize()))
}
