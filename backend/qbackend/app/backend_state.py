"""A running Backend as a description another process can make again, and the
parts of it that hand over their listeners and connections (qbackend.app.upgrade).

The description holds what each device, block node, export and server was
made from (the options of the command line or of QMP), never live state:
`rebuild` makes a Backend from it with the same `Backend.add_*` methods
and block-layer calls, and the live state (sockets, rings, registers)
then comes with each part's `adopt`.  Parts are named ("hotplug",
"device:ID", "group:NAME", "vhost:ID", "nbd", "blocks", "monitor"), so the
old and new process pair them by name, not by order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qbackend.app.block_exports import BlockNode
from qbackend.app.service import Backend
from qbackend.app.upgrade import Part
from qbackend.devices.hotplug_controller import HotplugController
from qbackend.models.memhp import EjectRequested, Profile
from qbackend.models.pcihp import EjectSlot
from qbackend.options import DeviceOptions, DimmOptions, IvshmemOptions, options_from_json, options_to_json
from qbackend.plumbing.handover import HandoverError, Loader, Saver, State

PART_METHODS = ("pause", "resume", "save", "adopt")


class BlocksFlush:
    """The block layer's part: every open export flushed once the servers are paused, so
    the new process opens images whose every acknowledged write is on disk."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend

    async def pause(self) -> None:
        import trio

        for export in self.backend.blocks.open_exports():
            await trio.to_thread.run_sync(export.flush)

    async def resume(self) -> None:
        pass

    def save(self, saver: Saver) -> State:
        return {}

    def adopt(self, state: State, loader: Loader) -> None:
        pass


class HotplugSlots:
    """The hotplug slot managers' part: what they know of QEMU (DIMMs declared and
    plugged, where each removal stands, the devices of the PCI hotplug bus) and the
    ejects the guest wrote that are not begun yet.  The controller's registers travel
    with its device ("device:ID"); QEMU's QMP monitor is not handed over: the new
    process connects to it again (QEMU accepts it once the old process has gone) and
    reconciles with what QEMU has then.

    It pauses first: every change of the slots (a QMP event, a reconcile, a hot-add or
    hot-remove over the monitor, which is refused meanwhile, a guest's eject) ends or
    waits (qbackend.machine.hold)."""

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.devices = set(backend.devices)  # as described: a change meanwhile fails the hand-over

    async def pause(self) -> None:
        await self.backend.hold.pause()
        if set(self.backend.devices) != self.devices:
            raise HandoverError("a hot-plug or hot-unplug of a device ended as the upgrade began: try again")

    async def resume(self) -> None:
        self.backend.hold.resume()

    def save(self, saver: Saver) -> State:
        backend = self.backend
        ejects: list[list[object]] = []
        for e in list(backend.guest_ejects):
            ejects.append(["pci", e.bsel, e.slot, e.device_id] if isinstance(e, EjectSlot)
                          else ["memory", e.slot, e.device_id])
        return {"dimms": None if backend.dimms is None else backend.dimms.save(),
                "pci": None if backend.pci is None else backend.pci.save(),
                "guest_ejects": ejects}

    def adopt(self, state: State, loader: Loader) -> None:
        backend = self.backend
        for name, manager in (("dimms", backend.dimms), ("pci", backend.pci)):
            if (state[name] is None) != (manager is None):
                raise HandoverError(f"hotplug: the old process's {name} slots and this one's differ")
        try:
            if backend.dimms is not None:
                backend.dimms.restore(state["dimms"])
            if backend.pci is not None:
                backend.pci.restore(state["pci"])
            ejects: list[EjectRequested | EjectSlot] = []
            for e in state["guest_ejects"]:
                ejects.append(EjectSlot(int(e[1]), int(e[2]), str(e[3])) if e[0] == "pci"
                              else EjectRequested(int(e[1]), str(e[2])))
        except (KeyError, TypeError, ValueError) as exc:
            raise HandoverError(f"hotplug: the state of the old process is not understood: {exc!r}") from None
        backend.guest_ejects[:] = ejects


