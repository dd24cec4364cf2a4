//! The containerd embedded in k3s and rke2, behind the [`RuntimeConfigurator`] seam.
//!
//! k3s and rke2 run their own containerd and write its `config.toml` at every start from a Go
//! `text/template` next to it (k3s docs "Configuring containerd", rke2-docs `docs/advanced.md`):
//! `config-v3.toml.tmpl` (a version 3 config, containerd 2.x), else `config.toml.tmpl` (version 2;
//! containerd 2.x still renders it when no v3 template exists), else their built-in template. Inside a
//! template `{{ template "base" . }}` expands to that built-in template (k3s
//! `pkg/agent/templates/templates.go`, `ParseTemplateFromConfig` defines `base`). Editing `config.toml`
//! itself is lost at the next start, so noded writes the template.
//!
//! noded's handlers are one owned block appended at the end of the template, between a begin and an
//! end marker. An operator's template is never reformatted: its `{{ }}` actions and every other byte
//! stay as they are, and the block alone is replaced on re-apply and cut out on revert, which gives
//! back the exact original bytes. Where no template exists noded creates
//! `{{ template "base" . }}` + its block, and revert deletes the file again. The handler tables are
//! containerd's own rendering ([`super::handler::HandlerSpec::to_table`]) under the CRI plugin of
//! the template's config version.
//!
//! Restarting the unit (`k3s-agent`, `rke2-agent`, or the server units) restarts its containerd
//! and with it the config rendered from the template. Running pods survive it as they survive a
//! containerd restart: their shims outlive containerd (the unit k3s' install script writes has
//! `KillMode=process`, so systemd stops only the main process; seen in a third-party playbook that
//! patches it, not checked against `install.sh` itself).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use tracing::{info, warn};

use super::apply::verify_loaded;
use super::document::ConfigVersion;
use super::handler::{HandlerSpec, KataHandler};
use super::restart::{self, Restart, RestartError};
use super::snapshotter::{SnapshotterError, check_specs};
use super::state::{FileRecord, StateError, StateStore};
use super::version::{ContainerdVersion, VersionError};
use crate::config::NodedConfig;
use crate::exit::{self, ExitStatus};
use crate::fsutil::{self, FsError, sha256_bytes};
use crate::runtime::{Access, Change, RuntimeConfigurator, RuntimeError};

