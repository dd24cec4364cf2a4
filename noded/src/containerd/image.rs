//! The probe/pause image, built locally from busybox-static and imported into containerd without any
//! registry.
//!
//! The image is an OCI image-layout tar: one uncompressed layer (`/bin/busybox` plus applet symlinks and
//! the usual mount-point directories), a config, a manifest, and an `index.json` whose entries carry
//! `io.containerd.image.name` (one entry per name; all point at the same manifest). Every byte is
//! deterministic (fixed mtimes, owners, order), so rebuilding gives the same digest and re-importing is a
//! no-op. Import goes through containerd's content and images services under a lease, as `ctr images
//! import` does; the CRI plugin learns about the images from containerd's image events and unpacks them
//! on first use.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::{
    CreateImageRequest, CreateRequest as CreateLeaseRequest, DeleteRequest as DeleteLeaseRequest,
    GetImageRequest, Image, Info, InfoRequest, UpdateImageRequest, UpdateRequest, WriteAction,
    WriteContentRequest, content_client::ContentClient, images_client::ImagesClient,
    leases_client::LeasesClient,
};
use containerd_client::types::Descriptor;
use oci_spec::image::{
    Arch, ConfigBuilder, Descriptor as OciDescriptor, DescriptorBuilder, Digest, HistoryBuilder,
    ImageConfigurationBuilder, ImageIndex, ImageIndexBuilder, ImageManifest, ImageManifestBuilder,
    MediaType, OciLayoutBuilder, Os, RootFsBuilder, SCHEMA_VERSION,
};
use tonic::transport::Channel;
use tracing::{debug, info};

/// Image name of the probe container (the probe's default, defined with it).
pub use crate::cri::probe::PROBE_IMAGE;
/// Image name to put in the CRI plugin's `sandbox_image` (a pause container made of busybox `sleep`).
pub const PAUSE_IMAGE: &str = "noded.local/pause:1";
/// The namespace the CRI plugin uses.
pub const K8S_NAMESPACE: &str = "k8s.io";
/// Where Debian's `busybox-static` installs its binary.
pub const DEFAULT_BUSYBOX: &str = "/bin/busybox";

const NAME_ANNOTATION: &str = "io.containerd.image.name";
const RPC_TIMEOUT: Duration = Duration::from_secs(30);
const CHUNK: usize = 1 << 20;

const APPLETS: &[&str] = &[
    "sh", "sleep", "echo", "true", "false", "cat", "ls", "ps", "env", "id", "hostname", "mkdir",
    "rm", "touch", "grep", "head", "wc", "date", "uname", "kill", "mount",
];
const DIRS: &[(&str, u32)] = &[
    ("bin/", 0o755),
    ("dev/", 0o755),
    ("etc/", 0o755),
    ("proc/", 0o755),
    ("root/", 0o700),
    ("sys/", 0o755),
    ("tmp/", 0o1777),
    ("var/", 0o755),
];

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(
        "cannot read {path} (install Debian package busybox-static for /bin/busybox): {source}"
    )]
    Busybox {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write image tar {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("building the image tar failed: {0}")]
    Build(std::io::Error),
    #[error("OCI layout is invalid: {0}")]
    Layout(String),
    #[error("cannot connect to containerd at {socket}: {source}")]
    Connect {
        socket: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("containerd {op} failed: {status}")]
    Rpc {
        op: &'static str,
        status: Box<tonic::Status>,
    },
    #[error("containerd {0} timed out after {RPC_TIMEOUT:?}")]
    Timeout(&'static str),
}

fn rpc(op: &'static str) -> impl FnOnce(tonic::Status) -> ImageError {
    move |status| ImageError::Rpc {
        op,
        status: Box::new(status),
    }
}

async fn timed<T>(
    op: &'static str,
    fut: impl Future<Output = Result<T, ImageError>>,
) -> Result<T, ImageError> {
    tokio::time::timeout(RPC_TIMEOUT, fut)
        .await
        .map_err(|_| ImageError::Timeout(op))?
}

/// A built OCI image layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciLayout {
    /// The tar bytes (`oci-layout`, `index.json`, `blobs/sha256/*`).
    pub tar: Vec<u8>,
    /// `sha256:<hex>` of the manifest every name points at.
    pub manifest_digest: String,
    pub names: Vec<String>,
}