def parts_of(backend: Backend) -> dict[str, object]:
    """Every part of `backend` that holds sockets or shared state, by name, in the order
    they adopt (a peer group before the devices that share its memory) and pause (the
    hotplug slots first, so that nothing plugs or unplugs meanwhile; the flush after
    every server; the monitor last)."""
    parts: dict[str, object] = {}
    if backend.controller is not None:
        parts["hotplug"] = HotplugSlots(backend)
    for key, group in backend.groups.items():
        parts[f"group:{key}"] = group
    for dev_id, served in backend.devices.items():
        parts[f"device:{dev_id}"] = served.server
    for export_id, entry in backend.blocks.vhost.items():
        parts[f"vhost:{export_id}"] = entry.server
    if backend.blocks.server is not None:
        parts["nbd"] = backend.blocks.server
    parts["blocks"] = BlocksFlush(backend)
    if backend.monitor is not None:
        parts["monitor"] = backend.monitor
    return parts


def refusals(backend: Backend) -> list[str]:
    """Why `backend` cannot be handed over now, one line each (empty: it can)."""
    if not backend.upgradable:
        return ["only a 'qbackend serve' process hands over (a 'qbackend run' is QEMU's parent, and a backend "
                "inside another program must not exit under it)"]
    out: list[str] = []
    for name, part in parts_of(backend).items():
        if not all(callable(getattr(part, m, None)) for m in PART_METHODS):
            out.append(f"{name} cannot be handed over yet")
            continue
        refusal = getattr(part, "handover_refusal", None)
        why = refusal() if callable(refusal) else None
        if why:
            out.append(why)
    for served in backend.devices.values():
        if served.options is None and served is not backend.controller:
            out.append(f"device {served.id} was not made from options (a device object given to the Python "
                       "API): a new process cannot make it again")
    blocks = backend.blocks
    if blocks.tls_context is not None or blocks.credentials:
        out.append("NBD over TLS: the TLS credentials cannot be handed over yet")
    return out


def describe(backend: Backend) -> State:
    """What `rebuild` needs to make `backend` again (JSON-able)."""
    blocks = backend.blocks
    devices: list[State] = []
    for served in backend.devices.values():
        if served is backend.controller:
            devices.append({"kind": "hotplug", "options": describe_controller(backend), "pci_added": False})
            continue
        kind = "ivshmem" if isinstance(served.options, IvshmemOptions) else "device"
        assert served.options is not None  # refusals() said so
        devices.append({"kind": kind, "options": options_to_json(served.options),
                        "pci_added": served.created_by_pci_add})
    exports: list[State] = []
    for record in blocks.exports.values():
        entry: State = {"id": record.id, "node": record.node_name, "name": record.name,
                        "writable": record.writable, "type": record.type}
        if record.type == "vhost-user-blk":
            vhost = blocks.vhost[record.id].server
            entry.update(num_queues=vhost.num_queues, logical_block_size=vhost.logical_block_size,
                         handshake_timeout=vhost.handshake_timeout)
        exports.append(entry)
    nbd: State | None = None
    if blocks.server is not None:
        server = blocks.server
        nbd = {"socket": None if server.socket_path is None else str(server.socket_path),
               "tcp": None if server.tcp is None else [server.tcp[0], server.tcp_port or server.tcp[1]],
               "max_connections": server.max_connections, "handshake_timeout": server.handshake_timeout}
    return {
        "handshake_timeout": backend.handshake_timeout,
        "reconcile_interval": backend.reconcile_interval,
        "devices": devices,
        "nodes": [{"name": n.node_name, "driver": n.driver, "filename": str(n.filename),
                   "read_only": n.read_only, "file_node": n.file_node} for n in blocks.nodes.values()],
        "exports": exports,
        "nbd": nbd,
        "nbd_defaults": {"max_connections": blocks.max_connections, "handshake_timeout": blocks.handshake_timeout},
        "control": None if backend.monitor is None else str(backend.monitor.path),
        "qmp": None if backend.qmp_path is None else str(backend.qmp_path),
    }


def describe_controller(backend: Backend) -> State:
    """The options the hotplug controller and its slots were made from
    (Backend.add_hotplug_controller, add_pci_slots)."""
    served, dimms = backend.controller, backend.dimms
    assert served is not None and dimms is not None
    controller = served.device
    assert isinstance(controller, HotplugController)
    return {"id": served.id, "socket": str(served.server.socket_path),
            "dimms": [options_to_json(d.opts) for d in dimms.dimms.values()],
            "machine": dimms.machine, "ram_size": dimms.ram_size, "slots": len(controller.memhp.slots),
            "profile": controller.memhp.profile.value, "pci_slots": backend.pci is not None,
            "bus": None if backend.pci is None else backend.pci.bus_id}


