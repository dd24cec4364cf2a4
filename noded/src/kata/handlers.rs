//! `[[handlers]]` in noded.toml: operator-defined Kata runtime handlers (runtime, hypervisor, Kata
//! root, snapshotter) with Kata settings, and the noded-owned drop-ins that carry those settings.
//!
//! Facts this relies on (kata-containers 7c6ba40c54):
//! - Go runtime (`src/runtime/pkg/katautils/config.go`, `decodeConfig`/`decodeDropIns`): the config
//!   path is resolved with `filepath.EvalSymlinks` (`utils.go` `ResolvePath`), then every entry of
//!   `config.d/` beside the *resolved* file is decoded over it, in `os.ReadDir` order (by file name).
//! - runtime-rs (`src/libs/kata-types/src/config/drop_in.rs`): `config.d/` beside the config path,
//!   regular files only, sorted by file name, merged key by key (a leaf in a drop-in replaces the
//!   base value whole: `kernel_params` is replaced, not appended).
//! - Layout (`tools/packaging/kata-deploy/binary/src/utils/system.rs`, `src/runtime-rs/Makefile`):
//!   Go shim `<root>/bin/containerd-shim-kata-v2`, configs `<root>/share/defaults/kata-containers/
//!   configuration-{qemu,clh,fc}.toml`; runtime-rs shim `<root>/runtime-rs/bin/containerd-shim-kata-v2`,
//!   configs under `.../kata-containers/runtime-rs/` named `configuration-qemu-runtime-rs.toml`,
//!   `configuration-clh-runtime-rs.toml`, `configuration-rs-fc.toml`, `configuration-dragonball.toml`.
//! - Agent proxy: the agent reads `agent.https_proxy` / `agent.no_proxy` from the guest kernel
//!   command line (`src/agent/src/config.rs`); kata-deploy passes them through `kernel_params`.
//!
//! Because `config.d/` is per directory, a handler with settings gets its own directory: a copy of
//! the shipped configuration (a regular file, not a symlink: the Go runtime would follow a symlink to
//! the shared directory) plus `config.d/50-noded.toml`. Two handlers sharing one shipped file thus
//! never see each other's settings, and Kata's own files are never edited. A `warm = true` handler
//! also gets its own directory: its copy is the templating configuration derived from the shipped
//! file as for the kata-qemu-warm preset (kata/warm.rs), with the handler's own `template_path`, and
//! noded's keeper builds that template (`kata-runtime --config <copy> factory init`, which merges the
//! drop-ins as the shim does).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{KataError, write_atomic};
use crate::containerd::handler::HandlerSpec;
use crate::containerd::snapshotter::Snapshotter;

/// Which Kata shim implementation serves the handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KataRuntime {
    #[default]
    Go,
    /// runtime-rs (kata-deploy's `*-runtime-rs` shims).
    Rust,
}

/// The VMM, spelled as kata-deploy's shim names spell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HandlerHypervisor {
    Qemu,
    Clh,
    Fc,
    /// runtime-rs only (built into its shim).
    Dragonball,
}

