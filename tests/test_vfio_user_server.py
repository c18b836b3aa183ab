"""The vfio-user server against a raw-socket client: the handshake, region
and irq info, interrupts, DMA both ways, and bad input on purpose.

Each bad input must get an error reply or a clean close, leave no fd behind
in the server, and never disturb another device's connection, which a
second client keeps using between the cases."""

from __future__ import annotations

import errno as E
import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend, ServedDevice
from qbackend.options import IvshmemOptions
from qbackend.plumbing.peer_memory import sealed_memfd
from qbackend.protocol import vfio_user as vu
from qbackend.testing.vfio_user_client import ClientError, VfioUserClient

CONFIG = vu.PciRegion.CONFIG


@dataclass
class Pair:
    thread: BackendThread
    target: ServedDevice  # gets the bad input
    bystander: ServedDevice  # its client must keep working
    witness: VfioUserClient

    def connect(self) -> VfioUserClient:
        return VfioUserClient(self.target.server.socket_path, timeout=5)

    def wait_idle(self) -> None:
        """Wait until the target has no client (its fds are then released)."""
        deadline = time.monotonic() + 5
        while self.target.server.connection is not None:
            assert time.monotonic() < deadline, "server kept a closed connection"
            time.sleep(0.01)

    def bystander_ok(self) -> None:
        assert self.witness.read32(CONFIG, 0) == 0x11101AF4


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, access_path: str) -> Iterator[Pair]:
    workdir: Path = tmp_path_factory.mktemp("vfu")
    backend = Backend()
    target = backend.add_ivshmem(IvshmemOptions(socket=workdir / "target.sock", vectors=4))
    bystander = backend.add_ivshmem(IvshmemOptions(socket=workdir / "bystander.sock"))
    with BackendThread(backend) as thread:
        witness = VfioUserClient(bystander.server.socket_path)
        witness.negotiate()
        yield Pair(thread, target, bystander, witness)
        witness.close()


def expect_error(client: VfioUserClient, msg_id: int, errno: int) -> None:
    reply = client.receive()
    assert reply.header.id == msg_id
    assert reply.header.flags == vu.TYPE_REPLY | vu.FLAG_ERROR
    assert reply.header.size == vu.HEADER_SIZE
    assert reply.header.error == errno, os.strerror(reply.header.error)


def expect_closed(client: VfioUserClient) -> None:
    with pytest.raises((EOFError, ConnectionResetError)):
        client.receive()


# -- the handshake and info ---------------------------------------------------------


def test_the_access_path_under_test_is_the_one_serving(pair: Pair, access_path: str) -> None:
    """Every test here runs once per access path; make sure each run tests the path it names."""
    with pair.connect() as client:
        client.negotiate()
        before = pair.target.device.region_accesses[CONFIG]
        for _ in range(10):
            assert client.read32(CONFIG, 0) == 0x11101AF4
        conn = pair.target.server.connection
        assert conn is not None
        if access_path == "native":
            assert conn.native is not None and conn.native.served >= 10
        else:
            assert conn.native is None
        assert pair.target.device.region_accesses[CONFIG] == before + 10


def test_socket_is_private(pair: Pair) -> None:
    mode = os.stat(pair.target.server.socket_path).st_mode & 0o777
    assert mode == 0o600


