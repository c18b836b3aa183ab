"""NBD READs and in-place WRITEs served natively (nbd_fast.c), and the native
transmission loop that serves plain connections with them.

Why: a 4 KiB READ cost the Python path about 30 us of parsing, QED lookup
and reply building (profiled), against a few for the pread and
the send themselves, and a 4 KiB WRITE more; with 64 clients on one loop
thread, that thread was the bottleneck (0.6x qemu-nbd's rate).

Two ways in:

- `NativeRequests.serve(data)`, sans-I/O, for a connection that receives
  and sends itself (TLS, or a thread of its own): it answers the plain
  READs and WRITEs at the front of what was received, data included, in
  one buffer the connection then sends, and says how far it got.
- `NativeLoop`, the transmission loop's poller: the loop's thread waits in
  C, and every connection in native state is received, served and
  answered there until it needs Python (any other request, replies the
  socket would not take, the end); then it is handed over with what it has
  pending (`NativeRequests.take_over`), and given back once Python has
  nothing of it left (`NativeRequests.resume`).

What is served natively: READs (DF allowed) of mapped bytes, and WRITEs
without flags whose every cluster is mapped in a writable map
(qbackend.block.read_map), up to `max_length` bytes.  Everything else, and
every error, is Python's.

`NativeRequests.start()` returns None, and the connection stays in
Python, when native helpers are off or cannot be built, or when the export
has no read map; `NativeLoop.start()` returns None so too, and the loop
polls with select.epoll.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path
from typing import Any

from qbackend.block.exports import Export
from qbackend.plumbing import native

SOURCE = Path(__file__).with_name("nbd_fast.c")
OUT_SIZE = (4 << 20) + 4096  # replies to one batch: up to a 4 MiB read and its header
MAX_LENGTH = 4 << 20  # larger requests go to Python
# Replies per batch, by default: pread then send of about 1 MiB at a time kept sequential
# reads level with qemu-nbd here, where 4 MiB batches (out of the CPU caches) did not.
BATCH = 1 << 20


class NativeRequests:
    """One connection's native server: `serve(data)` answers what it can at the front of
    `data`; in a NativeLoop, the C side of the connection (`conn`)."""

    def __init__(self, helper: native.Native, export: Export, mode: int,
                 receive_buffer: bytearray | mmap.mmap | None) -> None:
        assert export.read_map is not None
        ffi = helper.ffi
        self._ffi = ffi
        self._map = export.read_map  # kept alive (its C memory too) while this connection may use it
        self._handle = export.read_map.handle
        # Anonymous memory: pages are only resident once a batch has used them.
        self._memory = mmap.mmap(-1, OUT_SIZE)
        self.out = memoryview(self._memory)
        self._out_pointer = ffi.from_buffer(self.out)
        # The loop receives into the connection's own buffer (Python's receives use it
        # only while the loop does not); serve() alone needs none.
        self._in = memoryview(receive_buffer if receive_buffer is not None else bytearray(1))
        self._in_pointer = ffi.from_buffer(self._in)
        conn = ffi.new("struct qb_nbd_conn *")
        conn.fd = -1
        conn.map = self._handle
        conn.received = ffi.cast("uint8_t *", self._in_pointer)
        conn.received_size = len(self._in)
        batch = self._ffi.addressof(conn, "batch")
        batch.out = ffi.cast("uint8_t *", self._out_pointer)
        batch.out_size = OUT_SIZE
        batch.mode = mode
        self.conn = conn
        self._batch = batch
        self._lib = helper.lib
        self._serve = helper.lib.qb_nbd_serve
        self.reads = 0  # served by serve() so far (the loop counts its own: NativeLoop.counts)
        self.writes = 0
        self.bytes_read = 0

    @classmethod
    def start(cls, export: Export, mode: str,
              receive_buffer: bytearray | mmap.mmap | None = None) -> NativeRequests | None:
        """For a connection to `export` whose replies are `mode` ("simple", "structured" or
        "extended") and that receives into `receive_buffer` (for a NativeLoop)."""
        if getattr(export, "read_map", None) is None:
            return None
        helper = native.load(SOURCE)
        if helper is None:
            return None
        lib = helper.lib  # nbd_fast.h's numbers, not typed again here
        modes = {"simple": lib.QB_NBD_SIMPLE, "structured": lib.QB_NBD_STRUCTURED, "extended": lib.QB_NBD_EXTENDED}
        return cls(helper, export, modes[mode], receive_buffer)

    def serve(self, data: memoryview, max_length: int = MAX_LENGTH, limit: int = BATCH) -> tuple[int, int]:
        """Serve the requests at the front of `data` (none longer than `max_length`; replies
        of at most `limit` bytes in all, unless the first alone is longer), without the GIL:
        (bytes of `data` consumed, bytes of `out` to send).  (0, 0): the first request is
        Python's (or not whole yet)."""
        batch = self._batch
        source: Any = self._ffi.from_buffer(data)
        batch.input = self._ffi.cast("uint8_t *", source)
        batch.in_len = len(data)
        batch.max_length = min(max_length, MAX_LENGTH)
        batch.soft_limit = min(limit, OUT_SIZE)
        served: int = self._serve(self._handle, batch)
        self._ffi.release(source)
        if served:
            self.reads += batch.reads
            self.writes += batch.writes
            self.bytes_read += batch.bytes_read
        consumed: int = batch.consumed
        produced: int = batch.produced
        return consumed, produced

    # -- in a NativeLoop --

    @property
    def handed_over(self) -> bool:
        return bool(self.conn.handed_over)

    def take_over(self) -> tuple[bytes, bytes]:
        """What the loop left when it handed this connection to Python: (bytes received and
        not served, replies not sent), copied; the connection is Python's until resume()."""
        conn = self.conn
        conn.handed_over = 0
        pending = bytes(self._in[:conn.received_len])
        unsent = bytes(self.out[conn.out_start:conn.out_start + conn.out_len])
        conn.received_len = conn.out_len = conn.out_start = 0
        conn.waiting_since_ns = 0
        return pending, unsent

    def resume(self, max_length: int, limit: int) -> None:
        """The loop serves this connection again (Python has nothing of it pending)."""
        batch = self._batch
        batch.max_length = min(max_length, MAX_LENGTH)
        batch.soft_limit = min(limit, OUT_SIZE)
        self.conn.state = self._lib.QB_CONN_NATIVE

    @property
    def waiting_since(self) -> float:
        """In the loop: time.monotonic() since when the rest of a request is awaited (0.0: none is)."""
        return float(self.conn.waiting_since_ns) / 1e9

    @property
    def in_loop(self) -> bool:
        """Served by the NativeLoop now (native state), not by Python."""
        return bool(self.conn.state)

    def close(self) -> None:
        """Give back the reply buffer (once no send uses it and the loop has let go)."""
        self._ffi.release(self._out_pointer)
        self._ffi.release(self._in_pointer)
        self._in.release()
        self.out.release()
        self._memory.close()


