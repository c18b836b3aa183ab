"""`qbackend run --disk`: the main job with the storage half of the mission,
over NBD (virtio-blk-pci on QEMU's NBD client) and over vhost-user
(vhost-user-blk-pci): the guest sees the disk as /dev/vda, makes a
filesystem and writes a file; after the guest powers off, qbackend's own QED
reader returns the file and qemu-img check is clean."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from qed_tools import qemu_check, qemu_img

from qbackend.block.qed import QedImage
from qbackend.machine.console import GuestConsole
from qbackend.testing.harness import GuestShell, start_qbackend

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
SIZE = 64 << 20
# The guest's kernel has virtio as modules; this order loads (guest-devices-and-tools.md).
VIRTIO_BLK_MODULES = ("virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci",
                      "virtio_blk", "crc16", "mbcache", "jbd2", "crc32c_generic", "ext4")


@pytest.mark.parametrize("via", ["nbd", "vhost-user"])
def test_run_with_a_qed_disk(tmp_path: Path, via: str) -> None:
    disk = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", str(disk), str(SIZE))
    workdir = tmp_path / "run"
    proc, lines = start_qbackend(["run", "--workdir", str(workdir), "--disk", f"image={disk},format=qed,via={via}"],
                                 REPO)
    try:
        shown = "export disk0:" if via == "nbd" else "vhost-user-blk disk0:"
        assert any(shown in line for line in lines), "".join(lines)
        with GuestConsole(workdir / "qemu-serial.sock") as console:
            console.wait_ready(timeout=90)
            shell = GuestShell(console)
            shell.sh("(for m in " + " ".join(VIRTIO_BLK_MODULES) + "; do insmod /lib/modules/$m.ko || exit 1; done)")
            shell.wait_guest("[ -b /dev/vda ]", 10)
            assert shell.sh("cat /sys/block/vda/size") == str(SIZE // 512)
            shell.sh("mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt")
            shell.sh("echo 'written by the guest of qbackend run' > /mnt/run.txt && sync && umount /mnt")
            console.send("poweroff -f\n")  # QEMU ends with the guest (-no-reboot); so does qbackend run
            rest, _ = proc.communicate(timeout=60)  # the console stays connected until QEMU has gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "QEMU exited" in rest and "stopped" in rest
    raw = tmp_path / "disk.raw"
    with QedImage.open_path(disk, read_only=True) as image:
        raw.write_bytes(image.read(0, image.image_size))
    text = subprocess.run(["debugfs", "-R", "cat /run.txt", str(raw)], capture_output=True, timeout=60).stdout
    assert text == b"written by the guest of qbackend run\n"
    assert qemu_check(disk)[0] == 0