/// Which containerd noded configures: `[containerd] flavour` in noded.toml.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Flavour {
    /// containerd of its own, `containerd.config` edited as containerd reads it.
    #[default]
    Containerd,
    /// k3s agent node (`k3s-agent.service`).
    K3s,
    /// k3s server node that also runs pods (`k3s.service`).
    K3sServer,
    /// rke2 agent node (`rke2-agent.service`).
    Rke2,
    /// rke2 server node that also runs pods (`rke2-server.service`).
    Rke2Server,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{0}`: expected containerd, k3s, k3s-server, rke2 or rke2-server")]
pub struct BadFlavour(pub String);

impl FromStr for Flavour {
    type Err = BadFlavour;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "containerd" => Self::Containerd,
            "k3s" => Self::K3s,
            "k3s-server" => Self::K3sServer,
            "rke2" => Self::Rke2,
            "rke2-server" => Self::Rke2Server,
            other => return Err(BadFlavour(other.to_owned())),
        })
    }
}

impl Flavour {
    /// containerd embedded in k3s or rke2 (configured through its template).
    pub fn is_embedded(self) -> bool {
        self != Self::Containerd
    }

    /// The distribution's data dir (`--data-dir` default).
    fn data_dir(self) -> Option<&'static str> {
        match self {
            Self::Containerd => None,
            Self::K3s | Self::K3sServer => Some("/var/lib/rancher/k3s"),
            Self::Rke2 | Self::Rke2Server => Some("/var/lib/rancher/rke2"),
        }
    }

    /// The `config.toml` the distribution generates (noded writes the templates next to it).
    pub fn default_config(self) -> Option<PathBuf> {
        self.data_dir()
            .map(|d| Path::new(d).join("agent/etc/containerd/config.toml"))
    }

    /// The embedded containerd's socket (both distributions: rke2-docs `reference/cli_tools.md`).
    pub fn default_socket(self) -> Option<PathBuf> {
        self.is_embedded()
            .then(|| PathBuf::from("/run/k3s/containerd/containerd.sock"))
    }

    /// The systemd unit whose restart restarts the embedded containerd.
    pub fn unit(self) -> &'static str {
        match self {
            Self::Containerd => super::systemd::DEFAULT_UNIT,
            Self::K3s => "k3s-agent.service",
            Self::K3sServer => "k3s.service",
            Self::Rke2 => "rke2-agent.service",
            Self::Rke2Server => "rke2-server.service",
        }
    }

    /// The embedded containerd binary, asked for its version only while nothing answers on the
    /// socket (`installer boot` before the unit starts). rke2-docs `install/quickstart.md` names
    /// `/var/lib/rancher/rke2/bin` for its tools (kubectl, crictl, ctr); that containerd is there too,
    /// and k3s's `data/current/bin`, is not verified here: `Access::binary` overrides it.
    fn default_binary(self) -> PathBuf {
        match self {
            Self::Rke2 | Self::Rke2Server => PathBuf::from("/var/lib/rancher/rke2/bin/containerd"),
            Self::K3s | Self::K3sServer => {
                PathBuf::from("/var/lib/rancher/k3s/data/current/bin/containerd")
            }
            Self::Containerd => PathBuf::from("containerd"),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Containerd => "containerd",
            Self::K3s => "k3s",
            Self::K3sServer => "k3s-server",
            Self::Rke2 => "rke2",
            Self::Rke2Server => "rke2-server",
        }
    }
}

/// The template's first line when noded creates it: the distribution's own config, then noded's block.
pub const BASE_INCLUDE: &str = "{{ template \"base\" . }}\n";
/// Template file names, newest first.
pub const TEMPLATE_V3: &str = "config-v3.toml.tmpl";
pub const TEMPLATE_V2: &str = "config.toml.tmpl";
const BEGIN: &str = "# BEGIN noded: Kata runtime handlers";
const END: &str = "# END noded";

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid UTF-8")]
    NotUtf8 { path: PathBuf },
    #[error("{path}: line {line}: template action `{{{{` is never closed with `}}}}`")]
    UnclosedAction { path: PathBuf, line: usize },
    #[error(
        "{path}: line {line}: `{{{{ {keyword} }}}}` is never closed with `{{{{ end }}}}`; noded appends at the end of the template and would land inside it"
    )]
    OpenBlock {
        path: PathBuf,
        line: usize,
        keyword: String,
    },
    #[error("{path}: line {line}: {problem}")]
    Markers {
        path: PathBuf,
        line: usize,
        problem: &'static str,
    },
    #[error(
        "{path}: line {line}: runtime handler `{handler}` is already defined outside noded's block; refusing to add a second table (the rendered config would not parse)"
    )]
    Foreign {
        path: PathBuf,
        line: usize,
        handler: String,
    },
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Write(#[from] FsError),
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error(transparent)]
    Snapshotter(#[from] SnapshotterError),
    #[error("restarting {unit}: {source}")]
    Restart { unit: String, source: RestartError },
    #[error(
        "verification failed after restarting {unit}: {reason}; the previous template was restored{restored}"
    )]
    Verify {
        unit: String,
        reason: String,
        restored: String,
    },
}

impl ExitStatus for TemplateError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::NotUtf8 { .. }
            | Self::UnclosedAction { .. }
            | Self::OpenBlock { .. }
            | Self::Markers { .. }
            | Self::Version(_)
            | Self::Snapshotter(_)
            | Self::State(StateError::Corrupt { .. }) => exit::BAD_INPUT,
            _ => exit::RUNTIME_FAILURE,
        }
    }
}

/// A template as read: its text without noded's block, and whether the block was there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub path: PathBuf,
    pub existed: bool,
    /// The exact bytes read.
    pub original: String,
    /// `original` with noded's block cut out: the operator's template, byte for byte.
    pub operator: String,
    pub had_block: bool,
}

impl Template {
    /// Reads and checks `path` (a missing file is an empty template). Every refusal is one line
    /// naming the file and line; nothing is written before this succeeded.
    pub fn load(path: &Path) -> Result<Self, TemplateError> {
        let (bytes, existed) = match std::fs::read(path) {
            Ok(b) => (b, true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), false),
            Err(source) => {
                return Err(TemplateError::Read {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let original = String::from_utf8(bytes).map_err(|_| TemplateError::NotUtf8 {
            path: path.to_path_buf(),
        })?;
        Self::parse(path, original, existed)
    }

    pub fn parse(path: &Path, original: String, existed: bool) -> Result<Self, TemplateError> {
        let (operator, had_block) = cut_block(path, &original)?;
        check_actions(path, &operator)?;
        Ok(Self {
            path: path.to_path_buf(),
            existed,
            original,
            operator,
            had_block,
        })
    }

    /// The template with `block` as noded's block (a new file starts with the base include).
    pub fn with_block(&self, block: &str) -> String {
        let operator = if self.existed || self.had_block {
            self.operator.as_str()
        } else {
            BASE_INCLUDE
        };
        format!("{operator}{block}")
    }

    /// The `version = N` the operator's template declares itself, before its first table (a full
    /// template rather than `{{ template "base" . }}` + additions): noded's tables follow it.
    pub fn declared_version(&self) -> Option<ConfigVersion> {
        for line in self.operator.lines() {
            let t = line.trim();
            if t.starts_with('[') {
                return None;
            }
            let Some(value) = t.strip_prefix("version").map(str::trim_start) else {
                continue;
            };
            let Some(value) = value.strip_prefix('=') else {
                continue;
            };
            return match value.split('#').next().map(str::trim) {
                Some("1") => Some(ConfigVersion::V1),
                Some("2") => Some(ConfigVersion::V2),
                Some("3") => Some(ConfigVersion::V3),
                _ => None,
            };
        }
        None
    }

    /// Refuses handler tables of the same name outside noded's block: a second `[...runtimes.<h>]`
    /// header makes the rendered TOML invalid and the distribution's containerd would not start.
    pub fn check_foreign(&self, specs: &[HandlerSpec]) -> Result<(), TemplateError> {
        for (i, line) in self.operator.lines().enumerate() {
            let Some(keys) = header_keys(line) else {
                continue;
            };
            let Some(pos) = keys.iter().position(|k| k == "runtimes") else {
                continue;
            };
            if pos < 2 || keys[0] != "plugins" || keys[pos - 1] != "containerd" {
                continue;
            }
            if let Some(h) = keys
                .get(pos + 1)
                .filter(|h| specs.iter().any(|s| &s.name == *h))
            {
                return Err(TemplateError::Foreign {
                    path: self.path.clone(),
                    line: i + 1,
                    handler: h.clone(),
                });
            }
        }
        Ok(())
    }
}

/// The keys of a `[table]` or `[[array]]` header line, None for any other line.
fn header_keys(line: &str) -> Option<Vec<String>> {
    let t = line.trim();
    let inner = t
        .strip_prefix("[[")
        .and_then(|r| r.split("]]").next())
        .or_else(|| t.strip_prefix('[').and_then(|r| r.split(']').next()))?;
    if inner.contains("{{") {
        return None;
    }
    let keys = toml_edit::Key::parse(inner).ok()?;
    Some(keys.iter().map(|k| k.get().to_owned()).collect())
}

/// Cuts noded's block (`\n` + begin marker line … end marker line + `\n`) out of `text`. The leading
/// newline belongs to the block: appended to a file without a final newline, it ends that file's last
/// line, and cutting it gives the file back byte for byte.
fn cut_block(path: &Path, text: &str) -> Result<(String, bool), TemplateError> {
    let marker = |line: usize, problem| TemplateError::Markers {
        path: path.to_path_buf(),
        line,
        problem,
    };
    let line_of = |offset: usize| text[..offset].matches('\n').count() + 1;
    let begins: Vec<usize> = text.match_indices(BEGIN).map(|(i, _)| i).collect();
    let ends: Vec<usize> = text.match_indices(END).map(|(i, _)| i).collect();
    match (begins.as_slice(), ends.as_slice()) {
        ([], []) => Ok((text.to_owned(), false)),
        ([b], [e]) if b < e => {
            if *b == 0 || text.as_bytes()[b - 1] != b'\n' {
                return Err(marker(
                    line_of(*b),
                    "noded's begin marker is not at the start of a line",
                ));
            }
            let after_end = text[*e..].find('\n').map(|n| e + n + 1).ok_or_else(|| {
                marker(
                    line_of(*e),
                    "noded's end marker is not followed by a newline",
                )
            })?;
            Ok((format!("{}{}", &text[..b - 1], &text[after_end..]), true))
        }
        ([], [e, ..]) => Err(marker(
            line_of(*e),
            "noded's end marker without its begin marker",
        )),
        ([b], []) => Err(marker(
            line_of(*b),
            "noded's begin marker without its end marker",
        )),
        ([_, b, ..], _) => Err(marker(line_of(*b), "noded's block appears twice")),
        (_, [_, e, ..]) => Err(marker(line_of(*e), "noded's end marker appears twice")),
        ([b], [_]) => Err(marker(
            line_of(*b),
            "noded's end marker comes before its begin marker",
        )),
    }
}

/// Checks that every `{{` action is closed and every block action (`if`, `range`, `with`, `define`,
/// `block`) has its `end`: noded's block goes after the operator's last line and must not fall
/// inside one.
fn check_actions(path: &Path, text: &str) -> Result<(), TemplateError> {
    let mut open: Vec<(usize, String)> = Vec::new();
    let mut rest = text;
    let mut consumed = 0;
    while let Some(start) = rest.find("{{") {
        let line = text[..consumed + start].matches('\n').count() + 1;
        let Some(len) = rest[start..].find("}}") else {
            return Err(TemplateError::UnclosedAction {
                path: path.to_path_buf(),
                line,
            });
        };
        let action =
            rest[start + 2..start + len].trim_matches(|c: char| c == '-' || c.is_whitespace());
        // Comments (`{{/* */}}`) are neither.
        if !action.starts_with("/*") {
            let keyword = action.split_whitespace().next().unwrap_or_default();
            match keyword {
                "if" | "range" | "with" | "define" | "block" => {
                    open.push((line, keyword.to_owned()))
                }
                "end" => {
                    open.pop();
                }
                _ => {}
            }
        }
        consumed += start + len + 2;
        rest = &rest[start + len + 2..];
    }
    match open.pop() {
        Some((line, keyword)) => Err(TemplateError::OpenBlock {
            path: path.to_path_buf(),
            line,
            keyword,
        }),
        None => Ok(()),
    }
}

/// noded's block for `specs` in a template of `version`: the handler tables under the CRI runtime
/// plugin, containerd's own rendering, between the markers; in a version 3 template also the images
/// plugin's `runtime_platforms.<handler>` of a handler with a snapshotter (containerd 2.x unpacks that
/// handler's images with it; it never derives the entry itself). Never a `version` key or a `runc`
/// table: the base template has both, and a second one would not parse.
pub fn render_block(specs: &[HandlerSpec], version: ConfigVersion) -> String {
    // Built from the inside out: only the leaf tables get headers, their parents stay implicit.
    fn nested(path: &[&str], leaves: Vec<(&str, toml_edit::Table)>) -> toml_edit::Table {
        let mut item = toml_edit::Table::new();
        item.set_implicit(true);
        for (name, table) in leaves {
            item.insert(name, toml_edit::Item::Table(table));
        }
        for key in path.iter().rev() {
            let mut parent = toml_edit::Table::new();
            parent.set_implicit(true);
            parent.insert(key, toml_edit::Item::Table(item));
            item = parent;
        }
        item
    }
    let handlers = specs
        .iter()
        .map(|s| (s.name.as_str(), s.to_table()))
        .collect();
    let mut plugins = nested(
        &[version.cri_runtime_plugin(), "containerd", "runtimes"],
        handlers,
    );
    let platforms: Vec<_> = specs
        .iter()
        .filter_map(|s| Some((s.name.as_str(), s.runtime_platform_table()?)))
        .collect();
    if version == ConfigVersion::V3 && !platforms.is_empty() {
        let images = nested(
            &[ConfigVersion::IMAGES_PLUGIN, "runtime_platforms"],
            platforms,
        );
        for (key, item) in images {
            plugins.insert(&key, item);
        }
    }
    let mut doc = toml_edit::DocumentMut::new();
    doc.insert("plugins", toml_edit::Item::Table(plugins));
    let body = doc.to_string();
    format!(
        "\n{BEGIN} (noded writes and removes this block; `installer uninstall` cuts it out)\n{}{END}\n",
        if body.ends_with('\n') || body.is_empty() {
            body
        } else {
            format!("{body}\n")
        }
    )
}

/// The template noded writes for a containerd of `version` in `dir`: the v3 template on containerd
/// 2.x when it exists, else the v2 template when it exists (containerd 2.x renders it when no v3
/// one is there), else a new one of the containerd's preferred version.
pub fn target(dir: &Path, version: ContainerdVersion) -> (PathBuf, ConfigVersion) {
    let v3 = dir.join(TEMPLATE_V3);
    let v2 = dir.join(TEMPLATE_V2);
    if version.merges_imports() && v3.exists() {
        (v3, ConfigVersion::V3)
    } else if v2.exists() || !version.merges_imports() {
        (v2, ConfigVersion::V2)
    } else {
        (v3, ConfigVersion::V3)
    }
}

/// The containerd of a k3s or rke2 node, as noded.toml and an [`Access`] describe it.
#[derive(Debug, Clone)]
pub struct EmbeddedContainerd {
    pub flavour: Flavour,
    /// Where the templates and the generated `config.toml` live.
    pub dir: PathBuf,
    /// The embedded containerd's socket, asked for the version and for verification; None: not
    /// running (version from `binary`).
    pub socket: Option<PathBuf>,
    /// Where containerd listens after a restart (verification).
    pub listen: PathBuf,
    pub binary: PathBuf,
    pub kata_root: PathBuf,
    /// noded.toml's `[[handlers]]`, registered after the presets.
    pub custom: Vec<HandlerSpec>,
    /// noded's ownership record (`daemon.data_dir`).
    pub state_dir: PathBuf,
    /// The restart method, already aimed at the flavour's unit.
    pub restart: Restart,
    /// Pinned version (tests, or a caller that knows); None: asked.
    pub version: Option<ContainerdVersion>,
}

/// `restart` aimed at `unit` (systemd methods); a command or never stay as they are.
pub fn restart_for(restart: &Restart, unit: &str) -> Restart {
    let aim = |t: &super::systemd::SystemdTarget| super::systemd::SystemdTarget {
        unit: unit.to_owned(),
        ..t.clone()
    };
    match restart {
        Restart::Auto(t) => Restart::Auto(aim(t)),
        Restart::Systemd(t) => Restart::Systemd(aim(t)),
        other => other.clone(),
    }
}

/// One planned write of a template.
#[derive(Debug, Clone)]
struct Planned {
    template: Template,
    /// Templates noded wrote earlier that are no longer the one the distribution reads (a v3
    /// template appeared): their block is cut out.
    stale: Vec<(PathBuf, FileRecord)>,
    after: String,
    handlers: Vec<String>,
    version: ContainerdVersion,
}

impl Planned {
    fn changed(&self) -> bool {
        !self.template.existed || self.after != self.template.original || !self.stale.is_empty()
    }
}

impl EmbeddedContainerd {
    /// `containerd.config` (the generated file; the templates are next to it), `containerd.socket`,
    /// `containerd.kata_root`, `daemon.data_dir` and `containerd.restart` aimed at the flavour's unit.
    pub fn new(config: &NodedConfig, access: &Access, flavour: Flavour) -> Self {
        let restart = if access.may_restart {
            restart_for(&config.containerd.restart, flavour.unit())
        } else {
            Restart::Never
        };
        let main = access.path(&config.containerd.config);
        let listen = access.path(&config.containerd.socket);
        Self {
            flavour,
            dir: main
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
            socket: access.running.then(|| listen.clone()),
            listen,
            binary: access
                .binary
                .clone()
                .unwrap_or_else(|| flavour.default_binary()),
            kata_root: access.path(&config.containerd.kata_root),
            custom: super::configurator::custom_specs(config, access),
            state_dir: access.path(&config.daemon.data_dir),
            restart,
            version: None,
        }
    }

    fn store(&self) -> StateStore {
        StateStore::new(&self.state_dir)
    }

    async fn resolve_version(&self) -> Result<ContainerdVersion, TemplateError> {
        if let Some(v) = self.version {
            return Ok(v);
        }
        Ok(ContainerdVersion::detect_running(
            self.socket.as_deref(),
            &self.binary,
            &self.store().version_cache(),
        )
        .await?)
    }

    fn specs(&self, handlers: &[KataHandler]) -> Vec<HandlerSpec> {
        handlers
            .iter()
            .map(|h| h.spec(&self.kata_root))
            .chain(self.custom.iter().cloned())
            .collect()
    }

    async fn planned(&self, handlers: &[KataHandler]) -> Result<Planned, TemplateError> {
        let version = self.resolve_version().await?;
        let (path, config_version) = target(&self.dir, version);
        let template = Template::load(&path)?;
        let specs = self.specs(handlers);
        // Before anything is written: a snapshotter this containerd would silently ignore is refused.
        check_specs(&specs, version)?;
        template.check_foreign(&specs)?;
        let config_version = template.declared_version().unwrap_or(config_version);
        let after = template.with_block(&render_block(&specs, config_version));
        let stale = self
            .recorded()?
            .into_iter()
            .filter(|(p, _)| *p != template.path)
            .collect();
        Ok(Planned {
            template,
            stale,
            after,
            handlers: specs.into_iter().map(|s| s.name).collect(),
            version,
        })
    }

    fn change_of(&self, p: &Planned) -> Change {
        let changed = p.changed();
        Change {
            changed,
            // The distribution renders the template only when it starts: every change needs a restart.
            restart_needed: changed,
            handlers: if changed {
                p.handlers.clone()
            } else {
                Vec::new()
            },
            files: if changed {
                std::iter::once(p.template.path.clone())
                    .chain(p.stale.iter().map(|(s, _)| s.clone()))
                    .collect()
            } else {
                Vec::new()
            },
            strategy: "template".into(),
            runtime_version: p.version.to_string(),
            ..Change::default()
        }
    }

    /// Records, then writes: a crash in between leaves a record of a write that may not have
    /// happened, which revert handles (it cuts the block only where it finds one).
    fn commit(&self, p: &Planned) -> Result<(), TemplateError> {
        let store = self.store();
        let mut state = store.load()?;
        let path = &p.template.path;
        let mut rec = state.files.get(path).cloned().unwrap_or_default();
        if rec.written_sha256.is_empty() {
            rec.original_existed = p.template.existed;
            rec.original_sha256 = sha256_bytes(p.template.operator.as_bytes());
            rec.backup = if p.template.existed {
                store.write_backup(path, p.template.operator.as_bytes())?
            } else {
                PathBuf::new()
            };
        }
        rec.handlers = p.handlers.clone();
        rec.whole_file = false;
        rec.push_written(sha256_bytes(p.after.as_bytes()));
        state.files.insert(path.clone(), rec);
        store.save(&state)?;
        fsutil::clean_stale_temps(path);
        fsutil::write_atomic(path, p.after.as_bytes(), 0o644)?;
        if !p.stale.is_empty() {
            for (stale, rec) in &p.stale {
                self.cut(&store, &mut state, stale, rec)?;
            }
            store.save(&state)?;
        }
        Ok(())
    }

    fn restore(&self, t: &Template) -> Result<(), TemplateError> {
        if t.existed {
            fsutil::write_atomic(&t.path, t.original.as_bytes(), 0o644)?;
        } else {
            fsutil::remove_durable(&t.path)?;
        }
        Ok(())
    }

    async fn restart_and_verify(&self, specs: &[HandlerSpec]) -> Result<bool, String> {
        let restarted = self.restart.run().await.map_err(|e| e.to_string())?;
        if restarted {
            restart::wait_for_socket(&self.listen, restart::SOCKET_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            // The socket accepts before the CRI plugin has loaded its config; retry briefly.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            loop {
                match verify_loaded(&self.listen, specs).await {
                    Ok(()) => break,
                    Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        }
        Ok(restarted)
    }

    fn restart_error(&self, source: RestartError) -> TemplateError {
        TemplateError::Restart {
            unit: self.flavour.unit().to_owned(),
            source,
        }
    }

    /// Templates of this directory noded has a record of.
    fn recorded(&self) -> Result<Vec<(PathBuf, FileRecord)>, TemplateError> {
        Ok(self
            .store()
            .load()?
            .files
            .into_iter()
            .filter(|(p, _)| {
                p.parent() == Some(self.dir.as_path())
                    && p.file_name()
                        .is_some_and(|n| n == TEMPLATE_V3 || n == TEMPLATE_V2)
            })
            .collect())
    }

    #[tracing::instrument(name = "embedded_containerd_apply", skip_all, fields(flavour = self.flavour.as_str()))]
    async fn apply_inner(&self, handlers: &[KataHandler]) -> Result<Change, TemplateError> {
        let p = self.planned(handlers).await?;
        let mut change = self.change_of(&p);
        if !change.changed {
            return Ok(change);
        }
        self.commit(&p)?;
        info!(template = %p.template.path.display(), handlers = ?p.handlers, "containerd template written");
        match self.restart_and_verify(&self.specs(handlers)).await {
            Ok(true) => {
                change.restarted = true;
                change.verified = true;
            }
            Ok(false) => {
                change.warning = Some(format!(
                    "{} was not restarted (restart never, or no systemd): the handlers load at its next start",
                    self.flavour.unit()
                ));
            }
            Err(reason) => {
                warn!(%reason, "verification failed; restoring the template");
                self.restore(&p.template)?;
                let restored = match self.restart.run().await {
                    Ok(true) => {
                        match restart::wait_for_socket(&self.listen, restart::SOCKET_TIMEOUT).await
                        {
                            Ok(()) => format!(" and {} restarted with it", self.flavour.unit()),
                            Err(e) => format!(", but containerd did not come back: {e}"),
                        }
                    }
                    Ok(false) => String::new(),
                    Err(e) => format!(", but restarting {} again failed: {e}", self.flavour.unit()),
                };
                let store = self.store();
                let mut state = store.load()?;
                if let Some(rec) = state.files.get_mut(&p.template.path) {
                    rec.push_written(sha256_bytes(p.template.original.as_bytes()));
                }
                store.save(&state)?;
                return Err(TemplateError::Verify {
                    unit: self.flavour.unit().to_owned(),
                    reason,
                    restored,
                });
            }
        }
        Ok(change)
    }

    /// Cuts noded's block out of `path` (deleting a template noded created that holds nothing else)
    /// and forgets its record; true when the file changed.
    fn cut(
        &self,
        store: &StateStore,
        state: &mut super::state::State,
        path: &Path,
        rec: &FileRecord,
    ) -> Result<bool, TemplateError> {
        fsutil::clean_stale_temps(path);
        let t = Template::load(path)?;
        let after = if !rec.original_existed && t.operator == BASE_INCLUDE {
            None
        } else {
            Some(t.operator.clone())
        };
        let changed = match &after {
            Some(a) => t.existed && *a != t.original,
            None => t.existed,
        };
        if changed {
            match &after {
                Some(a) => fsutil::write_atomic(path, a.as_bytes(), 0o644)?,
                None => fsutil::remove_durable(path)?,
            }
        }
        if rec.original_existed {
            store.remove_backup(rec)?;
        }
        state.files.remove(path);
        Ok(changed)
    }

    /// Cuts noded's block out of every template it recorded; a template noded created and nobody
    /// changed since is deleted. Restarts the unit when a file changed.
    #[tracing::instrument(name = "embedded_containerd_revert", skip_all, fields(flavour = self.flavour.as_str()))]
    async fn revert_inner(&self) -> Result<Change, TemplateError> {
        let store = self.store();
        let mut state = store.load()?;
        let mut change = Change {
            strategy: "template".into(),
            ..Change::default()
        };
        for (path, rec) in self.recorded()? {
            if self.cut(&store, &mut state, &path, &rec)? {
                change.changed = true;
                change.files.push(path.clone());
                change.handlers.extend(rec.handlers.iter().cloned());
            }
        }
        store.save(&state)?;
        change.restart_needed = change.changed;
        if change.changed {
            let restarted = self
                .restart
                .run()
                .await
                .map_err(|e| self.restart_error(e))?;
            if restarted {
                restart::wait_for_socket(&self.listen, restart::SOCKET_TIMEOUT)
                    .await
                    .map_err(|e| self.restart_error(e))?;
            }
            change.restarted = restarted;
        }
        Ok(change)
    }
}

#[async_trait::async_trait]
impl RuntimeConfigurator for EmbeddedContainerd {
    fn runtime(&self) -> &'static str {
        match self.flavour {
            Flavour::K3s | Flavour::K3sServer => "k3s containerd",
            Flavour::Rke2 | Flavour::Rke2Server => "rke2 containerd",
            Flavour::Containerd => "containerd",
        }
    }

    async fn version(&self) -> Result<String, RuntimeError> {
        Ok(self.resolve_version().await?.to_string())
    }

    async fn plan(&self, handlers: &[KataHandler]) -> Result<Change, RuntimeError> {
        let p = self.planned(handlers).await?;
        Ok(self.change_of(&p))
    }

    async fn apply(&self, handlers: &[KataHandler]) -> Result<Change, RuntimeError> {
        Ok(self.apply_inner(handlers).await?)
    }

    async fn revert(&self) -> Result<Change, RuntimeError> {
        Ok(self.revert_inner().await?)
    }

    async fn restart(&self) -> Result<bool, RuntimeError> {
        Ok(self
            .restart
            .run()
            .await
            .map_err(|e| self.restart_error(e))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> Vec<HandlerSpec> {
        vec![KataHandler::Qemu.spec(Path::new("/opt/kata"))]
    }

    #[test]
    fn block_cuts_back_to_the_exact_bytes() {
        let block = render_block(&spec(), ConfigVersion::V3);
        for original in ["", "{{ template \"base\" . }}\n", "a = 1", "x = 2\n\n"] {
            let t = Template::parse(Path::new("t"), original.to_owned(), true).expect("parse");
            let written = t.with_block(&block);
            let again = Template::parse(Path::new("t"), written.clone(), true).expect("reparse");
            assert!(again.had_block);
            assert_eq!(again.operator, original);
            assert_eq!(again.with_block(&block), written, "idempotent");
        }
    }

    #[test]
    fn hostile_templates_are_one_line_errors() {
        let block = render_block(&spec(), ConfigVersion::V2);
        let cases = [
            ("{{ template \"base\" .\n", "never closed"),
            ("{{ if .X }}\n[a]\n", "`{{ if }}`"),
            (&format!("{block}{block}"), "twice"),
            ("# END noded\n", "without its begin"),
            (
                "\n# BEGIN noded: Kata runtime handlers\n",
                "without its end",
            ),
        ];
        for (text, expect) in cases {
            let err = Template::parse(Path::new("/t.tmpl"), text.to_owned(), true).expect_err(text);
            let msg = err.to_string();
            assert!(
                msg.contains(expect) && msg.starts_with("/t.tmpl: "),
                "{msg}"
            );
            assert_eq!(msg.lines().count(), 1, "{msg}");
        }
        let foreign = "{{ template \"base\" . }}\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.'kata-qemu']\n";
        let t = Template::parse(Path::new("/t"), foreign.to_owned(), true).expect("parses");
        let msg = t.check_foreign(&spec()).expect_err("foreign").to_string();
        assert!(msg.contains("line 2") && msg.contains("kata-qemu"), "{msg}");
    }

    #[test]
    fn a_full_template_keeps_its_own_version() {
        let t = |text: &str| Template::parse(Path::new("t"), text.to_owned(), true).expect("parse");
        assert_eq!(
            t("# full\nversion = 2\nroot = \"{{ .X }}\"\n").declared_version(),
            Some(ConfigVersion::V2)
        );
        assert_eq!(t(BASE_INCLUDE).declared_version(), None);
        assert_eq!(t("[a]\nversion = 3\n").declared_version(), None);
    }

    #[test]
    fn flavours_parse_and_name_their_units() {
        assert_eq!("rke2".parse::<Flavour>(), Ok(Flavour::Rke2));
        assert_eq!(Flavour::K3s.unit(), "k3s-agent.service");
        assert!("k3z".parse::<Flavour>().is_err());
    }
}
