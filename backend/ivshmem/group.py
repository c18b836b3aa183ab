"""The ivshmem device: inter-VM shared memory with doorbells.

Identity and BAR layout are those of QEMU's ivshmem-pci today (1af4:1110,
BAR0 256 bytes of registers, BAR1 MSI-X, BAR2 the shared memory as a 64-bit
prefetchable BAR).  Unlike QEMU's ivshmem-plain/-doorbell, this device also
has an INTx pin: without MSI-X a doorbell sets IntrStatus to 1 and the line
is raised while IntrStatus & IntrMask is nonzero, as the original device
spec describes pin-based interrupts.
"""

from __future__ import annotations

import logging
import mmap
import os
import select
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import trio

from qbackend.models.pci_config import Bar, ConfigSpace, MsixLayout
from qbackend.protocol.ivshmem_server import MAX_PEER_ID
from qbackend.protocol.vfio_user import PciRegion
from qbackend.vfio.function import PciFunction, Region
from qbackend.vfio.irqs import InterruptController, signal_eventfd

if TYPE_CHECKING:
    from qbackend.ivshmem.server import IvshmemServerEndpoint

log = logging.getLogger(__name__)

VENDOR_ID = 0x1AF4
DEVICE_ID = 0x1110
CLASS_MEMORY_RAM = 0x050000  # PCI_CLASS_MEMORY_RAM, prog-if 0
REVISION = 1
REGISTER_BAR_SIZE = 256
MSIX_BAR_SIZE = 4096

INTR_MASK = 0
INTR_STATUS = 4
IV_POSITION = 8
DOORBELL = 12


@dataclass(frozen=True)
class Doorbell:
    peer: int
    vector: int


class IvshmemRegisters:
    """BAR0 of ivshmem: four 32-bit registers, pure state.

    As in QEMU, accesses are handled as whole dwords (a narrower access acts
    on the dword that holds it), IntrStatus clears when read, and the
    vector of a doorbell is its low 8 bits.
    """

    def __init__(self, position: int) -> None:
        self.position = position
        self.intr_mask = 0
        self.intr_status = 0

    def read(self, offset: int) -> int:
        reg = offset & 0xFC
        if reg == INTR_MASK:
            return self.intr_mask
        if reg == INTR_STATUS:
            value, self.intr_status = self.intr_status, 0
            return value
        if reg == IV_POSITION:
            return self.position
        return 0

    def write(self, offset: int, value: int) -> Doorbell | None:
        reg = offset & 0xFC
        value &= 0xFFFFFFFF
        if reg == INTR_MASK:
            self.intr_mask = value
        elif reg == INTR_STATUS:
            self.intr_status = value
        elif reg == DOORBELL:
            return Doorbell(peer=value >> 16, vector=value & 0xFF)
        return None

    @property
    def intx_asserted(self) -> bool:
        return bool(self.intr_status & self.intr_mask)

    def reset(self) -> None:
        self.intr_mask = 0
        self.intr_status = 0


def _dwords(offset: int, count: int) -> list[tuple[int, int, int]]:
    """Split an access into (dword offset, first byte, last byte+1) pieces."""
    pieces = []
    pos = offset
    end = offset + count
    while pos < end:
        base = pos & ~3
        stop = min(end, base + 4)
        pieces.append((base, pos - base, stop - base))
        pos = stop
    return pieces


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


def make_eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def clear_eventfd(fd: int) -> int:
    """Read (and so reset) an eventfd's counter; 0 if it was not signalled."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


class _Watch:
    """One watched eventfd: `fire` runs in the watcher thread when readable."""

    def __init__(self, fd: int, fire: Callable[[], None]) -> None:
        self.fd = fd
        self.fire = fire
        self.active = True


class DoorbellWatcher:
    """A thread that waits on eventfds (epoll) and runs their handlers: the
    eventfds that ivshmem-server clients write to ring a vfio-user device,
    and those of host peers that asked for a callback.

    Handlers take the group lock and check `_Watch.active` under it, and
    `unwatch` clears it under the same lock before the fd is closed, so a
    handler never reads an fd that has been closed (or reused).
    """

    def __init__(self, name: str) -> None:
        self._epoll = select.epoll()
        self._wake = make_eventfd()
        self._epoll.register(self._wake, select.EPOLLIN)
        self._watches: dict[int, _Watch] = {}
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"ivshmem-doorbells-{name}", daemon=True)
        self._thread.start()

    def watch(self, fd: int, fire: Callable[[], None]) -> _Watch:
        entry = _Watch(fd, fire)
        with self._lock:
            self._watches[fd] = entry
        self._epoll.register(fd, select.EPOLLIN)
        return entry

    def unwatch(self, entry: _Watch) -> None:
        """Stop watching (the caller holds the group lock and closes the fd after)."""
        entry.active = False
        with self._lock:
            if self._watches.get(entry.fd) is entry:
                del self._watches[entry.fd]
        try:
            self._epoll.unregister(entry.fd)
        except (OSError, ValueError):
            pass

    def _run(self) -> None:
        while not self._stopping:
            try:
                events = self._epoll.poll()
            except InterruptedError:
                continue
            for fd, _mask in events:
                if fd == self._wake:
                    clear_eventfd(fd)
                    continue
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

    One lock (an RLock) for the whole group, used as every member device's
    lock: a doorbell from one peer's connection thread touches another peer.
    """

    def __init__(self, memory: SharedMemory, name: str = "", vectors: int = 1) -> None:
        self.memory = memory
        self.name = name
        self.vectors = vectors  # per peer, for ivshmem-server clients
        self.peers: dict[int, Peer] = {}
        self.dropped_doorbells = 0
        self.lock = threading.RLock()
        self.endpoints: list[IvshmemServerEndpoint] = []  # ivshmem-server sockets
        self._device_fds: dict[int, tuple[list[int], list[_Watch]]] = {}
        self._listeners: list[GroupListener] = []
        self._watcher: DoorbellWatcher | None = None
        self._serving = False

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
                raise ValueError(f"ivshmem peer id {position} is outside 0..{MAX_PEER_ID}")
            if position in self.peers:
                raise ValueError(f"ivshmem peer id {position} is taken")
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

    def unsubscribe(self, listener: GroupListener) -> None:
        with self.lock:
            if listener in self._listeners:
                self._listeners.remove(listener)

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
            watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()
        self.memory.close()


