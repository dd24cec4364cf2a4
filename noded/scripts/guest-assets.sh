#!/bin/sh
# Builds noded's guest (Debian generic kernel as an uncompressed vmlinux + a busybox-static initramfs)
# from Debian packages only, cached under daemon.data_dir (default config: ./.noded-data/guest).
# Run as root on Debian 12. Usage: noded/scripts/guest-assets.sh [--config FILE]
set -eu
if [ "$(id -u)" != 0 ]; then
    echo "guest-assets.sh: run as root (template tmpfs mounts and apt need it)" >&2
    exit 2
fi
missing=""
command -v qemu-system-x86_64 >/dev/null || missing="$missing qemu-system-x86"
command -v xz >/dev/null || missing="$missing xz-utils"
command -v dpkg-deb >/dev/null || missing="$missing dpkg"
if [ -n "$missing" ]; then
    apt-get update -q
    # shellcheck disable=SC2086
    apt-get install -y --no-install-recommends $missing
fi
# Kernel and busybox are fetched with `apt-get download` by noded itself (never from elsewhere).
if [ -z "$(ls /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then
    apt-get update -q
fi
here=$(cd "$(dirname "$0")/../.." && pwd)
if [ -n "${NODED:-}" ]; then
    exec "$NODED" template assets "$@"
elif command -v noded >/dev/null; then
    exec noded template assets "$@"
else
    cd "$here" && exec cargo run --quiet --release -p noded -- template assets "$@"
fi