/// One `[[handlers]]` entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HandlerConfig {
    /// RuntimeClass handler name and containerd runtime name.
    pub name: String,
    #[serde(default)]
    pub runtime: KataRuntime,
    pub hypervisor: HandlerHypervisor,
    /// Served from Kata's VM factory template: Go runtime + QEMU only (runtime-rs's `kata-ctl
    /// factory` ignores the configuration, see [`KataError::RuntimeRsFactory`]).
    #[serde(default)]
    pub warm: bool,
    /// Where Kata's factory template of a warm handler lives (`[factory] template_path`); default
    /// `/run/vc/vm/template-<name>`. A tmpfs `kata-runtime factory init` mounts.
    pub template_path: Option<PathBuf>,
    pub snapshotter: Option<Snapshotter>,
    /// Kata install this handler uses; unset = `containerd.kata_root`.
    pub kata_root: Option<PathBuf>,
    pub default_vcpus: Option<u32>,
    /// MiB.
    pub default_memory: Option<u32>,
    /// Sets `enable_debug` in the hypervisor, `[agent.kata]` and `[runtime]` tables the file has.
    pub enable_debug: Option<bool>,
    /// Hypervisor annotations pods may set (`enable_annotations`).
    pub enable_annotations: Option<Vec<String>>,
    /// Appended to the shipped file's `kernel_params`.
    pub kernel_params: Option<String>,
    /// Guest agent proxy (`agent.https_proxy=` on the guest kernel command line).
    pub agent_https_proxy: Option<String>,
    pub agent_no_proxy: Option<String>,
    /// Any other Kata key, in the shape of Kata's file (`[handlers.kata.hypervisor.qemu]
    /// block_device_driver = "virtio-blk"`); each key must exist in the shipped configuration.
    #[serde(default)]
    pub kata: toml::Table,
}

/// Kata's install prefix when `containerd.kata_root` is unset.
pub const DEFAULT_KATA_ROOT: &str = "/opt/kata";
/// noded's record of the files it wrote for `[[handlers]]`, in `daemon.data_dir`.
pub const STATE_FILE: &str = "kata-handlers.json";
/// The one drop-in noded writes per handler; 50 leaves room either side for an operator's own.
pub const DROPIN_NAME: &str = "50-noded.toml";

impl HandlerConfig {
    /// Load-time checks serde cannot do; the message names the field (`handlers[i].<field>`).
    pub fn validate(&self, i: usize) -> Result<(), String> {
        let field = |f: &str| format!("handlers[{i}].{f}");
        crate::names::check_label(&self.name).map_err(|e| format!("{}: {e}", field("name")))?;
        // noded publishes RuntimeClasses (k8s::runtimeclass::class_names) for kata-* handlers only.
        if !self.name.starts_with("kata-") {
            return Err(format!(
                "{}: {:?} must start with `kata-` (the handlers noded publishes RuntimeClasses for)",
                field("name"),
                self.name
            ));
        }
        if self.hypervisor == HandlerHypervisor::Dragonball && self.runtime == KataRuntime::Go {
            return Err(format!(
                "{}: dragonball is built into runtime-rs only; set runtime = \"rust\"",
                field("hypervisor")
            ));
        }
        if self.warm
            && (self.runtime, self.hypervisor) != (KataRuntime::Go, HandlerHypervisor::Qemu)
        {
            return Err(format!(
                "{}: VM templating is kept by noded for runtime = \"go\" with hypervisor = \"qemu\" only",
                field("warm")
            ));
        }
        if let Some(p) = &self.template_path {
            if !self.warm {
                return Err(format!(
                    "{}: only a warm = true handler has a factory template",
                    field("template_path")
                ));
            }
            if !p.is_absolute() {
                return Err(format!(
                    "{}: {} is not an absolute path",
                    field("template_path"),
                    p.display()
                ));
            }
        }
        if let Some(root) = &self.kata_root
            && !root.is_absolute()
        {
            return Err(format!(
                "{}: {} is not an absolute path",
                field("kata_root"),
                root.display()
            ));
        }
        if self.default_vcpus == Some(0) {
            return Err(format!("{}: must be at least 1", field("default_vcpus")));
        }
        if self.default_memory == Some(0) {
            return Err(format!(
                "{}: must be at least 1 (MiB)",
                field("default_memory")
            ));
        }
        // Each goes onto the guest kernel command line as one word.
        for (f, v) in [
            ("agent_https_proxy", &self.agent_https_proxy),
            ("agent_no_proxy", &self.agent_no_proxy),
        ] {
            if let Some(v) = v
                && (v.is_empty() || v.chars().any(char::is_whitespace))
            {
                return Err(format!("{}: must be one word, no whitespace", field(f)));
            }
        }
        if let Some(k) = &self.kernel_params
            && k.contains(['\n', '"'])
        {
            return Err(format!(
                "{}: must not contain newlines or quotes",
                field("kernel_params")
            ));
        }
        for (k, v) in &self.kata {
            if !v.is_table() {
                return Err(format!(
                    "{}: Kata's file has no top-level keys, only tables; expected a table",
                    field(&format!("kata.{k}"))
                ));
            }
        }
        Ok(())
    }