def test_handshake_and_device_info(pair: Pair) -> None:
    with pair.connect() as c:
        caps = c.negotiate()["capabilities"]
        assert isinstance(caps, dict)
        assert caps["max_msg_fds"] <= 16 and caps["max_data_xfer_size"] <= 64 << 20
        flags, regions, irqs = c.device_info()
        assert flags == vu.DeviceFlags.PCI | vu.DeviceFlags.RESET
        assert (regions, irqs) == (9, 5)
        # BAR2 is mappable: the first ask is too small for the sparse-mmap cap.
        fields, caps_bytes, fds = c.region_info(2)
        argsz, rflags, index, cap_offset, size, _ = fields
        assert (argsz, index, size) == (64, 2, 4 << 20)
        assert caps_bytes == b"" and fds == []
        fields, caps_bytes, fds = c.region_info(2, argsz)
        assert fields[1] == vu.RegionFlags.READ | vu.RegionFlags.WRITE | vu.RegionFlags.MMAP | vu.RegionFlags.CAPS
        assert fields[3] == 32
        assert caps_bytes == struct.pack("=HHIIIQQ", 1, 1, 0, 1, 0, 0, 4 << 20)
        assert len(fds) == 1
        assert os.fstat(fds[0]).st_size == 4 << 20
        os.close(fds[0])
        # An unused BAR: size 0, no flags.
        assert c.region_info(3)[0][1] == 0 and c.region_info(3)[0][4] == 0
        # INTx and 4 MSI-X vectors.
        reply = c.call(vu.Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, vu.PciIrq.MSIX, 0))
        assert vu.IRQ_INFO.unpack(reply.payload)[3] == 4
        reply = c.call(vu.Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, vu.PciIrq.INTX, 0))
        assert vu.IRQ_INFO.unpack(reply.payload)[3] == 1
    pair.wait_idle()


def test_config_space_identity_and_bar_sizing(pair: Pair) -> None:
    with pair.connect() as c:
        c.negotiate()
        assert c.read32(CONFIG, 0) == 0x11101AF4
        c.write32(CONFIG, 0x18, 0xFFFFFFFF)  # BAR2 low, 64-bit prefetchable
        c.write32(CONFIG, 0x1C, 0xFFFFFFFF)
        assert c.read32(CONFIG, 0x18) == (0xFFFFFFFF & ~((4 << 20) - 1)) | 0xC
        assert c.read32(CONFIG, 0x1C) == 0xFFFFFFFF
        c.write32(CONFIG, 0x30, 0xFFFFF800)  # no expansion ROM
        assert c.read32(CONFIG, 0x30) == 0
        c.call(vu.Command.DEVICE_RESET)
        assert c.read32(CONFIG, 0x18) == 0xC
    pair.wait_idle()


# -- interrupts -------------------------------------------------------------------


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _count(fd: int) -> int:
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def test_msix_masking_keeps_the_pba_bit_until_unmask(pair: Pair) -> None:
    dev = pair.target.device
    with pair.connect() as c:
        c.negotiate()
        efds = [_eventfd() for _ in range(4)]
        try:
            c.set_irqs(vu.PciIrq.MSIX, vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER, 0, 4, efds)
            c.write(CONFIG, 0x42, struct.pack("<H", 0x8000 | 3))  # MSI-X enable
            ring = lambda v: pair.thread.call(lambda: dev.group.ring(dev.position, v))  # noqa: E731
            ring(1)
            assert [_count(fd) for fd in efds] == [0, 1, 0, 0]
            c.set_irqs(vu.PciIrq.MSIX, vu.IrqSetFlags.DATA_NONE | vu.IrqSetFlags.ACTION_MASK, 2, 1)
            ring(2)
            assert _count(efds[2]) == 0
            assert c.read(vu.PciRegion.BAR1, 0x800, 8) == (1 << 2).to_bytes(8, "little")  # PBA
            c.set_irqs(vu.PciIrq.MSIX, vu.IrqSetFlags.DATA_NONE | vu.IrqSetFlags.ACTION_UNMASK, 2, 1)
            assert _count(efds[2]) == 1
            assert c.read(vu.PciRegion.BAR1, 0x800, 8) == bytes(8)
            # A vector without an eventfd is pending too.
            c.set_irqs(vu.PciIrq.MSIX, vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER, 3, 1)
            ring(3)
            assert c.read(vu.PciRegion.BAR1, 0x800, 8) == (1 << 3).to_bytes(8, "little")
        finally:
            for fd in efds:
                os.close(fd)
    pair.wait_idle()
    assert dev.irqs.open_fds() == []


