//! plan / apply / revert: the containerd configurator that replaces kata-deploy's config step.
//!
//! Strategy by containerd version (DESIGN section 5): containerd 2.x deep-merges imported files, so
//! noded owns one drop-in in a directory `imports` names (durable where nodeadm rewrites config.toml);
//! containerd 1.x replaces whole plugin sections from imported files, so config.toml is edited in place.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tracing::{info, warn};

use super::atomic::{self, write_atomic};
use super::document::{ConfigDocument, ConfigVersion, DocumentError};
use super::handler::{HandlerSpec, KataHandler};
use super::restart::{self, Restart, RestartError};
use super::snapshotter::SnapshotterError;
use super::state::{FileRecord, StateError, StateStore};
use super::version::{ContainerdVersion, VersionError};
use crate::cri::CriClient;
use crate::exit::{self, ExitStatus};
use crate::fsutil::sha256_bytes;

/// What to register, where, and how containerd is managed.
#[derive(Debug, Clone)]
pub struct Request {
    pub config: PathBuf,
    pub handlers: Vec<KataHandler>,
    /// noded.toml's `[[handlers]]`, registered after the presets of `handlers`
    /// ([`crate::kata::handlers::HandlerConfig::spec`]).
    pub custom: Vec<HandlerSpec>,
    pub kata_root: PathBuf,
    /// noded's ownership record and backups (`<data_dir>`, default /var/lib/noded).
    pub state_dir: PathBuf,
    /// Take over handler tables of the same name that noded did not write.
    pub adopt: bool,
    /// None: ask the containerd on `socket`, or `containerd_binary --version` where none answers.
    pub containerd_version: Option<ContainerdVersion>,
    pub containerd_binary: PathBuf,
    /// containerd's gRPC socket, asked for the version when containerd runs there. None: containerd is
    /// not running (installer boot), exec `containerd_binary --version` only.
    pub socket: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    InPlace,
    DropIn,
}

impl Strategy {
    /// The name `--output json` prints.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InPlace => "in-place",
            Self::DropIn => "drop-in",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Add,
    Update,
    Unchanged,
    Remove,
}

#[derive(Debug, Clone, Serialize)]
pub struct HandlerAction {
    pub handler: String,
    pub action: Action,
}

/// One file's change. `after == None` deletes the file.
#[derive(Debug, Clone)]
pub struct FileChange {
    pub path: PathBuf,
    pub before: Vec<u8>,
    pub before_existed: bool,
    pub after: Option<Vec<u8>>,
    pub whole_file: bool,
    pub owned_after: Vec<String>,
    /// The semantic TOML changed (not just comments or formatting).
    pub effective: bool,
}

impl FileChange {
    pub fn changed(&self) -> bool {
        match &self.after {
            Some(a) => !self.before_existed || *a != self.before,
            None => self.before_existed,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub strategy: Strategy,
    pub containerd_version: ContainerdVersion,
    pub config_version: ConfigVersion,
    pub actions: Vec<HandlerAction>,
    pub files: Vec<FileChange>,
    /// Where containerd listens (from the config's `grpc.address`), for verification.
    pub socket: PathBuf,
}

impl Plan {
    pub fn changed(&self) -> bool {
        self.files.iter().any(FileChange::changed)
    }
    pub fn effective_change(&self) -> bool {
        self.files.iter().any(|f| f.changed() && f.effective)
    }
    pub fn touched(&self) -> Vec<String> {
        self.actions
            .iter()
            .filter(|a| a.action != Action::Unchanged)
            .map(|a| a.handler.clone())
            .collect()
    }
}

/// Result of apply or revert, printed with `--output json`.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub changed: bool,
    pub handlers: Vec<String>,
    pub actions: Vec<HandlerAction>,
    pub strategy: Strategy,
    pub containerd_version: String,
    pub config_version: i64,
    pub files: Vec<PathBuf>,
    pub restarted: bool,
    /// Every requested handler was seen loaded in containerd's CRI status after the restart.
    pub verified: bool,
    /// Set when a restart was needed but the strategy did not allow one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// The effective config changed (containerd reads it only after a restart). Not printed: the CLI's
    /// JSON is a contract; `restarted` and `warning` say it there.
    #[serde(skip)]
    pub restart_needed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Document(#[from] DocumentError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error(transparent)]
    Write(#[from] atomic::WriteError),
    #[error(transparent)]
    Snapshotter(#[from] SnapshotterError),
    #[error(
        "{path}: runtime handler `{handler}` exists and was not written by noded; refusing to overwrite it (pass --adopt to take it over)"
    )]
    Foreign { path: PathBuf, handler: String },
    #[error(
        "{path}: `plugins.\"io.containerd.cri.v1.images\".runtime_platforms.{handler}` exists and was not written by noded; refusing to override it (pass --adopt to take it over)"
    )]
    ForeignRuntimePlatform { path: PathBuf, handler: String },
    #[error("{path}: noded has no record of changing this file; nothing to revert")]
    NothingToRevert { path: PathBuf },
    #[error("{0}")]
    Restart(#[from] RestartError),
    #[error(
        "verification failed after restart: {reason}; the previous config was restored{restored}"
    )]
    Verify { reason: String, restored: String },
}

