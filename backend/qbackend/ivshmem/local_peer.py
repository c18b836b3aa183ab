"""A host peer inside the qbackend process: joins a group, rings and is rung."""

from __future__ import annotations

import logging
import mmap
import os
import select
from collections.abc import Callable

from qbackend.ivshmem.group import PeerGroup, Watch
from qbackend.plumbing.unix import clear_eventfd, make_eventfd, signal_eventfd

log = logging.getLogger(__name__)


class LocalPeer:
    """A host program in this process as a peer of a group.

    It has `vectors` eventfds of its own: a doorbell to (this peer, v)
    signals eventfd v, whether it comes from a guest through qbackend or
    from an ivshmem-server client writing it directly.  Wait on them
    (`wait`, `eventfd`), or give `on_doorbell`: it is then called with the
    vector from the group's watcher thread.  `on_join` / `on_leave` are
    called with the other peer's id, under the group lock.

        peer = LocalPeer(group, vectors=2, on_doorbell=print)
        peer.write(0, b"hello"); peer.ring(1, 0)
        peer.close()
    """

    kind = "host"

    def __init__(self, group: PeerGroup, vectors: int = 1, *, name: str = "host", position: int | None = None,
                 on_doorbell: Callable[[int], None] | None = None,
                 on_join: Callable[[int], None] | None = None,
                 on_leave: Callable[[int], None] | None = None) -> None:
        if not 1 <= vectors <= 64:
            raise ValueError(f"vectors={vectors}: 1..64")
        self.group = group
        self.name = name
        self.position = -1
        self.eventfds = [make_eventfd() for _ in range(vectors)]
        self.counts = [0] * vectors
        self.on_join = on_join
        self.on_leave = on_leave
        self._watches: list[Watch] = []
        self._closed = False
        try:
            with group.lock:
                if on_doorbell is not None:
                    watcher = group.watcher()
                    self._watches = [watcher.watch(fd, self._callback(v, fd, on_doorbell))
                                     for v, fd in enumerate(self.eventfds)]
                group.join(self, position)
        except BaseException:
            self._release()
            raise

    def _callback(self, vector: int, fd: int, on_doorbell: Callable[[int], None]) -> Callable[[], None]:
        def fire() -> None:
            with self.group.lock:
                if self._closed or not clear_eventfd(fd):
                    return
            on_doorbell(vector)
        return fire

    # -- as a group member --

    @property
    def vector_count(self) -> int:
        return len(self.eventfds)

    def receive_doorbell(self, vector: int) -> bool:
        if not 0 <= vector < len(self.eventfds) or self._closed:
            return False
        self.counts[vector] += 1
        signal_eventfd(self.eventfds[vector])
        return True

    def doorbell_eventfds(self) -> list[int] | None:
        return self.eventfds

    def peer_joined(self, peer: int, eventfds: list[int]) -> None:
        if self.on_join is not None:
            self.on_join(peer)

    def peer_left(self, peer: int) -> None:
        if self.on_leave is not None:
            self.on_leave(peer)

    def received(self) -> list[int]:
        return list(self.counts)

    # -- the host program's side --

    @property
    def memory(self) -> mmap.mmap:
        return self.group.memory.memory

    def read(self, offset: int, count: int) -> bytes:
        return self.group.memory.read(offset, count)

    def write(self, offset: int, data: bytes) -> None:
        self.group.memory.write(offset, data)

    def ring(self, peer: int, vector: int) -> bool:
        return self.group.ring(peer, vector)

    def peers(self) -> dict[int, str]:
        """The group's members (id -> kind), ourselves included."""
        with self.group.lock:
            return {pid: p.kind for pid, p in sorted(self.group.peers.items())}

    def eventfd(self, vector: int) -> int:
        return self.eventfds[vector]

    def wait(self, vector: int, timeout: float | None = None) -> int:
        """Wait for doorbells on `vector`; returns how many (0 on timeout)."""
        fd = self.eventfds[vector]
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        if not poller.poll(None if timeout is None else max(0, int(timeout * 1000))):
            return 0
        return clear_eventfd(fd)

    def close(self) -> None:
        """Leave the group and close our eventfds."""
        with self.group.lock:
            if self._closed:
                return
            self.group.leave(self.position)
            self._closed = True
            self._release()

    def _release(self) -> None:
        with self.group.lock:
            for entry in self._watches:
                self.group.watcher().unwatch(entry)
            self._watches = []
            for fd in self.eventfds:
                os.close(fd)
            self.eventfds = []

    def __enter__(self) -> LocalPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


