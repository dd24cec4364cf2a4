#!/usr/bin/env bash
# Runs on the Packer build instance (root). All installation logic is `installer bake`; this script
# only fetches the tarball when it is a URL and cleans up after itself.
set -euo pipefail

: "${STAGING:?}" "${KATA_TARBALL:?}" "${KATA_SHA256:?}"
cd "$STAGING"
chmod 0755 installer noded

case "$KATA_TARBALL" in
  https://*)
    tarball="$STAGING/kata-static.tar"
    curl --fail --silent --show-error --location --retry 3 -o "$tarball" "$KATA_TARBALL"
    ;;
  *)
    tarball="$STAGING/$KATA_TARBALL"
    ;;
esac

# Verifies the sha256 before extracting; exit 2 (and nothing installed) on a bad tarball.
./installer bake --kata-tarball "$tarball" --sha256 "$KATA_SHA256" --noded-binary ./noded --mode kubernetes

# Informational on the build instance: prints the table into the Packer log. Blockers here (e.g. the
# containerd config nodeadm writes only at node boot) are expected and must not fail the bake.
/usr/local/bin/installer check || true

cd /
rm -rf "$STAGING"