def rebuild(desc: State) -> Backend:
    """A Backend made again from describe()'s description (not running yet)."""
    try:
        return _rebuild(desc)
    except (KeyError, TypeError, ValueError) as exc:
        raise HandoverError(f"the description of the old process is not understood: {exc!r}") from None


def _rebuild(desc: State) -> Backend:
    backend = Backend(handshake_timeout=float(desc["handshake_timeout"]),
                      reconcile_interval=float(desc["reconcile_interval"]), upgradable=True)
    blocks = backend.blocks
    defaults = desc["nbd_defaults"]
    blocks.max_connections, blocks.handshake_timeout = int(defaults["max_connections"]), \
        float(defaults["handshake_timeout"])
    for d in desc["devices"]:
        if d["kind"] == "hotplug":
            hp = d["options"]
            dimms: list[DimmOptions] = []
            for o in hp["dimms"]:
                dimm = options_from_json(DimmOptions, o)
                assert isinstance(dimm, DimmOptions)
                dimms.append(dimm)
            backend.add_hotplug_controller(Path(hp["socket"]), dimms, machine=str(hp["machine"]),
                                           ram_size=int(hp["ram_size"]), slots=int(hp["slots"]),
                                           profile=Profile(hp["profile"]), dev_id=str(hp["id"]))
            if hp["pci_slots"]:
                backend.add_pci_slots(None if hp["bus"] is None else str(hp["bus"]))
            continue
        if d["kind"] == "ivshmem":
            opts = options_from_json(IvshmemOptions, d["options"])
            assert isinstance(opts, IvshmemOptions)
            served = backend.add_ivshmem(opts)
        else:
            dev = options_from_json(DeviceOptions, d["options"])
            assert isinstance(dev, DeviceOptions)
            served = backend.add_device(dev)
        served.created_by_pci_add = bool(d["pci_added"])
    for n in desc["nodes"]:
        blocks.nodes[n["name"]] = BlockNode(n["name"], n["driver"], Path(n["filename"]), bool(n["read_only"]),
                                            n["file_node"])
    for e in desc["exports"]:
        if e["type"] == "vhost-user-blk":
            blocks.add_vhost_user_blk(e["id"], e["node"], Path(e["name"]), bool(e["writable"]),
                                      int(e["num_queues"]), handshake_timeout=float(e["handshake_timeout"]),
                                      logical_block_size=int(e["logical_block_size"]))
        else:
            blocks.add_at_start(e["id"], e["node"], e["name"], bool(e["writable"]))
    nbd: Any = desc["nbd"]
    if nbd is not None:
        tcp = None if nbd["tcp"] is None else (str(nbd["tcp"][0]), int(nbd["tcp"][1]))
        backend.nbd_listen = (None if nbd["socket"] is None else Path(nbd["socket"]), tcp)
        blocks.max_connections, blocks.handshake_timeout = int(nbd["max_connections"]), \
            float(nbd["handshake_timeout"])
    if desc["control"] is not None:
        backend.enable_control(Path(desc["control"]))
    if desc["qmp"] is not None:
        backend.attach_qmp(Path(desc["qmp"]))
    return backend


def adopt_parts(backend: Backend, states: State, loader: Loader) -> None:
    """Each part of the rebuilt backend takes its listener and connections; the NBD server,
    made only when the backend runs, takes its own then (BlockExports.adopt_server)."""
    parts = parts_of(backend)
    if "nbd" in states:
        nbd_state = states["nbd"]
        def adopt_nbd(server: object) -> None:
            typed: Part = server  # type: ignore[assignment]  # refusals() in the old process checked the methods
            typed.adopt(nbd_state, loader)

        backend.blocks.adopt_server = adopt_nbd
    for name, part in parts.items():
        if name not in states:
            raise HandoverError(f"{name}: the old process handed over nothing for it")
        typed: Part = part  # type: ignore[assignment]  # refusals() in the old process checked the methods
        typed.adopt(states[name], loader)
    unknown = set(states) - set(parts) - {"nbd"}
    if unknown:
        raise HandoverError(f"the old process handed over parts this one does not have: {', '.join(sorted(unknown))}")
