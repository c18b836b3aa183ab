"""The memory a peer group shares: a memfd, or a file in /dev/shm that host
programs can open by name; mapped once, closed (fd and mapping) on close()."""

from __future__ import annotations

import mmap
import os
from pathlib import Path


class SharedMemory:
    """The memory object a peer group shares: a memfd, or a file in /dev/shm
    that host programs can open by name."""

    def __init__(self, size: int, shm_name: str | None = None) -> None:
        if size < 4096 or size & (size - 1):
            raise ValueError(f"ivshmem size {size} must be a power of two of at least 4 KiB "
                             "(QEMU asserts BAR sizes are powers of two)")
        self.size = size
        self.path: Path | None = None
        if shm_name:
            if "/" in shm_name:
                raise ValueError(f"shm name {shm_name!r} must not contain '/'")
            self.path = Path("/dev/shm") / shm_name
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        else:
            self.fd = os.memfd_create("qbackend-ivshmem", os.MFD_CLOEXEC)
        try:
            if os.fstat(self.fd).st_size != size:
                os.ftruncate(self.fd, size)
            self.memory = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise

    def read(self, offset: int, count: int) -> bytes:
        return self.memory[offset:offset + count]

    def write(self, offset: int, data: bytes) -> None:
        self.memory[offset:offset + len(data)] = data

    def close(self, unlink: bool = False) -> None:
        self.memory.close()
        os.close(self.fd)
        if unlink and self.path is not None:
            self.path.unlink(missing_ok=True)


