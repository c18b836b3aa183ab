"""The native vfio-user access loop (qbackend.servers.vfio_user_fast, C), on a socket.

The input is written to one end of a socketpair and that end shut for
writing; the C loop serves from the other until it needs Python (it returns
1) or the stream ends.  The device has config space (a read-only window), a
writable 4-byte register whose writes are plain only while a guard word is
zero, and a read-only register window.  What the loop consumed must be
exactly the accesses it may serve, each answered as the Python path answers
it (the bytes are compared), with its writes landed and counted; where it
stopped must be a message it may leave to Python.  Nothing is documented to
fail: any assertion or crash is a finding.
"""

from __future__ import annotations

import socket
import struct

from qbackend.models.pci_config import Bar, ConfigSpace
from qbackend.plumbing.native_lock import NativeLock
from qbackend.protocol import vfio_user as vu
from qbackend.servers.vfio_user_fast import MAX_COUNT, NativeAccessLoop
from qbackend.vfio.function import PciFunction, PlainWindow
from qbackend.vfio.irqs import InterruptController

MAX_XFER = 1 << 20
REG, RO = 0x10, 0x40  # BAR0 offsets of the writable register and of the read-only window
ACCESS = struct.Struct("<HHIIIQII")


class _Device(PciFunction):
    def __init__(self) -> None:
        super().__init__(ConfigSpace(vendor_id=0x1234, device_id=0x5678, class_code=0xFF0000, bars=(Bar(0, 256),)),
                         InterruptController(intx=False, msix_vectors=0))
        self.registers = bytearray(256)
        self.registers[RO:RO + 16] = bytes(range(1, 17))

    def plain_windows(self) -> list[PlainWindow]:
        regs = memoryview(self.registers)
        return [*super().plain_windows(),
                PlainWindow(vu.PciRegion.BAR0, REG, regs[REG:REG + 4], writable=True, guard=regs[0:4]),
                PlainWindow(vu.PciRegion.BAR0, RO, regs[RO:RO + 16])]


_device = _Device()
_lock = _device.lock
_buffer = bytearray(64 * 1024)


def _plain(region: int, offset: int, count: int, write: bool) -> bytes | None:
    """The bytes an access may be served from natively (for a read, its data), else None."""
    if region == vu.PciRegion.CONFIG and not write and offset + count <= len(_device.config.data):
        return bytes(_device.config.data[offset:offset + count])
    if region != vu.PciRegion.BAR0:
        return None
    if write:
        return b"" if offset == REG and count == 4 and not any(_device.registers[0:4]) else None
    for start, end in ((REG, REG + 4), (RO, RO + 16)):
        if start <= offset and offset + count <= end:
            return bytes(_device.registers[offset:offset + count])
    return None


def test_one_input(data: bytes) -> None:
    if len(data) < 1 or not isinstance(_lock, NativeLock):
        return
    _device.registers[0:4] = bytes([data[0] & 1, 0, 0, 0])  # the guard: set in half the runs
    stream = data[1:16 * 1024]
    ours, theirs = socket.socketpair()
    try:
        loop = NativeAccessLoop.start(_device, ours.fileno(), _buffer, MAX_XFER, 1000, 1000)
        if loop is None:  # no native helpers here
            return
        theirs.sendall(stream)
        theirs.shutdown(socket.SHUT_WR)
        counts = _device.region_accesses
        status = loop.serve()
        assert status in (0, 1), status
        begin, end = loop.pending if status == 1 else (len(stream), len(stream))
        fds = loop.take_fds()
        assert not fds
        # Everything before `begin` was served natively: walk it as the model says.
        pos = 0
        want = bytearray()
        served = [0] * vu.PCI_NUM_REGIONS
        registers = bytes(_device.registers)
        while pos < begin:
            msg_id, command, size, flags, _error, offset, region, count = ACCESS.unpack_from(stream, pos)
            assert not flags & ~vu.FLAG_NO_REPLY and 0 < count <= MAX_COUNT, (flags, count)
            write = command == vu.Command.REGION_WRITE
            assert command in (vu.Command.REGION_READ, vu.Command.REGION_WRITE), command
            assert size == 32 + (count if write else 0)
            if write:
                assert region == vu.PciRegion.BAR0 and offset == REG and count == 4
                registers = registers[:REG] + stream[pos + 32:pos + 36] + registers[REG + 4:]
            else:
                got = registers[offset:offset + count] if region == vu.PciRegion.BAR0 else _plain(region, offset,
                                                                                                 count, False)
                assert got is not None and _plain(region, offset, count, False) is not None
            if not flags:
                reply_size = 32 + (0 if write else count)
                want += ACCESS.pack(msg_id, command, reply_size, vu.TYPE_REPLY, 0, offset, region, count)
                if not write:
                    want += got  # type: ignore[operator]
            served[region] += 1
            pos += size
        assert pos == begin, (pos, begin)
        assert bytes(_device.registers) == registers, "a native write landed other than the model says"
        after = _device.region_accesses
        assert [a - b for a, b in zip(after, counts)] == served
        theirs.settimeout(2)
        got_replies = bytearray()
        while len(got_replies) < len(want):
            chunk = theirs.recv(65536)
            assert chunk, "fewer reply bytes than the accesses served"
            got_replies += chunk
        assert bytes(got_replies) == bytes(want)
        if status == 1 and end - begin >= 32:
            # It stopped at a whole access header: one it may leave.
            msg_id, command, size, flags, _error, offset, region, count = ACCESS.unpack_from(stream, begin)
            write = command == vu.Command.REGION_WRITE
            plain = (not flags & ~vu.FLAG_NO_REPLY and 0 < count <= MAX_COUNT
                     and command in (vu.Command.REGION_READ, vu.Command.REGION_WRITE)
                     and size == 32 + (count if write else 0) and size <= end - begin
                     and _plain(region, offset, count, write) is not None)
            assert not plain, "left an access it should serve"
    finally:
        ours.close()
        theirs.close()
