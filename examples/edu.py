"""QEMU's `edu` teaching device, written on qbackend's device API.

The register map and the DMA engine follow QEMU's docs/specs/edu.rst and
the behaviour of hw/misc/edu.c (QEMU 11.1 has `-device edu` built in, the
differential peer of tests/test_edu_guest.py).  Serve it from a checkout:

    qbackend serve --device socket=/tmp/edu.sock,class=examples/edu.py:Edu[,dma_mask=0xfffffff]

PCI 1234:11e8, revision 0x10, class "other" (0x00ff), BAR0 1 MiB of
registers, INTx (pin A) and one MSI vector.  Below 0x80 only 4-byte
accesses act (others read all ones and are ignored); from 0x80 on, 4- and
8-byte ones.  Where QEMU's edu would copy outside its 4 KiB buffer or end
the whole process, this one refuses the transfer and says so in the log.
"""

from __future__ import annotations

import logging
from typing import Any

from qbackend.devices import Bar, Device
from qbackend.errors import QbackendError

log = logging.getLogger(__name__)

IDENTIFICATION = 0x010000ED  # version 1.0
STATUS_COMPUTING = 0x01
STATUS_IRQ_FACT = 0x80
FACT_IRQ = 0x001
DMA_IRQ = 0x100
DMA_RUN = 0x1
DMA_TO_RAM = 0x2  # direction bit: 0 from RAM into the buffer, 1 from the buffer to RAM
DMA_IRQ_ON_DONE = 0x4
DMA_BUFFER = 0x40000
DMA_BUFFER_SIZE = 4096
MASK32 = 0xFFFFFFFF


def factorial32(n: int) -> int:
    """n! in 32 bits, as edu's uint32 arithmetic has it (34! and up have 32 factors of two)."""
    result = 1
    for k in range(2, min(n, 34) + 1):
        result = result * k & MASK32
    return 0 if n >= 34 else result


class Edu(Device):
    vendor_id, device_id, revision = 0x1234, 0x11E8, 0x10
    class_code = 0x00FF00  # PCI_CLASS_OTHERS
    bars = (Bar(0, 1 << 20),)
    intx = True
    msi_vectors = 1

    def __init__(self, dma_mask: str = "0xfffffff") -> None:
        super().__init__()
        self.dma_mask = int(dma_mask, 0)
        self.liveness = 0
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = self.dma_dst = self.dma_count = self.dma_cmd = 0
        self.buffer = bytearray(DMA_BUFFER_SIZE)

    # -- registers --

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if (offset < 0x80 and size != 4) or (offset >= 0x80 and size not in (4, 8)):
            return (1 << 8 * size) - 1
        value = {0x00: IDENTIFICATION, 0x04: self.liveness, 0x08: self.fact, 0x20: self.status,
                 0x24: self.irq_status, 0x80: self.dma_src, 0x88: self.dma_dst, 0x90: self.dma_count,
                 0x98: self.dma_cmd}.get(offset)
        mask = (1 << 8 * size) - 1
        return mask if value is None else value & mask  # a 4-byte read of a 64-bit register: its low half

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if (offset < 0x80 and size != 4) or (offset >= 0x80 and size not in (4, 8)):
            return
        if offset == 0x04:
            self.liveness = ~value & MASK32
        elif offset == 0x08:
            if not self.status & STATUS_COMPUTING:
                self.fact = factorial32(value & MASK32)  # at once: the computing bit is never seen set
                if self.status & STATUS_IRQ_FACT:
                    self._raise(FACT_IRQ)
        elif offset == 0x20:
            self.status = self.status | STATUS_IRQ_FACT if value & STATUS_IRQ_FACT else self.status & ~STATUS_IRQ_FACT
        elif offset == 0x60:
            self._raise(value)
        elif offset == 0x64:
            self._lower(value)
        elif offset in (0x80, 0x88, 0x90) and not self.dma_cmd & DMA_RUN:
            setattr(self, {0x80: "dma_src", 0x88: "dma_dst", 0x90: "dma_count"}[offset], value)
        elif offset == 0x98 and value & DMA_RUN and not self.dma_cmd & DMA_RUN:
            self.dma_cmd = value
            self.defer(self._transfer)  # DMA messages cannot go out from inside this access

    # -- `qbackend upgrade` --

    def save_state(self) -> dict[str, Any]:
        """Registers, the DMA engine (its buffer as hex) and the raised interrupt bits."""
        return {"liveness": self.liveness, "fact": self.fact, "status": self.status,
                "irq_status": self.irq_status, "dma_src": self.dma_src, "dma_dst": self.dma_dst,
                "dma_count": self.dma_count, "dma_cmd": self.dma_cmd, "buffer": self.buffer.hex()}

    def restore_state(self, state: dict[str, Any]) -> None:
        for name in ("liveness", "fact", "status", "irq_status", "dma_src", "dma_dst", "dma_count", "dma_cmd"):
            setattr(self, name, int(state[name]))
        self.buffer[:] = bytes.fromhex(state["buffer"])
        # A transfer is never under way here: the hand-over waits for deferred jobs to
        # end.  Had one been saved running, start it again (the copy is the same).
        if self.dma_cmd & DMA_RUN:
            self.defer(self._transfer)

    # -- interrupts --

    def _raise(self, bits: int) -> None:
        self.irq_status |= bits & MASK32
        if self.irq_status:
            self.raise_irq(0)

    def _lower(self, bits: int) -> None:
        self.irq_status &= ~bits & MASK32
        if not self.irq_status and self.irq_mode != "msi":
            self.lower_irq()

    # -- the DMA engine --

    def _transfer(self) -> None:
        with self.lock:
            cmd, src, dst, count = self.dma_cmd, self.dma_src, self.dma_dst, self.dma_count
        to_ram = bool(cmd & DMA_TO_RAM)
        inside = src if to_ram else dst
        try:
            if not (DMA_BUFFER <= inside and inside + count <= DMA_BUFFER + DMA_BUFFER_SIZE):
                log.warning("edu: DMA of %#x bytes at buffer address %#x is outside 0x40000..0x41000: refused",
                            count, inside)
            elif to_ram:
                start = src - DMA_BUFFER
                with self.lock:
                    data = bytes(self.buffer[start:start + count])
                self.dma_write(dst & self.dma_mask, data)
            else:
                data = self.dma_read(src & self.dma_mask, count)
                start = dst - DMA_BUFFER
                with self.lock:
                    self.buffer[start:start + count] = data
        except QbackendError as exc:  # guest memory not there (bus mastering off, no such address)
            log.warning("edu: DMA failed: %s", exc)
        with self.lock:
            self.dma_cmd &= ~DMA_RUN
            if cmd & DMA_IRQ_ON_DONE:
                self._raise(DMA_IRQ)
