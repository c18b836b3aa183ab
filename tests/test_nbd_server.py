"""The NBD server with raw-file exports: real clients (libnbd's nbdinfo and
nbdcopy, QEMU 11.1's qemu-img and qemu-io) and a raw-socket client that
sends bad input on purpose.  Where qemu-nbd departs from the spec (EINVAL
for writes past the end and to read-only exports), these tests follow the
spec and say so."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from nbd_raw_client import RawNbd

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend
from qbackend.block.qed import QedImage
from qbackend.machine.launch import QemuInstall, find_qemu
from qbackend.options import NbdExportOptions
from qbackend.protocol import nbd
from qbackend.servers.nbd import LOOP_BATCH
from qbackend.testing.harness import wait_until

SIZE = 32 << 20


@dataclass
class Served:
    thread: BackendThread
    backend: Backend
    socket: Path
    disk: Path
    ro: Path
    qdisk: Path  # a QED export, for the consistency checks
    qemu: QemuInstall

    def uri(self, name: str) -> str:
        return f"nbd+unix:///{name}?socket={self.socket}"

    def tool(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = self.qemu.tool_cmd(name) if name.startswith("qemu") else [name]
        result = subprocess.run([*cmd, *args], capture_output=True, text=True, env=self.qemu.env(), timeout=120)
        if check and result.returncode != 0:
            raise AssertionError(f"{name} {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, access_path: str) -> Iterator[Served]:
    work: Path = tmp_path_factory.mktemp("nbd")
    disk, ro = work / "disk.raw", work / "ro.raw"
    with open(disk, "wb") as f:
        f.truncate(SIZE)
        f.seek(4 << 20)
        f.write(os.urandom(1 << 20))  # one data extent in a sparse file
    with open(ro, "wb") as f:
        f.write(os.urandom(1 << 20))
    qemu = find_qemu()
    qdisk = work / "q.qed"
    subprocess.run([*qemu.tool_cmd("qemu-img"), "create", "-f", "qed", "-o", "cluster_size=4096", str(qdisk),
                    str(SIZE)], check=True, capture_output=True, env=qemu.env())
    backend = Backend()
    sock = work / "nbd.sock"
    backend.add_nbd([NbdExportOptions.parse(f"name=disk,image={disk},format=raw"),
                     NbdExportOptions.parse(f"name=ro,image={ro},readonly=on"),
                     NbdExportOptions.parse(f"name=qdisk,image={qdisk},format=qed")], sock, ("127.0.0.1", 0))
    with BackendThread(backend) as thread:
        yield Served(thread, backend, sock, disk, ro, qdisk, qemu)


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def settled_fds(s: Served) -> set[int]:
    """The process's fds once no NBD connection is left from earlier tests."""
    wait_no_connections(s)
    return open_fds()


def wait_no_connections(s: Served) -> None:
    assert s.backend.nbd is not None
    deadline = time.monotonic() + 5
    while s.backend.nbd.connections and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not s.backend.nbd.connections


# -- real clients ----------------------------------------------------------------------


def test_the_read_path_under_test_is_the_one_serving(served: Served, access_path: str) -> None:
    """Every test here runs once per path (tests/conftest.py); make sure each run tests the one it names."""
    server = served.backend.nbd
    assert server is not None
    before = served.thread.call(lambda: server.counts()["native_reads"])
    c = connected(served)
    try:
        for n in range(8):
            cookie = c.request(nbd.Cmd.READ, n * 4096, 4096)
            assert c.error_of(cookie) == 0
    finally:
        c.close()
    served_natively = served.thread.call(lambda: server.counts()["native_reads"]) - before
    assert served_natively == (8 if access_path == "native" else 0)


