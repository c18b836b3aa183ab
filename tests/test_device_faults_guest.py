"""A misbehaving device seen from a booted guest (qbackend.devices.faults):
a bar_read that raises or returns a value too wide for its access reads all
ones in the guest, and the very next access works (no 5 s stall); the same
device under the pytest plugin fails the test during which it faulted, with
its traceback; a bar_read that never returns has its stack logged, and
`qbackend serve` still stops at Ctrl-C within 5 s, its socket removed.
(tests/test_device_faults.py covers each callback kind without a guest.)"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from qbackend.devices import Bar, Device
from qbackend.machine.data_dir import data_dir
from qbackend.machine.launch import vfio_user_device_arg
from qbackend.testing.harness import Harness, start_qbackend, wait_until

pytestmark = pytest.mark.guest

THIS = Path(__file__).resolve()
VENDOR, DEVICE = 0x1234, 0xFA18


def line_of(text: str) -> int:
    (n,) = [i for i, line in enumerate(THIS.read_text().splitlines(), 1) if text in line and "line_of" not in line]
    return n


class Faulty(Device):
    vendor_id, device_id = VENDOR, DEVICE
    bars = (Bar(0, 4096),)

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        if offset == 0x10:
            raise IndexError("no register at 0x10")  # GUEST-FAULT
        if offset == 0x20:
            return 1 << 40
        return 0xC0FFEE00 | offset


@pytest.fixture(scope="module")
def vm(qbackend_vm: Any) -> Any:
    return qbackend_vm(devices=[Faulty()])


@pytest.fixture(scope="module")
def bar0(vm: Any) -> int:
    (dev,) = vm.pci_devices(VENDOR, DEVICE)
    address: int = dev.bar(0).address
    return address


def test_a_raising_read_reads_all_ones_and_the_next_access_works_at_once(
        vm: Any, bar0: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    assert vm.sh(f"devmem {bar0 + 0x04:#x} 32") == "0xC0FFEE04"
    start = time.monotonic()
    out = vm.sh(f"devmem {bar0 + 0x10:#x} 32; devmem {bar0 + 0x08:#x} 32")
    took = time.monotonic() - start
    assert out.split() == ["0xFFFFFFFF", "0xC0FFEE08"]
    assert took < 2, f"the two reads took {took:.1f} s"
    (fault,) = vm.faults()  # taken: expected here
    assert fault.kind == "raised" and fault.place == f"{THIS}:{line_of('GUEST-FAULT')}"
    logs = [r.getMessage() for r in caplog.records if r.name == "qbackend.devices.faults"]
    (text,) = logs
    assert text.startswith("dev0: bar_read(bar=0, offset=0x10, size=4) raised IndexError: no register at 0x10 at "
                           f"{THIS}:{line_of('GUEST-FAULT')}")
    assert f'File "{THIS}", line {line_of("GUEST-FAULT")}, in bar_read' in text
    assert vm.sh(f"devmem {bar0 + 0x04:#x} 32") == "0xC0FFEE04"  # still connected


def test_a_value_too_wide_for_its_read_is_reported_not_truncated(vm: Any, bar0: int) -> None:
    assert vm.sh(f"devmem {bar0 + 0x20:#x} 32") == "0xFFFFFFFF"  # not 0x00000000, 1 << 40 cut to 32 bits
    (fault,) = vm.faults()
    assert fault.kind == "bad value" and "returned 0x10000000000, which is not a 4-byte value" in fault.report
    counts = vm.backend.devices["dev0"].server.counts()
    assert counts["faults"] == 2 and counts["internal_errors"] == 0


PLUGIN_TESTS = """
    import pytest
    from qbackend.devices import Bar, Device

    class Broken(Device):
        vendor_id, device_id = 0x1234, 0xBAD0
        bars = (Bar(0, 4096),)

        def bar_read(self, bar, offset, size):
            if offset == 8:
                return {}[offset]  # BROKEN-HERE
            return 0x1234

    @pytest.fixture(scope="module")
    def vm(qbackend_vm):
        return qbackend_vm(devices=[Broken()])

    def base(vm):
        (dev,) = vm.pci_devices(0x1234, 0xBAD0)
        return dev.bar(0).address

    def test_fine(vm):
        assert vm.sh(f"devmem {base(vm):#x} 32") == "0x00001234"

    def test_ignores_what_it_read(vm):
        vm.sh(f"devmem {base(vm) + 8:#x} 32")

    def test_fails_on_its_own(vm):
        assert vm.sh(f"devmem {base(vm) + 4:#x} 32") == "0x00005678"
"""


def test_the_plugin_fails_the_test_during_which_a_device_faulted(tmp_path: Path) -> None:
    (tmp_path / "test_broken.py").write_text(textwrap.dedent(PLUGIN_TESTS))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_CURRENT_TEST")}
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "qbackend.testing.plugin", "-p",
                             "no:cacheprovider", "-rA", f"--qbackend-data-dir={data_dir()}", "test_broken.py"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out
    assert "PASSED test_broken.py::test_fine" in out
    assert "FAILED test_broken.py::test_ignores_what_it_read" in out
    assert "FAILED test_broken.py::test_fails_on_its_own" in out
    where = f'{tmp_path / "test_broken.py"}", line {line_of("BROKEN-HERE") - line_of("PLUGIN_TESTS = ") + 1}'
    assert "dev0: bar_read(bar=0, offset=0x8, size=4) raised KeyError: 8" in out
    assert f'File "{where}, in bar_read' in out
    assert "dev0: its latest" in out and "read  bar0 0x00008 size 4: fault" in out  # the device's last accesses
    assert "read  bar0 0x00004 size 4: 0x00001234" in out  # in the report of the test that failed by itself


STUCK = """
    import threading
    from qbackend.devices import Bar, Device

    class Stuck(Device):
        vendor_id, device_id = 0x1234, 0x5700
        bars = (Bar(0, 4096),)

        def bar_read(self, bar, offset, size):
            if offset == 0x40:
                threading.Event().wait()  # STUCK-FOREVER
            return 0x1234
"""


def test_a_stuck_read_is_logged_and_ctrl_c_still_stops_serve(harness: Harness, tmp_path: Path) -> None:
    (tmp_path / "stuck.py").write_text(textwrap.dedent(STUCK))
    sock = tmp_path / "stuck.sock"
    proc, lines = start_qbackend(["serve", "--device", f"socket={sock},class={tmp_path}/stuck.py:Stuck,id=stuck0"],
                                 tmp_path)
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        guest = harness.guest("stuck", extra_args=["-device", vfio_user_device_arg("stuck0", sock)])
        base = guest.bar_of(0x1234, 0x5700, 0)
        assert guest.sh(f"devmem {base:#x} 32") == "0x00001234"
        guest.sh(f"devmem {base + 0x40:#x} 32 > /tmp/stuck.out 2>&1 &")  # the vCPU waits for the reply
        start = time.monotonic()
        wait_until(lambda: any("STUCK-FOREVER" in line for line in lines), 5, "the stuck call's stack")
        assert time.monotonic() - start < 2.5  # the threshold (1 s), the watcher's period, the console
        text = "".join(lines)
        assert "stuck0: bar_read has been running for 1." in text
        start = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(10)
        took = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(5)
        proc.stdout.close()
    text = "".join(lines)
    assert took < 5, text
    assert proc.returncode in (0, 130), text
    assert not sock.exists(), text
    assert "stuck0: served native_accesses" in text and "stalls 1" in text
