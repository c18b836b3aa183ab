#!/usr/bin/env bash
# Installs the Debian packages the build needs, only those that are missing.
# A run with everything present does no apt work at all.
set -euo pipefail
packages="mmdebstrap busybox-static libnbd-bin python3-libnbd fio e2fsprogs cpio gzip xz-utils zstd device-tree-compiler gcc libc6-dev"

missing=""
for p in $packages; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    [ "$status" = "install ok installed" ] || missing="$missing $p"
done
[ -z "$missing" ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "host packages: installing$missing"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing
