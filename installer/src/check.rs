//! `installer check`: can this node run Kata VMs fast, and if not, what blocks it.

use std::path::Path;
use std::process::Command;

use noded::config::NodedConfig;
use noded::kata::KataLayout;
use serde::Serialize;

use crate::assets;
use crate::host::{self, Kvm};
use crate::manifest::Ledger;
use crate::root::Root;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Ok,
    Info,
    Warn,
    Blocker,
}

#[derive(Debug, Clone, Serialize)]
pub struct Item {
    pub check: &'static str,
    pub status: Status,
    pub detail: String,
}

#[derive(Debug, Serialize)]
pub struct CheckReport {
    pub blockers: usize,
    pub warnings: usize,
    pub checks: Vec<Item>,
    pub kata: Option<noded::kata::KataInstall>,
    pub containerd_version: Option<String>,
    pub mem_available_bytes: Option<u64>,
    pub template_memory_bytes: u64,
}

impl CheckReport {
    pub fn table(&self) -> String {
        let mut out = format!("{:<18} {:<8} {}\n", "CHECK", "STATUS", "DETAIL");
        for i in &self.checks {
            let s = match i.status {
                Status::Ok => "ok",
                Status::Info => "info",
                Status::Warn => "WARN",
                Status::Blocker => "BLOCKER",
            };
            out.push_str(&format!("{:<18} {:<8} {}\n", i.check, s, i.detail));
        }
        out.push_str(&format!(
            "{} blocker(s), {} warning(s)\n",
            self.blockers, self.warnings
        ));
        out
    }
}

/// How a VM gets /dev/kvm on the cloud the seeds run on (EC2 API `CpuOptions.NestedVirtualization`,
/// Karpenter's `EC2NodeClass.spec.cpuOptions`, see daemonset/examples/karpenter/).
const NESTED_HINT: &str = "enable it at launch (EC2: CpuOptions NestedVirtualization=enabled, \
offered on c8i/m8i/r8i and their -flex variants; Karpenter: EC2NodeClass \
spec.cpuOptions.nestedVirtualization: enabled) or use a *.metal instance";

