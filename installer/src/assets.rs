//! The files `installer bake` writes besides the Kata release, rendered from the bake options.

use noded::containerd::handler::{HandlerSpec, KataHandler, normalize};

pub const NODED_BIN: &str = "/usr/local/bin/noded";
pub const INSTALLER_BIN: &str = "/usr/local/bin/installer";
pub const BOOT_UNIT: &str = "/etc/systemd/system/noded-boot.service";
pub const NODED_UNIT: &str = "/etc/systemd/system/noded.service";
pub const MODULES_CONF: &str = "/etc/modules-load.d/noded.conf";
pub const NODED_TOML: &str = "/etc/noded/noded.toml";
pub const NODEADM_DROPIN: &str = "/etc/eks/nodeadm.d/50-noded-kata.yaml";
pub const KATA_ROOT: &str = "/opt/kata";
/// Where the per-handler shim links go: on containerd's PATH on every distribution (kata-deploy's choice).
pub const SHIM_LINK_DIR: &str = "/usr/local/bin";

/// The binary name containerd derives from runtime_type `io.containerd.<handler>.v2`.
pub fn shim_link_name(handler: &str) -> String {
    format!("containerd-shim-{handler}-v2")
}

/// Kata's default factory template path; Kata mounts its own tmpfs there.
pub const KATA_TEMPLATE_DIR: &str = "/run/vc/vm/template";

/// Modules Kata VMs need. The vendor module (kvm_intel / kvm_amd) is deliberately not listed: udev
/// loads the right one from the CPU's modalias, and listing the wrong vendor's module makes
/// systemd-modules-load.service fail on half of a mixed Intel/AMD metal fleet sharing one AMI.
pub const MODULES: [&str; 3] = ["kvm", "vhost_net", "vhost_vsock"];

pub fn modules_conf() -> String {
    let mut s = String::from(
        "# Written by `installer bake` (noded); removed by `installer uninstall`.\n\
         # Kernel modules Kata Containers VMs need, loaded by systemd-modules-load.service at boot.\n\
         # kvm_intel/kvm_amd are loaded by udev from the CPU modalias.\n",
    );
    for m in MODULES {
        s.push_str(m);
        s.push('\n');
    }
    s
}

/// Runs `installer boot` after nodeadm wrote containerd's config and before containerd reads it.
pub fn boot_unit() -> String {
    format!(
        "# Written by `installer bake` (noded); removed by `installer uninstall`.\n\
[Unit]\n\
Description=noded boot: Kata runtime handlers in containerd's config before containerd starts\n\
Documentation=https://example.invalid/noded/docs/operator-guide.md\n\
DefaultDependencies=no\n\
# nodeadm-config.service (EKS AL2023) rewrites /etc/containerd/config.toml on every boot: run after it.\n\
After=local-fs.target systemd-modules-load.service nodeadm-config.service\n\
Before=containerd.service kubelet.service\n\
Wants=systemd-modules-load.service\n\
ConditionPathExists={NODED_TOML}\n\
\n\
[Service]\n\
Type=oneshot\n\
RemainAfterExit=yes\n\
ExecStart={INSTALLER_BIN} boot\n\
TimeoutStartSec=60\n\
\n\
[Install]\n\
WantedBy=multi-user.target containerd.service\n"
    )
}

