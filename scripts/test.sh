#!/usr/bin/env bash
# Runs every test of the project against the real components (containerd 1.6 + runc, QEMU, Prometheus,
# promtool, packer, kubectl kustomize + kubernetes-validate); only the Kubernetes API server is faked.
# As root on Debian 12. This is what .ci/run runs. Under CI=true a missing component fails its test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo nextest run --workspace --locked --profile ci
