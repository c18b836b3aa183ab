#!/usr/bin/env bash
# Builds one of the project's guest kernel modules (provision/guest/NAME, where
# NAME is OUT.ko's name without .ko: ivshmem_msix, edu_irq) against the
# Debian headers of the guest kernel, installing linux-headers-KVER when it
# is missing.  The kernel image and the headers must come from the same
# package version, so KVER is the guest's (build/guest/kernel-version).
# Usage: build-guest-module.sh KVER OUT.ko
set -euo pipefail
kver=${1:?usage: build-guest-module.sh KVER OUT.ko}
out=${2:?usage: build-guest-module.sh KVER OUT.ko}
here=$(cd "$(dirname "$0")" && pwd)
name=$(basename "$out" .ko)
src="$here/guest/$name"
[ -f "$src/Kbuild" ] || { echo "guest module: no sources in $src" >&2; exit 1; }
headers="/usr/src/linux-headers-$kver"

if [ -f "$out" ] && [ -z "$(find "$src" -newer "$out" -type f)" ] && [ "$out" -nt "$0" ] \
        && [ "$(cat "$out.kver" 2>/dev/null)" = "$kver" ]; then
    exit 0
fi
if [ ! -f "$headers/Makefile" ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "guest module: installing linux-headers-$kver"
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "linux-headers-$kver" >/dev/null; then
        $sudo apt-get update -qq
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "linux-headers-$kver"
    fi
fi
# Build in a scratch copy: kbuild writes its objects beside the sources.
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$src"/*.c "$src"/Kbuild "$work"/
make -s -C "$headers" M="$work" modules 2>&1 | grep -v 'Skipping BTF generation' || true
[ -f "$work/$name.ko" ] || { echo "guest module: build failed" >&2; exit 1; }
mkdir -p "$(dirname "$out")"
strip --strip-debug -o "$out.tmp" "$work/$name.ko"
mv "$out.tmp" "$out"
echo "$kver" > "$out.kver"
echo "guest module: $(basename "$out") for $kver"
