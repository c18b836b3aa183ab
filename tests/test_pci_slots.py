"""PciSlotManager against scripted QMP replies shaped like QEMU 11.1's.

The case that matters: on q35 a machine reset clears the root port's
secondary bus number until the guest's firmware numbers it again, and
query-pci then lists nothing behind the port.  The devices are all still
plugged; taking that listing as the truth unplugs them and plugs them back
as new, leaving an insert event (UP) that QEMU's own block does not have.
The booted-guest version is tests/test_reboot_guest.py (q35).
"""

from __future__ import annotations

import threading
from typing import Any

import trio

from qbackend.machine.pci_slots import PciSlotManager, SlotDevice
from qbackend.models.pcihp import PciHotplugBlock

PORT = "rp0"


def _device(slot: int, qdev_id: str, vendor: int = 0x1AF4, device: int = 0x1110) -> dict[str, Any]:
    return {"bus": 1, "slot": slot, "function": 0, "qdev_id": qdev_id, "id": {"vendor": vendor, "device": device},
            "class_info": {"class": 0x0500}, "regions": []}


def _query_pci(secondary: int, devices: list[dict[str, Any]]) -> list[dict[str, Any]]:
    bridge: dict[str, Any] = {"bus": {"number": 0, "secondary": secondary, "subordinate": secondary}}
    if devices:  # QEMU omits an empty list
        bridge["devices"] = devices
    port = {"bus": 0, "slot": 2, "function": 0, "qdev_id": PORT, "id": {"vendor": 0x1B36, "device": 0x000C},
            "class_info": {"class": 0x0604}, "regions": [], "pci_bridge": bridge}
    return [{"bus": 0, "devices": [port]}]


class ScriptedQmp:
    """Answers query-pci and qom-list from what the test says QEMU has now."""

    def __init__(self) -> None:
        self.secondary = 1
        self.devices: list[dict[str, Any]] = []
        self.peripheral: set[str] = set()
        self.commands: list[str] = []

    async def execute(self, command: str, args: dict[str, Any] | None = None) -> Any:
        self.commands.append(command)
        if command == "query-pci":
            return _query_pci(self.secondary, self.devices if self.secondary else [])
        if command == "qom-list":
            assert args == {"path": "/machine/peripheral"}
            return [{"name": "type", "type": "string"}] + [
                {"name": n, "type": "child<vfio-user-pci>"} for n in sorted(self.peripheral)]
        raise AssertionError(f"unexpected command {command}")


def _manager(qmp: ScriptedQmp) -> tuple[PciSlotManager, list[str]]:
    events: list[str] = []
    manager = PciSlotManager(PciHotplugBlock(), threading.Lock(), bus_id=PORT,
                             on_plugged=lambda d: events.append(f"plugged {d.qdev_id}"),
                             on_unplugged=lambda d: events.append(f"unplugged {d.qdev_id}"))
    manager.qmp = qmp  # type: ignore[assignment]
    return manager, events


def test_an_unnumbered_bus_is_not_an_empty_one() -> None:
    async def main() -> None:
        qmp = ScriptedQmp()
        manager, events = _manager(qmp)
        assert await manager.reconcile()  # the first look: nothing plugged
        qmp.devices, qmp.peripheral = [_device(0, "iv0")], {"iv0"}
        assert await manager.reconcile()
        assert events == ["plugged iv0"]
        manager.block.machine_reset()  # what the controller's reset does: the insert event is over
        bus = manager.block.buses[0]
        assert bus.up == 0 and bus.devices == {0: "iv0"}

        qmp.secondary = 0  # the reset cleared the port's bus number
        assert not await manager.reconcile()
        qmp.secondary = 1  # firmware numbered it again
        assert await manager.reconcile()
        assert events == ["plugged iv0"]
        assert bus.up == 0 and bus.devices == {0: "iv0"}
        assert list(manager.slots) == [0]

    trio.run(main)


def test_a_device_missing_from_the_listing_but_still_in_qom_stays() -> None:
    """A bus numbered but not yet found by QEMU's bus lookup (firmware mid-way) lists
    nothing either: QOM says whether the device still exists."""
    async def main() -> None:
        qmp = ScriptedQmp()
        manager, events = _manager(qmp)
        await manager.reconcile()
        qmp.devices, qmp.peripheral = [_device(3, "iv0")], {"iv0"}
        await manager.reconcile()
        qmp.devices = []
        assert not await manager.reconcile()
        assert manager.slot_of("iv0") == 3 and events == ["plugged iv0"]
        qmp.peripheral = set()  # really deleted
        assert await manager.reconcile()
        assert manager.slot_of("iv0") is None
        assert events == ["plugged iv0", "unplugged iv0"]
        assert manager.block.buses[0].devices == {}

    trio.run(main)


def test_qom_is_asked_only_when_something_is_missing() -> None:
    async def main() -> None:
        qmp = ScriptedQmp()
        manager, _events = _manager(qmp)
        qmp.devices, qmp.peripheral = [_device(0, "iv0")], {"iv0"}
        for _ in range(3):
            await manager.reconcile()
        assert qmp.commands == ["query-pci"] * 3
        assert manager.slots == {0: SlotDevice(0, "iv0", 0x0500, 0x1AF4, 0x1110)}
        assert manager.block.buses[0].up == 0  # found at the first look: cold-plugged

    trio.run(main)
