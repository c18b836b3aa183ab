"""vhost-user-blk against a real QEMU 11.1 and a booted guest.

qbackend serves a QED image to `vhost-user-blk-pci` (guest RAM is a shared
memfd, so the virtqueues live in memory both processes map): the guest
sees /dev/vda with the image's size, makes ext4 (the host's mkfs.ext4,
added to the initramfs), writes files, syncs; on
the host qbackend's QED reader returns the files and qemu-img check is
clean, and the same image served over NBD reads identically.  A second
disk is exported at run time over qbackend's QMP monitor (blockdev-add,
block-export-add type=vhost-user-blk: the same commands given to
qemu-storage-daemon 11.1 are accepted there too, and query-block-exports
answers alike), hot-added and removed with QEMU's device_add / device_del,
then the export deleted; and a DIMM is hot-added while the disk is in use
(the ADD_MEM_REG path).
"""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from qed_tools import qemu_check, qemu_img

from qbackend.app.service import Backend
from qbackend.block.qed import QedImage
from qbackend.machine.guest_tools import with_host_programs
from qbackend.machine.launch import find_guest, find_qemu
from qbackend.machine.qmp import QmpError, SyncQmp
from qbackend.options import VhostUserBlkOptions
from qbackend.testing.harness import Guest, Harness, start_qbackend, wait_until

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
SIZE = 64 << 20
HOT_SIZE = 32 << 20


@dataclass
class Rig:
    guest: Guest
    qmp: SyncQmp
    backend: Backend
    disk: Path
    hot: Path
    hot_socket: Path
    control: Path  # qbackend's QMP monitor

    def sh(self, cmd: str, timeout: float = 60) -> str:
        return self.guest.sh(cmd, timeout)


@pytest.fixture(scope="module")
def rig(harness: Harness) -> Iterator[Rig]:
    work = harness.workdir
    disk, hot = work / "disk.qed", work / "hot.raw"
    qemu_img("create", "-f", "qed", str(disk), str(SIZE))
    qemu_img("create", "-f", "raw", str(hot), str(HOT_SIZE))
    sock, hot_sock = work / "vub0.sock", work / "vub1.sock"
    backend = Backend()
    backend.add_vhost_user_blk(VhostUserBlkOptions(socket=sock, image=disk, format="qed", id="vub0"))
    backend.enable_control(work / "qbackend-qmp.sock")
    harness.serve(backend)
    # The host's mkfs.ext4 (busybox's mke2fs makes only ext2).
    image = with_host_programs(find_guest(), ["mkfs.ext4"], work)
    guest = harness.guest("vub", smp=2, slots=2, maxmem="2G", guest=image, extra_args=[
        "-chardev", f"socket,id=vub0,path={sock}",
        "-device", "vhost-user-blk-pci,chardev=vub0,id=vblk0,num-queues=1"])
    yield Rig(guest, guest.monitor(), backend, disk, hot, hot_sock, work / "qbackend-qmp.sock")


