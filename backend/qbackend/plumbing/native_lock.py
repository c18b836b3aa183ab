"""The device lock: a recursive lock that the native vfio-user access loop
can take without the GIL.

`device_lock()` gives a `NativeLock` (a pthread recursive mutex, through
cffi) when native helpers are available (qbackend.plumbing.native), else
a `threading.RLock`; the two behave alike for Python code: `with`,
`acquire(blocking, timeout)`, `release()`, re-entry by the holding thread.
A thread waiting for a NativeLock has let go of the GIL (cffi releases it
around the call), so the rules of qbackend.plumbing.threads are unchanged.
"""

from __future__ import annotations

import errno as E
import threading
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

from qbackend.plumbing import native

SOURCE = Path(__file__).with_name("native_lock.c")


class Lock(Protocol):
    """What qbackend asks of a device lock (threading.RLock has it too)."""

    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> bool: ...

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class NativeLock:
    """A recursive pthread mutex; its `handle` is what C code locks."""

    def __init__(self, helper: native.Native) -> None:
        lib = helper.lib
        handle = lib.qb_lock_new()
        if handle == helper.ffi.NULL:
            raise MemoryError("cannot allocate a lock")
        self.handle: Any = helper.ffi.gc(handle, lib.qb_lock_free)
        self._lock, self._unlock = lib.qb_lock_acquire, lib.qb_lock_release

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not blocking:
            if timeout != -1:
                raise ValueError("can't specify a timeout for a non-blocking call")
            timeout = 0
        elif timeout < 0 and timeout != -1:
            raise ValueError("timeout value must be a non-negative number")
        held: bool = self._lock(self.handle, timeout) == 0
        return held

    def release(self) -> None:
        if self._unlock(self.handle) == E.EPERM:
            raise RuntimeError("cannot release un-acquired lock")

    def __enter__(self) -> bool:
        self._lock(self.handle, -1)
        return True

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._unlock(self.handle)


def device_lock() -> Lock:
    """A NativeLock where native helpers work here, else a threading.RLock."""
    helper = native.load(SOURCE)
    if helper is None:
        return threading.RLock()
    return NativeLock(helper)
