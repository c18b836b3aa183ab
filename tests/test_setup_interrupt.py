"""`qbackend setup` stopped by Ctrl-C: its steps (bash, apt-get, dpkg-deb,
mmdebstrap) run in a process group of their own that is killed, the step's
temporary folder is removed, and the command exits 130 with one line.

These start a real setup in a fresh data directory, which downloads from the
Debian mirror until interrupted a moment later; skipped when the mirror is
out of reach."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest


def _mirror() -> tuple[str, int]:
    uri = "http://deb.debian.org/debian"
    sources = Path("/etc/apt/sources.list.d/debian.sources")
    if sources.exists():
        for line in sources.read_text().splitlines():
            if line.startswith("URIs:"):
                uri = line.split()[1]
                break
    parts = urlsplit(uri)
    return parts.hostname or "deb.debian.org", parts.port or (443 if parts.scheme == "https" else 80)


def _online() -> bool:
    try:
        socket.create_connection(_mirror(), timeout=3).close()
    except OSError:
        return False
    return True


def _processes() -> dict[int, tuple[int, int, str]]:
    """pid -> (parent pid, process group, command line) of every process."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        # The command name in parentheses may hold spaces; the fields after it do not.
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(entry.name)] = (int(fields[1]), int(fields[2]), cmdline)
    return out


def _wait_for_step(setup: subprocess.Popen[str], work: Path, timeout: float = 60.0) -> int:
    """The process group of setup's step, once the step has made its
    temporary folder `work` and its script runs a program of its own (so
    there is something to remove and more than one process to stop)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if setup.poll() is not None:
            _, err = setup.communicate()
            pytest.skip(f"setup ended (exit {setup.returncode}) before it could be interrupted: {err.strip()}")
        if not work.exists():
            time.sleep(0.05)
            continue
        procs = _processes()
        for pid, (ppid, _, _) in procs.items():
            if ppid == setup.pid and any(p != pid and group == pid for p, (_, group, _) in procs.items()):
                return pid
        time.sleep(0.05)
    raise AssertionError("setup started no step within a minute")


@pytest.mark.parametrize("part", ["guest", "qemu"])
def test_ctrl_c_stops_the_step_and_leaves_no_folder(tmp_path: Path, part: str) -> None:
    if part == "qemu" and shutil.which("mmdebstrap") is None:
        pytest.skip("mmdebstrap is not installed; make setup installs it")
    if not _online():
        pytest.skip(f"the Debian mirror {_mirror()[0]} is out of reach")
    data = tmp_path / "data"
    setup = subprocess.Popen([sys.executable, "-m", "qbackend", "--data-dir", str(data), "setup",
                              "--no-host-packages", "--only", part],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        group = _wait_for_step(setup, data / f"{part}.tmp")
        time.sleep(1.0)  # into the step: downloading, unpacking
        assert (data / f"{part}.tmp").exists()
        running = [cmd for _, pgid, cmd in _processes().values() if pgid == group]
        setup.send_signal(signal.SIGINT)
        _, err = setup.communicate(timeout=30)
    finally:
        if setup.poll() is None:
            setup.kill()
            setup.wait()
    assert setup.returncode == 130, err
    # The steps' own messages go to stdout; stderr holds only the one line.
    lines = err.splitlines()
    assert len(lines) == 1 and "SIGINT" in lines[0], err
    left = [f"{pid}: {cmd}" for pid, (_, pgid, cmd) in _processes().items()
            if pgid == group or str(tmp_path) in cmd]
    assert not left, f"{left}; running at the interrupt: {running}"
    assert sorted(os.listdir(data)) == [], "a half-made folder was left"
