"""An ivshmem peer group: one shared memory, one id space, doorbells between peers.

Peers are vfio-user devices (`qbackend.devices.ivshmem`), host programs in
this process (`qbackend.ivshmem.local_peer.LocalPeer`) and clients of the
group's ivshmem-server socket (`qbackend.ivshmem.server`).  The group
watches every peer's doorbell eventfds in one `DoorbellWatcher` thread.
"""

from __future__ import annotations

import logging
import os
import select
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from qbackend.errors import ConfigError
from qbackend.plumbing.handover import HandoverError, Loader, Saver, State
from qbackend.plumbing.native_lock import device_lock
from qbackend.plumbing.unix import clear_eventfd, make_eventfd, signal_eventfd
from qbackend.protocol.ivshmem_server import MAX_PEER_ID

if TYPE_CHECKING:
    from qbackend.ivshmem.server import IvshmemServerEndpoint
    from qbackend.plumbing.shared_memory import SharedMemory

log = logging.getLogger(__name__)


class Peer(Protocol):
    """A member of a peer group: a vfio-user device, a host program in this
    process (`LocalPeer`), or a client of the group's ivshmem-server socket
    (a stock QEMU ivshmem-doorbell, or a host program elsewhere)."""

    kind: str
    name: str
    position: int

    @property
    def vector_count(self) -> int: ...

    def receive_doorbell(self, vector: int) -> bool:
        """Signal our vector; False if there is no such vector."""

    def doorbell_eventfds(self) -> list[int] | None:
        """Eventfds that ring us when written, if we are that kind of peer
        (the group then hands them to ivshmem-server clients as they are);
        None: the group makes eventfds for us and watches them."""

    def peer_joined(self, peer: int, eventfds: list[int]) -> None:
        """Another peer joined (eventfds: how ivshmem-server clients ring it)."""

    def peer_left(self, peer: int) -> None:
        """Another peer left."""

    def received(self) -> list[int]:
        """Doorbells received per vector."""


GroupListener = Callable[[str, int], None]
"""Called with ("join" | "leave", peer id) under the group lock."""


class Watch:
    """One watched eventfd: `fire` runs in the watcher thread when readable."""

    def __init__(self, fd: int, fire: Callable[[], None]) -> None:
        self.fd = fd
        self.fire = fire
        self.active = True


class DoorbellWatcher:
    """A thread that waits on eventfds (epoll) and runs their handlers: the
    eventfds that ivshmem-server clients write to ring a vfio-user device,
    and those of host peers that asked for a callback.

    Handlers take the group lock and check `Watch.active` under it, and
    `unwatch` clears it under the same lock before the fd is closed, so a
    handler never reads an fd that has been closed (or reused).
    """

    def __init__(self, name: str) -> None:
        self._epoll = select.epoll()
        self._wake = make_eventfd()
        self._epoll.register(self._wake, select.EPOLLIN)
        self._watches: dict[int, Watch] = {}
        self._lock = threading.Lock()
        self._stopping = False
        # hold(): the thread waits on `_released` instead of polling (an eventfd
        # written meanwhile keeps its count for whoever watches it next).
        self._held = False
        self._idle = threading.Event()
        self._released = threading.Event()
        self._released.set()
        self._thread = threading.Thread(target=self._run, name=f"ivshmem-doorbells-{name}", daemon=True)
        self._thread.start()

    def watch(self, fd: int, fire: Callable[[], None]) -> Watch:
        entry = Watch(fd, fire)
        with self._lock:
            self._watches[fd] = entry
        self._epoll.register(fd, select.EPOLLIN)
        return entry

    def unwatch(self, entry: Watch) -> None:
        """Stop watching (the caller holds the group lock and closes the fd after)."""
        entry.active = False
        with self._lock:
            if self._watches.get(entry.fd) is entry:
                del self._watches[entry.fd]
        try:
            self._epoll.unregister(entry.fd)
        except (OSError, ValueError):
            pass

    def hold(self, timeout: float) -> bool:
        """Stop handling doorbells (a hand-over); True once the thread has stopped."""
        self._idle.clear()
        self._released.clear()
        self._held = True
        signal_eventfd(self._wake)
        return self._idle.wait(timeout)

    def release(self) -> None:
        self._held = False
        self._released.set()

    def _run(self) -> None:
        while not self._stopping:
            if self._held:
                self._idle.set()
                self._released.wait()
                continue
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            for fd, _mask in events:
                if fd == self._wake:
                    clear_eventfd(fd)
                    continue
                if self._held:
                    break  # the rest stay readable for later
                with self._lock:
                    entry = self._watches.get(fd)
                if entry is not None:
                    try:
                        entry.fire()
                    except Exception:
                        log.exception("ivshmem doorbell handler failed")

    def fds(self) -> list[int]:
        return [self._epoll.fileno(), self._wake]

    def stop(self) -> None:
        self._stopping = True
        self._released.set()
        signal_eventfd(self._wake)
        if self._thread is not threading.current_thread():
            self._thread.join(5)
        self._epoll.close()
        os.close(self._wake)


