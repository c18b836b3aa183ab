"""qbackend's pytest plugin: booted-guest tests of your own devices and drivers.

Installing ``qbackend[pytest]`` registers it (entry point ``pytest11``), so
it loads in every pytest run of that environment: at load it only adds its
options, its marker and its fixtures; the harness (trio, qemu.qmp, the
backend) is imported when a test first asks for a fixture, and nothing in
the process's environment is changed.  A test module asks for a guest once
and its tests share it::

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

A device of a guest that raises in a callback, returns a value that does
not fit its access, or stalls (qbackend.devices.faults) fails the test
during which it did, with its traceback (or stack) and its latest BAR
accesses in the report, even if the guest took the all-ones it read in
stride; a test that provokes faults on purpose takes them with
``vm.faults()``, and they no longer count against it.

The fixtures' own documentation (``pytest --fixtures -v``) says what they
give.  Command-line options: ``--qbackend-qemu`` (a qemu-system-x86_64,
else ``$QEMU``, else the provisioned one), ``--qbackend-data-dir`` (where
``qbackend setup`` provisioned QEMU and the guest, else
``$QBACKEND_DATA_DIR``, else qbackend's default), ``--qbackend-kernel``
and ``--qbackend-initrd`` (else the data directory's guest).  A QEMU or
guest that cannot be found fails the test that needed it with one line
saying what to do.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from qbackend.testing.harness import Harness
    from qbackend.testing.vm import VM

OPTIONS_HINT = ("pytest options: --qbackend-qemu PATH, --qbackend-data-dir DIR (or $QBACKEND_DATA_DIR), "
                "--qbackend-kernel PATH, --qbackend-initrd PATH")


@dataclass(frozen=True)
class Settings:
    """What the command line chose; None: qbackend's default (``$QEMU``,
    ``$QBACKEND_DATA_DIR``, the data directory's guest)."""

    qemu: str | None = None
    data: Path | None = None
    kernel: Path | None = None
    initrd: Path | None = None


SETTINGS = pytest.StashKey[Settings]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("qbackend", "qbackend booted-guest tests")
    group.addoption("--qbackend-qemu", metavar="PATH",
                    help="qemu-system-x86_64 to use (default: $QEMU, else the one `qbackend setup` provisioned)")
    group.addoption("--qbackend-data-dir", metavar="DIR",
                    help="where `qbackend setup` provisioned QEMU and the guest (default: $QBACKEND_DATA_DIR, "
                         "else qbackend's data directory)")
    group.addoption("--qbackend-kernel", metavar="PATH", help="the guest kernel (default: the provisioned guest)")
    group.addoption("--qbackend-initrd", metavar="PATH", help="the guest initramfs (default: the provisioned guest)")


