#!/usr/bin/env bash
# Unpacks a QEMU 11.1 from Debian trixie-backports, with its libraries, into
# a folder, without a chroot: binaries run through the folder's own dynamic
# loader (qbackend.machine.launch).  The unpacking goes to DEST.tmp, renamed
# to DEST once complete.
# Usage: provision-qemu.sh DEST PACKAGES BINARY
#   DEST      the folder (build/qemu, build/qemu-ppc)
#   PACKAGES  comma-separated Debian packages (qemu-system-x86,qemu-utils,...)
#   BINARY    a program that must be there afterwards (qemu-system-x86_64)
set -euo pipefail
dest=${1:?usage: provision-qemu.sh DEST PACKAGES BINARY}
packages=${2:?usage: provision-qemu.sh DEST PACKAGES BINARY}
binary=${3:?usage: provision-qemu.sh DEST PACKAGES BINARY}
name=$(basename "$dest")

if [ -x "$dest/usr/bin/$binary" ] && [ -f "$dest/.complete" ]; then
    echo "$name: already provisioned in $dest"
    exit 0
fi
command -v mmdebstrap >/dev/null || {
    echo "$name: mmdebstrap is missing; run 'make setup' (it installs host packages first)" >&2
    exit 1
}
rm -rf "$dest.tmp"
mkdir -p "$(dirname "$dest")"
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
mirror=${mirror:-http://deb.debian.org/debian}
echo "$name: unpacking $packages from trixie-backports into $dest (about 15 s)"
unpack() {
    # The mirror is a frozen snapshot: its Release files have expired.
    mmdebstrap --variant=extract --mode="$1" --quiet \
        --aptopt='APT::Default-Release "trixie-backports"' \
        --aptopt='Acquire::Check-Valid-Until "false"' \
        --include="$packages" \
        trixie "$dest.tmp" \
        "deb $mirror trixie main" "deb $mirror trixie-backports main"
}
unpack unshare || { rm -rf "$dest.tmp"; unpack root; }
[ -x "$dest.tmp/usr/bin/$binary" ] || { echo "$name: $binary is missing after unpacking" >&2; exit 1; }
touch "$dest.tmp/.complete"
rm -rf "$dest"
mv "$dest.tmp" "$dest"
echo "$name: done"
