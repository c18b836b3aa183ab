"""The memory a peer group shares: a memfd, or a file in /dev/shm that host
programs can open by name; mapped once, closed (fd and mapping) on close().

A named file becomes guest-writable memory, so it is opened with care:
never through a symlink (`O_NOFOLLOW`), only a regular file this user owns
(another user's file would hand them the group's memory, or the group
theirs), and a new one is created with `O_EXCL`, mode 0600.  Who may join a
group is who may open that file: its owner, as the mode says.
"""

from __future__ import annotations

import errno as E
import mmap
import os
import stat
from pathlib import Path

from qbackend.errors import DeviceError, UsageError

SHM_DIR = Path("/dev/shm")


class SharedMemory:
    """The memory object a peer group shares: a memfd, or a file in /dev/shm
    that host programs can open by name."""

    def __init__(self, size: int, shm_name: str | None = None) -> None:
        if size < 4096 or size & (size - 1):
            raise UsageError(f"ivshmem size {size} must be a power of two of at least 4 KiB "
                             "(QEMU asserts BAR sizes are powers of two)")
        self.size = size
        self.path: Path | None = None
        if shm_name:
            if "/" in shm_name or shm_name in (".", ".."):
                raise UsageError(f"shm name {shm_name!r} must be a plain name (no '/')")
            self.path = SHM_DIR / shm_name
            self.fd = open_shm_file(self.path)
        else:
            self.fd = os.memfd_create("qbackend-ivshmem", os.MFD_CLOEXEC)
        try:
            if os.fstat(self.fd).st_size != size:
                os.ftruncate(self.fd, size)
            self.memory = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(self.fd)
            raise

    @classmethod
    def adopt(cls, fd: int, size: int, path: Path | None) -> SharedMemory:
        """The memory another process shared, from its fd (a hand-over: qbackend.app.upgrade)."""
        memory = cls.__new__(cls)
        memory.size = size
        memory.path = path
        memory.fd = fd
        try:
            if os.fstat(fd).st_size != size:
                raise DeviceError(f"the shared memory handed over is not {size} bytes")
            memory.memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        except BaseException:
            os.close(fd)
            raise
        return memory

    def read(self, offset: int, count: int) -> bytes:
        return self.memory[offset:offset + count]

    def write(self, offset: int, data: bytes) -> None:
        self.memory[offset:offset + len(data)] = data

    def close(self, unlink: bool = False) -> None:
        self.memory.close()
        os.close(self.fd)
        if unlink and self.path is not None:
            self.path.unlink(missing_ok=True)




def open_shm_file(path: Path) -> int:
    """An fd of the regular file at ``path``, owned by this user, created (0600) if
    there is none; a symlink, another kind of file or another user's file is refused."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    for _attempt in range(8):  # a file may come or go between the two opens
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
        except OSError as exc:
            if exc.errno == E.ELOOP:
                raise DeviceError(f"{path} is a symlink: refused (remove it, or choose another shm= name)") from None
            raise DeviceError(f"{path}: cannot open it: {exc.strerror}") from None
        break
    else:
        raise DeviceError(f"{path} keeps appearing and disappearing: refused")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise DeviceError(f"{path} is not a regular file: refused")
        if st.st_uid != os.geteuid():
            raise DeviceError(f"{path} belongs to another user (uid {st.st_uid}): refused; "
                              "choose another shm= name")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd
