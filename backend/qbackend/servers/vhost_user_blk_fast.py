"""vhost-user-blk requests served in C (vhost_user_blk_fast.c): the native twin
of a queue's Python model.

Why: the Python path costs tens of microseconds per request (walking the
chain, parsing, the block layer, the used ring), and a queue worker holding
the GIL for that keeps every other queue waiting: one CPU for all queues.
The native path serves plain requests (IN and OUT of bytes the export's
read map locates, FLUSH, GET_ID) without the GIL and without a lock shared
with the other queues.

The hand-over is in ring order and explicit: `NativeQueue` holds the ring
state (last_avail_idx, used_idx, the notification record) while it serves;
when the C side meets a chain it does not serve it stops *before* consuming
it, and the server gives the indices to the Python model (`give`), lets the
model pop and answer that one chain, and takes the indices back (`take`).
The model (qbackend.models.virtqueue, virtio_blk) stays the reference for
everything odd: the C side never answers an error itself.

`NativeMemory` is a connection's memory table as C sees it: host pointers
of the model's region buffers (held, so that an mmap cannot close under C),
rebuilt after every change of the table, emptied before one.

`NativeQueue.create` returns None when native helpers are off or missing;
the server then runs the Python path alone.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from qbackend.block.exports import Export
from qbackend.models.inflight import InflightRegion
from qbackend.models.virtqueue import GuestMemory, SplitVirtqueue
from qbackend.plumbing import native

SOURCE = Path(__file__).with_name("vhost_user_blk_fast.c")
MAX_BATCH = 256  # requests served per hold of the queue's lock
# An I/O pool: reads and writes of POOL_MIN_BYTES or more run side by side on POOL_THREADS
# threads of the queue while its thread goes on walking the ring; their used entries follow in
# ring order.  Measured with scripts/bench_vhost_user_blk.py (sequential 1 MiB reads at QD4 of
# a page-cached QED image, a 2-vCPU TCG guest, this 2-CPU host): 2 threads 0.81x
# qemu-storage-daemon, 4 threads 1.00x, none 1.38x (the copies are CPU work that the guest's
# vCPUs want too, and every hand-over to a pool thread is a cross-CPU wake-up).  So it is off
# by default; QBACKEND_VHOST_POOL_THREADS=N turns it on (an image on a slow disk, where a read
# waits rather than copies, is where it would pay).
POOL_THREADS = int(os.environ.get("QBACKEND_VHOST_POOL_THREADS", "0"))
POOL_MIN_BYTES = 128 << 10
# Adaptive polling: once the ring is empty, look for more for up to SPIN_NS (yielding the CPU),
# while the last kick came within SPIN_WINDOW_NS of the wait for it.  Measured with the bench
# (2-vCPU TCG guest, 2-CPU host): 50 us gave 4 KiB QD1 reads 1.27-1.34x qemu-storage-daemon
# but took CPU the guest's vCPUs wanted at QD16 and with 2 jobs (0.94x and 0.57x in one run);
# without it every row was 1.06x or better in the run of the same day.  Off by default;
# QBACKEND_VHOST_SPIN_NS=N turns it on where CPUs are to spare.
SPIN_NS = int(os.environ.get("QBACKEND_VHOST_SPIN_NS", "0"))
SPIN_WINDOW_NS = 500_000
# An interrupt decision after each request (as qemu-storage-daemon) rather than once per drain:
# in the bench the TCG guest did better with fewer interrupts (4 KiB QD16 reads 0.91x
# qemu-storage-daemon per request, 1.10x per drain, in runs of the same hour).  Off by default.
NOTIFY_EACH = int(os.environ.get("QBACKEND_VHOST_NOTIFY_EACH", "0"))
# An interrupt owed once the ring is empty may wait up to HOLD_NS for more requests to answer
# with it, no kick asked for meanwhile (qb_vu_run's hold_interrupt; only for small requests,
# and a hold that catches nothing turns holding off for a while, so QD1 pays little).
# Measured with scripts/bench_vhost_user_blk.py (2-vCPU TCG guest, 2-CPU host, one run,
# ratios to qemu-storage-daemon): without it 4 KiB QD16 1.05x and 2 jobs 0.67x, the guest
# paying 0.6 interrupts and 0.7 kicks per request (0.2 interrupts with qemu-storage-daemon); at
# 150 us 2.08x and 1.41x, at 250 us 1.66x and 1.61x, at 500 us a loss; sequential 1 MiB and
# QD1 rows within noise.  QBACKEND_VHOST_HOLD_NS=N sets it; 0 turns it off.
HOLD_NS = max(0, int(os.environ.get("QBACKEND_VHOST_HOLD_NS", "150000")))
# After a hold that caught nothing, this many drains notify at once, twice as many after each
# such hold in a row, up to the second (vhost_user_blk_fast.c's twins).
HOLD_BACKOFF_FIRST, HOLD_BACKOFF_MAX = 16, 1024
# Only drains whose requests average this many bytes or fewer start a hold.
HOLD_MAX_REQUEST_BYTES = 64 << 10


def load() -> native.Native | None:
    return native.load(SOURCE)


class NativeMemory:
    """A connection's guest memory table for the C side (see the module doc)."""

    def __init__(self, helper: native.Native) -> None:
        self._ffi = helper.ffi
        self.table: Any = helper.ffi.new("struct qb_vu_mem *")
        self.max_regions: int = helper.lib.QB_VU_MAX_REGIONS
        self._held: list[tuple[memoryview, Any]] = []

    def clear(self) -> None:
        """Forget every region (call before the model's table changes: C keeps none of it)."""
        self.table.count = 0
        for view, pointer in self._held:
            self._ffi.release(pointer)
            view.release()
        self._held.clear()

    def rebuild(self, memory: GuestMemory) -> None:
        """The model's regions, after a change (the caller holds every queue's lock)."""
        self.clear()
        regions = memory.regions
        if len(regions) > self.max_regions:
            return  # more than C holds: every chain goes to Python (it finds no memory)
        for i, region in enumerate(regions):
            view = memoryview(region.buffer)  # its own view: the model may release its one
            pointer = self._ffi.from_buffer("uint8_t[]", view)
            self._held.append((view, pointer))
            entry = self.table.regions[i]
            entry.gpa, entry.size, entry.host = region.gpa, region.size, pointer
        self.table.count = len(regions)


