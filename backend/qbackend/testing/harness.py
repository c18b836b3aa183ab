"""The harness for tests against a real QEMU and a booted guest.

Every guest test module needs the same things: a QEMU whose serial console
is connected before the guest boots (so no console output is lost), a shell
in the guest, the addresses the guest gave a PCI device's BARs, qbackend
served from a thread, and all of it stopped in the reverse order it was
started (QEMU before the backend it is a client of, shared memory last).

It also holds the one way to wait for qbackend: QEMU may *post* a guest's
MMIO or config write to a vfio-user server, so when a guest command such as
`devmem ADDR 32 VALUE` returns, the server may not have handled the write
yet.  A test asserting on the server's side of a guest write waits for it
with `wait_until` (or `wait_equal`), which fails with what it waited for
and the last value it saw.

No pytest here: this is part of the package (pytest is an extra); the
fixtures built on it are the pytest plugin's (qbackend.testing.plugin),
which imports this module only when a test asks for one of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend
from qbackend.machine.console import GuestConsole
from qbackend.machine.launch import GuestImage, QemuInstall, QemuMachine, find_guest, find_qemu
from qbackend.machine.qmp import SyncQmp

T = TypeVar("T")

DEFAULT_WAIT = 10.0  # seconds: generous for TCG on a loaded two-core machine
READY_TIMEOUT = 90.0  # seconds for a TCG guest to boot to its shell
_UNSET = object()


# -- waiting with a deadline -------------------------------------------------------------


def wait_until(predicate: Callable[[], T], timeout: float = DEFAULT_WAIT, what: str = "the condition", *,
               seen: Callable[[], object] | None = None, interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something true; return that.

    For effects that happen asynchronously to the test (a posted guest
    write reaching qbackend, a peer leaving, an fd being closed).  On
    timeout raise AssertionError naming `what` and the last value seen:
    `seen()` if given, else the predicate's last result.
    """
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            last = seen() if seen is not None else result
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last seen: {last!r}")
        time.sleep(interval)


def wait_equal(get: Callable[[], T], expected: T, timeout: float = DEFAULT_WAIT, what: str = "the value") -> T:
    """Poll `get()` until it equals `expected`; the AssertionError on
    timeout shows the last value next to the expected one."""
    last: Any = _UNSET

    def probe() -> bool:
        nonlocal last
        last = get()
        return bool(last == expected)

    wait_until(probe, timeout, f"{what} to be {expected!r}", seen=lambda: last)
    return expected


# -- this process's resources --------------------------------------------------------------


def open_fds() -> int:
    """How many fds this process has open: a leak check across add/remove cycles."""
    return len(os.listdir("/proc/self/fd"))


def open_fd_numbers() -> set[int]:
    """The fds this process has open, to tell which ones closed."""
    return {int(n) for n in os.listdir("/proc/self/fd")}


# The name qbackend gives the memfds of devices' memory (plumbing.shared_memory, devices.api):
# other memfds of the process (libffi's closures are one) come and go on their own.
DEVICE_MEMFD = "/memfd:qbackend-"


def mappings(kind: str = DEVICE_MEMFD) -> int:
    """How many of this process's mappings (/proc/self/maps) are of ``kind``: by default device
    memfds, which is how a device's unnamed shared memory left mapped shows (``/dev/shm/`` for
    named ones)."""
    return sum(kind in line for line in Path("/proc/self/maps").read_text().splitlines())


def memfd_fds() -> int:
    """How many of this process's fds are device memfds (a device's unnamed shared memory)."""
    count = 0
    for name in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{name}").startswith(DEVICE_MEMFD)
        except OSError:
            pass
    return count