    /// Whether the handler gets its own configuration directory: for a drop-in, or for the
    /// templating configuration of a warm handler (which the shipped file is not).
    pub fn own_dir_needed(&self) -> bool {
        self.warm || self.has_settings()
    }

    /// Kata's factory template of a warm handler: one per handler, beside Kata's default
    /// (`/run/vc/vm/template`, the kata-qemu-warm preset's), on the tmpfs `kata-runtime factory init`
    /// mounts there.
    pub fn factory_template_path(&self) -> PathBuf {
        self.template_path.clone().unwrap_or_else(|| {
            PathBuf::from(format!(
                "{}-{}",
                super::warm::DEFAULT_TEMPLATE_PATH,
                self.name
            ))
        })
    }

    /// Whether noded writes a drop-in.
    pub fn has_settings(&self) -> bool {
        self.default_vcpus.is_some()
            || self.default_memory.is_some()
            || self.enable_debug.is_some()
            || self.enable_annotations.is_some()
            || self.kernel_params.is_some()
            || self.agent_https_proxy.is_some()
            || self.agent_no_proxy.is_some()
            || !self.kata.is_empty()
    }

    pub fn kata_root(&self, default_root: &Path) -> PathBuf {
        self.kata_root
            .clone()
            .unwrap_or_else(|| default_root.to_path_buf())
    }

    pub fn shim_path(&self, root: &Path) -> PathBuf {
        match self.runtime {
            KataRuntime::Go => root.join("bin/containerd-shim-kata-v2"),
            KataRuntime::Rust => root.join("runtime-rs/bin/containerd-shim-kata-v2"),
        }
    }

    /// The configuration file the Kata release ships for this runtime and hypervisor.
    pub fn shipped_config(&self, root: &Path) -> PathBuf {
        let defaults = root.join("share/defaults/kata-containers");
        let file = match (self.runtime, self.hypervisor) {
            (KataRuntime::Go, HandlerHypervisor::Qemu) => "configuration-qemu.toml",
            (KataRuntime::Go, HandlerHypervisor::Clh) => "configuration-clh.toml",
            (KataRuntime::Go, HandlerHypervisor::Fc) => "configuration-fc.toml",
            // Refused by validate(); the path still names what would be missing.
            (KataRuntime::Go, HandlerHypervisor::Dragonball) => "configuration-dragonball.toml",
            (KataRuntime::Rust, HandlerHypervisor::Qemu) => {
                "runtime-rs/configuration-qemu-runtime-rs.toml"
            }
            (KataRuntime::Rust, HandlerHypervisor::Clh) => {
                "runtime-rs/configuration-clh-runtime-rs.toml"
            }
            (KataRuntime::Rust, HandlerHypervisor::Fc) => "runtime-rs/configuration-rs-fc.toml",
            (KataRuntime::Rust, HandlerHypervisor::Dragonball) => {
                "runtime-rs/configuration-dragonball.toml"
            }
        };
        defaults.join(file)
    }

    /// noded's directory for this handler: the copied configuration and its `config.d/`.
    pub fn own_dir(&self, root: &Path) -> PathBuf {
        root.join("share/defaults/kata-containers/noded")
            .join(&self.name)
    }

