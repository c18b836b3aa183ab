"""qbackend's pytest plugin: booted-guest tests of your own devices and drivers.

Installing qbackend registers it (entry point ``pytest11``).  A test module
asks for a guest once and its tests share it::

    import pytest
    from qbackend.devices import Bar, Device

    class Hello(Device):
        vendor_id, device_id = 0x1234, 0xBEEF
        bars = (Bar(0, 4096),)

        def bar_read(self, bar, offset, size):
            return 0x12345678

    @pytest.fixture(scope="module")
    def vm(qbackend_vm):
        return qbackend_vm(devices=[Hello()])

    def test_the_guest_reads_the_register(vm):
        (dev,) = vm.pci_devices(0x1234, 0xBEEF)
        assert vm.sh(f"devmem {dev.bar(0).address:#x} 32") == "0x12345678"

Fixtures:

- ``qbackend_vm``: a factory, module-scoped: ``qbackend_vm(devices=[...],
  machine="pc", memory="512M", dimms=[...], disks=[...], append="")`` boots
  QEMU with a busybox guest, qbackend's devices (your `Device` instances,
  or built-in ones given as `IvshmemOptions`) attached over vfio-user,
  DIMM slots (``"id=d1,size=128M"``) behind qbackend's hotplug
  controller, and disks (image paths, QED or raw) exported by qbackend
  over NBD and attached as virtio-blk.  It returns a `VM`; everything it
  started stops when the module's tests are done.
- ``qbackend_harness``: the lower-level `Harness` (module-scoped) the
  factory is built on, for tests that wire QEMU and qbackend by hand.

A `VM` has ``sh(cmd)`` (the output; raises with the output on a non-zero
status), ``wait_guest(cond)``, ``pci_devices(vendor, device)``, ``qmp``
(QEMU's own monitor, a second one qbackend does not use), ``qbackend_qmp``
(qbackend's QMP monitor), ``backend`` and ``call(fn)`` (run code in the
backend's thread).  ``wait_until(predicate, timeout, what)`` from
`qbackend.testing.harness` waits with a deadline: a guest's MMIO write
may be posted, so check its effect on a device that way.

Command-line options: ``--qbackend-qemu`` (a qemu-system-x86_64, else
``$QEMU`` or the provisioned one), ``--qbackend-kernel`` and
``--qbackend-initrd`` (else the guest ``qbackend setup`` / ``make setup``
built), ``--qbackend-data-dir``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend
from qbackend.devices.api import Device
from qbackend.machine.data_dir import set_data_dir
from qbackend.machine.launch import GuestImage, find_guest, vfio_user_device_arg
from qbackend.machine.qmp import SyncQmp
from qbackend.options import DimmOptions, IvshmemOptions, NbdExportOptions
from qbackend.sizes import parse_size
from qbackend.testing.harness import Guest, Harness, wait_attached, wait_until
from qbackend.vfio.function import PciFunction

T = TypeVar("T")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qbackend", "qbackend booted-guest tests")
    group.addoption("--qbackend-qemu", metavar="PATH",
                    help="qemu-system-x86_64 to use (default: $QEMU, else the one `qbackend setup` provisioned)")
    group.addoption("--qbackend-kernel", metavar="PATH", help="the guest kernel (default: the provisioned guest)")
    group.addoption("--qbackend-initrd", metavar="PATH", help="the guest initramfs (default: the provisioned guest)")
    group.addoption("--qbackend-data-dir", metavar="DIR", help="where provisioned QEMU and the guest live")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: boots a QEMU guest")
    qemu = config.getoption("--qbackend-qemu")
    if qemu:
        os.environ["QEMU"] = str(qemu)
    data_dir = config.getoption("--qbackend-data-dir")
    if data_dir:
        set_data_dir(Path(data_dir))


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


def _guest_image(config: pytest.Config) -> GuestImage | None:
    kernel, initrd = config.getoption("--qbackend-kernel"), config.getoption("--qbackend-initrd")
    if not kernel and not initrd:
        return None
    default = find_guest() if not (kernel and initrd) else None
    return GuestImage(Path(kernel) if kernel else default.kernel,  # type: ignore[union-attr]
                      Path(initrd) if initrd else default.initrd)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def qbackend_harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """A Harness for this module: what it starts stops when the module's tests are done."""
    with Harness(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])) as harness:
        yield harness


@pytest.fixture(scope="module")
def qbackend_vm(request: pytest.FixtureRequest, qbackend_harness: Harness) -> Iterator[Callable[..., VM]]:
    """A factory of booted guests with qbackend's devices (see the plugin's documentation)."""
    made: list[VM] = []
    image = _guest_image(request.config)

    def boot(devices: Sequence[Device | PciFunction | IvshmemOptions] = (), *, machine: str = "pc",
             memory: str = "512M", dimms: Sequence[str | DimmOptions] = (), disks: Sequence[str | Path] = (),
             append: str = "", extra_args: Sequence[str] = ()) -> VM:
        work = qbackend_harness.workdir / f"vm{len(made)}"
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
        guest = qbackend_harness.guest(f"vm{len(made)}", start=False, machine=machine, memory=memory,
                                       slots=len(slot_opts), maxmem="4G" if slot_opts else None,
                                       append=append, extra_args=[*extra, *extra_args], guest=image)
        backend.attach_qmp(guest.vm.qmp_path)
        thread = qbackend_harness.serve(backend)
        qbackend_harness.start(guest)
        wait_attached(backend)
        vm = VM(guest, backend, thread, monitor)
        qbackend_harness.callback(vm.close)
        made.append(vm)
        return vm

    yield boot
