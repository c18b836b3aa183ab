"""A peer group's ivshmem-server socket: the protocol QEMU's own
`ivshmem-doorbell` device speaks (protocol/ivshmem_server.py), so that a
stock QEMU (`-chardev socket,path=PATH,id=ivs -device
ivshmem-doorbell,chardev=ivs,vectors=N`) joins the same group as the
vfio-user guests, and so do host programs (qbackend.ivshmem.peer, or QEMU's
contrib ivshmem-client).

Each client gets an id from the group's id space, the group's memory fd,
and `vectors` eventfds per peer: its own (which it waits on) and every other
peer's (which it writes to ring them).  For vfio-user devices those are
eventfds the group watches (ivshmem.PeerGroup.doorbell_fds); a doorbell from
a vfio-user guest to a client writes the client's own eventfd.  Joins and
leaves reach every client as the protocol's messages.

Like contrib/ivshmem-server, a client leaves on any readable event on its
socket (QEMU never writes to it; EOF is the usual one).

Also here: the group commands of the control socket (`qbackend ivshmem
...`), and `serve_group`, the standalone `qbackend ivshmem server`.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import threading
from collections import deque
from pathlib import Path
from typing import Any

import trio

from qbackend.errors import ConfigError
from qbackend.ivshmem.group import CLIENT_KIND, PeerGroup
from qbackend.plumbing.handover import HandoverError, Loader, Saver, State, adopt_socket
from qbackend.plumbing.threads import run_locked
from qbackend.plumbing.unix import (
    AcceptGate,
    accept_forever,
    adopt_owned,
    fds_ancdata,
    listen_unix,
    make_eventfd,
    owned_inode,
    remove_socket,
    signal_eventfd,
)
from qbackend.protocol import ivshmem_server as wire

log = logging.getLogger(__name__)

MAX_QUEUE = 1 << 16  # messages waiting for a client that does not read
# Of those, messages carrying an fd (each holds a duplicate here): far fewer, since every one
# costs the whole process a descriptor; a client that reads lets this never fill.
MAX_QUEUED_FDS = 1024


class ServerClient:
    """One connection to the group's ivshmem-server socket, as a peer.

    Messages go out without blocking: whoever announces a join or leave
    holds the group lock (a vfio-user connection thread, or trio).  What the
    socket does not take at once waits in a queue (fds duplicated, so that
    a peer leaving meanwhile cannot close them under us) that the client's
    task flushes when the socket is writable; a client that lets the queue
    grow past MAX_QUEUE messages, or MAX_QUEUED_FDS messages with an fd, is
    dropped (and its queued fds closed).
    """

    kind = CLIENT_KIND

    def __init__(self, group: PeerGroup, sock: socket.socket, vectors: int,
                 token: trio.lowlevel.TrioToken | None, eventfds: list[int] | None = None) -> None:
        self.group = group
        self.sock = sock
        self.name = "?"
        self.position = -1
        # Handed over from the process before: the eventfds it made (the other peers hold them).
        self.eventfds = eventfds if eventfds is not None else [make_eventfd() for _ in range(vectors)]
        self.counts = [0] * vectors
        self.broken = False
        self._queue: deque[tuple[bytes, int | None]] = deque()
        self._queued_fds = 0
        self._queue_lock = threading.Lock()
        self._token = token  # the trio loop whose task sends what is queued (set when served, if adopted)
        self._wakeup = trio.Event()

    # -- sending --

    def send(self, value: int, fd: int | None = None) -> None:
        if self.broken:
            return
        with self._queue_lock:
            if len(self._queue) >= MAX_QUEUE:
                self._fail(f"more than {MAX_QUEUE} messages unread")
                return
            if fd is not None and self._queued_fds >= MAX_QUEUED_FDS:
                self._fail(f"more than {MAX_QUEUED_FDS} fds unread")
                return
            if fd is not None:
                self._queued_fds += 1
            self._queue.append((wire.encode(value), os.dup(fd) if fd is not None else None))
            self._flush_locked()
            left = bool(self._queue)
        if left and self._token is not None:
            self._token.run_sync_soon(lambda: self._wakeup.set())

    def _flush_locked(self) -> None:
        while self._queue and not self.broken:
            data, fd = self._queue[0]
            anc = fds_ancdata([fd] if fd is not None else [])
            try:
                self.sock.sendmsg([data], anc)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(f"send failed ({exc})")
                return
            self._queue.popleft()
            if fd is not None:
                os.close(fd)
                self._queued_fds -= 1

    def _fail(self, why: str) -> None:
        log.info("ivshmem-server %s: client %d: %s; dropping it", self.group.name, self.position, why)
        self.broken = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes its task, which removes it
        except OSError:
            pass

    async def flush_when_writable(self) -> None:
        """The client task's writer: runs until cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        if self._queue:  # queued in the process before a hand-over
            self._wakeup.set()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await self.group.wait_unpaused()
            while not self.broken:
                if await run_locked(self._queue_lock, self._flush_all_locked):
                    break
                await trio.lowlevel.wait_writable(self.sock)

    def _flush_all_locked(self) -> bool:
        """Send what the socket takes now; True once nothing is left queued."""
        self._flush_locked()
        return not self._queue

    # -- as a group member --

    @property
    def vector_count(self) -> int:
        return len(self.eventfds)

    def receive_doorbell(self, vector: int) -> bool:
        if not 0 <= vector < len(self.eventfds):
            return False
        self.counts[vector] += 1
        signal_eventfd(self.eventfds[vector])
        return True

    def doorbell_eventfds(self) -> list[int] | None:
        return self.eventfds

    def peer_joined(self, peer: int, eventfds: list[int]) -> None:
        for fd in eventfds:
            self.send(peer, fd)

    def peer_left(self, peer: int) -> None:
        self.send(peer)

    def received(self) -> list[int]:
        return list(self.counts)

    def save(self, saver: Saver) -> State:
        """For a hand-over: the socket, the eventfds, and what waits to be sent (its fds travel)."""
        with self._queue_lock:
            queue = [[base64.b64encode(data).decode(), saver.optional_fd(fd)] for data, fd in self._queue]
        return {"position": self.position, "name": self.name, "socket": saver.fd(self.sock.fileno()),
                "eventfds": [saver.fd(fd) for fd in self.eventfds], "counts": list(self.counts),
                "broken": self.broken, "queue": queue}

    @classmethod
    def adopt(cls, group: PeerGroup, saved: State, loader: Loader) -> ServerClient:
        sock = adopt_socket(loader.take(saved["socket"]))
        sock.setblocking(False)
        eventfds = [loader.take(i) for i in saved["eventfds"]]
        client = cls(group, sock, len(eventfds), None, eventfds)
        client.position = int(saved["position"])
        client.name = str(saved["name"])
        client.counts = [int(n) for n in saved["counts"]]
        client.broken = bool(saved["broken"])
        for data, fd in saved["queue"]:
            taken = loader.take_optional(fd)
            client._queue.append((base64.b64decode(data), taken))
            client._queued_fds += taken is not None
        return client

    def close(self) -> None:
        with self._queue_lock:
            for _, fd in self._queue:
                if fd is not None:
                    os.close(fd)
            self._queue.clear()
            self._queued_fds = 0
        for fd in self.eventfds:
            os.close(fd)
        self.eventfds = []
        self.sock.close()


