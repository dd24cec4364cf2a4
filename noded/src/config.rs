//! `noded.toml`: the daemon's own configuration, with an embedded default for local mode.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::containerd::handler::KataHandler;
use crate::containerd::restart::Restart;

/// The default used by `noded run` without `--config`: everything local and private, so it can run on
/// any Debian machine without touching the host's containerd.
pub const LOCAL_DEFAULT: &str = include_str!("../local-default.toml");

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

impl crate::exit::ExitStatus for ConfigError {
    fn exit_code(&self) -> u8 {
        crate::exit::BAD_INPUT
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodedConfig {
    #[serde(default)]
    pub daemon: DaemonSection,
    #[serde(default)]
    pub containerd: ContainerdSection,
    #[serde(default)]
    pub probe: ProbeSection,
    #[serde(default)]
    pub templates: Vec<TemplateSection>,
    #[serde(default)]
    pub kubernetes: KubernetesSection,
    #[serde(default)]
    pub observe: ObserveSection,
    #[serde(default)]
    pub kata: KataSection,
    #[serde(default)]
    pub guest: GuestSection,
    /// `[[handlers]]`: operator-defined Kata handlers with their own settings, registered next to
    /// the presets of `containerd.runtimes` (see [`crate::kata::handlers`]).
    #[serde(default)]
    pub handlers: Vec<crate::kata::handlers::HandlerConfig>,
}

/// Guest kernel + initramfs of noded's own `[[templates]]` (issue 11: nothing downloads on a node).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuestSection {
    /// Pinned kernel (`installer bake --guest-assets` writes it): used only while its sha256 matches
    /// `kernel_sha256`; a missing or changed file leaves the templates not ready, never downloads.
    pub kernel: Option<PathBuf>,
    pub kernel_sha256: Option<String>,
    pub initrd: Option<PathBuf>,
    pub initrd_sha256: Option<String>,
    /// Build the guest from Debian packages (`apt-get download`) when nothing is pinned. Unset: only
    /// in local mode (`containerd.private = true`).
    pub download: Option<bool>,
    /// Upper bound on each apt-get/apt-cache/dpkg/xz run of a download; it is killed after that.
    pub command_timeout_seconds: u64,
    /// Debian kernel package a download builds from (e.g. `linux-image-6.1.0-30-amd64`); unset =
    /// the one `linux-image-amd64` currently depends on.
    pub kernel_package: Option<String>,
    /// How QEMU runs noded's template VMs: `kvm`, `tcg`, or `auto` (KVM only if it really runs a
    /// guest on this host; the answer is cached per boot).
    pub accel: AccelSetting,
}

/// `guest.accel`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AccelSetting {
    #[default]
    Auto,
    Kvm,
    Tcg,
}

impl Default for GuestSection {
    fn default() -> Self {
        Self {
            kernel: None,
            kernel_sha256: None,
            initrd: None,
            initrd_sha256: None,
            download: None,
            command_timeout_seconds: 600,
            kernel_package: None,
            accel: AccelSetting::Auto,
        }
    }
}

impl GuestSection {
    fn validate(&self) -> Result<(), String> {
        let pins = [
            ("kernel", &self.kernel, &self.kernel_sha256),
            ("initrd", &self.initrd, &self.initrd_sha256),
        ];
        for (name, path, sha) in pins {
            match (path, sha) {
                (Some(p), Some(s)) => {
                    if !p.is_absolute() {
                        return Err(format!(
                            "guest.{name}: {} is not an absolute path",
                            p.display()
                        ));
                    }
                    if s.len() != 64 || !s.chars().all(|c| c.is_ascii_hexdigit()) {
                        return Err(format!(
                            "guest.{name}_sha256: `{s}` is not 64 hexadecimal digits"
                        ));
                    }
                }
                (Some(_), None) => {
                    return Err(format!("guest.{name}_sha256: required with guest.{name}"));
                }
                (None, Some(_)) => {
                    return Err(format!("guest.{name}: required with guest.{name}_sha256"));
                }
                (None, None) => {}
            }
        }
        if self.kernel.is_some() != self.initrd.is_some() {
            return Err("guest: kernel and initrd are pinned together (both or neither)".into());
        }
        if self.kernel.is_some() && self.download == Some(true) {
            return Err("guest.download: cannot be true with a pinned kernel/initrd".into());
        }
        if self.command_timeout_seconds == 0 {
            return Err("guest.command_timeout_seconds: must be at least 1".into());
        }
        if let Some(name) = &self.kernel_package {
            // Passed to apt-cache and apt-get as an argument: a Debian package name, never an option.
            let valid = name.len() >= 2
                && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
                && name.chars().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '+' | '-' | '.')
                });
            if !valid {
                return Err(format!(
                    "guest.kernel_package: `{name}` is not a Debian package name"
                ));
            }
            if self.kernel.is_some() {
                return Err(
                    "guest.kernel_package: only for a downloaded guest, not with a pinned kernel"
                        .into(),
                );
            }
        }
        Ok(())
    }
}

