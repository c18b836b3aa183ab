"""The PCI hotplug bus over QMP: what the controller's window shows, and
hot-add and hot-remove of qbackend's own devices (and of any QEMU device).

Events: ``PCI_DEVICE_PLUGGED`` {id, slot} when a device appears on the
hotplug bus and ``PCI_DEVICE_UNPLUGGED`` {id, slot} when it has left
(after QEMU's DEVICE_DELETED), whoever added or removed it.

A hot-plugged ivshmem has no MSI-X unless asked (``vectors`` defaults to 0
here, where ``--ivshmem`` gives 1), and ``pci-device-del`` refuses a
qbackend device with MSI-X under a QEMU known to abort on its unplug
(`qbackend.machine.qemu_issues.MSIX_UNPLUG_ABORT`) unless ``force`` is true.
Once QEMU has gone, every command here says so.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbackend.errors import QbackendError
from qbackend.machine.pci_slots import PciSlotManager
from qbackend.machine.qemu_issues import MSIX_UNPLUG_ABORT
from qbackend.options import DeviceOptions, IvshmemOptions
from qbackend.protocol.qmp import Arg, CommandSpec, QmpCommandError
from qbackend.servers.qmp_monitor import device_not_found

if TYPE_CHECKING:
    from qbackend.app.service import Backend
    from qbackend.servers.qmp_monitor import QmpMonitor

QUERY = CommandSpec("query-pci-hotplug", doc="the hotplug bus as the controller's window shows it",
                    returns="[{slot, id, vendor, device, class, removable, up, down}]")
ADD = CommandSpec("pci-device-add", {
    "driver": Arg(("ivshmem", "device"), doc="ivshmem, or device: a qbackend.devices.Device class of yours"),
    "id": Arg("str", doc="QEMU device id (also the device's name in qbackend)"),
    "socket": Arg("str", doc="the vfio-user socket qbackend listens on"),
    "size": Arg("str", True, "ivshmem: shared memory, a bare number in bytes (default 4M)"),
    "shm": Arg("str", True, "ivshmem: /dev/shm name; devices with the same name form a peer group"),
    "vectors": Arg("int", True, "ivshmem: MSI-X vectors (default 0: none, INTx only; QEMU 11.1 aborts when a "
                                "device with MSI-X is unplugged)"),
    "peer": Arg("int", True, "ivshmem: IVPosition"),
    "server": Arg("str", True, "ivshmem: also serve the device's group as an ivshmem-server there"),
    "class": Arg("str", True, "device: MODULE:CLASS or path/to/file.py:CLASS"),
    "options": Arg("object", True, "device: keys for the class's constructor (strings)"),
}, doc="serve a new qbackend device and device_add it on the hotplug bus",
    returns="{id, slot, socket, position, vectors}")
ADD_QEMU = CommandSpec("pci-device-add-qemu", {"device": Arg("object", doc="QMP device_add arguments")},
                       doc="device_add any QEMU device on the hotplug bus", returns="{id, slot}")
DEL = CommandSpec("pci-device-del", {
    "id": Arg("str"),
    "force": Arg("bool", True, "unplug even a device the QEMU running is known to abort on (MSI-X on QEMU 11.1)"),
}, doc="device_del a device of the hotplug bus; returns at once, PCI_DEVICE_UNPLUGGED follows")


def register(monitor: QmpMonitor, backend: Backend) -> None:
    def slots() -> PciSlotManager:
        if backend.pci is None:
            raise QmpCommandError("this qbackend has no PCI hotplug slots (it needs the hotplug controller)")
        if backend.qemu_gone is not None:
            raise QmpCommandError(backend.qemu_gone)
        return backend.pci

    async def query(args: dict[str, Any]) -> object:
        return slots().as_json()

    async def add(args: dict[str, Any]) -> object:
        slots()
        if args["driver"] == "device":
            return await add_device(args)
        # vectors: 0 unless given, since a device with MSI-X cannot be unplugged from QEMU 11.1
        keys = [f"socket={args['socket'].replace(',', ',,')}", f"id={args['id'].replace(',', ',,')}"]
        for key in ("size", "shm", "vectors", "peer", "server"):
            if key == "vectors" and key not in args:
                keys.append("vectors=0")
            elif key in args:
                keys.append(f"{key}={str(args[key]).replace(',', ',,')}")
        try:
            opts = IvshmemOptions.parse(",".join(keys))
        except QbackendError as exc:
            raise QmpCommandError(str(exc).replace("--ivshmem", "pci-device-add")) from None
        served = await backend.pci_add_ivshmem(opts, args["id"])
        return {"id": args["id"], "slot": slots().slot_of(args["id"]), "socket": str(served.server.socket_path),
                "position": getattr(served.device, "position", None), "vectors": opts.vectors}

    async def add_device(args: dict[str, Any]) -> object:
        if "class" not in args:
            raise QmpCommandError("Parameter 'class' is missing")
        options = args.get("options", {})
        if not all(isinstance(v, str) for v in options.values()):
            raise QmpCommandError("'options' values are strings, as on the command line")
        opts = DeviceOptions(socket=Path(args["socket"]), cls=args["class"], id=args["id"],
                             kwargs=tuple(options.items()))
        served = await backend.pci_add_device(opts, args["id"])
        msix = served.device.config.msix
        return {"id": args["id"], "slot": slots().slot_of(args["id"]), "socket": str(served.server.socket_path),
                "position": None, "vectors": msix.vectors if msix is not None else 0}

    async def add_qemu(args: dict[str, Any]) -> object:
        device = args["device"]
        if not isinstance(device.get("driver"), str) or not isinstance(device.get("id"), str):
            raise QmpCommandError("'device' needs a string 'driver' and a string 'id'")
        added = await slots().add(device)
        return {"id": added.qdev_id, "slot": added.slot}

    async def delete(args: dict[str, Any]) -> object:
        if slots().slot_of(args["id"]) is None:
            raise device_not_found(f"Device '{args['id']}' not found on the hotplug bus")
        served = backend.devices.get(args["id"])
        if served is not None and served.device.config.msix is not None and not args.get("force", False):
            version = await backend.qemu_version()
            if MSIX_UNPLUG_ABORT.affects(version):
                raise QmpCommandError(
                    f"{args['id']} has MSI-X, and QEMU {'.'.join(map(str, version))} aborts when such a device is "
                    f"unplugged ({MSIX_UNPLUG_ABORT.cite()}); 'force' (pci del --force) unplugs it anyway")
        await slots().request_remove(args["id"])
        return {}

    monitor.register(QUERY, query)
    monitor.register(ADD, add)
    monitor.register(ADD_QEMU, add_qemu)
    monitor.register(DEL, delete)
