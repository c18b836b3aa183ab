"""Sockets are owned: qbackend replaces only a stale socket, never one another
process serves, never another kind of file; makes no folder; and removes only
the socket it made (the same inode) when it stops."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qbackend.errors import SocketPathError
from qbackend.plumbing.unix import listen_unix, remove_socket
from qbackend.protocol.vfio_user import PciRegion
from qbackend.testing.harness import wait_until
from qbackend.testing.vfio_user_client import VfioUserClient


def test_a_live_socket_is_not_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "live.sock"
    first = listen_unix(path)
    try:
        with pytest.raises(SocketPathError, match=f"already served by PID {os.getpid()}"):
            listen_unix(path)
        client = socket.socket(socket.AF_UNIX)
        client.connect(str(path))  # still the first listener's
        client.close()
    finally:
        first.close()
        remove_socket(path)
    assert not path.exists()


def test_a_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    gone = socket.socket(socket.AF_UNIX)
    gone.bind(str(path))
    gone.close()  # its process "died": the file stays, nothing accepts
    listener = listen_unix(path)
    listener.close()
    remove_socket(path)
    assert not path.exists()


def test_a_missing_folder_is_an_error_and_is_not_made(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "x.sock"
    with pytest.raises(SocketPathError, match="does not exist"):
        listen_unix(path)
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize("kind", ["file", "symlink"])
def test_another_kind_of_file_is_left_alone(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.sock"
    target = tmp_path / "target"
    target.write_text("keep")
    if kind == "file":
        path.write_text("keep")
    else:
        path.symlink_to(target)
    with pytest.raises(SocketPathError, match="not a socket"):
        listen_unix(path)
    assert path.read_text() == "keep" and target.read_text() == "keep"


def test_only_the_socket_made_is_removed(tmp_path: Path) -> None:
    """Another process removed ours and bound its own at the path: ours going does not remove theirs."""
    path = tmp_path / "x.sock"
    ours = listen_unix(path)
    path.unlink()
    theirs = socket.socket(socket.AF_UNIX)
    theirs.bind(str(path))
    ours.close()
    remove_socket(path)
    assert path.is_socket()
    theirs.close()
    remove_socket(tmp_path / "never-made.sock")  # not ours: nothing to do, no error


def _serve(sock: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "qbackend", "serve", "--ivshmem", f"socket={sock},size=4K"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_serve_on_a_live_socket_fails_and_the_first_keeps_serving(tmp_path: Path) -> None:
    sock = tmp_path / "iv.sock"
    first = _serve(sock)
    try:
        wait_until(sock.exists, 30, "the first server's socket")
        second = _serve(sock)
        _out, err = second.communicate(timeout=60)
        assert second.returncode == 1, err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert f"already served by PID {first.pid}" in err and str(sock) in err, err
        with VfioUserClient(sock, timeout=5) as client:
            client.negotiate()
            assert client.read32(PciRegion.CONFIG, 0) == 0x11101AF4
    finally:
        first.terminate()
        first.communicate(timeout=20)
    deadline = time.monotonic() + 10
    while sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not sock.exists(), "the first server removes its own socket when it stops"


def test_serve_with_a_socket_in_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    sock = tmp_path / "missing" / "iv.sock"
    proc = _serve(sock)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and "does not exist" in err, err
    assert not (tmp_path / "missing").exists()
