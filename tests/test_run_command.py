"""`qbackend run` (what `make run` starts): QEMU with a booted guest and the
ivshmem device, here on the q35 profile (the device behind a root port),
DIMM slots driven with `qbackend dimm`; Ctrl-C stops everything and leaves
no process or socket behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from qbackend.machine.console import GuestConsole
from qbackend.testing.harness import GuestShell, start_qbackend, wait_until

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry))
    return pids


def test_run_boots_a_guest_with_the_device_and_ctrl_c_cleans_up(tmp_path: Path) -> None:
    workdir = tmp_path / "run"
    proc, lines = start_qbackend(["run", "--machine", "q35", "--workdir", str(workdir),
                                  "--ivshmem", f"socket={workdir}/iv.sock,size=1M",
                                  "--dimm", "id=cold,size=128M,populated=on", "--dimm", "id=hot,size=256M,node=0"],
                                 REPO)
    try:
        text = "".join(lines)
        assert f"guest console: {workdir}/qemu-serial.sock" in text, text
        assert f"QMP socket:    {workdir}/qemu-qmp.sock" in text, text
        with GuestConsole(workdir / "qemu-serial.sock") as console:
            console.wait_ready(timeout=90)
            shell = GuestShell(console)
            devs = shell.find_pci(0x1AF4, 0x1110)
            assert devs, "the guest has no ivshmem device"
            assert shell.bar(devs[0], 2)[1] == 1 << 20
        assert _processes_mentioning(str(workdir / "qemu-qmp.sock")), "QEMU is not running"
        ctl = str(workdir / "qbackend.sock")

        def dimm(*args: str) -> str:
            result = subprocess.run([sys.executable, "-m", "qbackend", "dimm", "--control", ctl, *args],
                                    cwd=REPO, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr
            return result.stdout

        listing = dimm("list")
        assert "cold" in listing and "plugged" in listing.splitlines()[1]
        assert "hot:" not in listing and "empty" in listing
        assert "plugged in slot 1 at 0x108000000" in dimm("add", "hot")
        assert "= 896 MiB" in dimm("total")
        assert "hot: removed" in dimm("del", "hot")
        assert "= 640 MiB" in dimm("total")

        def pci(*args: str) -> str:
            result = subprocess.run([sys.executable, "-m", "qbackend", "pci", "--control", ctl, *args],
                                    cwd=REPO, capture_output=True, text=True, timeout=60)
            assert result.returncode == 0, result.stdout + result.stderr
            return result.stdout

        # q35: hot-plugged devices go behind the profile's root port (bus 1, slot 0).
        assert "hp1: slot 0" in pci("add", "ivshmem", f"socket={workdir}/hp1.sock,size=1M,vectors=0,id=hp1")
        with GuestConsole(workdir / "qemu-serial.sock") as console:
            GuestShell(console).wait_guest("[ -e /sys/bus/pci/devices/0000:01:00.0 ]", timeout=2.0)
        assert "hp1" in pci("list")
        assert "hp1: removed" in pci("del", "hp1")
        # Any QEMU device, given as device_add arguments.
        assert "rng0: slot 0" in pci("add-json", '{"driver": "virtio-rng-pci", "id": "rng0"}')
        assert "rng0" in pci("list")
        assert "rng0: removed" in pci("del", "rng0")
        proc.send_signal(signal.SIGINT)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "".join(lines) + rest
    assert "stopped" in rest
    wait_until(lambda: _processes_mentioning(str(workdir / "qemu-qmp.sock")) == [], 5, "QEMU to exit",
               seen=lambda: _processes_mentioning(str(workdir / "qemu-qmp.sock")))
    assert sorted(p.name for p in workdir.iterdir() if p.is_socket()) == []
    assert "qbackend QMP:" in text
