"""The split virtqueue and virtio-blk requests, the device side, against a hostile
guest driver: the input is the queue's configuration and the raw guest memory
(descriptor table, rings, indirect tables, request headers, data).

Input layout (little-endian), a 38-byte header, then guest memory:

    0   u8   log2 of the queue size (mod 9: 1..256)
    1   u8   flags: 1 VIRTIO_F_INDIRECT_DESC, 2 VIRTIO_F_EVENT_IDX, 4 ring addresses are
             GPAs (else front-end UVAs, as SET_VRING_ADDR gives them), 8 a second region,
             16 the second region adjoins the first in GPA (else it is at gpa1),
             32 a read-only disk, 64 DISCARD and WRITE_ZEROES offered, 128 writethrough
    2   u16  ring base (SET_VRING_BASE: last_avail_idx)
    4   u16  size0, 6 u16 size1: region sizes, 1 + value % MAX_REGION bytes
    8   u32  gpa0, 12 u32 gpa1, 16 u32 uva0, 20 u32 uva1
    24  u32  desc, 28 u32 avail, 32 u32 used: offsets from the start (a UVA, or with
             flag 4 a GPA) of region 0, or with bit 31 set of region 1
    36  u8   disk: bits 0-2 sectors - 1; 8 the config's capacity is a sector more than
             the disk holds; 16 the disk is read-only though the config is not;
             bits 5-7 which target call (1..7) fails with EIO (0: none)
    37  u8   limits: max segments 1 + bits 0-1, max sectors per segment 1 + bits 2-7
    38  ...  region 0's bytes, then region 1's (zero-padded to the region sizes)

The device side then runs as vhost_user_blk's `_drain` does: resolve the rings,
pop() until None (at most 2 * num chains, and no more once the chains have held
`DESCRIPTOR_BUDGET` descriptors), parse and execute each request against a
bytearray disk, push() and should_notify().

Documented outcomes: a `VirtqueueError` for a configuration refused up front
(overlapping regions); `ChainError` from pop(), answered and pushed as the
server does; `QueueBroken` (and virtio-blk's `MissingStatus`) stops the queue,
which then stays broken, whatever is called, until it is configured anew.
Checked besides, after every step, against the bytearrays that are the whole
world (each region has guard bytes either side of it):

- every view the queue hands out lies inside one region, exactly where an
  independent walk of the descriptors says (straddling buffers in pieces);
  the ring checks (resolve, a None from pop, the head popped) agree with the
  ring bytes;
- the only bytes that change are the ones the step may write: pop the
  avail_event (EVENT_IDX), execute the chain's device-writable buffers, a
  ChainError's status byte, push the used element and used idx (which then
  hold what was pushed); the guards never;
- the disk is asked only for ranges inside it, never to write when read-only,
  and for no more bytes than the chain holds (reads: its writable part
  less the status byte; writes: its readable part less the header); what a
  write stored is the chain's data; the used length is at least the status
  byte and at most the writable part, and the status byte holds the status;
- should_notify() answers by the avail flags / used_event rules.

Then the native path (qbackend.servers.vhost_user_blk_fast: the chain walk
and plain requests in C, everything else handed to the model in order) is
judged against the model on the same input: served both ways
(qbackend.testing.virtqueue_differential, over a raw file of the disk's
size), the guest memory, disk, indices, broken state and interrupt
decision must be equal.
"""

from __future__ import annotations

import ctypes
import errno
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

