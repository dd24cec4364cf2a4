//! The DaemonSet image: scripts/build-image.sh (Debian's buildah, offline) writes an OCI archive; the
//! archive is read back with `tar` + `serde_json` (name, entrypoint, files, static binaries, size), then
//! imported into a real private containerd 1.6 with `ctr`, and the image's noded and installer run in a
//! CRI container on runc, the way the kubelet would start them.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use noded::containerd::image::{self, PAUSE_IMAGE};
use noded::cri::{CriClient, PodSpec};
use serde_json::Value;
use testkit::require::{require, require_root};

/// Issue 10's goal for the image as a registry stores it (gzip layers).
const MAX_COMPRESSED: u64 = 30 << 20;

/// Debian's CA bundle, where rustls-native-certs (kube-rs' TLS roots) looks for it.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// The noded container of daemonset/daemonset.yaml (image, command), parsed with PyYAML.
fn daemonset_container() -> (String, Vec<String>) {
    let path = repo().join("daemonset/daemonset.yaml");
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys, json, yaml; json.dump(yaml.safe_load(open(sys.argv[1])), sys.stdout)",
        ])
        .arg(&path)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let ds: Value = serde_json::from_slice(&out.stdout).expect("json");
    let containers = ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers");
    assert_eq!(containers.len(), 1, "one container in the DaemonSet");
    let c = &containers[0];
    let image = c["image"].as_str().expect("image").to_owned();
    let command = c["command"]
        .as_array()
        .expect("command")
        .iter()
        .map(|v| v.as_str().expect("string").to_owned())
        .collect();
    (image, command)
}

/// The DaemonSet image archive: `NODED_TEST_IMAGE_ARCHIVE` (built by scripts/test.sh before nextest),
/// else scripts/build-image.sh run now (a no-op rebuild when the binaries are unchanged).
fn build_image() -> PathBuf {
    let started = std::time::Instant::now();
    let archive = testkit::scenario::image_archive().expect("the DaemonSet image builds");
    eprintln!(
        "image archive {} ready in {:.1} s",
        archive.display(),
        started.elapsed().as_secs_f64()
    );
    archive
}

/// Every entry of the archive tar by path (blobs are small enough to hold: the image is < 30 MiB).
fn read_archive(path: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut entries = BTreeMap::new();
    let mut tar = tar::Archive::new(std::fs::File::open(path).expect("open archive"));
    for e in tar.entries().expect("tar") {
        let mut e = e.expect("tar entry");
        if !e.header().entry_type().is_file() {
            continue;
        }
        let name = e
            .path()
            .expect("path")
            .to_string_lossy()
            .trim_start_matches("./")
            .to_owned();
        let mut data = Vec::new();
        e.read_to_end(&mut data).expect("read entry");
        entries.insert(name, data);
    }
    entries
}

fn blob<'a>(entries: &'a BTreeMap<String, Vec<u8>>, digest: &str) -> &'a [u8] {
    let (algo, hex) = digest.split_once(':').expect("digest algo:hex");
    let data = entries
        .get(&format!("blobs/{algo}/{hex}"))
        .unwrap_or_else(|| panic!("blob {digest} missing from the archive"));
    use sha2::Digest;
    assert_eq!(
        format!("sha256:{}", hex::encode(sha2::Sha256::digest(data))),
        digest,
        "blob content matches its digest"
    );
    data
}

fn gunzip(data: &[u8]) -> Vec<u8> {
    let mut child = Command::new("gzip")
        .arg("-dc")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("gzip");
    let mut stdin = child.stdin.take().expect("stdin");
    let input = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&input));
    let out = child.wait_with_output().expect("gzip output");
    writer.join().expect("writer").expect("write to gzip");
    assert!(out.status.success(), "layer is not valid gzip");
    out.stdout
}

