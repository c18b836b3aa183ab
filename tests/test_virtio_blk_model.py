"""The virtio-blk request layer: requests laid out by a guest driver (the
virtqueue tests' `Driver`), popped, parsed and carried out against an
in-memory disk, then the status byte and used ring read back.  Then the
config space layout against the spec's offsets, and an NBD RawExport
served as it is."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_virtqueue_model import Buf, Driver

from qbackend.block.exports import RawExport
from qbackend.errors import ImageError
from qbackend.models.virtio_blk import (
    CONFIG_LAYOUT,
    CONFIG_SIZE,
    ID_BYTES,
    SECTOR_SIZE,
    BlkConfig,
    BlkRequest,
    BlockTarget,
    Feature,
    MissingStatus,
    RequestType,
    Status,
    VirtioBlkError,
    cache_writethrough,
    config_bytes,
    config_write,
    execute,
    parse_request,
)
from qbackend.models.virtqueue import VIRTIO_F_EVENT_IDX, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, QueueBroken

SECTORS = 64
T = RequestType


@dataclass(frozen=True)
class Info:
    size: int
    read_only: bool = False


@dataclass
class MemoryDisk:
    """A BlockTarget over a bytearray, recording what it was asked."""

    data: bytearray = field(default_factory=lambda: bytearray(SECTORS * SECTOR_SIZE))
    read_only: bool = False
    calls: list[tuple[object, ...]] = field(default_factory=list)
    fail: Exception | None = None

    @property
    def info(self) -> Info:
        return Info(len(self.data), self.read_only)

    def _check(self) -> None:
        if self.fail is not None:
            raise self.fail

    def read(self, offset: int, length: int) -> bytes:
        self._check()
        self.calls.append(("read", offset, length))
        return bytes(self.data[offset:offset + length])

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        self._check()
        self.calls.append(("write", offset, len(data), fua))
        self.data[offset:offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        self._check()
        self.calls.append(("write_zeroes", offset, length, may_trim, fua))
        self.data[offset:offset + length] = bytes(length)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._check()
        self.calls.append(("trim", offset, length, fua))

    def flush(self) -> None:
        self._check()
        self.calls.append(("flush",))


CONFIG = BlkConfig(capacity=SECTORS, seg_max=126, size_max=1 << 20, max_discard_sectors=32, max_discard_seg=2,
                   max_write_zeroes_sectors=32, max_write_zeroes_seg=2, write_zeroes_may_unmap=True)


def header(type_: int, sector: int = 0, ioprio: int = 0) -> bytes:
    return struct.pack("<IIQ", type_, ioprio, sector)


def segment(sector: int, num: int, flags: int = 0) -> bytes:
    return struct.pack("<QII", sector, num, flags)


class Guest:
    """A driver issuing virtio-blk requests: out buffers (header first), in buffers (status last)."""

    def __init__(self, num: int = 32, config: BlkConfig = CONFIG) -> None:
        self.d = Driver(num=num, indirect=True)
        self.config = config
        self.status_gpa = 0
        self.in_gpas: list[int] = []

    def submit(self, out: list[bytes], in_lens: list[int], *, indirect: bool = False) -> int:
        """Lay out one request; the status byte is the last byte of the last in buffer."""
        bufs: list[Buf] = [(self.d.alloc(len(b), b), len(b), False) for b in out]
        self.in_gpas = [self.d.alloc(n) for n in in_lens]
        bufs += [(gpa, n, True) for gpa, n in zip(self.in_gpas, in_lens)]
        if in_lens:
            self.status_gpa = bufs[-1][0] + bufs[-1][1] - 1
            self.d.put(self.status_gpa, b"\xee")  # a stale value, to see it replaced
        head = self.d.add_indirect(bufs) if indirect else self.d.add(bufs)
        self.d.offer(head)
        return head

    def parse(self) -> BlkRequest:
        chain = self.d.q.pop()
        assert chain is not None
        return parse_request(chain, self.config)

    def run(self, target: BlockTarget, *, writethrough: bool = False, serial: bytes = b"") -> tuple[Status, int, int]:
        """Pop, parse, execute, push: (status, used len, the status byte in guest memory)."""
        request = self.parse()
        status, written = execute(request, target, writethrough=writethrough, serial=serial)
        self.d.q.push(request.head, written)
        (head, used_len), = self.d.used_entries()
        assert head == request.head and used_len == written
        return status, written, self.d.get(self.status_gpa, 1)[0]


def pattern(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


# -- requests ------------------------------------------------------------------------------------


def test_read_scatters_into_the_data_buffers() -> None:
    disk = MemoryDisk()
    disk.data[:] = pattern(len(disk.data))
    g = Guest()
    g.submit([header(T.IN, sector=2)], [512, 512, 1])
    request = g.parse()
    assert request.type == T.IN and request.sector == 2 and request.status is None and request.data_len == 1024
    status, written = execute(request, disk)
    assert (status, written) == (Status.OK, 1025)
    assert g.d.get(g.in_gpas[0], 512) + g.d.get(g.in_gpas[1], 512) == pattern(len(disk.data))[1024:2048]
    assert g.d.get(g.status_gpa, 1) == b"\0" and disk.calls == [("read", 1024, 1024)]


def test_read_with_data_and_status_in_one_buffer() -> None:
    disk = MemoryDisk()
    disk.data[:] = pattern(len(disk.data), 3)
    g = Guest()
    g.submit([header(T.IN, sector=5)], [513])  # data and status share the descriptor
    status, written, byte = g.run(disk)
    assert (status, written, byte) == (Status.OK, 513, 0)
    assert g.d.get(g.status_gpa - 512, 512) == pattern(len(disk.data), 3)[5 * 512:6 * 512]


def test_write_gathers_the_data_and_honours_writethrough() -> None:
    disk = MemoryDisk()
    g = Guest()
    data = pattern(1536, 9)
    g.submit([header(T.OUT, sector=10), data[:100], data[100:1536]], [1])
    status, written, byte = g.run(disk)
    assert (status, written, byte) == (Status.OK, 1, 0)
    assert bytes(disk.data[5120:5120 + 1536]) == data and disk.calls == [("write", 5120, 1536, False)]
    g.submit([header(T.OUT, sector=0), data[:512]], [1])
    g.run(disk, writethrough=True)
    assert disk.calls[-1] == ("write", 0, 512, True)


def test_header_split_across_descriptors_and_sharing_one_with_data() -> None:
    disk = MemoryDisk()
    g = Guest()
    h = header(T.OUT, sector=3, ioprio=7)
    g.submit([h[:5], h[5:16] + b"A" * 200, b"B" * 312], [1])
    request = g.parse()
    assert (request.type, request.sector, request.ioprio, request.data_len) == (T.OUT, 3, 7, 512)
    execute(request, disk)
    assert bytes(disk.data[3 * 512:4 * 512]) == b"A" * 200 + b"B" * 312
    # Header and data in one descriptor, in an indirect table.
    g.submit([h + b"C" * 512], [1], indirect=True)
    status, _written, _byte = g.run(disk)
    assert status == Status.OK and bytes(disk.data[3 * 512:4 * 512]) == b"C" * 512


def test_flush() -> None:
    disk = MemoryDisk()
    g = Guest()
    g.submit([header(T.FLUSH)], [1])
    assert g.run(disk) == (Status.OK, 1, 0) and disk.calls == [("flush",)]


@pytest.mark.parametrize(("serial", "room", "expected"), [
    (b"qbackend-0001", ID_BYTES, b"qbackend-0001".ljust(20, b"\0")),
    (b"0123456789abcdefghijKLMN", ID_BYTES, b"0123456789abcdefghij"),  # 20 bytes: no NUL
    (b"qbackend-0001", 8, b"qbackend"),  # truncated to the buffer
    (b"", ID_BYTES, bytes(20)),
])
def test_get_id(serial: bytes, room: int, expected: bytes) -> None:
    g = Guest()
    g.submit([header(T.GET_ID)], [room, 1])
    status, written, byte = g.run(MemoryDisk(), serial=serial)
    assert (status, written, byte) == (Status.OK, len(expected) + 1, 0)
    assert g.d.get(g.in_gpas[0], room) == expected


def test_discard_and_write_zeroes() -> None:
    disk = MemoryDisk()
    disk.data[:] = b"\xff" * len(disk.data)
    g = Guest()
    g.submit([header(T.DISCARD), segment(4, 8) + segment(40, 2)], [1])
    assert g.run(disk)[0] == Status.OK
    assert disk.calls == [("trim", 2048, 4096, False), ("trim", 20480, 1024, False)]
    g.submit([header(T.WRITE_ZEROES), segment(1, 2, flags=1)], [1])
    assert g.run(disk, writethrough=True)[0] == Status.OK
    assert disk.calls[-1] == ("write_zeroes", 512, 1024, True, True)
    assert disk.data[512:1536] == bytes(1024) and disk.data[1536] == 0xFF
    g.submit([header(T.WRITE_ZEROES), segment(8, 1)], [1])
    g.run(disk)
    assert disk.calls[-1] == ("write_zeroes", 4096, 512, False, False)


@pytest.mark.parametrize(("out", "status", "why"), [
    ([header(T.DISCARD), segment(0, 1, flags=1)], Status.UNSUPP, "unmap"),
    ([header(T.WRITE_ZEROES), segment(0, 1, flags=2)], Status.UNSUPP, "unknown bits"),
    ([header(T.DISCARD), segment(0, 1) * 3], Status.UNSUPP, "3 segments, more than the 2"),
    ([header(T.DISCARD), segment(0, 33)], Status.IOERR, "more than the 32"),
    ([header(T.WRITE_ZEROES), segment(60, 5)], Status.IOERR, "past the capacity"),
    ([header(T.WRITE_ZEROES), segment(0, 1)[:12]], Status.IOERR, "not a nonzero multiple of 16"),
    ([header(T.DISCARD)], Status.IOERR, "0 bytes of segments"),
    # UNSUPP wins: a flag the device does not know about, in a later segment.
    ([header(T.WRITE_ZEROES), segment(60, 5) + segment(0, 1, flags=4)], Status.UNSUPP, "unknown bits"),
])
def test_bad_discard_and_write_zeroes(out: list[bytes], status: Status, why: str) -> None:
    disk = MemoryDisk()
    g = Guest()
    g.submit(out, [1])
    request = g.parse()
    assert request.status == status and why in request.reason
    assert execute(request, disk) == (status, 1) and request.status_byte[0] == status and disk.calls == []


def test_discard_and_write_zeroes_not_offered_are_unsupported() -> None:
    g = Guest(config=BlkConfig(capacity=SECTORS))
    for kind in (T.DISCARD, T.WRITE_ZEROES):
        g.submit([header(kind), segment(0, 1)], [1])
        request = g.parse()
        assert request.status == Status.UNSUPP and "not offered" in request.reason


@pytest.mark.parametrize(("out", "in_lens", "why"), [
    ([header(T.IN, sector=SECTORS)], [512, 1], "past the capacity"),  # the sector after the last
    ([header(T.IN, sector=SECTORS - 1)], [1024, 1], "past the capacity"),
    ([header(T.OUT, sector=1 << 63), b"x" * 512], [1], "past the capacity"),
    ([header(T.IN, sector=0)], [100, 1], "not whole 512-byte sectors"),
    ([header(T.OUT, sector=0), b"x" * 511], [1], "not whole 512-byte sectors"),
    ([header(T.IN, sector=0), b"x" * 512], [1], "wrong direction"),
    ([header(T.OUT, sector=0)], [512, 1], "wrong direction"),
    ([header(T.GET_ID), b"x"], [20, 1], "device-readable data"),
    ([header(T.DISCARD), segment(0, 1)], [8, 1], "device-writable data"),
    ([header(T.IN)[:15]], [512, 1], "header is 15 bytes"),
    ([], [512, 1], "header is 0 bytes"),
])
def test_bad_requests_are_answered_ioerr(out: list[bytes], in_lens: list[int], why: str) -> None:
    disk = MemoryDisk()
    g = Guest()
    g.submit(out, in_lens)
    request = g.parse()
    assert request.status == Status.IOERR and why in request.reason
    g.d.q.push(request.head, execute(request, disk)[1])
    assert g.d.get(g.status_gpa, 1) == b"\x01" and disk.calls == []


def test_a_read_of_the_last_sector_is_fine() -> None:
    g = Guest()
    g.submit([header(T.IN, sector=SECTORS - 1)], [512, 1])
    assert g.run(MemoryDisk())[:2] == (Status.OK, 513)


@pytest.mark.parametrize("type_", [2, 5, 10, 14, 15, 16, 0x80000000, 0x80000001, 12345])
def test_unknown_types_are_unsupported(type_: int) -> None:
    g = Guest()
    g.submit([header(type_)], [16, 1])
    status, written, byte = g.run(MemoryDisk())
    assert (status, written, byte) == (Status.UNSUPP, 1, 2)


def test_read_only_disks_refuse_writes() -> None:
    config = BlkConfig(capacity=SECTORS, max_discard_sectors=8, max_discard_seg=1, max_write_zeroes_sectors=8,
                       max_write_zeroes_seg=1, readonly=True)
    disk = MemoryDisk(read_only=True)
    g = Guest(config=config)
    for out in ([header(T.OUT), b"x" * 512], [header(T.DISCARD), segment(0, 1)],
                [header(T.WRITE_ZEROES), segment(0, 1)]):
        g.submit(out, [1])
        request = g.parse()
        assert request.status == Status.IOERR and "read-only" in request.reason
    # A target that is read-only under a config that says otherwise: execute refuses too.
    g = Guest()
    for out in ([header(T.OUT), b"x" * 512], [header(T.DISCARD), segment(0, 1)],
                [header(T.WRITE_ZEROES), segment(0, 1)]):
        g.submit(out, [1])
        assert g.run(disk) == (Status.IOERR, 1, 1)
    assert disk.calls == []
    g.submit([header(T.IN)], [512, 1])
    assert g.run(disk)[0] == Status.OK  # reads still work


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), ImageError("a broken QED table")])
def test_a_failing_target_is_ioerr(error: Exception) -> None:
    disk = MemoryDisk(fail=error)
    g = Guest()
    for out, in_lens in (([header(T.IN)], [512, 1]), ([header(T.OUT), b"x" * 512], [1]), ([header(T.FLUSH)], [1])):
        g.submit(out, in_lens)
        assert g.run(disk) == (Status.IOERR, 1, 1)


def test_a_target_smaller_than_the_config_is_ioerr() -> None:
    disk = MemoryDisk(data=bytearray(4 * SECTOR_SIZE))
    g = Guest()
    g.submit([header(T.IN, sector=4)], [512, 1])
    assert g.run(disk) == (Status.IOERR, 1, 1) and disk.calls == []


def test_a_chain_without_a_writable_byte_cannot_be_answered() -> None:
    g = Guest()
    head = g.submit([header(T.IN), b"x" * 512], [])
    chain = g.d.q.pop()
    assert chain is not None
    with pytest.raises(MissingStatus) as err:
        parse_request(chain, CONFIG)
    assert isinstance(err.value, QueueBroken) and err.value.head == head


def test_through_an_indirect_table_end_to_end() -> None:
    disk = MemoryDisk()
    g = Guest()
    data = pattern(4096, 1)
    g.submit([header(T.OUT, sector=8), data], [1], indirect=True)
    assert g.run(disk) == (Status.OK, 1, 0)
    g.submit([header(T.IN, sector=8)], [4096, 1], indirect=True)
    assert g.run(disk) == (Status.OK, 4097, 0)
    assert g.d.get(g.in_gpas[0], 4096) == data


@settings(max_examples=100, deadline=None)
@given(sector=st.integers(0, SECTORS - 8), sectors=st.integers(1, 8), cuts=st.lists(st.integers(1, 4095), max_size=4),
       seed=st.integers(0, 255))
def test_random_framings_write_then_read_back(sector: int, sectors: int, cuts: list[int], seed: int) -> None:
    """However the header, data and status are cut into descriptors, the bytes land where they should."""
    disk = MemoryDisk()
    g = Guest()
    data = pattern(sectors * SECTOR_SIZE, seed)
    stream = header(T.OUT, sector=sector) + data
    points = sorted({c % len(stream) for c in cuts} - {0})
    pieces = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)])]
    g.submit(pieces, [1])
    assert g.run(disk) == (Status.OK, 1, 0)
    assert bytes(disk.data[sector * SECTOR_SIZE:(sector + sectors) * SECTOR_SIZE]) == data
    # Read it back with the in side cut up the same way, status sharing the last piece.
    in_stream = len(data) + 1
    in_points = sorted({c % in_stream for c in cuts} - {0})
    in_lens = [b - a for a, b in zip([0, *in_points], [*in_points, in_stream])]
    g.submit([header(T.IN, sector=sector)], in_lens)
    request = g.parse()
    status, written = execute(request, disk)
    assert (status, written) == (Status.OK, len(data) + 1)
    assert b"".join(request.data) == data and request.status_byte[0] == 0


# -- an NBD export as the target ----------------------------------------------------------------


def test_a_raw_export_is_a_block_target(tmp_path: Path) -> None:
    image = tmp_path / "disk.raw"
    image.write_bytes(bytes(SECTORS * SECTOR_SIZE))
    export = RawExport("disk", image)
    try:
        g = Guest()
        data = pattern(1024, 5)
        g.submit([header(T.OUT, sector=6), data], [1])
        assert g.run(export, writethrough=True) == (Status.OK, 1, 0)
        g.submit([header(T.FLUSH)], [1])
        assert g.run(export)[0] == Status.OK
        g.submit([header(T.IN, sector=6)], [1024, 1])
        request = g.parse()
        assert execute(request, export) == (Status.OK, 1025) and b"".join(request.data) == data
        g.submit([header(T.WRITE_ZEROES), segment(6, 1)], [1])
        assert g.run(export)[0] == Status.OK
    finally:
        export.close()
    assert image.read_bytes()[6 * 512:8 * 512] == bytes(512) + data[512:]


# -- configuration --------------------------------------------------------------------------------

# struct virtio_blk_config as the spec and QEMU's standard-headers/linux/virtio_blk.h lay it out.
SPEC_OFFSETS = {"capacity": 0, "size_max": 8, "seg_max": 12, "cylinders": 16, "heads": 18, "sectors": 19,
                "blk_size": 20, "physical_block_exp": 24, "alignment_offset": 25, "min_io_size": 26,
                "opt_io_size": 28, "writeback": 32, "num_queues": 34, "max_discard_sectors": 36,
                "max_discard_seg": 40, "discard_sector_alignment": 44, "max_write_zeroes_sectors": 48,
                "max_write_zeroes_seg": 52, "write_zeroes_may_unmap": 56, "max_secure_erase_sectors": 60,
                "max_secure_erase_seg": 64, "secure_erase_sector_alignment": 68, "zoned": 72}


def test_config_layout_matches_the_spec() -> None:
    assert {name: off for name, (off, _size) in CONFIG_LAYOUT.items()} == SPEC_OFFSETS
    config = BlkConfig(capacity=0x0102030405060708, size_max=0x11121314, seg_max=0x21222324, cylinders=0x3132,
                       heads=0x41, sectors=0x42, blk_size=4096, physical_block_exp=3, alignment_offset=0x51,
                       min_io_size=0x6162, opt_io_size=0x71727374, writeback=True, num_queues=4,
                       max_discard_sectors=0x81828384, max_discard_seg=0x91929394,
                       discard_sector_alignment=0xA1A2A3A4, max_write_zeroes_sectors=0xB1B2B3B4,
                       max_write_zeroes_seg=0xC1C2C3C4, write_zeroes_may_unmap=True)
    raw = config_bytes(config)
    assert len(raw) == CONFIG_SIZE == 60

    def field_(name: str) -> int:
        off, size = CONFIG_LAYOUT[name]
        return int.from_bytes(raw[off:off + size], "little")

    expected = {"capacity": 0x0102030405060708, "size_max": 0x11121314, "seg_max": 0x21222324,
                "cylinders": 0x3132, "heads": 0x41, "sectors": 0x42, "blk_size": 4096, "physical_block_exp": 3,
                "alignment_offset": 0x51, "min_io_size": 0x6162, "opt_io_size": 0x71727374, "writeback": 1,
                "num_queues": 4, "max_discard_sectors": 0x81828384, "max_discard_seg": 0x91929394,
                "discard_sector_alignment": 0xA1A2A3A4, "max_write_zeroes_sectors": 0xB1B2B3B4,
                "max_write_zeroes_seg": 0xC1C2C3C4, "write_zeroes_may_unmap": 1}
    assert {name: field_(name) for name in expected} == expected
    assert raw[33] == 0 and raw[57:60] == bytes(3)  # unused0, unused1: the device MUST zero them
    # The front end asks for its own config length.
    assert config_bytes(config, 57) == raw[:57]
    assert config_bytes(config, 36) == raw[:36]
    assert config_bytes(config, 96) == raw + bytes(36)
    with pytest.raises(VirtioBlkError):
        config_bytes(config, 97)


def test_config_values_must_fit() -> None:
    for kw in ({"capacity": 1 << 64}, {"heads": 256}, {"num_queues": 0}, {"blk_size": 1000}, {"blk_size": 256},
               {"seg_max": -1}):
        with pytest.raises(VirtioBlkError):
            BlkConfig(**{"capacity": 8, **kw})  # type: ignore[arg-type]


def test_features_follow_the_config() -> None:
    bits = CONFIG.features()
    for bit in (VIRTIO_F_VERSION_1, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX, Feature.BLK_SIZE, Feature.FLUSH,
                Feature.TOPOLOGY, Feature.SIZE_MAX, Feature.SEG_MAX, Feature.DISCARD, Feature.WRITE_ZEROES):
        assert bits >> bit & 1, bit
    for bit in (Feature.RO, Feature.MQ, Feature.GEOMETRY, Feature.CONFIG_WCE):
        assert not bits >> bit & 1, bit
    ro = BlkConfig(capacity=8, readonly=True, num_queues=2, config_wce=True, cylinders=1).features()
    assert all(ro >> bit & 1 for bit in (Feature.RO, Feature.MQ, Feature.CONFIG_WCE, Feature.GEOMETRY))
    assert not ro >> Feature.DISCARD & 1
    # The spec's numbers.
    assert [int(f) for f in (Feature.SIZE_MAX, Feature.SEG_MAX, Feature.RO, Feature.BLK_SIZE, Feature.FLUSH,
                             Feature.TOPOLOGY, Feature.CONFIG_WCE, Feature.MQ, Feature.DISCARD,
                             Feature.WRITE_ZEROES)] == [1, 2, 5, 6, 9, 10, 11, 12, 13, 14]
    assert [int(t) for t in (T.IN, T.OUT, T.FLUSH, T.GET_ID, T.DISCARD, T.WRITE_ZEROES)] == [0, 1, 4, 8, 11, 13]


def test_writeback_is_the_only_writable_field() -> None:
    wce = BlkConfig(capacity=8, config_wce=True, writeback=True)
    assert config_write(wce, 32, b"\0").writeback is False
    assert config_write(wce, 30, b"\xff\xff\x00\xff").writeback is False  # a wider write covering it
    assert config_write(wce, 0, b"\0" * 8) is wce  # capacity is read-only
    fixed = BlkConfig(capacity=8, writeback=True)
    assert config_write(fixed, 32, b"\0") is fixed  # no CONFIG_WCE: not writable


def test_cache_mode_by_the_spec_rules() -> None:
    flush, wce = 1 << Feature.FLUSH, 1 << Feature.CONFIG_WCE
    back, through = BlkConfig(capacity=8, writeback=True), BlkConfig(capacity=8, writeback=False)
    assert cache_writethrough(0, back)  # neither negotiated: every write is stable when it completes
    assert not cache_writethrough(flush, back)  # FLUSH alone: a writeback cache the driver flushes
    assert cache_writethrough(flush | wce, through) and not cache_writethrough(flush | wce, back)
