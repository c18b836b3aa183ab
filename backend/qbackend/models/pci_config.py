"""A PCI type-0 configuration space: registers, write masks, BAR sizing and
the capability lists.  Pure data: no I/O.

Register offsets and bit meanings are those of the PCI Local Bus
Specification 3.0 (chapter 6) and the MSI-X capability (section 6.8.2);
the power management capability is PCI Bus Power Management Interface
1.2's (chapter 3); the PCI Express capability, the extended capability
list at 0x100 and the Device Serial Number capability are the PCI Express
Base Specification's (7.5.3, 7.6.3 and 7.9.3 in its 4.0 numbering).

A device declares standard capabilities (`PowerManagement`, `PciExpress`,
`VendorSpecific`) and extended ones (`DeviceSerialNumber`); `ConfigSpace`
lays them out after MSI-X and MSI, links them, and gives each field the
write mask the specifications give it.  A config space with a PCI Express
capability is 4 KiB (`PCIE_CONFIG_SIZE`), else 256 bytes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import ClassVar

CONFIG_SIZE = 256
PCIE_CONFIG_SIZE = 4096
EXT_CAP_START = 0x100  # the first extended capability (PCIe 7.6.3)


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

CAP_ID_PM = 0x01
CAP_ID_VENDOR = 0x09
CAP_ID_EXP = 0x10
EXT_CAP_ID_DSN = 0x0003


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


# -- capabilities a device declares ---------------------------------------------------


class _Layout:
    """The bytes of one capability with their write masks, from its first byte
    (the header, which ConfigSpace fills in when it links the capability)."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)

    def put(self, offset: int, size: int, value: int, wmask: int = 0, w1c: int = 0) -> None:
        self.data[offset:offset + size] = value.to_bytes(size, "little")
        self.wmask[offset:offset + size] = wmask.to_bytes(size, "little")
        self.w1cmask[offset:offset + size] = w1c.to_bytes(size, "little")


class Capability:
    """A standard capability (in the list from 0x34): its id and its layout."""

    cap_id: ClassVar[int]

    def layout(self) -> _Layout:
        raise NotImplementedError


class ExtendedCapability:
    """A PCI Express extended capability (in the list from 0x100)."""

    cap_id: ClassVar[int]
    version: ClassVar[int]

    def layout(self) -> _Layout:
        raise NotImplementedError


# Power Management Control/Status (PM 1.2, 3.2.4).
PMCSR_STATE = 0x0003  # PowerState, D0..D3hot: read/write
PMCSR_NO_SOFT_RESET = 1 << 3
PMCSR_PME_ENABLE = 1 << 8
PMCSR_PME_STATUS = 1 << 15  # write-one-to-clear
PM_VERSION_1_2 = 3
PM_CAP_SIZE = 8


@dataclass(frozen=True)
class PowerManagement(Capability):
    """The PCI power management capability (id 0x01, version 1.2).

    D0 and D3hot are always supported; `d1`/`d2` add those states.  The
    PowerState field of PMCSR is writable; a write of a state the device
    does not support is dropped, as PM 1.2 (3.2.4) says.  `pme_support` is
    the 5-bit PME_Support field (D0, D1, D2, D3hot, D3cold); with any bit
    set, PME_En is writable and PME_Status is write-one-to-clear.
    `no_soft_reset`: the function keeps its state from D3hot to D0 (true
    here: qbackend resets a device only when QEMU says so).
    """

    cap_id: ClassVar[int] = CAP_ID_PM
    d1: bool = False
    d2: bool = False
    pme_support: int = 0
    no_soft_reset: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.pme_support <= 0x1F:
            raise ValueError(f"PME_Support {self.pme_support:#x} is wider than 5 bits")

    @property
    def states(self) -> frozenset[int]:
        """The power states PowerState may hold (0 = D0 .. 3 = D3hot)."""
        return frozenset({0, 3} | ({1} if self.d1 else set()) | ({2} if self.d2 else set()))

    def layout(self) -> _Layout:
        out = _Layout(PM_CAP_SIZE)
        pmc = PM_VERSION_1_2 | (self.d1 << 9) | (self.d2 << 10) | (self.pme_support << 11)
        out.put(2, 2, pmc)
        pme = bool(self.pme_support)
        out.put(4, 2, PMCSR_NO_SOFT_RESET if self.no_soft_reset else 0,
                wmask=PMCSR_STATE | (PMCSR_PME_ENABLE if pme else 0), w1c=PMCSR_PME_STATUS if pme else 0)
        return out


