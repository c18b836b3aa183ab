"""vhost-user-blk options against a real QEMU 11.1 and a booted guest (issue 30).

Two disks of one guest, each a QED image served by qbackend:

- vda, `logical-block-size=4096`: the guest's queue says 4096, and a
  filesystem made, written and read back on it is sound;
- vdb, QEMU's `vhost-user-blk-pci,packed=on`: the rings are packed
  (VIRTIO_F_RING_PACKED negotiated, served by the Python model's
  PackedVirtqueue), and the same filesystem work is sound.

The guest makes ext2 with busybox's mke2fs and mounts it as ext4 (which
reads ext2); files are written, synced, the page cache dropped, and read
back; on the host qemu-img check finds both images clean.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from qed_tools import qemu_check, qemu_img

from qbackend.app.service import Backend
from qbackend.models.virtqueue import PackedVirtqueue, SplitVirtqueue
from qbackend.options import VhostUserBlkOptions
from qbackend.testing.harness import Guest, Harness, wait_until

pytestmark = pytest.mark.guest

SIZE = 64 << 20


@dataclass
class Rig:
    guest: Guest
    backend: Backend
    big_block: Path
    packed: Path

    def sh(self, cmd: str, timeout: float = 120) -> str:
        return self.guest.sh(cmd, timeout)


@pytest.fixture(scope="module")
def rig(harness: Harness) -> Iterator[Rig]:
    work = harness.workdir
    big_block, packed = work / "block4k.qed", work / "packed.qed"
    for image in (big_block, packed):
        qemu_img("create", "-f", "qed", str(image), str(SIZE))
    backend = Backend()
    backend.add_vhost_user_blk(VhostUserBlkOptions(socket=work / "vub0.sock", image=big_block, format="qed",
                                                   id="vub0", logical_block_size=4096))
    backend.add_vhost_user_blk(VhostUserBlkOptions(socket=work / "vub1.sock", image=packed, format="qed",
                                                   id="vub1"))
    harness.serve(backend)
    guest = harness.guest("vubopt", smp=1, extra_args=[
        "-chardev", f"socket,id=vub0,path={work / 'vub0.sock'}",
        "-device", "vhost-user-blk-pci,chardev=vub0,id=vblk0,num-queues=1,addr=0x10",
        "-chardev", f"socket,id=vub1,path={work / 'vub1.sock'}",
        "-device", "vhost-user-blk-pci,chardev=vub1,id=vblk1,num-queues=1,packed=on,addr=0x11"])
    yield Rig(guest, backend, big_block, packed)


def _filesystem_round_trip(rig: Rig, dev: str) -> None:
    rig.sh(f"mke2fs -F -b 4096 {dev}")  # 4 KiB blocks: a filesystem block may not be smaller than the disk's
    rig.sh(f"mkdir -p /mnt/t && mount -t ext4 {dev} /mnt/t")
    rig.sh("echo 'hello over vhost-user' > /mnt/t/hello.txt")
    rig.sh("dd if=/dev/urandom of=/tmp/blob bs=64k count=40 2>/dev/null && cp /tmp/blob /mnt/t/blob && sync")
    want = rig.sh("md5sum /tmp/blob").split()[0]
    rig.sh("umount /mnt/t && echo 3 > /proc/sys/vm/drop_caches")
    rig.sh(f"mount -t ext4 {dev} /mnt/t")
    assert rig.sh("cat /mnt/t/hello.txt") == "hello over vhost-user"
    assert rig.sh("md5sum /mnt/t/blob").split()[0] == want
    rig.sh("umount /mnt/t")


def _device(rig: Rig, slot: str) -> str:
    found = rig.sh(f"for b in /sys/block/vd*; do readlink $b | grep -q 0000:00:{slot}.0/ && basename $b; done; true")
    assert found, rig.sh("ls -l /sys/block/; true")
    return found.split()[0]


def test_logical_block_size_4096(rig: Rig) -> None:
    rig.guest.wait_guest("ls /sys/block/ | grep -q vd", 30)
    dev = _device(rig, "10")
    assert rig.sh(f"cat /sys/block/{dev}/queue/logical_block_size") == "4096"
    assert rig.sh(f"cat /sys/block/{dev}/size") == str(SIZE // 512)
    _filesystem_round_trip(rig, f"/dev/{dev}")
    server = rig.backend.blocks.vhost["vub0"].server
    conn = server.connection
    assert conn is not None and isinstance(conn.queues[0].vq, SplitVirtqueue)
    stats = server.stats
    assert stats["broken_queues"] == 0 and stats["protocol_errors"] == 0, stats
    assert qemu_check(rig.big_block)[0] == 0


def test_packed_rings(rig: Rig) -> None:
    rig.guest.wait_guest("ls /sys/block/ | grep -q vd", 30)
    dev = _device(rig, "11")
    server = rig.backend.blocks.vhost["vub1"].server
    wait_until(lambda: server.connection is not None, 10, "the packed disk's front end")
    conn = server.connection
    assert conn is not None and isinstance(conn.queues[0].vq, PackedVirtqueue)
    _filesystem_round_trip(rig, f"/dev/{dev}")
    stats = server.stats
    assert stats["requests"] > 20 and stats["broken_queues"] == 0 and stats["protocol_errors"] == 0, stats
    assert stats["native_requests"] == 0  # the native path serves split rings only
    assert qemu_check(rig.packed)[0] == 0