class NativeLoop:
    """The epoll set of a transmission loop, polled in C (see the module's docstring)."""

    def __init__(self, helper: native.Native) -> None:
        self._ffi = helper.ffi
        self._lib = helper.lib
        epfd = self._lib.qb_nbd_loop_new()
        if epfd < 0:
            raise OSError(-epfd, "epoll_create1")
        self.fd: int = epfd
        self._max_events: int = self._lib.QB_NBD_LOOP_EVENTS
        self._ready = self._ffi.new("struct qb_nbd_ready[]", self._max_events)
        self._counts = self._ffi.new("struct qb_nbd_counts *")
        # fd -> the C connection watched (those of Python-only fds are made here).
        self._watched: dict[int, Any] = {}

    @classmethod
    def start(cls) -> NativeLoop | None:
        helper = native.load(SOURCE)
        return None if helper is None else cls(helper)

    def register(self, fd: int, events: int, requests: NativeRequests | None = None) -> None:
        """Watch `fd` (a connection's socket, with its native side if it has one; or any fd Python serves)."""
        if requests is not None:
            conn = requests.conn
        else:
            conn = self._ffi.new("struct qb_nbd_conn *")
        conn.fd = fd
        self._watched[fd] = conn
        self._ctl(1, fd, events)  # EPOLL_CTL_ADD

    def modify(self, fd: int, events: int) -> None:
        self._ctl(3, fd, events)  # EPOLL_CTL_MOD

    def unregister(self, fd: int) -> None:
        if fd in self._watched:
            try:
                self._ctl(2, fd, 0)  # EPOLL_CTL_DEL
            finally:
                conn = self._watched.pop(fd)
                conn.state = self._lib.QB_CONN_PYTHON  # the loop never serves it again

    def _ctl(self, op: int, fd: int, events: int) -> None:
        conn = self._watched.get(fd)
        if conn is None:
            raise OSError(9, "not watched")
        rc = self._lib.qb_nbd_loop_watch(self.fd, op, conn, events)
        if rc < 0:
            raise OSError(-rc, f"epoll_ctl on fd {fd}")

    def poll(self, timeout: float = -1) -> list[tuple[int, int]]:
        """Serve native connections until some fd needs Python: those fds and their events."""
        n = self._lib.qb_nbd_loop_wait(self.fd, self._ready, self._max_events,
                                       -1 if timeout < 0 else int(timeout * 1000), self._counts)
        if n < 0:
            raise OSError(-n, "epoll_wait")
        ready = self._ready
        return [(ready[i].fd, ready[i].events) for i in range(n)]

    def counts(self) -> dict[str, int]:
        """Requests the loop has served natively so far (read from any thread)."""
        c = self._counts
        return {"reads": c.reads, "writes": c.writes, "bytes_read": c.bytes_read, "bytes_written": c.bytes_written}

    def close(self) -> None:
        os.close(self.fd)
