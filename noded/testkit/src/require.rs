//! `require` / `require_root`: a real component or root, or the test fails under `CI=true` (a green CI
//! run must mean it ran) and skips elsewhere. Shared by every crate's tests.

use std::path::PathBuf;

/// Finds a real component on PATH (or at an absolute path). Missing: under `CI=true` the test fails
/// (a green CI run must mean it ran); elsewhere it is skipped with a message.
pub fn require(binary: &str) -> Option<PathBuf> {
    let found = if binary.starts_with('/') {
        let p = PathBuf::from(binary);
        p.exists().then_some(p)
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(binary))
                .find(|p| p.is_file())
        })
    };
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "required component `{binary}` is missing (CI=true: failing instead of skipping)"
        );
        eprintln!("SKIP: `{binary}` not installed");
    }
    found
}

/// Root is needed for mounts, namespaces and containerd. Under CI=true its absence fails the test.
pub fn require_root() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "test needs root (CI=true: failing instead of skipping)"
        );
        eprintln!("SKIP: not root");
    }
    root
}

/// Root (mount namespaces, runc), runc and busybox (the images) for tests that run pods through runc
/// or the fake Kata shim: missing ones skip the test, or fail it under CI=true.
pub fn require_runc_pods() -> bool {
    let busybox = noded::containerd::image::DEFAULT_BUSYBOX;
    let missing: Vec<&str> = [
        (!nix::unistd::geteuid().is_root()).then_some("root"),
        (!std::path::Path::new(busybox).is_file()).then_some(busybox),
        (!std::path::Path::new("/usr/sbin/runc").is_file()).then_some("/usr/sbin/runc"),
    ]
    .into_iter()
    .flatten()
    .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true and missing: {missing:?}"
    );
    eprintln!("SKIP: missing {missing:?}");
    false
}
