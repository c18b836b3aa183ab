"""The packed virtqueue (qbackend.models.virtqueue.PackedVirtqueue), driven the way
Linux's virtio_ring drives one: a bytearray is guest RAM, `PackedDriver` writes
descriptors in ring order with its wrap counter (the head's flags last), and
reads used descriptors back by theirs.  Hostile rings as for split rings: loops
(a chain longer than the ring), bad indirect descriptors, buffers outside guest
memory or straddling regions, wrong directions, ids not in flight; wrap-around;
event suppression; the vhost-user base encoding; and hypothesis round trips
through many wraps, with the server's one-chain path (serve_one) too."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.models import virtio_blk as blk
from qbackend.models.virtqueue import (
    RING_EVENT_FLAGS_DESC,
    RING_EVENT_FLAGS_DISABLE,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_USED,
    VIRTQ_DESC_F_WRITE,
    ChainError,
    GuestMemory,
    PackedVirtqueue,
    QueueBroken,
    VirtqueueError,
)
from qbackend.servers.vhost_user_blk import serve_one

RAM_GPA = 0x100000
RAM_UVA = 0x7F0000000000
RAM_SIZE = 0x40000
_DESC = struct.Struct("<QIHH")

Buf = tuple[int, int, bool]


class PackedDriver:
    def __init__(self, num: int = 8, *, event_idx: bool = False, indirect: bool = False) -> None:
        self.num = num
        self.ram = bytearray(RAM_SIZE)
        self.mem = GuestMemory()
        self.mem.add_region(RAM_GPA, RAM_SIZE, RAM_UVA, self.ram)
        self.desc = RAM_GPA
        self.driver_area = (self.desc + 16 * num + 3) & ~3
        self.device_area = self.driver_area + 4
        self.heap = (self.device_area + 4 + 0xFFF) & ~0xFFF
        self.next_avail, self.avail_wrap = 0, True
        self.next_used, self.used_wrap = 0, True
        self.ids: dict[int, int] = {}  # id -> descriptors it took
        self.free_ids = list(range(num))
        self.q = PackedVirtqueue(self.mem)
        self.q.set_num(num)
        self.q.set_features((event_idx << VIRTIO_F_EVENT_IDX) | (indirect << VIRTIO_F_INDIRECT_DESC))
        self.q.set_base(1 << 15 | 1 << 31)  # a fresh ring, as QEMU sends it: both wrap counters 1
        self.q.set_addresses(self.uva(self.desc), self.uva(self.driver_area), self.uva(self.device_area))

    @staticmethod
    def uva(gpa: int) -> int:
        return gpa - RAM_GPA + RAM_UVA

    def put(self, gpa: int, data: bytes) -> None:
        self.ram[gpa - RAM_GPA:gpa - RAM_GPA + len(data)] = data

    def get(self, gpa: int, n: int) -> bytes:
        return bytes(self.ram[gpa - RAM_GPA:gpa - RAM_GPA + n])

    def alloc(self, n: int) -> int:
        gpa = self.heap
        self.heap += (n + 15) & ~15
        assert self.heap <= RAM_GPA + RAM_SIZE
        return gpa

    def _flags(self, wrap: bool) -> int:
        return VIRTQ_DESC_F_AVAIL if wrap else VIRTQ_DESC_F_USED

    def add(self, bufs: list[Buf], *, indirect: bool = False, raw_flags: list[int] | None = None) -> int:
        """Make a chain available; its buffer id."""
        buffer_id = self.free_ids.pop(0)
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, (gpa, n, w) in enumerate(bufs):
                self.put(table + 16 * i, _DESC.pack(gpa, n, 0, VIRTQ_DESC_F_WRITE if w else 0))
            entries = [(table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)]
        else:
            entries = [(gpa, n, (VIRTQ_DESC_F_WRITE if w else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0))
                       for i, (gpa, n, w) in enumerate(bufs)]
        if raw_flags is not None:
            entries = [(a, n, f) for (a, n, _), f in zip(entries, raw_flags, strict=True)]
        head_slot, head_wrap = self.next_avail, self.avail_wrap
        slot, wrap = head_slot, head_wrap
        writes = []
        for addr, n, flags in entries:
            writes.append((slot, _DESC.pack(addr, n, buffer_id, flags | self._flags(wrap))))
            slot += 1
            if slot == self.num:
                slot, wrap = 0, not wrap
        # The head last (its flags make the whole chain available).
        for s, data in writes[1:]:
            self.put(self.desc + 16 * s, data)
        self.put(self.desc + 16 * writes[0][0], writes[0][1])
        self.next_avail, self.avail_wrap = slot, wrap
        self.ids[buffer_id] = len(entries)
        return buffer_id

    def used(self) -> list[tuple[int, int]]:
        out = []
        while True:
            _, n, buffer_id, flags = _DESC.unpack(self.get(self.desc + 16 * self.next_used, 16))
            if bool(flags & VIRTQ_DESC_F_AVAIL) != self.used_wrap or bool(flags & VIRTQ_DESC_F_USED) != self.used_wrap:
                return out
            out.append((buffer_id, n))
            self.next_used += self.ids.pop(buffer_id)
            if self.next_used >= self.num:
                self.next_used -= self.num
                self.used_wrap = not self.used_wrap
            self.free_ids.append(buffer_id)

    def set_event(self, flags: int, off: int = 0, wrap: bool = True) -> None:
        self.put(self.driver_area, struct.pack("<HH", off | wrap << 15, flags))


def test_a_chain_round_trip() -> None:
    d = PackedDriver()
    a, b = d.alloc(16), d.alloc(512)
    d.put(a, b"x" * 16)
    bid = d.add([(a, 16, False), (b, 512, True)])
    chain = d.q.pop()
    assert chain is not None and chain.head == bid
    assert chain.gather() == b"x" * 16 and chain.writable_len == 512
    chain.scatter(b"y" * 512)
    assert d.q.pop() is None
    d.q.push(chain.head, 512)
    assert d.used() == [(bid, 512)] and d.get(b, 512) == b"y" * 512
    assert d.q.last_avail_idx == 2 and d.q.used_idx == 2


def test_indirect_tables() -> None:
    d = PackedDriver(indirect=True)
    bufs = [(d.alloc(16), 16, False), (d.alloc(100), 100, True), (d.alloc(1), 1, True)]
    bid = d.add(bufs, indirect=True)
    chain = d.q.pop()
    assert chain is not None and chain.head == bid and chain.writable_len == 101
    d.q.push(bid, 1)
    assert d.used() == [(bid, 1)]
    assert d.q.last_avail_idx == 1  # one ring slot, however long the table


@pytest.mark.parametrize("case, match", [
    ("feature off", "VIRTIO_F_INDIRECT_DESC is off"),
    ("zero length", "not a nonzero multiple"),
    ("odd length", "not a nonzero multiple"),
    ("outside", "outside guest memory"),
    ("nested", "inside an indirect table"),
    ("in a chain", "inside a chain"),
])
def test_bad_indirect_descriptors_break_the_queue(case: str, match: str) -> None:
    d = PackedDriver(indirect=case != "feature off")
    table = d.alloc(32)
    d.put(table, _DESC.pack(d.alloc(16), 16, 0, 0) + _DESC.pack(d.alloc(1), 1, 0, VIRTQ_DESC_F_WRITE))
    length, addr, flags = 32, table, VIRTQ_DESC_F_INDIRECT
    if case == "zero length":
        length = 0
    elif case == "odd length":
        length = 24
    elif case == "outside":
        addr = RAM_GPA + RAM_SIZE - 16
    elif case == "nested":
        d.put(table + 16, _DESC.pack(table, 32, 0, VIRTQ_DESC_F_INDIRECT))
    if case == "in a chain":
        d.add([(d.alloc(16), 16, False), (table, 32, False)],
              raw_flags=[VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_INDIRECT])
    else:
        d.add([(addr, length, False)], raw_flags=[flags])
    with pytest.raises(QueueBroken, match=match):
        d.q.pop()
    with pytest.raises(QueueBroken):  # sticky
        d.q.pop()
    d.q.set_num(8)  # configured anew: usable again
    assert d.q.broken is None


def test_a_chain_longer_than_the_ring_breaks_the_queue() -> None:
    d = PackedDriver(num=4)
    # Every slot says available and NEXT: the walk comes round to where it started.
    for slot in range(4):
        d.put(d.desc + 16 * slot, _DESC.pack(d.alloc(16), 16, 0, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_AVAIL))
    with pytest.raises(QueueBroken, match="longer than the ring"):
        d.q.pop()


def test_a_chain_exactly_num_long_is_fine() -> None:
    d = PackedDriver(num=4)
    bufs = [(d.alloc(16), 16, False)] + [(d.alloc(8), 8, True) for _ in range(3)]
    bid = d.add(bufs)
    chain = d.q.pop()
    assert chain is not None and chain.head == bid and chain.writable_len == 24
    d.q.push(bid, 1)
    assert d.used() == [(bid, 1)]
    assert (d.q.last_avail_idx, d.q.avail_wrap, d.q.used_idx, d.q.used_wrap) == (0, False, 0, False)


def test_per_request_errors_leave_the_queue_working() -> None:
    d = PackedDriver()
    status = d.alloc(1)
    outside = d.add([(RAM_GPA + RAM_SIZE - 8, 16, False), (status, 1, True)])
    backwards = d.add([(d.alloc(8), 8, True), (d.alloc(16), 16, False)])
    good = d.add([(d.alloc(16), 16, False), (d.alloc(1), 1, True)])
    for bid, message in ((outside, "outside guest memory"), (backwards, "device-readable buffer follows")):
        with pytest.raises(ChainError, match=message) as info:
            d.q.pop()
        assert info.value.head == bid
        d.q.push(bid, 0)
    chain = d.q.pop()
    assert chain is not None and chain.head == good
    d.q.push(good, 1)
    assert [bid for bid, _ in d.used()] == [outside, backwards, good]


def test_buffers_straddling_two_regions_are_two_views() -> None:
    d = PackedDriver()
    second = bytearray(0x1000)
    d.mem.add_region(RAM_GPA + RAM_SIZE, len(second), RAM_UVA + RAM_SIZE, second)
    bid = d.add([(d.alloc(16), 16, False), (RAM_GPA + RAM_SIZE - 8, 24, True)])
    chain = d.q.pop()
    assert chain is not None and chain.head == bid and [v.nbytes for v in chain.writable] == [8, 16]


def test_push_of_an_id_not_in_flight_is_refused() -> None:
    d = PackedDriver()
    with pytest.raises(VirtqueueError, match="not in flight"):
        d.q.push(3, 1)


def test_base_encoding_round_trips() -> None:
    d = PackedDriver()
    d.q.set_base(5 | 0 << 15 | (3 | 1 << 15) << 16)
    assert (d.q.last_avail_idx, d.q.avail_wrap, d.q.used_idx, d.q.used_wrap) == (5, False, 3, True)
    assert d.q.get_base() == 5 | (3 | 1 << 15) << 16
    with pytest.raises(VirtqueueError):
        d.q.set_base(1 << 32)


def test_event_suppression() -> None:
    d = PackedDriver(event_idx=True)
    for flags, expected in ((0, True), (RING_EVENT_FLAGS_DISABLE, False)):
        d.set_event(flags)
        bid = d.add([(d.alloc(16), 16, False), (d.alloc(1), 1, True)])
        chain = d.q.pop()
        assert chain is not None
        d.q.push(bid, 1)
        assert d.q.should_notify() is expected
        d.used()
    # DESC: interrupt when the used index passes the driver's offset (with its wrap counter).
    d.set_event(RING_EVENT_FLAGS_DESC, off=d.q.used_idx + 3, wrap=d.q.used_wrap)  # 2 slots per chain
    for expected in (False, True, False):
        bid = d.add([(d.alloc(16), 16, False), (d.alloc(1), 1, True)])
        chain = d.q.pop()
        assert chain is not None
        d.q.push(bid, 1)
        assert d.q.should_notify() is expected
        d.used()


def test_rings_outside_memory_or_misaligned_break_the_queue() -> None:
    d = PackedDriver()
    d.q.set_addresses(d.uva(RAM_GPA + RAM_SIZE - 16), d.uva(d.driver_area), d.uva(d.device_area))
    with pytest.raises(QueueBroken, match="descriptor ring"):
        d.q.pop()
    d.q.set_addresses(d.uva(d.desc), d.uva(d.driver_area + 2), d.uva(d.device_area))
    with pytest.raises(QueueBroken, match="aligned"):
        d.q.pop()


@settings(max_examples=60, deadline=None)
@given(num=st.sampled_from([2, 4, 8, 5]), rounds=st.lists(st.lists(
    st.tuples(st.integers(1, 3), st.booleans(), st.integers(0, 2 * blk.SECTOR_SIZE // 512)), min_size=1, max_size=4),
    min_size=1, max_size=12), indirect=st.booleans())
def test_requests_round_trip_through_many_wraps(num: int, rounds: list[list[tuple[int, bool, int]]],
                                                 indirect: bool) -> None:
    """Reads and writes through serve_one (the server's path) against a bytearray disk,
    batch after batch, the ring wrapping many times: every answer lands where it should."""
    d = PackedDriver(num=num, indirect=True)
    disk = bytearray(bytes(range(256)) * (16 * 512 // 256))

    class Disk:
        class info:
            size = len(disk)
            read_only = False

        def read(self, offset: int, length: int) -> bytes:
            return bytes(disk[offset:offset + length])

        def write(self, offset: int, data: bytes, fua: bool) -> None:
            disk[offset:offset + len(data)] = data

        def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
            disk[offset:offset + length] = bytes(length)

        def trim(self, offset: int, length: int, fua: bool) -> None:
            self.write_zeroes(offset, length, True, fua)

        def flush(self) -> None:
            pass

    config = blk.BlkConfig(capacity=len(disk) // 512)
    for batch in rounds:
        before = bytes(disk)
        expected = {}
        for pieces, write, sector in batch:
            if len(d.free_ids) == 0 or (not indirect and d.num - sum(d.ids.values()) < pieces + 2):
                break
            header = d.alloc(16)
            kind = blk.RequestType.OUT if write else blk.RequestType.IN
            sector += 8 if write else 0  # writes apart from reads: a batch's reads see the disk as it was
            d.put(header, struct.pack("<IIQ", kind, 0, sector))
            data = [d.alloc(512) for _ in range(pieces)]
            payload = bytes([sector * 7 + pieces]) * 512 * pieces
            for k, gpa in enumerate(data):
                d.put(gpa, payload[512 * k:512 * (k + 1)])
            status = d.alloc(1)
            bid = d.add([(header, 16, False)] + [(gpa, 512, not write) for gpa in data] + [(status, 1, True)],
                        indirect=indirect)
            expected[bid] = (write, sector, pieces, data, status, payload)
        while serve_one(d.q, Disk(), config, writethrough=False, serial=b"x"):
            pass
        used = dict(d.used())
        model = bytearray(before)
        assert sorted(used) == sorted(expected)
        for bid, (write, sector, pieces, data, status, payload) in expected.items():
            assert d.get(status, 1) == b"\0"
            assert used[bid] == (1 if write else 512 * pieces + 1)
            if write:
                model[sector * 512:(sector + pieces) * 512] = payload  # in ring order, as served
            else:
                got = b"".join(d.get(gpa, 512) for gpa in data)
                assert got == before[sector * 512:(sector + pieces) * 512]
        assert disk == model
        d.heap = (d.device_area + 4 + 0xFFF) & ~0xFFF  # buffers are free again