/// One image name as containerd now has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportedImage {
    pub name: String,
    /// `sha256:<hex>` of the manifest.
    pub digest: String,
    /// false when containerd already had this name pointing at this digest (nothing was written).
    pub changed: bool,
}

/// `sha256:<hex>` of `bytes`, the OCI digest.
fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", crate::fsutil::sha256_bytes(bytes))
}

fn oci_err(what: &'static str) -> impl FnOnce(oci_spec::OciSpecError) -> ImageError {
    move |e| ImageError::Layout(format!("{what}: {e}"))
}

fn digest(s: &str) -> Result<Digest, ImageError> {
    s.parse().map_err(oci_err("digest"))
}

fn descriptor(media_type: MediaType, blob: &[u8]) -> Result<OciDescriptor, ImageError> {
    Ok(OciDescriptor::new(
        media_type,
        blob.len() as u64,
        digest(&digest_of(blob))?,
    ))
}

/// JSON with object keys sorted: oci-spec keeps annotations in a `HashMap`, whose order changes
/// from run to run; the layout must be the same bytes every time.
fn canonical_json(value: &impl serde::Serialize) -> Result<Vec<u8>, ImageError> {
    serde_json::to_value(value)
        .and_then(|v| serde_json::to_vec(&v))
        .map_err(|e| ImageError::Layout(e.to_string()))
}

fn header(kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_mode(mode);
    h.set_size(size);
    h.set_mtime(0);
    h.set_uid(0);
    h.set_gid(0);
    h
}

fn layer_tar(busybox: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut b = tar::Builder::new(Vec::new());
    for (dir, mode) in DIRS {
        let mut h = header(tar::EntryType::Directory, *mode, 0);
        b.append_data(&mut h, dir, std::io::empty())?;
    }
    let mut h = header(tar::EntryType::Regular, 0o755, busybox.len() as u64);
    b.append_data(&mut h, "bin/busybox", busybox)?;
    for applet in APPLETS {
        let mut h = header(tar::EntryType::Symlink, 0o777, 0);
        b.append_link(&mut h, format!("bin/{applet}"), "busybox")?;
    }
    b.into_inner()
}

