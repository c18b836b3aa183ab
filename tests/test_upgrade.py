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


def test_a_failed_hand_over_leaves_the_old_process_serving(tmp_path: Path) -> None:
    """The new process cannot open the disk (moved away meanwhile): the upgrade fails with one
    line saying why, and the old process serves its NBD clients on; put back, it succeeds."""
    image = tmp_path / "d.qed"
    assert qbackend("qed", "create", str(image), "64M", cwd=tmp_path).returncode == 0
    old, control = start_serve(tmp_path, "--nbd", f"name=d,image={image},format=qed",
                               "--nbd-socket", str(tmp_path / "n.sock"))
    url = f"nbd+unix:///d?socket={tmp_path / 'n.sock'}"
    pids = [old.pid]
    try:
        image.rename(tmp_path / "away.qed")
        result = qbackend("upgrade", "--control", str(control), cwd=tmp_path)
        assert result.returncode == 1, result
        line, = result.stderr.strip().splitlines()
        assert "serves on" in line and "d.qed" in line, line
        assert old.poll() is None
        size = subprocess.run(["nbdinfo", "--size", url], capture_output=True, text=True, timeout=30)
        assert size.stdout.strip() == str(64 << 20), size
        (tmp_path / "away.qed").rename(image)
        result = qbackend("upgrade", "--control", str(control), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        pids.append(int(result.stdout.split("PID ")[1].split()[0]))
        assert old.wait(10) == 0
        size = subprocess.run(["nbdinfo", "--size", url], capture_output=True, text=True, timeout=30)
        assert size.stdout.strip() == str(64 << 20), size
    finally:
        os.kill(pids[-1], signal.SIGINT)
        output = old.communicate(timeout=30)[0]
    assert "Traceback" not in output, output


def test_an_nbd_client_stays_connected_through_upgrades(tmp_path: Path) -> None:
    """libnbd (nbdsh) connected before three upgrades reads what it wrote and writes on, on
    the same connection: the NBD server hands its connections over."""
    image = tmp_path / "d.qed"
    assert qbackend("qed", "create", str(image), "64M", cwd=tmp_path).returncode == 0
    old, control = start_serve(tmp_path, "--nbd", f"name=d,image={image},format=qed",
                               "--nbd-socket", str(tmp_path / "n.sock"))
    ready, go = tmp_path / "ready", tmp_path / "go"
    script = (
        "import os, time\n"
        "h.pwrite(b'A' * 4096, 0)\n"
        f"open({str(ready)!r}, 'w').close()\n"
        f"while not os.path.exists({str(go)!r}): time.sleep(0.02)\n"
        "assert h.pread(4096, 0) == b'A' * 4096\n"
        "h.pwrite(b'B' * 4096, 4096)\n"
        "h.flush()\n"
        "print('same connection:', h.get_size())\n")
    # nbdsh is `python3 -m nbd` of the system's Python, which has libnbd's binding.
    client = subprocess.Popen(["/usr/bin/python3", "-m", "nbd", "-u", f"nbd+unix:///d?socket={tmp_path / 'n.sock'}", "-c", script],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = [old.pid]
    try:
        wait_until(ready.exists, 30, "the NBD client's first write")
        for _ in range(3):
            result = qbackend("upgrade", "--control", str(control), cwd=tmp_path)
            assert result.returncode == 0, result.stderr
            pids.append(int(result.stdout.split("PID ")[1].split()[0]))
        go.touch()
        output = client.communicate(timeout=60)[0]
        assert client.returncode == 0, output
        assert f"same connection: {64 << 20}" in output, output
    finally:
        if client.poll() is None:
            client.kill()
            client.communicate()
        os.kill(pids[-1], signal.SIGINT)
        old.communicate(timeout=30)
    result = qbackend("qed", "check", str(image), cwd=tmp_path)
    assert result.returncode == 0, result