    /// What containerd's `ConfigPath` names: the shipped file, or noded's copy when the handler has
    /// settings or is warm (so its `config.d/` is the handler's alone).
    pub fn config_path(&self, root: &Path) -> PathBuf {
        let shipped = self.shipped_config(root);
        if !self.own_dir_needed() {
            return shipped;
        }
        match shipped.file_name() {
            Some(name) => self.own_dir(root).join(name),
            None => shipped,
        }
    }

    pub fn dropin_path(&self, root: &Path) -> PathBuf {
        self.own_dir(root).join("config.d").join(DROPIN_NAME)
    }

    /// The handler's containerd runtime table.
    pub fn spec(&self, default_root: &Path) -> HandlerSpec {
        let root = self.kata_root(default_root);
        HandlerSpec {
            name: self.name.clone(),
            runtime_type: format!("io.containerd.{}.v2", self.name),
            runtime_path: self.shim_path(&root),
            config_path: self.config_path(&root),
            // Firecracker has no shared filesystem: without a choice, a block snapshotter.
            snapshotter: self.snapshotter.clone().or_else(|| {
                (self.hypervisor == HandlerHypervisor::Fc).then_some(Snapshotter::Devmapper)
            }),
        }
    }

    /// The drop-in's bytes for the shipped configuration `shipped_text` (read from `shipped_path`).
    /// Every free-form key must exist in that file: a typo is refused, not silently ignored by Kata
    /// (the Go runtime only logs "undecoded keys").
    pub fn render_dropin(
        &self,
        shipped_path: &Path,
        shipped_text: &str,
    ) -> Result<String, KataError> {
        let invalid = |message: String| KataError::InvalidConfig {
            path: shipped_path.to_path_buf(),
            message,
        };
        let shipped: toml::Table = toml::from_str(shipped_text)
            .map_err(|e| invalid(crate::config::one_line(&e.to_string())))?;
        let hypervisors = shipped
            .get("hypervisor")
            .and_then(toml::Value::as_table)
            .ok_or_else(|| invalid("no [hypervisor.<name>] table".into()))?;
        let mut names = hypervisors
            .iter()
            .filter(|(_, v)| v.is_table())
            .map(|(k, _)| k.clone());
        let hv = match (names.next(), names.next()) {
            (Some(one), None) => one,
            _ => {
                return Err(invalid(
                    "expected exactly one [hypervisor.<name>] table".into(),
                ));
            }
        };

        let mut out = toml::Table::new();
        let mut set = |path: &[&str], value: toml::Value| insert_path(&mut out, path, value);
        if let Some(v) = self.default_vcpus {
            set(&["hypervisor", &hv, "default_vcpus"], i64::from(v).into());
        }
        if let Some(v) = self.default_memory {
            set(&["hypervisor", &hv, "default_memory"], i64::from(v).into());
        }
        if let Some(list) = &self.enable_annotations {
            let arr = list.iter().cloned().map(toml::Value::from).collect();
            set(
                &["hypervisor", &hv, "enable_annotations"],
                toml::Value::Array(arr),
            );
        }
        let mut extra: Vec<String> = Vec::new();
        if let Some(k) = &self.kernel_params {
            extra.extend(k.split_whitespace().map(str::to_owned));
        }
        if let Some(p) = &self.agent_https_proxy {
            extra.push(format!("agent.https_proxy={p}"));
        }
        if let Some(p) = &self.agent_no_proxy {
            extra.push(format!("agent.no_proxy={p}"));
        }
        if !extra.is_empty() {
            // A drop-in replaces kernel_params whole: keep the release's own parameters first.
            let base = lookup(&shipped, &["hypervisor", &hv, "kernel_params"])
                .and_then(toml::Value::as_str)
                .unwrap_or_default();
            let joined: Vec<&str> = base
                .split_whitespace()
                .chain(extra.iter().map(String::as_str))
                .collect();
            set(
                &["hypervisor", &hv, "kernel_params"],
                joined.join(" ").into(),
            );
        }
        if let Some(debug) = self.enable_debug {
            for table in [
                vec!["hypervisor", hv.as_str()],
                vec!["agent", "kata"],
                vec!["runtime"],
            ] {
                if lookup(&shipped, &table).is_some_and(toml::Value::is_table) {
                    let mut path = table.clone();
                    path.push("enable_debug");
                    set(&path, debug.into());
                }
            }
        }

        let mut leaves = Vec::new();
        collect_leaves(&self.kata, &mut Vec::new(), &mut leaves);
        for (path, value) in leaves {
            let refs: Vec<&str> = path.iter().map(String::as_str).collect();
            let dotted = path.join(".");
            if lookup(&shipped, &refs).is_none() {
                return Err(invalid(format!(
                    "handlers.{}.kata.{dotted}: not a key of this Kata configuration",
                    self.name
                )));
            }
            if lookup(&out, &refs).is_some() {
                return Err(invalid(format!(
                    "handlers.{}.kata.{dotted}: also set by a typed handler field; set it once",
                    self.name
                )));
            }
            insert_path(&mut out, &refs, value);
        }

        let body = toml::to_string(&out).map_err(|e| invalid(e.to_string()))?;
        Ok(format!(
            "# Written by noded for the {} handler from noded.toml [[handlers]]. Do not edit: noded\n\
             # rewrites it when the settings change and deletes it on revert.\n{body}",
            self.name
        ))
    }
}

