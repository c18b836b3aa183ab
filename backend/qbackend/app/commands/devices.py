"""A served device's trace and reload, over QMP.

- ``device-trace-start`` {id, file}: trace the device into FILE (JSON lines,
  qbackend.vfio.trace) from now on; any served device (a user's
  `qbackend.devices.Device`: accesses, interrupts, DMA, lifecycle; a
  built-in one: accesses, SET_IRQS and lifecycle);
- ``device-trace-stop`` {id}: end it, the file closed; returns {device,
  events, dropped, file};
- ``device-reload`` {id}: load a user device's module again and serve a new
  instance of its class in place of the running one, the guest and QEMU
  going on (qbackend.app.device_loader.reload_device); a reload that fails
  leaves the old device serving and the error says why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

from qbackend.devices.api import UserFunction
from qbackend.errors import QbackendError
from qbackend.protocol.qmp import Arg, CommandSpec, QmpCommandError
from qbackend.servers.qmp_monitor import device_not_found
from qbackend.vfio import trace

if TYPE_CHECKING:
    from qbackend.app.service import Backend, ServedDevice
    from qbackend.servers.qmp_monitor import QmpMonitor

TRACE_START = CommandSpec("device-trace-start", {
    "id": Arg("str", doc="the device's id"),
    "file": Arg("str", doc="where the trace goes (JSON lines; replaced if it exists)"),
}, doc="trace a served device's accesses, interrupts, DMA and lifecycle into a file", returns="{}")
TRACE_STOP = CommandSpec("device-trace-stop", {"id": Arg("str")},
                         doc="end a device's trace", returns="{device, events, dropped, file}")
RELOAD = CommandSpec("device-reload", {"id": Arg("str")},
                     doc="load a user device's module again and replace the running device in place",
                     returns="{id, class}")


def register(monitor: QmpMonitor, backend: Backend) -> None:
    def served(dev_id: str) -> ServedDevice:
        found = backend.devices.get(dev_id)
        if found is None:
            raise device_not_found(f"Device '{dev_id}' not found")
        return found

    async def start(args: dict[str, Any]) -> object:
        device = served(args["id"]).device
        header: dict[str, object] = {}
        if isinstance(device, UserFunction) and device.origin is not None:
            header = {"class": device.origin[0], "args": device.origin[1]}
        try:
            tracer = await trio.to_thread.run_sync(lambda: trace.Tracer(args["id"], path=args["file"],
                                                                        header=header))
            await trio.to_thread.run_sync(trace.start, device, tracer)
        except QbackendError as exc:
            raise QmpCommandError(str(exc)) from None
        return {}

    async def stop(args: dict[str, Any]) -> object:
        device = served(args["id"]).device
        try:
            return await trio.to_thread.run_sync(trace.stop, device)
        except QbackendError as exc:
            raise QmpCommandError(str(exc)) from None

    async def reload(args: dict[str, Any]) -> object:
        from qbackend.app.device_loader import reload_device

        device = served(args["id"]).device
        if not isinstance(device, UserFunction):
            raise QmpCommandError(f"{args['id']} is a built-in device: only a qbackend.devices.Device of yours "
                                  "reloads")
        try:
            new = await trio.to_thread.run_sync(reload_device, device)
        except QbackendError as exc:
            raise QmpCommandError(str(exc)) from None
        return {"id": args["id"], "class": f"{type(new).__module__}.{type(new).__qualname__}"}

    monitor.register(TRACE_START, start)
    monitor.register(TRACE_STOP, stop)
    monitor.register(RELOAD, reload)
