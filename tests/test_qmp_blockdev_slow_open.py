"""blockdev-add opens its image in a worker thread: an open that blocks (a slow disk, a
check on open of a large image) holds up no other QMP command, and the replies are the
ones a quick open gives."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import qbackend.app.block_exports as block_exports
from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend
from qbackend.block.blockfile import FileBlock
from qbackend.block.qed import QedImage


class _Client:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.receive()  # the greeting
        assert self.command({"execute": "qmp_capabilities"}) == {"return": {}}

    def receive(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "the monitor closed the connection"
        msg: dict[str, Any] = json.loads(line)
        return msg

    def send(self, obj: object) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\n")

    def reply(self) -> dict[str, Any]:
        while True:
            msg = self.receive()
            if "event" not in msg:
                return msg

    def command(self, obj: object) -> dict[str, Any]:
        self.send(obj)
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def test_a_blocking_open_does_not_stall_the_monitor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = FileBlock.open(tmp_path / "disk.qed", create=True)
    QedImage.create(f, 1 << 20)
    f.close()
    opening = threading.Event()
    release = threading.Event()
    real_open = block_exports.open_export

    def slow_open(opts: Any) -> Any:  # an open that blocks until the test lets it go
        opening.set()
        assert release.wait(60)
        return real_open(opts)

    monkeypatch.setattr(block_exports, "open_export", slow_open)
    backend = Backend()
    backend.enable_control(tmp_path / "qb.sock")
    with BackendThread(backend):
        slow, other = _Client(tmp_path / "qb.sock"), _Client(tmp_path / "qb.sock")
        try:
            add = {"execute": "blockdev-add", "arguments": {
                "driver": "qed", "node-name": "d0", "file": {"driver": "file", "filename": str(tmp_path / "disk.qed")}}}
            slow.send(add)
            assert opening.wait(30)
            started = time.monotonic()
            # Other commands are answered while the open blocks; a second add of the same
            # name is the duplicate it will be.
            assert other.command({"execute": "query-named-block-nodes"}) == {"return": []}
            dup = other.command(add)
            assert dup["error"]["desc"] == "Duplicate nodes with node-name='d0'", dup
            assert time.monotonic() - started < 5
            release.set()
            assert slow.reply() == {"return": {}}
            nodes = other.command({"execute": "query-named-block-nodes"})["return"]
            assert [n["node-name"] for n in nodes] == ["d0"]
            # a refused open still gives its error, from the worker thread
            missing = other.command({"execute": "blockdev-add", "arguments": {
                "driver": "qed", "node-name": "d1", "file": {"driver": "file", "filename": str(tmp_path / "x")}}})
            assert "No such file or directory" in missing["error"]["desc"], missing
            (tmp_path / "bad.qed").write_bytes(b"QED\0" + bytes(60))
            bad = other.command({"execute": "blockdev-add", "arguments": {
                "driver": "qed", "node-name": "d2", "file": {"driver": "file", "filename": str(tmp_path / "bad.qed")}}})
            assert bad["error"]["class"] == "GenericError", bad
        finally:
            release.set()
            slow.close()
            other.close()
