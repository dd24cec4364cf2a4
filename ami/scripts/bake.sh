#!/usr/bin/env bash
# Runs on the Packer build instance (root). All installation logic is `installer bake`; this script
# only fetches the tarball when it is a URL and cleans up after itself.
#
# $STAGING is the upload dir of the SSH user (ec2-user), not root's: nothing in it is executed or
# read as root in place. The binaries and the tarball are copied into a fresh root-owned 0700 dir
# first, so that user (or anything running as it) cannot swap them while root uses them. The
# installer itself opens the tarball once, refuses anything but a regular file, and hashes what it
# unpacks.
set -euo pipefail
umask 077

: "${STAGING:?}" "${KATA_TARBALL:?}" "${KATA_SHA256:?}"
# Checked before anything else happens: handler names only (the installer checks each name), so
# nothing but a comma-separated list reaches its command line.
case "${KATA_RUNTIMES:-}" in
  "")
    echo "bake.sh: KATA_RUNTIMES is empty: name at least one Kata handler (packer variable kata_runtimes)" >&2
    exit 2
    ;;
  *[!a-z0-9,-]*)
    echo "bake.sh: KATA_RUNTIMES may hold only a-z, 0-9, '-' and ',' (comma-separated handler names, packer variable kata_runtimes)" >&2
    exit 2
    ;;
esac
if [ -L "$STAGING" ] || [ ! -d "$STAGING" ]; then
    echo "bake.sh: $STAGING must be a directory (not a symlink)" >&2
    exit 2
fi
work="$(mktemp -d /root/noded-bake.XXXXXXXX)"
trap 'rm -rf "$work" "$STAGING"' EXIT
chmod 0700 "$work"

# cp --no-dereference + a regular-file check: a planted symlink or FIFO is refused, not followed.
take() {
    local from="$STAGING/$1" to="$work/$2" mode="$3"
    if [ -L "$from" ] || [ ! -f "$from" ]; then
        echo "bake.sh: $from must be a regular file" >&2
        exit 2
    fi
    cp --no-dereference --no-preserve=all "$from" "$to"
    chown root:root "$to"
    chmod "$mode" "$to"
}
take installer installer 0700
take noded noded 0755

case "$KATA_TARBALL" in
  https://*)
    tarball="$work/kata-static.tar"
    curl --fail --silent --show-error --location --retry 3 -o "$tarball" "$KATA_TARBALL"
    ;;
  */* | .*)
    echo "bake.sh: KATA_TARBALL must be a file name inside the upload dir or an https:// URL" >&2
    exit 2
    ;;
  *)
    take "$KATA_TARBALL" kata-static.tar 0600
    tarball="$work/kata-static.tar"
    ;;
esac

# The guest of noded's own template pool, built on a Debian host by `noded guest-assets --out DIR`
# (this AL2023 builder has no apt, and a node never downloads one): installed and pinned by sha256.
guest_args=()
if [ -n "${GUEST_ASSETS:-}" ]; then
    case "$GUEST_ASSETS" in
      */* | .*)
        echo "bake.sh: GUEST_ASSETS must be a directory name inside the upload dir" >&2
        exit 2
        ;;
    esac
    if [ -L "$STAGING/$GUEST_ASSETS" ] || [ ! -d "$STAGING/$GUEST_ASSETS" ]; then
        echo "bake.sh: $STAGING/$GUEST_ASSETS must be a directory (not a symlink)" >&2
        exit 2
    fi
    mkdir -m 0700 "$work/guest"
    for f in vmlinux initrd.cpio guest-assets.json; do
        take "$GUEST_ASSETS/$f" "guest/$f" 0600
    done
    guest_args=(--guest-assets "$work/guest")
fi

# Hashes while unpacking into a private staging dir; exit 2 (and nothing installed) on a bad tarball
# or guest directory.
cd "$work"
./installer bake --kata-tarball "$tarball" --sha256 "$KATA_SHA256" --noded-binary ./noded --mode kubernetes \
    --runtimes "$KATA_RUNTIMES" "${guest_args[@]}"

# Informational on the build instance: prints the table into the Packer log. Blockers here (e.g. the
# containerd config nodeadm writes only at node boot) are expected and must not fail the bake.
/usr/local/bin/installer check || true
cd /
