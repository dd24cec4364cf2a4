#!/usr/bin/env bash
# Builds the noded DaemonSet image offline and writes it as an OCI archive (`oci-archive:` tar) that
# `ctr -n k8s.io images import`, `skopeo copy` or `podman load` take.
#
#   scripts/build-image.sh [--output FILE] [--tag NAME]
#
# --output  archive to write (default: <target dir>/image/noded-image.oci.tar)
# --tag     image name stored in the archive (default: the noded container's image in
#           daemonset/daemonset.yaml, so the manifest and the image cannot drift apart)
#
# Steps: cargo builds `noded` and `installer` as static glibc binaries (`+crt-static`, explicit
# --target so build scripts and proc-macros stay dynamic host binaries), checks they are static and run,
# stages a build context, and runs Debian's buildah (vfs storage in a temp dir: nothing is left in
# /var/lib/containers) on daemonset/Containerfile. When the binaries, Containerfile and tag are unchanged
# since the last run, the existing archive is kept (the cargo build itself is a no-op then).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
triple=x86_64-unknown-linux-gnu
output=""
tag=""

die() {
    echo "build-image.sh: $*" >&2
    exit 1
}

while [ $# -gt 0 ]; do
    case "$1" in
    --output) [ $# -ge 2 ] || die "--output needs a file"; output="$2"; shift 2 ;;
    --output=*) output="${1#--output=}"; shift ;;
    --tag) [ $# -ge 2 ] || die "--tag needs a name"; tag="$2"; shift 2 ;;
    --tag=*) tag="${1#--tag=}"; shift ;;
    -h | --help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "build-image.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
done

for tool in cargo buildah readelf ldd flock sha256sum gzip python3; do
    command -v "$tool" >/dev/null || die "'$tool' not found (scripts/install-deps.sh installs buildah)"
done

if [ -z "$tag" ]; then
    manifest="$repo/daemonset/daemonset.yaml"
    # The noded container is the only one in the DaemonSet with an `image:` line.
    tag="$(sed -n 's/^[[:space:]]*image:[[:space:]]*"\{0,1\}\([^"[:space:]]*\)"\{0,1\}[[:space:]]*$/\1/p' "$manifest")"
    [ "$(printf '%s\n' "$tag" | grep -c .)" = 1 ] ||
        die "$manifest: expected exactly one 'image:' line, found: ${tag:-none}"
fi

target_dir="${CARGO_TARGET_DIR:-$repo/target}"
case "$target_dir" in /*) ;; *) target_dir="$repo/$target_dir" ;; esac
output="${output:-$target_dir/image/noded-image.oci.tar}"
mkdir -p "$(dirname "$output")"
output="$(cd "$(dirname "$output")" && pwd)/$(basename "$output")"
# Concurrent runs (tests in parallel) would race on the archive: one at a time per output.
exec 9>"$output.lock"
flock 9

# 1. Static binaries. RUSTFLAGS with an explicit --target applies to the target crates only.
echo "build-image.sh: cargo build --release (static, $triple)" >&2
build_log="$(mktemp)"
trap 'rm -f "$build_log"' EXIT
started=$SECONDS
if ! (cd "$repo" && RUSTFLAGS="-C target-feature=+crt-static" CARGO_TARGET_DIR="$target_dir" \
    cargo build --release --locked -p noded -p installer --target "$triple" 2>&1 | tee "$build_log" >&2); then
    die "cargo build failed"
fi
echo "build-image.sh: cargo build took $((SECONDS - started)) s" >&2
bin_dir="$target_dir/$triple/release"
for b in noded installer; do
    bin="$bin_dir/$b"
    [ -x "$bin" ] || die "$bin: not built"
    # Static: no program interpreter (PT_INTERP) and no shared library needed (DT_NEEDED).
    if readelf -lW "$bin" | grep -q 'INTERP'; then die "$bin: has a PT_INTERP segment (dynamic)"; fi
    if readelf -dW "$bin" | grep -q '(NEEDED)'; then
        die "$bin: needs shared libraries: $(readelf -dW "$bin" | grep '(NEEDED)' | tr -s ' ' | tr '\n' ' ')"
    fi
    desc="$(readelf -hW "$bin" | sed -n 's/^ *Type: *//p')"
    ldd_out="$(ldd "$bin" 2>&1 || true)"
    case "$ldd_out" in
    *"not a dynamic executable"* | *"statically linked"*) ;;
    *) die "$bin: ldd lists shared libraries: $(printf '%s' "$ldd_out" | tr '\n' ' ')" ;;
    esac
    # Run it with no environment and no PATH, as close to the empty image as a host gets.
    version="$(env -i "$bin" --version 2>&1)" || die "$bin --version failed: $version"
    echo "build-image.sh: $b: $version, $(stat -c %s "$bin") bytes, $desc" >&2
