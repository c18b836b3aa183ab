"""The C library, for the two calls Python's standard library lacks:
fallocate (hole punching, qbackend.block.blockfile) and malloc_trim."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL | None:
    """glibc (or whatever libc is there), with errno kept; None if it cannot be loaded.
    glibc's soname first: ctypes.util.find_library would run ldconfig in a process."""
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        pass
    from ctypes.util import find_library

    name = find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


def trim_heap() -> None:
    """Hand freed heap back to the system (glibc's malloc_trim).  Each worker thread
    mallocs from an arena of its own and glibc keeps what they freed: after 64 NBD
    clients had come and gone, the process went on holding some 60 MiB it no longer used."""
    lib = libc()
    trim = getattr(lib, "malloc_trim", None) if lib is not None else None
    if trim is not None:
        trim(0)
