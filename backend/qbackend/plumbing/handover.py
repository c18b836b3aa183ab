"""The hand-over of a running qbackend to a new process (`qbackend upgrade`):
how the old process's state and file descriptors travel, written once for
every part that takes part (qbackend.app.upgrade runs the hand-over).

The state is one JSON document; every fd in it is written as its index in
the list of fds that travel with it (`Saver.fd`), never as a number of the
old process.  On the wire, over a UNIX socket pair:

    u32 length, JSON bytes            (one message, no fds)
    then the fds, in messages of up to FDS_PER_MESSAGE each (SCM_RIGHTS),
    each message a u32 count of the fds it carries

and the same framing carries the new process's short answers (`send_json`).

The receiving side (`Loader`) hands each fd to the part that claims it by
index; whatever is left unclaimed when the hand-over ends is closed, so a
state the new code does not understand costs no fd.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Sequence
from typing import Any

from qbackend.plumbing.unix import close_fds, fds_ancdata, fds_from_ancdata

FDS_PER_MESSAGE = 250  # under the kernel's SCM_MAX_FD (253)
MAX_DOCUMENT = 64 << 20  # a state larger than this is not one qbackend made
_U32 = struct.Struct("<I")

State = dict[str, Any]


class HandoverError(Exception):
    """The hand-over cannot go on (the old process keeps serving)."""


class Saver:
    """Collects the fds of a state being written; `fd(n)` is what the state holds."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def fd(self, fd: int) -> int:
        """The index under which `fd` travels (the old process keeps its own copy)."""
        self.fds.append(fd)
        return len(self.fds) - 1

    def optional_fd(self, fd: int | None) -> int | None:
        return None if fd is None else self.fd(fd)


class Loader:
    """The fds that came with a state: each claimed once by index (`take`)."""

    def __init__(self, fds: Sequence[int]) -> None:
        self._fds: list[int | None] = list(fds)

    def take(self, index: int) -> int:
        if not isinstance(index, int) or not 0 <= index < len(self._fds):
            raise HandoverError(f"the state names fd #{index!r}, which did not come with it")
        fd = self._fds[index]
        if fd is None:
            raise HandoverError(f"fd #{index} is claimed twice")
        self._fds[index] = None
        return fd

    def take_optional(self, index: int | None) -> int | None:
        return None if index is None else self.take(index)

    def close_rest(self) -> None:
        close_fds(fd for fd in self._fds if fd is not None)
        self._fds = [None] * len(self._fds)


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise HandoverError("the other process closed the hand-over socket")
        data += chunk
    return bytes(data)


def send_json(sock: socket.socket, document: object) -> None:
    data = json.dumps(document).encode()
    sock.sendall(_U32.pack(len(data)) + data)


def recv_json(sock: socket.socket) -> Any:
    (size,) = _U32.unpack(_recv_exactly(sock, _U32.size))
    if size > MAX_DOCUMENT:
        raise HandoverError(f"a hand-over document of {size} bytes is more than {MAX_DOCUMENT}")
    try:
        return json.loads(_recv_exactly(sock, size))
    except ValueError as exc:
        raise HandoverError(f"the hand-over document is not JSON: {exc}") from None


def send_state(sock: socket.socket, state: State, fds: Sequence[int]) -> None:
    """The state and its fds (blocking)."""
    send_json(sock, {"state": state, "fds": len(fds)})
    for start in range(0, len(fds), FDS_PER_MESSAGE):
        chunk = fds[start:start + FDS_PER_MESSAGE]
        sock.sendmsg([_U32.pack(len(chunk))], fds_ancdata(chunk))


def recv_state(sock: socket.socket) -> tuple[State, list[int]]:
    """What send_state sent: the state and its fds, in order (blocking)."""
    header = recv_json(sock)
    if not isinstance(header, dict) or not isinstance(header.get("state"), dict) \
            or not isinstance(header.get("fds"), int):
        raise HandoverError("the hand-over document has no state")
    wanted: int = header["fds"]
    fds: list[int] = []
    try:
        while len(fds) < wanted:
            data, ancdata, _flags, _ = sock.recvmsg(_U32.size, socket.CMSG_SPACE(FDS_PER_MESSAGE * 4))
            got = fds_from_ancdata(ancdata)
            fds.extend(got)
            if len(data) != _U32.size or _U32.unpack(data)[0] != len(got) or not got:
                raise HandoverError("the hand-over lost file descriptors on the way")
    except BaseException:
        close_fds(fds)
        raise
    return header["state"], fds


def socket_pair() -> tuple[socket.socket, socket.socket]:
    """The old process's end and the new one's (inheritable, for the child)."""
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    mine.set_inheritable(False)
    theirs.set_inheritable(True)
    return mine, theirs


def adopt_socket(fd: int) -> socket.socket:
    """A socket object over an fd that came with a state (family and type from the kernel)."""
    sock = socket.socket(fileno=fd)
    os.set_inheritable(fd, False)
    return sock