/// Kata's own VM factory template, which noded keeps built for every warm handler (`kata-qemu-warm`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KataSection {
    /// Keep Kata's factory template built, current and checked for warm handlers.
    pub manage_template: bool,
    /// Seconds between health checks of the template (missing after a reboot, stale after a bake,
    /// damaged); a failed build is retried sooner, with backoff.
    pub template_check_seconds: u64,
    /// Upper bound on one `kata-runtime factory init|destroy`.
    pub factory_timeout_seconds: u64,
    /// Mount namespace the template is checked and built in. Kata's tools, QEMU, the template tmpfs
    /// and a re-baked `/opt/kata` are the host's, not what noded's image or its hostPath bind mounts
    /// show: with `hostPID: true` the host's is `/proc/1/ns/mnt`. Unset = noded's own (a
    /// noded.service on the host).
    pub factory_mount_namespace: Option<PathBuf>,
}

impl Default for KataSection {
    fn default() -> Self {
        Self {
            manage_template: true,
            template_check_seconds: 30,
            factory_timeout_seconds: 120,
            factory_mount_namespace: Some(PathBuf::from("/proc/1/ns/mnt")),
        }
    }
}

/// VM observation (`/proc` scan) and the VM-slot capacity model (docs/capacity.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObserveSection {
    /// The host's procfs: `/proc` with `hostPID: true`, or where the DaemonSet mounts it.
    pub proc_root: PathBuf,
    pub interval_seconds: u64,
    /// Memory kept away from VMs (kubelet system/kube reserved + eviction threshold), MiB.
    pub reserved_memory_mib: u64,
    pub reserved_cpu_millis: u64,
    /// CPU charged per VM for the slot count; 0 = CPU is not a bound.
    pub cpu_millis_per_vm: u64,
    /// Per-VM host memory assumed for a handler before any of its VMs ran (RuntimeClass overhead), MiB.
    pub prior_memory_mib: u64,
    /// Per-handler overrides of `prior_memory_mib`.
    pub handler_prior_memory_mib: std::collections::BTreeMap<String, u64>,
}

