"""Interrupt delivery through the eventfds a vfio-user client hands over.

One `IrqIndex` per VFIO irq index (INTx, MSI, MSI-X, ERR, REQ).  Each vector
has an eventfd (or none), a mask bit and a pending bit.  A vector that fires
while masked or without an eventfd stays pending and fires when unmasked or
given an eventfd; for MSI-X the pending bits are the PBA that QEMU reads
from the server.  INTx is level-triggered and automasked: it fires on the
rising edge (or on unmask while the level is still high) and then stays
masked until the client unmasks it (QEMU does on EOI).
"""

from __future__ import annotations

import errno as E
import logging
import os
from dataclasses import dataclass, field

from qbackend.plumbing.handover import HandoverError, Loader, Saver, State
from qbackend.plumbing.unix import signal_eventfd
from qbackend.protocol.vfio_user import IrqInfoFlags, IrqSetFlags, PciIrq, RequestError, SetIrqs

log = logging.getLogger(__name__)

@dataclass
class Vector:
    eventfd: int | None = None
    masked: bool = False
    pending: bool = False


@dataclass
class IrqIndex:
    index: int
    count: int
    flags: IrqInfoFlags
    vectors: list[Vector] = field(default_factory=list)
    fired: int = 0  # eventfd writes, for tests and statistics

    def __post_init__(self) -> None:
        self.vectors = [Vector() for _ in range(self.count)]

    def _deliver(self, vector: Vector) -> None:
        assert vector.eventfd is not None
        signal_eventfd(vector.eventfd)
        self.fired += 1

    def trigger(self, n: int) -> bool:
        """Fire vector n now, or leave it pending; True if it fired."""
        vector = self.vectors[n]
        if vector.masked or vector.eventfd is None:
            vector.pending = True
            return False
        vector.pending = False
        self._deliver(vector)
        return True

    def _release(self, n: int) -> None:
        """Fire vector n if it is pending and may now be delivered."""
        vector = self.vectors[n]
        if vector.pending and not vector.masked and vector.eventfd is not None:
            vector.pending = False
            self._deliver(vector)

    def set_eventfd(self, n: int, fd: int | None) -> None:
        vector = self.vectors[n]
        if vector.eventfd is not None and vector.eventfd != fd:
            os.close(vector.eventfd)
        vector.eventfd = fd

    def close(self) -> None:
        for n in range(self.count):
            self.set_eventfd(n, None)
            self.vectors[n] = Vector()


