//! Host memory cost of one QEMU process, split so a clone's copy-on-write guest RAM is visible.

use std::path::Path;

/// Bytes, from `/proc/<pid>/smaps`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryUsage {
    pub rss: u64,
    pub pss: u64,
    /// Private_Clean + Private_Dirty over all mappings: what this VM alone costs the host.
    pub private: u64,
    /// The private part of the guest RAM mapping only (for a clone: pages copied on write).
    pub guest_private: u64,
}

fn kb(line: &str) -> u64 {
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

/// Reads `/proc/<pid>/smaps`; `guest_file` names the guest RAM mapping (the memory-backend file).
pub fn usage(pid: u32, guest_file: Option<&Path>) -> std::io::Result<MemoryUsage> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    let guest = guest_file.map(|p| p.display().to_string());
    let mut u = MemoryUsage::default();
    let mut in_guest = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or_default();
        if !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [path]".
            in_guest = guest
                .as_deref()
                .is_some_and(|g| line.split_whitespace().nth(5).is_some_and(|p| p == g));
            continue;
        }
        match first {
            "Rss:" => u.rss += kb(line),
            "Pss:" => u.pss += kb(line),
            "Private_Clean:" | "Private_Dirty:" => {
                let b = kb(line);
                u.private += b;
                if in_guest {
                    u.guest_private += b;
                }
            }
            _ => {}
        }
    }
    Ok(u)
}