fn lookup<'a>(table: &'a toml::Table, path: &[&str]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut t = table;
    for p in parents {
        t = t.get(*p)?.as_table()?;
    }
    t.get(*last)
}

fn insert_path(table: &mut toml::Table, path: &[&str], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut t = table;
    for p in parents {
        let entry = t
            .entry((*p).to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        t = next;
    }
    t.insert((*last).to_owned(), value);
}

fn collect_leaves(
    table: &toml::Table,
    prefix: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, toml::Value)>,
) {
    for (k, v) in table {
        prefix.push(k.clone());
        match v {
            toml::Value::Table(t) => collect_leaves(t, prefix, out),
            other => out.push((prefix.clone(), other.clone())),
        }
        prefix.pop();
    }
}

/// What noded wrote for `[[handlers]]`: each file with the sha256 of its bytes, so revert removes
/// only files still as noded left them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropinState {
    pub files: BTreeMap<PathBuf, String>,
}

/// One apply's result.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DropinOutcome {
    /// Files whose bytes changed (created or rewritten).
    pub written: Vec<PathBuf>,
    /// Files noded had written that no handler needs any more, removed.
    pub removed: Vec<PathBuf>,
    /// Files noded had written and someone changed since: left in place.
    pub kept_modified: Vec<PathBuf>,
}

