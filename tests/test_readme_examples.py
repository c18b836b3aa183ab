"""The README's two examples, run as written: its own device served with
`qbackend serve --device` and driven over vfio-user, and its booted-guest
test run by pytest in a folder outside the repository against the installed
package (and, with a wrong expected value, failing)."""

from __future__ import annotations

import os
import re
import select
import subprocess
import sys
from pathlib import Path

import pytest

from qbackend.protocol import vfio_user as vu
from qbackend.testing.harness import wait_until
from qbackend.testing.vfio_user_client import VfioUserClient

REPO = Path(__file__).resolve().parent.parent
BLOCKS = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)


def block(first_line: str) -> str:
    found = [b for b in BLOCKS if first_line in b.splitlines()[:2]]
    assert len(found) == 1, f"README has no single python block starting with {first_line!r}"
    assert len(found[0].rstrip("\n").splitlines()) < 30, "the README promises examples under 30 lines"
    return found[0]


def test_write_your_own_device(tmp_path: Path) -> None:
    (tmp_path / "mydevice.py").write_text(block("# mydevice.py"))
    sock = tmp_path / "counter.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "serve", "--device",
                             f"socket={sock},class=mydevice.py:Counter,start=5"], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        wait_until(sock.exists, 30, "the device's socket")
        with VfioUserClient(sock) as c:
            c.negotiate()
            assert c.read32(vu.PciRegion.BAR0, 0) == 5
            c.set_irqs(vu.PciIrq.MSI, vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER, 0, 1, [efd])
            c.write32(vu.PciRegion.BAR0, 0, 0)
            assert c.read32(vu.PciRegion.BAR0, 0) == 6
            assert select.select([efd], [], [], 5)[0], "no MSI"
    finally:
        os.close(efd)
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out


def _pytest(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args], cwd=folder,
                          capture_output=True, text=True, timeout=600, env=env)


def test_fixtures_are_documented(tmp_path: Path) -> None:
    result = _pytest(tmp_path, "--fixtures")
    assert "qbackend_vm [module scope]" in result.stdout and "qbackend_harness" in result.stdout
    assert "booted guests with qbackend's devices" in result.stdout
    assert "--qbackend-kernel" in _pytest(tmp_path, "--help").stdout


@pytest.mark.guest
def test_a_users_guest_test_outside_the_repository(tmp_path: Path) -> None:
    source = block("import pytest")
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "test_hello.py").write_text(source)
    assert '== "0x12345678"' in source
    (bad / "test_hello.py").write_text(source.replace('== "0x12345678"', '== "0x87654321"'))
    passed = _pytest(good, "test_hello.py")
    assert passed.returncode == 0 and "1 passed" in passed.stdout, passed.stdout + passed.stderr
    failed = _pytest(bad, "test_hello.py")
    assert failed.returncode == 1 and "1 failed" in failed.stdout, failed.stdout + failed.stderr
    assert "0x87654321" in failed.stdout