from qbackend.models import virtio_blk as blk
from qbackend.models.virtqueue import (
    MAX_CHAIN_BYTES,
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
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from qbackend.servers import vhost_user_blk_fast as fast
from qbackend.testing.virtqueue_differential import Setup, run

HEADER = struct.Struct("<BBHHHIIIIIIIBB")
MAX_REGION = 24 << 10
GUARD = 64
GUARD_BYTE = 0xA5
DESCRIPTOR_BUDGET = 1 << 15
SERIAL = b"fuzz-virtqueue-serial"  # longer than ID_BYTES: GET_ID truncates

F_INDIRECT, F_EVENT_IDX, F_GPA, F_TWO, F_ADJOIN, F_RO, F_DZ, F_WT = (1 << i for i in range(8))

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED = struct.Struct("<II")

Piece = tuple[int, int, int]  # (region index, offset in the region, length)


def _address(view: memoryview) -> int:
    """Where a (non-empty, writable) view's first byte is in this process."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class World:
    """The guest's memory as bytearrays, each GUARD + size + GUARD bytes."""

    def __init__(self) -> None:
        self.bufs: list[bytearray] = []
        self.gpas: list[int] = []
        self.uvas: list[int] = []
        self.sizes: list[int] = []
        self._bases: list[int] = []

    def add(self, gpa: int, size: int, uva: int, content: bytes) -> memoryview:
        guard = bytes([GUARD_BYTE]) * GUARD
        buf = bytearray(guard + content[:size].ljust(size, b"\0") + guard)
        self.bufs.append(buf)
        self.gpas.append(gpa)
        self.uvas.append(uva)
        self.sizes.append(size)
        self._bases.append(_address(memoryview(buf)) + GUARD)
        # The region's buffer runs on into the tail guard: the model must keep to `size`.
        return memoryview(buf)[GUARD:]

    def by_gpa(self) -> list[int]:
        return sorted(range(len(self.gpas)), key=self.gpas.__getitem__)

    def locate(self, view: memoryview) -> Piece:
        """The region and offset of a view; it must lie wholly inside a region."""
        n = view.nbytes
        assert n > 0, "an empty view"
        p = _address(view)
        for i, base in enumerate(self._bases):
            if base - GUARD <= p < base + self.sizes[i] + GUARD:
                assert base <= p and p + n <= base + self.sizes[i], \
                    f"a view of {n} bytes at {p - base} in region {i} of {self.sizes[i]} bytes"
                return i, p - base, n
        raise AssertionError("a view of memory that is no region's")

    def one(self, gpa: int, n: int) -> tuple[int, int] | None:
        """(region, offset) of [gpa, gpa+n) inside one region."""
        for i in range(len(self.gpas)):
            if self.gpas[i] <= gpa and gpa + n <= self.gpas[i] + self.sizes[i]:
                return i, gpa - self.gpas[i]
        return None

    def pieces(self, gpa: int, n: int) -> list[Piece] | None:
        """[gpa, gpa+n) across regions that adjoin in GPA, in pieces; None if it leaves memory."""
        out: list[Piece] = []
        pos, end = gpa, gpa + n
        while pos < end:
            for i in range(len(self.gpas)):
                if self.gpas[i] <= pos < self.gpas[i] + self.sizes[i]:
                    k = min(end, self.gpas[i] + self.sizes[i]) - pos
                    out.append((i, pos - self.gpas[i], k))
                    pos += k
                    break
            else:
                return None
        return out

    def get(self, piece: Piece) -> bytes:
        i, off, n = piece
        return bytes(self.bufs[i][GUARD + off:GUARD + off + n])

    def u16(self, at: tuple[int, int], offset: int) -> int:
        return int(_U16.unpack_from(self.bufs[at[0]], GUARD + at[1] + offset)[0])

    def snapshot(self) -> list[bytes]:
        return [bytes(b) for b in self.bufs]

    def check_writes(self, before: list[bytes], allowed: list[Piece], step: str) -> None:
        """Only the allowed pieces changed since `before` (guards included in the rest)."""
        for i, buf in enumerate(self.bufs):
            if buf == before[i]:
                continue
            expect = bytearray(before[i])
            for j, off, n in allowed:
                if j == i:
                    expect[GUARD + off:GUARD + off + n] = buf[GUARD + off:GUARD + off + n]
            if expect != buf:
                changed = [k - GUARD for k in range(len(buf)) if buf[k] != expect[k]]
                raise AssertionError(f"{step} wrote region {i} outside what it may, at {changed[:8]}")


@dataclass(frozen=True)
class _Info:
    size: int
    read_only: bool


class Disk:
    """A BlockTarget on a bytearray that checks what it is asked to do."""

    def __init__(self, sectors: int, read_only: bool, fail_at: int) -> None:
        self.data = bytearray(b"\x5a" * (sectors * blk.SECTOR_SIZE))
        self._info = _Info(len(self.data), read_only)
        self.fail_at = fail_at
        self.calls = 0
        self.read_bytes = 0
        self.written_bytes = 0
        self.cleared = 0  # trimmed or zeroed
        self.ranges = 0  # trim / write_zeroes calls

    @property
    def info(self) -> _Info:
        return self._info

    def _call(self, offset: int, length: int, writing: bool) -> None:
        self.calls += 1
        assert 0 <= offset and 0 <= length and offset + length <= len(self.data), (offset, length)
        assert not (writing and self._info.read_only), "a write to a read-only disk"
        if self.calls == self.fail_at:
            raise OSError(errno.EIO, "injected")

    def read(self, offset: int, length: int) -> bytes:
        self._call(offset, length, False)
        self.read_bytes += length
        return bytes(self.data[offset:offset + length])

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        self._call(offset, len(data), True)
        self.written_bytes += len(data)
        self.data[offset:offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        self._call(offset, length, True)
        self.cleared += length
        self.ranges += 1
        self.data[offset:offset + length] = bytes(length)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._call(offset, length, True)
        self.cleared += length
        self.ranges += 1

    def flush(self) -> None:
        self._call(0, 0, False)


@dataclass
class Expected:
    """What an independent walk of one chain finds: 'ok', 'error' (a ChainError) or 'broken'."""

    outcome: str
    readable: list[Piece]
    writable: list[Piece]
    tail: tuple[int, int] | None = None  # where a ChainError's status byte is
    descriptors: int = 0


def _walk(world: World, desc: tuple[int, int], num: int, head: int, indirect: bool) -> Expected:
    """The chain at head by the spec's rules, read from the world's bytes."""
    table = world.get((desc[0], desc[1], desc_table_size(num)))
    limit, index, seen, nested = num, head, 0, False
    readable: list[Piece] = []
    writable: list[Piece] = []
    problem = any_writable = False
    last_writable: tuple[int, int] | None = None
    total = count = 0
    broken = Expected("broken", [], [])
    while True:
        seen += 1
        count += 1
        if seen > limit:
            return broken
        addr, length, flags, nxt = _DESC.unpack_from(table, 16 * index)
        if flags & VIRTQ_DESC_F_INDIRECT:
            if not indirect or nested or flags & VIRTQ_DESC_F_NEXT or not length or length % 16:
                return broken
            parts = world.pieces(addr, length)
            if parts is None:
                return broken
            table = b"".join(world.get(p) for p in parts)
            limit, index, seen, nested = length // 16, 0, 0, True
            continue
        parts = world.pieces(addr, length) if length else []
        if parts is None:
            problem, parts = True, []
        if flags & VIRTQ_DESC_F_WRITE:
            any_writable = True
            writable += parts
            if length:
                last_writable = (addr, length)
        else:
            problem = problem or any_writable
            readable += parts
        total += length
        if not flags & VIRTQ_DESC_F_NEXT:
            break
        index = nxt
        if index >= limit:
            return broken
    if problem or total > MAX_CHAIN_BYTES:
        tail = world.one(last_writable[0] + last_writable[1] - 1, 1) if last_writable else None
        return Expected("error", [], [], tail, count)
    return Expected("ok", readable, writable, None, count)


def _ring(world: World, addr: int, size: int, align: int, gpa_mode: bool) -> tuple[int, int] | None:
    """Where a ring part is, by vhost-user's rules: a UVA range inside one region
    (the first by GPA) or a GPA range inside one region; None if not, or misaligned."""
    if gpa_mode:
        gpa = addr
    else:
        for i in world.by_gpa():
            if world.uvas[i] <= addr and addr + size <= world.uvas[i] + world.sizes[i]:
                gpa = world.gpas[i] + addr - world.uvas[i]
                break
        else:
            return None
    at = world.one(gpa, size)
    return at if at is not None and gpa % align == 0 else None


def _merge(pieces: list[Piece]) -> list[Piece]:
    """Adjacent pieces of one region as one (descriptor boundaries are not kept)."""
    out: list[Piece] = []
    for i, off, n in pieces:
        if out and out[-1][0] == i and out[-1][1] + out[-1][2] == off:
            out[-1] = (i, out[-1][1], out[-1][2] + n)
        else:
            out.append((i, off, n))
    return out


def test_one_input(data: bytes) -> None:
    if len(data) < HEADER.size:
        return
    (order, flags, base, size0, size1, gpa0, gpa1, uva0, uva1, desc_off, avail_off, used_off, disk_bits,
     limits) = HEADER.unpack_from(data)
    num = 1 << (order % 9)
    sizes = [1 + size0 % MAX_REGION, 1 + size1 % MAX_REGION]
    content = data[HEADER.size:]
    world, mem = World(), GuestMemory()
    mem.add_region(gpa0, sizes[0], uva0, world.add(gpa0, sizes[0], uva0, content[:sizes[0]]))
    if flags & F_TWO:
        if flags & F_ADJOIN:
            gpa1 = gpa0 + sizes[0]
        view = world.add(gpa1, sizes[1], uva1, content[sizes[0]:sizes[0] + sizes[1]])
        overlap = gpa1 < gpa0 + sizes[0] and gpa0 < gpa1 + sizes[1]
        try:
            mem.add_region(gpa1, sizes[1], uva1, view)
        except GuestMemoryError:
            assert overlap, "a region that overlaps none refused"
            return  # the memory table is refused up front
        assert not overlap, "overlapping regions accepted"
    gpa_mode = bool(flags & F_GPA)

    def ring_addr(offset: int) -> int:
        i = 1 if offset >> 31 and len(world.gpas) > 1 else 0
        return (world.gpas[i] if gpa_mode else world.uvas[i]) + (offset & 0x7FFFFFFF)

    q = SplitVirtqueue(mem)
    addrs = ring_addr(desc_off), ring_addr(avail_off), ring_addr(used_off)
    try:
        q.set_num(num)
        q.set_features(bool(flags & F_INDIRECT) << VIRTIO_F_INDIRECT_DESC | bool(flags & F_EVENT_IDX) << VIRTIO_F_EVENT_IDX)
        q.set_base(base)
        q.set_addresses(*addrs, userspace=not gpa_mode)
    except VirtqueueError as exc:
        raise AssertionError(f"a valid configuration refused: {exc}") from exc
    sectors = 1 + (disk_bits & 7)
    dz_sectors, dz_segs = (1 + (limits >> 2), 1 + (limits & 3)) if flags & F_DZ else (0, 0)
    config = blk.BlkConfig(capacity=sectors + bool(disk_bits & 8), readonly=bool(flags & F_RO),
                           max_discard_sectors=dz_sectors, max_discard_seg=dz_segs,
                           max_write_zeroes_sectors=dz_sectors, max_write_zeroes_seg=dz_segs)
    disk = Disk(sectors, bool(flags & F_RO) or bool(disk_bits & 16), disk_bits >> 5)
    device = Device(q, world, disk, config, bool(flags & F_WT), gpa_mode, addrs)
    device.run()
    if device.descriptors <= DESCRIPTOR_BUDGET:  # as many chains as the checked run served
        differential(world, num, base, flags, sectors, bool(disk_bits & 8), addrs, gpa_mode, content, sizes,
                     device.chains)


_WORK: Path | None = None


def differential(world: World, num: int, base: int, flags: int, sectors: int, extra: bool,
                 addrs: tuple[int, int, int], gpa_mode: bool, content: bytes, sizes: list[int],
                 max_chains: int) -> None:
    """The native path against the model on this input (see the module doc)."""
    global _WORK
    if fast.load() is None:
        return
    if _WORK is None:
        _WORK = Path(tempfile.mkdtemp(prefix="fuzz-virtqueue-"))
    gpas = []
    for addr in addrs:
        if gpa_mode:
            gpas.append(addr)
            continue
        for i in world.by_gpa():  # vhost-user's rule: the UVA's region, the first by GPA
            if world.uvas[i] <= addr < world.uvas[i] + world.sizes[i]:
                gpas.append(world.gpas[i] + addr - world.uvas[i])
                break
        else:
            return  # a ring the front end's addresses do not reach: the model breaks it, C never starts
    regions = [(world.gpas[0], content[:sizes[0]].ljust(sizes[0], b"\0"))]
    if len(world.gpas) > 1:
        regions.append((world.gpas[1], content[sizes[0]:sizes[0] + sizes[1]].ljust(sizes[1], b"\0")))
    setup = Setup(regions=regions, num=num, desc=gpas[0], avail=gpas[1], used=gpas[2],
                  disk=bytes(range(256)) * (sectors * blk.SECTOR_SIZE // 256), base=base,
                  indirect=bool(flags & F_INDIRECT), event_idx=bool(flags & F_EVENT_IDX),
                  readonly=bool(flags & F_RO), writethrough=bool(flags & F_WT), capacity_extra=int(extra),
                  max_chains=max_chains,
                  pool_min=None)  # the I/O pool (off by default) runs requests side by side: see the tests
    native, python = run(setup, _WORK, native=True), run(setup, _WORK, native=False)
    assert native == python, "the native path and the model disagree"


class Device:
    """The server's side of the queue (vhost_user_blk's _drain), checked step by step."""

    def __init__(self, q: SplitVirtqueue, world: World, disk: Disk, config: blk.BlkConfig, writethrough: bool,
                 gpa_mode: bool, addrs: tuple[int, int, int]) -> None:
        self.q, self.world, self.disk, self.config, self.writethrough = q, world, disk, config, writethrough
        num = self.num = q.num
        self.desc = _ring(world, addrs[0], desc_table_size(num), 16, gpa_mode)
        self.avail = _ring(world, addrs[1], avail_ring_size(num), 2, gpa_mode)
        self.used = _ring(world, addrs[2], used_ring_size(num), 4, gpa_mode)
        self.notified = False  # should_notify() has run since the rings were resolved
        self.descriptors = 0  # walked, by the independent walk
        self.chains = 0  # popped (answered or breaking the queue)

    def run(self) -> None:
        q, world = self.q, self.world
        try:
            q.resolve()
        except QueueBroken:
            assert None in (self.desc, self.avail, self.used), "rings inside memory and aligned refused"
            self.check_sticky()
            return
        assert self.desc is not None and self.avail is not None and self.used is not None, \
            "rings outside memory or misaligned accepted"
        assert q.used_idx == world.u16(self.used, 2)
        for _ in range(2 * self.num):
            if self.descriptors > DESCRIPTOR_BUDGET:
                break
            self.chains += 1
            if not self.step():
                break
        if q.broken is not None:
            self.check_sticky()

    def _head(self, last: int) -> int:
        assert self.avail is not None
        return self.world.u16(self.avail, 4 + 2 * (last % self.num))

    def _walk(self, head: int) -> Expected:
        assert self.desc is not None
        expected = _walk(self.world, self.desc, self.num, head, self.q.indirect)
        self.descriptors += expected.descriptors
        return expected

    def step(self) -> bool:
        """One pop() and what follows; False when the queue stops (empty or broken)."""
        q, world, num = self.q, self.world, self.num
        assert self.avail is not None and self.used is not None
        avail_event = [(self.used[0], self.used[1] + 4 + 8 * num, 2)] if q.event_idx else []
        last = q.last_avail_idx
        before = world.snapshot()
        try:
            chain = q.pop()
        except ChainError as exc:
            world.check_writes(before, avail_event, "pop")
            assert exc.head == self._head(last), "a ChainError for another head"
            assert q.last_avail_idx == (last + 1) & 0xFFFF
            expected = self._walk(exc.head)
            assert expected.outcome == "error", (expected.outcome, str(exc))
            tail = None
            if exc.tail is not None:
                i, off, n = world.locate(exc.tail)
                assert n == 1
                tail = (i, off)
            assert tail == expected.tail, (tail, expected.tail)
            # Answered as the server does: IOERR where the status byte is, and pushed.
            before = world.snapshot()
            if exc.tail is not None:
                exc.tail[0] = blk.Status.IOERR
            self.push(before, exc.head, 1 if tail is not None else 0, [(*tail, 1)] if tail is not None else [])
            return True
        except QueueBroken as exc:
            world.check_writes(before, avail_event, "pop")
            assert q.broken is not None
            # Something in the ring justifies it: a jump of avail idx, a head past the
            # table, or a chain the independent walk finds broken too.
            jump = (world.u16(self.avail, 2) - last) & 0xFFFF > num
            head = self._head(last)
            assert jump or head >= num or self._walk(head).outcome == "broken", str(exc)
            return False
        world.check_writes(before, avail_event, "pop")
        if chain is None:
            assert q.last_avail_idx == last
            assert world.u16(self.avail, 2) == last, "pop() found nothing with entries available"
            if q.event_idx:
                assert world.u16(self.used, 4 + 8 * num) == last, "avail_event not set when the ring ran dry"
            assert not q.has_pending()
            return False
        assert q.last_avail_idx == (last + 1) & 0xFFFF and q.in_flight == 1
        assert chain.head == self._head(last), "a chain for another head"
        expected = self._walk(chain.head)
        assert expected.outcome == "ok", expected.outcome
        readable = [world.locate(v) for v in chain.readable]
        writable = [world.locate(v) for v in chain.writable]
        assert _merge(readable) == _merge(expected.readable), (readable, expected.readable)
        assert _merge(writable) == _merge(expected.writable), (writable, expected.writable)
        return self.serve(chain, writable)

    def serve(self, chain: Chain, writable: list[Piece]) -> bool:
        """Parse, execute and push one chain; False if it broke the queue (MissingStatus)."""
        q, world, disk = self.q, self.world, self.disk
        before = world.snapshot()
        try:
            request = blk.parse_request(chain, self.config)
        except blk.MissingStatus as exc:
            assert chain.writable_len == 0
            q.mark_broken(str(exc))
            return False
        payload = chain.gather()[blk.HEADER_SIZE:]
        reads, writes, cleared, ranges = disk.read_bytes, disk.written_bytes, disk.cleared, disk.ranges
        status, used = blk.execute(request, disk, writethrough=self.writethrough, serial=SERIAL)
        world.check_writes(before, writable, "execute")
        i, off, n = writable[-1]
        assert world.get((i, off + n - 1, 1)) == bytes([status]), "the status byte does not hold the status"
        assert request.status is None or status == request.status
        assert 1 <= used <= chain.writable_len, (used, chain.writable_len)
        # The disk was asked for no more than the chain holds.
        read, written = disk.read_bytes - reads, disk.written_bytes - writes
        assert read <= chain.writable_len - 1 and written <= max(0, chain.readable_len - blk.HEADER_SIZE)
        assert disk.ranges - ranges <= len(request.segments)
        assert disk.cleared - cleared <= sum(s.length for s in request.segments)
        if status is blk.Status.OK and request.type == blk.RequestType.IN:
            assert used == read + 1 == request.data_len + 1
        if status is blk.Status.OK and request.type == blk.RequestType.OUT:
            assert written == len(payload) and disk.data[request.offset:request.offset + written] == payload
            assert used == 1
        del request
        chain.release()
        self.push(world.snapshot(), chain.head, used, [])
        return True

    def push(self, before: list[bytes], head: int, written: int, also: list[Piece]) -> None:
        """push() and should_notify(): only the used element and idx (and `also`) change."""
        q, world, num = self.q, self.world, self.num
        assert self.avail is not None and self.used is not None
        i, off = self.used
        used_before = q.used_idx
        slot = 4 + 8 * (used_before % num)
        q.push(head, written)
        world.check_writes(before, [*also, (i, off + slot, 8), (i, off + 2, 2)], "push")
        assert _USED.unpack(world.get((i, off + slot, 8))) == (head, written)
        assert world.u16(self.used, 2) == q.used_idx == (used_before + 1) & 0xFFFF
        assert q.in_flight == 0
        before = world.snapshot()
        notify = q.should_notify()
        world.check_writes(before, [], "should_notify")
        if not q.event_idx:
            assert notify == (not world.u16(self.avail, 0) & VIRTQ_AVAIL_F_NO_INTERRUPT)
        elif self.notified:
            # One entry since the last call: interrupt iff used_event is the index it passed.
            assert notify == (world.u16(self.avail, 4 + 2 * num) == used_before)
        else:
            assert notify, "the first should_notify() after a (re)start must interrupt"
        self.notified = True

    def check_sticky(self) -> None:
        """A broken queue raises QueueBroken from everything and writes nothing, until reconfigured."""
        q, world = self.q, self.world
        assert q.broken is not None
        before = world.snapshot()
        calls = (q.pop, q.has_pending, lambda: q.push(0, 0), lambda: q.push_many(()), q.should_notify, q.pop)
        for k, call in enumerate(calls):
            try:
                call()
            except QueueBroken:
                continue
            raise AssertionError(f"a broken queue ({q.broken}) let call {k} through")
        world.check_writes(before, [], "a broken queue")
        # A new configuration is a new start.
        q.set_base(q.get_base())
        assert q.broken is None
        try:
            chain = q.pop()
        except (ChainError, QueueBroken):
            return
        if chain is not None:
            chain.release()
