"""Memory a peer hands over as an fd, checked before it is mapped.

vhost-user front ends give guest RAM (SET_MEM_TABLE, ADD_MEM_REG) and
vfio-user clients give DMA regions (DMA_MAP) as file descriptors, which
qbackend maps and then reads and writes from any of its threads.  Should
that file shrink under the mapping, the next access past its new end
raises SIGBUS and ends the whole process, with every device and disk it
serves.  Python cannot recover from that fault, so the file must not be
able to shrink: a memfd sealed with F_SEAL_SHRINK, as QEMU's
`memory-backend-memfd` is by default (its `seal=on`).  Anything else is
refused, as an error of that peer's request alone:

- an unsealed memfd, or any other file (a tmpfs or hugetlbfs file of
  `memory-backend-file` can be truncated by whoever opened it);
- a region that ends past the file's end (its pages would fault at once).

QEMU users pass `-object memory-backend-memfd,id=mem,size=...,share=on`
(sealed unless `seal=off`) and `-machine ...,memory-backend=mem`.
"""

from __future__ import annotations

import errno as E
import fcntl
import os
import stat

from qbackend.errors import DeviceError


class PeerMemoryError(DeviceError):
    """An fd of a peer's memory that qbackend will not map."""


def check_peer_memory(fd: int, offset: int, length: int) -> None:
    """Raise PeerMemoryError unless [offset, offset+length) of `fd` can be mapped for good."""
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise PeerMemoryError(f"memory fd: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise PeerMemoryError("memory fd is not a memfd or file", errno=E.EINVAL)
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = None  # not a memfd: it cannot be sealed
    if seals is None or not seals & fcntl.F_SEAL_SHRINK:
        kind = "a file that cannot be sealed" if seals is None else "a memfd not sealed against shrinking"
        raise PeerMemoryError(f"guest memory is {kind}: refused, since shrinking it would crash qbackend "
                              "(give QEMU -object memory-backend-memfd,share=on, which seals it)", errno=E.EPERM)
    if offset < 0 or length < 0 or offset + length > st.st_size:
        raise PeerMemoryError(f"memory region {offset:#x}+{length:#x} ends past its file's end ({st.st_size:#x})",
                              errno=E.EINVAL)


def sealed_memfd(name: str, size: int) -> int:
    """A memfd of `size` bytes sealed against shrinking and growing, as QEMU makes guest RAM
    (for clients and tests that play a front end's part)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except BaseException:
        os.close(fd)
        raise
    return fd
