//! `installer bake`: puts a verified Kata release, noded, its units and config into an image.

use std::fs::File;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use noded::containerd::handler::KataHandler;
use noded::kata::{KataLayout, WarmOptions, warm};
use serde::Serialize;

use crate::archive::{self, ArchiveError, Limits};
use crate::assets::{self, Mode};
use crate::host;
use crate::manifest::{Entry, KataRecord, Kind, Ledger, ManifestError, Phase};
use crate::root::{IoError, Root};

/// Staging directories beside the Kata root: `<parent>/.kata-staging-XXXXXX`.
pub const STAGING_PREFIX: &str = ".kata-staging-";

#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    #[error("--sha256 must be 64 hexadecimal digits, got `{0}`")]
    BadDigest(String),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error("{path}: not a Kata static release: {message}; nothing was installed")]
    NotKata { path: PathBuf, message: String },
    #[error("{path}: cannot read the noded binary: {source}")]
    NodedBinary {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error(transparent)]
    Io(#[from] IoError),
    #[error(transparent)]
    Kata(#[from] noded::kata::KataError),
    #[error(transparent)]
    Guest(#[from] crate::guest::GuestError),
    /// `--kata-root`: not a root a side-by-side release may live in.
    #[error("--kata-root {path}: {message}; nothing was installed")]
    BadKataRoot { path: PathBuf, message: String },
    /// `--handlers`: unreadable, or not a file of `[[handlers]]` noded accepts.
    #[error("{path}: {message}")]
    Handlers { path: PathBuf, message: String },
}

impl noded::exit::ExitStatus for BakeError {
    fn exit_code(&self) -> u8 {
        match self {
            Self::Archive(e) if e.is_bad_input() => noded::exit::BAD_INPUT,
            Self::BadDigest(_)
            | Self::NotKata { .. }
            | Self::NodedBinary { .. }
            | Self::Guest(_)
            | Self::Handlers { .. }
            | Self::BadKataRoot { .. }
            | Self::Manifest(ManifestError::Foreign { .. }) => noded::exit::BAD_INPUT,
            _ => noded::exit::RUNTIME_FAILURE,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Nodeadm {
    /// Write the NodeConfig drop-in when `/usr/bin/nodeadm` exists under the root (EKS AL2023).
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BakeOptions {
    /// Kata static release (`kata-static-<version>-amd64.tar.xz`, or .tar/.tar.gz/.tar.zst).
    #[arg(long)]
    pub kata_tarball: PathBuf,
    /// Expected sha256 of the tarball. The file is hashed while it is unpacked into a private
    /// staging directory; nothing is moved into place unless the whole file matched.
    #[arg(long)]
    pub sha256: String,
    /// Largest single file the tarball may unpack (bytes actually written).
    #[arg(long, default_value_t = Limits::default().max_file_bytes)]
    pub max_file_bytes: u64,
    /// Largest total the tarball may unpack (a decompression bomb stops here).
    #[arg(long, default_value_t = Limits::default().max_total_bytes)]
    pub max_total_bytes: u64,
    /// The noded binary to install as /usr/local/bin/noded.
    #[arg(long)]
    pub noded_binary: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = Mode::Kubernetes)]
    pub mode: Mode,
    #[arg(long, value_enum, default_value_t = Nodeadm::Auto)]
    pub nodeadm: Nodeadm,
    /// containerd config version the nodeadm drop-in targets (2 = containerd 1.x, 3 = 2.x);
    /// default: from the installed containerd's version.
    #[arg(long, value_parser = clap::value_parser!(u32).range(2..=3))]
    pub containerd_config_version: Option<u32>,
    /// Guest kernel + initramfs for noded's template pool: a directory `noded guest-assets --out DIR`
    /// wrote (vmlinux, initrd.cpio, guest-assets.json with their sha256). Installed under
    /// /opt/noded/guest and pinned in noded.toml; without it the node has no template pool.
    #[arg(long)]
    pub guest_assets: Option<PathBuf>,
    /// The preset Kata handlers of the baked noded.toml (`containerd.runtimes`), comma-separated:
    /// kata-qemu, kata-qemu-warm, kata-clh, kata-fc. Each is probed before the node is ready, so
    /// list only what the node's hardware runs (kata-clh needs KVM, as kata-qemu does). An empty
    /// value is refused by the parser (`''` is no handler name).
    #[arg(long, value_delimiter = ',', default_values_t = [KataHandler::Qemu, KataHandler::QemuWarm])]
    pub runtimes: Vec<KataHandler>,
    /// Install this release side by side in another root (e.g. `/opt/kata-3.28` for a canary) and
    /// nothing else: `[[handlers]]` with `kata_root` pointing here use it. Its configuration files
    /// are relocated to the new prefix, as kata-deploy's multi-install does. `/opt/kata` and its
    /// noded.toml, units and links stay the main bake's (run without --kata-root).
    #[arg(long, conflicts_with_all = ["noded_binary", "guest_assets", "handlers", "runtimes", "nodeadm", "containerd_config_version"])]
    pub kata_root: Option<PathBuf>,
    /// A TOML file of `[[handlers]]` entries (noded.toml's syntax, nothing else) appended to the
    /// baked noded.toml: Kata handlers beyond the kata-qemu pair, with their settings. Checked like
    /// noded checks them at load (exit 2, one line).
    #[arg(long)]
    pub handlers: Option<PathBuf>,
}

impl BakeOptions {
    fn limits(&self) -> Limits {
        Limits {
            max_file_bytes: self.max_file_bytes,
            max_total_bytes: self.max_total_bytes,
            ..Limits::default()
        }
    }
}

#[derive(Debug, Serialize)]
pub struct BakeReport {
    pub kata_version: Option<String>,
    pub kata_changed: bool,
    pub written: Vec<PathBuf>,
    pub unchanged: Vec<PathBuf>,
}

pub fn bake(root: &Root, o: &BakeOptions) -> Result<BakeReport, BakeError> {
    let digest = o.sha256.trim().to_ascii_lowercase();
    if digest.len() != 64 || !digest.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(BakeError::BadDigest(o.sha256.clone()));
    }
    let noded_bytes = o
        .noded_binary
        .as_ref()
        .map(|p| {
            std::fs::read(p).map_err(|source| BakeError::NodedBinary {
                path: p.clone(),
                source,
            })
        })
        .transpose()?;
    // Verified before the first write (and again, from its own read, when installed).
    if let Some(dir) = &o.guest_assets {
        crate::guest::load(dir)?;
    }
    let mut ledger = Ledger::open(root)?;
    let kata_root = match &o.kata_root {
        Some(p) => side_by_side_root(&ledger, p)?,
        None => PathBuf::from(assets::KATA_ROOT),
    };
    // Everything fallible about the inputs is checked before the first write.
    let kata_current = ledger
        .manifest
        .release(&kata_root)
        .is_some_and(|k| k.tarball_sha256 == digest)
        && root
            .path(&kata_root)
            .symlink_metadata()
            .is_ok_and(|m| m.is_dir());
    // Opened once, here: this descriptor is the only reader of the tarball (see archive.rs).
    let tarball = if kata_current {
        None
    } else {
        if root.path(&kata_root).symlink_metadata().is_ok() && ledger.entry(&kata_root).is_none() {
            return Err(ManifestError::Foreign {
                path: root.path(&kata_root),
            }
            .into());
        }
        Some(archive::open_regular(&o.kata_tarball)?)
    };
    let steps = if o.kata_root.is_some() {
        release_steps(&mut ledger, o, &kata_root, &digest, tarball.as_ref())
    } else {
        bake_steps(
            &mut ledger,
            o,
            &digest,
            tarball.as_ref(),
            noded_bytes.as_deref(),
        )
    };
    match steps {
        Ok(report) => Ok(report),
        Err(e) => {
            for p in ledger.rollback_run() {
                tracing::warn!(problem = %p, "rollback after failed bake");
            }
            Err(e)
        }
    }
}

/// `--kata-root`: an absolute path of plain components that neither is, contains, nor lies inside
/// `/opt/kata` or another release's root (uninstalling one must never touch another).
fn side_by_side_root(ledger: &Ledger, p: &Path) -> Result<PathBuf, BakeError> {
    let bad = |message: &str| BakeError::BadKataRoot {
        path: p.to_path_buf(),
        message: message.to_owned(),
    };
    let plain = p.is_absolute()
        && p.components().all(|c| {
            matches!(
                c,
                std::path::Component::RootDir | std::path::Component::Normal(_)
            )
        });
    if !plain || p.parent().is_none() {
        return Err(bad("must be an absolute path below / without `.` or `..`"));
    }
    let main = Path::new(assets::KATA_ROOT);
    if p == main {
        return Err(bad("is the main Kata root; bake it without --kata-root"));
    }
    for other in
        std::iter::once(main).chain(ledger.manifest.releases.iter().map(|r| r.root.as_path()))
    {
        if p != other && (p.starts_with(other) || other.starts_with(p)) {
            return Err(bad(&format!("overlaps the Kata root {}", other.display())));
        }
    }
    Ok(p.to_path_buf())
}

/// A side-by-side release: the verified tree in its own root, recorded, and nothing else.
fn release_steps(
    ledger: &mut Ledger,
    o: &BakeOptions,
    kata_root: &Path,
    digest: &str,
    tarball: Option<&File>,
) -> Result<BakeReport, BakeError> {
    if let Some(file) = tarball {
        install_kata(ledger, file, o, digest, kata_root)?;
    }
    ledger.save()?;
    Ok(BakeReport {
        kata_version: KataLayout::new(ledger.root.path(kata_root)).version(),
        kata_changed: tarball.is_some(),
        written: Vec::new(),
        unchanged: Vec::new(),
    })
}

fn bake_steps(
    ledger: &mut Ledger,
    o: &BakeOptions,
    digest: &str,
    tarball: Option<&File>,
    noded_bytes: Option<&[u8]>,
) -> Result<BakeReport, BakeError> {
    let root = ledger.root.clone();
    let mut report = BakeReport {
        kata_version: None,
        kata_changed: tarball.is_some(),
        written: Vec::new(),
        unchanged: Vec::new(),
    };
    if let Some(file) = tarball {
        install_kata(ledger, file, o, digest, Path::new(assets::KATA_ROOT))?;
    }
    let layout = KataLayout::new(root.path(assets::KATA_ROOT));
    report.kata_version = layout.version();
    // Our derived config lives inside the release tree, so uninstall removes it with the tree.
    warm::derive(
        &layout,
        &WarmOptions {
            template_path: root.path(assets::KATA_TEMPLATE_DIR),
            ..WarmOptions::default()
        },
    )?;

    let mut files: Vec<(&str, Vec<u8>, u32)> = Vec::new();
    if let Some(bytes) = noded_bytes {
        files.push((assets::NODED_BIN, bytes.to_vec(), 0o755));
    }
    // noded-boot.service runs `installer boot`: the image needs this very binary.
    let me = std::env::current_exe().map_err(IoError::at(Path::new("/proc/self/exe")))?;
    if me != root.path(assets::INSTALLER_BIN) {
        let bytes = std::fs::read(&me).map_err(IoError::at(&me))?;
        files.push((assets::INSTALLER_BIN, bytes, 0o755));
    }
    files.push((assets::BOOT_UNIT, assets::boot_unit().into_bytes(), 0o644));
    files.push((assets::NODED_UNIT, assets::noded_unit().into_bytes(), 0o644));
    files.push((
        assets::MODULES_CONF,
        assets::modules_conf().into_bytes(),
        0o644,
    ));
    let guest = bake_guest(ledger, o, &mut report)?;
    let mut toml = assets::noded_toml(o.mode, &o.runtimes, guest.as_ref());
    if let Some(path) = &o.handlers {
        toml.push_str(&handlers_section(path)?);
    }
    // The file must load in noded itself; a template bug would otherwise surface on a booted node.
    let config =
        noded::config::NodedConfig::parse(Path::new(assets::NODED_TOML), &toml).map_err(|e| {
            match &o.handlers {
                // Only the appended handlers can make the baked file invalid beyond a template bug.
                Some(path) => BakeError::Handlers {
                    path: path.clone(),
                    message: e.to_string(),
                },
                None => IoError::at(Path::new(assets::NODED_TOML))(std::io::Error::other(e)).into(),
            }
        })?;
    files.push((assets::NODED_TOML, toml.into_bytes(), 0o644));
    let nodeadm = match o.nodeadm {
        Nodeadm::Always => true,
        Nodeadm::Never => false,
        Nodeadm::Auto => root.path("/usr/bin/nodeadm").exists(),
    };
    if nodeadm {
        let version = o
            .containerd_config_version
            .unwrap_or_else(|| containerd_config_version(&root));
        // The node's paths (bake may run on an image mount, but the node reads them at `/`).
        let root_default = &config.containerd.kata_root;
        let specs: Vec<_> = config
            .kata_handlers()
            .iter()
            .map(|h| h.spec(root_default))
            .chain(config.handlers.iter().map(|h| h.spec(root_default)))
            .collect();
        files.push((
            assets::NODEADM_DROPIN,
            assets::nodeadm_dropin(version, &specs).into_bytes(),
            0o644,
        ));
    }
    for (path, bytes, mode) in files {
        let p = Path::new(path);
        if ledger.write_file(p, &bytes, mode, Phase::Bake)? {
            report.written.push(p.to_path_buf());
        } else {
            report.unchanged.push(p.to_path_buf());
        }
    }

    // containerd 1.6 ignores `runtime_path` and resolves a handler's shim by name on its PATH
    // (`io.containerd.kata-qemu.v2` → `containerd-shim-kata-qemu-v2`): one link per handler, as
    // kata-deploy installs them, so the handler runs on every containerd series.
    let handlers = config.kata_handlers();
    let shim = Path::new(assets::KATA_ROOT).join("bin/containerd-shim-kata-v2");
    let links = handlers
        .iter()
        .map(|h| (h.name().to_owned(), shim.clone()))
        .chain(config.handlers.iter().map(|h| {
            // A [[handlers]] entry's own shim: Go or runtime-rs, under its own Kata root.
            (
                h.name.clone(),
                h.shim_path(&h.kata_root(&config.containerd.kata_root)),
            )
        }));
    let mut wanted = Vec::new();
    for (name, target) in links {
        let link = Path::new(assets::SHIM_LINK_DIR).join(assets::shim_link_name(&name));
        if ledger.symlink(&link, &target, Phase::Bake)? {
            report.written.push(link.clone());
        } else {
            report.unchanged.push(link.clone());
        }
        wanted.push(link);
    }
    // Links of handlers an earlier bake had and this one dropped (a canary's, say) go now: a
    // removed handler leaves no shim on containerd's PATH.
    let stale: Vec<PathBuf> = ledger
        .manifest
        .entries
        .iter()
        .filter(|e| {
            e.kind == Kind::Symlink
                && e.phase == Phase::Bake
                && e.path.parent() == Some(Path::new(assets::SHIM_LINK_DIR))
                && e.path
                    .file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("containerd-shim-kata"))
                && !wanted.contains(&e.path)
        })
        .map(|e| e.path.clone())
        .collect();
    for link in stale {
        for problem in ledger.forget(&link) {
            tracing::warn!(link = %link.display(), %problem, "stale shim link");
        }
    }

    // `systemctl enable` is these symlinks; writing them works in a chroot/--root without systemd.
    let mut links = vec![
        ("multi-user.target.wants", assets::BOOT_UNIT),
        ("containerd.service.wants", assets::BOOT_UNIT),
    ];
    if o.mode == Mode::Standalone {
        links.push(("multi-user.target.wants", assets::NODED_UNIT));
    }
    for (wants, unit) in links {
        let unit = Path::new(unit);
        let name = unit.file_name().unwrap_or_default();
        let link = Path::new("/etc/systemd/system").join(wants).join(name);
        if ledger.symlink(&link, unit, Phase::Bake)? {
            report.written.push(link);
        } else {
            report.unchanged.push(link);
        }
    }
    // Recorded only once everything is in place: a failed bake keeps the previous record (and a
    // previous bake's guest files, which a bake without --guest-assets removes only now).
    if guest.is_none() {
        crate::guest::remove_previous(ledger);
    }
    ledger.manifest.guest = guest;
    ledger.save()?;
    Ok(report)
}

/// `--guest-assets`: the pinned guest of noded's template pool (see guest.rs).
fn bake_guest(
    ledger: &mut Ledger,
    o: &BakeOptions,
    report: &mut BakeReport,
) -> Result<Option<crate::guest::GuestRecord>, BakeError> {
    let Some(dir) = &o.guest_assets else {
        return Ok(None);
    };
    let assets = crate::guest::load(dir)?;
    let (record, written, unchanged) = crate::guest::install(ledger, &assets)?;
    report.written.extend(written);
    report.unchanged.extend(unchanged);
    Ok(Some(record))
}

/// Hashes and unpacks the tarball from one descriptor in one pass into a private staging directory
/// beside the destination, validates the layout there, and only then renames it into place (an
/// exchange when upgrading), so `/opt/kata` is never half-written nor anything but the pinned bytes.
fn install_kata(
    ledger: &mut Ledger,
    tarball: &File,
    o: &BakeOptions,
    digest: &str,
    kata_root: &Path,
) -> Result<(), BakeError> {
    let root = ledger.root.clone();
    let dest = root.path(kata_root);
    let parent_node = kata_root.parent().unwrap_or(Path::new("/"));
    ledger.ensure_dir(parent_node)?;
    // Announced before it exists, so a killed run's staging dir is known to the next run.
    let staging_node = parent_node.join(format!(
        "{STAGING_PREFIX}{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    ledger.announce_tree(kata_root, &staging_node, digest)?;
    // 0700 and created by us: no other user can plant or swap anything below it while we unpack.
    let staging = Staging::create(root.path(&staging_node))?;
    let extracted = archive::extract_verified(
        &o.kata_tarball,
        tarball,
        digest,
        staging.path(),
        &o.limits(),
    )?;
    tracing::info!(
        files = extracted.files,
        bytes = extracted.bytes,
        "Kata release verified and unpacked"
    );
    let staged = extracted.kata_root;
    if kata_root != Path::new(assets::KATA_ROOT) {
        crate::relocate::relocate(&staged, kata_root)?;
    }
    let install = KataLayout::new(&staged)
        .inspect()
        .map_err(|e| BakeError::NotKata {
            path: o.kata_tarball.clone(),
            message: e
                .to_string()
                .replace(&staging.path().display().to_string(), "<tarball>"),
        })?;
    // Configs name their VMM at its final path (/opt/kata/bin/...): look for it inside the staging copy.
    let staged_vmm = |b: &Path| {
        [kata_root, dest.as_path()]
            .iter()
            .find_map(|prefix| b.strip_prefix(prefix).ok())
            .is_some_and(|rest| {
                std::fs::metadata(staged.join(rest)).is_ok_and(|m| {
                    m.is_file()
                        && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
                })
            })
    };
    if !install
        .hypervisors
        .iter()
        .any(|h| h.binary_present || h.binary.as_deref().is_some_and(staged_vmm))
    {
        return Err(BakeError::NotKata {
            path: o.kata_tarball.clone(),
            message: "no hypervisor binary named by any configuration-*.toml is in the tarball"
                .into(),
        });
    }
    // The renamed tree must survive a power cut as written: flush the staged bytes first.
    let staging_fd = File::open(staging.path()).map_err(IoError::at(staging.path()))?;
    nix::unistd::syncfs(&staging_fd)
        .map_err(|e| IoError::at(staging.path())(std::io::Error::from(e)))?;
    let ino = std::fs::symlink_metadata(&staged)
        .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
        .map_err(IoError::at(&staged))?;
    ledger.tree_about_to_move(kata_root, ino)?;
    if dest.symlink_metadata().is_ok() {
        // Upgrade: swap atomically so a running node never sees no /opt/kata.
        nix::fcntl::renameat2(
            nix::fcntl::AT_FDCWD,
            &staged,
            nix::fcntl::AT_FDCWD,
            &dest,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .map_err(|e| IoError::at(&dest)(std::io::Error::from(e)))?;
        // `staged` now holds the previous release; removed with the staging dir below.
    } else {
        std::fs::rename(&staged, &dest).map_err(IoError::at(&dest))?;
    }
    if let Some(p) = dest.parent() {
        crate::root::fsync_dir(p)?;
    }
    ledger.tree_installed(
        Entry {
            path: kata_root.to_path_buf(),
            kind: Kind::Tree,
            phase: Phase::Bake,
            sha256: Some(digest.to_owned()),
            backup: None,
        },
        KataRecord {
            tarball_sha256: digest.to_owned(),
            version: install.version,
            root: kata_root.to_path_buf(),
        },
    )?;
    drop(staging);
    Ok(())
}

/// The private staging dir; removed on every exit path of a live run (a killed run's is removed
/// by the next one, see `manifest::sweep`).
struct Staging(PathBuf);

impl Staging {
    fn create(path: PathBuf) -> Result<Self, IoError> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(IoError::at(&path))?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if let Err(e) = crate::root::remove_if_exists(&self.0) {
            tracing::warn!(problem = %e, "staging dir left behind");
        }
    }
}

/// 3 for containerd 2.x, 2 otherwise (also when no containerd is found: the AL2023 images for
/// Kubernetes < 1.33 ship containerd 1.7).
pub fn containerd_config_version(root: &Root) -> u32 {
    let major = host::containerd_binary(root).and_then(|b| {
        let out = Command::new(b).arg("--version").output().ok()?;
        parse_containerd_major(&String::from_utf8_lossy(&out.stdout))
    });
    if major.is_some_and(|m| m >= 2) { 3 } else { 2 }
}

pub fn parse_containerd_major(text: &str) -> Option<u32> {
    text.split_whitespace().find_map(|w| {
        let w = w.strip_prefix('v').unwrap_or(w);
        let (major, rest) = w.split_once('.')?;
        rest.starts_with(|c: char| c.is_ascii_digit())
            .then(|| major.parse().ok())
            .flatten()
    })
}

/// `--handlers`: the file's text, appended verbatim after a comment, once it parses as nothing but
/// `[[handlers]]` entries.
fn handlers_section(path: &Path) -> Result<String, BakeError> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct HandlersFile {
        #[allow(dead_code)]
        // Parsed to refuse anything but [[handlers]]; the text is what is kept.
        handlers: Vec<noded::kata::handlers::HandlerConfig>,
    }
    let bad = |message: String| BakeError::Handlers {
        path: path.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    toml::from_str::<HandlersFile>(&text)
        .map_err(|e| bad(noded::config::one_line(&e.to_string())))?;
    Ok(format!(
        "\n# From `installer bake --handlers {}`.\n{text}{}",
        path.display(),
        if text.ends_with('\n') { "" } else { "\n" }
    ))
}