def test_nbdinfo_lists_exports_sizes_block_sizes_and_contexts(served: Served) -> None:
    out = served.tool("nbdinfo", "--list", "--json", f"nbd+unix:///?socket={served.socket}").stdout
    doc = json.loads(out)
    exports = {e["export-name"]: e for e in doc["exports"]}
    assert set(exports) == {"disk", "ro", "qdisk"}
    assert exports["disk"]["export-size"] == SIZE
    assert exports["ro"]["is_read_only"] is True and exports["disk"]["is_read_only"] is False
    assert exports["disk"]["block_size_minimum"] == 1
    assert exports["disk"]["block_size_preferred"] == 4096
    assert exports["disk"]["block_size_maximum"] == 32 << 20
    # Both, as qemu-nbd -A offers them (tests/test_nbd_allocation_depth.py compares the depths).
    assert exports["disk"]["contexts"] == ["base:allocation", "qemu:allocation-depth"]
    assert doc["protocol"] == "newstyle-fixed"


def test_nbdcopy_both_ways_byte_for_byte(served: Served, tmp_path: Path) -> None:
    out = tmp_path / "copy.raw"
    served.tool("nbdcopy", served.uri("disk"), str(out))
    assert out.read_bytes() == served.disk.read_bytes()
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(SIZE))
    served.tool("nbdcopy", str(src), served.uri("disk"))
    back = tmp_path / "back.raw"
    served.tool("nbdcopy", served.uri("disk"), str(back))
    assert back.read_bytes() == src.read_bytes() == served.disk.read_bytes()