def test_intx_is_automasked_until_unmask(pair: Pair) -> None:
    dev = pair.target.device
    with pair.connect() as c:
        c.negotiate()
        efd = _eventfd()
        try:
            c.call(vu.Command.DEVICE_RESET)  # MSI-X off, whatever earlier tests left
            c.write32(CONFIG, 0x04, 0x0002)  # memory decode, INTx enabled
            c.set_irqs(vu.PciIrq.INTX, vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER, 0, 1, [efd])
            c.write32(vu.PciRegion.BAR0, 0, 1)  # IntrMask
            pair.thread.call(lambda: dev.group.ring(dev.position, 0))
            assert _count(efd) == 1
            assert c.read32(CONFIG, 0x04) >> 16 & 0x8  # status: interrupt pending
            assert c.read32(vu.PciRegion.BAR0, 4) == 1  # IntrStatus, cleared by the read
            pair.thread.call(lambda: dev.group.ring(dev.position, 0))
            assert _count(efd) == 0  # still automasked
            c.set_irqs(vu.PciIrq.INTX, vu.IrqSetFlags.DATA_NONE | vu.IrqSetFlags.ACTION_UNMASK, 0, 1)
            assert _count(efd) == 1  # level still high: fires on unmask
            c.write32(CONFIG, 0x04, 0x0402)  # INTX_DISABLE lowers the line
            assert dev.irqs.intx_level is False
        finally:
            os.close(efd)
    pair.wait_idle()


# -- DMA ------------------------------------------------------------------------------


def test_dma_through_fd_and_through_messages(pair: Pair) -> None:
    server = pair.target.server
    with pair.connect() as c:
        c.negotiate()
        mem = sealed_memfd("guest-ram", 0x10000)
        os.pwrite(mem, b"fd-backed guest memory", 0x1000)
        c.dma_map(0x100000, 0x10000, mem)
        os.close(mem)
        c.dma_map(0x200000, 0x1000)  # no fd: reached by messages
        conn = server.connection
        assert conn is not None
        assert pair.thread.run(conn.dma_read, 0x101000, 22) == b"fd-backed guest memory"

        # The server's DMA_READ arrives on the same socket; answer it like QEMU.
        import threading

        result: list[bytes] = []
        t = threading.Thread(target=lambda: result.append(pair.thread.run(conn.dma_read, 0x200010, 16)))
        t.start()
        req = c.receive()
        assert req.header.command == vu.Command.DMA_READ and req.header.flags == vu.TYPE_REQUEST
        assert vu.DMA_ACCESS.unpack(req.payload) == (0x200010, 16)
        c.send_raw(vu.build_reply(req.header.id, vu.Command.DMA_READ, req.payload + b"message-path-ok!"))
        t.join(5)
        assert result == [b"message-path-ok!"]
        # Unmapped addresses and overlaps are refused.
        with pytest.raises(Exception, match="not inside one DMA map"):
            pair.thread.run(conn.dma_read, 0x300000, 4)
        with pytest.raises(ClientError) as exc:
            c.dma_map(0x100000, 0x1000)
        assert exc.value.errno == E.EEXIST
        with pytest.raises(ClientError) as exc:
            c.dma_unmap(0x100000, 0x1000)
        assert exc.value.errno == E.ENOENT
        c.dma_unmap(0x100000, 0x10000)
        assert len(conn.dma) == 1
    pair.wait_idle()


# -- bad input ----------------------------------------------------------------------------


def _header(msg_id: int, command: int, size: int, flags: int = 0) -> bytes:
    return vu.HEADER.pack(msg_id, command, size, flags, 0)


def _raw_client(pair: Pair, negotiate: bool = True) -> VfioUserClient:
    c = pair.connect()
    if negotiate:
        c.negotiate()
    return c


CLOSING_CASES = {
    "short header": lambda c: (c.send_raw(b"\x01\x00\x09\x00"), c.sock.shutdown(socket.SHUT_WR)),
    "size below header": lambda c: c.send_raw(_header(1, vu.Command.REGION_READ, 8)),
    "size over limit": lambda c: c.send_raw(_header(1, vu.Command.REGION_WRITE, 1 << 31)),
    "vanishes mid-message": lambda c: (c.send_raw(_header(1, vu.Command.REGION_WRITE, 1000) + b"x" * 100),
                                       c.sock.shutdown(socket.SHUT_WR)),
    "unknown header flags": lambda c: c.send_raw(_header(1, vu.Command.REGION_READ, 32, 0x80) + bytes(16)),
}


