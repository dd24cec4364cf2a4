//! testkit's own binaries (fake-systemd, fake-kata-shim) for tests of other crates, which cannot use
//! `env!("CARGO_BIN_EXE_<name>")` of another package.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, Result, bail};

/// The path of testkit's binary `name`, built with `cargo build -p testkit --bin <name>` once per test
/// process into the target dir holding the running test, so it always matches the checkout.
/// `TESTKIT_BIN_DIR` names a directory of prebuilt binaries instead (no cargo run).
pub fn testkit_bin(name: &str) -> Result<PathBuf> {
    workspace_bin("testkit", name)
}

/// The binary `name` of workspace package `package` (e.g. `installer`), built like [`testkit_bin`].
pub fn workspace_bin(package: &str, name: &str) -> Result<PathBuf> {
    static BUILT: Mutex<Option<HashMap<String, Result<PathBuf, String>>>> = Mutex::new(None);
    // Held across the build: two threads of one test binary asking at once build once.
    let mut built = BUILT
        .lock()
        .map_err(|_| anyhow::anyhow!("testkit_bin: a previous build panicked"))?;
    let built = built.get_or_insert_with(HashMap::new);
    built
        .entry(format!("{package}/{name}"))
        .or_insert_with(|| build(package, name).map_err(|e| format!("{e:#}")))
        .clone()
        .map_err(anyhow::Error::msg)
}

fn build(package: &str, name: &str) -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("TESTKIT_BIN_DIR") {
        let p = Path::new(&dir).join(name);
        if !p.is_file() {
            bail!(
                "TESTKIT_BIN_DIR={}: no {name} there",
                Path::new(&dir).display()
            );
        }
        return Ok(p);
    }
    let target = crate::containerd::target_dir();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(&cargo)
        .current_dir(&workspace)
        .args(["build", "-p", package, "--bin", name])
        .args([
            "--message-format",
            "json-render-diagnostics",
            "--target-dir",
        ])
        .arg(&target)
        .output()
        .with_context(|| format!("cannot run {}", Path::new(&cargo).display()))?;
    if !out.status.success() {
        bail!(
            "cargo build -p {package} --bin {name} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    // cargo names the executable it built; reading it avoids guessing the profile directory.
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == name)
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .filter(|p| p.is_file())
        .with_context(|| format!("cargo build -p {package} --bin {name} reported no executable"))
}