def test_qemu_img_convert_compare_and_map(served: Served, tmp_path: Path) -> None:
    with open(served.disk, "r+b") as f:  # fresh sparse content: holes and one data run
        f.truncate(0)
        f.truncate(SIZE)
        f.seek(8 << 20)
        f.write(os.urandom(2 << 20))
    out = tmp_path / "conv.raw"
    served.tool("qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri("disk"), str(out))
    assert out.read_bytes() == served.disk.read_bytes()
    served.tool("qemu-img", "compare", "-f", "raw", "-F", "raw", served.uri("disk"), str(served.disk))
    qmap = json.loads(served.tool("qemu-img", "map", "-f", "raw", "--output=json", served.uri("disk")).stdout)
    theirs = [(e["start"], e["length"], e["data"], e["zero"]) for e in qmap]
    export = served.backend.nbd.exports["disk"]  # type: ignore[union-attr]
    ours, pos = [], 0
    for n, flags in export.block_status(0, SIZE):
        ours.append((pos, n, not flags & nbd.AllocationFlags.HOLE, bool(flags & nbd.AllocationFlags.ZERO)))
        pos += n
    assert theirs == ours
    assert (8 << 20, 2 << 20, True, False) in ours


def test_qemu_io_read_write_zero_discard(served: Served) -> None:
    uri = served.uri("disk")

    def io(*cmds: str) -> str:
        args = ["-f", "raw"]
        for c in cmds:
            args += ["-c", c]
        result = served.tool("qemu-io", *args, uri)
        assert "error" not in result.stdout.lower() and "fail" not in result.stdout.lower(), result.stdout
        return result.stdout

    io("write -P 0xab 0 1M", "write -P 0xcd 1M 64k")
    io("read -P 0xab 0 1M", "read -P 0xcd 1M 64k")
    io("write -z 64k 64k", "read -P 0 64k 64k", "read -P 0xab 0 64k")
    io("discard 512k 512k", "read -P 0 512k 512k")
    with open(served.disk, "rb") as f:
        data = f.read(2 << 20)
    assert data[:65536] == b"\xab" * 65536 and data[65536:131072] == bytes(65536)
    assert data[(1 << 20):(1 << 20) + 65536] == b"\xcd" * 65536


def test_multi_conn_flush_is_visible_across_connections(served: Served) -> None:
    # Two connections: a write on one, FLUSH on the other, read back on the first.
    a, b = RawNbd(str(served.socket)), RawNbd(str(served.socket))
    try:
        for c in (a, b):
            c.client_flags()
            c.go("disk")
        payload = os.urandom(4096)
        assert a.error_of(a.request(nbd.Cmd.WRITE, 12288, 4096, payload)) == 0
        assert b.error_of(b.request(nbd.Cmd.FLUSH)) == 0
        cookie = b.request(nbd.Cmd.READ, 12288, 4096)
        got, rtype, _flags, data = b.structured_reply()
        assert (got, rtype) == (cookie, nbd.ChunkType.OFFSET_DATA) and data[8:] == payload
    finally:
        a.close()
        b.close()
    wait_no_connections(served)


# -- bad input -------------------------------------------------------------------------


def connected(served: Served, name: str = "disk", structured: bool = True) -> RawNbd:
    c = RawNbd(str(served.socket))
    c.client_flags()
    replies = c.go(name, structured=structured)
    assert replies[-1].type == nbd.OptionReply.ACK
    return c


def bystander_ok(served: Served) -> None:
    c = connected(served)
    try:
        cookie = c.request(nbd.Cmd.READ, 0, 512)
        assert c.structured_reply()[0] == cookie
    finally:
        c.close()


HANDSHAKE_DROPS = {
    "unknown client flags": lambda c: c.client_flags(0x80 | 1),
    "no fixed newstyle": lambda c: c.client_flags(0),
    "bad option magic": lambda c: (c.client_flags(), c.option(nbd.Option.GO, b"", magic=0x1234)),
    "option of gigabytes": lambda c: (c.client_flags(), c.option(nbd.Option.GO, b"", length=3 << 30)),
    "export name unknown": lambda c: (c.client_flags(), c.option(nbd.Option.EXPORT_NAME, b"nope")),
    "vanishes mid-option": lambda c: (c.client_flags(), c.option(nbd.Option.GO, b"\0\0", length=100)),
}


@pytest.mark.parametrize("case", sorted(HANDSHAKE_DROPS))
def test_handshake_abuse_is_dropped_cleanly(served: Served, case: str) -> None:
    before = settled_fds(served)
    c = RawNbd(str(served.socket))
    HANDSHAKE_DROPS[case](c)
    if case == "vanishes mid-option":
        c.sock.shutdown(1)
    if case == "option of gigabytes":
        assert c.opt_reply().type == nbd.OptionReply.ERR_TOO_BIG
    assert c.closed_by_server()
    c.close()
    wait_no_connections(served)
    assert open_fds() == before
    bystander_ok(served)


def test_unknown_option_and_bad_option_data_get_errors_and_continue(served: Served) -> None:
    c = RawNbd(str(served.socket))
    try:
        c.client_flags()
        c.option(99)
        assert c.opt_reply().type == nbd.OptionReply.ERR_UNSUP
        c.option(nbd.Option.LIST, b"junk")
        assert c.opt_reply().type == nbd.OptionReply.ERR_INVALID
        c.option(nbd.Option.GO, b"\0\0\0\x50abc")  # name longer than the option
        assert c.opt_reply().type == nbd.OptionReply.ERR_INVALID
        c.option(nbd.Option.GO, b"\0\0\0\x04nope\0\0")
        assert c.opt_reply().type == nbd.OptionReply.ERR_UNKNOWN
        c.option(nbd.Option.SET_META_CONTEXT, b"\0\0\0\x04disk\0\0\0\0")  # before STRUCTURED_REPLY
        assert c.opt_reply().type == nbd.OptionReply.ERR_INVALID
        replies = c.go("disk")  # and the session still works
        assert replies[-1].type == nbd.OptionReply.ACK
        cookie = c.request(nbd.Cmd.READ, 0, 4096)
        assert c.structured_reply()[:2] == (cookie, nbd.ChunkType.OFFSET_DATA)
    finally:
        c.close()


REQUEST_ERRORS = {
    # name: (export, command, offset, length, flags, data, expected error)
    "read past the end": ("disk", nbd.Cmd.READ, SIZE - 512, 1024, 0, b"", nbd.Errno.EINVAL),
    "read at 2^63": ("disk", nbd.Cmd.READ, 1 << 63, 512, 0, b"", nbd.Errno.EINVAL),
    "read wrapping 64 bits": ("disk", nbd.Cmd.READ, (1 << 64) - 512, 1024, 0, b"", nbd.Errno.EINVAL),
    "read of length 0": ("disk", nbd.Cmd.READ, 0, 0, 0, b"", nbd.Errno.EINVAL),
    # qemu-nbd answers EINVAL here; the spec says ENOSPC.
    "write past the end": ("disk", nbd.Cmd.WRITE, SIZE, 512, 0, bytes(512), nbd.Errno.ENOSPC),
    "zeroes past the end": ("disk", nbd.Cmd.WRITE_ZEROES, SIZE - 512, 4096, 0, b"", nbd.Errno.ENOSPC),
    "trim past the end": ("disk", nbd.Cmd.TRIM, SIZE, 512, 0, b"", nbd.Errno.EINVAL),
    "unknown command": ("disk", 99, 0, 512, 0, b"", nbd.Errno.EINVAL),
    "NO_HOLE on a read": ("disk", nbd.Cmd.READ, 0, 512, nbd.CmdFlags.NO_HOLE, b"", nbd.Errno.EINVAL),
    "unknown flag": ("disk", nbd.Cmd.READ, 0, 512, 0x100, b"", nbd.Errno.EINVAL),
    "FUA on a read": ("disk", nbd.Cmd.READ, 0, 512, nbd.CmdFlags.FUA, b"", nbd.Errno.EINVAL),
    "read over 32 MiB": ("disk", nbd.Cmd.READ, 0, (32 << 20) + 1, 0, b"", nbd.Errno.EINVAL),
    # qemu-nbd answers EINVAL; the spec says EPERM.
    "write to a read-only export": ("ro", nbd.Cmd.WRITE, 0, 512, 0, bytes(512), nbd.Errno.EPERM),
    "trim on a read-only export": ("ro", nbd.Cmd.TRIM, 0, 512, 0, b"", nbd.Errno.EPERM),
    "fast zero without holes": ("disk", nbd.Cmd.WRITE_ZEROES, 0, 4096,
                                nbd.CmdFlags.FAST_ZERO | nbd.CmdFlags.NO_HOLE, b"", nbd.Errno.ENOTSUP),
}


@pytest.mark.parametrize("case", sorted(REQUEST_ERRORS))
def test_bad_request_gets_the_spec_error_and_the_connection_goes_on(served: Served, case: str) -> None:
    name, command, offset, length, flags, data, error = REQUEST_ERRORS[case]
    before_disk = served.disk.read_bytes()[-4096:]
    c = connected(served, name)
    try:
        cookie = c.request(command, offset, length, data, flags)
        assert c.error_of(cookie) == error
        cookie = c.request(nbd.Cmd.READ, 0, 512)
        assert c.structured_reply()[0] == cookie
    finally:
        c.close()
    assert served.disk.read_bytes()[-4096:] == before_disk
    bystander_ok(served)


def test_errors_without_structured_replies_are_simple(served: Served) -> None:
    c = connected(served, structured=False)
    try:
        cookie = c.request(nbd.Cmd.READ, SIZE, 512)
        magic, error, got = nbd.SIMPLE_REPLY.unpack(c.recv_exact(nbd.SIMPLE_REPLY.size))
        assert (magic, error, got) == (nbd.SIMPLE_REPLY_MAGIC, nbd.Errno.EINVAL, cookie)
        cookie = c.request(nbd.Cmd.READ, 0, 512, flags=nbd.CmdFlags.DF)  # DF needs structured replies
        assert nbd.SIMPLE_REPLY.unpack(c.recv_exact(nbd.SIMPLE_REPLY.size))[1] == nbd.Errno.EINVAL
        cookie = c.request(nbd.Cmd.BLOCK_STATUS, 0, 512)  # no meta context
        assert nbd.SIMPLE_REPLY.unpack(c.recv_exact(nbd.SIMPLE_REPLY.size))[1] == nbd.Errno.EINVAL
    finally:
        c.close()


def test_bad_request_magic_and_vanishing_writer_are_dropped(served: Served) -> None:
    before = settled_fds(served)
    c = connected(served)
    c.request(nbd.Cmd.READ, 0, 512, magic=0xDEADBEEF)
    assert c.closed_by_server()
    c.close()
    keep = served.disk.read_bytes()[:1 << 20]
    c = connected(served)
    c.sock.sendall(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.Cmd.WRITE, 7, 0, 1 << 20) + b"x" * 1000)
    c.close()  # gone in the middle of the payload
    wait_no_connections(served)
    assert served.disk.read_bytes()[:1 << 20] == keep  # nothing half-written
    assert open_fds() == before
    bystander_ok(served)