CLIENT_KIND = "ivshmem-server client"


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
        self._watches: list[_Watch] = []
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


class IvshmemDevice(PciFunction):
    """ivshmem served over vfio-user, a member of a peer group.

    The device joins its group when it is made (so its IVPosition is known
    before QEMU connects, and `position` is honoured), leaves when its
    client (QEMU) goes away, and joins again when a client connects: with
    `position` if one was asked for, else its last id if still free, else
    the lowest free id.
    """

    name = "ivshmem"
    kind = "vfio-user"

    def __init__(self, group: PeerGroup, *, vectors: int = 1, position: int | None = None,
                 name: str = "") -> None:
        if not 0 <= vectors <= 64:
            raise ValueError(f"ivshmem vectors={vectors}: must be 0..64")
        self.group = group
        self.vectors = vectors
        if name:
            self.name = name
        self.wanted_position = position
        memory = group.memory
        config = ConfigSpace(
            vendor_id=VENDOR_ID, device_id=DEVICE_ID, class_code=CLASS_MEMORY_RAM, revision=REVISION,
            subsystem_vendor_id=VENDOR_ID, subsystem_id=DEVICE_ID,
            bars=(
                Bar(0, REGISTER_BAR_SIZE),
                *((Bar(1, MSIX_BAR_SIZE),) if vectors else ()),
                Bar(2, memory.size, is_64bit=True, prefetchable=True),
            ),
            interrupt_pin=1,
            # Without vectors the device has no MSI-X and no BAR1, like
            # QEMU's ivshmem-plain.
            msix=MsixLayout(vectors=vectors, bar=1) if vectors else None,
        )
        super().__init__(config, InterruptController(intx=True, msix_vectors=vectors))
        self.lock = group.lock
        self.position = -1
        self.registers = IvshmemRegisters(-1)
        group.join(self, position)
        self.registers.position = self.position
        self.doorbells_received = [0] * max(vectors, 1)
        self.regions[PciRegion.BAR0] = Region(REGISTER_BAR_SIZE, self._bar0_read, self._bar0_write)
        if vectors:
            self.regions[PciRegion.BAR1] = Region(MSIX_BAR_SIZE, self.msix_bar_read, self.msix_bar_write)
        self.regions[PciRegion.BAR2] = Region(memory.size, memory.read, memory.write, mmap_fd=memory.fd)

    def _bar0_read(self, offset: int, count: int) -> bytes:
        out = bytearray()
        for base, lo, hi in _dwords(offset, count):
            out += self.registers.read(base).to_bytes(4, "little")[lo:hi]
        self.update_intx()  # reading IntrStatus may have cleared it
        return bytes(out)

    def _bar0_write(self, offset: int, data: bytes) -> None:
        pos = 0
        for base, lo, hi in _dwords(offset, len(data)):
            chunk = data[pos:pos + hi - lo]
            pos += hi - lo
            value = int.from_bytes(chunk, "little") << (8 * lo)
            bell = self.registers.write(base, value)
            if bell is not None:
                self.group.ring(bell.peer, bell.vector)
        self.update_intx()

    def intx_asserted(self) -> bool:
        return self.registers.intx_asserted

    # -- as a group member ------------------------------------------------------------

    @property
    def member(self) -> bool:
        return self.group.peers.get(self.position) is self

    @property
    def vector_count(self) -> int:
        return max(self.vectors, 1)

    def doorbell_eventfds(self) -> list[int] | None:
        return None

    def peer_joined(self, peer: int, eventfds: list[int]) -> None:
        """A guest has no way to be told (ivshmem has no such register)."""

    def peer_left(self, peer: int) -> None:
        """As peer_joined."""

    def received(self) -> list[int]:
        return list(self.doorbells_received)

    def client_connected(self) -> None:
        with self.lock:
            if not self.member:
                preferred = self.wanted_position if self.wanted_position is not None else self.position
                self.group.join(self, self.group.allocate_id(preferred))
                self.registers.position = self.position

    def client_disconnected(self) -> None:
        with self.lock:
            if self.member:
                self.group.leave(self.position)

    def receive_doorbell(self, vector: int) -> bool:
        """A doorbell for this peer: MSI-X if enabled, else IntrStatus and INTx."""
        if not 0 <= vector < max(self.vectors, 1):  # INTx-only devices take vector 0
            return False
        self.doorbells_received[vector] += 1
        if self.config.msix_enabled:
            self.msix_notify(vector)
        else:
            self.registers.intr_status = 1
            self.update_intx()
        return True

    def reset(self) -> None:
        super().reset()
        self.registers.reset()
        self.update_intx()

    def close(self) -> None:
        with self.lock:
            if self.member:
                self.group.leave(self.position)
