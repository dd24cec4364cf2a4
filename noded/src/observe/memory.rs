//! Host totals (`meminfo`, CPUs) for the capacity model, and percentiles of per-VM costs. Per-process
//! memory (`smaps_rollup`, PSS) is [`crate::proctable`]'s: re-exported here for the scan.

use std::path::Path;

pub use crate::proctable::{MemoryUsage, read_rollup};

/// Host totals the capacity model needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HostResources {
    pub memory_total_bytes: u64,
    /// The kernel's estimate of memory available for new work without swapping (`MemAvailable`).
    pub memory_available_bytes: u64,
    pub cpus: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum HostReadError {
    #[error("cannot read host memory from {path}: {source}")]
    Meminfo {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} has no MemTotal line")]
    NoTotal { path: String },
}

impl HostResources {
    /// Reads `<proc_root>/meminfo` and counts CPUs in `<proc_root>/stat` (host CPUs, unlike
    /// `available_parallelism`, which is the DaemonSet pod's cgroup quota).
    pub fn read(proc_root: &Path) -> Result<HostResources, HostReadError> {
        let path = proc_root.join("meminfo");
        // Parsed by hand: procfs' Meminfo insists on every field of the running kernel's version.
        let text = std::fs::read_to_string(&path).map_err(|source| HostReadError::Meminfo {
            path: path.display().to_string(),
            source,
        })?;
        let field = |name: &str| crate::fsutil::meminfo_field(&text, name);
        let total = field("MemTotal").ok_or_else(|| HostReadError::NoTotal {
            path: path.display().to_string(),
        })?;
        let available = field("MemAvailable")
            .or_else(|| field("MemFree"))
            .unwrap_or(0);
        let cpus = std::fs::read_to_string(proc_root.join("stat"))
            .map(|s| {
                s.lines()
                    .filter(|l| {
                        l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit)
                    })
                    .count()
            })
            .unwrap_or(0);
        let cpus = if cpus == 0 {
            std::thread::available_parallelism().map_or(1, usize::from)
        } else {
            cpus
        };
        Ok(HostResources {
            memory_total_bytes: total,
            memory_available_bytes: available,
            cpus: u32::try_from(cpus).unwrap_or(u32::MAX),
        })
    }
}

/// Nearest-rank percentile of `values` (q in 0..=1); `None` when empty.
pub fn percentile(values: &[u64], q: f64) -> Option<u64> {
    if values.is_empty() {
        return None;
    }
    let mut v = values.to_vec();
    v.sort_unstable();
    // A rank in 0..=len: float-to-int `as` saturates, and q is clamped to 0..=1.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let rank = (q.clamp(0.0, 1.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len()) - 1).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_nearest_rank() {
        assert_eq!(percentile(&[], 0.9), None);
        assert_eq!(percentile(&[7], 0.9), Some(7));
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&v, 0.9), Some(9));
        assert_eq!(percentile(&v, 0.5), Some(5));
        assert_eq!(percentile(&v, 1.0), Some(10));
        assert_eq!(percentile(&[3, 1, 2], 0.0), Some(1));
    }

    #[test]
    fn host_resources_of_this_machine() {
        let h = HostResources::read(Path::new("/proc")).expect("own /proc readable");
        assert!(h.memory_total_bytes > 0);
        assert!(h.memory_available_bytes <= h.memory_total_bytes);
        assert!(h.cpus >= 1);
    }
}