pub fn check(root: &Root) -> CheckReport {
    let mut items = Vec::new();
    let mut push = |check, status, detail: String| {
        items.push(Item {
            check,
            status,
            detail,
        })
    };

    // A guest (cpuinfo `hypervisor` flag) gets KVM only from nested virtualization: say so instead of
    // letting a usable /dev/kvm read like bare metal, and name the launch option when it is missing.
    let guest = host::is_guest(root);
    let kvm = host::kvm(root);
    match &kvm {
        Kvm::Usable => push(
            "kvm",
            Status::Ok,
            "/dev/kvm usable (opened read-write)".into(),
        ),
        Kvm::Missing if guest == Some(true) => push(
            "kvm",
            Status::Blocker,
            format!(
                "/dev/kvm missing in a VM ({}): the instance was launched without nested \
                 virtualization; {NESTED_HINT}",
                match host::virt_extensions(root) {
                    Some(false) => "cpuinfo has `hypervisor` but no vmx/svm flag",
                    _ => "cpuinfo `hypervisor` flag",
                }
            ),
        ),
        Kvm::Missing => push(
            "kvm",
            Status::Blocker,
            "/dev/kvm missing: no hardware virtualization (use a *.metal or nested-virt instance)"
                .into(),
        ),
        Kvm::NotADevice => push(
            "kvm",
            Status::Blocker,
            "/dev/kvm is not a character device".into(),
        ),
        Kvm::Unusable(e) => push(
            "kvm",
            Status::Blocker,
            format!("/dev/kvm cannot be opened: {e}"),
        ),
    }
    match (guest, &kvm, host::nested(root)) {
        (Some(true), Kvm::Usable, _) => push(
            "nested",
            Status::Warn,
            "nested virtualization: KVM inside a VM (cpuinfo `hypervisor` flag). Kata VMs run as \
             guests of a guest: slower VM boot and exits than on metal; each handler's probe sandbox \
             decides whether it works here"
                .into(),
        ),
        (Some(true), _, _) => push(
            "nested",
            Status::Info,
            "this machine is a VM without usable KVM (see kvm)".into(),
        ),
        (Some(false), _, n) => push(
            "nested",
            Status::Info,
            match n {
                Some(n) => format!(
                    "bare metal (no cpuinfo `hypervisor` flag); nested virtualization for guests {}",
                    if n { "enabled" } else { "disabled" }
                ),
                None => "bare metal (no cpuinfo `hypervisor` flag)".into(),
            },
        ),
        (None, _, _) => push(
            "nested",
            Status::Info,
            "unknown: /proc/cpuinfo unreadable, bare metal or VM cannot be told".into(),
        ),
    }
    let configured = root.path(assets::MODULES_CONF).is_file();
    for m in assets::MODULES {
        let (status, detail) = if host::module_loaded(root, m) {
            (Status::Ok, "loaded".to_owned())
        } else if configured {
            (
                Status::Warn,
                format!("not loaded; {} loads it at boot", assets::MODULES_CONF),
            )
        } else {
            (
                Status::Blocker,
                "not loaded and not configured to load".to_owned(),
            )
        };
        push(module_check_name(m), status, detail);
    }

    let config = NodedConfig::load(&root.path(assets::NODED_TOML)).ok();
    let containerd_version = host::containerd_binary(root).and_then(|b| {
        let out = Command::new(&b).arg("--version").output().ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .find(|w| crate::bake::parse_containerd_major(w).is_some())
            .map(str::to_owned)
    });
    match &containerd_version {
        Some(v) => {
            let strategy = if crate::bake::parse_containerd_major(v).is_some_and(|m| m >= 2) {
                "2.x deep-merges imports: noded writes a drop-in under an imported directory"
            } else {
                "1.x replaces whole plugin sections from imports: noded edits config.toml in place"
            };
            push("containerd", Status::Ok, format!("{v}; {strategy}"));
        }
        None => push(
            "containerd",
            Status::Blocker,
            "containerd binary not found".into(),
        ),
    }
    let cfg_path = config.as_ref().map_or_else(
        || Path::new("/etc/containerd/config.toml").to_path_buf(),
        |c| c.containerd.config.clone(),
    );
    let wanted: Vec<String> = config.as_ref().map_or_else(Vec::new, |c| c.runtime_names());
    match std::fs::read_to_string(root.path(&cfg_path)) {
        Ok(text) => {
            let present: Vec<&String> = wanted.iter().filter(|h| has_handler(&text, h)).collect();
            if !wanted.is_empty() && present.len() == wanted.len() {
                push(
                    "containerd-config",
                    Status::Ok,
                    format!(
                        "{}: handlers {} present",
                        cfg_path.display(),
                        wanted.join(", ")
                    ),
                );
            } else {
                push(
                    "containerd-config",
                    Status::Warn,
                    format!(
                        "{}: handlers not (all) registered yet; noded-boot.service / noded apply them",
                        cfg_path.display()
                    ),
                );
            }
        }
        Err(_) => push(
            "containerd-config",
            Status::Warn,
            format!(
                "{} does not exist yet (nodeadm/containerd package writes it; noded-boot.service adds the handlers)",
                cfg_path.display()
            ),
        ),
    }

    let kata_root = config.as_ref().map_or_else(
        || Path::new(assets::KATA_ROOT).to_path_buf(),
        |c| c.containerd.kata_root.clone(),
    );
    let layout = KataLayout::new(root.path(&kata_root));
    let kata = match layout.inspect() {
        Ok(k) => {
            let usable: Vec<&str> = k.usable_hypervisors().map(|h| h.name.as_str()).collect();
            let unusable: Vec<&str> = k
                .hypervisors
                .iter()
                .filter(|h| !h.binary_present)
                .map(|h| h.name.as_str())
                .collect();
            let detail = format!(
                "{} {} at {}; hypervisors: {}{}; warm config {}",
                "version",
                k.version.as_deref().unwrap_or("unknown"),
                kata_root.display(),
                if usable.is_empty() {
                    "none".into()
                } else {
                    usable.join(", ")
                },
                if unusable.is_empty() {
                    String::new()
                } else {
                    format!(" (config without VMM binary: {})", unusable.join(", "))
                },
                if layout.warm_config().is_file() {
                    "present"
                } else {
                    "missing"
                },
            );
            let status = if usable.contains(&"qemu") {
                Status::Ok
            } else {
                Status::Blocker
            };
            push("kata", status, detail);
            Some(k)
        }
        Err(e) => {
            push("kata", Status::Blocker, e.to_string());
            None
        }
    };

    // Each [[handlers]] entry runs from its own Kata root (a side-by-side release, say): its shim and
    // shipped configuration must be there, or its probe keeps the node tainted.
    let handler_roots = config.iter().flat_map(|c| {
        c.handlers
            .iter()
            .map(move |h| (h, h.kata_root(&c.containerd.kata_root)))
    });
    for (h, handler_root) in handler_roots {
        let node_root = root.path(&handler_root);
        let shim = h.shim_path(&node_root);
        let shipped = h.shipped_config(&node_root);
        let missing: Vec<String> = [&shim, &shipped]
            .into_iter()
            .filter(|p| !p.is_file())
            .map(|p| {
                p.strip_prefix(&node_root)
                    .map_or_else(|_| p.display().to_string(), |r| r.display().to_string())
            })
            .collect();
        let version = KataLayout::new(&node_root).version();
        if !node_root.is_dir() {
            push(
                "handler",
                Status::Blocker,
                format!(
                    "{}: Kata root {} missing (installer bake --kata-root {})",
                    h.name,
                    handler_root.display(),
                    handler_root.display()
                ),
            );
        } else if !missing.is_empty() {
            push(
                "handler",
                Status::Blocker,
                format!(
                    "{}: {} has no {}",
                    h.name,
                    handler_root.display(),
                    missing.join(", ")
                ),
            );
        } else {
            push(
                "handler",
                Status::Ok,
                format!(
                    "{}: Kata {} at {}",
                    h.name,
                    version.as_deref().unwrap_or("unknown version"),
                    handler_root.display()
                ),
            );
        }
    }

    // Template memory: each noded template's tmpfs (guest memory + 8 MiB) plus its pool budget, and
    // Kata's own factory template (the warm config's default_memory + 8 MiB).
    let mib = 1024 * 1024;
    let mut need: u64 = config.as_ref().map_or(0, |c| {
        c.templates
            .iter()
            .map(|t| (t.memory_mib + 8 + t.pool_memory_budget_mib) * mib)
            .sum()
    });
    if wanted.iter().any(|h| h == "kata-qemu-warm") {
        need += (kata_default_memory_mib(&layout.warm_config()).unwrap_or(2048) + 8) * mib;
    }
    // Each warm [[handlers]] entry keeps a template of its own: its default_memory, else its release's.
    for c in config.iter() {
        for h in c.handlers.iter().filter(|h| h.warm) {
            let shipped = h.shipped_config(&root.path(h.kata_root(&c.containerd.kata_root)));
            let guest = h
                .default_memory
                .map(u64::from)
                .or_else(|| kata_default_memory_mib(&shipped))
                .unwrap_or(2048);
            need += (guest + 8) * mib;
        }
    }
    let available = host::mem_available(root);
    match available {
        Some(a) if a < need => push(
            "memory",
            Status::Blocker,
            format!(
                "MemAvailable {} MiB < {} MiB needed for templates and pools",
                a / mib,
                need / mib
            ),
        ),
        Some(a) if a < 2 * need => push(
            "memory",
            Status::Warn,
            format!(
                "MemAvailable {} MiB leaves little beside templates ({} MiB)",
                a / mib,
                need / mib
            ),
        ),
        Some(a) => push(
            "memory",
            Status::Ok,
            format!(
                "MemAvailable {} MiB; templates and pools need {} MiB",
                a / mib,
                need / mib
            ),
        ),
        None => push("memory", Status::Warn, "cannot read /proc/meminfo".into()),
    }
    push(
        "installed",
        Status::Info,
        if Ledger::exists(root) {
            format!("baked (manifest {})", Ledger::path(root).display())
        } else {
            "not baked by installer".into()
        },
    );

    let blockers = items.iter().filter(|i| i.status == Status::Blocker).count();
    let warnings = items.iter().filter(|i| i.status == Status::Warn).count();
    CheckReport {
        blockers,
        warnings,
        checks: items,
        kata,
        containerd_version,
        mem_available_bytes: available,
        template_memory_bytes: need,
    }
}

fn module_check_name(m: &str) -> &'static str {
    match m {
        "kvm" => "module kvm",
        "vhost_net" => "module vhost_net",
        _ => "module vhost_vsock",
    }
}

/// A handler table in either config version (quoting styles vary: nodeadm uses single quotes).
fn has_handler(text: &str, handler: &str) -> bool {
    let Ok(doc) = text.parse::<toml::Table>() else {
        return false;
    };
    let plugins = doc.get("plugins").and_then(|p| p.as_table());
    ["io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime"]
        .iter()
        .filter_map(|id| plugins.and_then(|p| p.get(*id)))
        .filter_map(|p| p.get("containerd")?.get("runtimes")?.as_table())
        .any(|r| r.contains_key(handler))
}

fn kata_default_memory_mib(config: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(config).ok()?;
    let doc: toml::Table = text.parse().ok()?;
    doc.get("hypervisor")?
        .get("qemu")?
        .get("default_memory")?
        .as_integer()
        .and_then(|v| u64::try_from(v).ok())
}
