"""Guest memory and the split virtqueue, as a vhost-user back end sees them.  Pure: no I/O.

Facts are those of the virtio 1.x specification, "Split Virtqueues" (the
descriptor table, available and used rings, indirect descriptors and
used/available buffer notification suppression), and of the vhost-user
protocol (QEMU's docs/interop/vhost-user.rst) for where addresses come from:

- `GuestMemory` is the front end's memory table (SET_MEM_TABLE,
  ADD_MEM_REG / REM_MEM_REG): regions of guest-physical addresses (GPAs),
  each also known by the front end's own userspace address (UVA), each
  handed in by the caller as a buffer (a memoryview over the mmap of the
  region's fd; a bytearray in tests).  Nothing here maps or unmaps.
- `SplitVirtqueue` is one queue: SET_VRING_NUM, SET_VRING_BASE /
  GET_VRING_BASE, SET_VRING_ADDR (UVAs, unless the front end says
  otherwise), and the negotiated VIRTIO_F_INDIRECT_DESC (28) and
  VIRTIO_F_EVENT_IDX (29).  `pop()` takes the next descriptor chain the
  driver made available, `push()` returns one in the used ring, and
  `should_notify()` says whether the driver wants an interrupt for what
  was pushed.

Errors, one root `VirtqueueError`:

- `GuestMemoryError`: an address range outside guest memory, or a region
  that does not fit the table.  `pop()` never lets one escape; it turns it
  into one of the next two.
- `ChainError` (per request): the chain is well formed, but a buffer lies
  outside guest memory, a device-readable buffer follows a device-writable
  one, or the chain adds up to more than 2^32 bytes.  The head has been
  consumed: the device answers it (virtio-blk writes IOERR into
  `ChainError.tail` when that byte could be found) and pushes it, and the
  queue goes on.
- `QueueBroken` (the queue): the rings themselves cannot be trusted: the
  available index ran more than `num` ahead of ours (or backwards), a head
  or `next` index is `num` or more, a chain loops (is longer than its
  table), an indirect descriptor is malformed (length zero or not a
  multiple of 16, INDIRECT with NEXT, an indirect table inside an indirect
  table, INDIRECT without the feature, a table outside memory), or a ring
  area is outside guest memory or misaligned.  There is no head one could
  answer with confidence, so the device sets DEVICE_NEEDS_RESET and
  notifies a configuration change (QEMU's virtio_error() does the same
  for all of these).  It is sticky: every later call raises it again until
  the queue is configured anew (set_num / set_base / set_addresses / reset).

Memory ordering.  Python has no barriers, so this model relies on three
things: each ring access is one C call (struct.unpack_from / pack_into on a
memoryview), so the interpreter performs them in program order; on a
little-endian host struct's "<H" uses the native 2-byte memcpy (its "swap in
faster functions" table), so a 16-bit index is one load or store and the
driver never sees a torn idx; and x86's TSO keeps loads in order with loads
and stores with stores, which is what reading avail idx before its ring
entries, and writing a used element before used idx, need.  What TSO does
not give is a store followed by a load of another location: writing
avail_event then re-reading avail idx, and writing used idx then reading
used_event or the avail flags.  Those two places call the queue's
`barrier`, which the server sets to a real full fence (any locked
instruction; e.g. acquiring and releasing a threading.Lock); left at the
default it orders nothing, and a notification can be lost in the window.

Views and mmaps: a memoryview slice keeps its mmap from closing (mmap.close
raises BufferError while any view of it is alive).  Before closing a removed
region's mmap the server lets go of every view of it: the ring views
(`resolve()` after the memory change, or `detach()`) and the buffers of
chains still in flight (`Chain.release()`, or just dropping them).
"""

from __future__ import annotations

import bisect
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NoReturn

from qbackend.errors import ModelError
from qbackend.models.inflight import InflightRegion, Recovery

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

VIRTQ_DESC_F_NEXT = 1
VIRTQ_DESC_F_WRITE = 2
VIRTQ_DESC_F_INDIRECT = 4
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
VIRTQ_USED_F_NO_NOTIFY = 1

# Feature bits of the ring and of virtio itself ("Reserved Feature Bits").
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32

MAX_QUEUE_SIZE = 32768  # the highest power of two that 16-bit indices can tell full from empty with
DESC_SIZE = 16
INDIRECT_REACH = 1 << 16  # entries of an indirect table that a 16-bit `next` can name
USED_ELEM_SIZE = 8
MAX_CHAIN_BYTES = 1 << 32  # "Drivers MUST NOT add a descriptor chain longer than 2^32 bytes in total"

# Alignment of each part (the spec's table; the driver MUST keep to it).
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id, len
_U64_LIMIT = 1 << 64


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    return 6 + 2 * num  # flags, idx, ring[num], used_event