@pytest.mark.parametrize("case", sorted(CLOSING_CASES))
def test_broken_framing_closes_cleanly(pair: Pair, case: str) -> None:
    before = open_fds()
    c = _raw_client(pair)
    CLOSING_CASES[case](c)
    if case == "size over limit":
        reply = c.receive()
        assert reply.header.error == E.EINVAL and reply.header.flags & vu.FLAG_ERROR
    expect_closed(c)
    c.close()
    pair.wait_idle()
    assert open_fds() == before
    pair.bystander_ok()


def _read_req(offset: int, region: int, count: int) -> bytes:
    return vu.REGION_ACCESS.pack(offset, region, count)


ERROR_CASES = {
    # name: (command, payload, fds to send, expected errno)
    "unknown command": (99, b"", 0, E.ENOSYS),
    "unsupported command": (vu.Command.DEVICE_GET_REGION_IO_FDS, bytes(16), 0, E.ENOSYS),
    "region index out of range": (vu.Command.REGION_READ, _read_req(0, 20, 4), 0, E.EINVAL),
    "unused region": (vu.Command.REGION_READ, _read_req(0, 4, 4), 0, E.EINVAL),
    "past the region end": (vu.Command.REGION_READ, _read_req(254, CONFIG, 4), 0, E.EINVAL),
    "offset wraps 64 bits": (vu.Command.REGION_READ, _read_req((1 << 64) - 2, CONFIG, 4), 0, E.EINVAL),
    "count 0": (vu.Command.REGION_READ, _read_req(0, CONFIG, 0), 0, E.EINVAL),
    "count over max transfer": (vu.Command.REGION_READ, _read_req(0, CONFIG, (1 << 20) + 1), 0, E.E2BIG),
    "write data shorter than count": (vu.Command.REGION_WRITE, _read_req(0, CONFIG, 8) + b"1234", 0, E.EINVAL),
    "region info index out of range": (vu.Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(32, 0, 99, 0, 0, 0),
                                       0, E.EINVAL),
    "irq info index out of range": (vu.Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, 9, 0), 0, E.EINVAL),
    "set_irqs past the vectors": (vu.Command.DEVICE_SET_IRQS,
                                  vu.IRQ_SET.pack(20, vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER,
                                                  vu.PciIrq.MSIX, 3, 2), 2, E.EINVAL),
    "more fds than allowed": (vu.Command.DEVICE_SET_IRQS,
                              vu.IRQ_SET.pack(20, vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER,
                                              vu.PciIrq.MSIX, 0, 20), 20, E.EINVAL),
    "fds on a message that takes none": (vu.Command.REGION_READ, _read_req(0, CONFIG, 4), 2, E.EINVAL),
    "dma map of two fds": (vu.Command.DMA_MAP, vu.DMA_MAP.pack(32, 3, 0, 0x1000, 0x1000), 2, E.EINVAL),
    "dma map unaligned": (vu.Command.DMA_MAP, vu.DMA_MAP.pack(32, 3, 0, 0x1001, 0x1000), 1, E.EINVAL),
    "dma map with an fd mmap refuses": (vu.Command.DMA_MAP, vu.DMA_MAP.pack(32, 3, 1 << 40, 0x1000, 0x1000), 1,
                                        E.EINVAL),
    "dma unmap of nothing": (vu.Command.DMA_UNMAP, vu.DMA_UNMAP.pack(24, 0, 0x5000, 0x1000), 0, E.ENOENT),
    "reset with a payload": (vu.Command.DEVICE_RESET, b"junk", 0, E.EINVAL),
    "second VERSION": (vu.Command.VERSION, vu.VERSION_PREFIX.pack(0, 0) + b"{}\0", 0, E.EINVAL),
}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_bad_request_gets_an_error_and_the_connection_goes_on(pair: Pair, case: str) -> None:
    command, payload, nfds, errno = ERROR_CASES[case]
    before = open_fds()
    c = _raw_client(pair)
    fds = [_eventfd() for _ in range(nfds)]
    msg_id = c.send(command, payload, fds)
    for fd in fds:
        os.close(fd)  # the server got its own copies; it must close them
    expect_error(c, msg_id, errno)
    assert c.read32(CONFIG, 0) == 0x11101AF4  # same connection still served
    pair.bystander_ok()
    c.close()
    pair.wait_idle()
    assert open_fds() == before


