//! Facts about the machine, read under the root (`<root>/dev/kvm`, `<root>/proc/modules`, ...), so on a
//! node they are the real ones and in tests a prepared tree stands in for them.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::root::Root;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kvm {
    /// Character device opened read-write.
    Usable,
    Missing,
    NotADevice,
    /// Exists but cannot be opened (permissions, no vendor module, virtualization disabled in BIOS).
    Unusable(String),
}

pub fn kvm(root: &Root) -> Kvm {
    let dev = root.path("/dev/kvm");
    let Ok(meta) = std::fs::metadata(&dev) else {
        return Kvm::Missing;
    };
    if !meta.file_type().is_char_device() {
        return Kvm::NotADevice;
    }
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&dev)
    {
        Ok(_) => Kvm::Usable,
        Err(e) => Kvm::Unusable(e.to_string()),
    }
}

/// Loaded: listed in `/proc/modules` or present in `/sys/module` (built-in modules only show there).
pub fn module_loaded(root: &Root, name: &str) -> bool {
    let listed = std::fs::read_to_string(root.path("/proc/modules"))
        .is_ok_and(|t| t.lines().any(|l| l.split_whitespace().next() == Some(name)));
    listed || root.path("/sys/module").join(name).is_dir()
}

/// `Some(true)` if kvm_intel/kvm_amd allow nested guests; `None` if neither is loaded.
pub fn nested(root: &Root) -> Option<bool> {
    ["kvm_intel", "kvm_amd"].into_iter().find_map(|m| {
        std::fs::read_to_string(root.path("/sys/module").join(m).join("parameters/nested"))
            .ok()
            .map(|v| matches!(v.trim(), "Y" | "y" | "1"))
    })
}

/// Whether this machine is itself a guest (the cpuinfo `hypervisor` flag): Kata then runs nested.
pub fn is_guest(root: &Root) -> Option<bool> {
    cpu_flags(root).map(|f| f.iter().any(|f| f == "hypervisor"))
}

/// Whether the CPU offers hardware virtualization to this kernel (cpuinfo `vmx` or `svm`). In a guest
/// these flags appear only when the hypervisor underneath exposes nested virtualization (on EC2 the
/// launch-time CPU option `NestedVirtualization=enabled`).
pub fn virt_extensions(root: &Root) -> Option<bool> {
    cpu_flags(root).map(|f| f.iter().any(|f| f == "vmx" || f == "svm"))
}

/// The union of the `flags` lines of `/proc/cpuinfo`; `None` when it cannot be read.
fn cpu_flags(root: &Root) -> Option<Vec<String>> {
    std::fs::read_to_string(root.path("/proc/cpuinfo"))
        .ok()
        .map(|t| {
            let mut flags: Vec<String> = t
                .lines()
                .filter(|l| l.starts_with("flags"))
                .filter_map(|l| l.split_once(':'))
                .flat_map(|(_, v)| v.split_whitespace().map(str::to_owned))
                .collect();
            flags.sort();
            flags.dedup();
            flags
        })
}

/// `MemAvailable` in bytes.
pub fn mem_available(root: &Root) -> Option<u64> {
    noded::fsutil::mem_available_bytes(&root.path("/proc"))
}

/// The containerd binary of the target: under the root first, the host's PATH only when root is `/`.
pub fn containerd_binary(root: &Root) -> Option<PathBuf> {
    let candidates = [
        "/usr/bin/containerd",
        "/usr/local/bin/containerd",
        "/bin/containerd",
    ];
    if let Some(p) = candidates.iter().map(|c| root.path(c)).find(|p| is_exec(p)) {
        return Some(p);
    }
    if root.is_host() {
        return std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("containerd"))
                .find(|p| is_exec(p))
        });
    }
    None
}

fn is_exec(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
