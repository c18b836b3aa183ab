"""The ACPI PCI-hotplug register block (spec 002, its ACPI PCI hotplug part;
QEMU's hw/acpi/pcihp.c today), as a pure register file.

Two profiles:

- `QEMU` (default): six dword registers, UP (0x00), DOWN (0x04), EJ (0x08,
  reads 0), RMV (0x0c), SEL (0x10, the bus select) and AIDX (0x14,
  acpi-index of a slot); only 4-byte accesses decode (others read 0 and
  write nothing); with bridge support UP clears when read; every write
  first clears the acpi-index; an eject acts on the lowest set bit only.
- `SPEC_2011`: the four registers of the 2011 text for bus 0 (UP, DOWN,
  EJ, RMV); one pending event at a time (a new one zeroes UP and DOWN);
  UP and DOWN stay set until the eject or the next event.

Buses are keyed by their bus-select number (bsel), as QEMU numbers its
hotpluggable buses: on pc, bsel 0 is the root bus; on q35 the root bus has
no ACPI hotplug and bsel 0 is the first root port's bus.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

BLOCK_SIZE = 0x18
UP, DOWN, EJ, RMV, SEL, AIDX = 0x00, 0x04, 0x08, 0x0C, 0x10, 0x14


class Profile(Enum):
    QEMU = "qemu"
    SPEC_2011 = "spec-2011"


@dataclass
class PciBus:
    up: int = 0
    down: int = 0
    removable: int = 0xFFFFFFFF  # RMV: hotplug_enable; cleared for slots that cannot be unplugged
    devices: dict[int, str] = field(default_factory=dict)  # slot -> QEMU device id
    acpi_index: dict[int, int] = field(default_factory=dict)  # slot -> acpi-index property


@dataclass(frozen=True)
class EjectSlot:
    bsel: int
    slot: int
    device_id: str | None


class PciHotplugBlock:
    def __init__(self, buses: int = 1, profile: Profile = Profile.QEMU, bridge_support: bool = True) -> None:
        self.profile = profile
        self.bridge_support = bridge_support and profile is Profile.QEMU
        self.buses = {bsel: PciBus() for bsel in range(buses)}
        self.select = 0
        self.acpi_index = 0

    # -- the platform side ----------------------------------------------------------

    def plug(self, bsel: int, slot: int, device_id: str, hotplugged: bool = True, acpi_index: int = 0) -> None:
        bus = self.buses[bsel]
        bus.devices[slot] = device_id
        bus.acpi_index[slot] = acpi_index
        if not hotplugged:
            return  # cold-plugged: no event
        if self.profile is Profile.SPEC_2011:
            bus.up = bus.down = 0  # one event at a time
        bus.up |= 1 << slot

    def request_unplug(self, bsel: int, slot: int) -> None:
        bus = self.buses[bsel]
        if self.profile is Profile.SPEC_2011:
            bus.up = bus.down = 0
        bus.down |= 1 << slot

    def unplugged(self, bsel: int, slot: int) -> None:
        bus = self.buses[bsel]
        bus.devices.pop(slot, None)
        bus.acpi_index.pop(slot, None)
        bus.up &= ~(1 << slot)
        bus.down &= ~(1 << slot)

    def set_removable(self, bsel: int, slot: int, removable: bool) -> None:
        bus = self.buses[bsel]
        bus.removable = bus.removable | (1 << slot) if removable else bus.removable & ~(1 << slot)

    def machine_reset(self) -> None:
        """The machine was reset.  QEMU carries out every pending removal then (its device
        goes, DEVICE_DELETED follows, and `unplugged` frees the slot here): the request is
        over.  What stays plugged is present at boot and found by enumeration, so its
        insert event is not pending any more either (in QEMU the guest's ACPI has read and
        so cleared it; here nothing may ever read it)."""
        for bus in self.buses.values():
            bus.up = bus.down = 0
        self.select = 0
        self.acpi_index = 0

    @property
    def event_pending(self) -> bool:
        return any(bus.up or bus.down for bus in self.buses.values())

    # -- hand-over to a new process (qbackend.app.upgrade) -------------------------------

    def save(self) -> dict[str, Any]:
        """Every bus's registers and devices, the bus select and acpi-index (JSON-able)."""
        return {"profile": self.profile.value, "bridge_support": self.bridge_support,
                "select": self.select, "acpi_index": self.acpi_index,
                "buses": [[bsel, {"up": bus.up, "down": bus.down, "removable": bus.removable,
                                  "devices": [[slot, dev] for slot, dev in sorted(bus.devices.items())],
                                  "acpi_index": [[slot, n] for slot, n in sorted(bus.acpi_index.items())]}]
                          for bsel, bus in sorted(self.buses.items())]}

    def restore(self, state: dict[str, Any]) -> None:
        """What `save` gave, into this block (made with the same buses and profile); in
        place, as the slot manager and the controller share it.  ValueError: another shape."""
        buses = {int(bsel): bus for bsel, bus in state["buses"]}
        if (state["profile"] != self.profile.value or bool(state["bridge_support"]) != self.bridge_support
                or buses.keys() != self.buses.keys()):
            raise ValueError(f"a PCI-hotplug block of buses {sorted(buses)} ({state['profile']}) handed over to "
                             f"one of buses {sorted(self.buses)} ({self.profile.value})")
        for bsel, saved in buses.items():
            bus = self.buses[bsel]
            bus.up, bus.down, bus.removable = int(saved["up"]), int(saved["down"]), int(saved["removable"])
            bus.devices = {int(slot): str(dev) for slot, dev in saved["devices"]}
            bus.acpi_index = {int(slot): int(n) for slot, n in saved["acpi_index"]}
        self.select, self.acpi_index = int(state["select"]), int(state["acpi_index"])

    def slot_of(self, device_id: str) -> tuple[int, int] | None:
        for bsel, bus in self.buses.items():
            for slot, dev in bus.devices.items():
                if dev == device_id:
                    return bsel, slot
        return None

    # -- guest accesses -------------------------------------------------------------------

    def _bus(self) -> PciBus | None:
        return self.buses.get(self.select if self.bridge_support else 0)

    def read(self, offset: int, size: int) -> int:
        if self.profile is Profile.SPEC_2011:
            return self._read_2011(offset, size)
        if size != 4 or offset % 4:
            return 0  # .valid min=max=4: narrower accesses do not reach the block
        if self.select >= 256:
            return 0
        bus = self._bus()
        if offset == UP:
            if bus is None:
                return 0
            value = bus.up
            if self.bridge_support:
                bus.up = 0  # consumed by the reader
            return value
        if offset == DOWN:
            return bus.down if bus else 0
        if offset == RMV:
            return bus.removable if bus else 0
        if offset == SEL:
            return self.select
        if offset == AIDX:
            value, self.acpi_index = self.acpi_index, 0
            return value
        return 0  # EJ and anything else

    def _read_2011(self, offset: int, size: int) -> int:
        bus = self.buses[0]
        regs = {UP: bus.up, DOWN: bus.down, EJ: 0, RMV: bus.removable}
        base = offset & ~3
        if base not in regs:
            return (1 << (8 * size)) - 1
        return (regs[base] >> (8 * (offset - base))) & ((1 << (8 * size)) - 1)

    def write(self, offset: int, size: int, value: int) -> list[EjectSlot]:
        if self.profile is Profile.SPEC_2011:
            return self._write_2011(offset, size, value)
        if size != 4 or offset % 4:
            return []
        value &= 0xFFFFFFFF
        self.acpi_index = 0  # every write clears it first
        if offset == SEL:
            self.select = value if self.bridge_support else 0
            return []
        if offset == AIDX:
            bus = self._bus()
            if bus is not None and value:
                slot = (value & -value).bit_length() - 1
                self.acpi_index = bus.acpi_index.get(slot, 0)
            return []
        if offset == EJ:
            return self._eject(self.select if self.bridge_support else 0, value)
        return []  # UP, DOWN and RMV are read-only today

    def _write_2011(self, offset: int, size: int, value: int) -> list[EjectSlot]:
        bus = self.buses[0]
        base = offset & ~3
        shift = 8 * (offset - base)
        value = (value & ((1 << (8 * size)) - 1)) << shift
        mask = ((1 << (8 * size)) - 1) << shift
        if base == UP:
            bus.up = (bus.up & ~mask) | value
        elif base == DOWN:
            bus.down = (bus.down & ~mask) | value
        elif base == EJ:
            return self._eject(0, value, clear=False)
        return []

    def _eject(self, bsel: int, value: int, clear: bool = True) -> list[EjectSlot]:
        bus = self.buses.get(bsel)
        if bus is None or not value:
            return []
        slot = (value & -value).bit_length() - 1  # the lowest set bit only
        if clear:
            bus.up &= ~(1 << slot)
            bus.down &= ~(1 << slot)
        if not bus.removable & (1 << slot):
            return []
        return [EjectSlot(bsel, slot, bus.devices.get(slot))]
