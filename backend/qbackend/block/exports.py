"""What an NBD export serves: a raw file or a QED image, behind one small
interface that the NBD server calls from its connection threads.

Every method may be called from several threads (one per connection, plus
flush workers): raw files rely on pread/pwrite being positional; QED images
serialise on a lock, since their metadata is shared state.
"""

from __future__ import annotations

import errno as E
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from qbackend.block.blockfile import FileBlock, views_after
from qbackend.block.read_map import ReadMap
from qbackend.errors import ImageError
from qbackend.options import NbdExportOptions
from qbackend.protocol.nbd import AllocationFlags, ExportInfo

ZERO_CHUNK = bytes(1 << 20)
# Block status of a file asks the kernel for at most this many holes and data runs per request.
MAX_FILE_EXTENTS = 4096


class Export(Protocol):
    info: ExportInfo
    # Where the export's bytes are in a file, for native readers; None if nothing is.
    read_map: ReadMap | None

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None: ...

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None: ...

    def trim(self, offset: int, length: int, fua: bool) -> None: ...

    def flush(self) -> None: ...

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, AllocationFlags) extents from offset, covering at least one byte."""
        ...

    def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(length, depth) runs for qemu:allocation-depth: 0 unallocated, 1 this image, 2 its backing, ..."""
        ...

    def close(self) -> None: ...


def detect_format(path: Path) -> str:
    with open(path, "rb") as f:
        return "qed" if f.read(4) == b"QED\0" else "raw"


def probe_format(opts: NbdExportOptions) -> str:
    """The format of an export given without format=, where probing is safe.

    Probing a writable image is refused: a client could write a QED header
    naming a backing file into a raw image, and the next probe would follow
    it to a file of the client's choosing (the hole QEMU closed).  A
    read-only image is probed, but a QED one that names a backing file is
    refused too: whether another file is read must not depend on bytes a
    client may have written.  `format=qed` opens such an image as it says.
    """
    if not opts.readonly:
        raise ImageError(f"export {opts.name}: give format=qed or format=raw (qbackend does not probe writable "
                         "images: a client could turn a raw image into a QED one naming a file to read)")
    if not opts.image.exists():
        raise FileNotFoundError(f"export {opts.name}: image {opts.image} does not exist")
    fmt = detect_format(opts.image)
    if fmt == "qed":
        from qbackend.block.qed import Feature, QedHeader

        with open(opts.image, "rb") as f:
            header = QedHeader.unpack(f.read(64))
        if header.features & Feature.BACKING_FILE:
            raise ImageError(f"export {opts.name}: {opts.image} looks like a QED image with a backing file; "
                             "probing does not follow backing files: give format=qed if it is one")
    return fmt


class RawExport:
    """A plain file, served as it is."""

    def __init__(self, name: str, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.block = FileBlock.open(path, writable=not readonly)
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)  # for SEEK_DATA / SEEK_HOLE
        # No description: the image's host path is nobody's business but the host's (qemu-nbd says nothing).
        self.info = ExportInfo(name=name, size=self.block.size(), read_only=readonly)
        # Every byte is where the guest sees it: native readers may read any of it (and
        # native writers write it, when the export is writable).
        self.read_map = ReadMap.create(self.block.fd, self.info.size, identity=True, writable=not readonly)

    def read(self, offset: int, length: int) -> bytes:
        data = self.block.pread(offset, length)
        return data if len(data) == length else data.ljust(length, b"\0")

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        """read(), straight into ``views`` (a vhost-user request's guest buffers)."""
        got = self.block.preadv(offset, views)
        for view in views_after(views, got):  # past the end of a file shorter than the export
            view[:] = bytes(view.nbytes)

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self.block.pwrite(offset, data)
        if fua:
            self.block.flush()

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        if may_trim:
            self.block.discard(offset, length)
        else:
            for pos in range(offset, offset + length, len(ZERO_CHUNK)):
                n = min(len(ZERO_CHUNK), offset + length - pos)
                self.block.pwrite(pos, ZERO_CHUNK[:n])
        if fua:
            self.block.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.block.discard(offset, length)
        if fua:
            self.block.flush()

    def flush(self) -> None:
        self.block.flush()

    def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 1)]  # a raw file is its own only layer, allocated everywhere (as QEMU's raw driver says)

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        return file_extents(self.fd, offset, min(offset + length, self.info.size) - offset,
                            max_extents=MAX_FILE_EXTENTS)

    def close(self) -> None:
        if self.read_map is not None:
            self.read_map.close()  # no native reader uses the file after this
        self.block.close()
        os.close(self.fd)


def file_extents(fd: int, offset: int, length: int, *, max_extents: int | None = None) -> list[tuple[int, int]]:
    """base:allocation of a file's bytes: its holes (SEEK_HOLE) read as zeros, the rest is data.
    With `max_extents`, at most that many (before merging): a prefix of the range."""
    end = offset + length
    extents: list[tuple[int, int]] = []
    pos = offset
    while pos < end and (max_extents is None or len(extents) < max_extents):
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno != E.ENXIO:
                raise
            data = end  # no data from here to the end of the file
        if data > pos:
            n = min(data, end) - pos
            extents.append((n, AllocationFlags.HOLE | AllocationFlags.ZERO))
            pos += n
            continue
        hole = os.lseek(fd, pos, os.SEEK_HOLE)
        n = min(hole, end) - pos
        extents.append((n, 0))
        pos += n
    return _merge(extents)


def _merge(extents: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for n, flags in extents:
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + n, flags)
        else:
            out.append((n, flags))
    return out


def open_export(opts: NbdExportOptions) -> Export:
    if not opts.image.exists():
        raise FileNotFoundError(f"export {opts.name}: image {opts.image} does not exist")
    fmt = opts.format or probe_format(opts)
    if fmt == "raw":
        return RawExport(opts.name, opts.image, opts.readonly)
    if fmt == "qed":
        from qbackend.block.qed_export import QedExport  # the QED layer is only loaded when used

        return QedExport(opts.name, opts.image, opts.readonly)  # QedImage locks itself
    raise ValueError(f"export {opts.name}: unknown format {fmt!r} (raw or qed)")
