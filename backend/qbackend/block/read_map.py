"""An image's guest-to-file map, kept for native readers and writers (read_map.c).

The NBD server's native path (qbackend.servers.nbd_fast) serves a read
without Python when every cluster it touches is mapped here, and a write
when the map is also `writable`: the export is, and writing a mapped
cluster in place is all such a write takes.  The
block layer fills the map with what it has read and checked (a QED image
maps the data clusters of each L2 table it loads, and changes an entry
where it changes the table: read_map_impl.h says why no lock is needed
for that); a raw file is mapped whole (identity).
Closing the map, before the file is closed, waits for any native reader
to be done with the file.  Without native helpers, `ReadMap.create`
returns None and nothing changes.
"""

from __future__ import annotations

from array import array
from pathlib import Path
from typing import Any

from qbackend.plumbing import native

SOURCE = Path(__file__).with_name("read_map.c")
# At most this much memory per image; clusters past it are served by the block layer (a
# 64 KiB-cluster image is mapped up to 512 GiB of data).
MAX_MAP_BYTES = 64 << 20


def block_bytes(helper: native.Native) -> int:
    """The memory of one second-level block of the map (read_map.h): 8-byte entries."""
    bits: int = helper.lib.QB_MAP_BLOCK_BITS
    return 8 << bits


class ReadMap:
    def __init__(self, helper: native.Native, fd: int, size: int, cluster_size: int, identity: bool,
                 writable: bool) -> None:
        lib = helper.lib
        max_blocks = MAX_MAP_BYTES // block_bytes(helper)
        handle = lib.qb_read_map_new(fd, size, cluster_size.bit_length() - 1, identity, max_blocks, writable)
        if handle == helper.ffi.NULL:
            raise MemoryError("cannot allocate a read map")
        self.handle: Any = helper.ffi.gc(handle, lib.qb_read_map_free)
        self.cluster_size = cluster_size
        self._ffi = helper.ffi
        self._set, self._set_many, self._get = lib.qb_read_map_set, lib.qb_read_map_set_many, lib.qb_read_map_get
        self._forget_all, self._close = lib.qb_read_map_forget_all, lib.qb_read_map_close
        self.closed = False

    @classmethod
    def create(cls, fd: int, size: int, cluster_size: int = 1 << 16, *, identity: bool = False,
               writable: bool = False) -> ReadMap | None:
        """A map of the image in file `fd` (`identity`: guest offset = file offset; `writable`:
        native writers may write mapped clusters in place, `fd` is open for writing), or None
        without native helpers.  `cluster_size` must be a power of two."""
        if cluster_size & (cluster_size - 1):
            raise ValueError(f"cluster size {cluster_size} is not a power of two")
        helper = native.load(SOURCE)
        if helper is None:
            return None
        return cls(helper, fd, size, cluster_size, identity, writable)

    def set_many(self, first: int, entries: array[int]) -> None:
        """Clusters `first`, `first`+1, ... are at `entries` (0: not mapped); an array('Q')."""
        if entries:
            pointer = self._ffi.from_buffer("uint64_t[]", entries)
            self._set_many(self.handle, first, pointer, len(entries))
            self._ffi.release(pointer)

    def set(self, cluster: int, host: int) -> None:
        """Cluster `cluster` is at `host` in the file (0: not mapped, ask the block layer)."""
        self._set(self.handle, cluster, host)

    def get(self, cluster: int) -> int:
        value: int = self._get(self.handle, cluster)
        return value

    def forget_all(self) -> None:
        self._forget_all(self.handle)

    def close(self) -> None:
        """Once this returns no native reader uses the file; call it before closing the file."""
        if not self.closed:
            self.closed = True
            self._close(self.handle)
