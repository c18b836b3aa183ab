"""A misbehaving device is reported, never fatal (qbackend.devices.faults):
every callback kind raising, read values that do not fit their access,
stalls, and a stop of `qbackend serve` while a callback never returns;
driven by the raw vfio-user client, no guest.  (tests/test_device_faults_guest.py
does the same from a guest and under the pytest plugin.)"""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qbackend.app.backend_thread import BackendThread
from qbackend.app.device_loader import make_device
from qbackend.app.service import Backend
from qbackend.devices import Bar, Device
from qbackend.devices.api import UserFunction, function_of
from qbackend.errors import UsageError
from qbackend.options import DeviceOptions
from qbackend.protocol import vfio_user as vu
from qbackend.testing.harness import start_qbackend, wait_until
from qbackend.testing.vfio_user_client import VfioUserClient

BAR0 = vu.PciRegion.BAR0
THIS = Path(__file__).resolve()
REPO = THIS.parent.parent


def line_of(text: str) -> int:
    """The line of this file that holds `text` (once)."""
    (n,) = [i for i, line in enumerate(THIS.read_text().splitlines(), 1) if text in line and "line_of" not in line]
    return n


class Faulty(Device):
    """Registers at 0x00..0x0c; the rest misbehaves, each offset its own way."""

    vendor_id, device_id = 0x1234, 0xFA17
    bars = (Bar(0, 4096),)

    def __init__(self) -> None:
        super().__init__()
        self.regs = [0x11, 0x22, 0x33, 0x44]
        self.sleep = 0.0
        self.hooks: list[str] = []
        self.fail_hooks: set[str] = set()
        self.deferred = threading.Event()

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if offset == 0x10:
            raise KeyError("no register at 0x10")  # FAULTY-READ
        if offset == 0x20:
            return 1 << 40
        if offset == 0x24:
            return 0x123456789
        if offset == 0x28:
            return -1
        if offset == 0x2C:
            return "0x5"  # type: ignore[return-value]
        if offset == 0x30:
            time.sleep(self.sleep)  # FAULTY-SLEEP
        return self.regs[offset // 4 % 4]

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if offset == 0x10:
            raise ValueError(f"read-only register, {value:#x} refused")  # FAULTY-WRITE
        if offset == 0x14:
            self.defer(self._job, value)
            return
        self.regs[offset // 4 % 4] = value

    def _job(self, value: int) -> None:
        self.deferred.set()
        raise RuntimeError(f"deferred job {value}")  # FAULTY-DEFER

    def _hook(self, name: str) -> None:
        self.hooks.append(name)
        if name in self.fail_hooks:
            raise RuntimeError(f"{name} failed")  # FAULTY-HOOK

    def reset(self) -> None:
        self._hook("reset")

    def connected(self) -> None:
        self._hook("connected")

    def disconnected(self) -> None:
        self._hook("disconnected")


class Served:
    def __init__(self, device: Faulty, path: Path) -> None:
        self.device = device
        self.backend = Backend()
        served = self.backend.add_served(device, path, dev_id="faulty0")
        assert isinstance(served.device, UserFunction)
        self.function = served.device
        self.server = served.server
        self.path = path

    def client(self) -> VfioUserClient:
        c = VfioUserClient(self.path)
        c.negotiate()
        return c


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    s = Served(Faulty(), tmp_path / "faulty.sock")
    with BackendThread(s.backend):
        yield s


def fault_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "qbackend.devices.faults"]


def test_a_raising_read_answers_all_ones_once_logged_and_the_device_goes_on(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with served.client() as c:
        for _ in range(3):
            assert c.read32(BAR0, 0x10) == 0xFFFFFFFF
            assert c.read32(BAR0, 0x04) == 0x22  # at once, on the same connection
        assert c.read(BAR0, 0x10, 2) == b"\xff\xff"
        assert c.read(BAR0, 0x10, 8) == b"\xff" * 8
    logs = fault_logs(caplog)
    assert len(logs) == 1, logs  # once per place, whatever the access
    (text,) = logs
    assert text.startswith("faulty0: bar_read(bar=0, offset=0x10, size=4) raised KeyError")
    assert f"{THIS}:{line_of('FAULTY-READ')}" in text and "Traceback" in text
    assert "vfio_user.py" not in text and "api.py" not in text  # the user's frames only
    assert served.function.faults.faults == 5
    counts = served.server.counts()
    assert counts["faults"] == 5 and counts["internal_errors"] == 0 and served.server.connections_served == 1


@pytest.mark.parametrize(("offset", "shown"), [(0x20, "0x10000000000"), (0x24, "0x123456789"), (0x28, "-0x1"),
                                               (0x2C, "'0x5'")])
def test_a_value_that_does_not_fit_its_read_is_a_fault_not_a_truncation(
        served: Served, caplog: pytest.LogCaptureFixture, offset: int, shown: str) -> None:
    with served.client() as c:
        assert c.read32(BAR0, offset) == 0xFFFFFFFF
        assert c.read32(BAR0, 0x08) == 0x33
    (text,) = fault_logs(caplog)
    assert f"returned {shown}, which is not a 4-byte value" in text
    assert f"{THIS}:{line_of('def bar_read(self, bar: int, offset: int, size: int) -> int:')}" in text
    assert served.function.faults.faults == 1


def test_accesses_of_odd_sizes_are_split(served: Served) -> None:
    with served.client() as c:
        assert c.read(BAR0, 0x00, 3) == b"\x11\x00\x11"  # a 2-byte piece at 0, a 1-byte one at 2
        assert c.read(BAR0, 0x00, 12) == bytes.fromhex("11000000 22000000 33000000")
    assert served.function.faults.faults == 0


def test_a_raising_write_is_dropped(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    with served.client() as c:
        c.write32(BAR0, 0x10, 0xABCD)
        c.write32(BAR0, 0x00, 0x99)
        assert c.read32(BAR0, 0x00) == 0x99
    (text,) = fault_logs(caplog)
    assert "bar_write(bar=0, offset=0x10, size=4, value=0xabcd) raised ValueError" in text
    assert f"{THIS}:{line_of('FAULTY-WRITE')}" in text and "the write was dropped" in text


def test_hooks_and_deferred_jobs_that_raise(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    served.device.fail_hooks = {"connected", "reset", "disconnected"}
    with served.client() as c:
        c.call(vu.Command.DEVICE_RESET)  # answered as a success
        c.write32(BAR0, 0x14, 7)
        assert served.device.deferred.wait(5)
        assert c.read32(BAR0, 0x00) == 0x11
    wait_until(lambda: served.device.hooks[-1:] == ["disconnected"], 5, "disconnected()")
    wait_until(lambda: served.function.faults.faults == 4, 5, "four faults")
    logs = fault_logs(caplog)
    hook = [text for text in logs if f"{THIS}:{line_of('FAULTY-HOOK')}" in text]
    assert len(hook) == 1 and hook[0].startswith("faulty0: connected() raised RuntimeError: connected failed")
    assert [(f.call, f.place) for f in served.function.faults.events if f.call != "deferred Faulty._job()"] == [
        (call, f"{THIS}:{line_of('FAULTY-HOOK')}") for call in ("connected()", "reset()", "disconnected()")]
    assert any("deferred Faulty._job() raised RuntimeError: deferred job 7" in text
               and f"{THIS}:{line_of('FAULTY-DEFER')}" in text for text in logs)
    with served.client() as c:  # a new client is served as ever
        assert c.read32(BAR0, 0x04) == 0x22


def test_a_stalled_read_has_its_stack_logged_and_is_answered_when_it_returns(
        served: Served, caplog: pytest.LogCaptureFixture) -> None:
    served.function.faults.stall_after = 0.3
    served.device.sleep = 1.2
    with served.client() as c:
        start = time.monotonic()
        assert c.read32(BAR0, 0x30) == 0x11
        assert time.monotonic() - start >= 1.2
        served.device.sleep = 0
        assert c.read32(BAR0, 0x30) == 0x11
    wait_until(lambda: any("the stuck callback has returned" in text for text in fault_logs(caplog)), 2,
               "the end of the stall in the log")
    (stall,) = [text for text in fault_logs(caplog) if "has been running" in text]
    assert stall.startswith("faulty0: bar_read has been running for 0.")
    assert f'File "{THIS}", line {line_of("FAULTY-SLEEP")}, in bar_read' in stall
    assert served.function.faults.stalls == 1 and served.function.faults.faults == 0
    (event,) = served.function.faults.events
    assert event.kind == "stalled" and event.place == f"{THIS}:{line_of('FAULTY-SLEEP')}"


def test_accesses_are_recorded_on_request(served: Served) -> None:
    function = served.function
    with served.client() as c:
        c.write32(BAR0, 0x00, 5)
        assert function.faults.accesses is None
        function.record_accesses(4)
        c.write32(BAR0, 0x04, 6)
        c.read32(BAR0, 0x04)
        c.read32(BAR0, 0x10)
        c.write(BAR0, 0x08, b"\x01\x02")
    assert function.faults.accesses is not None
    assert [str(a) for a in function.faults.accesses] == [
        "write bar0 0x00004 size 4: 0x00000006", "read  bar0 0x00004 size 4: 0x00000006",
        "read  bar0 0x00010 size 4: fault", "write bar0 0x00008 size 2: 0x0201"]


def test_the_stall_key(tmp_path: Path) -> None:
    path = tmp_path / "dev.py"
    path.write_text("from qbackend.devices import Device\nclass D(Device):\n    pass\n")
    device = make_device(DeviceOptions.parse(f"socket=s,class={path}:D,stall=0.25"))
    assert function_of(device).faults.stall_after == 0.25
    assert function_of(make_device(DeviceOptions.parse(f"socket=s,class={path}:D"))).faults.stall_after == 1.0
    for bad in ("0", "-1", "soon"):
        with pytest.raises(UsageError, match=f"stall={bad}: seconds"):
            make_device(DeviceOptions.parse(f"socket=s,class={path}:D,stall={bad}"))


STUCK_DEVICE = """
    import threading
    from qbackend.devices import Bar, Device

    class Stuck(Device):
        bars = (Bar(0, 4096),)

        def bar_read(self, bar, offset, size):
            if offset == 0x40:
                threading.Event().wait()  # STUCK-HERE
            return 0x1234
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_serve_stops_whatever_a_callback_does(tmp_path: Path, sig: signal.Signals) -> None:
    (tmp_path / "stuck.py").write_text(textwrap.dedent(STUCK_DEVICE))
    sock = tmp_path / f"stuck-{uuid.uuid4().hex[:6]}.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "serve", "--device",
                             f"socket={sock},class={tmp_path}/stuck.py:Stuck,id=stuck0,stall=0.5"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or ()), daemon=True)
    reader.start()
    c = None
    try:
        wait_until(lambda: any("Ctrl-C stops" in line for line in output), 30, "serve to be up")
        c = VfioUserClient(sock)
        c.negotiate()
        assert c.read32(BAR0, 0) == 0x1234
        c.send(vu.Command.REGION_READ, vu.REGION_ACCESS.pack(0x40, BAR0, 4))  # never answered
        wait_until(lambda: any("STUCK-HERE" in line for line in output), 10, "the stuck call's stack")
        start = time.monotonic()
        proc.send_signal(sig)
        code = proc.wait(10)
        took = time.monotonic() - start
    finally:
        if c is not None:
            c.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    if proc.stdout is not None:
        proc.stdout.close()
    text = "".join(output)
    assert took < 5, text
    assert code in (0, 128 + sig), text
    assert not sock.exists(), text
    assert "stuck0: bar_read has been running for" in text and "Traceback" not in text
    assert f"{signal.Signals(sig).name}: stopping" in text


@pytest.mark.parametrize("second_signal", [False, True])
def test_a_stop_held_by_a_callback_ends_in_a_forced_exit(tmp_path: Path, second_signal: bool) -> None:
    """The last resort (app.lifecycle): disconnected() never returns, so the
    connection's close never ends; 4 s after Ctrl-C (or at a second one) the
    process says what holds it, removes its socket and exits 130."""
    (tmp_path / "stuck.py").write_text(textwrap.dedent(STUCK_DEVICE).replace(
        "    def bar_read", "    def disconnected(self):\n        threading.Event().wait()\n\n    def bar_read"))
    sock = tmp_path / "stuck.sock"
    proc, _ = start_qbackend(["serve", "--device", f"socket={sock},class={tmp_path}/stuck.py:Stuck,id=stuck0"],
                             tmp_path)
    try:
        with VfioUserClient(sock) as c:
            c.negotiate()
        time.sleep(1.5)  # disconnected() hangs in its thread, seen by the stall watcher
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        if second_signal:
            time.sleep(0.5)
            proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=15)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, out
    assert not sock.exists(), out
    if second_signal:
        assert took < 2 and "SIGINT: a second signal; exiting now" in out, out
    else:
        assert took < 6 and "SIGINT: still stopping after 4 s, held by stuck0: disconnected" in out, out
