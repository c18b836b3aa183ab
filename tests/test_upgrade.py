"""`qbackend upgrade` from the command line, as a user runs it against a
`qbackend serve --control PATH` (qbackend.app.upgrade): the new process
takes the monitor's socket, the old one exits 0, what cannot be handed over
is refused with one line and nothing changes, and the socket goes when the
last process stops.  The parts' own hand-overs (devices, disks, exports)
have tests of their own; a booted guest's, tests/test_upgrade_guest.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from qbackend.app.monitor_client import call, monitor
from qbackend.testing.harness import wait_until


def qbackend(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qbackend", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def start_serve(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], Path]:
    control = tmp_path / "qb.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "serve", "--control", str(control), *args],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_until(control.is_socket, 30, "qbackend serve to listen")
    return proc, control


def test_upgrade_hands_the_monitor_to_a_new_process_again_and_again(tmp_path: Path) -> None:
    old, control = start_serve(tmp_path)
    pids = [old.pid]
    try:
        for _ in range(3):
            result = qbackend("upgrade", "--control", str(control), cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            new_pid = int(result.stdout.split("PID ")[1].split()[0])
            assert new_pid not in pids
            wait_until(lambda: not pid_alive(pids[-1]) or (pids[-1] == old.pid and old.poll() is not None), 10,
                       "the old process to exit")
            pids.append(new_pid)
            with monitor(control) as qmp:  # the same socket path, answered by the new process
                assert "upgrade" in [c["name"] for c in call(qmp, "query-commands")]
        assert old.wait(10) == 0
    finally:
        os.kill(pids[-1], signal.SIGINT)
        wait_until(lambda: not pid_alive(pids[-1]), 10, "the last process to stop")
    assert not control.exists(), "the last process removes the socket it took over"
    output = old.communicate(timeout=10)[0]  # every process wrote to the same output
    assert output.count("took over") == 3, output


def test_a_device_that_cannot_be_handed_over_is_refused_and_nothing_changes(tmp_path: Path) -> None:
    (tmp_path / "plain.py").write_text(
        "from qbackend.devices import Device\n\n"
        "class Plain(Device):\n"
        "    vendor_id, device_id = 0x1234, 0x5678\n")
    old, control = start_serve(tmp_path, "--device", f"socket={tmp_path / 'p.sock'},class=plain.py:Plain,id=p0")
    try:
        result = qbackend("upgrade", "--control", str(control), cwd=tmp_path)
        assert result.returncode == 1, result
        assert "Traceback" not in result.stderr
        line, = result.stderr.strip().splitlines()
        assert "p0" in line and "cannot" in line, line
        assert old.poll() is None
        with monitor(control) as qmp:  # still the old process, serving
            call(qmp, "query-version")
    finally:
        old.send_signal(signal.SIGINT)
        old.communicate(timeout=10)
