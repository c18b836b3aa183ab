"""The ivshmem-server protocol, sans-IO (QEMU docs/specs/ivshmem-spec.rst,
"Client-Server Protocol"; hw/misc/ivshmem-pci.c; contrib/ivshmem-server).

The server speaks, the client only listens.  Every message is one
little-endian int64, carrying at most one file descriptor (SCM_RIGHTS):

1. the protocol version, 0, without an fd;
2. the client's own peer id (0..65535), without an fd;
3. -1 with the shared memory fd (its size must be a power of two: QEMU
   asserts it when it registers BAR2);
4. from then on, ``peer_id`` with an eventfd binds the next vector of that
   peer (the client's own id included: those are the eventfds the client
   waits on), and ``peer_id`` without an fd says that the peer has left.

A message carrying an fd ends the recvmsg() that reads it (Linux stops a
stream read after the segment with the fds), so the fds handed to
`ClientConnection.receive_data` belong to the last message the data
completes.

`ClientConnection` is the client's side (what a stock QEMU does, and what
`qbackend.ivshmem.peer` does for host programs).  The server side only
needs `encode`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Union

MESSAGE = struct.Struct("<q")
PROTOCOL_VERSION = 0
SHM_MESSAGE = -1  # the message that carries the shared memory fd
MAX_PEER_ID = 0xFFFF  # QEMU's check on the own id (ivshmem_recv_setup)
MAX_VECTORS = 64  # contrib/ivshmem-server's limit, and QEMU ivshmem's
MAX_BUFFER = 64 * MESSAGE.size  # more than this unparsed is a broken server


def encode(value: int) -> bytes:
    """One message.  Send it with its fd (if any) in a sendmsg() of its own."""
    return MESSAGE.pack(value)


class ProtocolError(Exception):
    """The server broke the protocol.  `fds` were received with the
    offending input and are now the caller's to close."""

    def __init__(self, message: str, fds: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.fds = fds


class State(IntEnum):
    VERSION = 0  # expects 0, no fd
    OWN_ID = 1  # expects 0..65535, no fd
    SHM = 2  # expects -1 with an fd
    RUNNING = 3  # peer vectors and peer departures
    CLOSED = 4  # the server hung up


# What each setup state accepts: (check, error text, next state).
_SETUP: dict[State, tuple[Callable[[int, int | None], bool], str, State]] = {
    State.VERSION: (lambda v, fd: v == PROTOCOL_VERSION and fd is None,
                    "first message must be version 0 without an fd", State.OWN_ID),
    State.OWN_ID: (lambda v, fd: 0 <= v <= MAX_PEER_ID and fd is None,
                   "second message must be the own id (0..65535) without an fd", State.SHM),
    State.SHM: (lambda v, fd: v == SHM_MESSAGE and fd is not None,
                "third message must be -1 with the shared memory fd", State.RUNNING),
}


@dataclass(frozen=True)
class Setup:
    """Setup done: our id and the shared memory (the fd is the caller's)."""

    own_id: int
    shm_fd: int


@dataclass(frozen=True)
class PeerVector:
    """`fd` is vector `vector` of `peer` (our own id: one of our vectors)."""

    peer: int
    vector: int
    fd: int


@dataclass(frozen=True)
class PeerGone:
    """`peer` has left; its vectors' fds should be closed."""

    peer: int


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()
Event = Union[Setup, PeerVector, PeerGone, NeedData]


@dataclass
class ClientConnection:
    """The client side: `receive_data(bytes, fds)`, then `next_event()`
    until NEED_DATA.  EOF is `receive_data(b"")`."""

    max_vectors: int = MAX_VECTORS
    state: State = State.VERSION
    own_id: int | None = None
    vectors: dict[int, int] = field(default_factory=dict)  # peer -> vectors bound so far
    _buffer: bytearray = field(default_factory=bytearray)
    _messages: list[tuple[int, int | None]] = field(default_factory=list)

    def receive_data(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        if self.state is State.CLOSED:
            raise ProtocolError("data after the connection closed", tuple(fds))
        if not data:
            if fds:
                raise ProtocolError("fds without data", tuple(fds))
            if self._buffer:
                raise ProtocolError(f"connection closed inside a message ({len(self._buffer)} bytes)")
            self.state = State.CLOSED
            return
        self._buffer += data
        if len(fds) > 1:
            raise ProtocolError(f"{len(fds)} fds with one read; a message carries at most one", tuple(fds))
        if fds and len(self._buffer) % MESSAGE.size:
            raise ProtocolError("an fd arrived inside a message", tuple(fds))
        if len(self._buffer) > MAX_BUFFER:
            raise ProtocolError(f"more than {MAX_BUFFER} bytes unparsed", tuple(fds))
        count = len(self._buffer) // MESSAGE.size
        for i in range(count):
            (value,) = MESSAGE.unpack_from(self._buffer, i * MESSAGE.size)
            last = i == count - 1
            self._messages.append((value, fds[0] if fds and last else None))
        del self._buffer[:count * MESSAGE.size]

    def next_event(self) -> Event:
        while self._messages:
            value, fd = self._messages.pop(0)
            event = self._apply(value, fd)
            if event is not None:
                return event
        return NEED_DATA

    def pending_fds(self) -> list[int]:
        """Fds received but not yet handed out as events (close them on teardown)."""
        return [fd for _, fd in self._messages if fd is not None]

    def _fail(self, message: str, fd: int | None) -> ProtocolError:
        fds = [f for f in self.pending_fds()]
        self._messages.clear()
        if fd is not None:
            fds.insert(0, fd)
        return ProtocolError(message, tuple(fds))

    def _apply(self, value: int, fd: int | None) -> Setup | PeerVector | PeerGone | None:
        if self.state in _SETUP:
            check, error, after = _SETUP[self.state]
            if not check(value, fd):
                raise self._fail(f"{error}; got {value}{' with an fd' if fd is not None else ''}", fd)
            if self.state is State.OWN_ID:
                self.own_id = value
            self.state = after
            if after is State.RUNNING:
                assert self.own_id is not None and fd is not None
                return Setup(self.own_id, fd)
            return None
        if self.state is not State.RUNNING:
            raise self._fail(f"message {value} in state {self.state.name}", fd)
        if not 0 <= value <= MAX_PEER_ID:
            raise self._fail(f"peer id {value} is outside 0..{MAX_PEER_ID}", fd)
        if fd is None:
            if value == self.own_id:
                raise self._fail("the server says we left", fd)
            self.vectors.pop(value, None)
            return PeerGone(value)
        n = self.vectors.get(value, 0)
        if n >= self.max_vectors:
            raise self._fail(f"more than {self.max_vectors} vectors for peer {value}", fd)
        self.vectors[value] = n + 1
        return PeerVector(value, n, fd)
