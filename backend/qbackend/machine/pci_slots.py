"""The slots of the hotpluggable PCI bus, kept true to QEMU (query-pci, QMP
events and qbackend's own requests) and shown in the PCI-hotplug block of
the hotplug controller (qbackend.models.pcihp).

Which bus: on pc the root bus (bsel 0, ACPI hotplug at 0xae00); on q35 the
root port of the machine profile (bsel 0 there too: the root bus has no
ACPI hotplug).  UP is set for a device that appears without having been
there at start, DOWN when a removal is asked for; both clear when the
device is gone.  RMV is cleared for the slots QEMU will not unplug (host
and ISA bridges, cold-plugged bridges).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from qbackend.machine.hold import ChangeHold
from qbackend.machine.qmp import QmpConnection, QmpError
from qbackend.machine.qmp_replies import Event, pci_bus_devices, qom_child_names
from qbackend.models.pcihp import PciHotplugBlock
from qbackend.plumbing.handover import State
from qbackend.plumbing.threads import run_locked

log = logging.getLogger(__name__)

# Classes QEMU marks not hot-pluggable on these machines (PCI_CLASS_*).
NOT_REMOVABLE_CLASSES = {0x0600, 0x0601, 0x0604}


@dataclass
class SlotDevice:
    slot: int
    qdev_id: str
    class_code: int
    vendor: int
    device: int


class PciSlotManager:
    def __init__(self, block: PciHotplugBlock, lock: Any, *, bus_id: str | None = None,
                 on_change: Callable[[], None] = lambda: None,
                 on_plugged: Callable[[SlotDevice], None] = lambda dev: None,
                 on_unplugged: Callable[[SlotDevice], None] = lambda dev: None,
                 hold: ChangeHold | None = None) -> None:
        self.block = block
        self.lock = lock
        self.bus_id = bus_id  # the profile's hotplug bus (q35: its root port); None: the root bus
        self.on_change = on_change
        self.on_plugged = on_plugged  # a device appeared on the bus (whoever added it)
        self.on_unplugged = on_unplugged  # ... and left it
        self.qmp: QmpConnection | None = None
        self.slots: dict[int, SlotDevice] = {}
        self._known = False  # the first reconcile sees what was cold-plugged: no UP for those
        self.removed = trio.Event()  # set (and renewed) whenever a device leaves
        self.hold = hold or ChangeHold()  # held off while an upgrade pauses (qbackend.machine.hold)

    async def attach(self, qmp: QmpConnection) -> None:
        self.qmp = qmp
        await self.reconcile()

    async def reconcile(self) -> bool:
        """Take the bus as QEMU has it now; False when QEMU could not show it (nothing changed)."""
        if self.qmp is None:
            return False
        _bus, devices = pci_bus_devices(await self.qmp.execute("query-pci"), self.bus_id)
        if devices is None:
            return False
        now: dict[int, SlotDevice] = {}
        for info in devices:
            if info.function != 0 and info.slot in now:
                continue
            now[info.slot] = SlotDevice(info.slot, info.qdev_id, info.class_code, info.vendor, info.device)
        if not await self._absent_ones_are_gone(now):
            return False
        old, known = self.slots, self._known
        gone, changed = await run_locked(self.lock, self._reconcile_block, now)
        for slot, dev in now.items() if known else ():  # the first look finds what was cold-plugged
            if slot not in old or old[slot].qdev_id != dev.qdev_id:
                if slot in old:
                    self.on_unplugged(old[slot])
                self.on_plugged(dev)
        for slot in old.keys() - now.keys():
            self.on_unplugged(old[slot])
        if gone:
            self.removed.set()
            self.removed = trio.Event()
        if changed:
            self.on_change()
        return True

    async def _absent_ones_are_gone(self, now: dict[int, SlotDevice]) -> bool:
        """A device missing from query-pci is gone only if QEMU has deleted it: while the
        guest's firmware renumbers bridges after a reset, a bus can be briefly unlisted
        with its devices still plugged.  Devices with an id are looked up in QOM."""
        assert self.qmp is not None
        missing = {d.qdev_id for s, d in self.slots.items() if s not in now and d.qdev_id}
        if not missing:
            return True
        existing = qom_child_names(await self.qmp.execute("qom-list", {"path": "/machine/peripheral"}))
        return not missing & existing

    def _reconcile_block(self, now: dict[int, SlotDevice]) -> tuple[bool, bool]:
        """Under the controller's lock: the block as QEMU has the bus; (a device left, anything changed)."""
        gone = False
        bus = self.block.buses[0]
        for slot, dev in now.items():
            old = self.slots.get(slot)
            if old is None or old.qdev_id != dev.qdev_id:
                self.block.plug(0, slot, dev.qdev_id, hotplugged=self._known and slot not in bus.devices)
            removable = dev.class_code not in NOT_REMOVABLE_CLASSES
            self.block.set_removable(0, slot, removable)
        for slot in set(self.slots) - set(now):
            self.block.unplugged(0, slot)
            gone = True
        changed = now.keys() != self.slots.keys() or any(
            self.slots[s].qdev_id != d.qdev_id for s, d in now.items() if s in self.slots)
        self.slots = now
        self._known = True
        return gone, changed

    def slot_of(self, qdev_id: str) -> int | None:
        return next((s for s, d in self.slots.items() if d.qdev_id == qdev_id), None)

    async def add(self, args: dict[str, Any]) -> SlotDevice:
        """device_add (any QEMU device given as QMP arguments) on the hotplug bus."""
        async with self.hold.change(refuse=True):
            return await self._add(args)

    async def _add(self, args: dict[str, Any]) -> SlotDevice:
        if self.qmp is None:
            raise QmpError("not connected to QEMU's QMP monitor")
        if self.bus_id is not None:
            args = {"bus": self.bus_id, **args}
        await self.qmp.execute("device_add", args)
        if not await self.reconcile():
            raise QmpError(f"device {args.get('id')} was added, but QEMU lists nothing behind {self.bus_id}: "
                           "the guest's firmware has not numbered the bus yet (wait for the guest to boot)")
        slot = self.slot_of(str(args.get("id", "")))
        if slot is None:
            raise QmpError(f"device {args.get('id')} was added but is not on the hotplug bus")
        await run_locked(self.lock, lambda: self.block.plug(0, slot, self.slots[slot].qdev_id, hotplugged=True))
        self.on_change()
        return self.slots[slot]

    async def remove(self, qdev_id: str, timeout: float = 30.0) -> bool:
        """device_del, and wait until the device is gone (the guest ejected it)."""
        await self.request_remove(qdev_id)
        return await self.wait_removed(qdev_id, timeout)

    async def wait_removed(self, qdev_id: str, timeout: float = 30.0) -> bool:
        """Wait until the device is not on the bus any more; True if it went in time."""
        with trio.move_on_after(timeout):
            while self.slot_of(qdev_id) is not None:
                await self.removed.wait()
            return True
        return False

    async def request_remove(self, qdev_id: str) -> None:
        """device_del; the device leaves when the guest has ejected it (on_unplugged)."""
        async with self.hold.change(refuse=True):
            await self._request_remove(qdev_id)

    async def _request_remove(self, qdev_id: str) -> None:
        if self.qmp is None:
            raise QmpError("not connected to QEMU's QMP monitor")
        slot = self.slot_of(qdev_id)
        await self.qmp.execute("device_del", {"id": qdev_id})
        if slot is not None:
            await run_locked(self.lock, self.block.request_unplug, 0, slot)
            self.on_change()

    async def handle_event(self, event: Event) -> None:
        if event.name == "DEVICE_DELETED" and event.data.string("device", ""):
            await self.reconcile()

    # -- hand-over to a new process (qbackend.app.upgrade) -------------------------------

    def save(self) -> State:
        """The devices of the bus as last seen in QEMU (whoever plugged them); the
        register block itself travels with the controller's state."""
        return {"known": self._known,
                "slots": [[d.slot, d.qdev_id, d.class_code, d.vendor, d.device] for d in self.slots.values()]}

    def restore(self, state: State) -> None:
        """What save() gave (before attach): the first look at QEMU then tells what
        changed meanwhile, as any later one does."""
        self._known = bool(state["known"])
        self.slots = {int(slot): SlotDevice(int(slot), str(qdev_id), int(cls), int(vendor), int(device))
                      for slot, qdev_id, cls, vendor, device in state["slots"]}

    def as_json(self) -> list[dict[str, Any]]:
        bus = self.block.buses[0]
        return [{"slot": s, "id": d.qdev_id, "vendor": f"{d.vendor:04x}", "device": f"{d.device:04x}",
                 "class": f"{d.class_code:04x}", "removable": bool(bus.removable & (1 << s)),
                 "up": bool(bus.up & (1 << s)), "down": bool(bus.down & (1 << s))}
                for s, d in sorted(self.slots.items())]
