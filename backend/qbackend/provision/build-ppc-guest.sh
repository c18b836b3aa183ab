#!/usr/bin/env bash
# Builds the ppc64le test guest for the pseries differential: Debian trixie's
# powerpc64le kernel (its vmlinux) and busybox-static (ppc64el), packed with
# ppc-guest/init and ppc-guest/rtas.c (cross-compiled, static) into an
# initramfs.  apt runs with a configuration of its own under DEST.tmp (the
# host's sources and package lists are not touched); the cross compiler,
# gcc-powerpc64le-linux-gnu, is installed when missing.  DEST receives
# vmlinux, initrd.img and kernel-version, each by rename.
# Usage: build-ppc-guest.sh DEST
set -euo pipefail
dest=$(realpath -m "${1:?usage: build-ppc-guest.sh DEST}")
here=$(cd "$(dirname "$0")" && pwd)
if [ -f "$dest/.complete" ] && [ "$dest/.complete" -nt "$0" ] \
        && [ -z "$(find "$here/ppc-guest" -newer "$dest/.complete" -type f)" ]; then
    echo "ppc-guest: already built in $dest"
    exit 0
fi
cc=powerpc64le-linux-gnu-gcc
if ! command -v $cc >/dev/null; then
    echo "ppc-guest: installing gcc-powerpc64le-linux-gnu"
    sudo=""; [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get install -y -q gcc-powerpc64le-linux-gnu >/dev/null
fi
work="$dest.tmp"
rm -rf "$work"
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial" "$work/debs"
mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
mirror=${mirror:-http://deb.debian.org/debian}
echo "deb [arch=ppc64el] $mirror trixie main" > "$work/apt/sources.list"
cat > "$work/apt/apt.conf" <<CONF
Dir::Etc::SourceList "$work/apt/sources.list";
Dir::Etc::SourceParts "/nonexistent";
Dir::State::Lists "$work/apt/lists";
Dir::Cache "$work/apt/cache";
Dir::State::status "/dev/null";
APT::Architecture "ppc64el";
APT::Architectures "ppc64el";
Acquire::Check-Valid-Until "false";
Acquire::Languages "none";
APT::Sandbox::User "$(id -un)";
CONF
export APT_CONFIG="$work/apt/apt.conf"
apt-get update -qq
cd "$work/debs"
# The meta-package names the newest kernel; a mirror may lack its file, so
# older builds of the same series are tried next, newest first.
{ apt-cache depends linux-image-powerpc64le | sed -n 's/^ *Depends: \(linux-image-.*-powerpc64le\)$/\1/p'
  apt-cache search --names-only '^linux-image-[0-9].*-powerpc64le$' | cut -d' ' -f1 | sort -rV; } > candidates
kpkg=""
while read -r p; do
    if apt-get download -qq "$p" >/dev/null 2>&1; then kpkg=$p; break; fi
done < candidates
[ -n "$kpkg" ] || { echo "ppc-guest: no powerpc64le kernel could be downloaded" >&2; exit 1; }
apt-get download -qq busybox-static >/dev/null
echo "ppc-guest: $kpkg and busybox-static"
dpkg-deb -x "${kpkg}"_*.deb ../kernel
dpkg-deb -x busybox-static_*.deb ../bb
cd ..
kver=${kpkg#linux-image-}
echo "$kver" > kernel-version
cp "kernel/boot/vmlinux-$kver" vmlinux
root=initrd
mkdir -p $root/bin $root/proc $root/sys $root/dev $root/tmp
cp "$(ls bb/usr/bin/busybox bb/bin/busybox 2>/dev/null | head -n1)" $root/bin/busybox
# The busybox is for another CPU: its applet list cannot be asked for here.
for applet in sh mount umount echo cat ls sleep setsid grep head tail sed awk cut tr od hexdump \
        printf test [ wc find poweroff reboot mkdir rm cp dmesg uname true false; do
    ln -sf busybox "$root/bin/$applet"
done
$cc -static -O2 -Wall -o $root/bin/rtas "$here/ppc-guest/rtas.c"
install -m 0755 "$here/ppc-guest/init" $root/init
(cd $root && find . | cpio -o -H newc --quiet) | gzip -1 > initrd.img
mkdir -p "$dest"
rm -f "$dest/.complete"
for f in kernel-version vmlinux initrd.img; do mv "$f" "$dest/$f"; done
touch "$dest/.complete"
cd "$dest"
rm -rf "$work"
echo "ppc-guest: kernel $kver, initramfs $(du -h initrd.img | cut -f1) in $dest"