impl DropinOutcome {
    pub fn changed(&self) -> bool {
        !self.written.is_empty() || !self.removed.is_empty()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> KataError + '_ {
    move |source| KataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn load_state(state_path: &Path) -> Result<DropinState, KataError> {
    match std::fs::read(state_path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| KataError::InvalidConfig {
            path: state_path.to_path_buf(),
            message: crate::config::one_line(&e.to_string()),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(DropinState::default()),
        Err(e) => Err(io_err(state_path)(e)),
    }
}

fn save_state(state_path: &Path, state: &DropinState) -> Result<(), KataError> {
    if state.files.is_empty() {
        return match crate::fsutil::remove_durable(state_path) {
            Ok(()) => Ok(()),
            Err(e) if e.source.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(KataError::Io {
                path: e.path,
                source: e.source,
            }),
        };
    }
    let bytes = serde_json::to_vec_pretty(state).map_err(|e| KataError::InvalidConfig {
        path: state_path.to_path_buf(),
        message: e.to_string(),
    })?;
    if let Some(dir) = state_path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    write_atomic(state_path, &bytes, 0o600)
}

/// Writes `bytes` unless the file already has them; true when it wrote.
fn write_if_changed(path: &Path, bytes: &[u8]) -> Result<bool, KataError> {
    match std::fs::read(path) {
        Ok(current) if current == bytes => return Ok(false),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(path)(e)),
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    write_atomic(path, bytes, 0o644)?;
    Ok(true)
}

/// Removes `path` if it still has the bytes noded recorded; false when someone changed it.
fn remove_if_ours(path: &Path, sha: &str) -> Result<bool, KataError> {
    match crate::fsutil::sha256_file(path) {
        Ok(current) if current == sha => {}
        Ok(_) => return Ok(false),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(io_err(path)(e)),
    }
    crate::fsutil::remove_durable(path).map_err(|e| KataError::Io {
        path: e.path,
        source: e.source,
    })?;
    // noded's own directories (config.d, the handler's, `noded/`) go when empty; anything else
    // (an operator's drop-in) keeps them.
    let mut dir = path.parent();
    while let Some(d) = dir {
        let ours = d.file_name().is_some_and(|n| n == "config.d")
            || d.parent()
                .and_then(Path::file_name)
                .is_some_and(|n| n == "noded")
            || (d.file_name().is_some_and(|n| n == "noded")
                && d.parent()
                    .and_then(Path::file_name)
                    .is_some_and(|n| n == "kata-containers"));
        if !ours || std::fs::remove_dir(d).is_err() {
            break;
        }
        dir = d.parent();
    }
    Ok(true)
}

/// Brings every handler's copied configuration and drop-in to what `handlers` says, recorded in
/// `state_path`; files of handlers no longer configured (or without settings) are removed. Nothing
/// is rewritten when the bytes are already right.
#[tracing::instrument(skip_all, fields(state = %state_path.display()))]
pub fn apply(
    handlers: &[HandlerConfig],
    default_root: &Path,
    state_path: &Path,
) -> Result<DropinOutcome, KataError> {
    // A handler on a Kata root this process cannot see (a side-by-side release not installed, or
    // not mounted into the DaemonSet) is named here, not as a missing file deep inside it.
    for h in handlers {
        let root = h.kata_root(default_root);
        if !root.is_dir() {
            let fix = if root == default_root {
                "Kata is not installed (`installer bake`)"
            } else {
                "install it (`installer bake --kata-root`) and, for the DaemonSet, mount it \
                 (daemonset/examples/kata-canary)"
            };
            return Err(KataError::InvalidConfig {
                path: root,
                message: format!("Kata root of handler {} is not here: {fix}", h.name),
            });
        }
    }
    let mut state = load_state(state_path)?;
    let mut outcome = DropinOutcome::default();
    let mut wanted: BTreeMap<PathBuf, Vec<u8>> = BTreeMap::new();
    // Render everything first: a bad key in any handler leaves every file untouched.
    for h in handlers.iter().filter(|h| h.own_dir_needed()) {
        let root = h.kata_root(default_root);
        let shipped = h.shipped_config(&root);
        let mut text = std::fs::read_to_string(&shipped).map_err(io_err(&shipped))?;
        if h.warm {
            // The templating configuration, derived as for the kata-qemu-warm preset but with this
            // handler's own template; its settings still come as a drop-in over it.
            let opts = super::WarmOptions {
                template_path: h.factory_template_path(),
                ..super::WarmOptions::default()
            };
            let (warm, _, _) =
                super::warm::render(&shipped, &text, &super::KataLayout::new(&root), &opts)?;
            text = warm.replacen(
                "for the kata-qemu-warm handler",
                &format!("for the {} handler", h.name),
                1,
            );
        }
        if h.has_settings() {
            let dropin = h.render_dropin(&shipped, &text)?;
            wanted.insert(h.dropin_path(&root), dropin.into_bytes());
        }
        wanted.insert(h.config_path(&root), text.into_bytes());
    }
    for (path, bytes) in &wanted {
        // Recorded before the write: a crash between the two leaves a record of a file that is
        // either absent or ours, never an unrecorded file of ours.
        state
            .files
            .insert(path.clone(), crate::fsutil::sha256_bytes(bytes));
        save_state(state_path, &state)?;
        if write_if_changed(path, bytes)? {
            tracing::info!(path = %path.display(), "wrote Kata handler configuration");
            outcome.written.push(path.clone());
        }
    }
    let stale: Vec<(PathBuf, String)> = state
        .files
        .iter()
        .filter(|(p, _)| !wanted.contains_key(*p))
        .map(|(p, s)| (p.clone(), s.clone()))
        .collect();
    for (path, sha) in stale {
        if remove_if_ours(&path, &sha)? {
            outcome.removed.push(path.clone());
        } else {
            tracing::warn!(path = %path.display(), "changed since noded wrote it; left in place");
            outcome.kept_modified.push(path.clone());
        }
        state.files.remove(&path);
    }
    save_state(state_path, &state)?;
    Ok(outcome)
}

/// Removes everything [`apply`] recorded (revert/uninstall): the Kata tree is left as the release
/// shipped it, plus any file someone changed after noded wrote it (reported, not deleted).
pub fn revert(state_path: &Path) -> Result<DropinOutcome, KataError> {
    apply(&[], Path::new(DEFAULT_KATA_ROOT), state_path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> HandlerConfig {
        toml::from_str(text).expect("handler")
    }

    const SHIPPED: &str = r#"
[hypervisor.qemu]
path = "/opt/kata/bin/qemu-system-x86_64"
kernel_params = "cgroup_no_v1=all"
default_vcpus = 1
default_memory = 2048
enable_debug = false
block_device_driver = "virtio-scsi"

[agent.kata]
enable_debug = false

[runtime]
enable_debug = false
"#;

    #[test]
    fn layout_per_runtime() {
        let go = parse("name = \"a\"\nhypervisor = \"clh\"");
        let root = Path::new("/opt/kata");
        assert_eq!(go.shim_path(root), root.join("bin/containerd-shim-kata-v2"));
        assert_eq!(
            go.config_path(root),
            root.join("share/defaults/kata-containers/configuration-clh.toml")
        );
        let rs =
            parse("name = \"b\"\nruntime = \"rust\"\nhypervisor = \"qemu\"\ndefault_vcpus = 2");
        assert_eq!(
            rs.shim_path(root),
            root.join("runtime-rs/bin/containerd-shim-kata-v2")
        );
        assert_eq!(
            rs.config_path(root),
            root.join("share/defaults/kata-containers/noded/b/configuration-qemu-runtime-rs.toml")
        );
        assert_eq!(rs.spec(root).runtime_type, "io.containerd.b.v2");
    }

    #[test]
    fn validate_names_the_field() {
        let e = parse("name = \"kata-d\"\nhypervisor = \"dragonball\"").validate(3);
        assert!(
            e.expect_err("go+dragonball")
                .starts_with("handlers[3].hypervisor:")
        );
        let e = parse("name = \"kata-w\"\nhypervisor = \"clh\"\nwarm = true").validate(0);
        assert!(e.expect_err("warm clh").starts_with("handlers[0].warm:"));
        let e = parse("name = \"kata-p\"\nhypervisor = \"qemu\"\nagent_https_proxy = \"a b\"")
            .validate(1);
        assert!(
            e.expect_err("proxy")
                .starts_with("handlers[1].agent_https_proxy:")
        );
        assert!(
            toml::from_str::<HandlerConfig>("name = \"x\"\nhypervisor = \"qemu\"\nvcpus = 2")
                .is_err()
        );
    }

    #[test]
    fn a_warm_handler_has_its_own_dir_and_template() {
        let w = parse("name = \"kata-w\"\nhypervisor = \"qemu\"\nwarm = true");
        assert_eq!(w.validate(0), Ok(()));
        let root = Path::new("/opt/kata");
        // No settings, still its own templating copy (the shipped file has templating off).
        assert_eq!(
            w.config_path(root),
            root.join("share/defaults/kata-containers/noded/kata-w/configuration-qemu.toml")
        );
        assert_eq!(
            w.factory_template_path(),
            Path::new("/run/vc/vm/template-kata-w")
        );
        let moved = parse(
            "name = \"kata-w\"\nhypervisor = \"qemu\"\nwarm = true\ntemplate_path = \"/dev/shm/t\"",
        );
        assert_eq!(moved.factory_template_path(), Path::new("/dev/shm/t"));
        for (text, field) in [
            (
                "name = \"kata-w\"\nhypervisor = \"qemu\"\ntemplate_path = \"/t\"",
                "handlers[0].template_path",
            ),
            (
                "name = \"kata-w\"\nhypervisor = \"qemu\"\nwarm = true\ntemplate_path = \"t\"",
                "handlers[0].template_path",
            ),
            (
                "name = \"kata-w\"\nruntime = \"rust\"\nhypervisor = \"qemu\"\nwarm = true",
                "handlers[0].warm",
            ),
        ] {
            let e = parse(text).validate(0).expect_err(text);
            assert!(e.starts_with(field), "{e}");
        }
    }

    #[test]
    fn dropin_renders_typed_and_free_keys() {
        let h = parse(
            r#"name = "kata-qemu-big"
hypervisor = "qemu"
default_vcpus = 4
default_memory = 4096
enable_debug = true
enable_annotations = ["default_vcpus"]
kernel_params = "quiet"
agent_https_proxy = "http://proxy:3128"
[kata.hypervisor.qemu]
block_device_driver = "virtio-blk"
"#,
        );
        let out = h
            .render_dropin(Path::new("/s.toml"), SHIPPED)
            .expect("render");
        let t: toml::Table = toml::from_str(&out).expect("toml");
        let q = &t["hypervisor"]["qemu"];
        assert_eq!(q["default_vcpus"].as_integer(), Some(4));
        assert_eq!(
            q["kernel_params"].as_str(),
            Some("cgroup_no_v1=all quiet agent.https_proxy=http://proxy:3128")
        );
        assert_eq!(q["block_device_driver"].as_str(), Some("virtio-blk"));
        assert_eq!(t["agent"]["kata"]["enable_debug"].as_bool(), Some(true));
        assert_eq!(t["runtime"]["enable_debug"].as_bool(), Some(true));

        let typo = parse(
            "name = \"t\"\nhypervisor = \"qemu\"\n[kata.hypervisor.qemu]\nblock_device_drivr = 1",
        );
        let e = typo
            .render_dropin(Path::new("/s.toml"), SHIPPED)
            .expect_err("typo");
        assert_eq!(
            e.to_string(),
            "/s.toml: handlers.t.kata.hypervisor.qemu.block_device_drivr: not a key of this Kata configuration"
        );
        let twice = parse(
            "name = \"t\"\nhypervisor = \"qemu\"\ndefault_vcpus = 2\n[kata.hypervisor.qemu]\ndefault_vcpus = 3",
        );
        assert!(twice.render_dropin(Path::new("/s.toml"), SHIPPED).is_err());
    }

    #[test]
    fn a_handler_on_a_missing_root_is_named_and_nothing_is_written() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = tmp.path().join("state/kata-handlers.json");
        let h = parse(&format!(
            "name = \"kata-qemu-328\"\nhypervisor = \"qemu\"\nkata_root = \"{}\"",
            tmp.path().join("opt/kata-3.28").display()
        ));
        let err = apply(&[h], tmp.path(), &state).expect_err("missing root");
        let text = err.to_string();
        assert!(
            text.contains("kata-qemu-328") && text.contains("opt/kata-3.28"),
            "{text}"
        );
        assert!(!state.exists(), "state written for a refused apply");
    }
}
