"""The booted guests of the pytest plugin's ``qbackend_vm`` fixture.

`boot_factory` makes the factory the fixture hands to tests; a `VM` is
what that factory returns.  Imported by the plugin only when a test asks
for ``qbackend_vm`` (it brings trio, qemu.qmp and the backend with it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend
from qbackend.devices.api import Device
from qbackend.machine.launch import vfio_user_device_arg
from qbackend.machine.qmp import SyncQmp
from qbackend.options import DimmOptions, IvshmemOptions, NbdExportOptions
from qbackend.sizes import parse_size
from qbackend.testing.harness import Guest, Harness, wait_attached, wait_until
from qbackend.vfio.function import PciFunction

T = TypeVar("T")


@dataclass(frozen=True)
class BarInfo:
    address: int
    size: int


@dataclass(frozen=True)
class PciDevice:
    """A PCI device as the guest's sysfs shows it."""

    path: str  # /sys/bus/pci/devices/0000:00:04.0
    vendor: int
    device: int
    guest: Guest

    def bar(self, n: int) -> BarInfo:
        address, size = self.guest.bar(self.path, n)
        return BarInfo(address, size)


class VM:
    """A booted guest with qbackend's devices, from the ``qbackend_vm`` fixture."""

    def __init__(self, guest: Guest, backend: Backend, thread: BackendThread, monitor: Path) -> None:
        self.guest = guest
        self.backend = backend
        self.thread = thread
        self.qmp: SyncQmp = guest.monitor(user=True)
        self.qbackend_qmp = SyncQmp(monitor)
        self._monitor = monitor

    def sh(self, cmd: str, timeout: float = 60) -> str:
        """Run a shell command in the guest; its output, or GuestCommandFailed with the output."""
        return self.guest.sh(cmd, timeout)

    def wait_guest(self, cond: str, timeout: float = 10) -> None:
        """Wait until a shell condition holds in the guest (``[ -e /dev/vda ]``)."""
        self.guest.wait_guest(cond, timeout)

    def pci_devices(self, vendor: int, device: int) -> list[PciDevice]:
        return [PciDevice(path, vendor, device, self.guest) for path in self.guest.find_pci(vendor, device)]

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn(*args)`` in the backend's trio thread (to look at or change device state)."""
        return self.thread.call(fn, *args)

    def wait_until(self, predicate: Callable[[], T], timeout: float = 10, what: str = "the condition") -> T:
        return wait_until(predicate, timeout, what)

    def close(self) -> None:
        self.qbackend_qmp.close()


def boot_factory(harness: Harness) -> Callable[..., VM]:
    """The ``qbackend_vm`` factory: each call boots one guest in `harness`."""
    made: list[VM] = []

    def boot(devices: Sequence[Device | PciFunction | IvshmemOptions] = (), *, machine: str = "pc",
             memory: str = "512M", dimms: Sequence[str | DimmOptions] = (), disks: Sequence[str | Path] = (),
             append: str = "", extra_args: Sequence[str] = ()) -> VM:
        # QEMU and the guest first: what is missing is said before anything starts.
        harness.qemu_install()
        harness.guest_image()
        work = harness.workdir / f"vm{len(made)}"
        work.mkdir(parents=True, exist_ok=True)
        backend = Backend()
        extra: list[str] = []
        for n, dev in enumerate(devices):
            if isinstance(dev, IvshmemOptions):
                served = backend.add_ivshmem(dev)
            else:
                served = backend.add_served(dev, work / f"dev{n}.sock", dev_id=f"dev{n}")
            extra += ["-device", vfio_user_device_arg(served.id, served.server.socket_path)]
        slot_opts = [d if isinstance(d, DimmOptions) else DimmOptions.parse(d) for d in dimms]
        if slot_opts:
            controller = backend.add_hotplug_controller(work / "hotplug.sock", slot_opts, machine=machine,
                                                        ram_size=parse_size(memory, "memory", default_unit="M"),
                                                        slots=len(slot_opts))
            extra += ["-device", vfio_user_device_arg(controller.id, controller.server.socket_path)]
            assert backend.dimms is not None
            extra += backend.dimms.cold_plug_args()
        if disks:
            nbd_sock = work / "nbd.sock"
            exports = [NbdExportOptions(name=f"disk{n}", image=Path(p), format="qed" if str(p).endswith(".qed") else "raw")
                       for n, p in enumerate(disks)]
            backend.add_nbd(exports, nbd_sock)
            for n, _ in enumerate(exports):
                extra += ["-blockdev", f"driver=nbd,node-name=disk{n},server.type=unix,server.path={nbd_sock},"
                                       f"export=disk{n}",
                          "-device", f"virtio-blk-pci,drive=disk{n},id=vd{n}"]
        monitor = work / "qbackend-qmp.sock"
        backend.enable_control(monitor)
        guest = harness.guest(f"vm{len(made)}", start=False, machine=machine, memory=memory,
                              slots=len(slot_opts), maxmem="4G" if slot_opts else None,
                              append=append, extra_args=[*extra, *extra_args])
        backend.attach_qmp(guest.vm.qmp_path)
        thread = harness.serve(backend)
        harness.start(guest)
        wait_attached(backend)
        vm = VM(guest, backend, thread, monitor)
        harness.callback(vm.close)
        made.append(vm)
        return vm

    return boot