/// Builds the OCI layout tar from a static busybox binary, with one index entry per name. Deterministic.
pub fn build_layout(busybox: &Path, names: &[&str]) -> Result<OciLayout, ImageError> {
    let bb = std::fs::read(busybox).map_err(|source| ImageError::Busybox {
        path: busybox.to_path_buf(),
        source,
    })?;
    let layer = layer_tar(&bb).map_err(ImageError::Build)?;
    let layer_digest = digest_of(&layer);
    let epoch = "1970-01-01T00:00:00Z".to_string();
    let config = ImageConfigurationBuilder::default()
        .architecture(Arch::default())
        .os(Os::Linux)
        .created(epoch.clone())
        .config(
            ConfigBuilder::default()
                .env(vec![
                    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".to_string(),
                ])
                // Used as the pause container: sleeps until killed (CRI stops sandboxes with SIGKILL).
                .cmd(vec!["/bin/sleep".to_string(), "2147483647".to_string()])
                .working_dir("/".to_string())
                .build()
                .map_err(oci_err("image config"))?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers".to_string())
                .diff_ids(vec![layer_digest.clone()])
                .build()
                .map_err(oci_err("rootfs"))?,
        )
        .history(vec![
            HistoryBuilder::default()
                .created(epoch)
                .created_by("noded: busybox-static".to_string())
                .build()
                .map_err(oci_err("history"))?,
        ])
        .build()
        .map_err(oci_err("image config"))?;
    let config = canonical_json(&config)?;
    let manifest = ImageManifestBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageManifest)
        .config(descriptor(MediaType::ImageConfig, &config)?)
        .layers(vec![descriptor(MediaType::ImageLayer, &layer)?])
        .build()
        .map_err(oci_err("manifest"))?;
    // Field order as the spec lists them; a manifest has no map to reorder.
    let manifest = serde_json::to_vec(&manifest).map_err(|e| ImageError::Layout(e.to_string()))?;
    let manifest_digest = digest_of(&manifest);
    let manifests = names
        .iter()
        .map(|name| {
            DescriptorBuilder::default()
                .media_type(MediaType::ImageManifest)
                .digest(digest(&manifest_digest)?)
                .size(manifest.len() as u64)
                .annotations(std::collections::HashMap::from([
                    (NAME_ANNOTATION.to_string(), (*name).to_string()),
                    (
                        "org.opencontainers.image.ref.name".to_string(),
                        name.rsplit_once(':')
                            .map_or("latest", |(_, t)| t)
                            .to_string(),
                    ),
                ]))
                .build()
                .map_err(oci_err("index entry"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let index = ImageIndexBuilder::default()
        .schema_version(SCHEMA_VERSION)
        .media_type(MediaType::ImageIndex)
        .manifests(manifests)
        .build()
        .map_err(oci_err("index"))?;
    let index = canonical_json(&index)?;
    let oci_layout = OciLayoutBuilder::default()
        .image_layout_version("1.0.0".to_string())
        .build()
        .map_err(oci_err("oci-layout"))?;
    let oci_layout = canonical_json(&oci_layout)?;

    let mut blobs: BTreeMap<String, &[u8]> = BTreeMap::new();
    for blob in [&layer, &config, &manifest] {
        blobs.insert(digest_of(blob), blob);
    }
    let mut b = tar::Builder::new(Vec::new());
    let mut file = |path: &str, data: &[u8]| -> std::io::Result<()> {
        let mut h = header(tar::EntryType::Regular, 0o644, data.len() as u64);
        b.append_data(&mut h, path, data)
    };
    file("oci-layout", &oci_layout).map_err(ImageError::Build)?;
    file("index.json", &index).map_err(ImageError::Build)?;
    for (digest, data) in &blobs {
        let hex = digest.trim_start_matches("sha256:");
        file(&format!("blobs/sha256/{hex}"), data).map_err(ImageError::Build)?;
    }
    let tar = b.into_inner().map_err(ImageError::Build)?;
    Ok(OciLayout {
        tar,
        manifest_digest,
        names: names.iter().map(|n| (*n).to_string()).collect(),
    })
}

/// [`build_layout`] written to `out`.
pub fn write_layout_tar(
    busybox: &Path,
    names: &[&str],
    out: &Path,
) -> Result<OciLayout, ImageError> {
    let layout = build_layout(busybox, names)?;
    std::fs::write(out, &layout.tar).map_err(|source| ImageError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(layout)
}

/// What an OCI layout tar holds: blobs by digest and the named manifest descriptors.
struct ParsedLayout {
    blobs: BTreeMap<String, Vec<u8>>,
    named: Vec<(String, OciDescriptor)>,
}

fn parse_layout(tar_bytes: &[u8]) -> Result<ParsedLayout, ImageError> {
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut archive = tar::Archive::new(tar_bytes);
    for entry in archive.entries().map_err(ImageError::Build)? {
        let mut entry = entry.map_err(ImageError::Build)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry
            .path()
            .map_err(ImageError::Build)?
            .to_string_lossy()
            .trim_start_matches("./")
            .to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(ImageError::Build)?;
        files.insert(path, data);
    }
    let index = files
        .get("index.json")
        .ok_or_else(|| ImageError::Layout("no index.json".into()))?;
    let index = ImageIndex::from_reader(index.as_slice()).map_err(oci_err("index.json"))?;
    let mut blobs = BTreeMap::new();
    for (path, data) in files {
        if let Some(hex) = path.strip_prefix("blobs/sha256/") {
            let digest = format!("sha256:{hex}");
            if digest_of(&data) != digest {
                return Err(ImageError::Layout(format!(
                    "blob {path} does not match its digest"
                )));
            }
            blobs.insert(digest, data);
        }
    }
    let named = index
        .manifests()
        .iter()
        .filter_map(|d| {
            let name = d.annotations().as_ref()?.get(NAME_ANNOTATION)?.clone();
            Some((name, d.clone()))
        })
        .collect();
    Ok(ParsedLayout { blobs, named })
}

fn with_md<T>(msg: T, namespace: &str, lease: Option<&str>) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    if let Ok(v) = namespace.parse() {
        req.metadata_mut().insert("containerd-namespace", v);
    }
    if let Some(Ok(v)) = lease.map(str::parse) {
        req.metadata_mut().insert("containerd-lease", v);
    }
    req
}

/// Imports every named manifest of an OCI layout tar into `namespace`. Blobs containerd already has are not
/// rewritten, names already pointing at the same manifest are left alone.
pub async fn import_layout(
    socket: &Path,
    namespace: &str,
    tar_bytes: &[u8],
) -> Result<Vec<ImportedImage>, ImageError> {
    let layout = parse_layout(tar_bytes)?;
    let channel =
        containerd_client::connect(socket)
            .await
            .map_err(|source| ImageError::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
    // A lease keeps freshly written blobs from the garbage collector until an image references them.
    let lease_id = format!("noded-import-{}", uuid::Uuid::new_v4());
    let mut leases = LeasesClient::new(channel.clone());
    timed("lease create", async {
        leases
            .create(with_md(
                CreateLeaseRequest {
                    id: lease_id.clone(),
                    labels: [("containerd.io/gc.expire".to_string(), expire_in(3600))].into(),
                },
                namespace,
                None,
            ))
            .await
            .map_err(rpc("lease create"))
    })
    .await?;
    let result = import_with_lease(&channel, namespace, &lease_id, &layout).await;
    let _ = timed("lease delete", async {
        leases
            .delete(with_md(
                DeleteLeaseRequest {
                    id: lease_id.clone(),
                    sync: false,
                },
                namespace,
                None,
            ))
            .await
            .map_err(rpc("lease delete"))
    })
    .await;
    result
}

/// RFC 3339 UTC time `secs` from now, whole seconds: containerd parses the label with Go's
/// `time.RFC3339`.
fn expire_in(secs: i64) -> String {
    let now = jiff::Timestamp::now().as_second();
    jiff::Timestamp::from_second(now.saturating_add(secs))
        .unwrap_or(jiff::Timestamp::MAX)
        .to_string()
}

async fn import_with_lease(
    channel: &Channel,
    namespace: &str,
    lease: &str,
    layout: &ParsedLayout,
) -> Result<Vec<ImportedImage>, ImageError> {
    let mut content = ContentClient::new(channel.clone());
    let mut images = ImagesClient::new(channel.clone());
    let mut out = Vec::new();
    for (name, desc) in &layout.named {
        let desc_digest = desc.digest().to_string();
        let manifest_bytes = layout
            .blobs
            .get(&desc_digest)
            .ok_or_else(|| ImageError::Layout(format!("manifest {desc_digest} missing")))?;
        let manifest = ImageManifest::from_reader(manifest_bytes.as_slice())
            .map_err(|e| ImageError::Layout(format!("manifest {desc_digest}: {e}")))?;
        let mut gc_labels = BTreeMap::new();
        gc_labels.insert(
            "containerd.io/gc.ref.content.config".to_string(),
            manifest.config().digest().to_string(),
        );
        for (i, l) in manifest.layers().iter().enumerate() {
            gc_labels.insert(
                format!("containerd.io/gc.ref.content.l.{i}"),
                l.digest().to_string(),
            );
        }
        for child in std::iter::once(manifest.config()).chain(manifest.layers()) {
            let child_digest = child.digest().to_string();
            let data = layout
                .blobs
                .get(&child_digest)
                .ok_or_else(|| ImageError::Layout(format!("blob {child_digest} missing")))?;
            put_blob(
                &mut content,
                namespace,
                lease,
                &child_digest,
                data,
                &BTreeMap::new(),
            )
            .await?;
        }
        put_blob(
            &mut content,
            namespace,
            lease,
            &desc_digest,
            manifest_bytes,
            &gc_labels,
        )
        .await?;

        let target = Descriptor {
            media_type: desc.media_type().to_string(),
            digest: desc_digest.clone(),
            size: i64::try_from(desc.size())
                .map_err(|_| ImageError::Layout(format!("manifest {desc_digest} size")))?,
            annotations: Default::default(),
        };
        let existing = timed("image get", async {
            match images
                .get(with_md(
                    GetImageRequest { name: name.clone() },
                    namespace,
                    None,
                ))
                .await
            {
                Ok(r) => Ok(r.into_inner().image),
                Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
                Err(s) => Err(rpc("image get")(s)),
            }
        })
        .await?;
        let changed = match existing {
            Some(img) if img.target.as_ref().map(|t| t.digest.as_str()) == Some(&desc_digest) => {
                false
            }
            Some(_) => {
                timed("image update", async {
                    images
                        .update(with_md(
                            UpdateImageRequest {
                                image: Some(image(name, target)),
                                update_mask: Some(prost_types::FieldMask {
                                    paths: vec!["target".into()],
                                }),
                                source_date_epoch: None,
                            },
                            namespace,
                            Some(lease),
                        ))
                        .await
                        .map_err(rpc("image update"))
                })
                .await?;
                true
            }
            None => {
                timed("image create", async {
                    images
                        .create(with_md(
                            CreateImageRequest {
                                image: Some(image(name, target)),
                                source_date_epoch: None,
                            },
                            namespace,
                            Some(lease),
                        ))
                        .await
                        .map_err(rpc("image create"))
                })
                .await?;
                true
            }
        };
        info!(image = %name, digest = %desc_digest, changed, "image imported");
        out.push(ImportedImage {
            name: name.clone(),
            digest: desc_digest,
            changed,
        });
    }
    Ok(out)
}

fn image(name: &str, target: Descriptor) -> Image {
    Image {
        name: name.to_string(),
        labels: Default::default(),
        target: Some(target),
        created_at: None,
        updated_at: None,
    }
}

/// Writes one blob unless containerd has it already; makes sure it carries `labels`.
async fn put_blob(
    content: &mut ContentClient<Channel>,
    namespace: &str,
    lease: &str,
    digest: &str,
    data: &[u8],
    labels: &BTreeMap<String, String>,
) -> Result<(), ImageError> {
    let existing = timed("content info", async {
        match content
            .info(with_md(
                InfoRequest {
                    digest: digest.to_string(),
                },
                namespace,
                None,
            ))
            .await
        {
            Ok(r) => Ok(r.into_inner().info),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(rpc("content info")(s)),
        }
    })
    .await?;
    if let Some(info) = existing {
        let missing: Vec<String> = labels
            .iter()
            .filter(|(k, v)| info.labels.get(*k) != Some(*v))
            .map(|(k, _)| format!("labels.{k}"))
            .collect();
        if !missing.is_empty() {
            timed("content update", async {
                content
                    .update(with_md(
                        UpdateRequest {
                            info: Some(Info {
                                digest: digest.to_string(),
                                labels: labels.clone().into_iter().collect(),
                                ..Default::default()
                            }),
                            update_mask: Some(prost_types::FieldMask { paths: missing }),
                        },
                        namespace,
                        Some(lease),
                    ))
                    .await
                    .map_err(rpc("content update"))
            })
            .await?;
        }
        debug!(%digest, "blob already present");
        return Ok(());
    }
    let reference = format!("noded-{digest}");
    // A slice is at most isize::MAX bytes, so its length and offsets fit an i64.
    let total = i64::try_from(data.len()).unwrap_or(i64::MAX);
    let mut msgs = Vec::new();
    let mut offset = 0usize;
    for chunk in data.chunks(CHUNK) {
        msgs.push(WriteContentRequest {
            action: WriteAction::Write as i32,
            r#ref: reference.clone(),
            total,
            expected: digest.to_string(),
            offset: i64::try_from(offset).unwrap_or(i64::MAX),
            data: chunk.to_vec(),
            labels: Default::default(),
        });
        offset += chunk.len();
    }
    msgs.push(WriteContentRequest {
        action: WriteAction::Commit as i32,
        r#ref: reference,
        total,
        expected: digest.to_string(),
        offset: total,
        data: Vec::new(),
        labels: labels.clone().into_iter().collect(),
    });
    timed("content write", async {
        let req = with_md(tokio_stream::iter(msgs), namespace, Some(lease));
        let mut responses = match content.write(req).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
            Err(s) => return Err(rpc("content write")(s)),
        };
        loop {
            match responses.message().await {
                Ok(Some(_)) => {}
                Ok(None) => return Ok(()),
                Err(s) if s.code() == tonic::Code::AlreadyExists => return Ok(()),
                Err(s) => return Err(rpc("content write")(s)),
            }
        }
    })
    .await?;
    debug!(%digest, bytes = total, "blob written");
    Ok(())
}

/// Builds the busybox image with both [`PROBE_IMAGE`] and [`PAUSE_IMAGE`] names and imports it into
/// [`K8S_NAMESPACE`]. Idempotent. The CRI plugin sees the images shortly after (through image events);
/// use `cri::wait_image` before relying on them.
pub async fn ensure_local_images(
    socket: &Path,
    busybox: &Path,
) -> Result<Vec<ImportedImage>, ImageError> {
    let layout = build_layout(busybox, &[PROBE_IMAGE, PAUSE_IMAGE])?;
    import_layout(socket, K8S_NAMESPACE, &layout.tar).await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn lease_expiry_is_rfc3339_utc_in_whole_seconds() {
        let e = expire_in(3600);
        let t: jiff::Timestamp = e.parse().unwrap();
        let ahead = t.as_second() - jiff::Timestamp::now().as_second();
        assert!((3598..=3600).contains(&ahead), "{e}");
        // `2024-01-01T00:00:00Z`: date, `T`, time without fraction, `Z`.
        assert_eq!(e.len(), 20, "{e}");
        assert!(e.ends_with('Z') && e.as_bytes()[10] == b'T', "{e}");
    }

    /// The blobs are the bytes the hand-written structs produced before oci-spec (keys of the config
    /// sorted, the manifest in the spec's field order), so the digests and containerd's content do not
    /// change with the crate.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn blobs_keep_their_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let bb = dir.path().join("busybox");
        std::fs::write(&bb, b"\x7fELF not really busybox").unwrap();
        let a = build_layout(&bb, &[PAUSE_IMAGE]).unwrap();
        let parsed = parse_layout(&a.tar).unwrap();
        let manifest = std::str::from_utf8(&parsed.blobs[&a.manifest_digest]).unwrap();
        let m: serde_json::Value = serde_json::from_str(manifest).unwrap();
        let (config_digest, layer_digest) = (
            m["config"]["digest"].as_str().unwrap(),
            m["layers"][0]["digest"].as_str().unwrap(),
        );
        let config = std::str::from_utf8(&parsed.blobs[config_digest]).unwrap();
        assert_eq!(
            config,
            format!(
                concat!(
                    r#"{{"architecture":"amd64","config":{{"Cmd":["/bin/sleep","2147483647"],"#,
                    r#""Env":["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],"#,
                    r#""WorkingDir":"/"}},"created":"1970-01-01T00:00:00Z","history":[{{"#,
                    r#""created":"1970-01-01T00:00:00Z","created_by":"noded: busybox-static"}}],"#,
                    r#""os":"linux","rootfs":{{"diff_ids":["{}"],"type":"layers"}}}}"#
                ),
                layer_digest
            )
        );
        assert_eq!(
            manifest,
            format!(
                concat!(
                    r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","#,
                    r#""config":{{"mediaType":"application/vnd.oci.image.config.v1+json","#,
                    r#""digest":"{}","size":{}}},"layers":[{{"#,
                    r#""mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":{}}}]}}"#
                ),
                config_digest,
                config.len(),
                layer_digest,
                parsed.blobs[layer_digest].len()
            )
        );
    }

    #[test]
    fn layout_is_deterministic_and_parses() {
        let dir = tempfile::tempdir().unwrap();
        let bb = dir.path().join("busybox");
        std::fs::write(&bb, b"\x7fELF not really busybox").unwrap();
        let a = build_layout(&bb, &[PROBE_IMAGE, PAUSE_IMAGE]).unwrap();
        let b = build_layout(&bb, &[PROBE_IMAGE, PAUSE_IMAGE]).unwrap();
        assert_eq!(a, b);
        let parsed = parse_layout(&a.tar).unwrap();
        assert_eq!(parsed.blobs.len(), 3);
        let names: Vec<&str> = parsed.named.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, [PROBE_IMAGE, PAUSE_IMAGE]);
        assert!(
            parsed
                .named
                .iter()
                .all(|(_, d)| d.digest().to_string() == a.manifest_digest)
        );
        std::fs::write(&bb, b"\x7fELF another busybox").unwrap();
        let c = build_layout(&bb, &[PROBE_IMAGE]).unwrap();
        assert_ne!(c.manifest_digest, a.manifest_digest);
    }
}
