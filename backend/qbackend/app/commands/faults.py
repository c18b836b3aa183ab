"""The hotplug controller's fault injection over QMP, so that a test of a
guest driver can break the controller from outside while the guest runs.

Faults (by memory-hotplug slot):
- ``refuse-eject``: the guest's eject (MEJ) is ignored, the DIMM stays;
- ``ost-status``: an OST status write from the guest reports ``status`` instead;
- ``hold-remove``: clearing the remove event is ignored, the event stays pending;
- ``spurious-insert``: an insert event for the slot now, with the interrupt.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qbackend.devices.hotplug_controller import HotplugController
from qbackend.plumbing.threads import run_locked
from qbackend.protocol.qmp import Arg, CommandSpec, QmpCommandError

if TYPE_CHECKING:
    from qbackend.app.service import Backend
    from qbackend.servers.qmp_monitor import QmpMonitor

KINDS = ("refuse-eject", "ost-status", "hold-remove", "spurious-insert")

QUERY = CommandSpec("query-hotplug-faults", doc="the faults set on the hotplug controller",
                    returns="{refuse-eject: [slot], ost-status: [{slot, status}], hold-remove: [slot]}")
SET = CommandSpec("hotplug-fault-set", {
    "fault": Arg(KINDS), "slot": Arg("int"),
    "status": Arg("int", True, "for ost-status: the status to report (e.g. 130 = 0x82, busy)"),
}, doc="set a fault of the hotplug controller (spurious-insert happens at once)")
CLEAR = CommandSpec("hotplug-fault-clear", {
    "fault": Arg(KINDS[:3], True, "default: every kind"), "slot": Arg("int", True, "default: every slot"),
}, doc="clear faults of the hotplug controller")


def register(monitor: QmpMonitor, backend: Backend) -> None:
    def controller() -> HotplugController:
        if backend.controller is None or not isinstance(backend.controller.device, HotplugController):
            raise QmpCommandError("this qbackend has no hotplug controller")
        return backend.controller.device

    def slot_of(hc: HotplugController, slot: int) -> int:
        if not 0 <= slot < len(hc.memhp.slots):
            raise QmpCommandError(f"slot {slot} is not one of the controller's {len(hc.memhp.slots)} slots")
        return slot

    async def query(args: dict[str, Any]) -> object:
        hc = controller()

        def read() -> object:
            f = hc.memhp.faults
            return {"refuse-eject": sorted(f.refuse_eject), "hold-remove": sorted(f.hold_remove),
                    "ost-status": [{"slot": s, "status": v} for s, v in sorted(f.ost_status.items())]}

        return await run_locked(hc.lock, read)

    async def set_fault(args: dict[str, Any]) -> object:
        hc = controller()
        slot, kind = slot_of(hc, args["slot"]), args["fault"]
        if kind == "ost-status" and "status" not in args:
            raise QmpCommandError("Parameter 'status' is missing")
        if "status" in args and not 0 <= args["status"] <= 0xFFFFFFFF:
            raise QmpCommandError("'status' is a 32-bit value")

        def apply() -> None:
            f = hc.memhp.faults
            if kind == "refuse-eject":
                f.refuse_eject.add(slot)
            elif kind == "hold-remove":
                f.hold_remove.add(slot)
            elif kind == "ost-status":
                f.ost_status[slot] = args["status"]
            else:
                hc.memhp.spurious_insert(slot)
                hc.update_interrupt()

        await run_locked(hc.lock, apply)
        return {}

    async def clear(args: dict[str, Any]) -> object:
        hc = controller()
        kinds = [args["fault"]] if "fault" in args else list(KINDS[:3])
        slots = [slot_of(hc, args["slot"])] if "slot" in args else None

        def apply() -> None:
            f = hc.memhp.faults
            for kind in kinds:
                if kind == "ost-status":
                    for slot in list(f.ost_status) if slots is None else slots:
                        f.ost_status.pop(slot, None)
                else:
                    table = f.refuse_eject if kind == "refuse-eject" else f.hold_remove
                    for slot in list(table) if slots is None else slots:
                        table.discard(slot)

        await run_locked(hc.lock, apply)
        return {}

    monitor.register(QUERY, query)
    monitor.register(SET, set_fault)
    monitor.register(CLEAR, clear)
