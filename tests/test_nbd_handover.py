"""The NBD server's hand-over to a new server (`qbackend upgrade`), in one process:
server A serves a QED and a raw image to real clients (libnbd with structured
replies and base:allocation, in a thread of its own after a 1 MiB read;
QEMU's qemu-io with extended headers, in the native loop) and to a raw client
in the middle of a stream of pipelined requests; A pauses, saves, the fds go
through a real socket pair, B (the same exports, the images opened again)
adopts them and serves; A lets go of its copies.  Every request is answered
exactly once, with the right data and block status, by A before the pause or
by B after it; a new client is served by B on the same listeners; no fd is
left behind.  And a pause that ends in resume() on A."""

from __future__ import annotations

import json
import os
import queue
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from nbd_raw_client import RawNbd
from qed_tools import qemu, qemu_img

from qbackend.block.exports import Export, open_export
from qbackend.options import NbdExportOptions
from qbackend.plumbing.handover import Loader, Saver, recv_state, send_state, socket_pair
from qbackend.protocol import nbd
from qbackend.servers.nbd import NbdServer

SIZE = 16 << 20
T = TypeVar("T")

# A libnbd client in the system Python (where the bindings are), driven line by line:
# one JSON command in, one JSON answer out.
LIBNBD_CLIENT = r"""
import hashlib, json, sys
import nbd
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
print(json.dumps({"structured": h.get_structured_replies_negotiated(),
                  "meta": h.can_meta_context("base:allocation")}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    op = cmd["op"]
    if op == "pread":
        out = {"sha": hashlib.sha256(h.pread(cmd["length"], cmd["offset"])).hexdigest()}
    elif op == "pwrite":
        h.pwrite(bytes([cmd["byte"]]) * cmd["length"], cmd["offset"])
        out = {}
    elif op == "flush":
        h.flush()
        out = {}
    elif op == "block_status":
        extents = []
        def got(context, offset, entries, err):
            extents.extend(zip(entries[::2], entries[1::2]))
        h.block_status(cmd["length"], cmd["offset"], got)
        out = {"extents": extents}
    else:
        break
    print(json.dumps(out), flush=True)
h.shutdown()
"""


def have_libnbd() -> bool:
    return subprocess.run(["/usr/bin/python3", "-c", "import nbd"], capture_output=True).returncode == 0


def sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def socket_inodes() -> dict[int, int]:
    """fd -> inode of every socket this process has open."""
    out = {}
    for fd in open_fds():
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            out[fd] = int(target[len("socket:["):-1])
    return out


# -- a trio thread that runs the servers while the test drives the clients -------------------


class Servers:
    def __init__(self) -> None:
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(10)

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def run(self, fn: Callable[[], Awaitable[T]], timeout: float = 30) -> T:
        async def bounded() -> T:
            with trio.fail_after(timeout):
                return await fn()
        return trio.from_thread.run(bounded, trio_token=self.token)

    def run_sync(self, fn: Callable[[], T]) -> T:
        return trio.from_thread.run_sync(fn, trio_token=self.token)

    def start(self, server: NbdServer) -> Callable[[], None]:
        """Serve; the function returned stops the server and waits for its end."""
        scope = trio.CancelScope()
        done = trio.Event()

        async def serve(task_status: trio.TaskStatus[None]) -> None:
            try:
                with scope:
                    await server.serve(task_status=task_status)
            finally:
                done.set()

        self.run(lambda: self.nursery.start(serve))

        def stop() -> None:
            async def cancel_and_wait() -> None:
                scope.cancel()
                await done.wait()
            self.run(cancel_and_wait)
        return stop

    def close(self) -> None:
        self.run_sync(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive()


# -- clients -------------------------------------------------------------------------------


class LibnbdClient:
    """libnbd in a process of its own: structured replies, base:allocation."""

    def __init__(self, uri: str) -> None:
        self.proc = subprocess.Popen(["/usr/bin/python3", "-c", LIBNBD_CLIENT, uri], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.negotiated = self._answer()

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the libnbd client ended ({self.proc.wait(10)})"
        answer: dict[str, Any] = json.loads(line)
        return answer

    def __call__(self, op: str, **args: int) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, **args}) + "\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0
        self.proc.stdout.close()


