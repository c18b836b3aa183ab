"""QED images served by qbackend over NBD to a real QEMU and a booted guest:
a cold-plugged virtio-blk disk that the guest formats and fills, and a
second disk hot-added and removed over QMP.  The host reads the results
back through qbackend's own QED reader and qemu-img checks the images."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qbackend.app.service import Backend
from qbackend.block.qed import QedImage
from qbackend.machine.launch import QemuInstall, find_qemu
from qbackend.machine.qmp import SyncQmp
from qbackend.options import NbdExportOptions
from qbackend.testing.harness import Guest, Harness

pytestmark = pytest.mark.guest

SIZE = 64 << 20


@dataclass
class Rig:
    qemu: QemuInstall
    guest: Guest
    qmp: SyncQmp
    socket: Path
    disk: Path
    hot: Path

    def sh(self, cmd: str, timeout: float = 60) -> str:
        return self.guest.sh(cmd, timeout)

    def qemu_img(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.qemu.tool_cmd("qemu-img"), *args], capture_output=True, text=True,
                              env=self.qemu.env(), timeout=120)


def read_with_our_reader(image: Path, dest: Path) -> bytes:
    with QedImage.open_path(image, read_only=True) as img:
        data = img.read(0, img.image_size)
    dest.write_bytes(data)
    return data


@pytest.fixture(scope="module")
def rig(harness: Harness) -> Iterator[Rig]:
    work = harness.workdir
    qemu = find_qemu()
    disk, hot = work / "disk.qed", work / "hot.qed"
    for image in (disk, hot):
        subprocess.run([*qemu.tool_cmd("qemu-img"), "create", "-f", "qed", str(image), str(SIZE)],
                       check=True, capture_output=True, env=qemu.env())
    sock = work / "nbd.sock"
    backend = Backend()
    backend.add_nbd([NbdExportOptions.parse(f"name=disk,image={disk},format=qed"),
                     NbdExportOptions.parse(f"name=hot,image={hot},format=qed")], sock)
    blockdev = {"driver": "nbd", "node-name": "nbd0", "server": {"type": "unix", "path": str(sock)},
                "export": "disk"}
    harness.serve(backend)
    guest = harness.guest(qemu=qemu, extra_args=["-blockdev", json.dumps(blockdev),
                                                 "-device", "virtio-blk-pci,drive=nbd0,id=vblk0"])
    yield Rig(qemu, guest, guest.monitor(), sock, disk, hot)


def test_guest_makes_a_filesystem_on_the_nbd_disk_and_the_host_reads_it(rig: Rig, tmp_path: Path) -> None:
    rig.sh("for i in $(seq 50); do [ -b /dev/vda ] && break; usleep 100000; done; [ -b /dev/vda ]")
    assert rig.sh("cat /sys/block/vda/size") == str(SIZE // 512)
    rig.sh("mke2fs -q /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt")
    rig.sh("echo 'hello from the guest over qbackend nbd' > /mnt/hello.txt")
    rig.sh("dd if=/dev/urandom of=/mnt/blob bs=64k count=8 2>/dev/null")
    guest_md5 = rig.sh("md5sum /mnt/blob").split()[0]
    rig.sh("sync && umount /mnt")
    raw = tmp_path / "disk.raw"
    read_with_our_reader(rig.disk, raw)
    hello = subprocess.run(["debugfs", "-R", "cat /hello.txt", str(raw)], capture_output=True, timeout=60)
    assert hello.stdout == b"hello from the guest over qbackend nbd\n"
    blob = subprocess.run(["debugfs", "-R", "cat /blob", str(raw)], capture_output=True, timeout=60).stdout
    assert len(blob) == 512 * 1024 and hashlib.md5(blob).hexdigest() == guest_md5
    check = rig.qemu_img("check", "-f", "qed", str(rig.disk))
    assert check.returncode == 0, check.stdout + check.stderr
    fsck = subprocess.run(["e2fsck", "-fn", str(raw)], capture_output=True, text=True, timeout=60)
    assert fsck.returncode == 0, fsck.stdout


def test_disk_hot_added_used_and_removed_over_qmp(rig: Rig, tmp_path: Path) -> None:
    rig.qmp.execute("blockdev-add", {"driver": "nbd", "node-name": "nbd1",
                                     "server": {"type": "unix", "path": str(rig.socket)}, "export": "hot"})
    rig.qmp.execute("device_add", {"driver": "virtio-blk-pci", "drive": "nbd1", "id": "vblk1"})
    rig.sh("for i in $(seq 100); do [ -b /dev/vdb ] && break; usleep 100000; done; [ -b /dev/vdb ]")
    rig.sh("printf 'HOTPLUGGED-DISK-OK' | dd of=/dev/vdb bs=512 seek=2048 conv=fsync 2>/dev/null")
    rig.sh("dd if=/dev/zero bs=1M count=3 2>/dev/null | tr '\\000' '\\132' | dd of=/dev/vdb bs=1M seek=8 "
           "conv=fsync 2>/dev/null")
    assert rig.sh("dd if=/dev/vdb bs=512 skip=2048 count=1 2>/dev/null | head -c 18") == "HOTPLUGGED-DISK-OK"
    rig.qmp.execute("device_del", {"id": "vblk1"})
    rig.qmp.next_event("DEVICE_DELETED", data={"device": "vblk1"}, timeout=30)
    deadline = time.monotonic() + 10
    while True:
        try:
            rig.qmp.execute("blockdev-del", {"node-name": "nbd1"})
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    assert rig.sh("[ -b /dev/vdb ] && echo present || echo gone") == "gone"
    data = read_with_our_reader(rig.hot, tmp_path / "hot.raw")
    assert data[2048 * 512:2048 * 512 + 18] == b"HOTPLUGGED-DISK-OK"
    assert data[8 << 20:11 << 20] == b"Z" * (3 << 20)
    check = rig.qemu_img("check", "-f", "qed", str(rig.hot))
    assert check.returncode == 0, check.stdout + check.stderr
