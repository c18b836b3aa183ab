"""What one qbackend process serves: its devices, their sockets, their
peer groups.  `Backend` runs under trio; `BackendThread` runs a Backend in a
thread of its own so that synchronous code (pytest, scripts) can drive it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from .ivshmem import IvshmemDevice, PeerGroup, SharedMemory
from .nbd_exports import Export, open_export
from .nbd_server import NbdServer
from .options import IvshmemOptions, NbdExportOptions
from .pci_device import PciFunction
from .vfio_user_server import VfioUserServer

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServedDevice:
    id: str
    device: PciFunction
    server: VfioUserServer


@dataclass
class Backend:
    devices: dict[str, ServedDevice] = field(default_factory=dict)
    groups: dict[str, PeerGroup] = field(default_factory=dict)
    nbd: NbdServer | None = None
    _nursery: trio.Nursery | None = None

    def group(self, shm: str | None, size: int) -> PeerGroup:
        """The peer group of a shm name; each unnamed device gets its own."""
        key = shm or f"memfd-{len(self.groups)}"
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = PeerGroup(SharedMemory(size, shm))
        elif group.memory.size != size:
            raise ValueError(f"shm={shm} is {group.memory.size} bytes in another device; this one asks {size}")
        return group

    def add_ivshmem(self, opts: IvshmemOptions) -> ServedDevice:
        dev_id = opts.id or f"ivshmem{len(self.devices)}"
        if dev_id in self.devices:
            raise ValueError(f"device id {dev_id!r} is used twice")
        group = self.group(opts.shm, opts.size)
        device = IvshmemDevice(group, vectors=opts.vectors, position=opts.peer)
        served = ServedDevice(dev_id, device, VfioUserServer(device, opts.socket, name=dev_id))
        self.devices[dev_id] = served
        if self._nursery is not None:
            self._nursery.start_soon(served.server.serve)
        return served

    def add_nbd(self, exports: list[NbdExportOptions], socket_path: Path | None,
                tcp: tuple[str, int] | None = None) -> NbdServer:
        """The NBD server of this process; its exports are opened now."""
        if self.nbd is not None:
            raise ValueError("one NBD server per process: give all --nbd exports together")
        opened: dict[str, Export] = {}
        try:
            for opts in exports:
                if opts.name in opened:
                    raise ValueError(f"NBD export name {opts.name!r} is used twice")
                opened[opts.name] = open_export(opts)
        except BaseException:
            for export in opened.values():
                export.close()
            raise
        self.nbd = NbdServer(opened, socket_path, tcp)
        return self.nbd

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve every device until cancelled; started() once all listen."""
        try:
            async with trio.open_nursery() as nursery:
                for served in self.devices.values():
                    await nursery.start(served.server.serve)
                if self.nbd is not None:
                    await nursery.start(self.nbd.serve)
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            self.close()

    def close(self) -> None:
        for served in self.devices.values():
            served.device.close()
        for group in self.groups.values():
            group.memory.close()
        self.groups.clear()


class BackendThread:
    """A Backend served by trio in a background thread.

    For synchronous callers: `call(fn, *args)` runs a plain function in the
    trio thread, `run(afn, *args)` an async one; both return its result.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="qbackend-trio", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.backend.run)
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        except BaseException as exc:  # reported to the caller of start()/stop()
            self._error = exc
            log.exception("backend thread failed")
        finally:
            self._ready.set()

    def start(self) -> BackendThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"backend failed to start: {self._error}") from self._error
        return self

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def stop(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            self.call(self._stop.set)
            self._thread.join(10)
        if self._error is not None:
            raise RuntimeError(f"backend failed: {self._error}") from self._error

    def __enter__(self) -> BackendThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
