"""The DMA map table of one vfio-user connection.

The client (QEMU) describes guest memory with DMA_MAP.  A map that comes
with an fd is mmapped here, so guest memory is read and written directly;
the fd is kept until the map goes, for a hand-over to a new process
(qbackend.app.upgrade), which maps it again (`save` / `restore`).  A map without
an fd (ROMs, VGA memory, or guest RAM that is not shared) can only be
reached by asking the client with DMA_READ / DMA_WRITE messages; this table
says which case an address falls in, and the connection sends the messages.
"""

from __future__ import annotations

import bisect
import errno as E
import mmap
import os
from dataclasses import dataclass

from qbackend.errors import DeviceError
from qbackend.plumbing.handover import HandoverError, Loader, Saver, State
from qbackend.plumbing.peer_memory import PeerMemoryError, check_peer_memory
from qbackend.protocol.vfio_user import DmaMap, DmaMapFlags, DmaUnmap, DmaUnmapFlags, RequestError


class DmaError(DeviceError):
    """A DMA access outside the client's maps (errno: what the reply carries)."""

    errno = E.EFAULT


@dataclass
class Mapping:
    addr: int
    size: int
    flags: DmaMapFlags
    memory: mmap.mmap | None  # None: reach it through DMA messages
    fd: int | None = None  # what `memory` maps (kept for a hand-over)
    offset: int = 0  # of `memory` in `fd`

    @property
    def end(self) -> int:
        return self.addr + self.size


class DmaTable:
    def __init__(self, max_maps: int = 65535) -> None:
        self.max_maps = max_maps
        self._starts: list[int] = []  # sorted map start addresses
        self._maps: dict[int, Mapping] = {}

    def __len__(self) -> int:
        return len(self._maps)

    def mappings(self) -> list[Mapping]:
        return [self._maps[a] for a in self._starts]

    def add(self, req: DmaMap, fd: int | None) -> None:
        """Record a map; takes ownership of fd (kept with the map, closed on error)."""
        try:
            self._check_free(req.addr, req.size)
            if len(self._maps) >= self.max_maps:
                raise RequestError(f"DMA map table is full ({self.max_maps} maps)", E.ENOSPC)
            memory = None
            if fd is not None:
                prot = 0
                if req.flags & DmaMapFlags.READ:
                    prot |= mmap.PROT_READ
                if req.flags & DmaMapFlags.WRITE:
                    prot |= mmap.PROT_WRITE | mmap.PROT_READ
                try:
                    check_peer_memory(fd, req.offset, req.size)
                except PeerMemoryError as exc:
                    raise RequestError(f"DMA region {req.addr:#x}+{req.size:#x}: {exc}",
                                       exc.errno or E.EINVAL) from None
                try:
                    memory = mmap.mmap(fd, req.size, flags=mmap.MAP_SHARED, prot=prot or mmap.PROT_READ,
                                       offset=req.offset)
                except (OSError, ValueError, OverflowError) as exc:
                    raise RequestError(f"cannot mmap DMA region {req.addr:#x}+{req.size:#x}: {exc}",
                                       E.EINVAL) from None
        except BaseException:
            if fd is not None:
                os.close(fd)
            raise
        bisect.insort(self._starts, req.addr)
        self._maps[req.addr] = Mapping(req.addr, req.size, req.flags, memory, fd, req.offset)

    def _check_free(self, addr: int, size: int) -> None:
        i = bisect.bisect_right(self._starts, addr)
        if i > 0 and self._maps[self._starts[i - 1]].end > addr:
            raise RequestError(f"DMA map {addr:#x}+{size:#x} overlaps an existing map", E.EEXIST)
        if i < len(self._starts) and self._starts[i] < addr + size:
            raise RequestError(f"DMA map {addr:#x}+{size:#x} overlaps an existing map", E.EEXIST)

    def remove(self, req: DmaUnmap) -> None:
        if req.flags & DmaUnmapFlags.ALL:
            self.clear()
            return
        mapping = self._maps.get(req.addr)
        if mapping is None or mapping.size != req.size:
            raise RequestError(f"no DMA map is exactly {req.addr:#x}+{req.size:#x}", E.ENOENT)
        self._drop(mapping)

    def _drop(self, mapping: Mapping) -> None:
        del self._maps[mapping.addr]
        self._starts.remove(mapping.addr)
        if mapping.memory is not None:
            mapping.memory.close()
        if mapping.fd is not None:
            os.close(mapping.fd)

    def clear(self) -> None:
        for mapping in list(self._maps.values()):
            self._drop(mapping)

    def open_fds(self) -> list[int]:
        return [m.fd for m in self._maps.values() if m.fd is not None]

    def save(self, saver: Saver) -> list[State]:
        """The maps, for a hand-over (the fds travel; this table keeps its own)."""
        return [{"addr": m.addr, "size": m.size, "flags": int(m.flags), "offset": m.offset,
                 "fd": saver.optional_fd(m.fd)} for m in self.mappings()]

    def restore(self, maps: list[State], loader: Loader) -> None:
        """Map again what `save` described (in the new process); the same checks as DMA_MAP."""
        for entry in maps:
            fd = loader.take_optional(entry["fd"])
            try:
                self.add(DmaMap(DmaMapFlags(int(entry["flags"])), int(entry["offset"]), int(entry["addr"]),
                                int(entry["size"])), fd)
            except RequestError as exc:
                raise HandoverError(f"DMA map {entry['addr']:#x}: {exc}") from None

    def find(self, addr: int, count: int) -> Mapping:
        """The one map holding all of [addr, addr+count)."""
        i = bisect.bisect_right(self._starts, addr)
        if i > 0:
            mapping = self._maps[self._starts[i - 1]]
            if addr + count <= mapping.end:
                return mapping
        raise DmaError(f"guest address {addr:#x}+{count:#x} is not inside one DMA map")

    def read_direct(self, mapping: Mapping, addr: int, count: int) -> bytes:
        if not mapping.flags & DmaMapFlags.READ:
            raise DmaError(f"DMA map at {mapping.addr:#x} is not readable", errno=E.EPERM)
        assert mapping.memory is not None
        start = addr - mapping.addr
        if start < 0 or start + count > mapping.size:
            raise DmaError(f"guest address {addr:#x}+{count:#x} is outside the map at {mapping.addr:#x}")
        return mapping.memory[start:start + count]

    def write_direct(self, mapping: Mapping, addr: int, data: bytes) -> None:
        if not mapping.flags & DmaMapFlags.WRITE:
            raise DmaError(f"DMA map at {mapping.addr:#x} is not writable", errno=E.EPERM)
        assert mapping.memory is not None
        start = addr - mapping.addr
        if start < 0 or start + len(data) > mapping.size:
            raise DmaError(f"guest address {addr:#x}+{len(data):#x} is outside the map at {mapping.addr:#x}")
        mapping.memory[start:start + len(data)] = data
