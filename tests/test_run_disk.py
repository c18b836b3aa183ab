"""`qbackend run --disk`: the main job with the storage half of the mission,
over NBD (virtio-blk-pci on QEMU's NBD client) and over vhost-user
(vhost-user-blk-pci): the guest has /dev/vda as soon as its shell is ready
(its /init loads the drivers and waits for the disk), lists the disk with
lspci, makes a filesystem and writes a file; after the guest powers off,
qbackend's own QED reader returns the file and qemu-img check is clean."""

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
VIRTIO_BLK_IDS = ("1af4:1001", "1af4:1042")  # transitional and modern; vhost-user-blk-pci is the same device


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
            # No waiting and no insmod: a block device (a `dd of=/dev/vda` into a
            # missing one would make a regular file in devtmpfs).
            assert shell.sh("[ -b /dev/vda ] && echo block") == "block"
            assert shell.sh("cat /sys/block/vda/size") == str(SIZE // 512)
            listed = shell.sh("lspci").splitlines()
            assert any(line.startswith("00:00.0 0600: ") for line in listed), listed  # the host bridge
            disks = [line for line in listed if line.split()[-1] in VIRTIO_BLK_IDS]
            assert len(disks) == 1 and disks[0].split()[1] == "0100:", listed  # a SCSI-class storage function
            assert shell.sh("[ -e /sys/module/ivshmem_msix ] && echo loaded") == "loaded"
            shell.sh("mkfs.ext2 -q /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt")
            shell.sh("echo 'written by the guest of qbackend run' > /mnt/run.txt && sync && umount /mnt")
            shell.sh("mount -t ext4 /dev/vda /mnt")
            assert shell.sh("cat /mnt/run.txt") == "written by the guest of qbackend run"
            shell.sh("umount /mnt")
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
