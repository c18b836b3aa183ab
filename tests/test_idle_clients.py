"""Clients that connect and never speak: a thousand of them cost no thread,
are dropped after the handshake limit, and a real client connecting
meanwhile is served at once (qemu-nbd's handshake-max-seconds and
max-connections, checked with libnbd's nbdinfo); the same for a vfio-user
device socket and clients that never send VERSION."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

from qed_tools import qemu_img

from qbackend.testing.harness import wait_until
from qbackend.testing.vfio_user_client import VfioUserClient

IDLE = 1000


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def open_idle(path: Path, count: int) -> list[socket.socket]:
    socks = []
    for _ in range(count):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        socks.append(s)
    return socks


def closed_by_server(s: socket.socket) -> bool:
    """True once the server has closed its end (reading returns EOF after any greeting)."""
    s.setblocking(False)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "qbackend", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=30)
    return out


def test_a_thousand_silent_nbd_clients(tmp_path: Path) -> None:
    image = tmp_path / "d.qed"
    qemu_img("create", "-f", "qed", str(image), "16M")
    sock = tmp_path / "nbd.sock"
    proc = start(["nbd", "--export", f"name=d,image={image},format=qed", "--socket", str(sock),
                  "--handshake-timeout", "3"], tmp_path)
    idle: list[socket.socket] = []
    try:
        wait_until(sock.exists, 30, "the NBD socket")
        baseline = threads(proc.pid)
        idle = open_idle(sock, IDLE)
        started = time.monotonic()
        size = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///d?socket={sock}"], capture_output=True,
                              text=True, timeout=30)
        assert size.stdout.strip() == str(16 << 20) and time.monotonic() - started < 2.5, \
            "a real client was not served while the idle ones waited"
        assert threads(proc.pid) <= baseline + 2, "idle clients cost threads"
        wait_until(lambda: all(closed_by_server(s) for s in idle), 20, "the silent clients to be dropped",
                   seen=lambda: sum(not closed_by_server(s) for s in idle))
        assert threads(proc.pid) <= baseline + 2
    finally:
        for s in idle:
            s.close()
        out = stop(proc)
    assert "no handshake within 3 s" in out or proc.returncode == 0


def test_max_connections_one_refuses_the_second_and_offers_no_multi_conn(tmp_path: Path) -> None:
    image = tmp_path / "d.qed"
    qemu_img("create", "-f", "qed", str(image), "16M")
    sock = tmp_path / "nbd.sock"
    proc = start(["nbd", "--export", f"name=d,image={image},format=qed", "--socket", str(sock),
                  "--max-connections", "1"], tmp_path)
    try:
        wait_until(sock.exists, 30, "the NBD socket")
        info = json.loads(subprocess.run(["nbdinfo", "--json", f"nbd+unix:///d?socket={sock}"], capture_output=True,
                                         text=True, timeout=30, check=True).stdout)
        assert info["exports"][0]["can_multi_conn"] is False
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.connect(str(sock))  # holds the one connection (it gets the greeting, then says nothing)
        try:
            wait_until(lambda: holder.recv(8, socket.MSG_PEEK) != b"", 10, "the first client's greeting")
            second = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///d?socket={sock}"], capture_output=True,
                                    text=True, timeout=30)
            assert second.returncode != 0, "a second client was served beyond --max-connections 1"
        finally:
            holder.close()
        wait_until(lambda: subprocess.run(["nbdinfo", "--size", f"nbd+unix:///d?socket={sock}"],
                                          capture_output=True, timeout=30).returncode == 0, 10,
                   "a client to be served again once the first has gone")
    finally:
        out = stop(proc)
    assert "refused" in out


def test_a_thousand_silent_vfio_user_clients(tmp_path: Path) -> None:
    sock = tmp_path / "iv.sock"
    proc = start(["serve", "--ivshmem", f"socket={sock},size=64K", "--handshake-timeout", "3"], tmp_path)
    idle: list[socket.socket] = []
    try:
        wait_until(sock.exists, 30, "the device socket")
        baseline = threads(proc.pid)
        idle = open_idle(sock, IDLE)
        started = time.monotonic()
        with VfioUserClient(sock) as c:
            c.negotiate()
            assert c.read32(7, 0) == 0x11101AF4  # the vendor and device ids, through config space
        assert time.monotonic() - started < 2.5, "the real client waited for the silent ones"
        assert threads(proc.pid) <= baseline + 2, "silent clients cost threads"
        wait_until(lambda: all(closed_by_server(s) for s in idle), 20, "the silent clients to be dropped",
                   seen=lambda: sum(not closed_by_server(s) for s in idle))
    finally:
        for s in idle:
            s.close()
        stop(proc)