class PcieReg(IntEnum):
    """Registers of the PCI Express capability, from its start (PCIe 7.5.3)."""

    FLAGS = 0x02
    DEVCAP = 0x04
    DEVCTL = 0x08
    DEVSTA = 0x0A
    LNKCAP = 0x0C
    LNKCTL = 0x10
    LNKSTA = 0x12
    DEVCAP2 = 0x24
    DEVCTL2 = 0x28
    LNKCAP2 = 0x2C
    LNKCTL2 = 0x30


PCIE_CAP_VERSION = 2
PCIE_TYPE_ENDPOINT = 0x0
PCIE_CAP_SIZE = 0x3C  # version 2, up to Slot Status 2
DEVCAP_RBER = 1 << 15  # role-based error reporting (required since PCIe 1.1)
# Device Control: error reporting enables (3:0), relaxed ordering (4), max
# payload size (7:5), no snoop (11), max read request size (14:12) are
# read/write; extended tags, phantom functions, aux power and FLR are not
# offered, so their bits read zero.
DEVCTL_WMASK = 0x000F | 0x0010 | 0x00E0 | 0x0800 | 0x7000
DEVCTL_DEFAULT = 0x0010 | 0x0800 | (2 << 12)  # relaxed ordering, no snoop, 512-byte reads
DEVSTA_W1C = 0x000F  # correctable, non-fatal, fatal, unsupported request detected
LNKCAP_ASPM_COMPLIANCE = 1 << 22
LNKCTL_WMASK = 0x0003 | 0x0008 | 0x0040 | 0x0080  # ASPM control, RCB, common clock, extended synch
DEVCAP2_CTO_DISABLE = 1 << 4  # completion timeout disable supported
DEVCTL2_CTO_DISABLE = 1 << 4
LINK_WIDTHS = (1, 2, 4, 8, 12, 16, 32)