def test_large_reads_of_a_connection_with_its_own_thread(served: Served, access_path: str) -> None:
    """After its first bulk request a connection has a thread of its own, where large READs are
    served natively too.  Their replies carry the file's bytes, in order with small ones; a
    client that leaves while they are on their way ends its connection, with nothing left of
    it, and the server serves on."""
    server = served.backend.nbd
    assert server is not None
    data = served.ro.read_bytes()
    c = connected(served, "ro")
    try:
        cookie = c.request(nbd.Cmd.READ, 0, 256 << 10)  # the connection gets its thread
        assert c.structured_reply()[0] == cookie
        before = served.thread.call(lambda: server.counts()["native_reads"])
        asks = [(0, 1 << 20), (5, 100), (4096, 128 << 10), (512 << 10, 512 << 10), (77, 64 << 10)]
        cookies = [c.request(nbd.Cmd.READ, offset, length) for offset, length in asks]
        for cookie, (offset, length) in zip(cookies, asks):
            got, rtype, _flags, payload = c.structured_reply()
            assert (got, rtype) == (cookie, nbd.ChunkType.OFFSET_DATA)
            assert payload[8:] == data[offset:offset + length], (offset, length)
        served_natively = served.thread.call(lambda: server.counts()["native_reads"]) - before
        assert served_natively == (len(asks) if access_path == "native" else 0)
    finally:
        c.close()
    bystander_ok(served)  # the transmission loop (its epoll and eventfd) is there from the first client on
    before_fds = settled_fds(served)
    errors = server.stats["internal_errors"]
    for _ in range(3):
        c = connected(served, "disk")
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        cookie = c.request(nbd.Cmd.READ, 0, 256 << 10)
        assert c.structured_reply()[0] == cookie
        for n in range(8):
            c.request(nbd.Cmd.READ, n * (4 << 20), 4 << 20)
        c.recv_exact(1000)  # some of the first reply, then gone
        c.sock.close()
    wait_no_connections(served)
    extra = open_fds() - before_fds
    assert not extra, {fd: os.readlink(f"/proc/self/fd/{fd}") for fd in extra}
    assert server.stats["internal_errors"] == errors
    bystander_ok(served)