def used_ring_size(num: int) -> int:
    return 6 + USED_ELEM_SIZE * num  # flags, idx, ring[num], avail_event


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Whether moving an index from old_idx to new_idx crossed event_idx (mod 2^16):
    the "notify when idx passes event" rule of VIRTIO_F_EVENT_IDX."""
    return (new_idx - event_idx - 1) & 0xFFFF < (new_idx - old_idx) & 0xFFFF


def no_barrier() -> None:
    """The default `SplitVirtqueue.barrier`: orders nothing beyond program order (see the module doc)."""


# -- errors ----------------------------------------------------------------------


class VirtqueueError(ModelError):
    """The root of this module's errors; raised itself for a caller's mistake
    (a queue used before it is configured, a bad queue size or used entry)."""


class GuestMemoryError(VirtqueueError):
    """An address range that is not inside guest memory, or a region the table refuses."""


class QueueBroken(VirtqueueError):
    """The driver broke the ring: the device must set DEVICE_NEEDS_RESET.  Sticky."""


class ChainError(VirtqueueError):
    """One descriptor chain cannot be used as it is; the queue is still sound.

    The head has been consumed: answer it and push it.  `tail` is the last
    byte of the chain's last device-writable buffer when that byte is in
    guest memory (where virtio-blk's status goes), else None.
    """

    def __init__(self, head: int, message: str, tail: memoryview | None = None) -> None:
        super().__init__(f"descriptor chain {head}: {message}")
        self.head = head
        self.tail = tail


# -- guest memory -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MemoryRegion:
    gpa: int
    size: int
    uva: int
    buffer: memoryview  # exactly `size` bytes, format "B"

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory:
    """The front end's memory table: non-overlapping GPA ranges, sorted.

    Lookups by GPA are the hot path (every descriptor): a last-hit check,
    then bisect over the region starts.  Lookups by UVA happen only when a
    queue resolves its ring addresses, so they scan.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._regions: list[MemoryRegion] = []  # parallel to _starts
        self._last: MemoryRegion | None = None
        self.generation = 0
        """Bumped by every change, so a queue can tell its ring views are stale."""

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        return tuple(self._regions)

    def add_region(self, gpa: int, size: int, uva: int, buffer: WriteableBuffer) -> MemoryRegion:
        """Add a region; `buffer` holds it from its first byte (the caller applies
        vhost-user's mmap_offset) and may be longer than `size`."""
        if size <= 0 or gpa < 0 or gpa + size > _U64_LIMIT or uva < 0 or uva + size > _U64_LIMIT:
            raise GuestMemoryError(f"memory region {gpa:#x}+{size:#x} (uva {uva:#x}) is empty or past 2^64")
        view = memoryview(buffer)
        if view.readonly:
            raise GuestMemoryError(f"memory region {gpa:#x}+{size:#x}: the buffer is read-only")
        if view.format != "B" or view.ndim != 1:
            if not view.c_contiguous:
                raise GuestMemoryError(f"memory region {gpa:#x}+{size:#x}: the buffer is not contiguous")
            view = view.cast("B")
        if view.nbytes < size:
            raise GuestMemoryError(f"memory region {gpa:#x}+{size:#x}: the buffer holds only {view.nbytes:#x} bytes")
        i = bisect.bisect_right(self._starts, gpa)
        if (i > 0 and self._regions[i - 1].end > gpa) or (i < len(self._starts) and self._starts[i] < gpa + size):
            raise GuestMemoryError(f"memory region {gpa:#x}+{size:#x} overlaps a region already in the table")
        region = MemoryRegion(gpa, size, uva, view[:size])
        self._starts.insert(i, gpa)
        self._regions.insert(i, region)
        self.generation += 1
        return region

    def remove_region(self, gpa: int) -> MemoryRegion:
        """Remove the region that starts at gpa, releasing the view the table
        took of its buffer (slices that chains or queues still hold stay valid
        until they are released)."""
        i = bisect.bisect_left(self._starts, gpa)
        if i == len(self._starts) or self._starts[i] != gpa:
            raise GuestMemoryError(f"no memory region starts at {gpa:#x}")
        del self._starts[i]
        region = self._regions.pop(i)
        self._last = None
        self.generation += 1
        region.buffer.release()
        return region

    def clear(self) -> list[MemoryRegion]:
        """Remove every region (SET_MEM_TABLE replaces the whole table)."""
        return [self.remove_region(gpa) for gpa in list(self._starts)]

    def find(self, gpa: int, length: int) -> MemoryRegion:
        """The one region holding all of [gpa, gpa+length)."""
        if length < 0:
            raise GuestMemoryError(f"negative length {length} at guest address {gpa:#x}")
        last = self._last
        if last is not None and last.gpa <= gpa and gpa + length <= last.end:
            return last
        i = bisect.bisect_right(self._starts, gpa)
        if i > 0:
            region = self._regions[i - 1]
            if gpa + length <= region.end:
                self._last = region
                return region
        raise GuestMemoryError(f"guest address {gpa:#x}+{length:#x} is not inside one memory region")

    def gpa_view(self, gpa: int, length: int) -> memoryview:
        """A view of [gpa, gpa+length), which must lie inside one region."""
        region = self.find(gpa, length)
        start = gpa - region.gpa
        return region.buffer[start:start + length]

    def gpa_views(self, gpa: int, length: int) -> list[memoryview]:
        """Views covering [gpa, gpa+length) across regions that adjoin in GPA
        (two DIMMs side by side are two regions; a guest buffer may straddle them)."""
        if length < 0:
            raise GuestMemoryError(f"negative length {length} at guest address {gpa:#x}")
        views = []
        pos, end = gpa, gpa + length
        while pos < end:
            i = bisect.bisect_right(self._starts, pos)
            region = self._regions[i - 1] if i > 0 else None
            if region is None or region.end <= pos:
                raise GuestMemoryError(f"guest address {gpa:#x}+{length:#x} runs outside guest memory at {pos:#x}")
            n = min(end, region.end) - pos
            views.append(region.buffer[pos - region.gpa:pos - region.gpa + n])
            pos += n
        return views

    def uva_to_gpa(self, uva: int, length: int) -> int:
        """The GPA of a front-end userspace range, which must lie inside one region."""
        for region in self._regions:
            if region.uva <= uva and uva + length <= region.uva + region.size and length >= 0:
                return region.gpa + (uva - region.uva)
        raise GuestMemoryError(f"front-end address {uva:#x}+{length:#x} is not inside one memory region")

    def uva_view(self, uva: int, length: int) -> memoryview:
        return self.gpa_view(self.uva_to_gpa(uva, length), length)

    def read(self, gpa: int, length: int) -> bytes:
        return b"".join(self.gpa_views(gpa, length))

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        pos = 0
        for view in self.gpa_views(gpa, len(data)):
            view[:] = data[pos:pos + view.nbytes]
            pos += view.nbytes


# -- the split virtqueue ------------------------------------------------------------------


@dataclass(frozen=True)
class RingAddresses:
    """SET_VRING_ADDR: where the three parts are; front-end UVAs unless `userspace` is False (GPAs)."""

    desc: int
    avail: int
    used: int
    userspace: bool = True


@dataclass(frozen=True, eq=False)
class Chain:
    """One available descriptor chain: its head index, and views of guest memory
    for its device-readable buffers, then its device-writable ones (in chain
    order; a buffer straddling two regions is two views).  Descriptor
    boundaries are not kept: the framing of a message is independent of them."""

    head: int
    readable: tuple[memoryview, ...]
    writable: tuple[memoryview, ...]

    @property
    def readable_len(self) -> int:
        return sum(v.nbytes for v in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(v.nbytes for v in self.writable)

    def gather(self) -> bytes:
        """All the device-readable bytes as one."""
        return b"".join(self.readable)

    def scatter(self, data: bytes | bytearray | memoryview, offset: int = 0) -> int:
        """Write data into the device-writable buffers from `offset`; how many bytes fit."""
        pos = 0
        for view in self.writable:
            if offset >= view.nbytes:
                offset -= view.nbytes
                continue
            n = min(view.nbytes - offset, len(data) - pos)
            view[offset:offset + n] = data[pos:pos + n]
            pos += n
            offset = 0
            if pos == len(data):
                break
        return pos

    def release(self) -> None:
        """Let go of guest memory (see the module doc on views and mmaps)."""
        for view in (*self.readable, *self.writable):
            view.release()


class SplitVirtqueue:
    """One split virtqueue of a vhost-user device.

    Configure it in any order (set_num, set_base, set_features,
    set_addresses), then `resolve()` to find the rings in guest memory; the
    queue also resolves itself on first use and whenever the memory table's
    generation changed, but the server calls `resolve()` (or `detach()`)
    itself after a memory change so the old views go before it closes the
    old mmaps.  Not thread-safe: one task owns a queue (workers may fill a
    popped chain's buffers, but push() happens back on the owner).
    """

    def __init__(self, memory: GuestMemory, *, barrier: Callable[[], None] = no_barrier) -> None:
        self.memory = memory
        self.barrier = barrier
        """A full memory fence (store then load), provided by the server; see the module doc."""
        self.num = 0
        self.addresses: RingAddresses | None = None
        self.event_idx = False
        self.indirect = False
        self.last_avail_idx = 0
        """The next available ring entry to take (SET_VRING_BASE sets it, GET_VRING_BASE returns it)."""
        self.used_idx = 0
        """The next used ring entry to fill; read back from the used ring on resolve()."""
        self.in_flight = 0
        """Chains popped and not yet pushed (ChainError heads included)."""
        self.broken: str | None = None
        self._desc: memoryview | None = None
        self._avail: memoryview | None = None
        self._used: memoryview | None = None
        self._generation = -1  # of the memory table the views came from; -1: none
        self._avail_idx = 0  # the driver's avail idx as last read
        self._signalled_used = 0  # used idx when should_notify() last ran
        self._signalled_valid = False
        self.ring_gpas: tuple[int, int, int] | None = None
        """Where resolve() found the descriptor table, available and used rings (GPAs)."""
        self.resolutions = 0
        """How many times resolve() has succeeded: a native twin reloads the rings when it moves."""
        self.inflight: InflightRegion | None = None
        """The inflight region that records what is taken and returned (`track_inflight`)."""
        self.inflight_counter = 1
        """The counter the next chain taken gets in the region."""
        self.resubmit: list[int] = []
        """Heads the region said were in flight: pop() takes them again first, in this order."""

    # -- configuration (vhost-user messages) -----------------------------------------

    def set_num(self, num: int) -> None:
        if num <= 0 or num > MAX_QUEUE_SIZE or num & (num - 1):
            raise VirtqueueError(f"queue size {num} is not a power of two in 1..{MAX_QUEUE_SIZE}")
        self.num = num
        self._reconfigured()

    def set_base(self, last_avail_idx: int) -> None:
        if not 0 <= last_avail_idx <= 0xFFFF:
            raise VirtqueueError(f"ring base {last_avail_idx} is not a 16-bit index")
        self.last_avail_idx = self._avail_idx = last_avail_idx
        self._reconfigured()

    def get_base(self) -> int:
        return self.last_avail_idx

    def set_features(self, features: int) -> None:
        """The negotiated feature bits: only the ring's own (28, 29) matter here."""
        self.indirect = bool(features >> VIRTIO_F_INDIRECT_DESC & 1)
        self.event_idx = bool(features >> VIRTIO_F_EVENT_IDX & 1)

    def set_addresses(self, desc: int, avail: int, used: int, *, userspace: bool = True) -> None:
        self.addresses = RingAddresses(desc, avail, used, userspace)
        self._reconfigured()

    def reset(self) -> None:
        self.detach()
        self.num = 0
        self.addresses = None
        self.event_idx = self.indirect = False
        self.last_avail_idx = self.used_idx = self.in_flight = self._avail_idx = 0
        self.broken = None
        self._signalled_valid = False
        self.inflight = None
        self.resubmit = []

    def _reconfigured(self) -> None:
        # A new configuration is a new start: whatever broke the old one is gone with it
        # (and what is to be taken again is read from the inflight region at the next start).
        self.broken = None
        self._signalled_valid = False
        self.resubmit = []
        self.detach()

    @property
    def configured(self) -> bool:
        return bool(self.num) and self.addresses is not None

    def detach(self) -> None:
        """Drop the ring views (before the memory they are in is unmapped)."""
        for view in (self._desc, self._avail, self._used):
            if view is not None:
                view.release()
        self._desc = self._avail = self._used = None
        self._generation = -1

    def resolve(self) -> None:
        """Find the three parts in guest memory; QueueBroken if one is not inside
        one region or is misaligned."""
        if not self.configured:
            raise VirtqueueError("the queue has no size or no ring addresses yet")
        assert self.addresses is not None
        self.detach()
        mem, num, addrs = self.memory, self.num, self.addresses
        views: list[memoryview] = []
        gpas: list[int] = []
        for name, addr, size, align in (("descriptor table", addrs.desc, desc_table_size(num), DESC_ALIGN),
                                        ("available ring", addrs.avail, avail_ring_size(num), AVAIL_ALIGN),
                                        ("used ring", addrs.used, used_ring_size(num), USED_ALIGN)):
            try:
                gpa = mem.uva_to_gpa(addr, size) if addrs.userspace else addr
                view = mem.gpa_view(gpa, size)
            except GuestMemoryError as exc:
                for v in views:
                    v.release()
                self._break(f"the {name} ({size:#x} bytes at {addr:#x}) is not in guest memory: {exc}")
            views.append(view)
            gpas.append(gpa)
            if gpa % align:
                for v in views:
                    v.release()
                self._break(f"the {name} at guest address {gpa:#x} is not {align}-byte aligned")
        self._desc, self._avail, self._used = views
        self.ring_gpas = (gpas[0], gpas[1], gpas[2])
        self.resolutions += 1
        # On a fresh start the driver's used idx is where we go on from (0 for a new
        # ring, the old value after a reconnect); mid-run it is ours, written by push().
        self.used_idx = _U16.unpack_from(self._used, 2)[0]
        self._avail_idx = self.last_avail_idx
        self._signalled_valid = False
        self._generation = mem.generation

    def ready(self) -> None:
        """Raise QueueBroken if the queue is broken; resolve the rings if the memory
        table changed since (what every ring access does first)."""
        self._ready()

    def track_inflight(self, region: InflightRegion | None) -> Recovery | None:
        """Record taken and returned chains in `region` from now on (None: stop), after
        reading it back against the rings (qbackend.models.inflight): the chains it says
        were in flight are taken again first, oldest first, and the available position
        is where they end.  InflightRefused leaves the queue untracked and as it was."""
        self.inflight = None
        self.resubmit = []
        if region is None:
            return None
        self._ready()
        assert self._avail is not None and self._used is not None
        used_idx: int = _U16.unpack_from(self._used, 2)[0]
        avail_idx: int = _U16.unpack_from(self._avail, 2)[0]
        recovery = region.recover(self.num, used_idx, avail_idx)
        self.inflight = region
        if recovery is None:
            self.inflight_counter = 1
            return None
        self.resubmit = list(recovery.resubmit)
        self.last_avail_idx = self._avail_idx = recovery.last_avail_idx
        self.used_idx = used_idx
        self.inflight_counter = recovery.next_counter
        return recovery

    def start_fresh_inflight(self, region: InflightRegion) -> None:
        """Track in `region` after making it a fresh one (what a refused region becomes)."""
        self._ready()
        assert self._used is not None
        region.initialize(self.num, _U16.unpack_from(self._used, 2)[0])
        self.inflight = region
        self.inflight_counter = 1
        self.resubmit = []

    def ring_indices(self) -> tuple[int, int] | None:
        """The driver's avail idx and the used idx as the rings hold them now (None when the
        rings are not resolved): for logs."""
        if self._avail is None or self._used is None:
            return None
        avail: int = _U16.unpack_from(self._avail, 2)[0]
        used: int = _U16.unpack_from(self._used, 2)[0]
        return avail, used

    def sync_indices(self, last_avail_idx: int, used_idx: int) -> None:
        """Take over the indices from another server of this ring (the native path,
        which served the chains before `last_avail_idx` and pushed up to `used_idx`)."""
        self.last_avail_idx = self._avail_idx = last_avail_idx & 0xFFFF
        self.used_idx = used_idx & 0xFFFF

    def _ready(self) -> None:
        if self.broken is not None:
            raise QueueBroken(self.broken)
        if self._generation != self.memory.generation:
            self.resolve()

    def _break(self, reason: str) -> NoReturn:
        self.mark_broken(reason)
        raise QueueBroken(reason)

    def mark_broken(self, reason: str) -> None:
        """Break the queue from outside (a request layer found a chain it cannot
        answer, e.g. virtio-blk's MissingStatus): it stays broken like any other."""
        self.broken = reason

    # -- the available side --------------------------------------------------------

    def _read_avail_idx(self) -> int:
        assert self._avail is not None
        idx: int = _U16.unpack_from(self._avail, 2)[0]
        if (idx - self.last_avail_idx) & 0xFFFF > self.num:
            self._break(f"the available index moved from {self.last_avail_idx} to {idx}, "
                        f"more than the queue size {self.num} ahead")
        self._avail_idx = idx
        return idx

    def has_pending(self) -> bool:
        """Whether the driver has made a chain available that pop() has not taken."""
        self._ready()
        return self.last_avail_idx != self._avail_idx or self.last_avail_idx != self._read_avail_idx()

    def pop(self) -> Chain | None:
        """The next available chain, or None when the driver has made none.

        With EVENT_IDX, finding the ring empty also writes avail_event (so
        the driver kicks for the next entry) and looks once more, past the
        barrier, for an entry added meanwhile.
        """
        self._ready()
        assert self._avail is not None and self._used is not None
        if self.resubmit:
            # In flight when the last back end stopped: carried out again before anything new
            # (walked again from the table, with every check).
            self.in_flight += 1
            return self._walk(self.resubmit.pop(0))
        last = self.last_avail_idx
        if last == self._avail_idx and last == self._read_avail_idx():
            if not self.event_idx:
                return None
            _U16.pack_into(self._used, 4 + USED_ELEM_SIZE * self.num, last)
            self.barrier()
            if last == self._read_avail_idx():
                return None
        head: int = _U16.unpack_from(self._avail, 4 + 2 * (last & (self.num - 1)))[0]
        if head >= self.num:
            self._break(f"available ring entry {last} names descriptor {head}, past the queue size {self.num}")
        if self.inflight is not None:
            self.inflight.start(head, self.inflight_counter)
            self.inflight_counter += 1
        self.last_avail_idx = (last + 1) & 0xFFFF
        self.in_flight += 1
        return self._walk(head)

    def _walk(self, head: int) -> Chain:
        mem = self.memory
        table = self._desc
        assert table is not None
        limit = self.num
        index = head
        seen = 0
        in_indirect = False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        any_writable = False
        last_writable: tuple[int, int] | None = None  # (addr, len) of the last non-empty writable buffer
        total = 0
        problem: str | None = None
        while True:
            seen += 1
            if seen > limit:
                where = "its indirect table" if in_indirect else "the queue size"
                self._break(f"descriptor chain {head} is longer than {where} ({limit}): a loop")
            addr, length, flags, nxt = _DESC.unpack_from(table, DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                table = self._indirect_table(head, addr, length, flags, in_indirect)
                # `next` is a 16-bit index: no walk of a table goes past 2^16 steps
                # without looping, however long the driver says the table is.
                limit = min(length // DESC_SIZE, INDIRECT_REACH)
                index = seen = 0
                in_indirect = True
                continue
            if length:
                try:
                    views = [mem.gpa_view(addr, length)]
                except GuestMemoryError:
                    try:
                        views = mem.gpa_views(addr, length)
                    except GuestMemoryError:
                        views = []
                        problem = problem or f"buffer {addr:#x}+{length:#x} is outside guest memory"
            else:
                views = []
            if flags & VIRTQ_DESC_F_WRITE:
                writable += views
                any_writable = True
                if length:
                    last_writable = (addr, length)
            else:
                if any_writable:
                    problem = problem or "a device-readable buffer follows a device-writable one"
                readable += views
            total += length
            if not flags & VIRTQ_DESC_F_NEXT:
                break
            index = nxt
            if index >= limit:
                where = "indirect table" if in_indirect else "queue"
                self._break(f"descriptor chain {head} links to descriptor {index}, past its {where} of {limit}")
        if total > MAX_CHAIN_BYTES and problem is None:
            problem = f"the chain holds {total:#x} bytes, more than 2^32"
        if problem is not None:
            for view in (*readable, *writable):
                view.release()
            tail = None
            if last_writable is not None:
                try:
                    tail = mem.gpa_view(last_writable[0] + last_writable[1] - 1, 1)
                except GuestMemoryError:
                    pass
            raise ChainError(head, problem, tail)
        return Chain(head, tuple(readable), tuple(writable))

    def _indirect_table(self, head: int, addr: int, length: int, flags: int, in_indirect: bool) -> memoryview:
        if not self.indirect:
            self._break(f"descriptor chain {head} uses an indirect table, but VIRTIO_F_INDIRECT_DESC is off")
        if in_indirect:
            self._break(f"descriptor chain {head} has an indirect table inside an indirect table")
        if flags & VIRTQ_DESC_F_NEXT:
            self._break(f"descriptor chain {head} has a descriptor with both INDIRECT and NEXT")
        if length == 0 or length % DESC_SIZE:
            self._break(f"descriptor chain {head} has an indirect table of {length} bytes, "
                        f"not a nonzero multiple of {DESC_SIZE}")
        try:
            return self.memory.gpa_view(addr, length)
        except GuestMemoryError:
            pass
        try:  # straddling two regions: the device only reads it, so a copy will do, of
            # what 16-bit indices can reach (not the 4 GiB a length may claim)
            return memoryview(self.memory.read(addr, min(length, INDIRECT_REACH * DESC_SIZE)))
        except GuestMemoryError:
            self._break(f"descriptor chain {head} has its indirect table {addr:#x}+{length:#x} outside guest memory")

    # -- the used side -----------------------------------------------------------------

    def _put_used(self, head: int, written: int) -> None:
        if not 0 <= head < self.num:
            raise VirtqueueError(f"used entry for descriptor {head}, past the queue size {self.num}")
        if not 0 <= written <= 0xFFFFFFFF:
            raise VirtqueueError(f"used length {written} is not a 32-bit count")
        assert self._used is not None
        _USED_ELEM.pack_into(self._used, 4 + USED_ELEM_SIZE * (self.used_idx & (self.num - 1)), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        if self.in_flight:
            self.in_flight -= 1

    def push(self, head: int, written: int) -> None:
        """Return a chain: its head and how many bytes the device wrote into it."""
        self.push_many(((head, written),))

    def push_many(self, completions: Iterable[tuple[int, int]]) -> None:
        """Return several chains with one used idx update."""
        self._ready()
        assert self._used is not None
        done = list(completions)
        region = self.inflight
        if region is not None and done:
            heads = [head for head, _ in done]
            for head in heads:
                if not 0 <= head < self.num:
                    raise VirtqueueError(f"used entry for descriptor {head}, past the queue size {self.num}")
            region.begin_batch(heads)
        for head, written in done:
            self._put_used(head, written)
        # The elements before the index that publishes them: one store after the
        # others, which x86 does not reorder (see the module doc).
        _U16.pack_into(self._used, 2, self.used_idx)
        if region is not None and done:
            region.end_batch(heads, self.used_idx)

    def should_notify(self) -> bool:
        """Whether to interrupt the driver for what was pushed since the last call."""
        self._ready()
        assert self._avail is not None
        self.barrier()  # used idx out before used_event / flags are read
        new, old, valid = self.used_idx, self._signalled_used, self._signalled_valid
        self._signalled_used, self._signalled_valid = new, True
        if valid and new == old:
            return False
        if not self.event_idx:
            return not _U16.unpack_from(self._avail, 0)[0] & VIRTQ_AVAIL_F_NO_INTERRUPT
        if not valid:
            return True  # no record of what the driver last saw: one spurious interrupt is harmless
        used_event: int = _U16.unpack_from(self._avail, 4 + 2 * self.num)[0]
        return vring_need_event(used_event, new, old)


# -- the packed virtqueue ------------------------------------------------------------------

VIRTIO_F_RING_PACKED = 34
VIRTQ_DESC_F_AVAIL = 1 << 7
VIRTQ_DESC_F_USED = 1 << 15
# The event suppression structures' flags ("Event Suppression Structure Format").
RING_EVENT_FLAGS_ENABLE, RING_EVENT_FLAGS_DISABLE, RING_EVENT_FLAGS_DESC = 0, 1, 2
EVENT_SUPPRESSION_SIZE = 4  # le16 desc (off 0-14, wrap 15), le16 flags
_U32 = struct.Struct("<I")


class PackedVirtqueue:
    """One packed virtqueue (virtio 1.x, "Packed Virtqueues"), with the interface of
    `SplitVirtqueue`, for the same server loop.

    The ring is one array of `num` descriptors (addr, len, id, flags) that the
    driver makes available and the device marks used in place, each side with
    its wrap counter; SET_VRING_ADDR's three addresses are the descriptor ring,
    the driver event suppression area (the driver's wishes for interrupts) and
    the device's (ours: left at ENABLE, so the driver always kicks).
    SET_VRING_BASE / GET_VRING_BASE carry both positions and both wrap
    counters (bits 0-14 and 15, 16-30 and 31: QEMU's encoding).

    A chain is the descriptors in consecutive slots linked by NEXT, or one
    INDIRECT descriptor alone whose table holds the chain in order; its buffer
    id is in its last descriptor (the head's, for an indirect table).
    `Chain.head` is that id, and push(id, written) marks the chain used,
    taking as many slots as the chain took.  Errors are those of the split
    queue: `ChainError` for a chain whose buffers cannot be used (answered,
    the queue goes on), `QueueBroken` for a ring that cannot be trusted (a
    chain longer than the ring or its table, a bad indirect descriptor, the
    ring outside guest memory, a push of an id not in flight).
    """

    def __init__(self, memory: GuestMemory, *, barrier: Callable[[], None] = no_barrier) -> None:
        self.memory = memory
        self.barrier = barrier
        self.num = 0
        self.addresses: RingAddresses | None = None
        self.event_idx = False
        self.indirect = False
        self.last_avail_idx = 0
        self.avail_wrap = True
        self.used_idx = 0
        self.used_wrap = True
        self.in_flight = 0
        self.broken: str | None = None
        self.ring_gpas: tuple[int, int, int] | None = None
        self.resolutions = 0
        self._desc: memoryview | None = None
        self._driver: memoryview | None = None
        self._device: memoryview | None = None
        self._generation = -1
        self._pending: dict[int, list[int]] = {}  # buffer id -> slots of each chain in flight with it
        self._signalled_used = 0
        self._signalled_valid = False

    # -- configuration (vhost-user messages) -----------------------------------------

    def set_num(self, num: int) -> None:
        if not 0 < num <= MAX_QUEUE_SIZE:
            raise VirtqueueError(f"queue size {num} is not in 1..{MAX_QUEUE_SIZE}")
        self.num = num
        self._reconfigured()

    def set_base(self, base: int) -> None:
        """QEMU's encoding: avail index and wrap counter in the low half, used in the high."""
        if not 0 <= base <= 0xFFFFFFFF:
            raise VirtqueueError(f"ring base {base:#x} is not 32 bits")
        self.last_avail_idx, self.avail_wrap = base & 0x7FFF, bool(base >> 15 & 1)
        self.used_idx, self.used_wrap = base >> 16 & 0x7FFF, bool(base >> 31 & 1)
        self._reconfigured()

    def get_base(self) -> int:
        return (self.last_avail_idx | self.avail_wrap << 15
                | (self.used_idx | self.used_wrap << 15) << 16)

    def set_features(self, features: int) -> None:
        self.indirect = bool(features >> VIRTIO_F_INDIRECT_DESC & 1)
        self.event_idx = bool(features >> VIRTIO_F_EVENT_IDX & 1)

    def set_addresses(self, desc: int, avail: int, used: int, *, userspace: bool = True) -> None:
        self.addresses = RingAddresses(desc, avail, used, userspace)
        self._reconfigured()

    def reset(self) -> None:
        self.detach()
        self.num = 0
        self.addresses = None
        self.event_idx = self.indirect = False
        self.last_avail_idx = self.used_idx = self.in_flight = 0
        self.avail_wrap = self.used_wrap = True
        self.broken = None
        self._pending.clear()
        self._signalled_valid = False

    def _reconfigured(self) -> None:
        self.broken = None
        self._signalled_valid = False
        self._pending.clear()
        self.detach()

    @property
    def configured(self) -> bool:
        return bool(self.num) and self.addresses is not None

    def detach(self) -> None:
        for view in (self._desc, self._driver, self._device):
            if view is not None:
                view.release()
        self._desc = self._driver = self._device = None
        self._generation = -1

    def resolve(self) -> None:
        if not self.configured:
            raise VirtqueueError("the queue has no size or no ring addresses yet")
        assert self.addresses is not None
        self.detach()
        mem, num, addrs = self.memory, self.num, self.addresses
        views: list[memoryview] = []
        gpas: list[int] = []
        for name, addr, size, align in (("descriptor ring", addrs.desc, DESC_SIZE * num, DESC_ALIGN),
                                        ("driver area", addrs.avail, EVENT_SUPPRESSION_SIZE, 4),
                                        ("device area", addrs.used, EVENT_SUPPRESSION_SIZE, 4)):
            try:
                gpa = mem.uva_to_gpa(addr, size) if addrs.userspace else addr
                view = mem.gpa_view(gpa, size)
            except GuestMemoryError as exc:
                for v in views:
                    v.release()
                self._break(f"the {name} ({size:#x} bytes at {addr:#x}) is not in guest memory: {exc}")
            views.append(view)
            gpas.append(gpa)
            if gpa % align:
                for v in views:
                    v.release()
                self._break(f"the {name} at guest address {gpa:#x} is not {align}-byte aligned")
        self._desc, self._driver, self._device = views
        if self.last_avail_idx >= num or self.used_idx >= num:
            self.detach()
            self._break(f"the ring base (available {self.last_avail_idx}, used {self.used_idx}) is past the "
                        f"queue size {num}")
        self.ring_gpas = (gpas[0], gpas[1], gpas[2])
        self.resolutions += 1
        self._signalled_valid = False
        self._generation = mem.generation

    def ready(self) -> None:
        self._ready()

    def _ready(self) -> None:
        if self.broken is not None:
            raise QueueBroken(self.broken)
        if self._generation != self.memory.generation:
            self.resolve()

    def _break(self, reason: str) -> NoReturn:
        self.mark_broken(reason)
        raise QueueBroken(reason)

    def mark_broken(self, reason: str) -> None:
        self.broken = reason

    # -- the available side --------------------------------------------------------

    def _is_avail(self, slot: int) -> bool:
        assert self._desc is not None
        flags: int = _U16.unpack_from(self._desc, DESC_SIZE * slot + 14)[0]
        return bool(flags & VIRTQ_DESC_F_AVAIL) == self.avail_wrap and \
            bool(flags & VIRTQ_DESC_F_USED) != self.avail_wrap

    def has_pending(self) -> bool:
        self._ready()
        return self._is_avail(self.last_avail_idx)

    def pop(self) -> Chain | None:
        """The next available chain, or None (see the class doc)."""
        self._ready()
        assert self._desc is not None
        if self.last_avail_idx >= self.num:
            self._break(f"the available position {self.last_avail_idx} is past the queue size {self.num}")
        if not self._is_avail(self.last_avail_idx):
            return None
        # The flags said available: only now the rest of the descriptor (x86 keeps loads in order).
        mem, ring, num = self.memory, self._desc, self.num
        slot, wrap = self.last_avail_idx, self.avail_wrap
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        state = _Walk()
        slots = 0
        buffer_id = 0
        while True:
            slots += 1
            if slots > num:
                self._break(f"a descriptor chain from slot {self.last_avail_idx} is longer than the ring ({num})")
            addr, length, buffer_id, flags = _PACKED_DESC.unpack_from(ring, DESC_SIZE * slot)
            slot += 1
            if slot == num:
                slot, wrap = 0, not wrap
            if flags & VIRTQ_DESC_F_INDIRECT:
                if slots > 1 or flags & VIRTQ_DESC_F_NEXT:
                    self._break(f"buffer {buffer_id} has an indirect descriptor inside a chain")
                self._walk_indirect(buffer_id, addr, length, state, readable, writable)
                break
            state.add(mem, addr, length, flags, readable, writable)
            if not flags & VIRTQ_DESC_F_NEXT:
                break
        self.last_avail_idx, self.avail_wrap = slot, wrap
        self.in_flight += 1
        self._pending.setdefault(buffer_id, []).append(slots)
        return state.finish(mem, buffer_id, readable, writable)

    def _walk_indirect(self, buffer_id: int, addr: int, length: int, state: _Walk,
                       readable: list[memoryview], writable: list[memoryview]) -> None:
        if not self.indirect:
            self._break(f"buffer {buffer_id} uses an indirect table, but VIRTIO_F_INDIRECT_DESC is off")
        if length == 0 or length % DESC_SIZE:
            self._break(f"buffer {buffer_id} has an indirect table of {length} bytes, "
                        f"not a nonzero multiple of {DESC_SIZE}")
        count = min(length // DESC_SIZE, INDIRECT_REACH)
        try:
            table = self.memory.gpa_view(addr, count * DESC_SIZE)
        except GuestMemoryError:
            try:
                table = memoryview(self.memory.read(addr, count * DESC_SIZE))
            except GuestMemoryError:
                self._break(f"buffer {buffer_id} has its indirect table {addr:#x}+{length:#x} outside guest memory")
        for i in range(count):
            a, n, _, flags = _PACKED_DESC.unpack_from(table, DESC_SIZE * i)
            if flags & VIRTQ_DESC_F_INDIRECT:
                table.release()
                self._break(f"buffer {buffer_id} has an indirect table inside an indirect table")
            state.add(self.memory, a, n, flags, readable, writable)
        table.release()

    # -- the used side -----------------------------------------------------------------

    def push(self, head: int, written: int) -> None:
        self.push_many(((head, written),))

    def push_many(self, completions: Iterable[tuple[int, int]]) -> None:
        """Mark chains used, by buffer id, in the order given."""
        self._ready()
        assert self._desc is not None
        ring = self._desc
        for buffer_id, written in completions:
            if not 0 <= written <= 0xFFFFFFFF:
                raise VirtqueueError(f"used length {written} is not a 32-bit count")
            chains = self._pending.get(buffer_id)
            if not chains:
                raise VirtqueueError(f"used entry for buffer {buffer_id}, which is not in flight")
            slots = chains.pop(0)
            if not chains:
                del self._pending[buffer_id]
            at = DESC_SIZE * self.used_idx
            _U32.pack_into(ring, at + 8, written)
            _U16.pack_into(ring, at + 12, buffer_id)
            flags = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if self.used_wrap else 0
            # id and len before the flags that hand the slot back (x86 keeps stores in order).
            _U16.pack_into(ring, at + 14, flags)
            self.used_idx += slots
            if self.used_idx >= self.num:
                self.used_idx -= self.num
                self.used_wrap = not self.used_wrap
            if self.in_flight:
                self.in_flight -= 1

    def should_notify(self) -> bool:
        """The driver event suppression rules (QEMU's virtio_packed_should_notify)."""
        self._ready()
        assert self._driver is not None
        self.barrier()
        off_wrap, flags = struct.unpack_from("<HH", self._driver, 0)
        new, old, valid = self.used_idx, self._signalled_used, self._signalled_valid
        self._signalled_used, self._signalled_valid = new, True
        if flags == RING_EVENT_FLAGS_DISABLE:
            return False
        if flags != RING_EVENT_FLAGS_DESC or not self.event_idx:
            return True
        if not valid:
            return True
        off = off_wrap & 0x7FFF
        if self.used_wrap != bool(off_wrap >> 15):
            off -= self.num
        return vring_need_event(off & 0xFFFF, new, old)


_PACKED_DESC = struct.Struct("<QIHH")  # addr, len, id, flags


class _Walk:
    """What a chain walk has found so far (shared by the packed ring's two walks)."""

    def __init__(self) -> None:
        self.any_writable = False
        self.last_writable: tuple[int, int] | None = None
        self.total = 0
        self.problem: str | None = None

    def add(self, mem: GuestMemory, addr: int, length: int, flags: int, readable: list[memoryview],
            writable: list[memoryview]) -> None:
        views: list[memoryview] = []
        if length:
            try:
                views = [mem.gpa_view(addr, length)]
            except GuestMemoryError:
                try:
                    views = mem.gpa_views(addr, length)
                except GuestMemoryError:
                    self.problem = self.problem or f"buffer {addr:#x}+{length:#x} is outside guest memory"
        if flags & VIRTQ_DESC_F_WRITE:
            writable += views
            self.any_writable = True
            if length:
                self.last_writable = (addr, length)
        else:
            if self.any_writable:
                self.problem = self.problem or "a device-readable buffer follows a device-writable one"
            readable += views
        self.total += length

    def finish(self, mem: GuestMemory, head: int, readable: list[memoryview], writable: list[memoryview]) -> Chain:
        problem = self.problem
        if self.total > MAX_CHAIN_BYTES and problem is None:
            problem = f"the chain holds {self.total:#x} bytes, more than 2^32"
        if problem is not None:
            for view in (*readable, *writable):
                view.release()
            tail = None
            if self.last_writable is not None:
                try:
                    tail = mem.gpa_view(self.last_writable[0] + self.last_writable[1] - 1, 1)
                except GuestMemoryError:
                    pass
            raise ChainError(head, problem, tail)
        return Chain(head, tuple(readable), tuple(writable))


Virtqueue = SplitVirtqueue | PackedVirtqueue