BAD_VERSIONS = {
    "not VERSION first": (vu.Command.REGION_READ, _read_req(0, CONFIG, 4)),
    "JSON without NUL": (vu.Command.VERSION, vu.VERSION_PREFIX.pack(0, 0) + b"{}"),
    "JSON not an object": (vu.Command.VERSION, vu.VERSION_PREFIX.pack(0, 0) + b"[1]\0"),
    "JSON garbage": (vu.Command.VERSION, vu.VERSION_PREFIX.pack(0, 0) + b"{\"capabilities\": \0"),
    "capabilities not an object": (vu.Command.VERSION, vu.VERSION_PREFIX.pack(0, 0) + b'{"capabilities":3}\0'),
    "max_msg_fds not a number": (vu.Command.VERSION,
                                 vu.VERSION_PREFIX.pack(0, 0) + b'{"capabilities":{"max_msg_fds":"8"}}\0'),
    "pgsizes not 4K": (vu.Command.VERSION, vu.VERSION_PREFIX.pack(0, 0) + b'{"capabilities":{"pgsizes":512}}\0'),
    "major version 1": (vu.Command.VERSION, vu.VERSION_PREFIX.pack(1, 0) + b"{}\0"),
    "truncated": (vu.Command.VERSION, b"\0"),
}


@pytest.mark.parametrize("case", sorted(BAD_VERSIONS))
def test_bad_handshake_gets_an_error_then_a_close(pair: Pair, case: str) -> None:
    command, payload = BAD_VERSIONS[case]
    before = open_fds()
    c = _raw_client(pair, negotiate=False)
    msg_id = c.send(command, payload)
    reply = c.receive()
    assert reply.header.id == msg_id and reply.header.flags & vu.FLAG_ERROR and reply.header.error
    expect_closed(c)
    c.close()
    pair.wait_idle()
    assert open_fds() == before
    pair.bystander_ok()


def test_disconnect_releases_every_fd_and_the_device_serves_again(pair: Pair) -> None:
    before = open_fds()
    c = _raw_client(pair)
    efds = [_eventfd() for _ in range(4)]
    c.set_irqs(vu.PciIrq.MSIX, vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER, 0, 4, efds)
    c.set_irqs(vu.PciIrq.INTX, vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER, 0, 1, [efds[0]])
    mem = sealed_memfd("ram", 0x4000)
    c.dma_map(0, 0x4000, mem)
    for fd in efds + [mem]:
        os.close(fd)
    _, _, region_fds = c.region_info(2, 64)
    for fd in region_fds:
        os.close(fd)
    c.write32(vu.PciRegion.BAR0, 0, 0x5A)  # device state that must survive
    assert len(pair.target.device.irqs.open_fds()) == 5
    c.close()
    pair.wait_idle()
    assert open_fds() == before
    assert pair.target.device.irqs.open_fds() == []
    with pair.connect() as again:
        again.negotiate()
        assert again.read32(vu.PciRegion.BAR0, 0) == 0x5A  # kept across the reconnect
        again.write32(vu.PciRegion.BAR0, 0, 0)
    pair.wait_idle()


def test_a_second_client_waits_for_the_first(pair: Pair) -> None:
    first = _raw_client(pair)
    second = pair.connect()
    second.sock.settimeout(0.3)
    second.send(vu.Command.VERSION, vu.VERSION_PREFIX.pack(0, 0) + b"{}\0")
    with pytest.raises(TimeoutError):
        second.receive()
    first.close()
    second.sock.settimeout(5)
    assert second.receive().error == 0
    second.close()
    pair.wait_idle()


def test_pipelined_requests_are_answered_in_order(pair: Pair) -> None:
    with pair.connect() as c:
        c.negotiate()
        ids = []
        blob = b""
        for i in range(2000):
            ids.append(c.next_id())
            blob += vu.build_message(ids[-1], vu.Command.REGION_READ, _read_req(i % 64 * 4, CONFIG, 4))
        c.send_raw(blob)
        got = [c.receive().header.id for _ in ids]
        assert got == ids
    pair.wait_idle()
