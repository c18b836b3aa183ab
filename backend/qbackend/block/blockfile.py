"""The block-file interface the image formats run on.

A block file is a flat, growable byte array with positional I/O and a flush
that makes every earlier write durable.  Three implementations:

- `FileBlock`: a file descriptor (``os.pread`` / ``os.pwrite`` / ``os.fsync``);
- `MemoryBlock`: a ``bytearray``, for property tests;
- `FaultyBlock`: wraps another block file and fails or "crashes" after a
  number of writes or flushes.  It also keeps what a power failure would
  leave behind (everything flushed, plus any subset of the writes since), so
  tests can check crash safety without killing processes.

Reads at or past the end of the file come back short, as with ``os.pread``.
"""

from __future__ import annotations

import errno
import os
import stat

from qbackend.errors import ImageError

# Start-up: `qbackend qed info` opens a FileBlock and nothing more, so what only hole
# punching (ctypes), the fault injection (random) or the types (typing, pathlib) need is
# imported when used; `BlockFile` (a typing.Protocol) is in qbackend.block.blockfile_protocol.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import random
    from collections.abc import Callable, Sequence
    from pathlib import Path

    from qbackend.block.blockfile_protocol import BlockFile

Buffer = bytes | bytearray | memoryview
"""What `BlockFile.pwrite` accepts."""

__all__ = ["BlockFile", "Buffer", "Crashed", "FaultyBlock", "FileBlock", "InjectedFault", "MemoryBlock"]


def __getattr__(name: str) -> object:
    """`BlockFile`, imported on first use (typing's Protocol costs more to import than a
    `qbackend qed info` takes otherwise)."""
    if name != "BlockFile":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from qbackend.block.blockfile_protocol import BlockFile

    return BlockFile


IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024


def views_after(views: Sequence[memoryview], skip: int) -> list[memoryview]:
    """The views with their first ``skip`` bytes dropped."""
    out = []
    for v in views:
        if skip >= v.nbytes:
            skip -= v.nbytes
            continue
        out.append(v[skip:] if skip else v)
        skip = 0
    return out


# -- a file ------------------------------------------------------------------

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


_FALLOCATE: list[Callable[[int, int, int, int], int] | None] = []  # once looked up: [fallocate or None]


def _fallocate() -> Callable[[int, int, int, int], int] | None:
    """libc's fallocate, loaded on the first hole punched (not at import: start-up)."""
    if not _FALLOCATE:
        import ctypes

        from qbackend.plumbing.libc import libc

        lib = libc()
        fn = getattr(lib, "fallocate", None) if lib is not None else None
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
        _FALLOCATE.append(fn)
    return _FALLOCATE[0]


class FileBlock:
    """A block file on an open file descriptor (owned: `close` closes it)."""

    def __init__(self, fd: int, *, path: str | os.PathLike[str] | None = None, writable: bool = True) -> None:
        self.fd = fd
        self._path = path
        self.writable = writable
        self._can_punch = True  # until fallocate is missing or refuses

    @property
    def path(self) -> Path | None:
        """The path it was opened by (a Path made when asked: pathlib is not imported before)."""
        from pathlib import Path

        if self._path is not None and not isinstance(self._path, Path):
            self._path = Path(self._path)
        return self._path

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, writable: bool = True, create: bool = False) -> FileBlock:
        """Open a regular file (or a block device) as a block file.  Opened without
        blocking and checked before use: a FIFO, a terminal or a socket named as an
        image would otherwise block its opener (and every peer waiting on it) for good."""
        flags = os.O_RDWR if writable else os.O_RDONLY
        if create:
            flags |= os.O_CREAT
        fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise ImageError(f"{path}: not a regular file ({_file_kind(mode)}); an image must be a file")
            os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path=path, writable=writable)

    def preadv(self, offset: int, views: Sequence[memoryview]) -> int:
        """Read straight into ``views`` (no bytes object between: vhost-user reads
        land in guest memory so); the bytes read, short only at the end of the file."""
        total = sum(v.nbytes for v in views)
        got = 0
        while got < total:
            n = os.preadv(self.fd, views_after(views, got), offset + got)
            if n == 0:
                break
            got += n
        return got

    def pread(self, offset: int, n: int) -> bytes:
        data = os.pread(self.fd, n, offset)
        if len(data) == n or not data:
            return data
        parts = [data]
        got = len(data)
        while got < n:
            more = os.pread(self.fd, n - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def pwrite(self, offset: int, data: Buffer) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self.fd, view, offset)
            view = view[done:]
            offset += done

    def pwritev(self, offset: int, views: Sequence[memoryview]) -> None:
        """pwrite() of the views one after the other, with no bytes object between."""
        total = sum(v.nbytes for v in views)
        done = 0
        while done < total:
            done += os.pwritev(self.fd, views_after(views, done)[:IOV_MAX], offset + done)

    def discard(self, offset: int, n: int) -> None:
        if n <= 0:
            return
        fallocate = _fallocate() if self._can_punch else None
        if fallocate is not None:
            if fallocate(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, n) == 0:
                return
            import ctypes

            err = ctypes.get_errno()
            if err not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(err, os.strerror(err))
            self._can_punch = False
        chunk = bytes(min(n, 1 << 20))
        end = offset + n
        while offset < end:
            step = min(len(chunk), end - offset)
            self.pwrite(offset, chunk[:step])
            offset += step

    def flush(self) -> None:
        os.fsync(self.fd)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def truncate(self, n: int) -> None:
        os.ftruncate(self.fd, n)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"FileBlock({str(self.path) if self.path else self.fd!r})"