impl ExitStatus for ApplyError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Document(_) | Self::Version(_) | Self::Snapshotter(_) => exit::BAD_INPUT,
            Self::State(StateError::Corrupt { .. }) => exit::BAD_INPUT,
            _ => exit::RUNTIME_FAILURE,
        }
    }
}

const DROP_IN_NAME: &str = "noded-kata.toml";

impl Request {
    /// Synchronous: the given version, else `containerd_binary --version`. [`apply`] resolves the
    /// version from the running daemon first ([`Request::resolved`]), so this execs only for a bare
    /// [`plan`] without a resolved version.
    fn version(&self) -> Result<ContainerdVersion, ApplyError> {
        match self.containerd_version {
            Some(v) => Ok(v),
            None => Ok(ContainerdVersion::detect_cached(
                &self.containerd_binary,
                &StateStore::new(&self.state_dir).version_cache(),
            )?),
        }
    }

    /// The version to plan for: given, else the running containerd's (Version API on `socket`), else
    /// `containerd_binary --version` (containerd not running).
    pub async fn resolve_version(&self) -> Result<ContainerdVersion, ApplyError> {
        if let Some(v) = self.containerd_version {
            return Ok(v);
        }
        Ok(ContainerdVersion::detect_running(
            self.socket.as_deref(),
            &self.containerd_binary,
            &StateStore::new(&self.state_dir).version_cache(),
        )
        .await?)
    }

    /// This request with its containerd version resolved ([`resolve_version`](Self::resolve_version)).
    pub async fn resolved(&self) -> Result<Request, ApplyError> {
        let mut r = self.clone();
        r.containerd_version = Some(self.resolve_version().await?);
        Ok(r)
    }

    fn specs(&self) -> Vec<HandlerSpec> {
        self.handlers
            .iter()
            .map(|h| h.spec(&self.kata_root))
            .chain(self.custom.iter().cloned())
            .collect()
    }
}

fn spec_value(spec: &HandlerSpec) -> Option<toml::Value> {
    let mut d = toml_edit::DocumentMut::new();
    for (k, v) in spec.to_table().iter() {
        d.insert(k, v.clone());
    }
    toml::from_str::<toml::Table>(&d.to_string())
        .ok()
        .map(toml::Value::Table)
}

/// containerd's gRPC socket as this config names it.
fn socket_of(doc: &ConfigDocument) -> PathBuf {
    doc.semantic()
        .and_then(|t| t.get("grpc")?.get("address")?.as_str().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("/run/containerd/containerd.sock"))
}

/// containerd's socket as `config` names it (`grpc.address`, else containerd's default), to ask the
/// running daemon its version. A file noded cannot read gives the default; planning reports the file.
pub fn config_socket(config: &Path) -> PathBuf {
    ConfigDocument::load(config, ConfigVersion::V2)
        .map(|d| socket_of(&d))
        .unwrap_or_else(|_| PathBuf::from("/run/containerd/containerd.sock"))
}