@dataclass(frozen=True)
class PciExpress(Capability):
    """A PCI Express capability (id 0x10, version 2) of an endpoint.

    `max_payload`: the largest TLP payload it takes (128..4096 bytes);
    `link_speed`: 1 = 2.5 GT/s, 2 = 5, 3 = 8, 4 = 16, 5 = 32 GT/s (the link
    capabilities say it, Link Capabilities 2 lists every speed up to it, the
    link status reports it trained); `link_width`: lanes (x1..x32).  Device
    Control, the Device Status error bits (write-one-to-clear), Link Control
    and Device Control 2's completion timeout disable are writable; the
    capabilities are read-only.  A function with this capability has a
    4 KiB config space.
    """

    cap_id: ClassVar[int] = CAP_ID_EXP
    max_payload: int = 128
    link_speed: int = 1
    link_width: int = 1

    def __post_init__(self) -> None:
        if self.max_payload not in (128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"max payload {self.max_payload} is not a power of two in 128..4096")
        if not 1 <= self.link_speed <= 5:
            raise ValueError(f"link speed {self.link_speed} is not 1 (2.5 GT/s) .. 5 (32 GT/s)")
        if self.link_width not in LINK_WIDTHS:
            raise ValueError(f"link width x{self.link_width} is none of {LINK_WIDTHS}")

    def layout(self) -> _Layout:
        out = _Layout(PCIE_CAP_SIZE)
        out.put(PcieReg.FLAGS, 2, PCIE_CAP_VERSION | PCIE_TYPE_ENDPOINT << 4)
        mps = (self.max_payload // 128).bit_length() - 1
        out.put(PcieReg.DEVCAP, 4, DEVCAP_RBER | mps)
        out.put(PcieReg.DEVCTL, 2, DEVCTL_DEFAULT, wmask=DEVCTL_WMASK)
        out.put(PcieReg.DEVSTA, 2, 0, w1c=DEVSTA_W1C)
        out.put(PcieReg.LNKCAP, 4, LNKCAP_ASPM_COMPLIANCE | self.link_width << 4 | self.link_speed)
        out.put(PcieReg.LNKCTL, 2, 0, wmask=LNKCTL_WMASK)
        out.put(PcieReg.LNKSTA, 2, self.link_width << 4 | self.link_speed)
        out.put(PcieReg.DEVCAP2, 4, DEVCAP2_CTO_DISABLE)
        out.put(PcieReg.DEVCTL2, 2, 0, wmask=DEVCTL2_CTO_DISABLE)
        out.put(PcieReg.LNKCAP2, 4, ((1 << self.link_speed) - 1) << 1)
        out.put(PcieReg.LNKCTL2, 2, self.link_speed)
        return out


@dataclass(frozen=True)
class VendorSpecific(Capability):
    """A vendor-specific capability (id 0x09): a length byte, then `data`
    (read-only; what it means is the vendor's business)."""

    cap_id: ClassVar[int] = CAP_ID_VENDOR
    data: bytes = b""

    def __post_init__(self) -> None:
        if len(self.data) > 0xFF - 3:
            raise ValueError(f"vendor-specific data of {len(self.data)} bytes: at most 252")

    def layout(self) -> _Layout:
        out = _Layout(3 + len(self.data))
        out.put(2, 1, 3 + len(self.data))
        out.data[3:] = self.data
        return out


@dataclass(frozen=True)
class DeviceSerialNumber(ExtendedCapability):
    """The Device Serial Number extended capability (id 0x0003, version 1):
    a read-only 64-bit number (an EUI-64, for a real device)."""

    cap_id: ClassVar[int] = EXT_CAP_ID_DSN
    version: ClassVar[int] = 1
    serial: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.serial < 1 << 64:
            raise ValueError(f"serial number {self.serial:#x} does not fit 64 bits")

    def layout(self) -> _Layout:
        out = _Layout(12)
        out.put(4, 8, self.serial)
        return out


class ConfigSpace:
    """Config space with per-byte write masks: 256 bytes, or 4 KiB for a
    function with a PCI Express capability (`size`).

    `wmask` bits are writable, `w1cmask` bits are cleared by writing one;
    everything else is read-only.  BAR registers are handled by the same
    masks: the size bits read back as zero, which is how sizing works.
    Capabilities go in the list in this order: MSI-X, MSI, then
    `capabilities` as given; `extended_capabilities` chain from 0x100 and
    need a `PciExpress` among `capabilities`.
    """

    def __init__(self, *, vendor_id: int, device_id: int, class_code: int, revision: int = 0,
                 subsystem_vendor_id: int = 0, subsystem_id: int = 0,
                 bars: tuple[Bar, ...] = (), interrupt_pin: int = 0,
                 msix: MsixLayout | None = None, msi: MsiLayout | None = None,
                 capabilities: Sequence[Capability] = (),
                 extended_capabilities: Sequence[ExtendedCapability] = ()) -> None:
        express = [cap for cap in capabilities if isinstance(cap, PciExpress)]
        self.size = PCIE_CONFIG_SIZE if express else CONFIG_SIZE
        if extended_capabilities and not express:
            raise ValueError("extended capabilities need a PCI Express capability (and its 4 KiB config space)")
        for kind in (PowerManagement, PciExpress, DeviceSerialNumber):
            if sum(isinstance(cap, kind) for cap in (*capabilities, *extended_capabilities)) > 1:
                raise ValueError(f"more than one {kind.__name__} capability")
        self.data = bytearray(self.size)
        self.wmask = bytearray(self.size)
        self.w1cmask = bytearray(self.size)
        self.bars = {bar.index: bar for bar in bars}
        self.msix = msix
        self.msix_cap = 0
        self.msi = msi
        self.msi_cap = 0
        self._last_cap = 0  # the capability whose next pointer a new one goes into
        self._free_cap = 0x40  # where the next capability goes
        self._last_ext_cap = 0
        self._free_ext_cap = EXT_CAP_START
        self.caps: dict[int, int] = {}  # capability id -> offset (the first of that id)
        self.ext_caps: dict[int, int] = {}
        self.pm: PowerManagement | None = None
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
        for cap in capabilities:
            self._add_declared(cap)
        for ext in extended_capabilities:
            self._add_extended(ext)
        self._power_on = bytes(self.data)  # what reset() puts back in the writable bits

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
        if cap + size > CONFIG_SIZE:
            raise ValueError(f"capability {cap_id:#04x} of {size} bytes does not fit below 0x100 (at {cap:#x})")
        self._free_cap = (cap + size + 3) & ~3
        self.caps.setdefault(cap_id, cap)
        if self._last_cap:
            self._put(self._last_cap + 1, 1, cap)
        else:
            self._put(Reg.STATUS, 2, self._get(Reg.STATUS, 2) | Status.CAP_LIST)
            self._put(Reg.CAPABILITY_LIST, 1, cap)
        self._put(cap, 1, cap_id)
        self._put(cap + 1, 1, 0)  # the end of the list, until another follows
        self._last_cap = cap
        return cap

    def _place(self, at: int, layout: _Layout, header: int) -> None:
        """Copy a capability's bytes and masks to `at`, its first `header` bytes excepted."""
        end = at + len(layout.data)
        self.data[at + header:end] = layout.data[header:]
        self.wmask[at + header:end] = layout.wmask[header:]
        self.w1cmask[at + header:end] = layout.w1cmask[header:]

    def _add_declared(self, cap: Capability) -> None:
        layout = cap.layout()
        at = self._new_cap(cap.cap_id, len(layout.data))
        self._place(at, layout, 2)
        if isinstance(cap, PowerManagement):
            self.pm = cap

    def _add_extended(self, ext: ExtendedCapability) -> None:
        layout = ext.layout()
        at = self._free_ext_cap
        if at + len(layout.data) > self.size:
            raise ValueError(f"extended capability {ext.cap_id:#06x} does not fit in {self.size:#x} bytes")
        self._free_ext_cap = (at + len(layout.data) + 3) & ~3
        if self._last_ext_cap:  # its next pointer: bits 31:20 of the header
            header = self._get(self._last_ext_cap, 4)
            self._put(self._last_ext_cap, 4, header | at << 20)
        self._put(at, 4, ext.cap_id | ext.version << 16)
        self._place(at, layout, 4)
        self.ext_caps.setdefault(ext.cap_id, at)
        self._last_ext_cap = at

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
        state = self.power_state
        for i, byte in enumerate(data):
            pos = offset + i
            if pos >= self.size:
                break
            w, c = self.wmask[pos], self.w1cmask[pos]
            old = self.data[pos]
            self.data[pos] = (old & ~w) | (byte & w)
            self.data[pos] &= ~(byte & c) & 0xFF
        if self.pm is not None and self.power_state not in self.pm.states:
            # PM 1.2 3.2.4: a write of an unsupported state completes, and changes nothing.
            pmcsr = self.caps[CAP_ID_PM] + 4
            self._put(pmcsr, 2, self._get(pmcsr, 2) & ~PMCSR_STATE | state)

    def reset(self) -> None:
        """Put the guest-writable state back to its power-on values, as a
        function-level reset would (BAR addresses, command and enables to
        zero; PCI Express Device Control to its defaults)."""
        for pos in range(self.size):
            bits = self.wmask[pos] | self.w1cmask[pos]
            if bits:
                self.data[pos] = (self.data[pos] & ~bits & 0xFF) | (self._power_on[pos] & bits)

    # -- fields the device model needs ------------------------------------------

    @property
    def power_state(self) -> int:
        """PMCSR's PowerState: 0 (D0) .. 3 (D3hot); 0 without a PM capability."""
        if self.pm is None:
            return 0
        return self._get(self.caps[CAP_ID_PM] + 4, 2) & PMCSR_STATE

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