class PeerGroup:
    """Peers sharing one memory object; each has an id (its IVPosition).

    Doorbells are routed by id: `ring(peer, vector)`.  A doorbell to an
    unknown peer or vector is dropped, counted and logged at debug level,
    as QEMU does.  Joins and leaves are announced to every other member
    (`Peer.peer_joined` / `peer_left`; ivshmem-server clients get the
    protocol's messages) and to listeners (`subscribe`).

    Peers of the ivshmem-server protocol ring each other by writing
    eventfds, `vectors` per peer (`doorbell_fds`): their own for eventfd
    peers; for vfio-user devices, eventfds the group makes on first need
    and watches in a thread of its own.

    One lock (a recursive device lock, qbackend.plumbing.native_lock) for the
    whole group, used as every member device's lock: a doorbell from one
    peer's connection thread touches another peer.
    """

    def __init__(self, memory: SharedMemory, name: str = "", vectors: int = 1) -> None:
        self.memory = memory
        self.name = name
        self.vectors = vectors  # per peer, for ivshmem-server clients
        self.peers: dict[int, Peer] = {}
        self.dropped_doorbells = 0
        self.lock = device_lock()
        self.endpoints: list[IvshmemServerEndpoint] = []  # ivshmem-server sockets
        self._device_fds: dict[int, tuple[list[int], list[Watch]]] = {}
        self._listeners: list[GroupListener] = []
        self._watcher: DoorbellWatcher | None = None
        self._serving = False
        # A hand-over (pause / save / adopt): paused, nothing of the group's acts.
        self.paused = False
        self.saved = False  # save() ran and no resume() since
        self._unpaused = trio.Event()
        self._unpaused.set()
        # Eventfds the old process made for its devices (ivshmem-server clients hold
        # them), until each device takes its seat again (seat()).
        self._adopted_device_fds: dict[int, list[int]] = {}

    # -- membership ---------------------------------------------------------------

    def allocate_id(self, preferred: int | None = None) -> int:
        """`preferred` if free, else the lowest free id."""
        with self.lock:
            if preferred is not None and preferred not in self.peers:
                return preferred
            peer_id = 0
            while peer_id in self.peers:
                peer_id += 1
            if peer_id > MAX_PEER_ID:
                raise ValueError("an ivshmem group holds at most 65536 peers")
            return peer_id

    def join(self, peer: Peer, position: int | None = None) -> int:
        """Add `peer` (at `position`, or the lowest free id); announce it."""
        with self.lock:
            if position is None:
                position = self.allocate_id()
            if not 0 <= position <= MAX_PEER_ID:
                raise ConfigError(f"ivshmem group {self.name}: peer id {position} is outside 0..{MAX_PEER_ID}")
            if position in self.peers:
                raise ConfigError(f"ivshmem group {self.name}: peer id {position} is taken; give another peer= "
                                  "or none (the lowest free id)")
            peer.position = position
            self.peers[position] = peer
            log.info("ivshmem group %s: peer %d (%s %s) joined", self.name, position, peer.kind, peer.name)
            fds = self.doorbell_fds(position) if self._needs_fds() else []
            for other_id, other in list(self.peers.items()):
                if other_id != position:
                    other.peer_joined(position, fds)
            for listener in list(self._listeners):
                listener("join", position)
            return position

    def leave(self, position: int) -> None:
        """Remove a peer and announce it; its group-made eventfds are closed."""
        with self.lock:
            if self.saved:
                # Saved for a hand-over: the peers are the new process's to speak to; this
                # one only lets go of its copies.
                self.unseat(position)
                return
            peer = self.peers.pop(position, None)
            if peer is None:
                return
            self._release_fds(position)
            log.info("ivshmem group %s: peer %d (%s %s) left", self.name, position, peer.kind, peer.name)
            for other in list(self.peers.values()):
                other.peer_left(position)
            for listener in list(self._listeners):
                listener("leave", position)
            if not self._needs_fds():
                # Nobody rings by eventfd any more: the devices' go too.
                for other_id in list(self._device_fds):
                    self._release_fds(other_id)

    def seat(self, peer: Peer, position: int) -> None:
        """Put `peer` at `position` without announcing it: a device taking back the place
        it had in the process before a hand-over (the others know it there already)."""
        with self.lock:
            if self.peers.get(position) not in (None, peer):
                self.unseat(position)  # made here before its own restore; it takes its own seat then
            peer.position = position
            self.peers[position] = peer
            fds = self._adopted_device_fds.pop(position, None)
            if fds is not None:
                watcher = self.watcher()
                watches = [watcher.watch(fd, self._device_doorbell(position, peer, vector, fd))
                           for vector, fd in enumerate(fds)]
                self._device_fds[position] = (fds, watches)

    def unseat(self, position: int) -> None:
        """Take a peer out without announcing it (see seat)."""
        with self.lock:
            self.peers.pop(position, None)
            self._release_fds(position)

    def _release_fds(self, position: int) -> None:
        made = self._device_fds.pop(position, None)
        if made is not None:
            fds, watches = made
            for entry in watches:
                assert self._watcher is not None
                self._watcher.unwatch(entry)
            for fd in fds:
                os.close(fd)

    def subscribe(self, listener: GroupListener) -> None:
        with self.lock:
            self._listeners.append(listener)


    # -- doorbells ----------------------------------------------------------------

    def ring(self, peer: int, vector: int) -> bool:
        """Signal `vector` of `peer`; False (and counted) if there is no such one."""
        with self.lock:
            target = self.peers.get(peer)
            if target is None or not target.receive_doorbell(vector):
                self.dropped_doorbells += 1
                log.debug("ivshmem group %s: doorbell to peer %d vector %d dropped", self.name, peer, vector)
                return False
            return True

    def doorbell_fds(self, position: int) -> list[int]:
        """The eventfds (at most `vectors`) that ring `position` when written."""
        with self.lock:
            peer = self.peers[position]
            own = peer.doorbell_eventfds()
            if own is not None:
                return own[:self.vectors]
            made = self._device_fds.get(position)
            if made is None:
                fds = [make_eventfd() for _ in range(self.vectors)]
                watcher = self.watcher()
                watches = [watcher.watch(fd, self._device_doorbell(position, peer, vector, fd))
                           for vector, fd in enumerate(fds)]
                made = self._device_fds[position] = (fds, watches)
            return list(made[0])

    def _device_doorbell(self, position: int, peer: Peer, vector: int, fd: int) -> Callable[[], None]:
        def fire() -> None:
            with self.lock:
                if self.peers.get(position) is not peer or self._device_fds.get(position) is None:
                    return
                if clear_eventfd(fd):
                    self.ring(position, vector)
        return fire

    def _needs_fds(self) -> bool:
        """Whether anyone rings by eventfd (an ivshmem-server client is a member)."""
        return any(p.kind == CLIENT_KIND for p in self.peers.values())

    def watcher(self) -> DoorbellWatcher:
        with self.lock:
            if self._watcher is None:
                self._watcher = DoorbellWatcher(self.name or "group")
            return self._watcher

    # -- hand-over to a new process (qbackend.app.upgrade) ---------------------------
    #
    # A group is shared by its devices, so it hands over once (the Backend calls
    # save / adopt per group; adopt before its devices' servers adopt theirs).  What
    # travels: the memory's fd (the guests have it mapped) and the counters; each
    # device keeps its own IVPosition in its own state (IvshmemDevice.save_state).

    def handover_refusal(self) -> str | None:
        """Why this group cannot be handed over (one line), or None."""
        with self.lock:
            for peer in self.peers.values():
                if peer.kind not in ("vfio-user", CLIENT_KIND):
                    return (f"ivshmem group {self.name}: peer {peer.position} ({peer.kind} {peer.name}) lives in "
                            "this process and cannot be handed over")
        return None

    async def wait_unpaused(self) -> None:
        await self._unpaused.wait()

    async def pause(self) -> None:
        """Accept no ivshmem-server client, let clients that come or go wait, and hold the
        doorbells that ivshmem-server clients ring (they stay in their eventfds)."""
        if not self.paused:
            self.paused = True
            self._unpaused = trio.Event()
        for endpoint in self.endpoints:
            endpoint.gate.close()
        watcher = self._watcher
        if watcher is not None and not await trio.to_thread.run_sync(watcher.hold, 5.0):
            raise HandoverError(f"ivshmem group {self.name}: its doorbell thread did not stop")

    async def resume(self) -> None:
        self.saved = False
        if self._watcher is not None:
            self._watcher.release()
        self.paused = False
        self._unpaused.set()
        for endpoint in self.endpoints:
            endpoint.gate.open()

    def save(self, saver: Saver) -> State:
        """The group, paused with its devices: its memory, its ivshmem-server sockets and
        their clients (sockets, eventfds, what waits to be sent to them), and the eventfds
        it made for its devices (the clients ring them)."""
        refusal = self.handover_refusal()
        if refusal is not None:
            raise HandoverError(refusal)
        with self.lock:
            self.saved = True
            return {"name": self.name, "size": self.memory.size, "memory": saver.fd(self.memory.fd),
                    "shm": str(self.memory.path) if self.memory.path is not None else None,
                    "vectors": self.vectors, "dropped_doorbells": self.dropped_doorbells,
                    "endpoints": [endpoint.save(saver) for endpoint in self.endpoints],
                    "device_fds": [[position, [saver.fd(fd) for fd in fds]]
                                   for position, (fds, _watches) in self._device_fds.items()]}

    def adopt(self, state: State, loader: Loader) -> None:
        """In the new process, on the group made from the same options, before its devices
        adopt: share the memory the old process shared (the one made here is let go), take
        its ivshmem-server sockets and clients; each device takes its seat back when it
        adopts (IvshmemDevice.restore_state, `seat`), with no join or leave announced."""
        from qbackend.plumbing.shared_memory import SharedMemory

        if state["name"] != self.name or int(state["size"]) != self.memory.size:
            raise HandoverError(f"ivshmem group {self.name}: handed over as group {state['name']!r} of "
                                f"{state['size']} bytes; made here with {self.memory.size}")
        saved_paths = sorted(str(e["path"]) for e in state["endpoints"])
        if saved_paths != sorted(str(e.path) for e in self.endpoints):
            raise HandoverError(f"ivshmem group {self.name}: handed over with ivshmem-server sockets "
                                f"{saved_paths}, made here with others")
        path = Path(state["shm"]) if state["shm"] is not None else None
        adopted = SharedMemory.adopt(loader.take(state["memory"]), self.memory.size, path)
        with self.lock:
            old, self.memory = self.memory, adopted
            self.vectors = int(state["vectors"])
            self.dropped_doorbells = int(state["dropped_doorbells"])
            # The devices made here sit where they were made; they take their old seats
            # back as they adopt.
            for position in list(self.peers):
                self.unseat(position)
            for position, fds in state["device_fds"]:
                self._adopted_device_fds[int(position)] = [loader.take(i) for i in fds]
            by_path = {str(e.path): e for e in self.endpoints}
            for saved in state["endpoints"]:
                by_path[str(saved["path"])].adopt(saved, loader)
        old.close()

    # -- endpoints and lifetime ----------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve the group's ivshmem-server sockets (if any) until cancelled."""
        from qbackend.ivshmem.server import serve_endpoints

        self._serving = True
        await serve_endpoints(self, task_status=task_status)

    def open_fds(self) -> list[int]:
        """Eventfds the group made for its devices (for leak checks)."""
        with self.lock:
            return [fd for fds, _ in self._device_fds.values() for fd in fds]

    def service_fds(self) -> list[int]:
        """The watcher thread's own fds (epoll, wake-up), once it exists."""
        with self.lock:
            return self._watcher.fds() if self._watcher is not None else []

    def close(self) -> None:
        """Every peer leaves; the watcher stops; the memory is unmapped."""
        with self.lock:
            for position in list(self.peers):
                self.leave(position)
            for fds in self._adopted_device_fds.values():
                for fd in fds:
                    os.close(fd)
            self._adopted_device_fds.clear()
            watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()
        self.memory.close()


CLIENT_KIND = "ivshmem-server client"

