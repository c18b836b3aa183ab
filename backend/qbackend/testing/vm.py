"""The booted guests of the pytest plugin's ``qbackend_vm`` fixture.

`boot_factory` makes the factory the fixture hands to tests; a `VM` is
what that factory returns.  Imported by the plugin only when a test asks
for ``qbackend_vm`` (it brings trio, qemu.qmp and the backend with it).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend
from qbackend.devices.api import Device, UserFunction, function_of
from qbackend.devices.faults import DeviceFaults, Fault
from qbackend.machine.launch import vfio_user_device_arg
from qbackend.machine.qmp import SyncQmp
from qbackend.options import DimmOptions, IvshmemOptions, NbdExportOptions
from qbackend.sizes import parse_size
from qbackend.testing.harness import Guest, Harness, wait_attached, wait_until
from qbackend.vfio.function import PciFunction
from qbackend.vfio.trace import MEMORY_EVENTS_KEPT, Tracer
from qbackend.vfio.trace import start as start_trace
from qbackend.vfio.trace import stop as stop_trace

T = TypeVar("T")

# The faults of the booted guests' devices the plugin has not reported yet:
# each device's events above its cursor (DeviceFaults.seq at the last report).
_WATCHED: weakref.WeakKeyDictionary[DeviceFaults, int] = weakref.WeakKeyDictionary()


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

    def faults(self) -> list[Fault]:
        """The faults and stalls of this guest's own devices (`qbackend.devices.Device`)
        since the last report: taken, so that they no longer fail the test (the
        plugin fails a test during which a device faulted, unless it took them)."""
        return _take([f for f in _WATCHED if f in self._faults])

    @property
    def _faults(self) -> list[DeviceFaults]:
        return [served.device.faults for served in self.backend.devices.values()
                if isinstance(served.device, UserFunction)]

    def trace(self, device: Device | PciFunction | str, keep: int | None = None) -> DeviceTrace:
        """Trace one of this guest's devices (the object given to the fixture, or its id) in
        memory: a context manager whose `events` are the trace so far (qbackend.vfio.trace's
        format; the latest `keep`, default MEMORY_EVENTS_KEPT).  Leaving the block stops it;
        `events` stays.  `qbackend.devices.replay.replay(t.events, DeviceClass)` replays it."""
        function = self._function(device)
        tracer = Tracer(function.name, keep=keep or MEMORY_EVENTS_KEPT, header=_header(function))
        start_trace(function, tracer)  # under the device's lock: from any thread
        return DeviceTrace(self, function, tracer)

    def _function(self, device: Device | PciFunction | str) -> PciFunction:
        for served in self.backend.devices.values():
            if device in (served.id, served.device) or (isinstance(device, Device) and
                                                        function_of(device) is served.device):
                return served.device
        raise LookupError(f"{device!r} is not one of this guest's devices")

    def close(self) -> None:
        self.qbackend_qmp.close()


class DeviceTrace:
    """A device's trace in memory, from `VM.trace` (see there)."""

    def __init__(self, vm: VM, function: PciFunction, tracer: Tracer) -> None:
        self._vm, self._function, self._tracer = vm, function, tracer
        self.dropped = 0

    @property
    def events(self) -> list[dict[str, Any]]:
        return self._tracer.events()

    def stop(self) -> list[dict[str, Any]]:
        if self._function.tracer is self._tracer:
            stop_trace(self._function)
        self.dropped = self._tracer.dropped
        return self.events

    def __enter__(self) -> DeviceTrace:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _header(function: PciFunction) -> dict[str, Any]:
    if isinstance(function, UserFunction):
        cls = type(function.device)
        spec = function.origin[0] if function.origin else f"{cls.__module__}:{cls.__qualname__}"
        return {"class": spec, "args": function.origin[1] if function.origin else {}}
    return {}


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
                if isinstance(served.device, UserFunction):
                    served.device.record_accesses()
                    _WATCHED[served.device.faults] = served.device.faults.seq
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


def _take(devices: list[DeviceFaults]) -> list[Fault]:
    out: list[Fault] = []
    for faults in devices:
        seen = _WATCHED.get(faults, 0)
        new = faults.since(seen)
        if new:
            _WATCHED[faults] = new[-1].seq
        out += new
    return out


def take_faults() -> str:
    """For the plugin: what to report of the devices' faults and stalls since the
    last report ("" for none), each as logged, with the device's latest accesses."""
    faults = _take(list(_WATCHED))
    if not faults:
        return ""
    devices = {f.device for f in faults}
    parts = [f"qbackend: {len(faults)} fault(s) of the guest's devices during this test "
             f"(take them with vm.faults() where they are expected):"]
    shown: set[tuple[str, str]] = set()
    for fault in faults:
        if (fault.device, fault.place) in shown and fault.kind != "stalled":
            parts.append(f"(again) {fault.report.splitlines()[0]}")
            continue
        shown.add((fault.device, fault.place))
        parts.append(fault.report.rstrip("\n"))
    accesses = recent_accesses(devices)
    if accesses:
        parts.append(accesses)
    return "\n\n".join(parts)


def recent_accesses(names: set[str] | None = None) -> str:
    """The latest BAR accesses of the booted guests' devices (those named, else all)."""
    parts = []
    for faults in list(_WATCHED):
        if faults.accesses and (names is None or faults.name in names):
            lines = "\n".join(f"  {access}" for access in list(faults.accesses))
            parts.append(f"{faults.name}: its latest {len(faults.accesses)} BAR accesses, oldest first:\n{lines}")
    return "\n".join(parts)
