"""The control socket's `ivshmem-*` commands: a group's peers, doorbells,
and its shared memory read and written from outside."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import trio

from qbackend.errors import ControlError
from qbackend.ivshmem.group import PeerGroup
from qbackend.ivshmem.server import describe
from qbackend.servers.control import ControlServer

MAX_DUMP = 1 << 20  # bytes of shared memory one command reads or writes at most


def register_control(control: ControlServer, groups: Mapping[str, PeerGroup]) -> None:
    """Add the `ivshmem-*` commands to a control socket.  `groups` is read
    at each call (the Backend's live dict)."""

    def pick(req: dict[str, Any]) -> PeerGroup:
        name = req.get("group")
        if name is not None:
            if name not in groups:
                raise ControlError(f"no ivshmem group {name!r}; groups: {', '.join(groups) or 'none'}")
            return groups[name]
        shared = {k: g for k, g in groups.items() if not k.startswith("memfd-")} or dict(groups)
        if len(shared) != 1:
            raise ControlError(f"say which group (--group): {', '.join(groups) or 'there is none'}")
        return next(iter(shared.values()))

    def bounds(group: PeerGroup, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > group.memory.size:
            raise ControlError(f"{offset:#x}+{length} is outside the {group.memory.size:#x}-byte memory")
        if length > MAX_DUMP:
            raise ControlError(f"at most {MAX_DUMP} bytes at a time")

    # The group's lock is shared with its doorbell thread and the vfio-user
    # workers: what takes it runs in a worker thread, never in trio itself.
    async def peers(req: dict[str, Any]) -> Any:
        return await trio.to_thread.run_sync(describe, pick(req))

    async def ring(req: dict[str, Any]) -> Any:
        group = pick(req)
        peer, vector = int(req["peer"]), int(req["vector"])
        return {"delivered": await trio.to_thread.run_sync(group.ring, peer, vector)}

    async def dump(req: dict[str, Any]) -> Any:
        group = pick(req)
        offset, length = int(req["offset"]), int(req["length"])
        bounds(group, offset, length)
        return {"offset": offset, "data": group.memory.read(offset, length).hex()}

    async def write(req: dict[str, Any]) -> Any:
        group = pick(req)
        offset, data = int(req["offset"]), bytes.fromhex(str(req["data"]))
        bounds(group, offset, len(data))
        group.memory.write(offset, data)
        return {"written": len(data)}

    control.register("ivshmem-peers", peers)
    control.register("ivshmem-ring", ring)
    control.register("ivshmem-dump", dump)
    control.register("ivshmem-write", write)