/// Computes every change without writing anything.
pub fn plan(req: &Request) -> Result<Plan, ApplyError> {
    let version = req.version()?;
    let default_version = default_config_version(version);
    let store = StateStore::new(&req.state_dir);
    let state = store.load()?;
    let main = ConfigDocument::load(&req.config, default_version)?;
    let specs = req.specs();
    // A snapshotter the series cannot honour is refused before anything is written: 1.6 would drop
    // the key and unpack with its default snapshotter, which Firecracker cannot boot from.
    super::snapshotter::check_specs(&specs, version)?;
    let socket = socket_of(&main);
    let strategy = strategy_for(version);
    let record = |p: &Path| state.files.get(p).cloned().unwrap_or_default();

    let mut actions = Vec::new();
    let mut files = Vec::new();
    match strategy {
        Strategy::InPlace => {
            let rec = record(&req.config);
            let mut doc = main.clone();
            for spec in &specs {
                let action = match doc.handler_value(&spec.name) {
                    None => Action::Add,
                    Some(_) if !rec.handlers.contains(&spec.name) && !req.adopt => {
                        return Err(ApplyError::Foreign {
                            path: req.config.clone(),
                            handler: spec.name.clone(),
                        });
                    }
                    Some(v) if Some(&v) == spec_value(spec).as_ref() => Action::Unchanged,
                    Some(_) => Action::Update,
                };
                if action != Action::Unchanged {
                    doc.set_handler(spec, version);
                }
                actions.push(HandlerAction {
                    handler: spec.name.clone(),
                    action,
                });
            }
            // Handlers noded wrote earlier but no longer wants: it owns them, so it removes them.
            for stale in rec
                .handlers
                .iter()
                .filter(|h| !specs.iter().any(|s| &s.name == *h))
            {
                if doc.remove_handler(stale) {
                    actions.push(HandlerAction {
                        handler: stale.clone(),
                        action: Action::Remove,
                    });
                }
            }
            files.push(change(
                &main,
                &doc,
                specs.iter().map(|s| s.name.clone()).collect(),
                false,
            ));
        }
        Strategy::DropIn => {
            // Verified with 2.1: alone, a version 1 file's plugin tables are ignored; next to a
            // version 2 drop-in they are migrated and take effect. Either way noded would change
            // settings it does not own, so it asks for an explicit version first.
            if main.version == ConfigVersion::V1 && main.has_plugins() {
                return Err(DocumentError::Version1OnContainerd2 {
                    path: req.config.clone(),
                }
                .into());
            }
            for spec in &specs {
                if main.has_handler(&spec.name) && !req.adopt {
                    return Err(ApplyError::Foreign {
                        path: req.config.clone(),
                        handler: spec.name.clone(),
                    });
                }
                // The drop-in's entry would be merged over the operator's (containerd 2.x merges
                // plugin tables key by key): as with a handler table, not without --adopt.
                if spec.snapshotter.is_some() && main.has_runtime_platform(&spec.name) && !req.adopt
                {
                    return Err(ApplyError::ForeignRuntimePlatform {
                        path: req.config.clone(),
                        handler: spec.name.clone(),
                    });
                }
            }
            let mut new_main = main.clone();
            let dir = import_dir(&main).unwrap_or_else(|| {
                let dir = req
                    .config
                    .parent()
                    .unwrap_or(Path::new("/etc/containerd"))
                    .join("config.d");
                new_main.add_import(&format!("{}/*.toml", dir.display()));
                dir
            });
            let path = dir.join(DROP_IN_NAME);
            let existing = ConfigDocument::load(&path, main.version)?;
            let drop_in = main.drop_in(&path, &specs, version);
            for spec in &specs {
                let platform_kept = existing.runtime_platform_snapshotter(&spec.name)
                    == spec.snapshotter.as_ref().map(|s| s.name());
                let action = match existing.handler_value(&spec.name) {
                    None => Action::Add,
                    Some(v) if Some(&v) == spec_value(spec).as_ref() && platform_kept => {
                        Action::Unchanged
                    }
                    Some(_) => Action::Update,
                };
                actions.push(HandlerAction {
                    handler: spec.name.clone(),
                    action,
                });
            }
            for stale in existing.handler_names() {
                if !specs.iter().any(|s| s.name == stale) {
                    actions.push(HandlerAction {
                        handler: stale,
                        action: Action::Remove,
                    });
                }
            }
            let main_change = change(&main, &new_main, record(&req.config).handlers, false);
            if main_change.changed() {
                files.push(main_change);
            }
            // The drop-in's bytes are noded's own rendering: rewrite it only if they differ.
            files.push(change(
                &existing,
                &drop_in,
                specs.iter().map(|s| s.name.clone()).collect(),
                true,
            ));
        }
    }
    Ok(Plan {
        strategy,
        containerd_version: version,
        config_version: main.version,
        actions,
        files,
        socket,
    })
}

