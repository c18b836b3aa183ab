"""qbackend's QMP monitor against real QMP clients (qemu.qmp's QMPClient,
the qmp-shell tool), raw sockets with bad input, and qemu-storage-daemon
11.1's own monitor as the reference for framing errors and for the NBD
export commands (same run, same bytes)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qed_tools import qemu_check, qemu_img, qemu_io
from qemu.qmp import QMPClient

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend
from qbackend.ivshmem.peer import IvshmemPeer
from qbackend.machine.launch import QemuInstall, find_qemu
from qbackend.options import DimmOptions, IvshmemOptions
from qbackend.protocol.qmp import CommandSpec
from qbackend.testing.harness import open_fds, wait_until

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
# nbdsh runs `python3 -m nbd` from PATH: the system Python, which has Debian's libnbd bindings.
NBDSH = ["env", f"PATH=/usr/bin:{os.environ.get('PATH', '')}", "nbdsh"]


@dataclass
class Served:
    backend: Backend
    thread: BackendThread
    monitor: Path
    workdir: Path
    shm: str
    server: Path  # the ivshmem-server socket of group `shm`


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    workdir = tmp_path_factory.mktemp("qmp")
    shm = f"qbackend-test-{uuid.uuid4().hex[:8]}"
    backend = Backend()
    backend.add_ivshmem(IvshmemOptions(socket=workdir / "iv.sock", size=1 << 20, shm=shm, vectors=1, id="iv0",
                                       server=workdir / "ivs.sock"))
    backend.add_hotplug_controller(workdir / "hp.sock", [DimmOptions("hot1", 128 << 20), DimmOptions("hot2", 256 << 20, 0)],
                                   machine="pc", ram_size=512 << 20, slots=2)
    backend.add_pci_slots(None)
    backend.enable_control(workdir / "qb.sock")
    with BackendThread(backend) as thread:
        yield Served(backend, thread, workdir / "qb.sock", workdir, shm, workdir / "ivs.sock")
    Path("/dev/shm", shm).unlink(missing_ok=True)


class Raw:
    """A raw QMP client: bytes out, parsed messages in."""

    def __init__(self, path: Path, negotiate: bool = True) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(20)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        self.greeting = self.receive()
        if negotiate:
            assert self.command({"execute": "qmp_capabilities"}) == {"return": {}}

    def receive(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "the monitor closed the connection"
        msg = json.loads(line)
        assert isinstance(msg, dict)
        return msg

    def reply(self) -> dict[str, Any]:
        """The next reply, skipping events."""
        while True:
            msg = self.receive()
            if "event" not in msg:
                return msg

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, obj: object) -> dict[str, Any]:
        self.send(json.dumps(obj).encode() + b"\n")
        return self.reply()

    def close(self) -> None:
        self.file.close()
        self.sock.close()


@pytest.fixture(scope="module")
def qsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, QemuInstall]]:
    """qemu-storage-daemon 11.1 with a QMP monitor: the reference."""
    qemu = find_qemu()
    sock = tmp_path_factory.mktemp("qsd") / "qsd.sock"
    proc = subprocess.Popen([*qemu.tool_cmd("qemu-storage-daemon"), "--chardev",
                             f"socket,path={sock},server=on,wait=off,id=m", "--monitor", "chardev=m"],
                            env=qemu.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, 30, "qemu-storage-daemon's monitor socket")
        yield sock, qemu
    finally:
        proc.terminate()
        proc.wait(10)


# -- real clients -------------------------------------------------------------------------------


def test_qemu_qmp_client_negotiates_and_queries(served: Served) -> None:
    """qemu.qmp's own QMPClient (not qbackend's bridge) drives the monitor."""

    async def session() -> dict[str, Any]:
        client = QMPClient("test")
        await client.connect(str(served.monitor))
        try:
            return {name: await client.execute(name) for name in
                    ("query-commands", "query-version", "query-memory-total", "query-memory-hotplug",
                     "query-block-exports")}
        finally:
            await client.disconnect()

    got = asyncio.run(session())
    names = {c["name"] for c in got["query-commands"]}
    assert {"qmp_capabilities", "query-commands", "query-version", "quit", "query-memory-total",
            "query-memory-hotplug", "dimm-add", "dimm-del", "query-pci-hotplug", "pci-device-add",
            "pci-device-del", "query-ivshmem-peers", "ivshmem-ring", "ivshmem-read", "ivshmem-write",
            "hotplug-fault-set", "hotplug-fault-clear", "nbd-server-start", "nbd-server-stop", "blockdev-add",
            "block-export-add", "block-export-del", "query-block-exports"} <= names
    assert got["query-version"]["package"].startswith("qbackend ")
    assert set(got["query-version"]["qemu"]) == {"major", "minor", "micro"}
    assert got["query-memory-total"] == {"base": 512 << 20, "plugged": 0, "total": 512 << 20}
    assert got["query-memory-hotplug"] == [
        {"id": "hot1", "slot": 0, "address": 1 << 32, "size": 128 << 20, "node": 0, "state": "empty",
         "declared": True},
        {"id": "hot2", "slot": 1, "address": (1 << 32) + (128 << 20), "size": 256 << 20, "node": 0,
         "state": "empty", "declared": True}]
    assert got["query-block-exports"] == []


def test_qmp_shell_runs_commands(served: Served) -> None:
    """The qmp-shell tool that qemu.qmp installs, as a user types into it."""
    script = ("query-version\nquery-memory-hotplug\nivshmem-write offset=16 data=aGVsbG8=\n"
              "ivshmem-read offset=16 length=5\nno-such-command\n")
    result = subprocess.run([str(VENV_BIN / "qmp-shell"), str(served.monitor)], input=script, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    replies = [json.loads(line.split(") ", 1)[1]) for line in result.stdout.splitlines()
               if line.startswith("(QEMU) {")]
    assert replies[0]["return"]["package"].startswith("qbackend ")
    assert [d["id"] for d in replies[1]["return"]] == ["hot1", "hot2"]
    assert replies[2] == {"return": {"written": 5}}
    assert replies[3] == {"return": {"offset": 16, "data": "aGVsbG8="}}
    assert replies[4]["error"]["class"] == "CommandNotFound"


# -- framing and dispatch errors, against qemu-storage-daemon -----------------------------------

# Sent in this order on one connection to each monitor; the replies are compared.
BAD_INPUT = [
    (b'{"execute": "query-version", "id": 1}\n', "before qmp_capabilities"),
    (b'{"execute": "qmp_capabilities", "id": 2}\n', "negotiation"),
    (b'{"execute": "qmp_capabilities", "id": 3}\n', "negotiation again"),
    (b'nonsense\n', "not JSON"),
    (b'[1, 2]\n', "not an object"),
    (b'"text"\n', "a string"),
    (b'{"id": 5}\n', "no execute"),
    (b'{"execute": 5}\n', "execute not a string"),
    (b'{"execute": "no-such", "id": "x"}\n', "unknown command"),
    (b'{"execute": "query-version", "arguments": [], "id": 7}\n', "arguments not an object"),
    (b'{"execute": "query-version", "extra": 1, "id": 8}\n', "unknown key"),
    (b'{"execute": "query-version", "arguments": {"a": 1}, "id": 9}\n', "extra argument"),
    (b'{"execute": "block-export-del", "arguments": {}, "id": 10}\n', "missing argument"),
    (b'{"execute": "block-export-del", "arguments": {"id": 1}, "id": 11}\n', "wrong type"),
    (b'{"execute": "block-export-del", "arguments": {"id": "x", "mode": "bad"}, "id": 12}\n', "bad enum value"),
    (b'{"execute": "block-export-del", "arguments": {"id": "x"}, "id": 13}\n', "no such export"),
    (b'{"execute": "nbd-server-stop", "id": 14}\n', "no NBD server"),
    (b'{"exec-oob": "query-version", "id": 15}\n', "out-of-band without the capability"),
    (b'{"execute": "query-version",\n "id": 16}\n', "a command over two lines"),
    (b'{"execute": "query-block-exports", "id": 17} {"execute": "query-block-exports", "id": 18}\n',
     "two commands on one line"),
]


def _replies(path: Path) -> list[dict[str, Any]]:
    client = Raw(path, negotiate=False)
    out = []
    try:
        for data, _what in BAD_INPUT:
            client.send(data)
            out.append(client.reply())
            if data.count(b"execute") == 2:
                out.append(client.reply())
    finally:
        client.close()
    return out


def test_bad_input_gets_the_same_errors_as_qemu_storage_daemon(served: Served, qsd: tuple[Path, Any]) -> None:
    """Fidelity: the class of every error, its id, and QEMU's text (a JSON parse error's
    line:column position included)."""
    ours, theirs = _replies(served.monitor), _replies(qsd[0])
    assert len(ours) == len(theirs) == len(BAD_INPUT) + 1
    for (_data, what), mine, ref in zip([*BAD_INPUT, BAD_INPUT[-1]], ours, theirs):
        assert mine.keys() == ref.keys(), (what, mine, ref)
        assert mine.get("id") == ref.get("id"), what
        if "error" in ref:
            assert mine["error"] == ref["error"], (what, mine, ref)


# Malformed JSON, each sent on a connection of its own after qmp_capabilities, then a command,
# then a 0xFF byte (a lexer error: QEMU's documented way to bring its parser back to a known
# state) and a last command whose reply ends the exchange.  Chosen to walk QEMU 11.1's lexer
# (stray bytes, bad numbers, control bytes in strings, recovery), its streamer (where a message
# ends when brackets do not match) and its parser (every error it names, and positions,
# including a token right after a number or keyword, which QEMU places one column on).
MALFORMED_JSON = [
    b'{not json\n', b'{"a" 1}\n', b'{"a":}\n', b'{"a":1,}\n', b'{"a":1 "b":2}\n', b'[1 2]\n', b'[1,]\n',
    b']\n', b',\n', b':\n', b'{1:2}\n', b'{"a":1,"a":2}\n', b'{"a":1,"a":{"b":1}}\n', b'"abc\n', b"'abc'\n",
    b'01\n', b'1.\n', b'-\n', b'1e\n', b'[1e+]\n', b'[-01]\n', b'[1.5.]\n', b'"\\x"\n', b'"\\u12"\n',
    b'["\\ud800"]\n', b'["\\uD83D\\uDE00", "\\uDC00"]\n', b'["\\uFFFE"]\n', b'\x01\n',
    b'  \n\n {"execute": x}\n', b'{"execute":"query-version"}}\n', b'{"a":[1,2}\n', b'{"a":{"b":1]}\n',
    b'{"a":{"b":1]}}\n', b'{"a":[1}]}\n', b'{"a":[1  }   ]}\n', b'{"a":[1,}]}\n', b'[[1]]]\n', b'}}\n',
    b'nul\n', b'ab1\n', b'{"a": %d}\n', b'{"a": .5}\n', b'{"a" 1 %}\n', b'[1%]\n', b'[1x]\n', b'[true"a"]\n',
    b'{"a":true]\n', b'\t}\r\n', b'\xfe}\n', b'\xc3\xa9 }\n', b'["\xed\xa0\x80"]\n', b'["\xc0\x80"]\n',
    b'["\xef\xbf\xbf"]\n', b'["\xfe"]\n', b'"a\tb"\n', b'{"\xc3\xa9":1 x}\n', b'%d\n}\n', b'{"a":1}x\n',
    b'{"a":1 "b"\n}\n', b'{,}\n', b'[1,,2]\n', b'{"a":[1,2]1}\n', b'1 2\n',
]


def _exchange(path: Path, data: bytes) -> list[dict[str, Any]]:
    client = Raw(path)
    try:
        client.send(data + b'{"execute": "query-version", "id": "after"}\n\xff{"execute": "query-version", "id": "end"}\n')
        replies = []
        while True:
            reply = client.reply()
            replies.append(reply)
            if reply.get("id") == "end":
                return replies
    finally:
        client.close()


@pytest.mark.parametrize("data", MALFORMED_JSON, ids=lambda d: repr(d)[2:-1][:40])
def test_malformed_json_is_answered_as_qemu_storage_daemon_answers_it(served: Served, qsd: tuple[Path, Any],
                                                                      data: bytes) -> None:
    """Fidelity (QEMU 11.1's JSON reader): every reply, error texts and their line:column
    positions included, and whether the commands after it are answered."""
    theirs = _exchange(qsd[0], data)
    ours = _exchange(served.monitor, data)
    strip = [{k: v for k, v in r.items() if k != "return"} for r in ours], \
        [{k: v for k, v in r.items() if k != "return"} for r in theirs]
    assert strip[0] == strip[1]
    assert any("error" in r for r in theirs), "the corpus holds malformed input only"


def test_a_64_mib_line_is_refused_and_the_monitor_goes_on(served: Served) -> None:
    client, other = Raw(served.monitor), Raw(served.monitor)
    try:
        line = b'{"execute": "query-version", "arguments": {"x": "' + b"A" * (64 << 20) + b'"}}\n'
        sender = threading.Thread(target=client.send, args=(line,))
        sender.start()
        assert other.command({"execute": "query-block-exports"}) == {"return": []}  # the others are served meanwhile
        reply = client.reply()
        sender.join(60)
        assert reply["error"] == {"class": "GenericError", "desc": "JSON token size limit exceeded"}
        assert client.command({"execute": "query-block-exports", "id": "after"}) == {"return": [], "id": "after"}
        client.send(b"[" * 2000 + b"]" * 2000 + b"\n")
        assert client.reply()["error"]["desc"] == "JSON nesting depth limit exceeded"
        assert client.command({"execute": "query-block-exports", "id": 2}) == {"return": [], "id": 2}
    finally:
        client.close()
        other.close()


def test_clients_that_vanish_cost_nothing(served: Served) -> None:
    before = open_fds()
    for _ in range(20):
        client = Raw(served.monitor)
        client.send(b'{"execute": "query-ivshmem-peers", "id": 1}\n{"execute": "query-memory-hotplug"')
        client.close()  # mid-command, and mid-message
    silent = [socket.socket(socket.AF_UNIX) for _ in range(10)]
    for s in silent:
        s.connect(str(served.monitor))
        s.close()
    wait_until(lambda: open_fds() <= before, 10, "the monitor to close every vanished client",
               seen=lambda: open_fds() - before)
    check = Raw(served.monitor)
    assert check.command({"execute": "query-block-exports"}) == {"return": []}
    check.close()


def test_events_reach_every_negotiated_client_and_only_them(served: Served) -> None:
    a, b = Raw(served.monitor), Raw(served.monitor)
    quiet = Raw(served.monitor, negotiate=False)
    try:
        with IvshmemPeer(served.server) as host:
            peer = host.id
            for client in (a, b):
                joined = client.receive()
                assert joined["event"] == "IVSHMEM_PEER_JOINED", joined
                assert joined["data"] == {"group": served.shm, "peer": peer}
                assert set(joined["timestamp"]) == {"seconds", "microseconds"}
        for client in (a, b):
            left = client.receive()
            assert (left["event"], left["data"]) == ("IVSHMEM_PEER_LEFT", {"group": served.shm, "peer": peer})
        quiet.send(b'{"execute": "qmp_capabilities", "id": "late"}\n')
        assert quiet.receive() == {"return": {}, "id": "late"}  # nothing was queued for it before negotiation
    finally:
        for client in (a, b, quiet):
            client.close()


# -- every command with arbitrary arguments -----------------------------------------------------

# Commands that create files or sockets where their arguments say are left out (a path drawn at
# random would land in the working directory), and quit, which would end the module's monitor.
NOT_FUZZED = {"quit", "nbd-server-start", "pci-device-add"}

JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70)
                           | st.floats(allow_nan=False, allow_infinity=False)
                           | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


def _commands(backend: Backend) -> list[CommandSpec]:
    assert backend.monitor is not None
    return [c.spec for name, c in sorted(backend.monitor.commands.items()) if name not in NOT_FUZZED]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_arbitrary_arguments_to_every_command_get_a_qmp_reply(served: Served, data: st.DataObject) -> None:
    specs = _commands(served.backend)
    spec = data.draw(st.sampled_from(specs))
    keys = st.sampled_from([*spec.args, "extra"]) if spec.args else st.just("extra")
    arguments = data.draw(st.dictionaries(keys, JSON_VALUES, max_size=4))
    client = Raw(served.monitor)
    try:
        reply = client.command({"execute": spec.name, "arguments": arguments, "id": 7})
        assert reply.get("id") == 7 and ("return" in reply) != ("error" in reply), reply
        if "error" in reply:
            assert reply["error"]["class"] in ("GenericError", "CommandNotFound", "DeviceNotFound")
            assert "internal error" not in reply["error"]["desc"], reply
        assert client.command({"execute": "query-block-exports", "id": 8})["id"] == 8  # still serving
    finally:
        client.close()
    served.thread.call(_undo_faults, served.backend)


def _undo_faults(backend: Backend) -> None:
    controller = backend.controller
    assert controller is not None
    faults = controller.device.memhp.faults  # type: ignore[attr-defined]
    faults.refuse_eject.clear()
    faults.hold_remove.clear()
    faults.ost_status.clear()


def test_fault_commands_set_and_clear(served: Served) -> None:
    client = Raw(served.monitor)
    try:
        assert client.command({"execute": "hotplug-fault-set", "arguments": {"fault": "refuse-eject", "slot": 1}}) \
            == {"return": {}}
        assert client.command({"execute": "hotplug-fault-set", "arguments": {"fault": "ost-status", "slot": 0,
                                                                             "status": 0x82}}) == {"return": {}}
        assert client.command({"execute": "query-hotplug-faults"})["return"] == {
            "refuse-eject": [1], "hold-remove": [], "ost-status": [{"slot": 0, "status": 0x82}]}
        assert client.command({"execute": "hotplug-fault-set", "arguments": {"fault": "hold-remove", "slot": 9}}
                              )["error"]["desc"] == "slot 9 is not one of the controller's 2 slots"
        assert client.command({"execute": "hotplug-fault-clear"}) == {"return": {}}
        assert client.command({"execute": "query-hotplug-faults"})["return"] == {
            "refuse-eject": [], "hold-remove": [], "ost-status": []}
        assert client.command({"execute": "dimm-add", "arguments": {"id": "nope"}})["error"]["class"] \
            == "DeviceNotFound"
    finally:
        client.close()


def test_ivshmem_read_and_write_are_bounded(served: Served) -> None:
    client = Raw(served.monitor)
    try:
        data = base64.b64encode(b"peers").decode()
        assert client.command({"execute": "ivshmem-write", "arguments": {"offset": (1 << 20) - 5, "data": data}}) \
            == {"return": {"written": 5}}
        assert client.command({"execute": "ivshmem-write", "arguments": {"offset": (1 << 20) - 4, "data": data}}
                              )["error"]["class"] == "GenericError"
        assert client.command({"execute": "ivshmem-write", "arguments": {"offset": 0, "data": "%%%"}}
                              )["error"]["desc"] == "'data' is not base64"
        assert client.command({"execute": "ivshmem-read", "arguments": {"offset": -1, "length": 4}}
                              )["error"]["class"] == "GenericError"
        assert client.command({"execute": "query-ivshmem-peers", "arguments": {"group": "nope"}}
                              )["error"]["desc"].startswith("no ivshmem group 'nope'")
    finally:
        client.close()


# -- NBD exports at run time ----------------------------------------------------------------------


def _nbdinfo_size(uri: str) -> int:
    out = subprocess.run(["nbdinfo", "--size", uri], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return int(out.stdout)


def test_runtime_exports_as_qemu_storage_daemon(served: Served, qsd: tuple[Path, QemuInstall],
                                                tmp_path: Path) -> None:
    qemu = qsd[1]
    image = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", str(image), "64M")
    qemu_io(image, "write -P 0x5a 1M 3M")
    ref = tmp_path / "ref.qed"
    qemu_img("create", "-f", "qed", str(ref), "64M")
    nbd_sock = tmp_path / "nbd.sock"
    listener = Raw(served.monitor)  # only listens: it must see the deletion event
    client = Raw(served.monitor)
    reference = Raw(qsd[0])
    try:
        def both(cmd: dict[str, Any], ref_cmd: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
            return client.command(cmd), reference.command(ref_cmd or cmd)

        start = {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix",
                                                                       "data": {"path": str(nbd_sock)}}}}
        ours, theirs = both(start, {"execute": "nbd-server-start", "arguments": {
            "addr": {"type": "unix", "data": {"path": str(tmp_path / "qsd-nbd.sock")}}}})
        assert ours == theirs == {"return": {}}
        ours, theirs = both(start, {"execute": "nbd-server-start", "arguments": {
            "addr": {"type": "unix", "data": {"path": str(tmp_path / "qsd-nbd.sock")}}}})
        assert ours == theirs, "a second nbd-server-start"
        node = {"execute": "blockdev-add", "arguments": {"driver": "qed", "node-name": "d0",
                                                         "file": {"driver": "file", "filename": str(image)}}}
        ours, theirs = both(node, {"execute": "blockdev-add", "arguments": {
            "driver": "qed", "node-name": "d0", "file": {"driver": "file", "filename": str(ref)}}})
        assert ours == theirs == {"return": {}}
        export = {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "d0",
                                                               "name": "disk", "writable": True}}
        assert both(export) == ({"return": {}}, {"return": {}})
        ours, theirs = both(export)
        assert ours == theirs, "the same export id twice"
        ours, theirs = both({"execute": "query-block-exports"})
        assert ours == theirs == {"return": [{"type": "nbd", "id": "e0", "node-name": "d0", "shutting-down": False}]}

        uri = f"nbd+unix:///disk?socket={nbd_sock}"
        assert _nbdinfo_size(uri) == 64 << 20
        compare = subprocess.run([*qemu.tool_cmd("qemu-img"), "compare", "-f", "qed", str(image), uri],
                                 env=qemu.env(), capture_output=True, text=True, timeout=60)
        assert compare.returncode == 0, compare.stdout + compare.stderr

        # A client holds the export: mode=safe is refused with QEMU's words, the image stays served.
        holder = subprocess.Popen([*NBDSH, "-u", uri, "-c", "h.pwrite(b'\\x77' * 4096, 8 << 20)\n"
                                   "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, text=True)
        ref_holder = subprocess.Popen([*NBDSH, "-u", f"nbd+unix:///disk?socket={tmp_path / 'qsd-nbd.sock'}",
                                       "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE, text=True)
        try:
            wait_until(lambda: served.thread.call(lambda: bool(served.backend.nbd and
                                                               served.backend.nbd.clients_of("disk"))),
                       20, "the nbdsh client to choose the export")
            time.sleep(0.5)  # the reference's client too (qemu-storage-daemon says nothing of its clients)
            ours, theirs = both({"execute": "block-export-del", "arguments": {"id": "e0"}})
            assert ours == theirs, (ours, theirs)
            assert ours["error"]["desc"] == "export 'e0' still in use"
            ours, theirs = both({"execute": "block-export-del", "arguments": {"id": "e0", "mode": "hard"}})
            assert ours == theirs == {"return": {}}
            deleted = listener.receive()
            assert deleted["event"] == "BLOCK_EXPORT_DELETED" and deleted["data"] == {"id": "e0"}
            assert served.thread.call(lambda: served.backend.nbd is not None
                                      and served.backend.nbd.clients_of("disk") == []), "the client was not dropped"
        finally:
            for proc in (holder, ref_holder):
                if proc.poll() is None:
                    assert proc.stdin is not None
                    proc.stdin.close()
                    proc.wait(30)
        assert served.thread.call(lambda: served.backend.nbd is not None and "disk" not in served.backend.nbd.exports)
        ours, theirs = both({"execute": "query-block-exports"})
        assert ours == theirs == {"return": []}
        assert both({"execute": "blockdev-del", "arguments": {"node-name": "d0"}}) == ({"return": {}},
                                                                                     {"return": {}})
        assert both({"execute": "nbd-server-stop"}) == ({"return": {}}, {"return": {}})
        wait_until(lambda: not nbd_sock.exists(), 10, "the NBD socket to go")
    finally:
        for c in (client, listener, reference):
            c.close()
    # The write through the export was flushed: the image is clean and holds it.
    assert qemu_check(image)[0] == 0
    qemu_io(image, "read -P 0x77 8M 4k", "read -P 0x5a 1M 3M")  # raises on a pattern mismatch


def test_blockdev_add_refuses_what_it_cannot_open(served: Served, tmp_path: Path) -> None:
    client = Raw(served.monitor)
    try:
        bad = tmp_path / "bad.qed"
        bad.write_bytes(b"QED\0" + bytes(60))
        for args, words in [
            ({"driver": "qed", "node-name": "b", "file": {"driver": "file", "filename": str(bad)}}, "cluster"),
            ({"driver": "qed", "node-name": "b", "file": {"driver": "file", "filename": str(tmp_path / "no")}},
             "No such file"),
            ({"driver": "vmdk", "node-name": "b", "file": "x"}, "does not accept value 'vmdk'"),
            ({"driver": "raw", "node-name": "b", "file": {"driver": "nbd", "server": {}}}, "'file' is"),
        ]:
            reply = client.command({"execute": "blockdev-add", "arguments": args})
            assert words in reply["error"]["desc"], reply
        assert client.command({"execute": "block-export-add", "arguments": {"type": "nbd", "id": "x",
                                                                            "node-name": "b"}}
                              )["error"]["desc"] == "NBD server not running"
    finally:
        client.close()


def _tls_creds(root: Path) -> tuple[Path, Path]:
    """(server folder, client folder) of one CA, in QEMU's tls-creds-x509 layout."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server, client = root / "server", root / "client"
    for folder in (server, client):
        folder.mkdir()
        (folder / "ca-cert.pem").write_bytes(ca.cert_pem.bytes())
    (server / "server-cert.pem").write_bytes(cert.cert_chain_pems[0].bytes())
    (server / "server-key.pem").write_bytes(cert.private_key_pem.bytes())
    return server, client


def _nodes(reply: dict[str, Any], image: Path) -> list[dict[str, Any]]:
    """What query-named-block-nodes says of each node that qbackend says too (file names made alike)."""
    return [{"node-name": n["node-name"], "drv": n["drv"], "ro": n["ro"], "file": Path(n["file"]) == image,
             "children": n["children"], "format": n["image"]["format"], "size": n["image"]["virtual-size"]}
            for n in reply["return"]]


def test_tls_objects_and_file_nodes_as_qemu_storage_daemon(served: Served, qsd: tuple[Path, QemuInstall],
                                                           tmp_path: Path) -> None:
    """object-add tls-creds-x509 and nbd-server-start tls-creds (TLS required: a plain client
    is refused, nbdcopy over nbds+unix:// writes and reads), max-connections, blockdev-add of a
    driver=file node and a qed node naming it, query-named-block-nodes, block-export-add
    allocation-depth, and the errors of each: the same replies as qemu-storage-daemon 11.1's."""
    server_creds, client_creds = _tls_creds(tmp_path)
    ours_img, ref_img = tmp_path / "ours.qed", tmp_path / "ref.qed"
    for image in (ours_img, ref_img):
        qemu_img("create", "-f", "qed", str(image), "16M")
    nbd_sock, ref_sock = tmp_path / "nbd.sock", tmp_path / "ref-nbd.sock"
    client, reference = Raw(served.monitor), Raw(qsd[0])

    def both(cmd: dict[str, Any], mine: dict[str, Any] | None = None,
             theirs: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        def args(extra: dict[str, Any] | None) -> dict[str, Any]:
            return {**cmd, "arguments": {**cmd.get("arguments", {}), **(extra or {})}}
        return client.command(args(mine)), reference.command(args(theirs))

    try:
        creds = {"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", "id": "tls0",
                                                        "dir": str(server_creds), "endpoint": "server",
                                                        "verify-peer": False}}
        assert both(creds) == ({"return": {}}, {"return": {}})
        for cmd, what in [
            (creds, "a duplicate id"),
            ({"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", "id": "c1", "dir": str(client_creds),
                                                     "endpoint": "client"}}, "client credentials"),
            ({"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", "id": "bad",
                                                     "dir": str(tmp_path / "none"), "endpoint": "server"}},
             "a folder that is not there"),
            ({"execute": "object-add", "arguments": {"qom-type": "tls-creds-x509", "id": "y", "dir": str(server_creds),
                                                     "endpoint": "server", "bogus": 1}}, "an unknown argument"),
            ({"execute": "object-del", "arguments": {"id": "nope"}}, "an unknown object"),
        ]:
            ours, theirs = both(cmd)
            assert ours == theirs, what
        for creds_id, what in (("nope", "no such credentials"), ("c1", "client credentials")):
            ours, theirs = both({"execute": "nbd-server-start", "arguments": {"tls-creds": creds_id}},
                                {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}},
                                {"addr": {"type": "unix", "data": {"path": str(ref_sock)}}})
            assert ours == theirs and "error" in ours, what
        ours, theirs = both({"execute": "nbd-server-start", "arguments": {"tls-creds": "tls0", "max-connections": 4,
                                                                          "handshake-max-seconds": 2}},
                            {"addr": {"type": "unix", "data": {"path": str(nbd_sock)}}},
                            {"addr": {"type": "unix", "data": {"path": str(ref_sock)}}})
        assert ours == theirs == {"return": {}}
        assert served.thread.call(lambda: served.backend.nbd is not None and served.backend.nbd.max_connections == 4)
        for sock in (nbd_sock, ref_sock):  # a client that never speaks is dropped after the 2 s given
            idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            idle.settimeout(20)
            idle.connect(str(sock))
            start = time.monotonic()
            while idle.recv(4096):  # the greeting, then the end
                pass
            assert 1.5 < time.monotonic() - start < 20, sock
            idle.close()
        # The server keeps its credentials: the object goes, as in QEMU.
        assert both({"execute": "object-del", "arguments": {"id": "tls0"}}) == ({"return": {}}, {"return": {}})

        assert both({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "ro", "read-only": True}},
                    {"filename": str(ours_img)}, {"filename": str(ref_img)}) == ({"return": {}}, {"return": {}})
        ours, theirs = both({"execute": "blockdev-add", "arguments": {"driver": "qed", "node-name": "w", "file": "ro"}})
        assert ours == theirs and "error" in ours, "a writable node over a read-only file node"
        assert both({"execute": "blockdev-del", "arguments": {"node-name": "ro"}}) == ({"return": {}}, {"return": {}})
        assert both({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f0"}},
                    {"filename": str(ours_img)}, {"filename": str(ref_img)}) == ({"return": {}}, {"return": {}})
        node = {"execute": "blockdev-add", "arguments": {"driver": "qed", "node-name": "d0", "file": "f0"}}
        assert both(node) == ({"return": {}}, {"return": {}})
        for cmd, what in [
            ({"execute": "blockdev-add", "arguments": {"driver": "qed", "node-name": "d1", "file": "nonode"}},
             "a file node that is not there"),
            ({"execute": "blockdev-del", "arguments": {"node-name": "f0"}}, "a file node in use"),
            ({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f1", "filename": str(tmp_path)}},
             "a folder"),
            ({"execute": "blockdev-add", "arguments": {"driver": "file", "node-name": "f1"}}, "no filename"),
            ({"execute": "blockdev-add", "arguments": {"driver": "qed", "node-name": "d1"}}, "no file"),
            ({"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "/x"}},
                                                           "max-connections": -1}}, "a negative limit"),
        ]:
            ours, theirs = both(cmd)
            assert ours == theirs and "error" in ours, what
        ours, theirs = both({"execute": "query-named-block-nodes", "arguments": {"flat": True}})
        assert _nodes(ours, ours_img) == _nodes(theirs, ref_img)
        assert [n["node-name"] for n in ours["return"]] == ["d0", "f0"]
        assert both({"execute": "block-export-add", "arguments": {
            "type": "nbd", "id": "e0", "node-name": "d0", "name": "disk", "writable": True,
            "allocation-depth": True}}) == ({"return": {}}, {"return": {}})

        data = tmp_path / "data.raw"
        data.write_bytes(os.urandom(1 << 20) + bytes(15 << 20))
        for sock in (nbd_sock, ref_sock):
            plain = subprocess.run(["nbdinfo", f"nbd+unix:///disk?socket={sock}"], capture_output=True,
                                   text=True, timeout=30)
            assert plain.returncode != 0, f"a client without TLS was served on {sock}"
            uri = f"nbds+unix:///disk?socket={sock}&tls-certificates={client_creds}"
            subprocess.run(["nbdcopy", str(data), uri], check=True, timeout=60)
            back = tmp_path / "back.raw"
            subprocess.run(["nbdcopy", uri, str(back)], check=True, timeout=60)
            assert back.read_bytes() == data.read_bytes(), sock
            depth = subprocess.run(["nbdinfo", "--map=qemu:allocation-depth", uri], capture_output=True,
                                   text=True, timeout=30)
            assert depth.returncode == 0 and "local" in depth.stdout, depth.stdout + depth.stderr
        for cmd in ({"execute": "block-export-del", "arguments": {"id": "e0"}},
                    {"execute": "nbd-server-stop"},
                    {"execute": "blockdev-del", "arguments": {"node-name": "d0"}},
                    {"execute": "blockdev-del", "arguments": {"node-name": "f0"}}):
            assert both(cmd) == ({"return": {}}, {"return": {}}), cmd
        wait_until(lambda: not nbd_sock.exists(), 10, "the NBD socket to go")
    finally:
        client.close()
        reference.close()
    assert qemu_check(ours_img)[0] == 0


def test_tls_credentials_verify_peers_by_default(tmp_path: Path) -> None:
    """QEMU's default for tls-creds-x509 is verify-peer on: a server endpoint made without it asks
    clients for a certificate; a client endpoint makes no server context."""
    import ssl

    from qbackend.plumbing.tls import X509Credentials

    server_creds, client_creds = _tls_creds(tmp_path)
    made = X509Credentials.load("t", server_creds, "server")
    assert made.context is not None and made.context.verify_mode == ssl.CERT_REQUIRED
    assert X509Credentials.load("t", server_creds, "server", verify_peer=False).context.verify_mode == ssl.CERT_NONE  # type: ignore[union-attr]
    assert X509Credentials.load("c", client_creds).context is None


# -- quit -------------------------------------------------------------------------------------------


def test_quit_stops_cleanly(tmp_path: Path) -> None:
    image = tmp_path / "q.qed"
    qemu_img("create", "-f", "qed", str(image), "16M")
    control, nbd_sock, iv = tmp_path / "qb.sock", tmp_path / "n.sock", tmp_path / "iv.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "serve", "--control", str(control),
                             "--nbd", f"name=q,image={image},format=qed", "--nbd-socket", str(nbd_sock),
                             "--ivshmem", f"socket={iv},size=64K"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: control.exists() and nbd_sock.exists(), 30, "qbackend's sockets")
        subprocess.run([*NBDSH, "-u", f"nbd+unix:///q?socket={nbd_sock}", "-c",
                        "h.pwrite(b'\\x42' * 65536, 0)"], check=True, timeout=30)  # no flush from the client
        client = Raw(control)
        assert client.command({"execute": "query-block-exports"})["return"] == [
            {"type": "nbd", "id": "q", "node-name": "q", "shutting-down": False}]
        assert client.command({"execute": "quit", "id": "bye"}) == {"return": {}, "id": "bye"}
        shutdown = client.receive()
        assert shutdown["event"] == "SHUTDOWN" and shutdown["data"] == {"guest": False, "reason": "host-qmp-quit"}
        client.close()
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stdout is not None
        proc.stdout.close()
    assert not control.exists() and not nbd_sock.exists() and not iv.exists()
    assert qemu_check(image)[0] == 0
    qemu_io(image, "read -P 0x42 0 64k")  # raises on a pattern mismatch



