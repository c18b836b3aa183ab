"""Host programs as ivshmem peers, through an ivshmem-server socket
(qbackend's, `--ivshmem ...,server=PATH` or `qbackend ivshmem server`, or
QEMU's contrib ivshmem-server).  Blocking, thread-based, no trio:

    with IvshmemPeer("/tmp/group.sock", vectors=2, on_doorbell=lambda v: print("rung", v)) as me:
        me.write(0, b"hello")
        for peer in me.peers():
            me.ring(peer, 0)

A peer has an id, maps the group's memory, owns one eventfd per vector
(the server hands them out; anyone who writes one rings us) and holds every
other peer's eventfds (writing one rings that peer: a doorbell between two
host peers never passes through qbackend).  Joins and leaves arrive on the
socket; a reader thread applies them.

In-process host programs can use `qbackend.ivshmem.local_peer.LocalPeer` instead.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

from qbackend.errors import DeviceError
from qbackend.plumbing.unix import clear_eventfd, fds_from_ancdata, signal_eventfd
from qbackend.protocol import ivshmem_server as wire

log = logging.getLogger(__name__)

_CMSG_SPACE = socket.CMSG_SPACE(4 * struct.calcsize("i"))
SETUP_QUIET = 0.1  # without a vector count: setup is over after this long without a message


class PeerError(DeviceError, RuntimeError):
    """The server broke the protocol or went away during setup."""


def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message's worth (a message with an fd ends a read)."""
    data, ancdata, _flags, _ = sock.recvmsg(wire.MESSAGE.size, _CMSG_SPACE)
    return data, fds_from_ancdata(ancdata)