impl Default for ObserveSection {
    fn default() -> Self {
        Self {
            proc_root: PathBuf::from("/proc"),
            interval_seconds: 5,
            reserved_memory_mib: 1024,
            reserved_cpu_millis: 0,
            cpu_millis_per_vm: 250,
            prior_memory_mib: 160,
            handler_prior_memory_mib: std::collections::BTreeMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonSection {
    /// Persistent state (ownership records, backups, guest assets).
    pub data_dir: PathBuf,
    /// Volatile state (sockets, template tmpfs mounts).
    pub run_dir: PathBuf,
    /// gRPC API socket (`noded status`, AcquireVm).
    pub api_socket: PathBuf,
    /// Peer uids (SO_PEERCRED) allowed on the API socket; anyone else is closed at accept.
    pub api_allowed_uids: Vec<u32>,
    /// `/metrics`, `/healthz`, `/readyz`.
    pub metrics_listen: SocketAddr,
    /// `json` in the DaemonSet, `text` for humans.
    pub log_format: LogFormat,
    /// Cgroup, relative to `/sys/fs/cgroup`, that each VM's QEMU moves into at spawn (one child cgroup
    /// per VM), so VMs handed out survive a restart of noded's container. `""` = off: VMs stay in
    /// noded's cgroup and die with its container.
    pub vm_cgroup: String,
}

impl Default for DaemonSection {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/noded"),
            run_dir: PathBuf::from("/run/noded"),
            api_socket: PathBuf::from("/run/noded/noded.sock"),
            api_allowed_uids: vec![0],
            metrics_listen: SocketAddr::from(([0, 0, 0, 0], 9464)),
            log_format: LogFormat::Json,
            vm_cgroup: "noded-vms".into(),
        }
    }
}

impl DaemonSection {
    /// `vm_cgroup` as a setting (`None`: off). Checked at load, so this only fails for a config
    /// built in code.
    pub fn vm_cgroup_setting(&self) -> Result<Option<crate::vm::cgroup::Setting>, String> {
        crate::vm::cgroup::Setting::parse(&self.vm_cgroup)
            .map_err(|e| format!("daemon.vm_cgroup: {e}"))
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContainerdSection {
    /// containerd's config file that noded edits.
    pub config: PathBuf,
    /// Kata handlers to register, by name (`kata-qemu`, ...), in the order given.
    #[serde(deserialize_with = "runtimes_setting")]
    pub runtimes: Vec<KataHandler>,
    pub kata_root: PathBuf,
    /// `auto|never|systemd|command:CMD`.
    #[serde(deserialize_with = "restart_setting")]
    pub restart: Restart,
    /// containerd's gRPC socket (also serves CRI).
    pub socket: PathBuf,
    /// Local mode: noded starts and owns a private containerd under `daemon.data_dir`.
    pub private: bool,
    /// Re-apply the config on every start (the DaemonSet does; local mode too).
    pub apply_on_start: bool,
    /// Seconds between re-applies while running, so a config rewritten under noded (nodeadm, an
    /// operator, a config-management run) gets its handlers back; 0 = only at start. The no-change
    /// path reads and compares only (no write, no restart).
    pub reconcile_seconds: u64,
    /// `containerd` (its own), or the containerd embedded in `k3s`/`k3s-server`/`rke2`/`rke2-server`:
    /// noded writes their `config*.toml.tmpl` next to `config`, restarts their unit, and `config` and
    /// `socket` default to theirs.
    #[serde(deserialize_with = "flavour_setting")]
    pub flavour: crate::containerd::embedded::Flavour,
}

impl Default for ContainerdSection {
    fn default() -> Self {
        Self {
            config: PathBuf::from("/etc/containerd/config.toml"),
            runtimes: vec![KataHandler::Qemu, KataHandler::QemuWarm],
            kata_root: PathBuf::from("/opt/kata"),
            restart: Restart::auto(),
            socket: PathBuf::from("/run/containerd/containerd.sock"),
            private: false,
            apply_on_start: true,
            reconcile_seconds: 60,
            flavour: Default::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ProbeSection {
    /// Handlers to prove with a real sandbox; empty means `containerd.runtimes`.
    pub handlers: Vec<String>,
    pub interval_seconds: u64,
    pub timeout_seconds: u64,
    /// Consecutive failures before a handler is declared not ready.
    pub failure_threshold: u32,
    /// Image of an extra probe container run inside the sandbox; unset = sandbox-only probe (the
    /// node's own pause image). Must already be on the node: noded never pulls or imports it.
    pub image: Option<String>,
}

impl Default for ProbeSection {
    fn default() -> Self {
        Self {
            handlers: Vec::new(),
            interval_seconds: 60,
            timeout_seconds: 30,
            failure_threshold: 3,
            image: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateSection {
    pub name: String,
    /// Runtime handler the template's clones are accounted to.
    #[serde(default = "default_template_handler")]
    pub runtime_handler: String,
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    /// Guest kernel; empty = the guest assets noded builds under `daemon.data_dir`.
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    #[serde(default)]
    pub initrd: Option<PathBuf>,
    /// Pre-forked clones kept ready.
    #[serde(default = "default_pool_target")]
    pub pool_target: u32,
    /// Upper bound on memory the pool may hold (host bytes of idle clones), MiB.
    #[serde(default = "default_pool_budget")]
    pub pool_memory_budget_mib: u64,
    /// VMs of this template handed out and not yet released; AcquireVm beyond it is refused.
    #[serde(default = "default_max_vms_in_use")]
    pub max_vms_in_use: u32,
}

fn default_template_handler() -> String {
    "kata-qemu-warm".into()
}
fn default_memory_mib() -> u64 {
    512
}
fn default_vcpus() -> u32 {
    1
}
fn default_pool_target() -> u32 {
    2
}
fn default_pool_budget() -> u64 {
    1024
}
pub fn default_max_vms_in_use() -> u32 {
    16
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSection {
    pub enabled: bool,
    /// Node name; empty = the `NODE_NAME` environment variable (downward API).
    pub node_name: String,
    /// Taint noded removes once every handler is proven.
    pub startup_taint: String,
    /// Minimum seconds between label updates.
    pub label_interval_seconds: u64,
}

impl Default for KubernetesSection {
    fn default() -> Self {
        Self {
            enabled: true,
            node_name: String::new(),
            startup_taint: "noded.io/runtime-not-ready".into(),
            label_interval_seconds: 30,
        }
    }
}

impl NodedConfig {
    /// Parses `text` read from `path` (used in messages only).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut config: Self = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            path: path.to_path_buf(),
            message: one_line(&e.to_string()),
        })?;
        config.containerd.flavour_defaults();
        config.validate().map_err(|message| ConfigError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        Ok(config)
    }

    /// What serde cannot see: values that only their own parsers know. A typo here must stop noded at
    /// load (exit 2), not surface as a runtime failure minutes later.
    fn validate(&self) -> Result<(), String> {
        self.daemon.vm_cgroup_setting()?;
        for h in &self.probe.handlers {
            if h.trim().is_empty() {
                return Err("probe.handlers: empty handler name".into());
            }
            crate::names::check_label(h).map_err(|e| format!("probe.handlers: {e}"))?;
        }
        // Names become paths, QEMU options and Kubernetes names: refused here, not escaped later.
        for (i, t) in self.templates.iter().enumerate() {
            crate::names::check_label(&t.name).map_err(|e| format!("templates[{i}].name: {e}"))?;
            crate::names::check_label(&t.runtime_handler)
                .map_err(|e| format!("templates[{i}].runtime_handler: {e}"))?;
            if t.max_vms_in_use == 0 {
                return Err(format!("templates[{i}].max_vms_in_use: must be at least 1"));
            }
            if self.templates[..i].iter().any(|o| o.name == t.name) {
                return Err(format!("templates[{i}].name: {:?} is used twice", t.name));
            }
        }
        if !self.kubernetes.node_name.is_empty() {
            crate::names::check_subdomain(&self.kubernetes.node_name)
                .map_err(|e| format!("kubernetes.node_name: {e}"))?;
        }
        if self.kata.template_check_seconds == 0 {
            return Err("kata.template_check_seconds: must be at least 1".into());
        }
        if self.kata.factory_timeout_seconds == 0 {
            return Err("kata.factory_timeout_seconds: must be at least 1".into());
        }
        if let Some(ns) = &self.kata.factory_mount_namespace
            && !ns.is_absolute()
        {
            return Err(format!(
                "kata.factory_mount_namespace: {} is not an absolute path",
                ns.display()
            ));
        }
        if self.containerd.private && self.containerd.flavour.is_embedded() {
            return Err(format!(
                "containerd.flavour: `{}` is the distribution's own containerd; it cannot be combined with containerd.private = true",
                self.containerd.flavour.as_str()
            ));
        }
        self.guest.validate()?;
        let presets = self.kata_handlers();
        for (i, h) in self.handlers.iter().enumerate() {
            h.validate(i)?;
            if self.handlers[..i].iter().any(|o| o.name == h.name) {
                return Err(format!("handlers[{i}].name: {:?} is used twice", h.name));
            }
            if presets.iter().any(|p| p.name() == h.name) {
                return Err(format!(
                    "handlers[{i}].name: {:?} is also registered by containerd.runtimes (the kata-qemu/kata-qemu-warm pair when unset); list the presets you keep there without it",
                    h.name
                ));
            }
        }
        if self.kubernetes.enabled && self.kubernetes.startup_taint.trim().is_empty() {
            return Err("kubernetes.startup_taint: must not be empty".into());
        }
        Ok(())
    }

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// The embedded local-mode default.
    pub fn local_default() -> Result<Self, ConfigError> {
        Self::parse(Path::new("<embedded local-default.toml>"), LOCAL_DEFAULT)
    }

    /// Makes relative paths (the local default uses `.noded-data/...`) absolute against `base`, so
    /// nothing depends on the working directory once the daemon runs.
    pub fn resolve_relative(&mut self, base: &Path) {
        for p in [
            &mut self.daemon.data_dir,
            &mut self.daemon.run_dir,
            &mut self.daemon.api_socket,
            &mut self.containerd.config,
            &mut self.containerd.kata_root,
            &mut self.containerd.socket,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Runtime handlers served from Kata's factory template, whose template noded keeps built: the
    /// kata-qemu-warm preset, then `[[handlers]]` with `warm = true`.
    pub fn warm_targets(&self) -> Vec<crate::kata::WarmTarget> {
        let root = &self.containerd.kata_root;
        let presets = self
            .kata_handlers()
            .into_iter()
            .filter(|h| h.is_warm())
            .map(|h| crate::kata::WarmTarget {
                name: h.name().to_owned(),
                kata_root: root.clone(),
                config: h.spec(root).config_path,
                template_path: PathBuf::from(crate::kata::warm::DEFAULT_TEMPLATE_PATH),
            });
        let custom = self.handlers.iter().filter(|h| h.warm).map(|h| {
            let kata_root = h.kata_root(root);
            crate::kata::WarmTarget {
                name: h.name.clone(),
                config: h.config_path(&kata_root),
                kata_root,
                template_path: h.factory_template_path(),
            }
        });
        presets.chain(custom).collect()
    }

    /// The handlers to register in the runtime's config: `containerd.runtimes` sorted, each once, the
    /// default pair when empty.
    pub fn kata_handlers(&self) -> Vec<KataHandler> {
        crate::containerd::handler::normalize(&self.containerd.runtimes)
    }

    /// `containerd.runtimes` as configured, then the `[[handlers]]`, by name: what gets a
    /// RuntimeClass, a probe (unless `probe.handlers` says otherwise) and observation.
    pub fn runtime_names(&self) -> Vec<String> {
        self.containerd
            .runtimes
            .iter()
            .map(|h| h.name().to_owned())
            .chain(self.handlers.iter().map(|h| h.name.clone()))
            .collect()
    }

    /// Whether noded may build the guest from Debian packages (see [`GuestSection::download`]).
    pub fn guest_download(&self) -> bool {
        self.guest.kernel.is_none() && self.guest.download.unwrap_or(self.containerd.private)
    }

    /// Handlers that must pass a probe before the node is ready.
    pub fn probe_handlers(&self) -> Vec<String> {
        if self.probe.handlers.is_empty() {
            self.runtime_names()
        } else {
            self.probe.handlers.clone()
        }
    }
}

/// `containerd.runtimes`: handler names, checked at load (one line naming the field, exit 2).
fn runtimes_setting<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<KataHandler>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|n| n.parse())
        .collect::<Result<_, _>>()
        .map_err(|e| serde::de::Error::custom(format!("containerd.runtimes: {e}")))
}

/// `containerd.flavour`: `containerd|k3s|k3s-server|rke2|rke2-server`, checked at load.
fn flavour_setting<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<crate::containerd::embedded::Flavour, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(|e| serde::de::Error::custom(format!("containerd.flavour: {e}")))
}

impl ContainerdSection {
    /// A k3s/rke2 flavour's `config` and `socket` where noded.toml left containerd's defaults.
    fn flavour_defaults(&mut self) {
        let plain = Self::default();
        if let Some(c) = self.flavour.default_config()
            && self.config == plain.config
        {
            self.config = c;
        }
        if let Some(s) = self.flavour.default_socket()
            && self.socket == plain.socket
        {
            self.socket = s;
        }
    }
}

/// `containerd.restart`: `auto|never|systemd|command:CMD`, checked at load.
fn restart_setting<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Restart, D::Error> {
    String::deserialize(d)?
        .parse()
        .map_err(|e| serde::de::Error::custom(format!("containerd.restart: {e}")))
}

/// Collapses a multi-line parser message (toml prints a source excerpt) into one line.
pub fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.is_empty() && !l.starts_with('|') && !l.chars().all(|c| c == '^' || c == ' ')
        })
        .collect::<Vec<_>>()
        .join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-line message a refused `text` gives at load: exit 2, the file first, no newline.
    fn refused(text: &str) -> String {
        let err = NodedConfig::parse(Path::new("/etc/noded/noded.toml"), text)
            .expect_err("refused at load");
        assert_eq!(
            crate::exit::ExitStatus::exit_code(&err),
            crate::exit::BAD_INPUT
        );
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/noded/noded.toml: "), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
        msg
    }

    #[test]
    fn handlers_are_checked_at_load() {
        let ok = NodedConfig::parse(
            Path::new("/n.toml"),
            "[containerd]\nruntimes = [\"kata-qemu\"]\n[[handlers]]\nname = \"kata-qemu-rs\"\nruntime = \"rust\"\nhypervisor = \"dragonball\"\ndefault_vcpus = 2\n[handlers.kata.hypervisor.dragonball]\nblock_device_driver = \"virtio-blk\"\n",
        )
        .expect("valid [[handlers]]");
        assert_eq!(ok.handlers.len(), 1);
        assert_eq!(ok.runtime_names(), ["kata-qemu", "kata-qemu-rs"]);
        assert!(ok.handlers[0].has_settings());
        for (text, needle) in [
            (
                "[[handlers]]\nname = \"kata-h\"\nhypervisor = \"qemu\"\nvcpus = 2\n",
                "vcpus",
            ),
            (
                "[[handlers]]\nname = \"kata-h\"\nhypervisor = \"vbox\"\n",
                "vbox",
            ),
            (
                "[[handlers]]\nname = \"kata-h\"\nhypervisor = \"dragonball\"\n",
                "handlers[0].hypervisor",
            ),
            (
                "[[handlers]]\nname = \"kata-h\"\nhypervisor = \"fc\"\nwarm = true\n",
                "handlers[0].warm",
            ),
            (
                "[[handlers]]\nname = \"H_\"\nhypervisor = \"qemu\"\n",
                "handlers[0].name",
            ),
            (
                "[[handlers]]\nname = \"gvisor\"\nhypervisor = \"qemu\"\n",
                "must start with `kata-`",
            ),
            (
                "[[handlers]]\nname = \"kata-qemu\"\nhypervisor = \"qemu\"\n",
                "containerd.runtimes",
            ),
            (
                "[[handlers]]\nname = \"kata-a\"\nhypervisor = \"qemu\"\n[[handlers]]\nname = \"kata-a\"\nhypervisor = \"clh\"\n",
                "handlers[1].name",
            ),
            (
                "[[handlers]]\nname = \"kata-h\"\nhypervisor = \"qemu\"\nkata_root = \"opt/kata\"\n",
                "handlers[0].kata_root",
            ),
            (
                "[[handlers]]\nname = \"kata-h\"\nhypervisor = \"qemu\"\n[handlers.kata]\nx = 1\n",
                "handlers[0].kata.x",
            ),
        ] {
            let msg = refused(text);
            assert!(msg.contains(needle), "{needle}: {msg}");
        }
    }

    #[test]
    fn embedded_default_parses() {
        let c = NodedConfig::local_default().expect("embedded default must parse");
        assert!(c.containerd.private);
        assert!(!c.kubernetes.enabled);
    }

    #[test]
    fn values_only_their_parsers_know_are_checked_at_load() {
        for (text, field) in [
            ("[containerd]\nrestart = \"sytemd\"\n", "containerd.restart"),
            (
                "[containerd]\nruntimes = [\"kata-qmeu\"]\n",
                "containerd.runtimes",
            ),
        ] {
            let msg = refused(text);
            assert!(msg.contains(field), "{msg}");
        }
    }

    #[test]
    fn restart_and_runtimes_are_typed_with_their_toml_spelling() {
        let c = NodedConfig::parse(
            Path::new("/etc/noded/noded.toml"),
            "[containerd]\nrestart = \"command:systemctl restart containerd\"\n\
             runtimes = [\"kata-qemu-warm\", \"kata-clh\", \"kata-qemu-warm\"]\n",
        )
        .expect("valid settings");
        assert_eq!(
            c.containerd.restart,
            Restart::Command("systemctl restart containerd".into())
        );
        // As configured for probes and RuntimeClasses; sorted and once each for the runtime config.
        assert_eq!(
            c.runtime_names(),
            ["kata-qemu-warm", "kata-clh", "kata-qemu-warm"]
        );
        assert_eq!(c.kata_handlers(), [KataHandler::QemuWarm, KataHandler::Clh]);
        let d = NodedConfig::parse(Path::new("/etc/noded/noded.toml"), "").expect("empty");
        assert_eq!(d.containerd.restart, Restart::auto());
        assert_eq!(d.runtime_names(), ["kata-qemu", "kata-qemu-warm"]);
    }

    #[test]
    fn guest_accel_and_kernel_package_are_checked_at_load() {
        let parse = |text: &str| NodedConfig::parse(Path::new("/etc/noded/noded.toml"), text);
        let c = parse(
            "[guest]\naccel = \"tcg\"\nkernel_package = \"linux-image-6.1.0-30-cloud-amd64\"\n",
        )
        .expect("valid settings");
        assert_eq!(c.guest.accel, AccelSetting::Tcg);
        assert_eq!(
            c.guest.kernel_package.as_deref(),
            Some("linux-image-6.1.0-30-cloud-amd64")
        );
        assert_eq!(parse("").expect("empty").guest.accel, AccelSetting::Auto);
        for (text, field) in [
            ("[guest]\naccel = \"fast\"\n", "accel"),
            (
                "[guest]\nkernel_package = \"-o=APT::x\"\n",
                "guest.kernel_package",
            ),
            (
                "[guest]\nkernel_package = \"Linux Image\"\n",
                "guest.kernel_package",
            ),
        ] {
            let msg = refused(text);
            assert!(msg.contains(field), "{msg}");
        }
    }

    #[test]
    fn vm_cgroup_default_and_bad_values() {
        let c = NodedConfig::parse(Path::new("noded.toml"), "").expect("defaults");
        let s = c.daemon.vm_cgroup_setting().expect("valid").expect("on");
        assert_eq!(s.path, Path::new("noded-vms"));
        let off = NodedConfig::parse(Path::new("noded.toml"), "[daemon]\nvm_cgroup = \"\"\n")
            .expect("off");
        assert_eq!(off.daemon.vm_cgroup_setting().expect("valid"), None);
        for bad in [
            "/sys/fs/cgroup/noded",
            "../noded",
            "a/../../b",
            "a/cgroup.procs",
        ] {
            let msg = refused(&format!("[daemon]\nvm_cgroup = \"{bad}\"\n"));
            assert!(
                msg.starts_with("/etc/noded/noded.toml: daemon.vm_cgroup: "),
                "{msg}"
            );
        }
    }

    #[test]
    fn unknown_field_names_file_and_field() {
        let err = NodedConfig::parse(Path::new("/etc/noded/noded.toml"), "[daemon]\nbogus = 1\n")
            .expect_err("unknown field must fail");
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/noded/noded.toml:"), "{msg}");
        assert!(msg.contains("bogus"), "{msg}");
        assert!(!msg.contains('\n'), "{msg}");
    }
}