class QemuIo:
    """QEMU's qemu-io, interactive: it negotiates extended headers."""

    def __init__(self, uri: str) -> None:
        q = qemu()
        self.proc = subprocess.Popen([*q.tool_cmd("qemu-io"), "-f", "raw", uri], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=q.env())

    def __call__(self, command: str) -> str:
        """The output of a read or write: up to its statistics line (or its error)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(f"{command}\n")
        self.proc.stdin.flush()
        out = ""
        while True:
            line = self.proc.stdout.readline()
            assert line, f"qemu-io ended: {out}"
            out += line
            if " ops; " in line or "failed:" in line:
                return out

    def close(self) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.close()
        self.proc.wait(30)
        self.proc.stdout.close()


class Pipelined:
    """A raw client with structured replies and base:allocation that sends requests
    without waiting for their replies; a thread of its own receives them."""

    def __init__(self, path: Path, name: str) -> None:
        self.c = RawNbd(str(path), timeout=60)
        self.c.client_flags()
        self.c.go(name)
        self.sent: dict[int, tuple[int, int, int]] = {}  # cookie -> (command, offset, length)
        self.replies: queue.Queue[tuple[int, int, int, bytes]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        try:
            while True:
                self.replies.put(self.c.structured_reply())
        except (EOFError, OSError):
            pass

    def send(self, command: int, offset: int, length: int, data: bytes = b"", partial: int | None = None) -> int:
        """One request (its first `partial` bytes only, with the rest given to finish())."""
        self.c.cookie += 1
        cookie = self.c.cookie
        raw = nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, command, cookie, offset, length) + data
        self.sent[cookie] = (command, offset, length)
        self.c.sock.sendall(raw if partial is None else raw[:partial])
        self._rest = b"" if partial is None else raw[partial:]
        return cookie

    def finish(self) -> None:
        self.c.sock.sendall(self._rest)

    def stream(self, n: int, reads: bytes, write_at: int) -> None:
        """n requests: 4 KiB READs of `reads` (offsets 0..), 4 KiB WRITEs from write_at,
        BLOCK_STATUS and FLUSH among them."""
        for i in range(n):
            kind = i % 8
            if kind == 6:
                self.send(nbd.Cmd.BLOCK_STATUS, 0, 1 << 20)
            elif kind == 7:
                self.send(nbd.Cmd.FLUSH, 0, 0)
            elif kind % 2:
                self.send(nbd.Cmd.WRITE, write_at + i * 4096, 4096, bytes([i % 251 + 1]) * 4096)
            else:
                offset = (i * 4096) % (len(reads) - 4096)
                self.send(nbd.Cmd.READ, offset, 4096)

    def collect(self, count: int, timeout: float = 30) -> dict[int, tuple[int, int, bytes]]:
        out: dict[int, tuple[int, int, bytes]] = {}
        deadline = time.monotonic() + timeout
        while len(out) < count:
            cookie, rtype, flags, payload = self.replies.get(timeout=max(0.0, deadline - time.monotonic()))
            assert cookie in self.sent and cookie not in out, f"a reply to {cookie} not awaited, or twice"
            assert flags & nbd.REPLY_FLAG_DONE, "one chunk per reply here"
            out[cookie] = (rtype, flags, payload)
        return out

    def nothing_more(self, seconds: float) -> bool:
        try:
            self.replies.get(timeout=seconds)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.c.request(nbd.Cmd.DISC)
        self.c.close()
        self._reader.join(10)


def check_replies(p: Pipelined, got: dict[int, tuple[int, int, bytes]], reads: bytes) -> None:
    for cookie, (rtype, _flags, payload) in got.items():
        command, offset, length = p.sent[cookie]
        if command == nbd.Cmd.READ:
            assert rtype == nbd.ChunkType.OFFSET_DATA
            assert struct.unpack_from(">Q", payload)[0] == offset
            assert payload[8:] == reads[offset:offset + length], f"READ {cookie} at {offset:#x}"
        elif command == nbd.Cmd.BLOCK_STATUS:
            assert rtype == nbd.ChunkType.BLOCK_STATUS
            context, = struct.unpack_from(">I", payload)
            assert context == nbd.BASE_ALLOCATION_ID
            assert struct.unpack_from(">II", payload, 4) == (1 << 20, 0)  # data, all of it
        else:
            assert rtype == nbd.ChunkType.NONE, f"{command} {cookie}: {rtype}"


def greeted(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        data = sock.recv(nbd.GREETING.size, socket.MSG_WAITALL)
    except TimeoutError:
        return False
    return nbd.GREETING.unpack(data)[:2] == (nbd.NBDMAGIC, nbd.IHAVEOPT)


# -- the images -------------------------------------------------------------------------------


class Images:
    def __init__(self, work: Path) -> None:
        self.raw = work / "disk.raw"
        self.reads = os.urandom(4 << 20)  # the raw image's first 4 MiB; the rest is written
        with open(self.raw, "wb") as f:
            f.write(self.reads)
            f.truncate(SIZE)
        self.qed = work / "disk.qed"
        qemu_img("create", "-f", "qed", "-o", "cluster_size=65536", str(self.qed), str(SIZE))
        self.socket = work / "nbd.sock"

    def exports(self) -> dict[str, Export]:
        return {"raw": open_export(NbdExportOptions.parse(f"name=raw,image={self.raw},format=raw")),
                "qed": open_export(NbdExportOptions.parse(f"name=qed,image={self.qed},format=qed"))}

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.socket}"


needs_libnbd = pytest.mark.skipif(not have_libnbd(), reason="libnbd's Python bindings (python3-libnbd)")


@needs_libnbd
def test_a_new_server_takes_over_every_connection_and_listener(tmp_path: Path) -> None:
    baseline = open_fds()
    servers = Servers()
    images = Images(tmp_path)
    exports_a = images.exports()
    a = NbdServer(dict(exports_a), images.socket, ("127.0.0.1", 0))
    stop_a = servers.start(a)
    port = a.tcp_port
    assert port

    # Real clients, each in a different driver: libnbd (QED, structured, base:allocation)
    # moves to a thread of its own with a 1 MiB read; qemu-io (raw, extended headers) stays
    # in the native loop with 4 KiB requests.
    lib = LibnbdClient(images.uri("qed"))
    assert lib.negotiated == {"structured": True, "meta": True}
    lib("pwrite", offset=1 << 20, length=1 << 20, byte=0x3c)
    assert lib("pread", offset=1 << 20, length=1 << 20) == {"sha": sha(b"\x3c" * (1 << 20))}
    io = QemuIo(images.uri("raw"))
    out = io(f"write -P 0x5e {8 << 20} 4k")
    assert "wrote 4096/4096" in out, out
    out = io(f"read -P 0x5e {8 << 20} 4k")
    assert "read 4096/4096" in out and "failed" not in out, out
    # A raw client in the middle of a stream: 64 requests answered by A, then the first
    # 10 bytes of a READ, which A receives and cannot serve yet.
    pipe = Pipelined(images.socket, "raw")
    pipe.stream(64, images.reads, 10 << 20)
    before = pipe.collect(64)
    split = pipe.send(nbd.Cmd.READ, 12288, 4096, partial=10)
    time.sleep(0.3)
    assert sum(c.protocol.extended for c in a.connections) == 1  # qemu-io's
    assert a.stats["promoted_to_thread"] >= 1  # libnbd's, after its 1 MiB read

    servers.run(a.pause, timeout=20)
    # Paused: more requests go into the socket; nothing answers them.
    pipe.finish()
    # (from a thread: the socket takes only so much while nobody reads it)
    sending = threading.Thread(target=pipe.stream, args=(24, images.reads, 11 << 20))
    sending.start()
    assert pipe.nothing_more(0.3)
    late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    late.connect(str(images.socket))  # waits in the backlog
    assert not greeted(late, 0.3)

    saver = Saver()
    state = servers.run_sync(lambda: a.save(saver))
    split_state = [c for c in state["connections"] if c["received"]]
    assert len(split_state) == 1 and split_state[0]["export"] == "raw"  # the 10 bytes travel
    assert sorted((c["export"], c["extended"], c["structured"]) for c in state["connections"]) == [
        ("qed", False, True), ("raw", False, True), ("raw", True, True)]
    assert [m for c in state["connections"] if c["export"] == "qed" for m in c["meta_contexts"]] == [
        [nbd.BASE_ALLOCATION, nbd.BASE_ALLOCATION_ID]]
    mine, theirs = socket_pair()
    sender = threading.Thread(target=send_state, args=(mine, {"nbd": state}, saver.fds))
    sender.start()
    got, fds = recv_state(theirs)
    sender.join(10)
    mine.close()
    theirs.close()
    assert len(fds) == len(saver.fds) == 2 + 3

    handed = {os.fstat(fd).st_ino for fd in saver.fds}
    assert len(handed) == len(saver.fds)
    b = NbdServer(images.exports(), images.socket, ("127.0.0.1", 0))
    loader = Loader(fds)
    b.adopt(got["nbd"], loader)
    loader.close_rest()
    stop_b = servers.start(b)
    assert b.tcp_port == port
    # A lets go of its copies (a real upgrade's old process exits): closed, none shut down.
    a.release()
    stop_a()
    # Each socket A handed over is open once now: B's copy.
    assert sorted(Counter(socket_inodes().values())[inode] for inode in handed) == [1] * len(handed)
    for export in exports_a.values():  # (left to us by release(); nothing to write: paused, clean)
        export.close()

    # Everything goes on, served by B.
    after = pipe.collect(1 + 24)
    sending.join(10)
    assert split in after and not set(after) & set(before)
    check_replies(pipe, before | after, images.reads)
    assert len(before | after) == len(pipe.sent)
    assert greeted(late, 10)  # the client that waited in the backlog
    late.close()
    assert lib("pread", offset=1 << 20, length=1 << 20) == {"sha": sha(b"\x3c" * (1 << 20))}
    lib("pwrite", offset=4 << 20, length=65536, byte=0x7d)
    lib("flush")
    assert lib("pread", offset=4 << 20, length=65536) == {"sha": sha(b"\x7d" * 65536)}
    status = lib("block_status", offset=0, length=SIZE)["extents"]
    assert status[:4] == [[1 << 20, 3], [1 << 20, 0], [2 << 20, 3], [65536, 0]], status
    out = io(f"read -P 0x5e {8 << 20} 4k")
    assert "read 4096/4096" in out and "failed" not in out, out
    out = io(f"write -P 0x6f {9 << 20} 4k")
    assert "wrote 4096/4096" in out, out
    new = Pipelined(images.socket, "raw")
    new.stream(16, images.reads, 12 << 20)
    check_replies(new, new.collect(16), images.reads)
    new.close()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as tcp:
        assert greeted(tcp, 10)
    served = b.connections_served
    assert served == 3 + 2 + 1  # the adopted three, the one from the backlog, the new ones
    io.close()
    lib.close()
    pipe.close()
    stop_b()
    servers.close()

    # What the clients wrote is in the images, through A or B.
    with open(images.raw, "rb") as f:
        for written, n in ((10 << 20, 64), (11 << 20, 24)):
            f.seek(written)
            data = f.read(n * 4096)
            for i in range(1, n, 2):
                if i % 8 in (1, 3, 5):
                    assert data[i * 4096:(i + 1) * 4096] == bytes([i % 251 + 1]) * 4096
        f.seek(9 << 20)
        assert f.read(4096) == b"\x6f" * 4096
    check = subprocess.run([*qemu().tool_cmd("qemu-img"), "check", "-f", "qed", str(images.qed)],
                           capture_output=True, text=True, env=qemu().env())
    assert check.returncode == 0, check.stdout + check.stderr
    assert open_fds() == baseline


@needs_libnbd
def test_a_paused_server_resumes_where_it_stopped(tmp_path: Path) -> None:
    baseline = open_fds()
    servers = Servers()
    images = Images(tmp_path)
    a = NbdServer(images.exports(), images.socket)
    stop_a = servers.start(a)
    lib = LibnbdClient(images.uri("qed"))
    lib("pwrite", offset=0, length=1 << 20, byte=0x11)  # 1 MiB: a thread of its own from here
    pipe = Pipelined(images.socket, "raw")
    pipe.stream(32, images.reads, 10 << 20)
    before = pipe.collect(32)
    split = pipe.send(nbd.Cmd.READ, 4096, 4096, partial=20)
    time.sleep(0.3)
    fds_serving = open_fds()

    servers.run(a.pause, timeout=20)
    assert all(c.parked for c in a.connections) and len(a.connections) == 2
    pipe.finish()
    sending = threading.Thread(target=pipe.stream, args=(24, images.reads, 11 << 20))
    sending.start()
    late = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    late.connect(str(images.socket))
    assert pipe.nothing_more(0.3) and not greeted(late, 0.1)
    answered: list[dict[str, Any]] = []
    waiting = threading.Thread(target=lambda: answered.append(lib("pread", offset=0, length=1 << 20)))
    waiting.start()
    waiting.join(0.3)
    assert not answered  # the threaded connection is parked too

    servers.run(a.resume)
    after = pipe.collect(1 + 24)
    sending.join(10)
    assert split in after and not set(after) & set(before)
    check_replies(pipe, before | after, images.reads)
    waiting.join(10)
    assert answered == [{"sha": sha(b"\x11" * (1 << 20))}]
    assert greeted(late, 10)
    late.close()
    assert lib("block_status", offset=0, length=2 << 20)["extents"][:2] == [[1 << 20, 0], [1 << 20, 3]]
    assert open_fds() == fds_serving  # the same sockets, nothing more
    lib.close()
    pipe.close()
    stop_a()
    servers.close()
    assert open_fds() == baseline


def test_tls_connections_are_closed_at_the_pause_and_plain_ones_carried(tmp_path: Path) -> None:
    import ssl

    import trustme

    ca = trustme.CA()
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    baseline = open_fds()
    servers = Servers()
    images = Images(tmp_path)
    a = NbdServer(images.exports(), images.socket, tls_mode="on", tls_context=server_context)
    stop_a = servers.start(a)
    tls = RawNbd(str(images.socket), timeout=10)
    tls.client_flags()
    tls.option(nbd.Option.STARTTLS)
    assert tls.opt_reply().type == nbd.OptionReply.ACK
    tls.sock = client_context.wrap_socket(tls.sock, server_hostname="localhost")
    tls.go("raw")
    cookie = tls.request(nbd.Cmd.READ, 0, 4096)
    assert tls.structured_reply() == (cookie, nbd.ChunkType.OFFSET_DATA, nbd.REPLY_FLAG_DONE,
                                      struct.pack(">Q", 0) + images.reads[:4096])
    plain = Pipelined(images.socket, "raw")
    plain.stream(8, images.reads, 10 << 20)
    plain.collect(8)

    servers.run(a.pause, timeout=20)
    assert a.stats["closed_at_pause"] == 1
    assert tls.closed_by_server()  # QEMU's client reconnects (reconnect-delay), to whoever serves then
    saver = Saver()
    state = servers.run_sync(lambda: a.save(saver))
    assert [c["export"] for c in state["connections"]] == ["raw"]  # the plain one only
    servers.run(a.resume)
    plain.stream(8, images.reads, 11 << 20)
    check_replies(plain, plain.collect(8), images.reads)
    plain.close()
    tls.close()
    stop_a()
    servers.close()
    assert open_fds() == baseline