class InterruptController:
    """The irq indexes of one PCI function, driven by SET_IRQS."""

    def __init__(self, *, intx: bool, msix_vectors: int, msi_vectors: int = 0) -> None:
        maskable = IrqInfoFlags.EVENTFD | IrqInfoFlags.MASKABLE
        self.indexes = [
            IrqIndex(PciIrq.INTX, 1 if intx else 0, maskable | IrqInfoFlags.AUTOMASKED),
            IrqIndex(PciIrq.MSI, msi_vectors, maskable | IrqInfoFlags.NORESIZE),
            IrqIndex(PciIrq.MSIX, msix_vectors, maskable | IrqInfoFlags.NORESIZE),
            IrqIndex(PciIrq.ERR, 1, IrqInfoFlags.EVENTFD),
            IrqIndex(PciIrq.REQ, 1, IrqInfoFlags.EVENTFD),
        ]
        self.intx_level = False

    @property
    def intx(self) -> IrqIndex:
        return self.indexes[PciIrq.INTX]

    @property
    def msi(self) -> IrqIndex:
        return self.indexes[PciIrq.MSI]

    @property
    def msi_active(self) -> bool:
        """The client has enabled MSI (it gave the MSI vectors eventfds)."""
        return any(v.eventfd is not None for v in self.msi.vectors)

    @property
    def msix(self) -> IrqIndex:
        return self.indexes[PciIrq.MSIX]

    def info(self, index: int) -> IrqIndex:
        if not 0 <= index < len(self.indexes):
            raise RequestError(f"irq index {index} is out of range (0..{len(self.indexes) - 1})")
        return self.indexes[index]

    def set_irqs(self, req: SetIrqs, fds: tuple[int, ...]) -> list[int]:
        """Apply one SET_IRQS; returns the fds it did not keep (to close).

        Raises RequestError before changing anything if the request is bad.
        """
        irq = self.info(req.index)
        if req.start + req.count > irq.count:
            raise RequestError(
                f"SET_IRQS vectors {req.start}..{req.start + req.count - 1} of index {req.index}, "
                f"which has {irq.count}")
        if irq.count == 0:
            raise RequestError(f"irq index {req.index} has no vectors", E.EINVAL)
        vectors = range(req.start, req.start + req.count)
        if req.data == IrqSetFlags.DATA_BOOL:
            selected = [n for n, b in zip(vectors, req.bools) if b]
        else:
            selected = list(vectors)

        if req.action == IrqSetFlags.ACTION_TRIGGER:
            if req.data == IrqSetFlags.DATA_EVENTFD:
                # fds replace the eventfds; no fds means de-assign (QEMU sends a
                # chunk of -1 entries that way).
                for i, n in enumerate(vectors):
                    irq.set_eventfd(n, fds[i] if fds else None)
                    if irq.index == PciIrq.INTX:
                        self._intx_fire_if_high()
                    else:
                        irq._release(n)
                return []
            if req.count == 0:
                # DATA_NONE with count 0: disable the whole index.
                for n in range(irq.count):
                    irq.set_eventfd(n, None)
                    irq.vectors[n] = Vector()
                return []
            for n in selected:
                self._fire(irq, n)
            return list(fds)

        if req.data == IrqSetFlags.DATA_EVENTFD:
            raise RequestError("SET_IRQS mask/unmask cannot carry eventfds")
        masked = req.action == IrqSetFlags.ACTION_MASK
        if masked and not irq.flags & IrqInfoFlags.MASKABLE:
            raise RequestError(f"irq index {req.index} is not maskable")
        for n in selected:
            irq.vectors[n].masked = masked
            if masked:
                continue
            if irq.index == PciIrq.INTX:
                self._intx_fire_if_high()
            else:
                irq._release(n)
        return list(fds)

    def _fire(self, irq: IrqIndex, n: int) -> None:
        if irq.index == PciIrq.INTX:
            self.intx.vectors[0].masked = False
            self.intx_level = True
            self._intx_fire_if_high()
        else:
            irq.trigger(n)

    def set_intx_level(self, level: bool) -> None:
        """Follow the device's INTx line (already gated by INTX_DISABLE)."""
        rising = level and not self.intx_level
        self.intx_level = level
        if self.intx.count == 0:
            return
        if not level:
            self.intx.vectors[0].pending = False
        elif rising:
            self._intx_fire_if_high()

    def _intx_fire_if_high(self) -> None:
        vector = self.intx.vectors[0]
        if self.intx_level and self.intx.trigger(0):
            vector.masked = True  # automasked until the client unmasks (EOI)

    def pending_bits(self, index: int) -> bytes:
        """The pending bits of an index, packed as a PBA is (bit n = vector n)."""
        irq = self.indexes[index]
        value = 0
        for n, vector in enumerate(irq.vectors):
            if vector.pending:
                value |= 1 << n
        return value.to_bytes(max(8, (irq.count + 63) // 64 * 8), "little")

    def reset(self) -> None:
        """Device reset: every vector unmasked and not pending; eventfds kept."""
        self.intx_level = False
        for irq in self.indexes:
            for vector in irq.vectors:
                vector.masked = False
                vector.pending = False

    def close(self) -> None:
        """Client gone: close every eventfd."""
        for irq in self.indexes:
            irq.close()
        self.intx_level = False

    def save_state(self, saver: Saver) -> State:
        """Every vector's eventfd (by index: they travel), mask and pending bit, for a hand-over."""
        return {"intx_level": self.intx_level,
                "indexes": [{"fired": irq.fired,
                             "vectors": [[saver.optional_fd(v.eventfd), v.masked, v.pending] for v in irq.vectors]}
                            for irq in self.indexes]}

    def restore_state(self, state: State, loader: Loader) -> None:
        """What save_state described, in a controller of the same shape (the new process)."""
        indexes = state["indexes"]
        if [len(i["vectors"]) for i in indexes] != [irq.count for irq in self.indexes]:
            raise HandoverError("the interrupts handed over do not have this device's vector counts")
        for irq, saved in zip(self.indexes, indexes):
            irq.fired = int(saved["fired"])
            for n, (fd, masked, pending) in enumerate(saved["vectors"]):
                irq.set_eventfd(n, loader.take_optional(fd))
                irq.vectors[n].masked = bool(masked)
                irq.vectors[n].pending = bool(pending)
        self.intx_level = bool(state["intx_level"])

    def open_fds(self) -> list[int]:
        return [v.eventfd for irq in self.indexes for v in irq.vectors if v.eventfd is not None]