# -- memory ------------------------------------------------------------------


class MemoryBlock:
    """A block file in a ``bytearray``."""

    def __init__(self, data: bytes | bytearray = b"") -> None:
        self.data = bytearray(data)
        self.flushes = 0

    def pread(self, offset: int, n: int) -> bytes:
        return bytes(self.data[offset:offset + n])

    def pwrite(self, offset: int, data: Buffer) -> None:
        end = offset + len(data)
        if end > len(self.data):
            self.data.extend(bytes(end - len(self.data)))
        self.data[offset:end] = data

    def discard(self, offset: int, n: int) -> None:
        end = min(offset + n, len(self.data))
        if end > offset:
            self.data[offset:end] = bytes(end - offset)

    def flush(self) -> None:
        self.flushes += 1

    def size(self) -> int:
        return len(self.data)

    def truncate(self, n: int) -> None:
        if n < len(self.data):
            del self.data[n:]
        else:
            self.data.extend(bytes(n - len(self.data)))

    def close(self) -> None:
        pass


# -- fault injection ---------------------------------------------------------


class InjectedFault(OSError):
    """An I/O error `FaultyBlock` was told to raise."""

    def __init__(self, what: str) -> None:
        super().__init__(errno.EIO, f"injected fault: {what}")


class Crashed(InjectedFault):
    """The simulated machine has crashed: no further I/O reaches the file."""


class FaultyBlock:
    """Wraps a block file; fails or crashes after a number of operations.

    ``fail_write_after=N``: the (N+1)th write raises `InjectedFault` (once; later
    writes go through).  ``fail_flush_after=N``: likewise for flushes.
    ``crash_after=N``: after N writes/discards/truncates/flushes in total, every
    further operation raises `Crashed`.

    Alongside the wrapped file it tracks the durable state: the contents as of
    the last completed flush, plus the operations since.  `after_power_loss`
    returns what a power failure could leave: the durable contents with a
    random subset of the unflushed operations applied in order.
    """

    def __init__(self, inner: BlockFile, *, fail_write_after: int | None = None,
                 fail_flush_after: int | None = None, crash_after: int | None = None) -> None:
        self.inner = inner
        self.fail_write_after = fail_write_after
        self.fail_flush_after = fail_flush_after
        self.crash_after = crash_after
        self.writes = 0
        self.flushes = 0
        self.ops = 0
        self.crashed = False
        self._durable = bytearray(_read_all(inner))
        self._pending: list[tuple[str, int, bytes | int]] = []

    def _tick(self) -> None:
        if self.crashed:
            raise Crashed("after crash")
        if self.crash_after is not None and self.ops >= self.crash_after:
            self.crashed = True
            raise Crashed(f"crash after {self.ops} operations")
        self.ops += 1

    def pread(self, offset: int, n: int) -> bytes:
        if self.crashed:
            raise Crashed("after crash")
        return self.inner.pread(offset, n)

    def pwrite(self, offset: int, data: Buffer) -> None:
        self._tick()
        self.writes += 1
        if self.fail_write_after is not None and self.writes == self.fail_write_after + 1:
            raise InjectedFault(f"write #{self.writes} at {offset}")
        self.inner.pwrite(offset, data)
        self._pending.append(("w", offset, bytes(data)))

    def discard(self, offset: int, n: int) -> None:
        self._tick()
        self.writes += 1
        if self.fail_write_after is not None and self.writes == self.fail_write_after + 1:
            raise InjectedFault(f"discard #{self.writes} at {offset}")
        self.inner.discard(offset, n)
        self._pending.append(("d", offset, n))

    def truncate(self, n: int) -> None:
        self._tick()
        self.inner.truncate(n)
        self._pending.append(("t", n, 0))

    def flush(self) -> None:
        self._tick()
        self.flushes += 1
        if self.fail_flush_after is not None and self.flushes == self.fail_flush_after + 1:
            raise InjectedFault(f"flush #{self.flushes}")
        self.inner.flush()
        for op in self._pending:
            _apply(self._durable, op)
        self._pending.clear()

    def size(self) -> int:
        return self.inner.size()

    def close(self) -> None:
        self.inner.close()

    @property
    def unflushed(self) -> int:
        return len(self._pending)

    def durable(self) -> bytes:
        """The contents as of the last completed flush."""
        return bytes(self._durable)

    def after_power_loss(self, rng: random.Random | None = None, keep: float = 0.5) -> bytes:
        """The durable contents plus a random subset of the unflushed operations."""
        if rng is None:
            import random

            rng = random.Random()
        image = bytearray(self._durable)
        for op in self._pending:
            if rng.random() < keep:
                _apply(image, op)
        return bytes(image)


def _apply(image: bytearray, op: tuple[str, int, bytes | int]) -> None:
    kind, offset, arg = op
    if kind == "w":
        assert isinstance(arg, bytes)
        end = offset + len(arg)
        if end > len(image):
            image.extend(bytes(end - len(image)))
        image[offset:end] = arg
    elif kind == "d":
        assert isinstance(arg, int)
        end = min(offset + arg, len(image))
        if end > offset:
            image[offset:end] = bytes(end - offset)
    else:
        if offset < len(image):
            del image[offset:]
        else:
            image.extend(bytes(offset - len(image)))


def _read_all(block: BlockFile) -> bytes:
    return block.pread(0, block.size())


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a file"
