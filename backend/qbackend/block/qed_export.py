"""A QED image as an NBD export (qbackend.block.qed does the format; this maps
NBD's operations and block status onto it)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from qbackend.block.blockfile import FileBlock
from qbackend.block.exports import MAX_FILE_EXTENTS, file_extents
from qbackend.block.qed import MapKind, QedImage, RawBacking
from qbackend.protocol.nbd import AllocationFlags, ExportInfo

# base:allocation as qemu-nbd reports QED: allocated clusters are data; zero
# clusters, and unallocated clusters with nothing below, read as zeros and
# hold no data; what comes from the backing file is what the backing file
# says (qemu-nbd looks through the whole chain, down to a raw file's holes).
_FLAGS = {
    MapKind.DATA: 0,
    MapKind.ZERO: AllocationFlags.HOLE | AllocationFlags.ZERO,
    MapKind.UNALLOCATED: AllocationFlags.HOLE | AllocationFlags.ZERO,
}


def chain_status(image: QedImage, offset: int, length: int, *, bounded: bool = False) -> list[tuple[int, int]]:
    """(length, AllocationFlags) of [offset, offset+length) through the backing chain.

    `bounded`: each layer's walk is bounded (QedImage.map's `bounded`, file_extents'
    `max_extents`), and the extents then cover a prefix of the range: what one block status
    request gets, however large the image (NBD lets the reply be shorter than asked)."""
    out: list[tuple[int, int]] = []
    for ext in image.map(offset, length, bounded=bounded):
        if ext.kind is not MapKind.BACKING:
            out.append((ext.length, int(_FLAGS[ext.kind])))
            continue
        if isinstance(image.backing, QedImage):
            below = chain_status(image.backing, ext.start, ext.length, bounded=bounded)
        elif isinstance(image.backing, RawBacking) and isinstance(image.backing.f, FileBlock):
            below = file_extents(image.backing.f.fd, ext.start, ext.length,
                                 max_extents=MAX_FILE_EXTENTS if bounded else None)
        else:
            below = [(ext.length, 0)]
        out += below
        if sum(n for n, _ in below) < ext.length:
            break  # the layer below stopped early: the answer ends there
    return out


class QedExport:
    def __init__(self, name: str, path: Path, readonly: bool = False) -> None:
        self.image = QedImage.open_path(path, read_only=readonly, native_map=True)
        self.info = ExportInfo(name=name, size=self.image.image_size, read_only=readonly)
        self.read_map = self.image.read_map

    def read(self, offset: int, length: int) -> bytes:
        return self.image.read(offset, length)

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        """read(), straight into ``views`` (a vhost-user request's guest buffers)."""
        self.image.readinto(offset, views)

    def write(self, offset: int, data: bytes | memoryview, fua: bool) -> None:
        self.image.write(offset, data)
        if fua:
            self.image.flush()

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        # Zero clusters hold no data either way, so NO_HOLE changes nothing here.
        self.image.write_zeroes(offset, length)
        if fua:
            self.image.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.image.discard(offset, length)
        if fua:
            self.image.flush()

    def flush(self) -> None:
        self.image.flush()

    def block_status(self, offset: int, length: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for n, flags in chain_status(self.image, offset, length, bounded=True):
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + n, flags)
            else:
                out.append((n, flags))
        return out

    def allocation_depth(self, offset: int, length: int) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for n, depth in self.image.allocation_depth(offset, length, bounded=True):
            if out and out[-1][1] == depth:
                out[-1] = (out[-1][0] + n, depth)
            else:
                out.append((n, depth))
        return out

    def close(self) -> None:
        self.image.close()
