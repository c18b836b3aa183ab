#!/usr/bin/env bash
# Builds the test guest: a Debian kernel and a busybox initramfs whose /init
# (guest-init) loads the drivers of every device `qbackend run` attaches.
# The work, downloaded packages included, happens in DEST.tmp, which is
# removed at the end; DEST receives only the finished files, each by rename.
# Usage: build-guest.sh DEST      (writes DEST/vmlinuz and DEST/initrd.img)
set -euo pipefail
dest=${1:?usage: build-guest.sh DEST}
here=$(cd "$(dirname "$0")" && pwd)

# Loaded by /init, in dependency order (a module before those that use its
# symbols): virtio-blk over virtio-pci, ext4 (crc32c for host-made ext4 with
# metadata_csum), uio, and the project's ivshmem_msix.
boot_modules="virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk
crc16 mbcache jbd2 crc32c_generic ext4 uio uio_pci_generic ivshmem_msix"
# The project's own modules (provision/guest/NAME), built against the guest kernel;
# edu_irq is shipped but not loaded at boot (its tests choose its mode=).
own_modules="ivshmem_msix edu_irq"
tools="ioport memwrite edu_check mmio_bench lspci"

if [ -f "$dest/.complete" ] && [ "$dest/.complete" -nt "$here/guest-init" ] \
        && [ "$dest/.complete" -nt "$0" ] && [ "$dest/.complete" -nt "$here/build-guest-module.sh" ] \
        && [ -z "$(find "$here/guest" -newer "$dest/.complete" -type f)" ]; then
    echo "guest: already built in $dest"
    exit 0
fi
work="$dest.tmp"
rm -rf "$work"
mkdir -p "$work/debs"
cd "$work/debs"

# linux-image-amd64 is a meta-package; it names the real kernel package.
resolve_kernel() {
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -n1
}
kpkg=$(resolve_kernel)
if [ -z "$kpkg" ]; then
    echo "guest: apt lists are empty; running apt-get update"
    apt-get update -qq
    kpkg=$(resolve_kernel)
fi
[ -n "$kpkg" ] || { echo "guest: cannot resolve linux-image-amd64 (is the Debian mirror reachable?)" >&2; exit 1; }
echo "guest: downloading $kpkg and busybox-static"
# As root, apt downloads as the user _apt, who may not reach DEST.tmp (and
# then warns); downloading as whoever runs this is enough for two packages.
apt-get -o APT::Sandbox::User="$(id -un)" download "$kpkg" busybox-static >/dev/null
dpkg-deb -x "${kpkg}"_*.deb ../kernel
dpkg-deb -x busybox-static_*.deb ../bb
cd ..
kver=${kpkg#linux-image-}
echo "$kver" > kernel-version
cp "kernel/boot/vmlinuz-$kver" vmlinuz

root=initrd
mkdir -p $root/bin $root/sbin $root/proc $root/sys $root/dev $root/tmp $root/mnt $root/lib/modules
cp bb/bin/busybox $root/bin/busybox
for applet in $(bb/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
# busybox's mke2fs makes ext2, which the kernel mounts with its ext4 driver;
# mkfs.ext2 is the name people try first.
printf '#!/bin/sh\nexec mke2fs "$@"\n' > $root/bin/mkfs.ext2
chmod 0755 $root/bin/mkfs.ext2
for own in $own_modules; do
    # A module built by an earlier run is reused when its sources have not changed.
    cp -p "$dest/$own.ko" "$dest/$own.ko.kver" . 2>/dev/null || true
    "$here/build-guest-module.sh" "$kver" "$own.ko"
    cp "$own.ko" $root/lib/modules/
done
for m in $boot_modules; do
    [ -f "$root/lib/modules/$m.ko" ] && continue
    f=$(find "kernel/lib/modules/$kver" -name "$m.ko*" | head -n1)
    [ -n "$f" ] || { echo "guest: module $m not found in $kpkg" >&2; exit 1; }
    case "$f" in
        *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
        *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
done
echo $boot_modules > $root/lib/modules/boot
install -m 0755 "$here/guest-init" $root/init
# Guest tools of our own, static so that busybox's libc-less root runs them.
for tool in $tools; do
    gcc -static -O2 -Wall -o "$root/bin/$tool" "$here/guest/$tool.c"
done
(cd $root && find . | cpio -o -H newc --quiet) | gzip -1 > initrd.img

# Into place, one rename per file: a QEMU starting meanwhile reads the old
# initramfs or the new one.  .complete last, so an interrupted move rebuilds.
mkdir -p "$dest"
rm -f "$dest/.complete"
for f in kernel-version vmlinuz $(for own in $own_modules; do echo "$own.ko $own.ko.kver"; done) initrd.img; do
    mv "$f" "$dest/$f"
done
touch "$dest/.complete"
# Left by earlier versions of this script, which kept the packages and the tree.
rm -rf "$dest/debs" "$dest/initrd"
cd "$dest"
rm -rf "$work"
echo "guest: kernel $kver, initramfs $(du -h initrd.img | cut -f1) in $dest"