class IvshmemPeer:
    """One host peer.  `vectors`: how many eventfds of our own to expect
    (the protocol does not say; without it, setup ends once they stop
    coming).  `on_doorbell(vector)` runs in a thread of its own;
    `on_join(peer)` / `on_leave(peer)` in the socket reader thread, for
    peers that join after us and for any peer that leaves."""

    def __init__(self, path: str | os.PathLike[str], *, vectors: int | None = None, timeout: float = 10.0,
                 on_doorbell: Callable[[int], None] | None = None,
                 on_join: Callable[[int], None] | None = None,
                 on_leave: Callable[[int], None] | None = None) -> None:
        self.path = Path(path)
        self.on_join = on_join
        self.on_leave = on_leave
        self.id = -1
        self.eventfds: list[int] = []  # ours: rung by others
        self._peers: dict[int, list[int]] = {}  # others' eventfds
        self._lock = threading.Lock()
        self._closed = False
        self._protocol = wire.ClientConnection()
        self._shm_fd: int | None = None
        self.memory: mmap.mmap | None = None
        self._reader: threading.Thread | None = None
        self._doorbells: threading.Thread | None = None
        self._stop_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(os.fspath(self.path))
            self._setup(timeout, vectors)
            self.sock.settimeout(None)
        except BaseException:
            self.close()
            raise
        self._reader = threading.Thread(target=self._read_loop, name=f"ivshmem-peer-{self.id}", daemon=True)
        self._reader.start()
        if on_doorbell is not None:
            self._doorbells = threading.Thread(target=self._doorbell_loop, args=(on_doorbell,),
                                               name=f"ivshmem-peer-{self.id}-doorbells", daemon=True)
            self._doorbells.start()

    # -- setup and the reader thread ---------------------------------------------------

    def _setup(self, timeout: float, vectors: int | None) -> None:
        """Read until we hold `vectors` eventfds of our own.  The protocol
        does not say how many there are: without `vectors`, read up to our
        first and then for as long as more keep coming (the server sends
        them together, after the other peers')."""
        deadline = time.monotonic() + timeout
        while len(self.eventfds) < (vectors or 1):
            if time.monotonic() > deadline:
                raise PeerError(f"{self.path}: no setup from the server within {timeout} s")
            self._receive_one(block=True)
        if vectors is None:
            while self._receive_one(block=False, wait=SETUP_QUIET):
                pass

    def _receive_one(self, block: bool, wait: float = 0.0) -> bool:
        try:
            if not block:
                ready, _, _ = select.select([self.sock], [], [], wait)
                if not ready:
                    return False
            data, fds = _recv(self.sock)
        except TimeoutError:
            raise PeerError(f"{self.path}: the server stopped sending during setup") from None
        try:
            self._protocol.receive_data(data, fds)
            while True:
                event = self._protocol.next_event()
                if event is wire.NEED_DATA:
                    break
                self._apply(event)
        except wire.ProtocolError as exc:
            for fd in exc.fds:
                os.close(fd)
            raise PeerError(f"{self.path}: {exc}") from None
        if not data:
            if self.id < 0 or not self.eventfds:
                raise PeerError(f"{self.path}: the server closed the connection during setup")
            return False
        return True

    def _apply(self, event: wire.Event) -> None:
        if isinstance(event, wire.Setup):
            self.id = event.own_id
            self._shm_fd = event.shm_fd
            size = os.fstat(event.shm_fd).st_size
            self.memory = mmap.mmap(event.shm_fd, size, flags=mmap.MAP_SHARED)
        elif isinstance(event, wire.PeerVector):
            if event.peer == self.id:
                self.eventfds.append(event.fd)
                return
            with self._lock:
                known = event.peer in self._peers
                self._peers.setdefault(event.peer, []).append(event.fd)
            if not known and self.on_join is not None and self._reader is not None:
                self.on_join(event.peer)
        elif isinstance(event, wire.PeerGone):
            with self._lock:
                fds = self._peers.pop(event.peer, [])
            for fd in fds:
                os.close(fd)
            if self.on_leave is not None:
                self.on_leave(event.peer)

    def _read_loop(self) -> None:
        try:
            while not self._closed:
                if not self._receive_one(block=True):
                    break
        except (OSError, PeerError) as exc:
            if not self._closed:
                log.warning("ivshmem peer %d: %s", self.id, exc)

    def _doorbell_loop(self, on_doorbell: Callable[[int], None]) -> None:
        poller = select.poll()
        poller.register(self._stop_fd, select.POLLIN)
        by_fd = {fd: v for v, fd in enumerate(self.eventfds)}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == self._stop_fd:
                    return
                if clear_eventfd(fd):
                    on_doorbell(by_fd[fd])

    # -- the API ---------------------------------------------------------------------

    @property
    def vectors(self) -> int:
        return len(self.eventfds)

    @property
    def size(self) -> int:
        assert self.memory is not None
        return len(self.memory)

    def peers(self) -> list[int]:
        """The other peers' ids."""
        with self._lock:
            return sorted(self._peers)

    def peer_vectors(self, peer: int) -> int:
        with self._lock:
            return len(self._peers.get(peer, ()))

    def ring(self, peer: int, vector: int) -> bool:
        """Ring `vector` of `peer` (ourselves too); False if there is no such one."""
        with self._lock:
            fds = self.eventfds if peer == self.id else self._peers.get(peer)
            if fds is None or not 0 <= vector < len(fds):
                return False
            signal_eventfd(fds[vector])
            return True

    def eventfd(self, vector: int) -> int:
        """Our eventfd for `vector` (readable when rung; read it to reset)."""
        return self.eventfds[vector]

    def wait(self, vector: int, timeout: float | None = None) -> int:
        """Wait for doorbells on our `vector`; how many (0 on timeout)."""
        poller = select.poll()
        poller.register(self.eventfds[vector], select.POLLIN)
        if not poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
            return 0
        return clear_eventfd(self.eventfds[vector])

    def read(self, offset: int, count: int) -> bytes:
        assert self.memory is not None
        return self.memory[offset:offset + count]

    def write(self, offset: int, data: bytes) -> None:
        assert self.memory is not None
        self.memory[offset:offset + len(data)] = data

    def close(self) -> None:
        """Leave (the server sees the socket close) and release every fd."""
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        signal_eventfd(self._stop_fd)
        for thread in (self._reader, self._doorbells):
            if thread is not None and thread is not threading.current_thread():
                thread.join(5)
        self.sock.close()
        with self._lock:
            fds = [fd for peer_fds in self._peers.values() for fd in peer_fds]
            self._peers.clear()
        fds += self.eventfds + self._protocol.pending_fds()
        self.eventfds = []
        if self.memory is not None:
            self.memory.close()
            self.memory = None
        if self._shm_fd is not None:
            fds.append(self._shm_fd)
            self._shm_fd = None
        fds.append(self._stop_fd)
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> IvshmemPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