class IvshmemServerEndpoint:
    """The listening socket of one group (mode 0600)."""

    def __init__(self, group: PeerGroup, path: Path) -> None:
        self.group = group
        self.path = Path(path)
        self.clients: dict[int, ServerClient] = {}
        self.connections = 0
        self.gate = AcceptGate()
        self._adopted_listener: socket.socket | None = None
        self._adopted_clients: list[ServerClient] = []

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener, self._adopted_listener = self._adopted_listener, None
        if listener is None:
            listener = listen_unix(self.path)
        adopted, self._adopted_clients = self._adopted_clients, []
        self.gate.listener = listener
        log.info("ivshmem-server %s: listening on %s (%d vectors per peer)", self.group.name, self.path,
                 self.group.vectors)
        try:
            async with trio.open_nursery() as nursery:
                for client in adopted:
                    nursery.start_soon(self._run_client, client)
                task_status.started()
                await accept_forever(listener, f"ivshmem-server {self.group.name}", nursery, self._serve_client,
                                     self.gate)
        finally:
            self.gate.listener = None
            listener.close()
            remove_socket(self.path)

    def save(self, saver: Saver) -> State:
        """Under the group lock, paused (PeerGroup.save): the listener and the clients."""
        listener = self.gate.listener
        if listener is None:
            raise HandoverError(f"ivshmem-server {self.path}: it is not serving")
        inode = owned_inode(self.path)
        return {"path": str(self.path), "listener": saver.fd(listener.fileno()),
                "socket_inode": list(inode) if inode is not None else None, "connections": self.connections,
                "clients": [client.save(saver) for client in self.clients.values()]}

    def adopt(self, saved: State, loader: Loader) -> None:
        """Under the group lock, in the new process (PeerGroup.adopt): the listener, and each
        client at its seat in the group (no join announced: the others know it)."""
        listener = adopt_socket(loader.take(saved["listener"]))
        listener.setblocking(False)
        self._adopted_listener = listener
        adopt_owned(self.path, saved["socket_inode"])
        self.connections = int(saved["connections"])
        for entry in saved["clients"]:
            client = ServerClient.adopt(self.group, entry, loader)
            self.group.peers[client.position] = client
            self.clients[client.position] = client
            self._adopted_clients.append(client)

    def admit(self, sock: socket.socket, token: trio.lowlevel.TrioToken) -> ServerClient:
        """Setup and announcements for a new connection, atomically under the
        group lock (so that no join or leave is seen twice or missed)."""
        group = self.group
        sock.setblocking(False)
        client = ServerClient(group, sock, group.vectors, token)
        try:
            with group.lock:
                position = group.allocate_id()
                client.position = position
                client.name = f"client{self.connections}"
                self.connections += 1
                client.send(wire.PROTOCOL_VERSION)
                client.send(position)
                client.send(wire.SHM_MESSAGE, group.memory.fd)
                group.join(client, position)  # the others learn our eventfds
                for other_id in sorted(group.peers):
                    if other_id != position:
                        client.peer_joined(other_id, group.doorbell_fds(other_id))
                client.peer_joined(position, client.eventfds)  # ours come last, as contrib sends them
                self.clients[position] = client
        except BaseException:
            with group.lock:
                if group.peers.get(client.position) is client:
                    group.leave(client.position)
                self.clients.pop(client.position, None)
            client.close()
            raise
        return client

    async def _serve_client(self, sock: socket.socket) -> None:
        client = None
        try:
            # admit() takes the group lock: in a worker thread, not in trio.
            client = await trio.to_thread.run_sync(self.admit, sock, trio.lowlevel.current_trio_token())
        except OSError as exc:
            log.info("ivshmem-server %s: client failed: %s", self.group.name, exc)
        finally:
            if client is None:
                sock.close()
        if client is not None:
            await self._run_client(client)

    async def _run_client(self, client: ServerClient) -> None:
        """A client's life after admit() (or a hand-over): it ends on any readable event."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.flush_when_writable)
                # Any readable event (EOF, data, error) ends the client, as in contrib.
                await trio.lowlevel.wait_readable(client.sock)
                # While paused (a hand-over) a client that goes is left to whoever serves next.
                await self.group.wait_unpaused()
                nursery.cancel_scope.cancel()
        except OSError as exc:
            log.info("ivshmem-server %s: client failed: %s", self.group.name, exc)
        finally:
            with trio.CancelScope(shield=True):
                await run_locked(self.group.lock, self._forget, client)

    def _forget(self, client: ServerClient) -> None:
        """Under the group lock: the client leaves the group and is closed."""
        if self.group.peers.get(client.position) is client:
            self.group.leave(client.position)
        self.clients.pop(client.position, None)
        client.close()


async def serve_endpoints(group: PeerGroup, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve every endpoint of a group; started() once all listen."""
    async with trio.open_nursery() as nursery:
        for endpoint in group.endpoints:
            await nursery.start(endpoint.serve)
        task_status.started()
        await trio.sleep_forever()


