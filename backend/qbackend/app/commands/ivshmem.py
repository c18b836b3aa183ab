"""ivshmem peer groups over QMP: their peers, doorbells, and the shared
memory read and written from outside (as base64).

Events: ``IVSHMEM_PEER_JOINED`` {group, peer} and ``IVSHMEM_PEER_LEFT``
{group, peer}, for every kind of peer (vfio-user guests, stock QEMU
ivshmem-doorbell devices through the group's server socket, host peers).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import trio

from qbackend.ivshmem.group import PeerGroup
from qbackend.ivshmem.server import describe
from qbackend.protocol.qmp import Arg, CommandSpec, QmpCommandError

if TYPE_CHECKING:
    from qbackend.app.service import Backend
    from qbackend.servers.qmp_monitor import QmpMonitor

MAX_TRANSFER = 1 << 20  # bytes of shared memory one command reads or writes at most
GROUP = Arg("str", True, "the group (its shm= name); may be left out when there is one")

QUERY = CommandSpec("query-ivshmem-peers", {"group": GROUP}, doc="a peer group: its memory and its peers",
                    returns="{group, size, shm, vectors, servers, dropped_doorbells, peers: [{id, kind, name, "
                            "vectors, received}]}")
RING = CommandSpec("ivshmem-ring", {"group": GROUP, "peer": Arg("int"), "vector": Arg("int")},
                   doc="ring a peer's doorbell vector as a host peer would", returns="{delivered}")
READ = CommandSpec("ivshmem-read", {"group": GROUP, "offset": Arg("int"), "length": Arg("int")},
                   doc="read the shared memory", returns="{offset, data (base64)}")
WRITE = CommandSpec("ivshmem-write", {"group": GROUP, "offset": Arg("int"), "data": Arg("str", doc="base64")},
                    doc="write the shared memory", returns="{written}")


def register(monitor: QmpMonitor, backend: Backend) -> None:
    register_groups(monitor, backend.groups)


def register_groups(monitor: QmpMonitor, groups: Mapping[str, PeerGroup]) -> None:
    """The ivshmem commands over ``groups`` (read at each call: the live dict)."""

    def pick(args: dict[str, Any]) -> PeerGroup:
        name = args.get("group")
        if name is not None:
            if name not in groups:
                raise QmpCommandError(f"no ivshmem group '{name}'; groups: {', '.join(groups) or 'none'}")
            return groups[name]
        shared = {k: g for k, g in groups.items() if not k.startswith("memfd-")} or dict(groups)
        if len(shared) != 1:
            raise QmpCommandError(f"say which group ('group'): {', '.join(groups) or 'there is none'}")
        return next(iter(shared.values()))

    def bounds(group: PeerGroup, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > group.memory.size:
            raise QmpCommandError(f"{offset:#x}+{length} is outside the {group.memory.size:#x}-byte memory")
        if length > MAX_TRANSFER:
            raise QmpCommandError(f"at most {MAX_TRANSFER} bytes at a time")

    # The group's lock is shared with its doorbell thread and the vfio-user
    # workers: what takes it runs in a worker thread, never in trio itself.
    async def query(args: dict[str, Any]) -> object:
        return await trio.to_thread.run_sync(describe, pick(args))

    async def ring(args: dict[str, Any]) -> object:
        group = pick(args)
        if not 0 <= args["peer"] <= 0xFFFF or not 0 <= args["vector"] <= 0xFFFF:
            raise QmpCommandError("peer and vector are 0..65535")
        return {"delivered": await trio.to_thread.run_sync(group.ring, args["peer"], args["vector"])}

    async def read(args: dict[str, Any]) -> object:
        group = pick(args)
        bounds(group, args["offset"], args["length"])
        data = group.memory.read(args["offset"], args["length"])
        return {"offset": args["offset"], "data": base64.b64encode(data).decode()}

    async def write(args: dict[str, Any]) -> object:
        group = pick(args)
        try:
            data = base64.b64decode(args["data"], validate=True)
        except (binascii.Error, ValueError):
            raise QmpCommandError("'data' is not base64") from None
        bounds(group, args["offset"], len(data))
        group.memory.write(args["offset"], data)
        return {"written": len(data)}

    monitor.register(QUERY, query)
    monitor.register(RING, ring)
    monitor.register(READ, read)
    monitor.register(WRITE, write)


def watch_group(monitor: QmpMonitor, group: PeerGroup) -> None:
    """Joins and leaves of ``group`` as events (the listener runs in any thread)."""

    def listener(kind: str, peer: int) -> None:
        name = "IVSHMEM_PEER_JOINED" if kind == "join" else "IVSHMEM_PEER_LEFT"
        monitor.emit_threadsafe(name, {"group": group.name, "peer": peer})

    group.subscribe(listener)