class NativeQueue:
    """One queue's C side (`c`, a struct qb_vu_queue), driven by the server's queue worker."""

    def __init__(self, helper: native.Native, memory: NativeMemory, export: Export, lock: Any,
                 wake_fd: int, serial: bytes, *, pool_threads: int = POOL_THREADS) -> None:
        ffi, lib = helper.ffi, helper.lib
        self._ffi, self._lib = ffi, lib
        self.memory = memory  # kept alive while C points at it
        self.export = export
        self._map = export.read_map  # kept alive (its C memory too) while this queue may use it
        c = ffi.new("struct qb_vu_queue *")
        c.mem = memory.table
        c.lock = lock.handle if lock is not None else ffi.NULL
        self._lock = lock
        c.map = export.read_map.handle if export.read_map is not None else ffi.NULL
        c.kick_fd = c.call_fd = -1
        c.wake_fd = wake_fd
        c.max_batch = MAX_BATCH
        self._pool: Any = None
        if pool_threads > 0:
            pool = lib.qb_vu_pool_new(min(pool_threads, lib.QB_VU_POOL_MAX_THREADS))
            if pool != ffi.NULL:
                self._pool = ffi.gc(pool, lib.qb_vu_pool_free)
                c.pool = self._pool
        c.pool_min = POOL_MIN_BYTES
        c.spin_ns, c.spin_window_ns = SPIN_NS, SPIN_WINDOW_NS
        c.notify_each = NOTIFY_EACH
        c.hold_ns = HOLD_NS
        ffi.memmove(c.serial, serial[:20].ljust(20, b"\0"), 20)
        self.c = c
        self._resolutions = -1  # of the model when the rings were last loaded
        self._inflight: tuple[InflightRegion, memoryview, Any] | None = None  # the region C records in, held
        self.owns = False
        """Whether C holds the ring's indices (loaded, not forgotten since): then the model's are
        stale until give()."""
        self._drain, self._notify, self._run = lib.qb_vu_drain, lib.qb_vu_notify, lib.qb_vu_run
        self.EMPTY, self.PYTHON, self.MORE = lib.QB_VU_EMPTY, lib.QB_VU_PYTHON, lib.QB_VU_MORE
        self.WAKE, self.RELOAD, self.FAILED = lib.QB_VU_WAKE, lib.QB_VU_RELOAD, lib.QB_VU_FAILED

    @classmethod
    def create(cls, memory: NativeMemory | None, export: Export, lock: Any, wake_fd: int,
               serial: bytes) -> NativeQueue | None:
        helper = load()
        if helper is None or memory is None:
            return None
        return cls(helper, memory, export, lock, wake_fd, serial)

    # -- state, under the queue's lock --

    def load(self, vq: SplitVirtqueue, *, serving: bool, capacity: int, readonly: bool, writethrough: bool,
             kick: int | None, call: int | None) -> None:
        """Bring the C side up to date with the model and the device (after any change);
        `serving` only for a model that is ready (resolved, not broken)."""
        c = self.c
        c.capacity, c.readonly, c.writethrough = capacity, readonly, writethrough
        c.kick_fd = -1 if kick is None else kick
        c.call_fd = -1 if call is None else call
        if serving and vq.resolutions != self._resolutions:
            # New rings (a new start, or the memory table changed): the model re-read the used
            # index, and there is no record of what the driver was last told.
            assert vq.ring_gpas is not None
            c.num, c.event_idx, c.indirect = vq.num, vq.event_idx, vq.indirect
            if self._lib.qb_vu_set_rings(c, *vq.ring_gpas) != 0:
                serving = False  # rings C cannot see (more regions than it holds): Python serves
            else:
                self._resolutions = vq.resolutions
                self.owns = True
                c.last_avail_idx, c.used_idx = vq.last_avail_idx, vq.used_idx
                # No record of what the driver was last told: the next notify() decides afresh.
                # A notification still owed (need_notify: chains pushed before a message made
                # the rings reload, by C or by the model) stays owed: dropping it here lost the
                # interrupt of a guest waiting for them, for good.
                c.signalled_valid = 0
        if serving and vq.resolutions == self._resolutions:
            c.event_idx, c.indirect = vq.event_idx, vq.indirect
        self._load_inflight(vq)
        c.serving = serving and vq.resolutions == self._resolutions
        c.ready = 1

    def _load_inflight(self, vq: SplitVirtqueue) -> None:
        """C records in the region the model records in (none when the model tracks nothing)."""
        region = vq.inflight
        if region is None:
            self.drop_inflight()
            return
        if self._inflight is None or self._inflight[0] is not region:
            self.drop_inflight()
            view = memoryview(region.buffer)  # its own view: the model may release its one
            pointer = self._ffi.from_buffer("uint8_t[]", view)
            self._inflight = (region, view, pointer)
            self.c.inflight = pointer
        self.c.counter = vq.inflight_counter

    def drop_inflight(self) -> None:
        """C records nothing more, and lets go of the region (before it is unmapped)."""
        self.c.inflight = self._ffi.NULL
        if self._inflight is not None:
            _, view, pointer = self._inflight
            self._ffi.release(pointer)
            view.release()
            self._inflight = None

    def owe_notification(self) -> None:
        """Decide on an interrupt at the next notify() even if nothing more is pushed (a queue
        that starts again: the back end before may have pushed and died before signalling)."""
        self.c.need_notify = 1
        self.c.signalled_valid = 0

    def forget_rings(self) -> None:
        """The model's rings are gone (reset, reconfigured, memory changed): reload before serving."""
        c = self.c
        c.ready = 0
        c.serving = 0
        c.desc = c.avail = c.used = self._ffi.NULL
        self._resolutions = -1
        self.owns = False

    def stale(self) -> None:
        """Something changed: C asks for a load() before it serves again."""
        self.c.ready = 0

    @property
    def serving(self) -> bool:
        return bool(self.c.serving)

    def give(self, vq: SplitVirtqueue) -> None:
        """The model takes over the ring where C stopped (nothing if C holds no indices)."""
        if self.owns:
            vq.sync_indices(self.c.last_avail_idx, self.c.used_idx)
            if vq.inflight is not None:
                vq.inflight_counter = int(self.c.counter)

    def take(self, vq: SplitVirtqueue, pushed: bool) -> None:
        """C takes the ring back from the model, which served (and pushed, if `pushed`) one chain."""
        c = self.c
        c.last_avail_idx, c.used_idx = vq.last_avail_idx, vq.used_idx
        c.counter = vq.inflight_counter
        if pushed:
            c.need_notify = 1
            c.pushed += 1

    # -- serving --

    def drain(self) -> int:
        """Serve without waiting (the caller holds the queue's lock): EMPTY, PYTHON or MORE."""
        rc: int = self._drain(self.c)
        return rc

    def notify(self) -> bool:
        """Signal the call eventfd if the driver wants it for what was pushed."""
        return bool(self._notify(self.c))

    def run(self) -> int:
        """The worker's loop, without the GIL: WAKE, PYTHON, RELOAD or FAILED."""
        rc: int = self._run(self.c)
        return rc

    @property
    def error(self) -> int:
        return int(self.c.error)

    def pause(self) -> None:
        self.c.pause += 1

    def unpause(self) -> None:
        self.c.pause -= 1

    def request_stop(self, stop: bool = True) -> None:
        self.c.stop = int(stop)

    def counts(self) -> dict[str, int]:
        c = self.c
        return {"requests": c.requests, "reads": c.reads, "writes": c.writes, "flushes": c.flushes,
                "bytes_read": c.bytes_read, "bytes_written": c.bytes_written,
                "notifications": c.notifications, "handed_over": c.handed_over,
                "holds_caught": c.holds_caught, "holds_missed": c.holds_missed, "kicks": c.kicks}