def add_server(group: PeerGroup, path: Path, vectors: int) -> IvshmemServerEndpoint:
    """Give a group an ivshmem-server socket (before it is served)."""
    if not 1 <= vectors <= wire.MAX_VECTORS:
        raise ConfigError(f"ivshmem-server {path}: vectors={vectors}: 1..{wire.MAX_VECTORS}")
    for endpoint in group.endpoints:
        if Path(endpoint.path) == Path(path):
            return endpoint
    if group.endpoints and group.vectors != vectors:
        raise ConfigError(f"group {group.name}: its ivshmem-server hands out {group.vectors} vectors per peer, "
                          f"not {vectors}")
    if group._serving:
        raise ConfigError(f"group {group.name} is already served; give server= before qbackend starts")
    group.vectors = vectors
    endpoint = IvshmemServerEndpoint(group, path)
    group.endpoints.append(endpoint)
    return endpoint


# -- control socket commands -----------------------------------------------------------


def describe(group: PeerGroup) -> dict[str, Any]:
    with group.lock:
        return {
            "group": group.name,
            "size": group.memory.size,
            "shm": str(group.memory.path) if group.memory.path else None,
            "vectors": group.vectors,
            "servers": [str(e.path) for e in group.endpoints],
            "dropped_doorbells": group.dropped_doorbells,
            "peers": [{"id": pid, "kind": p.kind, "name": p.name, "vectors": p.vector_count,
                       "received": p.received()} for pid, p in sorted(group.peers.items())],
        }
