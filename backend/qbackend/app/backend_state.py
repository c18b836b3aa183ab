"""A running Backend as a description another process can make again, and the
parts of it that hand over their listeners and connections (qbackend.app.upgrade).

The description holds what each device, block node, export and server was
made from (the options of the command line or of QMP), never live state:
`rebuild` makes a Backend from it with the same `Backend.add_*` methods
and block-layer calls, and the live state (sockets, rings, registers)
then comes with each part's `adopt`.  Parts are named ("device:ID",
"group:NAME", "vhost:ID", "nbd", "blocks", "monitor"), so the old and
new process pair them by name, not by order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qbackend.app.block_exports import BlockNode
from qbackend.app.service import Backend
from qbackend.app.upgrade import Part
from qbackend.options import DeviceOptions, IvshmemOptions, options_from_json, options_to_json
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


def parts_of(backend: Backend) -> dict[str, object]:
    """Every part of `backend` that holds sockets or shared state, by name, in the order
    they adopt (a peer group before the devices that share its memory) and pause (the
    flush after every server; the monitor last)."""
    parts: dict[str, object] = {}
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
