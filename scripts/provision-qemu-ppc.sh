#!/usr/bin/env bash
# Unpacks qemu-system-ppc 11.1 (Debian trixie-backports: qemu-system-ppc64 for
# the pseries machine) with its libraries into a folder, without a chroot, by
# the same route as scripts/provision-qemu.sh.  Used by the sPAPR DRC tests.
# Usage: scripts/provision-qemu-ppc.sh DEST
set -euo pipefail
dest=${1:?usage: provision-qemu-ppc.sh DEST}

if [ -x "$dest/usr/bin/qemu-system-ppc64" ] && [ -f "$dest/.complete" ]; then
    echo "qemu-ppc: already provisioned in $dest"
    exit 0
fi
command -v mmdebstrap >/dev/null || {
    echo "qemu-ppc: mmdebstrap is missing; run 'make setup' (it installs host packages first)" >&2
    exit 1
}
rm -rf "$dest" "$dest.tmp"
mkdir -p "$(dirname "$dest")"
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
mirror=${mirror:-http://deb.debian.org/debian}
echo "qemu-ppc: unpacking qemu-system-ppc from trixie-backports into $dest (about 15 s)"
unpack() {
    mmdebstrap --variant=extract --mode="$1" --quiet \
        --aptopt='APT::Default-Release "trixie-backports"' \
        --aptopt='Acquire::Check-Valid-Until "false"' \
        --include=qemu-system-ppc \
        trixie "$dest.tmp" \
        "deb $mirror trixie main" "deb $mirror trixie-backports main"
}
unpack unshare || { rm -rf "$dest.tmp"; unpack root; }
touch "$dest.tmp/.complete"
mv "$dest.tmp" "$dest"
echo "qemu-ppc: done"