def test_a_reply_holds_the_data_of_its_read_even_if_a_write_comes_before_the_client_reads_it(
        served: Served) -> None:
    """A READ's reply is the data when the READ was served: a WRITE served after it (here from
    another client) must not show in it, however long the reply waits in the socket.  A server
    that hands the socket the page cache's pages (sendfile, splice) instead of a copy fails
    this: the differential test caught qbackend doing so."""
    server = served.backend.nbd
    assert server is not None
    offset, length = 3 << 20, 1 << 20
    old = os.urandom(length)
    writer = connected(served)
    reader = connected(served)
    try:
        cookie = writer.request(nbd.Cmd.WRITE, offset, length, old)
        assert writer.error_of(cookie) == 0
        cookie = reader.request(nbd.Cmd.READ, 0, 256 << 10)  # the reader gets a thread of its own
        assert reader.structured_reply()[0] == cookie
        reads = served.thread.call(lambda: server.counts()["READ"])
        cookie = reader.request(nbd.Cmd.READ, offset, length)  # its reply waits, unread
        wait_until(lambda: served.thread.call(lambda: server.counts()["READ"]) > reads, 10, "the READ served")
        time.sleep(0.2)  # its reply on its way into the socket
        new = os.urandom(length)
        done = writer.request(nbd.Cmd.WRITE, offset, length, new)
        assert writer.error_of(done) == 0
        got, _rtype, _flags, payload = reader.structured_reply()
        assert got == cookie and payload[8:] == old, "a later WRITE changed the reply of an earlier READ"
    finally:
        writer.close()
        reader.close()


def test_disc_answers_what_was_in_flight_first(served: Served) -> None:
    c = connected(served)
    try:
        cookies = [c.request(nbd.Cmd.WRITE, i * 4096, 4096, bytes([i]) * 4096) for i in range(8)]
        cookies.append(c.request(nbd.Cmd.FLUSH))
        c.request(nbd.Cmd.DISC)
        got = sorted(c.structured_reply()[0] for _ in cookies)
        assert got == sorted(cookies)
        assert c.closed_by_server()
    finally:
        c.close()
    with open(served.disk, "rb") as f:
        assert f.read(4096 * 8) == b"".join(bytes([i]) * 4096 for i in range(8))


