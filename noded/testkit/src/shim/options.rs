//! Kata's runtime options as containerd's CRI plugin sends them, and the call record tests read.

use std::io::Write;
use std::path::{Path, PathBuf};

use containerd_shim::protos::protobuf::well_known_types::any::Any;
use prost::Message;

/// The message name containerd registers for `runtimeoptions.v1.Options` (the Any's type url is
/// this name alone on 1.x/2.x; a `types.containerd.io/` style prefix is accepted too).
pub const RUNTIME_OPTIONS: &str = "runtimeoptions.v1.Options";

/// `runtimeoptions.v1.Options` (containerd `pkg/runtimeoptions/v1/api.proto`). Decoded with prost
/// because containerd-shim-protos does not carry this CRI-only message.
#[derive(Clone, PartialEq, Message)]
pub struct RuntimeOptions {
    #[prost(string, tag = "1")]
    pub type_url: String,
    #[prost(string, tag = "2")]
    pub config_path: String,
    #[prost(string, tag = "3")]
    pub config_body: String,
}

/// The ConfigPath of Kata's options in a Create request. `Ok(None)` when the request carries no
/// Kata options (a real Kata shim then uses its built-in defaults).
pub fn config_path(options: Option<&Any>) -> Result<Option<String>, String> {
    let Some(any) = options else {
        return Ok(None);
    };
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    if name != RUNTIME_OPTIONS {
        // Not Kata's options (e.g. runc's): a real Kata shim ignores what it does not know.
        return Ok(None);
    }
    let opts = RuntimeOptions::decode(any.value.as_slice())
        .map_err(|e| format!("cannot decode {RUNTIME_OPTIONS}: {e}"))?;
    Ok(Some(opts.config_path))
}

/// What Kata's shim depends on: the configuration file exists and is readable.
pub fn check_config(path: &str) -> Result<(), String> {
    if path.is_empty() {
        return Err(format!("{RUNTIME_OPTIONS} carries an empty ConfigPath"));
    }
    std::fs::read(path).map(drop).map_err(|e| {
        format!("Kata config {path} (ConfigPath in {RUNTIME_OPTIONS}) is not readable: {e}")
    })
}

/// The drop-ins Kata would merge over the configuration at `config_path`, in the order it merges
/// them: the regular files of `config.d/` beside the symlink-resolved path (the Go runtime resolves
/// with EvalSymlinks before looking; runtime-rs takes regular files only), sorted by file name.
pub fn dropins(config_path: &str) -> Vec<String> {
    let resolved =
        std::fs::canonicalize(config_path).unwrap_or_else(|_| PathBuf::from(config_path));
    let Some(dir) = resolved.parent().map(|d| d.join("config.d")) else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.path().is_file())
        .map(|e| e.path().display().to_string())
        .collect();
    files.sort();
    files
}

/// `<dir of the shim binary>/../calls.log`: the fake Kata release's root, where its recording
/// scripts also log.
pub fn calls_log() -> Option<PathBuf> {
    Some(release_root()?.join("calls.log"))
}

/// `<dir of the shim binary>/..`: the fake Kata release the shim belongs to.
pub fn release_root() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    Some(exe.parent()?.parent()?.to_path_buf())
}

/// One JSON line per sandbox VM: `{"call":"vm","id","boot":"template"|"cold"|"failed","reason","pid"}`.
pub fn record_vm(id: &str, boot: &str, reason: &str, pid: Option<u32>) {
    let Some(log) = calls_log() else { return };
    let line = serde_json::json!({
        "call": "vm",
        "id": id,
        "boot": boot,
        "reason": reason,
        "pid": pid,
    });
    append(&log, &line.to_string());
}

/// One JSON line per Create; best effort (a read-only release just records nothing).
pub fn record_create(id: &str, bundle: &str, config_path: Option<&str>, error: Option<&str>) {
    let Some(log) = calls_log() else { return };
    let line = serde_json::json!({
        "call": "create",
        "id": id,
        "bundle": bundle,
        "config_path": config_path,
        "dropins": config_path.map(dropins).unwrap_or_default(),
        "error": error,
    });
    append(&log, &line.to_string());
}

fn append(log: &Path, line: &str) {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log);
    if let Ok(mut f) = file {
        // One write per line keeps concurrent shims from interleaving within a line.
        let _ = f.write_all(format!("{line}\n").as_bytes());
    }
}
