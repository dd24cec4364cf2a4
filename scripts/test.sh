#!/usr/bin/env bash
# Runs every test of the project against the real components (containerd 1.6 + runc, QEMU, Prometheus,
# promtool, packer, kubectl kustomize + kubernetes-validate); only the Kubernetes API server is faked.
# As root on Debian 12. This is what .ci/run runs. Under CI=true a missing component fails its test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
# Disk, not speed, is CI's limit (a run died with ENOSPC): a one-shot build gains nothing from the
# incremental cache (1 GiB here).
export CARGO_INCREMENTAL=0
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The DaemonSet image: its static release build runs here, outside nextest's per-test timeouts;
# installer/tests/image.rs and the node-in-a-box tests then reuse the archive.
image="$(./scripts/build-image.sh | tail -n 1)"
# Every binary of the workspace once (testkit's fake shim and fake systemd, installer): tests that
# need another package's binary take it from here instead of running a nested cargo build.
cargo build --workspace --bins --locked
NODED_TEST_IMAGE_ARCHIVE="$image" TESTKIT_BIN_DIR="${CARGO_TARGET_DIR:-$PWD/target}/debug" cargo nextest run --workspace --locked --profile ci