def _path_option(config: pytest.Config, name: str, *, folder: bool = False) -> Path | None:
    value = config.getoption(name)
    if not value:
        return None
    path = Path(value).expanduser().absolute()
    if not (path.is_dir() if folder else path.is_file()):
        raise pytest.UsageError(f"{name} {value}: no such {'folder' if folder else 'file'}")
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "guest: boots a QEMU guest")
    qemu = config.getoption("--qbackend-qemu")
    config.stash[SETTINGS] = Settings(
        qemu=str(qemu) if qemu else None,
        data=_path_option(config, "--qbackend-data-dir", folder=True),
        kernel=_path_option(config, "--qbackend-kernel"),
        initrd=_path_option(config, "--qbackend-initrd"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    """A missing QEMU or guest is a one-line report (what to do), not a traceback.

    A device of a ``qbackend_vm`` guest that faulted or stalled during a
    test's setup, call or teardown (qbackend.devices.faults) fails it, with
    the device's traceback or stack and its latest accesses in the report,
    whatever the guest made of the value; faults a test took with
    ``vm.faults()`` do not.  A failed test's report shows the latest accesses
    of the guest's devices."""
    outcome = yield
    launch = sys.modules.get("qbackend.machine.launch")  # never imported here: only if a fixture did
    if call.excinfo is not None and launch is not None and isinstance(call.excinfo.value, launch.QemuNotFound):
        outcome.get_result().longrepr = f"qbackend: {call.excinfo.value} ({OPTIONS_HINT})"
    vm = sys.modules.get("qbackend.testing.vm")  # the same: only if qbackend_vm booted a guest
    if vm is None:
        return
    report = outcome.get_result()
    faults = vm.take_faults()
    if faults and report.passed:
        report.outcome = "failed"
        report.longrepr = faults
    elif faults and report.failed:
        report.sections.append(("qbackend device faults", faults))
    elif report.failed:
        accesses = vm.recent_accesses()
        if accesses:
            report.sections.append(("qbackend device accesses", accesses))


@pytest.fixture(scope="module")
def qbackend_harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """qbackend's test harness (module-scoped), to wire QEMU, guests and
    qbackend by hand: a `qbackend.testing.harness.Harness` with a fresh
    ``workdir`` and the QEMU and guest the command line chose.  All it
    started stops, last first, after the module's tests.

    ``serve(backend)`` runs a `qbackend.app.service.Backend` in a thread;
    ``guest(name, start=False, ...)`` makes a QEMU (keywords as
    `qbackend.machine.launch.QemuMachine`'s) and ``start(guest)`` boots it
    to its shell; ``shm_name()`` a POSIX shared memory name unlinked at the
    end; ``callback(fn)`` runs ``fn`` at the end.  ``qbackend_vm`` is built
    on it.
    """
    from qbackend.testing.harness import Harness

    settings = request.config.stash[SETTINGS]
    with Harness(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]), qemu=settings.qemu,
                 data=settings.data, kernel=settings.kernel, initrd=settings.initrd) as harness:
        yield harness


@pytest.fixture(scope="module")
def qbackend_vm(qbackend_harness: Harness) -> Callable[..., VM]:
    """A factory of booted guests with qbackend's devices (module-scoped):
    ``qbackend_vm(devices=[...], dimms=[...], disks=[...], machine="pc",
    memory="512M", append="", extra_args=[...])`` boots QEMU with a busybox
    guest and returns a VM (``sh``, ``pci_devices``, ``qmp``,
    ``qbackend_qmp``, ``wait_until``...); call it from a module-scoped
    fixture so the module's tests share the guest.  All it started stops
    after the module's tests.  ``pytest --fixtures -v`` tells the rest.

    - ``devices``: your `qbackend.devices.Device` instances, or built-in
      ones given as `qbackend.options.IvshmemOptions`, each attached over
      vfio-user;
    - ``dimms``: DIMM slots (``"id=d1,size=128M"`` or `DimmOptions`) behind
      qbackend's hotplug controller (``populated=on`` ones cold-plugged);
    - ``disks``: image paths (``.qed`` is QED, anything else raw) that
      qbackend exports over NBD, attached as virtio-blk (``/dev/vda``...);
    - ``machine``: ``pc`` or ``q35``; ``append``: more kernel command line;
      ``extra_args``: more QEMU arguments.

    A VM has ``sh(cmd)`` (the output; GuestCommandFailed with the output on
    a non-zero status), ``wait_guest(cond)`` (a shell condition),
    ``pci_devices(vendor, device)`` (each with ``bar(n).address`` and
    ``.size``), ``qmp`` (QEMU's own monitor, a second one qbackend does
    not use), ``qbackend_qmp`` (qbackend's QMP monitor), ``backend``,
    ``call(fn, *args)`` (run code in the backend's thread) and
    ``wait_until(predicate, timeout, what)``: QEMU may post a guest's MMIO
    write, so check its effect on a device by waiting with a deadline.
    """
    from qbackend.testing.vm import boot_factory

    return boot_factory(qbackend_harness)