/// The daemon for hosts without Kubernetes (there the DaemonSet runs noded instead).
pub fn noded_unit() -> String {
    format!(
        "# Written by `installer bake` (noded); removed by `installer uninstall`.\n\
# On Kubernetes nodes noded runs as the DaemonSet in daemonset/; this unit is for standalone hosts.\n\
[Unit]\n\
Description=noded: Kata runtime manager, warm VM templates, density and latency metrics\n\
After=network-online.target containerd.service noded-boot.service\n\
Wants=network-online.target\n\
Requires=containerd.service\n\
\n\
[Service]\n\
Type=simple\n\
ExecStart={NODED_BIN} run --config {NODED_TOML}\n\
Restart=on-failure\n\
RestartSec=5\n\
# noded stops its own QEMU templates and clones on SIGTERM; give it time before SIGKILL.\n\
KillMode=mixed\n\
TimeoutStopSec=30\n\
\n\
[Install]\n\
WantedBy=multi-user.target\n"
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// EKS / Kubernetes node: noded runs as the DaemonSet; only noded-boot.service is enabled.
    Kubernetes,
    /// No Kubernetes: noded.service is enabled too.
    Standalone,
}

/// noded.toml; with a baked guest (`--guest-assets`), its pin and a template pool that uses it.
pub fn noded_toml(
    mode: Mode,
    runtimes: &[KataHandler],
    guest: Option<&crate::guest::GuestRecord>,
) -> String {
    let k8s = mode == Mode::Kubernetes;
    let runtimes = normalize(runtimes)
        .iter()
        .map(|h| format!("\"{}\"", h.name()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut s = format!(
        "# Written by `installer bake` (noded); removed by `installer uninstall`.\n\
# Read by `installer boot` (noded-boot.service) and by `noded run` (DaemonSet or noded.service).\n\
[daemon]\n\
data_dir = \"/var/lib/noded\"\n\
run_dir = \"/run/noded\"\n\
api_socket = \"/run/noded/noded.sock\"\n\
metrics_listen = \"0.0.0.0:9464\"\n\
log_format = \"json\"\n\
\n\
[containerd]\n\
config = \"/etc/containerd/config.toml\"\n\
runtimes = [{runtimes}]\n\
kata_root = \"{KATA_ROOT}\"\n\
# noded-boot runs before containerd starts: nothing to restart there. The daemon restarts via systemd.\n\
restart = \"auto\"\n\
socket = \"/run/containerd/containerd.sock\"\n\
private = false\n\
apply_on_start = true\n\
\n\
[kubernetes]\n\
enabled = {k8s}\n\
startup_taint = \"noded.io/runtime-not-ready\"\n"
    );
    if let Some(g) = guest {
        s.push_str(&format!(
            "\n\
# Baked by `installer bake --guest-assets`: noded boots exactly these files (sha256 checked at start;\n\
# a missing or changed file leaves the template not ready). A node never downloads a guest.\n\
[guest]\n\
kernel = \"{}\"\n\
kernel_sha256 = \"{}\"\n\
initrd = \"{}\"\n\
initrd_sha256 = \"{}\"\n\
download = false\n\
\n\
[[templates]]\n\
name = \"default\"\n\
runtime_handler = \"kata-qemu-warm\"\n\
memory_mib = 256\n\
vcpus = 1\n\
pool_target = 2\n\
pool_memory_budget_mib = 512\n",
            g.kernel.display(),
            g.kernel_sha256,
            g.initrd.display(),
            g.initrd_sha256
        ));
    }
    s
}

/// A NodeConfig drop-in: nodeadm merges every `/etc/eks/nodeadm.d/*.yaml` with the user data
/// (nodeadm README, awslabs/amazon-eks-ami) and deep-merges `spec.containerd.config` into the
/// containerd config it renders, so its rewrite of config.toml at boot keeps the Kata handlers.
/// `specs` are the baked noded.toml's handlers, presets and `[[handlers]]`, as noded writes them.
pub fn nodeadm_dropin(config_version: u32, specs: &[HandlerSpec]) -> String {
    // The runtimes map of CRI in this config version, as nested tables nodeadm deep-merges.
    let path: &[&str] = if config_version >= 3 {
        &[
            "plugins",
            "io.containerd.cri.v1.runtime",
            "containerd",
            "runtimes",
        ]
    } else {
        &[
            "plugins",
            "io.containerd.grpc.v1.cri",
            "containerd",
            "runtimes",
        ]
    };
    let mut doc = toml_edit::DocumentMut::new();
    let mut table = doc.as_table_mut();
    for seg in path {
        let next = table
            .entry(seg)
            .or_insert_with(|| {
                let mut t = toml_edit::Table::new();
                t.set_implicit(true);
                toml_edit::Item::Table(t)
            })
            .as_table_mut();
        let Some(next) = next else {
            return String::new();
        };
        table = next;
    }
    for spec in specs {
        table.insert(&spec.name, toml_edit::Item::Table(spec.to_table()));
    }
    let toml = doc.to_string();
    let mut out = String::from(
        "# Written by `installer bake` (noded); removed by `installer uninstall`.\n\
# nodeadm (EKS AL2023) merges NodeConfig files from /etc/eks/nodeadm.d/ with the user data and\n\
# deep-merges spec.containerd.config into /etc/containerd/config.toml when it renders it, so the\n\
# Kata handlers survive nodeadm's rewrite. noded-boot.service re-applies them too (idempotent).\n\
---\n\
apiVersion: node.eks.aws/v1alpha1\n\
kind: NodeConfig\n\
spec:\n\
\x20 containerd:\n\
\x20   config: |\n",
    );
    for line in toml.lines() {
        out.push_str("      ");
        out.push_str(line);
        out.push('\n');
    }
    out
}