done
# glibc warns at link time about functions that need NSS modules at run time (getaddrinfo, getpwnam …):
# they fail softly in the image (no modules), so name them instead of hiding them.
if grep -q 'statically linked applications requires at runtime' "$build_log"; then
    grep -o "Using '[a-z_]*' in statically linked" "$build_log" | sort -u | sed 's/^/build-image.sh: note: /' >&2
fi

# 2. Skip buildah when nothing that goes into the image changed.
containerfile="$repo/daemonset/Containerfile"
inputs_key="$( {
    sha256sum "$bin_dir/noded" "$bin_dir/installer" "$containerfile" /etc/ssl/certs/ca-certificates.crt | cut -d' ' -f1
    printf 'tag=%s\n' "$tag"
    sha256sum "$0" | cut -d' ' -f1
} | sha256sum | cut -d' ' -f1)"
stamp="$output.inputs"
if [ -s "$output" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$inputs_key" ]; then
    echo "build-image.sh: $output is up to date ($tag)" >&2
    reuse=1
else
    reuse=0
fi

if [ "$reuse" = 0 ]; then
    work="$(mktemp -d "${TMPDIR:-/tmp}/noded-image.XXXXXX")"
    store=(--root "$work/storage" --runroot "$work/run" --storage-driver vfs)
    # As root, containers/image keeps a blob cache in /var/lib/containers/cache whatever --root says.
    # Each buildah call runs in a private mount namespace with that directory bound to $work, so the
    # host keeps nothing (a /var/lib/containers created just to mount over is removed again).
    made_varlib=0
    if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null; then
        mkdir -p "$work/varlib"
        if [ ! -d /var/lib/containers ]; then
            mkdir /var/lib/containers
            made_varlib=1
        fi
        bh() {
            unshare --mount --propagation private -- \
                sh -c 'mount --bind "$0" /var/lib/containers && exec "$@"' "$work/varlib" buildah "${store[@]}" "$@"
        }
    else
        bh() { buildah "${store[@]}" "$@"; }
    fi
    cleanup() {
        # Everything lives in the private vfs store; rm/rmi first so buildah unmounts what it mounted.
        bh rm --all >/dev/null 2>&1 || true
        bh rmi --all --force >/dev/null 2>&1 || true
        rm -rf "$work" "$build_log"
        if [ "$made_varlib" = 1 ]; then rmdir /var/lib/containers 2>/dev/null || true; fi
    }
    trap cleanup EXIT

    # 3. Build context: exactly the files of the image, nothing from the repository.
    ctx="$work/context"
    mkdir -p "$ctx/rootfs/usr/local/bin" "$ctx/rootfs/tmp"
    chmod 1777 "$ctx/rootfs/tmp"
    chmod 0755 "$ctx/rootfs" "$ctx/rootfs/usr" "$ctx/rootfs/usr/local" "$ctx/rootfs/usr/local/bin"
    install -m 0755 "$bin_dir/noded" "$bin_dir/installer" "$ctx/rootfs/usr/local/bin/"
    # A kubeconfig without `certificate-authority` makes kube-rs' rustls client load the system trust
    # store, and an empty one fails every client build: the image carries Debian's CA bundle (see the
    # Containerfile).
    install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$ctx/rootfs/etc/ssl/certs/ca-certificates.crt"

    # Fixed timestamps (last commit) so unchanged inputs give the same layer and config digests.
    epoch="$(git -C "$repo" log -1 --format=%ct 2>/dev/null || echo 0)"
    echo "build-image.sh: buildah build $tag" >&2
    started=$SECONDS
    bh build --quiet --pull=false --network none --layers=false --format oci \
        --timestamp "$epoch" -f "$containerfile" -t "$tag" "$ctx" >/dev/null ||
        die "buildah build failed"
    rm -f "$output" "$stamp"
    bh push --quiet "$tag" "oci-archive:$output:$tag" || die "buildah push failed"
    echo "build-image.sh: buildah build + push took $((SECONDS - started)) s" >&2
    printf '%s\n' "$inputs_key" >"$stamp"
fi

# 4. Sizes: layer blobs as stored in the archive (gzip) and uncompressed.
python3 - "$output" <<'EOF' >&2
import gzip, json, sys, tarfile
path = sys.argv[1]
with tarfile.open(path) as t:
    def blob(digest):
        return t.extractfile("blobs/" + digest.replace(":", "/")).read()
    index = json.loads(t.extractfile("index.json").read())
    manifest = json.loads(blob(index["manifests"][0]["digest"]))
    raw = gz = 0
    for layer in manifest["layers"]:
        data = blob(layer["digest"])
        if layer["mediaType"].endswith("gzip"):
            gz += len(data)
            raw += len(gzip.decompress(data))
        else:
            # What a registry push (gzip) would store.
            gz += len(gzip.compress(data, 6))
            raw += len(data)
    mib = 1 << 20
    print(f"build-image.sh: {path}: {len(manifest['layers'])} layer(s), "
          f"{raw / mib:.1f} MiB uncompressed, {gz / mib:.1f} MiB gzip-compressed")
EOF
echo "$output"
