"""The ivshmem device: inter-VM shared memory with doorbells.

Identity and BAR layout are those of QEMU's ivshmem-pci today (1af4:1110,
BAR0 256 bytes of registers, BAR1 MSI-X, BAR2 the shared memory as a 64-bit
prefetchable BAR).  Unlike QEMU's ivshmem-plain/-doorbell, this device also
has an INTx pin: without MSI-X a doorbell sets IntrStatus to 1 and the line
is raised while IntrStatus & IntrMask is nonzero, as the original device
spec describes pin-based interrupts.

It is a `PciFunction` itself rather than a public `qbackend.devices.Device`,
because the public API cannot say what it needs:

- its shape is per instance: `vectors` decides whether MSI-X and BAR1
  exist at all and how many vectors there are, where a Device declares
  them once for its class;
- BAR2 is its peer group's shared memory (the group's fd, mapped by every
  peer), where a mappable Device BAR gets a memfd of its own;
- its lock is the group's lock (a doorbell rung from another peer's
  thread is delivered under it), where a Device has a lock of its own;
- IntrMask, IVPosition and Doorbell are plain windows that the native
  access loop serves without Python (servers/vfio_user_fast.py), which the
  public API does not offer.
"""


from __future__ import annotations

import base64
import logging

from qbackend.ivshmem.group import PeerGroup
from qbackend.models.ivshmem import (
    CLASS_MEMORY_RAM,
    DEVICE_ID,
    DOORBELL,
    INTR_MASK,
    INTR_STATUS,
    IV_POSITION,
    MSIX_BAR_SIZE,
    REGISTER_BAR_SIZE,
    REVISION,
    VENDOR_ID,
    IvshmemRegisters,
    dword_pieces,
)
from qbackend.models.pci_config import Bar, ConfigSpace, MsixLayout
from qbackend.plumbing.handover import HandoverError, Loader, Saver, State
from qbackend.protocol.vfio_user import PciRegion
from qbackend.vfio.function import PciFunction, PlainWindow, Region
from qbackend.vfio.irqs import InterruptController

log = logging.getLogger(__name__)


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
        # Every trapped read is a guest vCPU waiting: the common aligned 4-byte
        # access goes straight to its register, and only a read that can change
        # the INTx line (reading IntrStatus clears it) recomputes it.
        if count == 4 and not offset & 3:
            value = self.registers.read(offset)
            if offset == INTR_STATUS and value:
                self.update_intx()
            return value.to_bytes(4, "little")
        out = bytearray()
        for base, lo, hi in dword_pieces(offset, count):
            out += self.registers.read(base).to_bytes(4, "little")[lo:hi]
        self.update_intx()  # reading IntrStatus may have cleared it
        return bytes(out)

    def _bar0_write(self, offset: int, data: bytes) -> None:
        if len(data) == 4 and not offset & 3:
            asserted = self.registers.intx_asserted
            bell = self.registers.write(offset, int.from_bytes(data, "little"))
            if bell is not None:
                self.group.ring(bell.peer, bell.vector)
            elif self.registers.intx_asserted != asserted:  # the line follows IntrMask & IntrStatus
                self.update_intx()
            return
        pos = 0
        for base, lo, hi in dword_pieces(offset, len(data)):
            chunk = data[pos:pos + hi - lo]
            pos += hi - lo
            value = int.from_bytes(chunk, "little") << (8 * lo)
            bell = self.registers.write(base, value)
            if bell is not None:
                self.group.ring(bell.peer, bell.vector)
        self.update_intx()

    def intx_asserted(self) -> bool:
        return self.registers.intx_asserted

    def plain_windows(self) -> list[PlainWindow]:
        registers = memoryview(self.registers.memory)
        return [
            *super().plain_windows(),
            # IntrMask: a write changes nothing else while IntrStatus is 0 (the line stays low).
            PlainWindow(PciRegion.BAR0, INTR_MASK, registers[INTR_MASK:INTR_MASK + 4], writable=True,
                        guard=registers[INTR_STATUS:INTR_STATUS + 4]),
            # IVPosition, and Doorbell, which reads as 0; writes to either are not plain.
            PlainWindow(PciRegion.BAR0, IV_POSITION, registers[IV_POSITION:DOORBELL + 4]),
        ]

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

    # -- hand-over to a new process (qbackend.app.upgrade) ------------------------------

    def handover_refusal(self) -> str | None:
        return self.group.handover_refusal()

    def save_state(self, saver: Saver) -> State:
        """Besides config space: the registers, the doorbell counts, and the group
        membership (by the group's name: the group hands itself over, PeerGroup.save)."""
        state = super().save_state(saver)
        state.update(group=self.group.name, position=self.position, member=self.member,
                     registers=base64.b64encode(self.registers.memory).decode(),
                     doorbells_received=list(self.doorbells_received))
        return state

    def restore_state(self, state: State, loader: Loader) -> None:
        """After the group adopted its state (PeerGroup.adopt): take the old process's
        place in it, at the same IVPosition."""
        super().restore_state(state, loader)
        group = self.group
        if state["group"] != group.name:
            raise HandoverError(f"{self.name}: handed over as a member of group {state['group']!r}, "
                                f"made in group {group.name!r}")
        registers = base64.b64decode(state["registers"])
        if len(registers) != len(self.registers.memory) or len(state["doorbells_received"]) != len(
                self.doorbells_received):
            raise HandoverError(f"{self.name}: the state handed over is of an ivshmem device of another shape")
        with group.lock:
            # Seats, not joins: the other peers (ivshmem-server clients among them)
            # knew this one at its position before the hand-over.
            if self.member:
                group.unseat(self.position)
            position = int(state["position"])
            if state["member"]:
                group.seat(self, position)
            else:
                self.position = position
            self.registers.memory[:] = registers  # in place: the native loop's windows point into it
            self.registers.position = self.position
            self.doorbells_received[:] = [int(n) for n in state["doorbells_received"]]
            memory = group.memory  # the group's memory now: the one the old process shared
            self.regions[PciRegion.BAR2] = Region(memory.size, memory.read, memory.write, mmap_fd=memory.fd)

    def close(self) -> None:
        with self.lock:
            if self.member:
                self.group.leave(self.position)
