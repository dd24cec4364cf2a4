//! Helpers for the containerd configurator tests: fixtures, `containerd config dump`, the CLI binary.

use std::path::{Path, PathBuf};

use noded::containerd::apply::{self, Report, Request};
use noded::containerd::handler::KataHandler;
use noded::containerd::restart::Restart;
use noded::containerd::version::ContainerdVersion;

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/containerd")
        .join(name)
}

pub fn golden_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden/containerd")
        .join(name)
}

/// Compares `actual` with a golden file; `UPDATE_GOLDEN=1` rewrites it instead.
pub fn assert_golden(name: &str, actual: &str) {
    let path = golden_path(name);
    if std::env::var("UPDATE_GOLDEN").as_deref() == Ok("1") {
        std::fs::write(&path, actual).expect("write golden");
        return;
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (run with UPDATE_GOLDEN=1 to create)",
            path.display()
        )
    });
    assert_eq!(actual, expected, "golden {} differs", path.display());
}

/// The `noded` binary under test. `NODED_BIN` overrides it (worktrees sharing a target dir).
pub fn noded_bin() -> PathBuf {
    std::env::var_os("NODED_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_noded")))
}

/// `containerd --config F config dump` of `bins`' series, parsed: what that containerd makes of the file.
pub fn dump(bins: &testkit::containerd::Binaries, config: &Path) -> toml::Table {
    bins.dump(config)
        .unwrap_or_else(|e| panic!("{}: {e:#}", bins.series))
}

pub fn request(config: &Path, state: &Path, handlers: &[KataHandler], version: &str) -> Request {
    Request {
        config: config.to_path_buf(),
        handlers: handlers.to_vec(),
        kata_root: PathBuf::from("/opt/kata"),
        state_dir: state.to_path_buf(),
        adopt: false,
        containerd_version: Some(version.parse::<ContainerdVersion>().expect("version")),
        containerd_binary: PathBuf::from("containerd"),
        custom: Vec::new(),
        socket: None,
    }
}

pub fn apply_never(req: &Request) -> Result<Report, apply::ApplyError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(apply::apply(req, &Restart::Never))
}

pub fn revert_never(req: &Request) -> Result<Report, apply::ApplyError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(apply::revert(
        &req.config,
        &req.state_dir,
        &Restart::Never,
        req.containerd_version,
        &req.containerd_binary,
    ))
}

pub fn sha(bytes: &[u8]) -> String {
    noded::fsutil::sha256_bytes(bytes)
}

/// Every line of `original` appears in `edited`, in order: nothing noded does not own was dropped or
/// reformatted.
pub fn assert_lines_kept(original: &str, edited: &str) {
    let mut it = edited.lines();
    for line in original.lines() {
        assert!(
            it.any(|l| l == line),
            "line {line:?} of the original is missing or reordered in:\n{edited}"
        );
    }
}

/// `plugins.<cri>.containerd.runtimes` of a dump.
pub fn runtimes<'a>(dump: &'a toml::Table, plugin: &str) -> &'a toml::Table {
    dump.get("plugins")
        .and_then(|p| p.get(plugin))
        .and_then(|c| c.get("containerd"))
        .and_then(|c| c.get("runtimes"))
        .and_then(toml::Value::as_table)
        .expect("dump has a runtimes table")
}

/// Flattens a TOML table to `a.b.c = value` leaves, for readable diffs.
pub fn flatten(t: &toml::Table) -> std::collections::BTreeMap<String, String> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) if !t.is_empty() => {
                for (k, v) in t {
                    walk(&format!("{prefix}.{k}"), v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    for (k, v) in t {
        walk(k, v, &mut out);
    }
    out
}

/// Leaves that differ between two tables: `(key, left, right)`.
pub fn diff(a: &toml::Table, b: &toml::Table) -> Vec<(String, Option<String>, Option<String>)> {
    let (fa, fb) = (flatten(a), flatten(b));
    let keys: std::collections::BTreeSet<&String> = fa.keys().chain(fb.keys()).collect();
    keys.into_iter()
        .filter(|k| fa.get(*k) != fb.get(*k))
        .map(|k| (k.clone(), fa.get(k).cloned(), fb.get(k).cloned()))
        .collect()
}

/// Like [`diff`], but a leaf present on one side only with a zero value ("", 0, false, {}, []) is not a
/// difference: containerd's built-in runc handler carries runc's options struct decoded with zero
/// values, an explicit `runc` table without options dumps `options = {}`, and runc reads both the same.
pub fn diff_ignoring_zero_defaults(
    a: &toml::Table,
    b: &toml::Table,
) -> Vec<(String, Option<String>, Option<String>)> {
    let zero = |v: &Option<String>| {
        v.as_deref()
            .is_none_or(|s| matches!(s, "\"\"" | "0" | "false" | "{}" | "[]"))
    };
    diff(a, b)
        .into_iter()
        .filter(|(_, l, r)| !(zero(l) && zero(r)))
        .collect()
}
