"""The README's examples, run as written: its own device served with
`qbackend serve --device` and driven over vfio-user, its booted-guest test
run by pytest in a folder outside the repository against the installed
package (and, with a wrong expected value, failing), and its own-QEMU lines
(`qbackend serve` and `qbackend qemu -- ...`) booting the guest with the
device."""

from __future__ import annotations

import os
import re
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from qbackend.machine.console import GuestConsole
from qbackend.machine.data_dir import data_dir
from qbackend.protocol import vfio_user as vu
from qbackend.testing.harness import GuestShell, wait_until
from qbackend.testing.vfio_user_client import VfioUserClient

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)


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
    # The user's folder is outside the checkout: where `make setup` provisioned QEMU and the
    # guest is said as the README says (an installed copy does not look for a checkout there).
    env["QBACKEND_DATA_DIR"] = str(data_dir())
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


def shell_command(first: str, containing: str = "") -> str:
    """The README's indented command starting with ``first`` (and holding ``containing``),
    with its continuation lines."""
    lines = README.splitlines()

    def whole(start: int) -> str:
        command = [lines[start][4:]]
        while command[-1].endswith("\\"):
            command.append(lines[start + len(command)][4:])
        return "\n".join(command)

    found = [whole(n) for n, line in enumerate(lines) if line.startswith("    " + first)]
    found = [command for command in found if containing in command]
    assert len(found) == 1, f"README has no single command starting with {first!r} and holding {containing!r}"
    return found[0]


@pytest.mark.guest
def test_serving_a_device_to_a_qemu_you_start_yourself(tmp_path: Path) -> None:
    """The README's own-QEMU lines, as a user types them (their /tmp/ made the test's own
    folder): `qbackend serve` in one shell, `qbackend qemu -- ...` in another, the guest's
    console on that shell's terminal; the guest sees the ivshmem device."""
    if not (REPO / "build" / "qemu" / ".complete").exists():
        pytest.skip("needs `make setup` (build/qemu)")
    serve = shell_command("qbackend serve --ivshmem socket=/tmp/iv0.sock").replace("/tmp/", f"{tmp_path}/")
    qemu = shell_command("qbackend qemu -- $(qbackend qemu --print memory)", "iv0.sock").replace("/tmp/",
                                                                                                f"{tmp_path}/")
    assert "-serial stdio" in qemu and "vfio-user-pci" in qemu
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QEMU")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["QBACKEND_DATA_DIR"] = str(REPO / "build")
    with served_and_booted(serve, qemu, tmp_path, env, tmp_path / "iv0.sock") as shell:
        assert shell.find_pci(0x1AF4, 0x1110), "the guest has no ivshmem device"


@contextmanager
def served_and_booted(serve: str, qemu: str, cwd: Path, env: dict[str, str], sock: Path) -> Iterator[GuestShell]:
    """The README's two shells: `serve` (a `qbackend serve` line) in one; once it listens at
    `sock`, `qemu` (a `qbackend qemu -- ... -serial stdio` line) in the other, whose terminal
    is the guest's console (a socket here).  The guest's shell; both stopped at the end, and
    the server must have said it served."""
    server = subprocess.Popen(["bash", "-c", serve], cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    ours, theirs = socket.socketpair()
    vm = None
    try:
        wait_until(sock.exists, 30, "the device's socket")
        vm = subprocess.Popen(["bash", "-c", qemu], cwd=cwd, env=env, stdin=theirs.fileno(), stdout=theirs.fileno(),
                              stderr=subprocess.PIPE, start_new_session=True)
        theirs.close()
        console = GuestConsole.over(ours)
        console.wait_ready(timeout=120)
        yield GuestShell(console)
    finally:
        ours.close()
        theirs.close()
        outputs = []
        for proc in (vm, server):
            if proc is not None:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGTERM)
                outputs.append(proc.communicate(timeout=30)[0])
    assert "serving; Ctrl-C stops" in (outputs[-1] or ""), outputs
