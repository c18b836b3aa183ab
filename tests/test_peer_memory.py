"""Guest memory a peer hands over cannot SIGBUS qbackend.

A vhost-user front end that shrinks its guest RAM memfd after SET_MEM_TABLE
(and kicks a queue), or a vfio-user client that shrinks a DMA region, would
make qbackend's next access past the new end fault with SIGBUS and end the
process.  qbackend maps only memfds sealed against shrinking, as QEMU's
memory-backend-memfd is by default: an unsealed one is refused as an error
of that peer's request, the shrink then hurts nobody, and qbackend keeps
serving the others.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qbackend.plumbing.peer_memory import PeerMemoryError, check_peer_memory, sealed_memfd
from qbackend.protocol import vfio_user as vu
from qbackend.testing.harness import wait_until
from qbackend.testing.vfio_user_client import ClientError, VfioUserClient
from qbackend.testing.vhost_user_client import GuestRegion, VhostUserFrontend

MiB = 1 << 20


def test_the_rule() -> None:
    sealed = sealed_memfd("ok", 2 * MiB)
    plain = os.memfd_create("plain", os.MFD_CLOEXEC)
    os.ftruncate(plain, 2 * MiB)
    try:
        check_peer_memory(sealed, 0, 2 * MiB)
        check_peer_memory(sealed, MiB, MiB)
        with pytest.raises(PeerMemoryError, match="past its file's end"):
            check_peer_memory(sealed, MiB, 2 * MiB)
        with pytest.raises(PeerMemoryError, match="not sealed against shrinking"):
            check_peer_memory(plain, 0, MiB)
        with pytest.raises(OSError) as shrink:
            os.ftruncate(sealed, 0)  # what the seal is for
        assert shrink.value.errno == errno.EPERM
    finally:
        os.close(sealed)
        os.close(plain)


def test_a_plain_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ram"
    path.write_bytes(bytes(MiB))
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(PeerMemoryError, match="cannot be sealed"):
            check_peer_memory(fd, 0, MiB)
    finally:
        os.close(fd)


def _unsealed_region(gpa: int, size: int, uva: int) -> GuestRegion:
    """Guest RAM as a hostile front end makes it: a memfd it can shrink."""
    import mmap

    fd = os.memfd_create("hostile-ram", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK == 0
    return GuestRegion(gpa, size, uva, fd, mmap.mmap(fd, size), 0, 1 << 16, 1 << 16)


@pytest.fixture
def served(tmp_path: Path) -> tuple[subprocess.Popen[str], Path, Path]:
    """`qbackend serve` in a process of its own: a vhost-user-blk disk and an ivshmem device."""
    image = tmp_path / "disk.raw"
    image.write_bytes(os.urandom(MiB))
    vub, iv = tmp_path / "vub.sock", tmp_path / "iv.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "serve", "--vhost-user-blk",
                             f"socket={vub},image={image},format=raw", "--ivshmem", f"socket={iv},size=1M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_until(lambda: (vub.exists() and iv.exists()) or proc.poll() is not None, 30, "qbackend serve")
    assert proc.poll() is None, proc.communicate()
    yield proc, vub, image  # type: ignore[misc]
    proc.terminate()
    proc.communicate(timeout=20)


def test_a_vhost_user_front_end_that_shrinks_its_memory_hurts_only_itself(
        served: tuple[subprocess.Popen[str], Path, Path]) -> None:
    proc, sock, image = served
    with VhostUserFrontend(sock) as hostile:
        hostile.negotiate()
        region = _unsealed_region(hostile.ram.gpa, hostile.ram.size, hostile.ram.uva)
        try:
            assert not hostile.set_mem_table([region])  # refused: it could be shrunk
            os.ftruncate(region.fd, 0)
            hostile.setup_queue(0, 16)  # rings in memory the back end does not have: refused or broken
        except Exception:  # whatever the refusals do to this front end is its own business
            pass
        finally:
            region.close()
    assert proc.poll() is None, "qbackend died"
    with VhostUserFrontend(sock) as honest:  # sealed memory, as QEMU gives
        honest.negotiate()
        assert honest.set_mem_table()
        honest.setup_queue(0, 16)
        status, data = honest.read_sectors(0, 0, 8)
        assert status == 0 and data == image.read_bytes()[:4096]
    assert proc.poll() is None


def test_a_vfio_user_dma_region_that_could_shrink_is_refused(tmp_path: Path) -> None:
    sock = tmp_path / "iv.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "serve", "--ivshmem", f"socket={sock},size=1M"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: sock.exists() or proc.poll() is not None, 30, "qbackend serve")
        with VfioUserClient(sock, timeout=5) as client:
            client.negotiate()
            plain = os.memfd_create("hostile-dma", os.MFD_CLOEXEC)
            os.ftruncate(plain, 0x10000)
            try:
                with pytest.raises(ClientError) as refused:
                    client.dma_map(0x100000, 0x10000, plain)
                assert refused.value.errno == errno.EPERM
                os.ftruncate(plain, 0)
            finally:
                os.close(plain)
            sealed = sealed_memfd("dma", 0x10000)
            try:
                client.dma_map(0x200000, 0x10000, sealed)
            finally:
                os.close(sealed)
            assert client.read32(vu.PciRegion.CONFIG, 0) == 0x11101AF4
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