def test_twenty_runtime_export_cycles_leak_nothing(served: Served, tmp_path: Path) -> None:
    """blockdev-add, block-export-add, a client, block-export-del, blockdev-del: 20 times; the
    process's fds and memfd/file mappings are where they were (an export's image is closed)."""
    from qbackend.testing.harness import mappings

    image = tmp_path / "cycle.qed"
    qemu_img("create", "-f", "qed", str(image), "8M")
    sock = tmp_path / "cycle.sock"
    client = Raw(served.monitor)
    try:
        assert client.command({"execute": "nbd-server-start", "arguments": {
            "addr": {"type": "unix", "data": {"path": str(sock)}}}}) == {"return": {}}

        def cycle(n: int) -> None:
            for cmd in ({"execute": "blockdev-add", "arguments": {"driver": "qed", "node-name": f"c{n}",
                                                                  "file": {"driver": "file", "filename": str(image)}}},
                        {"execute": "block-export-add", "arguments": {"type": "nbd", "id": f"e{n}",
                                                                      "node-name": f"c{n}", "name": "c",
                                                                      "writable": True}}):
                assert client.command(cmd) == {"return": {}}, cmd
            assert _nbdinfo_size(f"nbd+unix:///c?socket={sock}") == 8 << 20
            assert client.command({"execute": "block-export-del", "arguments": {"id": f"e{n}"}}) == {"return": {}}
            assert client.command({"execute": "blockdev-del", "arguments": {"node-name": f"c{n}"}}) == {"return": {}}

        cycle(0)  # warm-up: lazy imports, the server's first connection
        fds, maps = open_fds(), mappings(str(image))
        for n in range(1, 21):
            cycle(n)
        wait_until(lambda: open_fds() <= fds, 10, "the fds back", seen=lambda: open_fds() - fds)
        assert mappings(str(image)) == maps == 0
        assert client.command({"execute": "nbd-server-stop"}) == {"return": {}}
    finally:
        client.close()


def test_pci_device_add_with_a_socket_in_a_missing_folder_is_an_error_and_makes_nothing(served: Served) -> None:
    client = Raw(served.monitor)
    try:
        missing = served.workdir / "no" / "such" / "dir"
        reply = client.command({"execute": "pci-device-add", "id": 1, "arguments": {
            "driver": "ivshmem", "id": "nowhere", "socket": str(missing / "x.sock")}})
        assert reply["error"]["class"] == "GenericError", reply
        assert "does not exist" in reply["error"]["desc"] and str(missing) in reply["error"]["desc"], reply
        assert not (served.workdir / "no").exists()
        assert "nowhere" not in served.backend.devices
        assert client.command({"execute": "query-pci-hotplug", "id": 2})["id"] == 2  # and the monitor goes on
    finally:
        client.close()
