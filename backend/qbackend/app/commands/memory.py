"""DIMM slots over QMP: the DIMM queries, hot-add and hot-remove.

Events: ``DIMM_ADDED`` {id, slot, address, node}; ``DIMM_REMOVED`` {id, slot}
once QEMU has deleted it; ``DIMM_REMOVE_FAILED`` {id, slot, ost-status} when
the guest refused (OST 0x82).  They are sent whoever asked for the change:
a QMP client, the guest's eject in the controller's window, or a
``device_del`` typed on QEMU's own monitor.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qbackend.machine.dimm_slots import Dimm, DimmManager
from qbackend.protocol.qmp import Arg, CommandSpec, QmpCommandError
from qbackend.servers.qmp_monitor import device_not_found

if TYPE_CHECKING:
    from qbackend.app.service import Backend
    from qbackend.servers.qmp_monitor import QmpMonitor

QUERY_HOTPLUG = CommandSpec("query-memory-hotplug",
                            doc="every declared DIMM slot and its state, then the DIMMs plugged on QEMU's own "
                                "monitor (declared: false)",
                            returns="[{id, slot, address, size, node, state, declared}]")
QUERY_TOTAL = CommandSpec("query-memory-total", doc="memory total: base plus plugged DIMMs",
                          returns="{base, plugged, total, and with a QEMU attached its qemu-base, qemu-plugged}")
DIMM_ADD = CommandSpec("dimm-add", {"id": Arg("str", doc="a declared slot's DIMM id")},
                       doc="hot-add a declared DIMM (object-add + device_add pc-dimm)",
                       returns="{id, slot, address, node}")
DIMM_DEL = CommandSpec("dimm-del", {"id": Arg("str", doc="a plugged DIMM's id")},
                       doc="hot-remove a DIMM; returns at once, DIMM_REMOVED or DIMM_REMOVE_FAILED follows")


def dimm_event(d: Dimm) -> tuple[str, dict[str, object]]:
    """The outcome event of a finished removal."""
    if d.removal is not None and d.removal.name == "REMOVED":
        return "DIMM_REMOVED", {"id": d.id, "slot": d.slot}
    return "DIMM_REMOVE_FAILED", {"id": d.id, "slot": d.slot, "ost-status": d.ost_status or 0}


def register(monitor: QmpMonitor, backend: Backend) -> None:
    def dimms() -> DimmManager:
        if backend.dimms is None:
            raise QmpCommandError("this qbackend has no DIMM slots (start it with the hotplug controller)")
        if backend.qemu_gone is not None:
            raise QmpCommandError(backend.qemu_gone)
        return backend.dimms

    async def query_hotplug(args: dict[str, Any]) -> object:
        return dimms().hotplug_status()

    async def query_total(args: dict[str, Any]) -> object:
        return await dimms().memory_total()

    def declared(dimm_id: str) -> str:
        if dimm_id not in dimms().dimms:
            raise device_not_found(f"Device '{dimm_id}' not found (declared DIMMs: "
                                   f"{', '.join(dimms().dimms) or 'none'})")
        return dimm_id

    async def add(args: dict[str, Any]) -> object:
        d = await dimms().add(declared(args["id"]))
        monitor.emit("DIMM_ADDED", {"id": d.id, "slot": d.slot, "address": d.address, "node": d.opts.node})
        return {"id": d.id, "slot": d.slot, "address": d.address, "node": d.opts.node}

    async def delete(args: dict[str, Any]) -> object:
        await dimms().request_removal(declared(args["id"]))
        return {}

    monitor.register(QUERY_HOTPLUG, query_hotplug)
    monitor.register(QUERY_TOTAL, query_total)
    monitor.register(DIMM_ADD, add)
    monitor.register(DIMM_DEL, delete)