fn change(
    before: &ConfigDocument,
    after: &ConfigDocument,
    owned: Vec<String>,
    whole: bool,
) -> FileChange {
    let rendered = after.render().into_bytes();
    let unchanged = before.existed && rendered == before.original;
    FileChange {
        path: before.path.clone(),
        before: before.original.clone(),
        before_existed: before.existed,
        after: Some(if unchanged {
            before.original.clone()
        } else {
            rendered
        }),
        whole_file: whole,
        owned_after: owned,
        effective: !before.existed || before.semantic() != after.semantic(),
    }
}

/// The directory of the first `imports` glob of the form `<dir>/*.toml`.
fn import_dir(doc: &ConfigDocument) -> Option<PathBuf> {
    doc.imports().iter().find_map(|p| {
        let p = Path::new(p);
        (p.file_name()?.to_str()? == "*.toml").then(|| p.parent().map(Path::to_path_buf))?
    })
}

/// Writes the plan's files, recording ownership first so a crash never leaves a write unowned.
fn commit_files(store: &StateStore, files: &[FileChange]) -> Result<(), ApplyError> {
    let mut state = store.load()?;
    for f in files.iter().filter(|f| f.changed()) {
        let current_sha = sha256_bytes(&f.before);
        let mut rec = state.files.get(&f.path).cloned().unwrap_or_default();
        let ours = !rec.written_sha256.is_empty() && rec.wrote(&current_sha);
        let new_sha = f.after.as_deref().map(sha256_bytes).unwrap_or_default();
        if !ours && !f.whole_file {
            // First write, or someone else rewrote the file since (nodeadm at boot): what is there now
            // is the original that revert restores.
            rec.original_existed = f.before_existed;
            rec.original_sha256 = current_sha;
            rec.backup = store.write_backup(&f.path, &f.before)?;
            rec.written_sha256.clear();
        }
        if f.whole_file && rec.written_sha256.is_empty() {
            rec.original_existed = false;
            rec.backup = PathBuf::new();
        }
        rec.whole_file = f.whole_file;
        rec.handlers = f.owned_after.clone();
        rec.push_written(new_sha);
        state.files.insert(f.path.clone(), rec);
        store.save(&state)?;
        match &f.after {
            Some(bytes) => write_atomic(&f.path, bytes, 0o644)?,
            None => atomic::remove_durable(&f.path)?,
        }
    }
    Ok(())
}

/// Puts back the `before` bytes of each changed file (rollback after a failed verification).
fn restore_files(files: &[FileChange]) -> Result<(), ApplyError> {
    for f in files.iter().filter(|f| f.changed()) {
        if f.before_existed {
            write_atomic(&f.path, &f.before, 0o644)?;
        } else {
            atomic::remove_durable(&f.path)?;
        }
    }
    Ok(())
}