/// A static ELF executable: ELF magic, ET_EXEC or ET_DYN (static-pie), and no PT_INTERP segment.
fn assert_static_elf(name: &str, data: &[u8]) {
    assert!(
        data.len() > 64 && &data[..4] == b"\x7fELF",
        "{name}: not an ELF file"
    );
    assert_eq!(data[4], 2, "{name}: not ELF64");
    assert_eq!(data[5], 1, "{name}: not little-endian");
    let u16_at = |o: usize| u16::from_le_bytes([data[o], data[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |o: usize| u64::from_le_bytes(data[o..o + 8].try_into().expect("8 bytes"));
    let e_type = u16_at(16);
    assert!(
        e_type == 2 || e_type == 3,
        "{name}: ELF type {e_type} is not an executable"
    );
    let phoff = usize::try_from(u64_at(32)).expect("phoff");
    let phentsize = usize::from(u16_at(54));
    let phnum = usize::from(u16_at(56));
    assert!(phnum > 0, "{name}: no program headers");
    let mut has_load = false;
    for i in 0..phnum {
        let p_type = u32_at(phoff + i * phentsize);
        assert_ne!(p_type, 3, "{name}: has PT_INTERP (dynamically linked)");
        has_load |= p_type == 1;
    }
    assert!(has_load, "{name}: no PT_LOAD segment");
}

#[test]
fn image_archive_holds_static_noded_and_installer_under_the_daemonsets_name() {
    if require("buildah").is_none() || require("python3").is_none() || require("gzip").is_none() {
        return;
    }
    let (ds_image, ds_command) = daemonset_container();
    let archive = build_image();
    let entries = read_archive(&archive);

    assert!(entries.contains_key("oci-layout"), "oci-layout missing");
    let index: Value = serde_json::from_slice(&entries["index.json"]).expect("index.json");
    let manifests = index["manifests"].as_array().expect("index.manifests");
    assert_eq!(manifests.len(), 1, "one image in the archive: {index}");
    let desc = &manifests[0];
    // `buildah push … oci-archive:FILE:TAG` stores TAG as the reference name; containerd's import
    // takes the full name from the containerd annotation when present, else from the ref name.
    let ref_name = desc["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .expect("ref.name annotation");
    assert_eq!(
        ref_name, ds_image,
        "archive tag equals the DaemonSet's image"
    );

    let manifest: Value =
        serde_json::from_slice(blob(&entries, desc["digest"].as_str().expect("digest")))
            .expect("manifest json");
    let config: Value = serde_json::from_slice(blob(
        &entries,
        manifest["config"]["digest"]
            .as_str()
            .expect("config digest"),
    ))
    .expect("config json");
    assert_eq!(config["os"], "linux");
    assert_eq!(config["architecture"], "amd64");
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s.as_str().expect("string").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let entrypoint = strings(&config["config"]["Entrypoint"]);
    let cmd = strings(&config["config"]["Cmd"]);
    // The DaemonSet's `command` replaces the entrypoint; running the image bare must mean the same.
    assert_eq!(
        [entrypoint.clone(), cmd.clone()].concat(),
        ds_command,
        "image Entrypoint+Cmd = the DaemonSet's command"
    );
    assert_eq!(
        entrypoint.first().map(String::as_str),
        ds_command.first().map(String::as_str),
        "the DaemonSet's command runs the image's entrypoint binary"
    );

    let mut files = BTreeMap::new();
    let mut dirs = Vec::new();
    let (mut compressed, mut uncompressed) = (0u64, 0u64);
    for layer in manifest["layers"].as_array().expect("layers") {
        let media = layer["mediaType"].as_str().expect("mediaType");
        let data = blob(&entries, layer["digest"].as_str().expect("layer digest"));
        let tar_bytes = if media.ends_with("+gzip") || media.ends_with(".gzip") {
            compressed += data.len() as u64;
            gunzip(data)
        } else {
            assert!(media.ends_with(".tar"), "unexpected layer type {media}");
            // What a registry would store: compress it here to measure.
            let mut child = Command::new("gzip")
                .arg("-c")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .expect("gzip");
            let mut stdin = child.stdin.take().expect("stdin");
            let input = data.to_vec();
            let writer = std::thread::spawn(move || stdin.write_all(&input));
            let out = child.wait_with_output().expect("gzip");
            writer.join().expect("writer").expect("write");
            compressed += out.stdout.len() as u64;
            data.to_vec()
        };
        uncompressed += tar_bytes.len() as u64;
        let mut layer_tar = tar::Archive::new(tar_bytes.as_slice());
        for e in layer_tar.entries().expect("layer tar") {
            let mut e = e.expect("layer entry");
            let path = format!(
                "/{}",
                e.path()
                    .expect("path")
                    .to_string_lossy()
                    .trim_start_matches("./")
                    .trim_end_matches('/')
            );
            let kind = e.header().entry_type();
            if kind.is_dir() {
                dirs.push((path, e.header().mode().expect("mode")));
            } else {
                assert!(kind.is_file(), "{path}: unexpected entry type {kind:?}");
                let mode = e.header().mode().expect("mode");
                let mut data = Vec::new();
                e.read_to_end(&mut data).expect("read file");
                files.insert(path, (mode, data));
            }
        }
    }
    let names: Vec<&str> = files.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            CA_BUNDLE,
            "/usr/local/bin/installer",
            "/usr/local/bin/noded"
        ],
        "the image holds exactly the two binaries and the CA bundle kube-rs' rustls needs"
    );
    for (name, (mode, data)) in &files {
        if name == CA_BUNDLE {
            assert_eq!(mode & 0o777, 0o644, "{name}: mode {mode:o}");
            assert!(
                String::from_utf8_lossy(data).contains("BEGIN CERTIFICATE"),
                "{name} is not a PEM bundle"
            );
            continue;
        }
        assert_eq!(mode & 0o777, 0o755, "{name}: mode {mode:o}");
        assert_static_elf(name, data);
    }
    let dir_names: Vec<&str> = dirs.iter().map(|(p, _)| p.as_str()).collect();
    for d in &dir_names {
        assert!(
            [
                "/",
                "/etc",
                "/etc/ssl",
                "/etc/ssl/certs",
                "/tmp",
                "/usr",
                "/usr/local",
                "/usr/local/bin"
            ]
            .contains(d),
            "unexpected directory {d} in the image"
        );
    }
    let tmp_mode = dirs
        .iter()
        .find(|(p, _)| p == "/tmp")
        .map(|(_, m)| *m)
        .expect("/tmp in the image");
    assert_eq!(
        tmp_mode & 0o7777,
        0o1777,
        "/tmp is world-writable and sticky"
    );

    let mib = |b: u64| b as f64 / f64::from(1u32 << 20);
    eprintln!(
        "image {ds_image}: {:.1} MiB uncompressed, {:.1} MiB gzip-compressed (noded {:.1} MiB, installer {:.1} MiB)",
        mib(uncompressed),
        mib(compressed),
        mib(files["/usr/local/bin/noded"].1.len() as u64),
        mib(files["/usr/local/bin/installer"].1.len() as u64),
    );
    assert!(
        compressed < MAX_COMPRESSED,
        "image is {:.1} MiB compressed, goal < {:.0} MiB",
        mib(compressed),
        mib(MAX_COMPRESSED)
    );
}

/// `ctr -n k8s.io images import` into a real containerd 1.6, then CRI lists the DaemonSet's image and
/// runs the image's binaries (empty root filesystem, only what the image carries) to exit 0.
#[tokio::test(flavor = "multi_thread")]
async fn image_imports_into_containerd_and_its_binaries_run_under_cri() {
    let components = [
        "buildah",
        "python3",
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        "ctr",
        "unshare",
    ];
    if !require_root() || components.iter().any(|c| require(c).is_none()) {
        return;
    }
    if !Path::new(image::DEFAULT_BUSYBOX).is_file() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{} (busybox-static) missing: the pause image is built from it",
            image::DEFAULT_BUSYBOX
        );
        eprintln!("SKIP: {} not installed", image::DEFAULT_BUSYBOX);
        return;
    }
    let (ds_image, ds_command) = daemonset_container();
    let archive = tokio::task::spawn_blocking(build_image)
        .await
        .expect("build thread");

    let ctrd = testkit::containerd::start_temp(PAUSE_IMAGE)
        .await
        .expect("private containerd starts");
    let socket = ctrd.socket().to_path_buf();
    let ctr = |args: &[&str]| {
        let out = Command::new("ctr")
            .arg("--address")
            .arg(&socket)
            .args(["-n", image::K8S_NAMESPACE])
            .args(args)
            .output()
            .expect("ctr");
        assert!(
            out.status.success(),
            "ctr {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    };
    let archive_arg = archive.to_str().expect("utf8 path");
    ctr(&["images", "import", archive_arg]);
    let listed = ctr(&["images", "ls", "-q"]);
    assert!(
        listed.lines().any(|l| l.trim() == ds_image),
        "containerd lists {ds_image}; it has: {listed}"
    );

    // The sandbox (pause) image a node's containerd already has; here built from busybox.
    image::ensure_local_images(&socket, Path::new(image::DEFAULT_BUSYBOX))
        .await
        .expect("pause image imports");
    let t = Duration::from_secs(60);
    let mut cri = CriClient::connect(&socket).await.expect("CRI connects");
    // CRI learns about imports from image events, asynchronously: a sandbox started before it has
    // seen the pause image tries to pull it from the network.
    for name in [ds_image.as_str(), PAUSE_IMAGE] {
        cri.wait_image(name, Duration::from_secs(10))
            .await
            .unwrap_or_else(|e| panic!("CRI sees the imported image {name}: {e}"));
    }
    let pod = PodSpec::unique("noded-image", "runc");
    let sandbox = cri.run_pod(&pod, t).await.expect("RunPodSandbox");
    // The DaemonSet's binary with a flag that needs no host mounts; then the installer.
    let runs = [
        ("noded", vec![ds_command[0].as_str(), "--version"]),
        ("installer", vec!["/usr/local/bin/installer", "--version"]),
    ];
    let mut failures = Vec::new();
    for (name, command) in &runs {
        let id = cri
            .create_container(&sandbox, &pod, name, &ds_image, command, t)
            .await
            .expect("CreateContainer");
        cri.start_container(&id, t).await.expect("StartContainer");
        let info = cri.wait_exited(&id, t).await.expect("container exits");
        if info.exit_code != 0 {
            failures.push(format!("{command:?}: exit {} {info:?}", info.exit_code));
        }
    }
    cri.remove_pod(&sandbox, t).await.expect("remove pod");
    drop(ctrd);
    assert!(failures.is_empty(), "in the image: {failures:?}");
}