def test_tcp_listener_serves_the_same_exports(served: Served) -> None:
    assert served.backend.nbd is not None and served.backend.nbd.tcp_port
    out = served.tool("nbdinfo", "--size", f"nbd://127.0.0.1:{served.backend.nbd.tcp_port}/ro").stdout
    assert int(out) == served.ro.stat().st_size


def test_qed_image_stays_consistent_through_bad_input(served: Served) -> None:
    c = connected(served, "qdisk")
    try:
        pattern = os.urandom(64 << 10)
        assert c.error_of(c.request(nbd.Cmd.WRITE, 1 << 20, len(pattern), pattern)) == 0
        assert c.error_of(c.request(nbd.Cmd.WRITE, SIZE - 4096, 8192, bytes(8192))) == nbd.Errno.ENOSPC
        assert c.error_of(c.request(nbd.Cmd.WRITE_ZEROES, (1 << 64) - 4096, 8192)) == nbd.Errno.EINVAL
        assert c.error_of(c.request(nbd.Cmd.FLUSH)) == 0
    finally:
        c.close()
    c = connected(served, "qdisk")  # a writer that vanishes in the middle of an allocating write
    c.sock.sendall(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.Cmd.WRITE, 9, 8 << 20, 1 << 20) + b"y" * 4096)
    c.close()
    wait_no_connections(served)
    check = served.tool("qemu-img", "check", "-f", "qed", str(served.qdisk), check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    c = connected(served, "qdisk")
    try:
        cookie = c.request(nbd.Cmd.READ, 1 << 20, len(pattern))
        got, rtype, _flags, data = c.structured_reply()
        assert (got, rtype) == (cookie, nbd.ChunkType.OFFSET_DATA) and data[8:] == pattern
        cookie = c.request(nbd.Cmd.READ, 8 << 20, 4096)
        assert c.structured_reply()[3][8:] == bytes(4096)  # the vanished write left nothing
    finally:
        c.close()


def test_requests_in_flight_all_get_answers_even_out_of_order(served: Served) -> None:
    c = connected(served, "qdisk")
    try:
        cookies = {c.request(nbd.Cmd.WRITE, i * 4096, 4096, os.urandom(4096), nbd.CmdFlags.FUA) for i in range(16)}
        cookies |= {c.request(nbd.Cmd.READ, i * 4096, 4096) for i in range(16, 48)}
        cookies.add(c.request(nbd.Cmd.FLUSH))
        got = set()
        for _ in cookies:
            cookie, _t, flags, _p = c.structured_reply()
            assert flags & nbd.REPLY_FLAG_DONE
            got.add(cookie)
        assert got == cookies
    finally:
        c.close()


def test_shutdown_finishes_in_flight_writes_and_flushes(tmp_path: Path) -> None:
    qemu = find_qemu()
    image = tmp_path / "s.qed"
    subprocess.run([*qemu.tool_cmd("qemu-img"), "create", "-f", "qed", str(image), str(SIZE)], check=True,
                   capture_output=True, env=qemu.env())
    sock = tmp_path / "s.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "nbd", "--export", f"name=s,image={image},format=qed",
                             "--socket", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        c = RawNbd(str(sock))
        c.client_flags()
        c.go("s")
        blocks = [os.urandom(65536) for _ in range(32)]
        cookies = [c.request(nbd.Cmd.WRITE, i * 65536, 65536, b) for i, b in enumerate(blocks)]
        for cookie in cookies:
            assert c.error_of(cookie) == 0
        proc.send_signal(signal.SIGINT)  # no FLUSH from the client: the server's shutdown must do it
        assert proc.wait(20) == 0
        c.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not sock.exists()
    check = subprocess.run([*qemu.tool_cmd("qemu-img"), "check", "-f", "qed", str(image)], capture_output=True,
                           text=True, env=qemu.env())
    assert check.returncode == 0, check.stdout
    with QedImage.open_path(image, read_only=True) as img:
        assert not img.dirty  # closed cleanly: NEED_CHECK cleared
        assert img.read(0, 32 * 65536) == b"".join(blocks)


def test_qemu_img_map_of_a_qed_export_equals_our_allocation_map(served: Served) -> None:
    uri = served.uri("qdisk")
    served.tool("qemu-io", "-f", "raw", "-c", "write -P 0x11 12M 256k", "-c", "write -z 16M 64k",
                "-c", "write -P 0x22 20M 4k", uri)
    qmap = json.loads(served.tool("qemu-img", "map", "-f", "raw", "--output=json", uri).stdout)
    theirs = [(e["start"], e["length"], e["data"], e["zero"]) for e in qmap]
    export = served.backend.nbd.exports["qdisk"]  # type: ignore[union-attr]
    ours = []
    pos = 0
    for n, flags in export.block_status(0, SIZE):
        ours.append((pos, n, not flags & nbd.AllocationFlags.HOLE, bool(flags & nbd.AllocationFlags.ZERO)))
        pos += n
    assert theirs == ours
    assert (20 << 20, 4096, True, False) in ours


def test_a_client_that_never_reads_its_replies_stops_being_read(served: Served) -> None:
    """Plain connections share one transmission thread (servers.nbd.TransmissionLoop).
    A client that sends READs and never reads the replies must not stall the others
    nor make the server hold more than one reply (or one native batch) for it: once its socket takes no
    more, the server stops reading its requests (they wait in the kernel)."""
    assert served.backend.nbd is not None
    promoted = served.backend.nbd.stats["promoted_to_thread"]
    greedy = connected(served)
    try:
        greedy.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        greedy.sock.setblocking(False)
        # 32 KiB reads: under servers.nbd.BULK, so the connection stays in the loop.
        header = nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.Cmd.READ, 7, 0, 32 << 10)
        sent = 0
        try:
            for _ in range(40000):  # 1.2 GiB of replies asked for
                greedy.sock.send(header)
                sent += 1
        except BlockingIOError:
            pass  # the server stopped reading: our requests fill its receive buffer
        greedy.sock.setblocking(True)

        def waiting() -> int:
            server = served.backend.nbd
            assert server is not None
            return sum(len(c.out) for c in served.thread.call(lambda: list(server.connections)))

        wait_until(lambda: waiting() > 0, 10, "the greedy client's replies to back up")
        # One reply of the Python path, or one batch of native replies (servers.nbd.LOOP_BATCH).
        assert waiting() <= max((32 << 10) + 64, LOOP_BATCH), "more than one reply held for a client that does not read"
        assert served.backend.nbd is not None and served.backend.nbd.stats["promoted_to_thread"] == promoted
        bystander_ok(served)  # everyone else is served meanwhile
        assert sent > 0
    finally:
        greedy.close()
    wait_no_connections(served)
    bystander_ok(served)


