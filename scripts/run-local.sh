#!/usr/bin/env bash
# The main job, locally: installs what is missing, then runs `noded run` on the embedded default — a
# private containerd that noded starts and configures itself, a real QEMU template pool (guest kernel
# and initramfs built from Debian packages on first start), /metrics on 127.0.0.1:9464, the gRPC API on
# ./.noded-data/run/noded.sock (`noded status --socket ...`). Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
# `cargo run` finds the binary wherever the target dir is (CARGO_TARGET_DIR included).
exec cargo run --release --locked --quiet -p noded -- run "$@"
