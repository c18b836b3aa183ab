"""The native vhost-user-blk path (servers/vhost_user_blk_fast.c) against the Python
model, differentially: random and hostile split rings (loops, index jumps, heads
and links past the table, bad indirect tables, buffers at the edge of guest
memory, straddling two regions or outside it, device-readable after
device-writable, short headers, every request type) give the same used ring,
statuses, guest memory, disk, indices, broken state and interrupt decision
through the native path (with its hand-over to the model) as through the model
alone (qbackend.testing.virtqueue_differential).  A raw disk and a QED image
with some clusters allocated (the rest goes to Python for writes and reads).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qbackend.block.blockfile import FileBlock
from qbackend.block.qed import QedImage
from qbackend.models import virtio_blk as blk
from qbackend.models.virtqueue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE
from qbackend.servers import vhost_user_blk_fast as fast
from qbackend.testing.virtqueue_differential import Setup, run

pytestmark = pytest.mark.skipif(fast.load() is None, reason="the native helper is not loaded here")

R0, R0_SIZE = 0x10000, 0x6000
R1_ADJOIN, R1_APART, R1_SIZE = R0 + R0_SIZE, 0x40000, 0x3000
DESC, AVAIL, USED = R0, R0 + 0x400, R0 + 0x800
DATA0 = R0 + 0x1000
SECTORS = 64
CLUSTER = 4096
_DESC = struct.Struct("<QIHH")
TYPES = [blk.RequestType.IN, blk.RequestType.OUT, blk.RequestType.FLUSH, blk.RequestType.GET_ID,
         blk.RequestType.DISCARD, blk.RequestType.WRITE_ZEROES, 77]


@pytest.fixture(scope="module")
def qed_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A QED image of SECTORS sectors, 4 KiB clusters, some allocated (mapped), some not."""
    path = tmp_path_factory.mktemp("qed") / "template.qed"
    f = FileBlock.open(path, create=True)
    QedImage.create(f, SECTORS * 512, cluster_size=CLUSTER)
    f.close()
    with QedImage.open_path(path) as image:
        for cluster in (0, 1, 3, 6):
            image.write(cluster * CLUSTER, bytes([0x40 + cluster]) * CLUSTER)
    return path


@dataclass
class Buf:
    gpa: int
    length: int
    write: bool


