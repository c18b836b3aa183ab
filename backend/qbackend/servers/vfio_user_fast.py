"""The native vfio-user access loop (vfio_user_fast.c), as a connection uses it.

Why: a guest vCPU waits for every trapped register access, and the Python
path's parse, device call and reply cost more than the socket round trip
(a Python loop that parses nothing reaches about 0.5x
libvfio-user's synchronous rate, pinned).  The C loop receives, serves the
accesses that fall inside a device's plain windows
(qbackend.vfio.function.PlainWindow) under the device lock, replies, and
hands everything else back to the connection's Python loop, which goes on
as before (qbackend.servers.vfio_user).

`NativeAccessLoop.start()` returns None, and the connection stays in
Python, when native helpers are off or cannot be built
(qbackend.plumbing.native), when the device's lock is not a native lock,
or when the device declares no window.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from qbackend.plumbing import native
from qbackend.plumbing.native_lock import NativeLock
from qbackend.protocol.vfio_user import PCI_NUM_REGIONS
from qbackend.vfio.function import PciFunction, PlainWindow

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("vfio_user_fast.c")
MAX_COUNT = 64  # the largest access served natively: registers, not bulk data
OUT_SIZE = 64 * 1024  # replies to one receive, sent in one write


class NativeAccessLoop:
    """One connection's C receive loop; `serve()` runs it until Python is needed."""

    PAUSED = 2  # serve()'s answer to request_pause(True) (QB_PAUSED)

    def __init__(self, helper: native.Native, device: PciFunction, windows: list[PlainWindow], lock: NativeLock,
                 fd: int, buffer: bytearray, max_xfer: int, spin_ns: int, spin_window_ns: int,
                 wake_fd: int = -1) -> None:
        ffi = helper.ffi
        # Everything the C side points into stays referenced from here.
        self._keep: list[Any] = []
        table = ffi.new("struct qb_window[]", len(windows))
        for entry, window in zip(table, windows):
            entry.region = window.region
            entry.writable = window.writable
            entry.start = window.start
            entry.end = window.end
            entry.base = self._pointer(ffi, window.memory, window.writable)
            entry.guard = self._pointer(ffi, window.guard, False) if window.guard is not None else ffi.NULL
        if device.native_accesses is None:  # kept by the device across connections
            device.native_accesses = ffi.new("uint64_t[]", PCI_NUM_REGIONS)
        max_fds = helper.lib.QB_SCM_MAX_FD  # the size of the C loop's control buffer
        self._fds = ffi.new("int[]", max_fds)
        loop = ffi.new("struct qb_access_loop *")
        loop.fd = fd
        loop.bufsize = len(buffer)
        loop.buf = self._pointer(ffi, buffer, True)
        loop.outsize = OUT_SIZE
        loop.out = self._pointer(ffi, bytearray(OUT_SIZE), True)
        loop.windows = table
        loop.nwindows = len(windows)
        loop.nregions = PCI_NUM_REGIONS
        loop.lock = lock.handle
        loop.counts = device.native_accesses
        loop.max_count = min(MAX_COUNT, max_xfer)
        loop.spin_ns = spin_ns
        loop.spin_window_ns = spin_window_ns
        loop.max_fds = max_fds
        loop.fds = self._fds
        loop.wake_fd = wake_fd
        loop.pause = 0
        assert helper.lib.QB_PAUSED == self.PAUSED
        self._keep += [table, lock]
        self._ffi = ffi
        self._loop: Any = loop
        self._serve = helper.lib.qb_serve_accesses
        self._served_before_close = 0
        self._nwindows = len(windows)
        self._device = device
        device.native_loop = self
        if device.tracer is not None:  # traced: every access to Python until the trace stops
            loop.nwindows = 0

    def pause(self, paused: bool) -> None:
        """Under the device lock: serve no window (every access goes to Python), or
        serve them again.  The C loop checks again under the lock before it serves."""
        if self._loop is not None:
            self._loop.nwindows = 0 if paused else self._nwindows

    def request_pause(self, pause: bool) -> None:
        """From any thread: make serve() return PAUSED at the next message boundary (the
        caller signals the wake eventfd too), or not."""
        if self._loop is not None:
            self._loop.pause = 1 if pause else 0

    def _pointer(self, ffi: Any, memory: bytearray | memoryview, writable: bool) -> Any:
        buffer = ffi.from_buffer(memory, require_writable=writable)
        self._keep.append(buffer)
        return ffi.cast("uint8_t *", buffer)

    @classmethod
    def start(cls, device: PciFunction, fd: int, buffer: bytearray, max_xfer: int, spin_ns: int,
              spin_window_ns: int, wake_fd: int = -1) -> NativeAccessLoop | None:
        """The loop for a connection to `device`, or None to stay in Python."""
        lock = device.lock
        windows = device.plain_windows()
        if not isinstance(lock, NativeLock) or not windows:
            return None
        helper = native.load(SOURCE)
        if helper is None:
            return None
        return cls(helper, device, windows, lock, fd, buffer, max_xfer, spin_ns, spin_window_ns, wake_fd)

    def serve(self) -> int:
        """Serve until Python is needed (without the GIL): 1 with `pending`
        bytes of the receive buffer (and `take_fds()`) to handle, PAUSED,
        0 at the end of the stream, or -errno."""
        rc: int = self._serve(self._loop)
        return rc

    @property
    def pending(self) -> tuple[int, int]:
        """Where the bytes Python must handle are in the receive buffer: (start, end)."""
        return self._loop.pos, self._loop.end

    def take_fds(self) -> tuple[int, ...]:
        """The fds that came with those bytes, now the caller's."""
        loop = self._loop
        fds = tuple(self._fds[0:loop.nfds])
        loop.nfds = 0
        return fds

    @property
    def served(self) -> int:
        """Accesses served natively so far."""
        if self._loop is None:
            return self._served_before_close
        served: int = self._loop.served
        return served

    def close(self) -> None:
        """Let go of the buffers the C side pointed into, once the loop no longer runs (the
        connection's thread has ended).  Released now rather than by the garbage collector,
        which may clear a memoryview before the cffi buffer that still holds it (a crash at
        interpreter exit)."""
        if self._loop is None:
            return
        self._served_before_close = self.served
        self._loop = None
        if self._device.native_loop is self:
            self._device.native_loop = None
        for kept in self._keep:
            if isinstance(kept, self._ffi.CData):
                self._ffi.release(kept)
        self._keep.clear()
