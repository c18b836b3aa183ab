"""Guest memory and the split virtqueue, driven the way a guest driver drives
a ring: a bytearray is guest RAM, `Driver` lays out the descriptor table and
the two rings in it, fills descriptors, publishes heads in the available ring
and reads the used ring back.  The queue finds its rings by front-end
userspace addresses, as SET_VRING_ADDR gives them."""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.models.virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Chain,
    ChainError,
    GuestMemory,
    GuestMemoryError,
    QueueBroken,
    SplitVirtqueue,
    VirtqueueError,
    vring_need_event,
)

RAM_GPA = 0x100000
RAM_UVA = 0x7F0000000000
RAM_SIZE = 0x40000

# (gpa, length, writable): one buffer of a chain
Buf = tuple[int, int, bool]


class Driver:
    """The guest side of one split virtqueue over a bytearray of guest RAM."""

    def __init__(self, num: int = 8, *, start: int = 0, event_idx: bool = False, indirect: bool = False,
                 barrier: Callable[[], None] | None = None) -> None:
        self.num = num
        self.ram = bytearray(RAM_SIZE)
        self.mem = GuestMemory()
        self.mem.add_region(RAM_GPA, RAM_SIZE, RAM_UVA, self.ram)
        self.desc = RAM_GPA
        self.avail = self.desc + 16 * num
        self.used = (self.avail + 6 + 2 * num + 3) & ~3
        self.heap = (self.used + 6 + 8 * num + 0xFFF) & ~0xFFF
        self.free = list(range(num))
        self.avail_idx = start
        self.last_used = start
        self.put16(self.avail + 2, start)
        self.put16(self.used + 2, start)  # a ring handed over at `start` (a reconnect)
        self.q = SplitVirtqueue(self.mem) if barrier is None else SplitVirtqueue(self.mem, barrier=barrier)
        self.q.set_num(num)
        self.q.set_features((event_idx << VIRTIO_F_EVENT_IDX) | (indirect << VIRTIO_F_INDIRECT_DESC))
        self.q.set_base(start)
        self.q.set_addresses(self.uva(self.desc), self.uva(self.avail), self.uva(self.used))

    # -- guest memory --------------------------------------------------------------

    @staticmethod
    def uva(gpa: int) -> int:
        return gpa - RAM_GPA + RAM_UVA

    def at(self, gpa: int) -> int:
        return gpa - RAM_GPA

    def put(self, gpa: int, data: bytes) -> None:
        self.ram[self.at(gpa):self.at(gpa) + len(data)] = data

    def get(self, gpa: int, n: int) -> bytes:
        return bytes(self.ram[self.at(gpa):self.at(gpa) + n])

    def put16(self, gpa: int, value: int) -> None:
        self.put(gpa, struct.pack("<H", value & 0xFFFF))

    def get16(self, gpa: int) -> int:
        return int(struct.unpack("<H", self.get(gpa, 2))[0])

    def alloc(self, n: int, data: bytes | None = None) -> int:
        gpa = self.heap
        self.heap = (self.heap + n + 15) & ~15
        assert self.heap <= RAM_GPA + RAM_SIZE
        if data is not None:
            self.put(gpa, data)
        return gpa

    # -- descriptors and rings ---------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int = 0, table: int | None = None) -> None:
        self.put((self.desc if table is None else table) + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, bufs: list[Buf]) -> int:
        """Chain bufs through free descriptors; the head (not yet offered)."""
        ids = [self.free.pop(0) for _ in bufs]
        for k, (gpa, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(ids[k], gpa, length, flags, 0 if last else ids[k + 1])
        return ids[0]

    def add_indirect(self, bufs: list[Buf], direct: list[Buf] | None = None) -> int:
        """`direct` buffers in the ring's table, then one descriptor naming an indirect table of bufs."""
        direct = direct or []
        table = self.alloc(16 * len(bufs))
        for k, (gpa, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(k, gpa, length, flags, 0 if last else k + 1, table=table)
        ids = [self.free.pop(0) for _ in range(len(direct) + 1)]
        for k, (gpa, length, writable) in enumerate(direct):
            self.write_desc(ids[k], gpa, length, (VIRTQ_DESC_F_WRITE if writable else 0) | VIRTQ_DESC_F_NEXT,
                            ids[k + 1])
        self.write_desc(ids[-1], table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)
        return ids[0]

    def offer(self, *heads: int) -> None:
        for head in heads:
            self.put16(self.avail + 4 + 2 * (self.avail_idx % self.num), head)
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.put16(self.avail + 2, self.avail_idx)

    def used_entries(self) -> list[tuple[int, int]]:
        """(id, len) of the used entries since the last call; their descriptors are free again."""
        out = []
        idx = self.get16(self.used + 2)
        while self.last_used != idx:
            elem = self.used + 4 + 8 * (self.last_used % self.num)
            out.append(struct.unpack("<II", self.get(elem, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def reclaim(self, head: int) -> None:
        i = head
        while True:
            self.free.append(i)
            _addr, _len, flags, nxt = struct.unpack("<QIHH", self.get(self.desc + 16 * i, 16))
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            i = nxt

    @property
    def used_event(self) -> int:
        return self.get16(self.avail + 4 + 2 * self.num)

    @used_event.setter
    def used_event(self, value: int) -> None:
        self.put16(self.avail + 4 + 2 * self.num, value)

    @property
    def avail_event(self) -> int:
        return self.get16(self.used + 4 + 8 * self.num)

    def request(self, out: bytes, in_len: int) -> tuple[int, int, int]:
        """A header-and-status style chain: out bytes, then in_len writable bytes; (head, out gpa, in gpa)."""
        og, ig = self.alloc(len(out), out), self.alloc(in_len)
        return self.add([(og, len(out), False), (ig, in_len, True)]), og, ig


def chain_bytes(chain: Chain) -> tuple[bytes, int]:
    return chain.gather(), chain.writable_len


# -- guest memory ---------------------------------------------------------------------


def test_regions_refuse_overlap_and_bad_buffers() -> None:
    mem = GuestMemory()
    a = bytearray(0x1000)
    mem.add_region(0x1000, 0x1000, 0x50000, a)
    mem.add_region(0x3000, 0x1000, 0x60000, bytearray(0x1000))
    gen = mem.generation
    for gpa, size in ((0x1800, 0x1000), (0x0800, 0x1000), (0x0, 0x10000), (0x2800, 0x1000), (0x1000, 0x10)):
        with pytest.raises(GuestMemoryError, match="overlaps"):
            mem.add_region(gpa, size, 0x90000, bytearray(size))
    mem.add_region(0x2000, 0x1000, 0x70000, bytearray(0x1000))  # fills the gap exactly
    with pytest.raises(GuestMemoryError, match="read-only"):
        mem.add_region(0x9000, 0x10, 0, bytes(0x10))  # type: ignore[arg-type]
    with pytest.raises(GuestMemoryError, match="holds only"):
        mem.add_region(0x9000, 0x100, 0, bytearray(0x10))
    with pytest.raises(GuestMemoryError, match="empty"):
        mem.add_region(0x9000, 0, 0, bytearray(0x10))
    assert len(mem) == 3 and mem.generation == gen + 1
    assert [r.gpa for r in mem.regions] == [0x1000, 0x2000, 0x3000]
    removed = mem.remove_region(0x2000)
    assert removed.uva == 0x70000 and len(mem) == 2
    with pytest.raises(GuestMemoryError, match="no memory region starts"):
        mem.remove_region(0x2000)
    with pytest.raises(GuestMemoryError):
        mem.remove_region(0x1800)  # regions go by their start
    assert len(mem.clear()) == 2 and len(mem) == 0


def test_gpa_view_stays_inside_one_region() -> None:
    mem = GuestMemory()
    ram = bytearray(0x1000)
    mem.add_region(0x1000, 0x1000, 0x50000, ram)
    mem.add_region(0x2000, 0x1000, 0x90000, bytearray(0x1000))  # adjoins in GPA, not in UVA
    view = mem.gpa_view(0x1FF0, 0x10)  # the last 16 bytes
    view[:] = b"x" * 16
    assert ram[-16:] == b"x" * 16  # a view is the guest's memory, not a copy
    for gpa, n in ((0x1FF1, 0x10), (0x0FFF, 2), (0x0, 1), (0x3000, 1), (0x2FFF, 2)):
        with pytest.raises(GuestMemoryError, match="not inside one"):
            mem.gpa_view(gpa, n)
    with pytest.raises(GuestMemoryError, match="negative"):
        mem.gpa_view(0x1000, -1)
    assert mem.gpa_view(0x1000, 0).nbytes == 0
    # Across the seam: two views, and read/write follow them.
    views = mem.gpa_views(0x1FF8, 0x10)
    assert [v.nbytes for v in views] == [8, 8]
    mem.write(0x1FFC, b"ABCDEFGH")
    assert mem.read(0x1FFC, 8) == b"ABCDEFGH"
    with pytest.raises(GuestMemoryError, match="outside guest memory"):
        mem.gpa_views(0x2FF8, 0x10)


def test_userspace_addresses_translate() -> None:
    mem = GuestMemory()
    mem.add_region(0x100000, 0x2000, 0x7F0000001000, bytearray(0x2000))
    mem.add_region(0x0, 0x1000, 0x7F0000100000, bytearray(0x1000))
    assert mem.uva_to_gpa(0x7F0000001000, 0x2000) == 0x100000
    assert mem.uva_to_gpa(0x7F0000002FF0, 0x10) == 0x101FF0
    assert mem.uva_to_gpa(0x7F0000100010, 4) == 0x10
    mem.uva_view(0x7F0000100010, 4)[:] = b"abcd"
    assert mem.read(0x10, 4) == b"abcd"
    for uva, n in ((0x7F0000002FF0, 0x11), (0x7F0000000FFF, 1), (0x1000, 1)):
        with pytest.raises(GuestMemoryError, match="front-end address"):
            mem.uva_to_gpa(uva, n)


# -- popping and pushing ------------------------------------------------------------------


def test_a_simple_chain_round_trip() -> None:
    d = Driver()
    assert d.q.pop() is None and not d.q.has_pending()
    head, _og, ig = d.request(b"header!!", 5)
    d.offer(head)
    assert d.q.has_pending()
    chain = d.q.pop()
    assert chain is not None and chain.head == head
    assert chain_bytes(chain) == (b"header!!", 5)
    assert chain.scatter(b"hello world") == 5  # only what fits
    assert d.get(ig, 5) == b"hello"
    assert d.q.in_flight == 1 and d.q.pop() is None
    d.q.push(head, 5)
    assert d.used_entries() == [(head, 5)] and d.q.in_flight == 0
    assert d.q.get_base() == 1


def test_segments_and_scatter_across_them() -> None:
    d = Driver()
    bufs = [(d.alloc(3, b"abc"), 3, False), (d.alloc(4, b"defg"), 4, False),
            (d.alloc(2), 2, True), (d.alloc(3), 3, True), (d.alloc(1), 1, True)]
    d.offer(d.add(bufs))
    chain = d.q.pop()
    assert chain is not None
    assert [v.nbytes for v in chain.readable] == [3, 4] and [v.nbytes for v in chain.writable] == [2, 3, 1]
    assert chain.gather() == b"abcdefg"
    assert chain.scatter(b"XYZ", offset=1) == 3
    assert d.get(bufs[2][0], 2) == b"\0X" and d.get(bufs[3][0], 3) == b"YZ\0"
    chain.release()
    with pytest.raises((ValueError, TypeError)):
        chain.gather()  # released views are gone


def test_zero_length_descriptors_add_no_views() -> None:
    d = Driver()
    d.offer(d.add([(d.alloc(4, b"data"), 4, False), (0xDEAD0000, 0, True), (d.alloc(1), 1, True)]))
    chain = d.q.pop()
    assert chain is not None and [v.nbytes for v in chain.writable] == [1]


def test_a_buffer_straddling_two_regions_is_two_views() -> None:
    d = Driver()
    extra = bytearray(0x1000)
    d.mem.add_region(RAM_GPA + RAM_SIZE, 0x1000, 0x10000000, extra)
    d.put(RAM_GPA + RAM_SIZE - 4, b"1234")
    extra[:4] = b"5678"
    d.offer(d.add([(RAM_GPA + RAM_SIZE - 4, 8, False), (d.alloc(1), 1, True)]))
    chain = d.q.pop()
    assert chain is not None
    assert [v.nbytes for v in chain.readable] == [4, 4] and chain.gather() == b"12345678"


def test_indirect_tables() -> None:
    d = Driver(indirect=True)
    bufs = [(d.alloc(4, b"head"), 4, False), (d.alloc(6, b"er+dat"), 6, False), (d.alloc(9), 9, True)]
    head = d.add_indirect(bufs)
    direct = [(d.alloc(2, b"<<"), 2, False)]
    head2 = d.add_indirect([(d.alloc(2, b">>"), 2, False), (d.alloc(1), 1, True)], direct=direct)
    d.offer(head, head2)
    chain = d.q.pop()
    assert chain is not None and chain.head == head and chain_bytes(chain) == (b"header+dat", 9)
    # Direct descriptors, then one naming an indirect table (the spec's "unusual but valid").
    chain2 = d.q.pop()
    assert chain2 is not None and chain2.head == head2 and chain_bytes(chain2) == (b"<<>>", 1)


@pytest.mark.parametrize(("case", "match"), [
    ("feature off", "VIRTIO_F_INDIRECT_DESC is off"),
    ("with next", "both INDIRECT and NEXT"),
    ("nested", "indirect table inside an indirect table"),
    ("len 24", "not a nonzero multiple of 16"),
    ("len 0", "not a nonzero multiple of 16"),
    ("outside", "outside guest memory"),
    ("loop", "longer than its indirect table"),
    ("next past table", "past its indirect table of 2"),
])
def test_bad_indirect_descriptors_break_the_queue(case: str, match: str) -> None:
    d = Driver(indirect=case != "feature off")
    table = d.alloc(64)
    status = d.alloc(1)
    d.write_desc(0, status, 1, VIRTQ_DESC_F_WRITE, table=table)
    length, flags = 16, VIRTQ_DESC_F_INDIRECT
    if case == "with next":
        flags |= VIRTQ_DESC_F_NEXT
        d.write_desc(1, status, 1, VIRTQ_DESC_F_WRITE)
    elif case == "nested":
        d.write_desc(0, table + 32, 16, VIRTQ_DESC_F_INDIRECT, table=table)
    elif case == "len 24":
        length = 24
    elif case == "len 0":
        length = 0
    elif case == "loop":
        length = 32
        d.write_desc(0, status, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1, table=table)
        d.write_desc(1, status, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0, table=table)
    elif case == "next past table":
        length = 32
        d.write_desc(0, status, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2, table=table)
    d.write_desc(0, 0x10 if case == "outside" else table, length, flags, 1)
    d.offer(0)
    with pytest.raises(QueueBroken, match=match):
        d.q.pop()


def test_loops_and_bad_indices_break_the_queue() -> None:
    d = Driver(num=4)
    status = d.alloc(1)
    d.write_desc(0, status, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    d.write_desc(1, status, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0)
    d.offer(0)
    with pytest.raises(QueueBroken, match="longer than the queue size"):
        d.q.pop()
    # Sticky: nothing more is taken from or given to the ring ...
    with pytest.raises(QueueBroken):
        d.q.pop()
    with pytest.raises(QueueBroken):
        d.q.push(0, 0)
    assert d.q.broken is not None
    # ... until the queue is configured anew (the driver reset the device).
    d.q.set_base(1)
    assert d.q.broken is None and d.q.pop() is None

    d = Driver(num=4)
    d.write_desc(0, status, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 4)
    d.offer(0)
    with pytest.raises(QueueBroken, match="links to descriptor 4, past its queue of 4"):
        d.q.pop()

    d = Driver(num=4)
    d.offer(4)
    with pytest.raises(QueueBroken, match="names descriptor 4"):
        d.q.pop()


def test_a_chain_exactly_num_long_is_fine() -> None:
    d = Driver(num=4)
    bufs = [(d.alloc(1, b"r"), 1, False)] * 3 + [(d.alloc(1), 1, True)]
    d.offer(d.add(bufs))
    chain = d.q.pop()
    assert chain is not None and chain.gather() == b"rrr"


def test_per_request_errors_leave_the_queue_working() -> None:
    d = Driver(num=16)
    status = d.alloc(4)
    bad = d.add([(d.alloc(16, b"h" * 16), 16, False), (RAM_GPA + RAM_SIZE - 8, 16, True), (status, 4, True)])
    swapped = d.add([(d.alloc(1), 1, True), (d.alloc(16), 16, False)])
    nowhere = d.add([(0x10, 16, False), (0x20, 1, True)])
    good, _og, _ig = d.request(b"ok", 1)
    d.offer(bad, swapped, nowhere, good)

    with pytest.raises(ChainError, match="outside guest memory") as err:
        d.q.pop()
    assert err.value.head == bad and d.q.in_flight == 1
    assert err.value.tail is not None
    err.value.tail[0] = 1  # e.g. virtio-blk's IOERR, in the last byte of the last writable buffer
    assert d.get(status + 3, 1) == b"\x01"
    d.q.push(bad, 1)

    with pytest.raises(ChainError, match="device-readable buffer follows") as err:
        d.q.pop()
    assert err.value.head == swapped and err.value.tail is not None
    d.q.push(swapped, 0)

    with pytest.raises(ChainError) as err:
        d.q.pop()
    assert err.value.head == nowhere and err.value.tail is None  # no status byte to be had
    d.q.push(nowhere, 0)

    chain = d.q.pop()
    assert chain is not None and chain.head == good
    d.q.push(good, 1)
    assert [e[0] for e in d.used_entries()] == [bad, swapped, nowhere, good]
    assert d.q.in_flight == 0 and d.q.broken is None


def test_a_chain_of_more_than_4_gib_is_refused() -> None:
    try:
        big = mmap.mmap(-1, 3 << 29)  # 1.5 GiB, never touched
    except (OSError, OverflowError):
        pytest.skip("no room for a 1.5 GiB anonymous mapping")
    try:
        d = Driver()
        region = d.mem.add_region(0x100000000, 3 << 29, 0x200000000, big)
        d.offer(d.add([(0x100000000, 3 << 29, False)] * 3 + [(d.alloc(1), 1, True)]))
        with pytest.raises(ChainError, match="more than 2\\^32"):
            d.q.pop()
        del region
        d.mem.remove_region(0x100000000)
        d.q.detach()
    finally:
        big.close()


def test_avail_index_running_ahead_breaks_the_queue() -> None:
    d = Driver(num=8)
    d.put16(d.avail + 2, 8)  # exactly num ahead: a full ring
    for i in range(8):
        d.put16(d.avail + 4 + 2 * i, 0)
    d.write_desc(0, d.alloc(1), 1, VIRTQ_DESC_F_WRITE)
    assert d.q.has_pending()
    d = Driver(num=8)
    d.put16(d.avail + 2, 9)
    with pytest.raises(QueueBroken, match="more than the queue size 8 ahead"):
        d.q.has_pending()
    d = Driver(num=8, start=100)
    d.put16(d.avail + 2, 99)  # backwards reads as 65535 ahead
    with pytest.raises(QueueBroken, match="from 100 to 99"):
        d.q.pop()


def test_indices_wrap_at_16_bits() -> None:
    d = Driver(num=8, start=65530)
    seen = []
    for round_ in range(4):  # 12 chains through 65530 .. 65535, 0 .. 5
        heads = []
        for k in range(3):
            head, _og, _ig = d.request(bytes([round_, k]), 1)
            heads.append(head)
        d.offer(*heads)
        for head in heads:
            chain = d.q.pop()
            assert chain is not None and chain.head == head
            d.q.push(head, round_ * 10 + heads.index(head))
        entries = d.used_entries()
        assert entries == [(h, round_ * 10 + k) for k, h in enumerate(heads)]
        for head in heads:
            d.reclaim(head)
        seen.append(d.q.last_avail_idx)
    assert seen == [65533, 0, 3, 6]
    assert d.get16(d.used + 2) == 6 and d.q.used_idx == 6 and d.q.get_base() == 6


def test_used_ring_entries_and_push_many() -> None:
    d = Driver(num=8)
    heads = []
    for _ in range(3):
        head, _og, _ig = d.request(b"x", 1)
        heads.append(head)
    d.offer(*heads)
    chains = [d.q.pop() for _ in heads]
    assert all(c is not None for c in chains)
    d.q.push_many([(heads[2], 7), (heads[0], 0xFFFFFFFF)])  # out of order, one idx update
    assert d.get16(d.used + 2) == 2
    assert struct.unpack("<IIII", d.get(d.used + 4, 16)) == (heads[2], 7, heads[0], 0xFFFFFFFF)
    with pytest.raises(VirtqueueError, match="past the queue size"):
        d.q.push(8, 0)
    with pytest.raises(VirtqueueError, match="32-bit"):
        d.q.push(heads[1], 1 << 32)


# -- notifications ------------------------------------------------------------------------------


@pytest.mark.parametrize(("event", "new", "old", "expected"), [
    (0, 1, 0, True),          # the first buffer used: 1-0-1=0 < 1
    (0, 2, 1, False),         # already past it: 2-0-1=1, not < 1
    (5, 7, 4, True),          # 6 and 7 crossed 5's entry: 7-5-1=1 < 3
    (6, 7, 4, True),          # 7-6-1=0 < 3
    (7, 7, 4, False),         # wants entry 7, idx is only at 7: 7-7-1=65535
    (10, 7, 4, False),        # 7-10-1=65532, not < 3
    (65535, 1, 65534, True),  # across the wrap: 1-65535-1=1 < 3
    (2, 1, 65534, False),     # 1-2-1=65534, not < 3
    (3, 3, 3, False),         # nothing new
])
def test_vring_need_event_by_hand(event: int, new: int, old: int, expected: bool) -> None:
    assert vring_need_event(event, new, old) is expected


def test_event_idx_notifications() -> None:
    d = Driver(num=8, event_idx=True)
    heads = []
    for _ in range(4):
        head, _og, _ig = d.request(b"x", 1)
        heads.append(head)
    d.offer(*heads)
    for _ in heads:
        assert d.q.pop() is not None
    assert d.q.pop() is None
    assert d.avail_event == 4  # drained: kick us when entry 4 is made available
    d.used_event = 1  # interrupt me once entry 1 is used (idx reaches 2)
    d.q.push(heads[0], 1)
    assert d.q.should_notify()  # no record of what the driver saw yet: notify
    assert not d.q.should_notify()  # nothing new since
    d.q.push(heads[1], 1)  # used idx 1 -> 2 crosses used_event 1
    assert d.q.should_notify()
    d.q.push(heads[2], 1)  # 2 -> 3: not asked for
    assert not d.q.should_notify()
    d.used_event = 5
    d.q.push(heads[3], 1)  # 3 -> 4: entry 3 written, 5 still ahead
    assert not d.q.should_notify()
    for head in heads:
        d.reclaim(head)
    # The avail flags do not count with EVENT_IDX.
    d.put16(d.avail, VIRTQ_AVAIL_F_NO_INTERRUPT)
    d.used_event = 4
    head, _og, _ig = d.request(b"y", 1)
    d.offer(head)
    assert d.q.pop() is not None
    d.q.push(head, 1)  # 4 -> 5 crosses 4
    assert d.q.should_notify()


def test_flags_notifications_without_event_idx() -> None:
    d = Driver(num=8)
    head, _og, _ig = d.request(b"x", 1)
    d.offer(head)
    assert d.q.pop() is not None and d.q.pop() is None
    assert d.avail_event == 0  # untouched without EVENT_IDX
    d.q.push(head, 1)
    assert d.q.should_notify() and not d.q.should_notify()
    d.reclaim(head)
    d.put16(d.avail, VIRTQ_AVAIL_F_NO_INTERRUPT)
    head, _og, _ig = d.request(b"x", 1)
    d.offer(head)
    assert d.q.pop() is not None
    d.q.push(head, 1)
    assert not d.q.should_notify()


def test_a_chain_added_while_avail_event_is_written_is_not_missed() -> None:
    """The driver publishes an entry between our empty check and avail_event
    becoming visible: it may skip the kick, so the queue looks again after
    the barrier."""
    calls: list[int] = []
    holder: list[Driver] = []

    def barrier() -> None:
        calls.append(1)
        if len(calls) == 1:
            drv = holder[0]
            head, _og, _ig = drv.request(b"late", 1)
            drv.offer(head)

    d = Driver(num=8, event_idx=True, barrier=barrier)
    holder.append(d)
    chain = d.q.pop()
    assert chain is not None and chain.gather() == b"late"
    assert d.q.pop() is None and d.avail_event == 1
    d.q.push(chain.head, 1)
    d.q.should_notify()
    assert len(calls) == 3  # two empty checks, one should_notify


# -- configuration and memory changes ------------------------------------------------------


def test_queue_configuration_is_checked() -> None:
    q = SplitVirtqueue(GuestMemory())
    for num in (0, 3, 65536, 32769, -8):
        with pytest.raises(VirtqueueError, match="power of two"):
            q.set_num(num)
    q.set_num(32768)
    with pytest.raises(VirtqueueError, match="16-bit"):
        q.set_base(65536)
    with pytest.raises(VirtqueueError, match="no ring addresses"):
        q.pop()


def test_rings_outside_memory_or_misaligned_break_the_queue() -> None:
    d = Driver(num=8)
    d.q.set_addresses(d.uva(d.desc), d.uva(d.avail), d.uva(RAM_GPA + RAM_SIZE - 16))
    with pytest.raises(QueueBroken, match="used ring"):
        d.q.resolve()
    d.q.set_addresses(d.uva(d.desc + 8), d.uva(d.avail), d.uva(d.used))
    with pytest.raises(QueueBroken, match="not 16-byte aligned"):
        d.q.pop()
    d.q.set_addresses(d.desc, d.avail, d.used, userspace=False)  # GPAs, when the front end says so
    assert d.q.pop() is None


def test_the_queue_follows_a_memory_table_change() -> None:
    d = Driver(num=8)
    head, _og, _ig = d.request(b"before", 1)
    d.offer(head)
    chain = d.q.pop()
    assert chain is not None
    d.q.push(head, 1)
    chain.release()
    # SET_MEM_TABLE again: the same RAM, mapped at a new place in our process
    # (a new buffer) and the same front-end addresses.
    d.mem.clear()
    d.q.detach()  # drops the views of the old buffer ...
    old = d.ram
    d.ram = bytearray(old)
    d.mem.add_region(RAM_GPA, RAM_SIZE, RAM_UVA, d.ram)
    # ... and the next use finds the rings in the new one by itself.
    d.reclaim(head)
    head, _og, _ig = d.request(b"after", 1)
    d.offer(head)
    chain = d.q.pop()
    assert chain is not None and chain.gather() == b"after"
    d.q.push(head, 1)
    assert d.get16(d.used + 2) == 2 and old[d.at(d.used) + 2] == 1  # the old copy is no longer written


def test_a_region_can_be_closed_once_views_are_released() -> None:
    backing = mmap.mmap(-1, RAM_SIZE)
    mem = GuestMemory()
    q = SplitVirtqueue(mem)
    mem.add_region(RAM_GPA, RAM_SIZE, RAM_UVA, backing)
    q.set_num(8)
    q.set_addresses(RAM_GPA, RAM_GPA + 0x100, RAM_GPA + 0x200, userspace=False)
    q.resolve()
    mem.remove_region(RAM_GPA)
    with pytest.raises(BufferError):
        backing.close()  # the queue's ring views still hold it
    q.detach()
    backing.close()


# -- random chains ------------------------------------------------------------------------------


@st.composite
def chains(draw: st.DrawFn) -> list[tuple[bytes, bool]]:
    readable = draw(st.lists(st.binary(min_size=1, max_size=40), max_size=4))
    writable = draw(st.lists(st.integers(1, 40), min_size=0 if readable else 1, max_size=4))
    return [(data, False) for data in readable] + [(bytes(n), True) for n in writable]


@settings(max_examples=150, deadline=None)
@given(start=st.integers(0, 0xFFFF), batches=st.lists(st.lists(chains(), min_size=1, max_size=4), min_size=1,
                                                      max_size=5),
       indirect=st.lists(st.booleans(), min_size=20, max_size=20))
def test_random_chains_round_trip(start: int, batches: list[list[list[tuple[bytes, bool]]]],
                                  indirect: list[bool]) -> None:
    d = Driver(num=32, start=start, indirect=True)
    n = 0
    for batch in batches:
        expected = []
        heads = []
        for bufs in batch:
            layout = [(d.alloc(len(data), data) if not w else d.alloc(len(data)), len(data), w) for data, w in bufs]
            use_indirect = indirect[n % len(indirect)]
            n += 1
            head = d.add_indirect(layout) if use_indirect else d.add(layout)
            heads.append(head)
            expected.append((b"".join(data for data, w in bufs if not w), sum(len(data) for data, w in bufs if w)))
        d.offer(*heads)
        got = []
        for head in heads:
            chain = d.q.pop()
            assert chain is not None and chain.head == head
            got.append(chain_bytes(chain))
            d.q.push(head, chain.writable_len)
        assert d.q.pop() is None
        assert got == expected
        assert d.used_entries() == [(h, e[1]) for h, e in zip(heads, expected)]
        for head in heads:
            d.reclaim(head)
        d.heap = (d.used + 6 + 8 * d.num + 0xFFF) & ~0xFFF  # buffers are free again too
    assert d.q.get_base() == (start + n) & 0xFFFF


def test_a_loop_in_a_huge_indirect_table_is_found_within_16_bit_reach() -> None:
    """An indirect table may claim up to 4 GiB, but `next` is a 16-bit index: a walk
    longer than 2^16 entries is a loop, whatever the length says (a review of the
    fuzz target found it: a 64 MiB self-linked table took seconds per pop)."""
    ram = bytearray(2 << 20)
    mem = GuestMemory()
    mem.add_region(0, len(ram), 0x7000_0000_0000, ram)
    q = SplitVirtqueue(mem)
    q.set_num(8)
    q.set_features(1 << VIRTIO_F_INDIRECT_DESC)
    q.set_addresses(0, 0x1000, 0x2000, userspace=False)
    table, entries = 0x10000, 96 << 10  # 1.5 MiB of table, in guest memory
    struct.pack_into("<QIHH", ram, table, 0x3000, 1, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 0)  # links to itself
    struct.pack_into("<QIHH", ram, 0, table, entries * 16, VIRTQ_DESC_F_INDIRECT, 0)
    struct.pack_into("<HHH", ram, 0x1000, 0, 1, 0)  # avail: flags, idx 1, ring[0] = head 0
    with pytest.raises(QueueBroken, match=r"longer than its indirect table \(65536\)"):
        q.pop()