def test_a_bulk_request_moves_the_connection_to_a_thread_and_it_goes_on(served: Served) -> None:
    """Small requests are served by the shared transmission loop; the first READ or
    WRITE of servers.nbd.BULK bytes or more hands the connection to a thread of its
    own, mid-stream: the requests around the switch are all answered, in any order."""
    assert served.backend.nbd is not None
    before = served.backend.nbd.stats["promoted_to_thread"]
    want = served.disk.read_bytes()
    c = connected(served)
    try:
        small1 = c.request(nbd.Cmd.READ, 4 << 20, 4096)
        big = c.request(nbd.Cmd.READ, 4 << 20, 1 << 20)
        small2 = c.request(nbd.Cmd.READ, (4 << 20) + 8192, 4096)
        got = {}
        for _ in range(3):
            cookie, _rtype, _flags, payload = c.structured_reply()
            got[cookie] = payload[8:]  # OFFSET_DATA: the offset, then the data
        assert got[small1] == want[4 << 20:(4 << 20) + 4096]
        assert got[big] == want[4 << 20:5 << 20]
        assert got[small2] == want[(4 << 20) + 8192:(4 << 20) + 12288]
    finally:
        c.close()
    assert served.backend.nbd.stats["promoted_to_thread"] == before + 1
    wait_no_connections(served)