class Guest:
    """Builds a ring in two regions of guest memory (what a driver would, and worse)."""

    def __init__(self, adjoin: bool, num: int) -> None:
        self.r1 = R1_ADJOIN if adjoin else R1_APART
        self.mem = {R0: bytearray(R0_SIZE), self.r1: bytearray(R1_SIZE)}
        self.num = num
        self.free = list(range(num))
        self.next0, self.next1 = DATA0, self.r1
        self.avail_idx = 0

    def poke(self, gpa: int, data: bytes) -> None:
        for base, buf in self.mem.items():
            if base <= gpa and gpa + len(data) <= base + len(buf):
                buf[gpa - base:gpa - base + len(data)] = data
                return

    def alloc(self, n: int, where: str) -> int:
        """A buffer of n bytes: in region 0 or 1, at a region's very end, straddling the two, outside."""
        if where == "end0":
            return R0 + R0_SIZE - n
        if where == "end1":
            return self.r1 + R1_SIZE - n
        if where == "straddle":
            return self.r1 - max(1, n // 2)
        if where == "outside":
            return 0x90000
        if where == "r1" and self.next1 + n <= self.r1 + R1_SIZE:
            gpa, self.next1 = self.next1, self.next1 + n
            return gpa
        if self.next0 + n <= R0 + R0_SIZE - 0x200:
            gpa, self.next0 = self.next0, self.next0 + n
            return gpa
        return R0 + R0_SIZE - n

    def chain(self, bufs: list[Buf], indirect: bool) -> int | None:
        """Put a chain in the table (or one indirect table); its head, or None if the table is full."""
        if indirect:
            if not self.free:
                return None
            head = self.free.pop(0)
            table = self.alloc(16 * len(bufs), "r0")
            for i, b in enumerate(bufs):
                flags = (VIRTQ_DESC_F_WRITE if b.write else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0)
                self.poke(table + 16 * i, _DESC.pack(b.gpa, b.length, flags, i + 1))
            self.poke(DESC + 16 * head, _DESC.pack(table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT, 0))
            return head
        if len(self.free) < len(bufs):
            return None
        slots = [self.free.pop(0) for _ in bufs]
        for i, b in enumerate(bufs):
            flags = (VIRTQ_DESC_F_WRITE if b.write else 0) | (VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0)
            nxt = slots[i + 1] if i + 1 < len(bufs) else 0
            self.poke(DESC + 16 * slots[i], _DESC.pack(b.gpa, b.length, flags, nxt))
        return slots[0]

    def offer(self, head: int) -> None:
        self.poke(AVAIL + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx += 1


request = st.fixed_dictionaries({
    "type": st.sampled_from(TYPES + [blk.RequestType.IN, blk.RequestType.OUT] * 3),
    "sector": st.one_of(st.integers(0, SECTORS - 10), st.integers(0, SECTORS - 10), st.integers(0, SECTORS + 2),
                        st.just(SECTORS - 1), st.integers(0, 2 ** 64 - 1)),
    "sectors": st.integers(0, 9),
    "odd": st.sampled_from([0] * 8 + [1, 100]),  # bytes past whole sectors
    "header_split": st.sampled_from([16, 16, 16, 8, 3]),
    "pieces": st.integers(1, 3),
    "status_apart": st.booleans(),
    "indirect": st.booleans(),
    "where": st.sampled_from(["r0"] * 6 + ["r1", "r1", "end0", "end1", "straddle", "outside"]),
    "wrong_way": st.sampled_from([False, False, False, True]),
    "no_status": st.sampled_from([False] * 19 + [True]),
    "segments": st.binary(min_size=0, max_size=40),
    "fill": st.integers(0, 255),
})

hostile = st.one_of(st.just([]), st.just([]), st.lists(
    st.tuples(st.integers(0, 15), st.sampled_from(["addr", "len", "flags", "next"]), st.integers(0, 2 ** 32)),
    max_size=3))


@dataclass
class Case:
    setup: Setup
    requests: int


def build(data: st.DataObject, disk: bytes | None, qed: Path | None) -> Setup:
    # The I/O pool too: reads and writes of a drain side by side, pushed in ring order.  Then
    # requests in flight together get buffers of their own: where two share bytes, which
    # writes last is the order the device ran them in, as with any device that runs requests
    # side by side (the model runs them one by one).
    pool_min = data.draw(st.sampled_from([None, 512, 1]), "pool_min")
    num = data.draw(st.sampled_from([4, 8, 16]), "num")
    g = Guest(data.draw(st.booleans(), "adjoin"), num)
    base = data.draw(st.sampled_from([0, 0, 0xFFFE, 7]), "base")
    g.avail_idx = base
    reqs = data.draw(st.lists(request, min_size=1, max_size=8), "requests")
    for r in reqs:
        n = r["sectors"] * 512 + r["odd"]
        if pool_min is not None and r["where"] in ("end0", "end1", "straddle"):
            r = {**r, "where": "r1"}
        header = struct.pack("<IIQ", r["type"], 0, r["sector"] % 2 ** 64)
        bufs: list[Buf] = []
        hs = r["header_split"]
        for part in (header[:hs], header[hs:]):
            if part:
                gpa = g.alloc(len(part), "r0")
                g.poke(gpa, part)
                bufs.append(Buf(gpa, len(part), False))
        payload_write = r["type"] in (blk.RequestType.IN, blk.RequestType.GET_ID)
        if r["wrong_way"]:
            payload_write = not payload_write
        if r["type"] in (blk.RequestType.DISCARD, blk.RequestType.WRITE_ZEROES):
            n = len(r["segments"])
        if n:
            pieces = min(r["pieces"], n)
            step = n // pieces
            for k in range(pieces):
                length = step if k + 1 < pieces else n - step * (pieces - 1)
                last_piece = k == pieces - 1  # one byte more: room for a status byte merged into it
                gpa = g.alloc(length + last_piece, r["where"] if last_piece else "r0")
                content = r["segments"] if r["type"] in (blk.RequestType.DISCARD, blk.RequestType.WRITE_ZEROES) \
                    else bytes([r["fill"] ^ k]) * length
                g.poke(gpa, content[:length])
                bufs.append(Buf(gpa, length, payload_write))
        if not r["no_status"]:
            if r["status_apart"] or not bufs or not bufs[-1].write:
                gpa = g.alloc(1, r["where"] if r["where"].startswith("end") else "r0")
                g.poke(gpa, b"\xee")
                bufs.append(Buf(gpa, 1, True))
            else:
                bufs[-1].length += 1
        if not bufs:
            continue
        head = g.chain(bufs, r["indirect"])
        if head is None:
            break
        g.offer(head)
    avail_idx = g.avail_idx
    jump = data.draw(st.sampled_from([0] * 18 + [num + 1, 0x8000]), "jump")
    g.poke(AVAIL + 2, struct.pack("<H", (avail_idx + jump) & 0xFFFF))
    for index, name, value in data.draw(hostile if pool_min is None else st.just([]), "hostile"):
        slot = DESC + 16 * (index % num)
        raw = bytearray(_DESC.size)
        for base_gpa, buf in g.mem.items():
            if base_gpa <= slot < base_gpa + len(buf):
                raw[:] = buf[slot - base_gpa:slot - base_gpa + 16]
        addr, length, flags, nxt = _DESC.unpack(raw)
        if name == "addr":
            addr = [R0 + R0_SIZE - 1, g.r1 - 8, 0, value][value % 4]
        elif name == "len":
            length = value % 2 ** 32
        elif name == "flags":
            flags = value % 8
        else:
            nxt = value % (num + 3)
        g.poke(slot, _DESC.pack(addr, length, flags, nxt))
    flags = data.draw(st.sampled_from([0, 0, 1]), "avail flags")
    g.poke(AVAIL, struct.pack("<H", flags))
    g.poke(AVAIL + 4 + 2 * num, struct.pack("<H", data.draw(st.integers(0, 0xFFFF), "used_event")))
    return Setup(regions=[(gpa, bytes(buf)) for gpa, buf in g.mem.items()], num=num, desc=DESC, avail=AVAIL,
                 used=USED, disk=disk or b"", qed=qed, base=base,
                 indirect=data.draw(st.sampled_from([True, True, True, False]), "indirect feature"),
                 event_idx=data.draw(st.booleans(), "event_idx"),
                 readonly=data.draw(st.sampled_from([False, False, False, True]), "readonly"),
                 writethrough=data.draw(st.booleans(), "writethrough"),
                 capacity_extra=data.draw(st.sampled_from([0, 0, 0, 1]), "capacity_extra"),
                 pool_min=pool_min)


@pytest.fixture
def work(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    yield tmp_path_factory.mktemp("diff")


DISK = bytes(i * 7 % 251 for i in range(SECTORS * 512))
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                           HealthCheck.too_slow,
                                                                           HealthCheck.data_too_large])


@SETTINGS
@given(data=st.data())
def test_native_equals_python_on_raw(data: st.DataObject, work: Path) -> None:
    setup = build(data, DISK, None)
    native = run(setup, work, native=True)
    python = run(setup, work, native=False)
    assert native == python
    event(f"served in C: {min(native.native_requests, 3)}{'+' if native.native_requests >= 3 else ''}; "
          f"broken: {native.broken}")


@SETTINGS
@given(data=st.data())
def test_native_equals_python_on_qed(data: st.DataObject, work: Path, qed_template: Path) -> None:
    setup = build(data, None, qed_template)
    native = run(setup, work, native=True)
    python = run(setup, work, native=False)
    assert native == python
    event(f"served in C: {min(native.native_requests, 3)}{'+' if native.native_requests >= 3 else ''}; "
          f"broken: {native.broken}")


def test_plain_requests_are_served_natively(work: Path) -> None:
    """A well-formed ring of reads, writes, a flush and GET_ID: all in C, none handed over."""
    g = Guest(False, 16)
    heads = []
    for kind, sector, write in ((blk.RequestType.IN, 3, True), (blk.RequestType.OUT, 9, False),
                                (blk.RequestType.FLUSH, 0, None), (blk.RequestType.GET_ID, 0, True)):
        header = g.alloc(16, "r0")
        g.poke(header, struct.pack("<IIQ", kind, 0, sector))
        bufs = [Buf(header, 16, False)]
        if write is not None:
            n = 20 if kind == blk.RequestType.GET_ID else 1024
            gpa = g.alloc(n, "r1")
            g.poke(gpa, b"\x5a" * n)
            bufs.append(Buf(gpa, n, write))
        status = g.alloc(1, "r0")
        bufs.append(Buf(status, 1, True))
        heads.append(g.chain(bufs, False))
        g.offer(heads[-1] or 0)
    g.poke(AVAIL + 2, struct.pack("<H", g.avail_idx))
    setup = Setup(regions=[(gpa, bytes(buf)) for gpa, buf in g.mem.items()], num=16, desc=DESC, avail=AVAIL,
                  used=USED, disk=DISK)
    native, python = run(setup, work, native=True), run(setup, work, native=False)
    assert native == python
    assert native.native_requests == 4 and native.used_idx == 4 and not native.broken
    assert native.disk[9 * 512:11 * 512] == b"\x5a" * 1024