def rss_kib() -> int:
    """This process's resident set size in KiB (VmRSS), for memory leak checks."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


# -- the guest shell -----------------------------------------------------------------------


def sysfs_pci(bdf: str) -> str:
    """The sysfs directory of a PCI function, "00:02.0" or "0000:00:02.0"."""
    return f"/sys/bus/pci/devices/{bdf if bdf.count(':') == 2 else '0000:' + bdf}"


class GuestShell:
    """The guest's shell on its serial console, with the helpers the guest
    tests share: run a command, wait for a condition inside the guest, find
    a PCI device and its BARs, and read or write physical memory."""

    def __init__(self, console: GuestConsole, default_timeout: float = 60.0) -> None:
        self.console = console
        self.default_timeout = default_timeout

    def sh(self, cmd: str, timeout: float | None = None) -> str:
        """Run `cmd`; its output, stripped.  A non-zero status raises GuestCommandFailed."""
        return self.console.run_checked(cmd, self.default_timeout if timeout is None else timeout).strip()

    def wait_guest(self, cond: str, timeout: float = DEFAULT_WAIT) -> None:
        """Poll the shell condition `cond` inside the guest (one console round
        trip, not one per try) until it holds; GuestCommandFailed if it never does."""
        tries = max(1, int(timeout * 20))
        # In a subshell: `exit 1` on timeout must fail the command, not end the guest's shell.
        self.sh(f"(i=0; until {cond}; do i=$((i+1)); [ $i -gt {tries} ] && exit 1; usleep 50000; done)",
                timeout=timeout + 30)

    def pci_ids(self, path: str) -> tuple[str, str] | None:
        """(vendor, device) of the function at sysfs `path`, e.g. ("0x1af4", "0x1110"); None if absent."""
        ids = self.sh(f"cat {path}/vendor {path}/device 2>/dev/null || true").split()
        return (ids[0], ids[1]) if len(ids) == 2 else None

    def find_pci(self, vendor: int, device: int) -> list[str]:
        """The sysfs directories of every function with this vendor:device id."""
        out = self.sh(f"for d in /sys/bus/pci/devices/*; do [ \"$(cat $d/vendor):$(cat $d/device)\" = "
                      f"'{vendor:#06x}:{device:#06x}' ] && echo $d; done; true")
        return out.split()

    def bar(self, path: str, n: int) -> tuple[int, int]:
        """(start, size) of BAR `n` of the function at sysfs `path`, as the guest
        assigned it; size 1 (start 0) for a BAR the device does not have."""
        start, end, _flags = (int(x, 16) for x in self.sh(f"sed -n {n + 1}p {path}/resource").split())
        return start, end - start + 1

    def bar_of(self, vendor: int, device: int, n: int = 0) -> int:
        """The address of BAR `n` of the one function with this vendor:device id."""
        paths = self.find_pci(vendor, device)
        assert len(paths) == 1, f"expected one {vendor:04x}:{device:04x} in the guest, found {paths}"
        return self.bar(paths[0], n)[0]

    def devmem(self, addr: int, width: int = 32, value: int | None = None) -> int:
        """Read (value None) or write guest physical memory with busybox devmem.

        A write may be posted: it returns before a vfio-user server has
        handled it (see `wait_until`).  Returns the value read, 0 for a write.
        """
        cmd = f"devmem {addr:#x} {width}" + (f" {value:#x}" if value is not None else "")
        out = self.sh(cmd)
        return int(out, 16) if value is None else 0


# -- QEMU and its guest --------------------------------------------------------------------


class Guest(GuestShell):
    """One QEMU (qbackend.machine.launch) and its guest.

    `start` launches QEMU and connects the console before the guest boots,
    so the boot output is in the transcript when a test fails; `stop` closes
    the monitors and the console, then stops QEMU (idempotent).
    """

    def __init__(self, workdir: Path, name: str = "qemu", **machine: Any) -> None:
        self.name = name
        self.vm = QemuMachine(workdir, name=name, **machine)
        super().__init__(GuestConsole(self.vm.serial_path))
        self._monitors: list[SyncQmp] = []

    def start(self) -> Guest:
        """Launch QEMU and connect the serial console (the guest boots meanwhile)."""
        self.vm.start()
        self.console.connect()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> Guest:
        """Wait for the guest's shell."""
        self.console.wait_ready(timeout=timeout)
        return self

    def monitor(self, user: bool = False) -> SyncQmp:
        """A QMP connection, closed by `stop`: QEMU's first monitor, or with
        `user` the second one (the first is qbackend's when it attached)."""
        qmp = SyncQmp(self.vm.user_qmp_path if user else self.vm.qmp_path)
        self._monitors.append(qmp)
        return qmp

    def kill(self) -> None:
        """SIGKILL QEMU, as a crash would; then clean up as `stop` does."""
        self.console.close()
        if self.vm.proc is not None:
            self.vm.proc.kill()
            self.vm.proc.wait(10)
        self.stop()

    def stop(self) -> None:
        """Close the monitors and the console, then stop QEMU."""
        while self._monitors:
            self._monitors.pop().close()
        self.console.close()
        self.vm.stop()


