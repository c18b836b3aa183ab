#!/usr/bin/env bash
# Builds the test guest: a Debian kernel and a busybox initramfs holding the
# kernel modules the tests load (uio, uio_pci_generic, ...).
# Usage: build-guest.sh DEST      (writes DEST/vmlinuz and DEST/initrd.img)
set -euo pipefail
dest=${1:?usage: build-guest.sh DEST}
here=$(cd "$(dirname "$0")" && pwd)

# The modules the guest's /init may load, in dependency order.
modules="uio uio_pci_generic virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk crc16 mbcache jbd2 crc32c_generic ext4"

if [ -f "$dest/.complete" ] && [ "$dest/.complete" -nt "$here/guest-init" ] \
        && [ "$dest/.complete" -nt "$0" ] && [ "$dest/.complete" -nt "$here/guest/ioport.c" ] \
        && [ "$dest/.complete" -nt "$here/build-guest-module.sh" ] \
        && [ -z "$(find "$here/guest" -newer "$dest/.complete" -type f)" ]; then
    echo "guest: already built in $dest"
    exit 0
fi
mkdir -p "$dest/debs"
cd "$dest/debs"

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
if ! ls "${kpkg}"_*.deb >/dev/null 2>&1; then
    echo "guest: downloading $kpkg"
    apt-get download "$kpkg" >/dev/null
fi
if ! ls busybox-static_*.deb >/dev/null 2>&1; then
    apt-get download busybox-static >/dev/null
fi
rm -rf ../kernel ../bb ../initrd
dpkg-deb -x "${kpkg}"_*.deb ../kernel
dpkg-deb -x busybox-static_*.deb ../bb
cd ..
kver=${kpkg#linux-image-}
echo "$kver" > kernel-version
cp "kernel/boot/vmlinuz-$kver" vmlinuz

root=initrd
mkdir -p $root/bin $root/sbin $root/proc $root/sys $root/dev $root/tmp $root/lib/modules
cp bb/bin/busybox $root/bin/busybox
for applet in $(bb/bin/busybox --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$root/bin/$applet"
done
for m in $modules; do
    f=$(find "kernel/lib/modules/$kver" -name "$m.ko*" | head -n1)
    [ -n "$f" ] || { echo "guest: module $m not found in $kpkg" >&2; exit 1; }
    case "$f" in
        *.xz) xz -dc "$f" > "$root/lib/modules/$m.ko" ;;
        *.zst) zstd -qdc "$f" > "$root/lib/modules/$m.ko" ;;
        *) cp "$f" "$root/lib/modules/$m.ko" ;;
    esac
done
echo "$modules" > $root/lib/modules/order
# The project's own modules (provision/guest/ivshmem_msix, provision/guest/edu_irq),
# built against this kernel.
for own in ivshmem_msix edu_irq; do
    "$here/build-guest-module.sh" "$kver" "$own.ko"
    cp "$own.ko" $root/lib/modules/
done
install -m 0755 "$here/guest-init" $root/init
# Guest tools of our own, static so that busybox's libc-less root runs them.
gcc -static -O2 -o $root/bin/ioport "$here/guest/ioport.c"
gcc -static -O2 -o $root/bin/memwrite "$here/guest/memwrite.c"
gcc -static -O2 -Wall -o $root/bin/edu_check "$here/guest/edu_check.c"
gcc -static -O2 -Wall -o $root/bin/mmio_bench "$here/guest/mmio_bench.c"
# Replaced atomically: a QEMU starting meanwhile reads the old or the new one.
(cd $root && find . | cpio -o -H newc --quiet) | gzip -1 > initrd.img.tmp
mv initrd.img.tmp initrd.img
rm -rf kernel bb
touch .complete
echo "guest: kernel $kver, initramfs $(du -h initrd.img | cut -f1) in $dest"