def test_guest_makes_ext4_on_the_disk_and_the_host_reads_the_files(rig: Rig, tmp_path: Path) -> None:
    rig.guest.wait_guest("[ -b /dev/vda ]", 20)
    assert rig.sh("cat /sys/block/vda/size") == str(SIZE // 512)
    rig.sh("/usr/sbin/mkfs.ext4 -q -F /dev/vda && mkdir -p /mnt && mount -t ext4 /dev/vda /mnt")
    assert "ext4" in rig.sh("grep /mnt /proc/mounts")
    rig.sh("echo 'written over vhost-user' > /mnt/hello.txt")
    rig.sh("dd if=/dev/urandom of=/mnt/blob bs=64k count=48 2>/dev/null && sync")
    blob_sum = rig.sh("md5sum /mnt/blob").split()[0]
    rig.sh("umount /mnt")
    stats = rig.backend.blocks.vhost["vub0"].server.stats
    assert stats["requests"] > 0 and stats["protocol_errors"] == 0 and stats["broken_queues"] == 0

    raw = tmp_path / "disk.raw"
    with QedImage.open_path(rig.disk, read_only=True) as img:
        raw.write_bytes(img.read(0, img.image_size))

    def debugfs(path: str) -> bytes:
        return subprocess.run(["debugfs", "-R", f"cat {path}", str(raw)], capture_output=True, timeout=60).stdout

    assert debugfs("/hello.txt") == b"written over vhost-user\n"
    assert hashlib.md5(debugfs("/blob")).hexdigest() == blob_sum
    assert qemu_check(rig.disk)[0] == 0

    # The other front end of the same block layer: the image over NBD (a read-only
    # `qbackend nbd`), read by QEMU's own NBD client, is the same bytes.
    sock = tmp_path / "nbd.sock"
    proc, lines = start_qbackend(["nbd", "--socket", str(sock), "--export",
                                  f"name=disk,image={rig.disk},format=qed,readonly=on"], REPO, until="serving")
    try:
        via_nbd = tmp_path / "via-nbd.raw"
        qemu_img("convert", "-f", "raw", "-O", "raw", f"nbd+unix:///disk?socket={sock}", str(via_nbd))
        assert via_nbd.read_bytes() == raw.read_bytes(), "".join(lines)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


def _export_commands(image: Path, sock: Path) -> list[tuple[str, dict[str, object]]]:
    return [("blockdev-add", {"driver": "raw", "node-name": "hot", "file": {"driver": "file", "filename": str(image)}}),
            ("block-export-add", {"type": "vhost-user-blk", "id": "vub1", "node-name": "hot", "writable": True,
                                  "num-queues": 2, "addr": {"type": "unix", "path": str(sock)}})]


def test_runtime_export_over_qmp_then_hot_add_and_remove(rig: Rig, tmp_path: Path) -> None:
    qemu = find_qemu()
    qsd_monitor = tmp_path / "qsd.sock"
    ref_image = tmp_path / "ref.raw"
    qemu_img("create", "-f", "raw", str(ref_image), str(HOT_SIZE))
    qsd = subprocess.Popen([*qemu.tool_cmd("qemu-storage-daemon"), "--chardev",
                            f"socket,path={qsd_monitor},server=on,wait=off,id=m", "--monitor", "chardev=m"],
                           env=qemu.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ours = SyncQmp(rig.control)
    try:
        wait_until(qsd_monitor.exists, 30, "qemu-storage-daemon's monitor")
        theirs = SyncQmp(qsd_monitor)
        try:
            for (cmd, args), (_, ref_args) in zip(_export_commands(rig.hot, rig.hot_socket),
                                                  _export_commands(ref_image, tmp_path / "qsd-vub.sock")):
                assert ours.execute(cmd, args) == theirs.execute(cmd, ref_args) == {}, cmd
            listed = [e for e in ours.execute("query-block-exports") if e["id"] != "vub0"]  # vub0: the cold disk
            assert listed == theirs.execute("query-block-exports") == [
                {"type": "vhost-user-blk", "id": "vub1", "node-name": "hot", "shutting-down": False}]
        finally:
            theirs.close()
        server = rig.backend.blocks.vhost["vub1"].server
        rig.qmp.execute("chardev-add", {"id": "vub1", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": str(rig.hot_socket)}}, "server": False}}})
        rig.qmp.execute("device_add", {"driver": "vhost-user-blk-pci", "id": "vblk1", "chardev": "vub1",
                                       "num-queues": 2})
        rig.guest.wait_guest("[ -b /dev/vdb ]", 30)
        assert rig.sh("cat /sys/block/vdb/size") == str(HOT_SIZE // 512)
        rig.sh("dd if=/dev/urandom of=/tmp/pattern bs=4k count=64 2>/dev/null")
        # One queue per vCPU: writes from each CPU of the 2-vCPU guest go down that CPU's queue.
        rig.sh("taskset 1 dd if=/tmp/pattern of=/dev/vdb bs=4k seek=100 oflag=direct 2>/dev/null")
        rig.sh("taskset 2 dd if=/tmp/pattern of=/dev/vdb bs=4k seek=200 oflag=direct conv=fsync 2>/dev/null")
        want = rig.sh("md5sum /tmp/pattern").split()[0]
        for block in (100, 200):
            wait_until(lambda block=block: hashlib.md5(rig.hot.read_bytes()[block * 4096:(block + 64) * 4096])
                       .hexdigest() == want, 10, f"the guest's write at block {block} in the raw image")
        conn = server.connection
        assert conn is not None
        assert [q.requests > 0 for q in conn.queues] == [True, True], [q.requests for q in conn.queues]
        # DISCARD (blkdiscard) reaches the raw image: a hole, zeros read back.
        rig.sh(f"blkdiscard -o {100 * 4096} -l {64 * 4096} /dev/vdb")
        wait_until(lambda: rig.hot.read_bytes()[100 * 4096:164 * 4096] == bytes(64 * 4096), 10,
                   "zeros where the guest discarded")
        assert rig.sh("dd if=/dev/vdb bs=4k skip=100 count=64 iflag=direct 2>/dev/null | md5sum").split()[0] == \
            hashlib.md5(bytes(64 * 4096)).hexdigest()
        # While QEMU holds the export, mode=safe is refused (as for NBD clients).
        with pytest.raises(QmpError, match="still in use"):
            ours.execute("block-export-del", {"id": "vub1"})
        rig.qmp.execute("device_del", {"id": "vblk1"})
        rig.qmp.next_event("DEVICE_DELETED", data={"device": "vblk1"}, timeout=30)
        rig.qmp.execute("chardev-remove", {"id": "vub1"})
        wait_until(lambda: server.connection is None, 30, "the front end to disconnect")
        assert ours.execute("block-export-del", {"id": "vub1"}) == {}
        assert ours.execute("blockdev-del", {"node-name": "hot"}) == {}
        assert [e["id"] for e in ours.execute("query-block-exports")] == ["vub0"]
        assert not rig.hot_socket.exists()
    finally:
        ours.close()
        qsd.terminate()
        qsd.wait(10)


def test_a_dimm_added_while_the_disk_is_in_use(rig: Rig) -> None:
    server = rig.backend.blocks.vhost["vub0"].server
    rig.sh("mount -t ext4 /dev/vda /mnt")
    before = server.stats["regions_added"]
    rig.qmp.execute("object-add", {"qom-type": "memory-backend-memfd", "id": "dimm-mem0", "size": 128 << 20,
                                   "share": True})
    rig.qmp.execute("device_add", {"driver": "pc-dimm", "id": "dimm0", "memdev": "dimm-mem0"})
    # CONFIGURE_MEM_SLOTS is agreed, so the DIMM comes as one ADD_MEM_REG, not a new table.
    wait_until(lambda: server.stats["regions_added"] > before, 20, "QEMU to send the DIMM's memory (ADD_MEM_REG)")
    rig.sh("dd if=/dev/urandom of=/mnt/after-dimm bs=64k count=32 2>/dev/null && sync")
    want = rig.sh("md5sum /mnt/after-dimm").split()[0]
    rig.sh("echo 3 > /proc/sys/vm/drop_caches")
    assert rig.sh("md5sum /mnt/after-dimm").split()[0] == want
    rig.sh("umount /mnt")
    assert server.stats["broken_queues"] == 0 and server.stats["refused"] == 0, server.stats
