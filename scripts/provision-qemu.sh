#!/usr/bin/env bash
# Unpacks QEMU 11.1 (Debian trixie-backports) with its libraries into a folder,
# without a chroot: binaries run through the folder's own dynamic loader.
# Usage: scripts/provision-qemu.sh DEST
set -euo pipefail
dest=${1:?usage: provision-qemu.sh DEST}

if [ -x "$dest/usr/bin/qemu-system-x86_64" ] && [ -f "$dest/.complete" ]; then
    echo "qemu: already provisioned in $dest"
    exit 0
fi
command -v mmdebstrap >/dev/null || {
    echo "qemu: mmdebstrap is missing; run 'make setup' (it installs host packages first)" >&2
    exit 1
}
rm -rf "$dest" "$dest.tmp"
mkdir -p "$(dirname "$dest")"
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
mirror=${mirror:-http://deb.debian.org/debian}
echo "qemu: unpacking qemu-system-x86 and qemu-utils from trixie-backports into $dest (about 15 s)"
mmdebstrap --variant=extract --mode=unshare --quiet \
    --aptopt='APT::Default-Release "trixie-backports"' \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --include=qemu-system-x86,qemu-utils,qemu-block-extra \
    trixie "$dest.tmp" \
    "deb $mirror trixie main" "deb $mirror trixie-backports main" \
  || mmdebstrap --variant=extract --mode=root --quiet \
    --aptopt='APT::Default-Release "trixie-backports"' \
    --aptopt='Acquire::Check-Valid-Until "false"' \
    --include=qemu-system-x86,qemu-utils,qemu-block-extra \
    trixie "$dest.tmp" \
    "deb $mirror trixie main" "deb $mirror trixie-backports main"
touch "$dest.tmp/.complete"
mv "$dest.tmp" "$dest"
echo "qemu: done"