# -- a module's rig ------------------------------------------------------------------------


class Harness:
    """What a test module started, stopped in reverse order by `close`.

    The usual order of starting is the backend (QEMU connects to its sockets
    at startup), then the guests; so the guests stop first, then the
    backend, then shared memory objects are unlinked.
    """

    def __init__(self, workdir: Path, *, qemu: str | Path | None = None, data: Path | None = None,
                 kernel: Path | None = None, initrd: Path | None = None) -> None:
        """What its guests run, unless a `guest` call says otherwise: the
        qemu-system-x86_64 `qemu` (else ``$QEMU``), and the kernel and
        initrd given (else the guest) from the data directory `data` (else
        `qbackend.machine.data_dir`).  Looked up at the first guest, so a
        Harness that boots none needs none of it."""
        self.workdir = workdir
        self._stack = ExitStack()
        self._qemu, self._data, self._kernel, self._initrd = qemu, data, kernel, initrd
        self._install: QemuInstall | None = None
        self._image: GuestImage | None = None

    def qemu_install(self) -> QemuInstall:
        """The QEMU this harness's guests run (QemuNotFound says what is missing)."""
        if self._install is None:
            self._install = find_qemu(self._qemu, data=self._data)
        return self._install

    def guest_image(self) -> GuestImage:
        """The kernel and initrd this harness's guests boot."""
        if self._image is None:
            if self._kernel and self._initrd:
                self._image = GuestImage(self._kernel, self._initrd)
            else:
                found = find_guest(self._data / "guest" if self._data else None)
                self._image = GuestImage(self._kernel or found.kernel, self._initrd or found.initrd,
                                         "" if self._kernel else found.kernel_version)
        return self._image

    def serve(self, backend: Backend) -> BackendThread:
        """Start serving `backend` in a thread; stopped at close."""
        thread = BackendThread(backend).start()
        self._stack.callback(thread.stop)
        return thread

    def guest(self, name: str = "qemu", *, start: bool = True, ready: bool = True,
              ready_timeout: float = READY_TIMEOUT, **machine: Any) -> Guest:
        """A QEMU (keywords as QemuMachine's); give each guest of a module its
        own name.  Started with `start` (see `start`); without it, for a
        test that needs the guest's socket paths before QEMU runs (to attach
        qbackend to its monitor first), start it later with `start`."""
        if machine.get("qemu") is None:
            machine["qemu"] = self.qemu_install()
        if machine.get("guest") is None:
            machine["guest"] = self.guest_image()
        guest = Guest(self.workdir, name, **machine)
        if start:
            self.start(guest, ready=ready, ready_timeout=ready_timeout)
        return guest

    def start(self, guest: Guest, *, ready: bool = True, ready_timeout: float = READY_TIMEOUT) -> Guest:
        """Start `guest`, stopped at close (before what was started earlier);
        with `ready`, wait for its shell."""
        self._stack.callback(guest.stop)
        guest.start()
        if ready:
            guest.wait_ready(ready_timeout)
        return guest

    def shm_name(self, tag: str = "test") -> str:
        """A fresh POSIX shared memory name, unlinked from /dev/shm at close."""
        name = f"qbackend-{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._stack.callback(lambda: Path("/dev/shm", name).unlink(missing_ok=True))
        return name

    def callback(self, fn: Callable[[], object]) -> None:
        """Run `fn` at close, before what was started before this call."""
        self._stack.callback(fn)

    def close(self) -> None:
        """Stop everything, last started first."""
        self._stack.close()

    def __enter__(self) -> Harness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_attached(backend: Backend, timeout: float = 30.0) -> None:
    """Wait until qbackend has connected to QEMU's monitor (Backend.attach_qmp)."""
    wait_until(lambda: backend.qmp is not None, timeout, "qbackend to attach to QMP")


def start_qbackend(args: list[str], cwd: Path, until: str = "Ctrl-C stops") -> tuple[subprocess.Popen[str], list[str]]:
    """Start `python -m qbackend ARGS` and read its output up to the line holding `until`
    (what `qbackend run` and `serve` print once everything is up); the process and those lines."""
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if until in line:
            break
    return proc, lines
