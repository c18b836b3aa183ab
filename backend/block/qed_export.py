"""A QED image as an NBD export (backend.qed does the format; this maps
NBD's operations and block status onto it)."""

from __future__ import annotations

from pathlib import Path

from qbackend.block.qed import MapKind, QedImage
from qbackend.protocol.nbd import AllocationFlags, ExportInfo

# base:allocation as qemu-nbd reports QED: allocated clusters and the
# backing file's data are data; zero clusters, and unallocated clusters
# with nothing below, read as zeros and hold no data.
_FLAGS = {
    MapKind.DATA: 0,
    MapKind.BACKING: 0,
    MapKind.ZERO: AllocationFlags.HOLE | AllocationFlags.ZERO,
    MapKind.UNALLOCATED: AllocationFlags.HOLE | AllocationFlags.ZERO,
}


class QedExport:
    def __init__(self, name: str, path: Path, readonly: bool = False) -> None:
        self.image = QedImage.open_path(path, read_only=readonly)
        self.info = ExportInfo(name=name, size=self.image.image_size, read_only=readonly)

    def read(self, offset: int, length: int) -> bytes:
        return self.image.read(offset, length)

    def write(self, offset: int, data: bytes, fua: bool) -> None:
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
        for extent in self.image.map(offset, length):
            flags = int(_FLAGS[extent.kind])
            if out and out[-1][1] == flags:
                out[-1] = (out[-1][0] + extent.length, flags)
            else:
                out.append((extent.length, flags))
        return out

    def close(self) -> None:
        self.image.close()
