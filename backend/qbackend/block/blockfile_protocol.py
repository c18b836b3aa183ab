"""`BlockFile`, the block-file interface (qbackend.block.blockfile), as a runtime-checkable
Protocol: a module of its own, so that opening a file does not import typing."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

TYPE_CHECKING = False
if TYPE_CHECKING:
    from qbackend.block.blockfile import Buffer


@runtime_checkable
class BlockFile(Protocol):
    def pread(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset``; short only at the end of the file."""
        ...

    def pwrite(self, offset: int, data: Buffer) -> None:
        """Write all of ``data`` at ``offset``, growing the file if needed."""
        ...

    def discard(self, offset: int, n: int) -> None:
        """Make ``n`` bytes at ``offset`` (inside the file) read as zeros, freeing space where possible."""
        ...

    def flush(self) -> None:
        """Make every write so far durable."""
        ...

    def size(self) -> int: ...

    def truncate(self, n: int) -> None: ...

    def close(self) -> None: ...


BlockFile.__module__ = "qbackend.block.blockfile"  # where it is documented and imported from
