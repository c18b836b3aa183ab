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
import threading
from dataclasses import dataclass, field
from pathlib import Path

from protocol.vfio_user import PciRegion

from .irqs import InterruptController
from .pci_config import Bar, ConfigSpace, MsixLayout
from .pci_device import PciFunction, Region

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


@dataclass
class PeerGroup:
    """Peers sharing one memory object; each has an id (IVPosition).

    Doorbells are routed by id.  A doorbell to an unknown peer or vector is
    dropped and counted, as QEMU does.
    """

    memory: SharedMemory
    peers: dict[int, "IvshmemDevice"] = field(default_factory=dict)
    dropped_doorbells: int = 0
    # One lock for the whole group, used as every member's device lock: a
    # doorbell from one peer's connection thread touches another peer.
    lock: threading.RLock = field(default_factory=threading.RLock)

    def allocate_id(self) -> int:
        peer_id = 0
        while peer_id in self.peers:
            peer_id += 1
        if peer_id > 0xFFFF:
            raise ValueError("an ivshmem group holds at most 65536 peers")
        return peer_id

    def join(self, device: "IvshmemDevice", position: int | None = None) -> int:
        if position is None:
            position = self.allocate_id()
        if position in self.peers:
            raise ValueError(f"ivshmem peer id {position} is taken")
        self.peers[position] = device
        return position

    def leave(self, position: int) -> None:
        self.peers.pop(position, None)

    def ring(self, peer: int, vector: int) -> bool:
        """Signal `vector` of `peer`; False (and counted) if there is no such one."""
        with self.lock:
            target = self.peers.get(peer)
            if target is None or not target.receive_doorbell(vector):
                self.dropped_doorbells += 1
                log.debug("ivshmem doorbell to peer %d vector %d dropped", peer, vector)
                return False
            return True


class IvshmemDevice(PciFunction):
    name = "ivshmem"

    def __init__(self, group: PeerGroup, *, vectors: int = 1, position: int | None = None) -> None:
        if not 0 <= vectors <= 64:
            raise ValueError(f"ivshmem vectors={vectors}: must be 0..64")
        self.group = group
        self.vectors = vectors
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
        self.position = group.join(self, position)
        self.registers = IvshmemRegisters(self.position)
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
        self.group.leave(self.position)
