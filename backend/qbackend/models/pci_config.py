"""A PCI type-0 configuration space: registers, write masks, BAR sizing and
the capability list.  Pure data: no I/O.

Register offsets and bit meanings are those of the PCI Local Bus
Specification 3.0 (chapter 6) and the MSI-X capability (section 6.8.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, IntFlag

CONFIG_SIZE = 256


class Reg(IntEnum):
    VENDOR_ID = 0x00
    DEVICE_ID = 0x02
    COMMAND = 0x04
    STATUS = 0x06
    REVISION = 0x08
    CLASS_PROG = 0x09
    CACHE_LINE_SIZE = 0x0C
    LATENCY_TIMER = 0x0D
    HEADER_TYPE = 0x0E
    BAR0 = 0x10
    SUBSYSTEM_VENDOR_ID = 0x2C
    SUBSYSTEM_ID = 0x2E
    ROM_ADDRESS = 0x30
    CAPABILITY_LIST = 0x34
    INTERRUPT_LINE = 0x3C
    INTERRUPT_PIN = 0x3D


class Command(IntFlag):
    IO = 1 << 0
    MEMORY = 1 << 1
    MASTER = 1 << 2
    PARITY = 1 << 6
    SERR = 1 << 8
    INTX_DISABLE = 1 << 10


class Status(IntFlag):
    INTERRUPT = 1 << 3
    CAP_LIST = 1 << 4
    # Error bits, write-one-to-clear.
    MASTER_PARITY = 1 << 8
    SIG_TARGET_ABORT = 1 << 11
    REC_TARGET_ABORT = 1 << 12
    REC_MASTER_ABORT = 1 << 13
    SIG_SYSTEM_ERROR = 1 << 14
    DETECTED_PARITY = 1 << 15


STATUS_W1C = (Status.MASTER_PARITY | Status.SIG_TARGET_ABORT | Status.REC_TARGET_ABORT
              | Status.REC_MASTER_ABORT | Status.SIG_SYSTEM_ERROR | Status.DETECTED_PARITY)

BAR_IO = 0x1
BAR_MEM_64 = 0x4
BAR_PREFETCH = 0x8

CAP_ID_MSI = 0x05
MSI_ENABLE = 1 << 0
MSI_64BIT = 1 << 7
MSI_PER_VECTOR_MASK = 1 << 8
CAP_ID_MSIX = 0x11
MSIX_CAP_SIZE = 12
MSIX_ENABLE = 1 << 15
MSIX_FUNCTION_MASK = 1 << 14
MSIX_ENTRY_SIZE = 16


@dataclass(frozen=True)
class Bar:
    index: int
    size: int  # a power of two, at least 16 (memory) or 4 (I/O)
    io: bool = False
    is_64bit: bool = False
    prefetchable: bool = False

    def __post_init__(self) -> None:
        if self.size & (self.size - 1) or self.size < (4 if self.io else 16):
            raise ValueError(f"BAR{self.index} size {self.size:#x} is not a power of two >= 16")

    @property
    def type_bits(self) -> int:
        if self.io:
            return BAR_IO
        return (BAR_MEM_64 if self.is_64bit else 0) | (BAR_PREFETCH if self.prefetchable else 0)


@dataclass(frozen=True)
class MsixLayout:
    """Where the MSI-X table and PBA live: one BAR, table first."""

    vectors: int
    bar: int
    table_offset: int = 0
    pba_offset: int = 0x800

    def __post_init__(self) -> None:
        if not 1 <= self.vectors <= 2048:
            raise ValueError(f"MSI-X vector count {self.vectors} is outside 1..2048")
        if self.table_offset + self.vectors * MSIX_ENTRY_SIZE > self.pba_offset:
            raise ValueError("MSI-X table overlaps the PBA")


@dataclass(frozen=True)
class MsiLayout:
    """An MSI capability: 1, 2, 4, 8, 16 or 32 vectors, 64-bit addresses, optional per-vector masks."""

    vectors: int = 1
    is_64bit: bool = True
    per_vector_mask: bool = False

    def __post_init__(self) -> None:
        if self.vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError(f"MSI vector count {self.vectors} is not a power of two in 1..32")

    @property
    def size(self) -> int:
        return 10 + (4 if self.is_64bit else 0) + (10 if self.per_vector_mask else 0)


class ConfigSpace:
    """256 bytes of config space with per-byte write masks.

    `wmask` bits are writable, `w1cmask` bits are cleared by writing one;
    everything else is read-only.  BAR registers are handled by the same
    masks: the size bits read back as zero, which is how sizing works.
    """

    def __init__(self, *, vendor_id: int, device_id: int, class_code: int, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0,
                 bars: tuple[Bar, ...] = (), interrupt_pin: int = 0,
                 msix: MsixLayout | None = None, msi: MsiLayout | None = None) -> None:
        self.data = bytearray(CONFIG_SIZE)
        self.wmask = bytearray(CONFIG_SIZE)
        self.w1cmask = bytearray(CONFIG_SIZE)
        self.bars = {bar.index: bar for bar in bars}
        self.msix = msix
        self.msix_cap = 0
        self.msi = msi
        self.msi_cap = 0
        self._last_cap = 0  # the capability whose next pointer a new one goes into
        self._free_cap = 0x40  # where the next capability goes
        self._put(Reg.VENDOR_ID, 2, vendor_id)
        self._put(Reg.DEVICE_ID, 2, device_id)
        self._put(Reg.REVISION, 1, revision)
        self._put(Reg.CLASS_PROG, 3, class_code)
        self._put(Reg.SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self._put(Reg.SUBSYSTEM_ID, 2, subsystem_id)
        self._put(Reg.INTERRUPT_PIN, 1, interrupt_pin)
        command_mask = Command.MEMORY | Command.MASTER | Command.PARITY | Command.SERR
        if any(bar.io for bar in bars):
            command_mask |= Command.IO
        if interrupt_pin:
            command_mask |= Command.INTX_DISABLE
        self._mask(Reg.COMMAND, 2, command_mask)
        self._put(Reg.STATUS, 2, 0)
        self.w1cmask[Reg.STATUS:Reg.STATUS + 2] = int(STATUS_W1C).to_bytes(2, "little")
        self._mask(Reg.CACHE_LINE_SIZE, 1, 0xFF)
        self._mask(Reg.LATENCY_TIMER, 1, 0xFF)
        self._mask(Reg.INTERRUPT_LINE, 1, 0xFF)
        for bar in bars:
            self._add_bar(bar)
        if msix is not None:
            if msix.bar not in self.bars:
                raise ValueError(f"MSI-X BAR{msix.bar} is not declared")
            self._add_msix(msix)
        if msi is not None:
            self._add_msi(msi)

    def _put(self, offset: int, size: int, value: int) -> None:
        self.data[offset:offset + size] = value.to_bytes(size, "little")

    def _get(self, offset: int, size: int) -> int:
        return int.from_bytes(self.data[offset:offset + size], "little")

    def _mask(self, offset: int, size: int, mask: int) -> None:
        self.wmask[offset:offset + size] = int(mask).to_bytes(size, "little")

    def _add_bar(self, bar: Bar) -> None:
        offset = Reg.BAR0 + 4 * bar.index
        self._put(offset, 4, bar.type_bits)
        low_mask = (~(bar.size - 1)) & 0xFFFFFFFF & ~(0x3 if bar.io else 0xF)
        if bar.is_64bit:
            if bar.index >= 5 or bar.index + 1 in self.bars:
                raise ValueError(f"64-bit BAR{bar.index} has no room for its upper half")
            self._mask(offset, 4, low_mask)
            self._mask(offset + 4, 4, ((~(bar.size - 1)) >> 32) & 0xFFFFFFFF)
        else:
            self._mask(offset, 4, low_mask)

    def _new_cap(self, cap_id: int, size: int) -> int:
        """Append a capability to the list; its offset."""
        cap = self._free_cap
        self._free_cap = (cap + size + 3) & ~3
        if self._last_cap:
            self._put(self._last_cap + 1, 1, cap)
        else:
            self._put(Reg.STATUS, 2, self._get(Reg.STATUS, 2) | Status.CAP_LIST)
            self._put(Reg.CAPABILITY_LIST, 1, cap)
        self._put(cap, 1, cap_id)
        self._put(cap + 1, 1, 0)  # the end of the list, until another follows
        self._last_cap = cap
        return cap

    def _add_msi(self, msi: MsiLayout) -> None:
        cap = self._new_cap(CAP_ID_MSI, msi.size)
        log2 = msi.vectors.bit_length() - 1
        control = (log2 << 1) | (MSI_64BIT if msi.is_64bit else 0) | (MSI_PER_VECTOR_MASK if msi.per_vector_mask else 0)
        self._put(cap + 2, 2, control)
        self._mask(cap + 2, 2, MSI_ENABLE | (0x7 << 4))  # enable, multiple message enable
        self._mask(cap + 4, 4, 0xFFFFFFFC)  # message address (dword aligned)
        data = cap + 8
        if msi.is_64bit:
            self._mask(cap + 8, 4, 0xFFFFFFFF)
            data = cap + 12
        self._mask(data, 2, 0xFFFF)
        if msi.per_vector_mask:
            self._mask(data + 4, 4, (1 << msi.vectors) - 1)  # mask bits; the pending bits are read-only
        self.msi_cap = cap

    def _add_msix(self, msix: MsixLayout) -> None:
        cap = self._new_cap(CAP_ID_MSIX, MSIX_CAP_SIZE)
        self._put(cap + 2, 2, msix.vectors - 1)
        self._mask(cap + 2, 2, MSIX_ENABLE | MSIX_FUNCTION_MASK)
        self._put(cap + 4, 4, msix.table_offset | msix.bar)
        self._put(cap + 8, 4, msix.pba_offset | msix.bar)
        self.msix_cap = cap

    # -- access ----------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.data[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        """Apply a guest write byte by byte through the masks."""
        for i, byte in enumerate(data):
            pos = offset + i
            if pos >= CONFIG_SIZE:
                break
            w, c = self.wmask[pos], self.w1cmask[pos]
            old = self.data[pos]
            self.data[pos] = (old & ~w) | (byte & w)
            self.data[pos] &= ~(byte & c) & 0xFF

    def reset(self) -> None:
        """Clear the guest-writable state, as a function-level reset would."""
        for pos in range(CONFIG_SIZE):
            if self.wmask[pos] or self.w1cmask[pos]:
                self.data[pos] &= ~(self.wmask[pos] | self.w1cmask[pos]) & 0xFF

    # -- fields the device model needs ------------------------------------------

    @property
    def command(self) -> int:
        return self._get(Reg.COMMAND, 2)

    @property
    def intx_disabled(self) -> bool:
        return bool(self.command & Command.INTX_DISABLE)

    @property
    def bus_master(self) -> bool:
        return bool(self.command & Command.MASTER)

    def set_interrupt_status(self, asserted: bool) -> None:
        status = self._get(Reg.STATUS, 2)
        status = status | Status.INTERRUPT if asserted else status & ~int(Status.INTERRUPT)
        self._put(Reg.STATUS, 2, status)

    @property
    def msi_enabled(self) -> bool:
        """The MSI enable bit, as this copy of config space has it.  QEMU emulates
        the MSI capability itself, so a device learns of MSI from SET_IRQS."""
        return bool(self.msi_cap and self._get(self.msi_cap + 2, 2) & MSI_ENABLE)

    @property
    def msix_enabled(self) -> bool:
        return bool(self.msix_cap and self._get(self.msix_cap + 2, 2) & MSIX_ENABLE)

    @property
    def msix_function_masked(self) -> bool:
        return bool(self.msix_cap and self._get(self.msix_cap + 2, 2) & MSIX_FUNCTION_MASK)