# -- large WRITE payloads (received straight into memory of their own) -------------------------


def test_large_writes_land_whole_sent_in_pieces_and_refused_ones_are_skipped(served: Served) -> None:
    """WRITEs of 64 KiB and more come into the connection's payload memory (over 4 MiB: memory of
    their own), not through its receive buffer.  Sent in pieces, back to back, with a FUA one
    (Python's pool keeps its own copy) and requests that are refused after their payload came:
    every payload lands where it was sent, the refused ones leave nothing and the stream goes on."""
    writes = [(0, os.urandom(64 << 10), 0), (1 << 20, os.urandom(5 << 20), 0),
              (7 << 20, os.urandom(256 << 10), nbd.CmdFlags.FUA), (9 << 20 | 512, os.urandom(300 << 10), 0)]
    stream = bytearray()
    for n, (offset, data, flags) in enumerate(writes, 1):
        stream += nbd.REQUEST.pack(nbd.REQUEST_MAGIC, flags, nbd.Cmd.WRITE, n, offset, len(data)) + data
    # Past the end of the export: ENOSPC, after all of its payload has been read.
    stream += nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.Cmd.WRITE, 90, SIZE - 4096, 128 << 10) + bytes(128 << 10)
    stream += nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.Cmd.READ, 91, 1 << 20, 4096)
    c = connected(served)
    try:
        def send() -> None:
            for start in range(0, len(stream), 100_003):
                c.sock.sendall(stream[start:start + 100_003])
                time.sleep(0.001)

        sender = threading.Thread(target=send)
        sender.start()
        errors = {}
        for _ in range(len(writes) + 2):
            cookie, rtype, _flags, payload = c.structured_reply()
            errors[cookie] = int.from_bytes(payload[:4], "big") if rtype == nbd.ChunkType.ERROR else 0
            if cookie == 91:
                assert payload[8:] == writes[1][1][:4096]
        sender.join()
        assert errors == {1: 0, 2: 0, 3: 0, 4: 0, 90: nbd.Errno.ENOSPC, 91: 0}, errors
    finally:
        c.close()
    with open(served.disk, "rb") as f:
        for offset, data, _ in writes:
            f.seek(offset)
            assert f.read(len(data)) == data, offset
    # A read-only export refuses a large write (EPERM) and reads on after its payload.
    c = connected(served, "ro")
    try:
        cookie = c.request(nbd.Cmd.WRITE, 0, 200 << 10, bytes(200 << 10))
        assert c.error_of(cookie) == nbd.Errno.EPERM
        cookie = c.request(nbd.Cmd.READ, 0, 512)
        assert c.structured_reply()[0] == cookie
    finally:
        c.close()


def test_the_protocol_hands_a_large_payload_to_its_caller() -> None:
    """Sans-I/O: pending_write() names a WRITE whose payload has not all come, take_payload()
    moves what came into the caller's memory, payload_received() gives the request."""
    info = nbd.ExportInfo(name="d", size=1 << 20)
    protocol = nbd.NbdServerConnection(exports={"d": info})
    protocol.phase, protocol.export = nbd.Phase.TRANSMISSION, info
    data = os.urandom(100_000)
    request = nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.Cmd.WRITE, 5, 4096, len(data))
    protocol.receive_data(request[:20])
    assert protocol.pending_write() == 0  # no header yet
    protocol.receive_data(request[20:] + data[:1000])
    assert protocol.next_event() is nbd.NEED_DATA and protocol.pending_write() == len(data)
    memory = memoryview(bytearray(len(data)))
    assert protocol.take_payload(memory) == 1000 and protocol.buffered == 0
    with pytest.raises(nbd.NbdProtocolError):
        protocol.next_event()  # not while the caller receives the payload
    memory[1000:] = data[1000:]
    event = protocol.payload_received(memory)
    assert isinstance(event, nbd.Request) and event.cookie == 5 and bytes(event.data) == data
    with pytest.raises(ValueError):
        protocol.payload_received(memory)  # once
    # A whole one stays with next_event().
    protocol.receive_data(request + data)
    assert protocol.pending_write() == 0
    assert isinstance(protocol.next_event(), nbd.Request)