/// Asks containerd's CRI plugin which handlers it has loaded and checks ours are there as written.
pub async fn verify_loaded(socket: &Path, specs: &[HandlerSpec]) -> Result<(), String> {
    let mut client = CriClient::connect(socket)
        .await
        .map_err(|e| format!("CRI connect {}: {e}", socket.display()))?;
    let status = super::cri_plugin::status(&mut client)
        .await
        .map_err(|e| format!("CRI Status: {e}"))?;
    for spec in specs {
        let Some(h) = status.handlers.get(&spec.name) else {
            return Err(format!(
                "containerd at {} does not list runtime handler `{}` (loaded: {})",
                socket.display(),
                spec.name,
                status
                    .handlers
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        };
        // containerd 2.x also lists the handlers it serves; a handler in the config but not served
        // there was not loaded.
        if !status.runtime_handlers.is_empty() && !status.runtime_handlers.contains(&spec.name) {
            return Err(format!(
                "containerd at {} has runtime handler `{}` in its config but does not serve it (runtime_handlers: {})",
                socket.display(),
                spec.name,
                status.runtime_handlers.join(", ")
            ));
        }
        if h.runtime_type != spec.runtime_type {
            return Err(format!(
                "handler `{}` has runtime_type `{}`, expected `{}`",
                spec.name, h.runtime_type, spec.runtime_type
            ));
        }
    }
    Ok(())
}

/// Restarts containerd if the strategy allows, waits for it and verifies `specs` are loaded.
async fn restart_and_verify(
    restart: &Restart,
    socket: &Path,
    specs: &[HandlerSpec],
) -> Result<bool, String> {
    let restarted = restart.run().await.map_err(|e| e.to_string())?;
    if restarted {
        restart::wait_for_socket(socket, restart::SOCKET_TIMEOUT)
            .await
            .map_err(|e| e.to_string())?;
        // The socket accepts before the CRI plugin has loaded its config; retry briefly.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            match verify_loaded(socket, specs).await {
                Ok(()) => break,
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(restarted)
}

/// Applies the plan: writes, restarts containerd only if the effective config changed, verifies, and
/// rolls back (file + another restart) if containerd does not show the handlers.
// `instrument`, not an entered guard: the span must follow the future across its awaits.
#[tracing::instrument(name = "containerd_apply", skip_all, fields(config = %req.config.display()))]
pub async fn apply(req: &Request, restart: &Restart) -> Result<Report, ApplyError> {
    let req = &req.resolved().await?;
    let plan = plan(req)?;
    let store = StateStore::new(&req.state_dir);
    for f in &plan.files {
        atomic::clean_stale_temps(&f.path);
    }
    let mut report = report_of(&plan);
    if !plan.changed() {
        return Ok(report);
    }
    commit_files(&store, &plan.files)?;
    info!(handlers = ?plan.touched(), strategy = ?plan.strategy, "containerd config written");
    if !plan.effective_change() {
        return Ok(report);
    }
    let specs = req.specs();
    match restart_and_verify(restart, &plan.socket, &specs).await {
        Ok(true) => {
            report.restarted = true;
            report.verified = true;
        }
        Ok(false) => {
            report.warning = Some(
                "containerd was not restarted (--restart never, or no systemd): the handlers load at its next start"
                    .into(),
            );
        }
        Err(reason) => {
            warn!(%reason, "verification failed; rolling back");
            restore_files(&plan.files)?;
            let restored = match restart.run().await {
                Ok(true) => {
                    match restart::wait_for_socket(&plan.socket, restart::SOCKET_TIMEOUT).await {
                        Ok(()) => " and containerd restarted with it".to_owned(),
                        Err(e) => format!(", but containerd did not come back: {e}"),
                    }
                }
                Ok(false) => String::new(),
                Err(e) => format!(", but restarting containerd again failed: {e}"),
            };
            // The record must match the restored bytes, so the next apply starts from the truth.
            let mut state = store.load()?;
            for f in plan.files.iter().filter(|f| f.changed()) {
                if let Some(rec) = state.files.get_mut(&f.path) {
                    rec.push_written(sha256_bytes(&f.before));
                }
            }
            store.save(&state)?;
            return Err(ApplyError::Verify { reason, restored });
        }
    }
    Ok(report)
}

fn report_of(plan: &Plan) -> Report {
    Report {
        changed: plan.changed(),
        handlers: plan.touched(),
        actions: plan.actions.clone(),
        strategy: plan.strategy,
        containerd_version: plan.containerd_version.to_string(),
        config_version: plan.config_version.number(),
        files: plan
            .files
            .iter()
            .filter(|f| f.changed())
            .map(|f| f.path.clone())
            .collect(),
        restarted: false,
        verified: false,
        warning: None,
        restart_needed: plan.effective_change(),
    }
}

/// Restores what noded changed: the exact original bytes when nobody touched the file since noded's
/// last write; otherwise (someone rewrote it) only noded's own handler tables are removed.
pub async fn revert(
    config: &Path,
    state_dir: &Path,
    restart: &Restart,
    containerd_version: Option<ContainerdVersion>,
    containerd_binary: &Path,
) -> Result<Report, ApplyError> {
    revert_with(
        config,
        state_dir,
        restart,
        containerd_version,
        containerd_binary,
        None,
    )
    .await
}

/// [`revert`], asking the containerd on `socket` for its version when it runs there.
#[tracing::instrument(name = "containerd_revert", skip_all, fields(config = %config.display()))]
pub async fn revert_with(
    config: &Path,
    state_dir: &Path,
    restart: &Restart,
    containerd_version: Option<ContainerdVersion>,
    containerd_binary: &Path,
    socket: Option<&Path>,
) -> Result<Report, ApplyError> {
    let store = StateStore::new(state_dir);
    let mut state = store.load()?;
    let version = match containerd_version {
        Some(v) => v,
        None => {
            ContainerdVersion::detect_running(socket, containerd_binary, &store.version_cache())
                .await?
        }
    };
    let default_version = default_config_version(version);
    let main = ConfigDocument::load(config, default_version)?;
    // The main file and any drop-in noded wrote next to it through `imports`.
    let related: Vec<(PathBuf, FileRecord)> = state
        .files
        .iter()
        .filter(|(p, r)| {
            p.as_path() == config
                || (r.whole_file && p.file_name().is_some_and(|n| n == DROP_IN_NAME))
        })
        .map(|(p, r)| (p.clone(), r.clone()))
        .collect();
    // A killed apply leaves its temp beside the file it was writing, and a revert that finds the
    // original bytes still in place writes nothing that would remove it.
    atomic::clean_stale_temps(config);
    for (path, _) in &related {
        atomic::clean_stale_temps(path);
    }
    if related.is_empty() {
        let plan_report = Report {
            changed: false,
            handlers: Vec::new(),
            actions: Vec::new(),
            strategy: strategy_for(version),
            containerd_version: version.to_string(),
            config_version: main.version.number(),
            files: Vec::new(),
            restarted: false,
            verified: false,
            warning: None,
            restart_needed: false,
        };
        return Ok(plan_report);
    }
    let mut files = Vec::new();
    let mut actions = Vec::new();
    for (path, rec) in &related {
        let doc = ConfigDocument::load(path, main.version)?;
        let current_sha = sha256_bytes(&doc.original);
        for h in &rec.handlers {
            actions.push(HandlerAction {
                handler: h.clone(),
                action: Action::Remove,
            });
        }
        let after = if rec.whole_file {
            None
        } else if rec.wrote(&current_sha) || !doc.existed {
            if rec.original_existed {
                Some(
                    std::fs::read(&rec.backup).map_err(|source| StateError::Read {
                        path: rec.backup.clone(),
                        source,
                    })?,
                )
            } else {
                None
            }
        } else {
            let mut edited = doc.clone();
            for h in &rec.handlers {
                edited.remove_handler(h);
            }
            Some(edited.render().into_bytes())
        };
        let effective = match &after {
            Some(bytes) => {
                let parsed = ConfigDocument::parse(path, bytes.clone(), true, main.version)?;
                doc.semantic() != parsed.semantic()
            }
            None => doc.existed,
        };
        files.push(FileChange {
            path: path.clone(),
            before: doc.original.clone(),
            before_existed: doc.existed,
            after,
            whole_file: rec.whole_file,
            owned_after: Vec::new(),
            effective,
        });
    }
    for f in files.iter().filter(|f| f.changed()) {
        match &f.after {
            Some(bytes) => write_atomic(&f.path, bytes, 0o644)?,
            None => atomic::remove_durable(&f.path)?,
        }
    }
    for (path, rec) in &related {
        if !rec.whole_file {
            store.remove_backup(rec)?;
        }
        state.files.remove(path);
    }
    store.save(&state)?;
    let changed = files.iter().any(FileChange::changed);
    let effective = files.iter().any(|f| f.changed() && f.effective);
    let restarted = if effective {
        let r = restart.run().await?;
        if r {
            let socket = socket_of(&main);
            restart::wait_for_socket(&socket, restart::SOCKET_TIMEOUT).await?;
            // Report success only once CRI serves again (it initializes after the socket opens).
            if let Err(e) = crate::cri::wait_ready(&socket, restart::SOCKET_TIMEOUT).await {
                tracing::warn!("containerd restarted but CRI is not ready yet: {e}");
            }
        }
        r
    } else {
        false
    };
    Ok(Report {
        changed,
        handlers: actions.iter().map(|a| a.handler.clone()).collect(),
        actions,
        strategy: strategy_for(version),
        containerd_version: version.to_string(),
        config_version: main.version.number(),
        files: files
            .iter()
            .filter(|f| f.changed())
            .map(|f| f.path.clone())
            .collect(),
        restarted,
        verified: false,
        warning: None,
        restart_needed: effective,
    })
}

/// What a new or empty config file gets: the newest version the installed containerd reads.
fn default_config_version(version: ContainerdVersion) -> ConfigVersion {
    if version.merges_imports() {
        ConfigVersion::V3
    } else {
        ConfigVersion::V2
    }
}

/// containerd 2.x deep-merges imports (drop-in); 1.x replaces plugin sections from them (in place).
fn strategy_for(version: ContainerdVersion) -> Strategy {
    if version.merges_imports() {
        Strategy::DropIn
    } else {
        Strategy::InPlace
    }
}
