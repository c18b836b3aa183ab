"""ivshmem's registers (BAR0), pure: IntrMask, IntrStatus, IVPosition, Doorbell.

Identity and BAR layout are those of QEMU's ivshmem-pci (1af4:1110, BAR0
256 bytes of registers, BAR1 MSI-X, BAR2 the shared memory); the device
binding is `qbackend.devices.ivshmem`.
"""

from __future__ import annotations

from dataclasses import dataclass

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


class _Word:
    """One 32-bit register of IvshmemRegisters.memory, as an int attribute."""

    def __init__(self, offset: int) -> None:
        self.index = offset // 4

    def __get__(self, registers: IvshmemRegisters, owner: type | None = None) -> int:
        return registers._words[self.index]

    def __set__(self, registers: IvshmemRegisters, value: int) -> None:
        registers._words[self.index] = value & 0xFFFFFFFF


class IvshmemRegisters:
    """BAR0 of ivshmem: four 32-bit registers, pure state.

    As in QEMU, accesses are handled as whole dwords (a narrower access acts
    on the dword that holds it), IntrStatus clears when read, and the
    vector of a doorbell is its low 8 bits.  The registers live in `memory`,
    BAR0's first 16 bytes as the guest reads them (Doorbell reads as 0), so
    that the plain ones can be served straight from it
    (qbackend.devices.ivshmem.plain_windows).
    """

    def __init__(self, position: int) -> None:
        self.memory = bytearray(16)
        # Host byte order: the native loop that serves from `memory` is built
        # for little-endian hosts only, as the wire is.
        self._words = memoryview(self.memory).cast("I")
        self.position = position

    intr_mask = _Word(INTR_MASK)
    intr_status = _Word(INTR_STATUS)

    @property
    def position(self) -> int:
        value = self._words[IV_POSITION // 4]
        return value - (1 << 32) if value & 0x80000000 else value  # -1 until the device has joined

    @position.setter
    def position(self, value: int) -> None:
        self._words[IV_POSITION // 4] = value & 0xFFFFFFFF

    def read(self, offset: int) -> int:
        reg = offset & 0xFC
        if reg == INTR_MASK:
            return self.intr_mask
        if reg == INTR_STATUS:
            value, self.intr_status = self.intr_status, 0
            return value
        if reg == IV_POSITION:
            return self._words[IV_POSITION // 4]
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


def dword_pieces(offset: int, count: int) -> list[tuple[int, int, int]]:
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

