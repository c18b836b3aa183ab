"""The ACPI memory-hotplug register block (spec 000: QEMU's
docs/specs/acpi_mem_hotplug), as a pure register file.

Two profiles:

- `QEMU` (default), today's QEMU (hw/acpi/memory_hotplug.c): an
  out-of-range selector reads 0; only the documented offsets decode, any
  other offset reads all ones (masked to the access size); a write to the
  control byte does one action (clear insert, else clear remove, else
  eject); writing the OST status reports the OST event; eject is ignored for
  a disabled slot.
- `SPEC_2_4`, the 2.4 text: an out-of-range selector reads all ones; every
  byte of a documented register reads as that byte of it; a control write
  applies every bit it sets.

`read(offset, size)` returns the value; `write(offset, size, value)`
returns the effects for the backend to carry out (report an OST, eject a
DIMM).  `event_pending` is the level of the interrupt (GPE.3 for QEMU's
own block).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

BLOCK_SIZE = 0x18  # 24 bytes at 0xa00

ADDR_LO, ADDR_HI, SIZE_LO, SIZE_HI, PROXIMITY, STATUS = 0x0, 0x4, 0x8, 0xC, 0x10, 0x14
SELECTOR, OST_EVENT, OST_STATUS, CONTROL = 0x0, 0x4, 0x8, 0x14

STATUS_ENABLED = 1 << 0
STATUS_INSERTING = 1 << 1
STATUS_REMOVING = 1 << 2
CONTROL_CLEAR_INSERT = 1 << 1
CONTROL_CLEAR_REMOVE = 1 << 2
CONTROL_EJECT = 1 << 3

# ACPI _OST codes that matter here (ACPI 6.x, 6.3.5).
OST_EVENT_INSERT = 0x1
OST_EVENT_EJECT = 0x3
OST_SUCCESS = 0x0
OST_BUSY = 0x82
OST_EJECT_IN_PROGRESS = 0x84


class Profile(Enum):
    QEMU = "qemu"
    SPEC_2_4 = "spec-2.4"


@dataclass
class MemorySlot:
    address: int = 0
    size: int = 0
    node: int = 0
    enabled: bool = False
    inserting: bool = False
    removing: bool = False
    device_id: str | None = None  # the QEMU device id of the DIMM in the slot

    @property
    def status(self) -> int:
        return ((STATUS_ENABLED if self.enabled else 0) | (STATUS_INSERTING if self.inserting else 0)
                | (STATUS_REMOVING if self.removing else 0))


@dataclass(frozen=True)
class OstReported:
    slot: int
    device_id: str | None
    event: int
    status: int


@dataclass(frozen=True)
class EjectRequested:
    slot: int
    device_id: str | None


@dataclass(frozen=True)
class EjectRefused:
    """Fault injection refused an eject the guest asked for."""

    slot: int


Effect = OstReported | EjectRequested | EjectRefused


@dataclass
class Faults:
    """Fault injection for guest-driver testing."""

    refuse_eject: set[int] = field(default_factory=set)
    ost_status: dict[int, int] = field(default_factory=dict)  # slot -> status reported instead
    hold_remove: set[int] = field(default_factory=set)  # clearing the remove event is ignored


class MemoryHotplugBlock:
    def __init__(self, slots: int, profile: Profile = Profile.QEMU) -> None:
        self.profile = profile
        self.slots = [MemorySlot() for _ in range(slots)]
        self.selector = 0
        self.ost_event = 0
        self.ost_status = 0
        self.faults = Faults()

    # -- the platform side (what QEMU's plug callbacks do) -----------------------

    def plug(self, slot: int, address: int, size: int, node: int, device_id: str | None,
             hotplugged: bool = True) -> None:
        s = self.slots[slot]
        s.address, s.size, s.node, s.device_id = address, size, node, device_id
        s.enabled = True
        # Cold-plugged DIMMs raise no insert event (QEMU since 2.5).
        s.inserting = hotplugged
        s.removing = False

    def request_unplug(self, slot: int) -> None:
        self.slots[slot].removing = True

    def unplugged(self, slot: int) -> None:
        """The DIMM is gone (DEVICE_DELETED): the slot is empty again."""
        self.slots[slot] = MemorySlot()

    def spurious_insert(self, slot: int) -> None:
        """Fault injection: an insert event for a slot nothing was plugged into."""
        self.slots[slot].inserting = True

    def machine_reset(self) -> None:
        """The machine was reset: the DIMMs in the slots stay, and count as present at boot
        (cold-plugged DIMMs raise no insert event), so pending insert events are dropped.  A
        pending removal stays requested, as QEMU keeps it across a reset."""
        for s in self.slots:
            s.inserting = False
        self.selector = 0
        self.ost_event = self.ost_status = 0

    @property
    def event_pending(self) -> bool:
        return any(s.inserting or s.removing for s in self.slots)

    # -- hand-over to a new process (qbackend.app.upgrade) -------------------------------

    def save(self) -> dict[str, Any]:
        """Every register and slot, and the faults set (JSON-able), for `restore`."""
        f = self.faults
        return {"profile": self.profile.value, "slots": [asdict(s) for s in self.slots],
                "selector": self.selector, "ost_event": self.ost_event, "ost_status": self.ost_status,
                "faults": {"refuse_eject": sorted(f.refuse_eject), "hold_remove": sorted(f.hold_remove),
                           "ost_status": [[slot, status] for slot, status in sorted(f.ost_status.items())]}}

    def restore(self, state: dict[str, Any]) -> None:
        """What `save` gave, into this block (made with the same slots and profile); in
        place, as the slot manager and the controller share it.  ValueError: another shape."""
        if state["profile"] != self.profile.value or len(state["slots"]) != len(self.slots):
            raise ValueError(f"a memory-hotplug block of {len(state['slots'])} slots ({state['profile']}) "
                             f"handed over to one of {len(self.slots)} ({self.profile.value})")
        self.slots[:] = [MemorySlot(int(s["address"]), int(s["size"]), int(s["node"]), bool(s["enabled"]),
                                    bool(s["inserting"]), bool(s["removing"]),
                                    None if s["device_id"] is None else str(s["device_id"]))
                         for s in state["slots"]]
        self.selector, self.ost_event, self.ost_status = (int(state["selector"]), int(state["ost_event"]),
                                                          int(state["ost_status"]))
        faults = state["faults"]
        self.faults = Faults({int(n) for n in faults["refuse_eject"]},
                             {int(slot): int(status) for slot, status in faults["ost_status"]},
                             {int(n) for n in faults["hold_remove"]})

    def _selected(self) -> MemorySlot | None:
        return self.slots[self.selector] if 0 <= self.selector < len(self.slots) else None

    # -- guest accesses ----------------------------------------------------------------

    def _register(self, slot: MemorySlot, reg: int) -> int:
        if reg == ADDR_LO:
            return slot.address & 0xFFFFFFFF
        if reg == ADDR_HI:
            return slot.address >> 32
        if reg == SIZE_LO:
            return slot.size & 0xFFFFFFFF
        if reg == SIZE_HI:
            return slot.size >> 32
        if reg == PROXIMITY:
            return slot.node
        return slot.status

    def read(self, offset: int, size: int) -> int:
        mask = (1 << (8 * size)) - 1
        slot = self._selected()
        if self.profile is Profile.QEMU:
            if slot is None:
                return 0
            if offset in (ADDR_LO, ADDR_HI, SIZE_LO, SIZE_HI, PROXIMITY, STATUS):
                return self._register(slot, offset) & mask
            return mask  # any other offset: all ones
        if slot is None or offset >= BLOCK_SIZE:
            return mask
        value = 0
        for i in range(size):  # byte by byte: each byte of a register reads as itself
            pos = offset + i
            if pos >= STATUS + 1:
                byte = 0xFF  # reserved 0x15-0x17
            else:
                reg = min(pos & ~3, STATUS)
                byte = (self._register(slot, reg) >> (8 * (pos - reg))) & 0xFF
            value |= byte << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> list[Effect]:
        value &= (1 << (8 * size)) - 1
        if not self.slots:
            return []
        if offset == SELECTOR:
            self.selector = value  # replaced whole, even out of range
            return []
        slot = self._selected()
        if slot is None:
            return []
        if offset == OST_EVENT:
            self.ost_event = value
            return []
        if offset == OST_STATUS:
            status = self.faults.ost_status.get(self.selector, value)
            self.ost_status = status
            return [OstReported(self.selector, slot.device_id, self.ost_event, status)]
        if offset == CONTROL:
            return self._control(slot, value)
        return []

    def _control(self, slot: MemorySlot, value: int) -> list[Effect]:
        effects: list[Effect] = []
        actions = [CONTROL_CLEAR_INSERT, CONTROL_CLEAR_REMOVE, CONTROL_EJECT]
        if self.profile is Profile.QEMU:  # an if / else-if chain: the first bit set wins
            actions = [next((a for a in actions if value & a), 0)]
        for action in actions:
            if not value & action:
                continue
            if action == CONTROL_CLEAR_INSERT:
                slot.inserting = False
            elif action == CONTROL_CLEAR_REMOVE:
                if self.selector not in self.faults.hold_remove:
                    slot.removing = False
            elif action == CONTROL_EJECT and slot.enabled:
                if self.selector in self.faults.refuse_eject:
                    effects.append(EjectRefused(self.selector))
                else:
                    effects.append(EjectRequested(self.selector, slot.device_id))
        return effects
