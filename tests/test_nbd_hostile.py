"""Hostile NBD clients against the budget of docs/resources.md, measured on a
`qbackend nbd` process (its VmRSS from /proc): WRITE headers claiming 32 MiB
on a read-only export, a thousand silent connections to a TLS-only server,
and clients that stop in the middle of a request."""

from __future__ import annotations

import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from nbd_raw_client import RawNbd
from test_nbd_tls import Creds, creds  # noqa: F401  (the certificates fixture)

from qbackend.protocol import nbd
from qbackend.servers.nbd import BULK, HANDSHAKE_RECV, MAX_HELD_PAYLOAD, RECV_SIZE
from qbackend.testing.harness import wait_until

MiB = 1 << 20
SIZE = 64 * MiB
# docs/resources.md: what a connection costs besides its buffers (its thread's stack as
# used, its objects), and the noise of one process's RSS between two readings.
PER_CONNECTION = 256 << 10
NOISE = 16 * MiB


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


def start(tmp: Path, *args: str, readonly: bool = False) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    image = tmp / "d.raw"
    with open(image, "wb") as f:
        f.truncate(SIZE)
    sock = tmp / "nbd.sock"
    export = f"name=d,image={image},format=raw" + (",readonly=on" if readonly else "")
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "nbd", "--export", export, "--socket", str(sock),
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(sock.exists, 30, "the NBD socket")
        yield proc, sock
    finally:
        proc.terminate()
        proc.communicate(timeout=60)


@pytest.fixture
def read_only(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    yield from start(tmp_path, readonly=True)


@pytest.fixture
def short_limit(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    yield from start(tmp_path, "--handshake-timeout", "2")  # payload_timeout follows it


def connect(sock: Path) -> RawNbd:
    c = RawNbd(str(sock), timeout=60)
    c.client_flags()
    assert c.go("d", meta=False)[-1].type == nbd.OptionReply.ACK
    return c


def read_4k(c: RawNbd, offset: int = 0) -> None:
    cookie = c.request(nbd.Cmd.READ, offset, 4096)
    got, rtype, _flags, payload = c.structured_reply()
    assert (got, rtype, len(payload)) == (cookie, nbd.ChunkType.OFFSET_DATA, 8 + 4096)


class Bystander:
    """A client reading 4 KiB at a time in a thread, noting its slowest read."""

    def __init__(self, sock: Path) -> None:
        self.client = connect(sock)
        self.reads = 0
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            read_4k(self.client, (self.reads % 1000) * 4096)
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.reads += 1
            time.sleep(0.005)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self.client.close()


def test_write_headers_claiming_32_mib_on_a_read_only_export(read_only: tuple[subprocess.Popen[str], Path]) -> None:
    """64 clients, each promoted to a thread of its own by a 64 KiB READ, then sending a
    WRITE header claiming 32 MiB: the header is refused at once, so the server allocates
    nothing for the payload (33 MiB each before); once each has sent its payload (dropped
    as it comes), each gets EPERM; a bystander is served throughout."""
    proc, sock = read_only
    clients = 64
    bystander = Bystander(sock)
    conns = [connect(sock) for _ in range(clients)]
    try:
        for c in conns:  # a READ of BULK bytes: each connection gets a thread of its own
            cookie = c.request(nbd.Cmd.READ, 0, BULK)
            assert c.structured_reply()[0] == cookie
        baseline = rss(proc.pid)
        cookies = [c.request(nbd.Cmd.WRITE, 0, 32 * MiB) for c in conns]
        time.sleep(1.5)
        after_headers = rss(proc.pid)
        peak = [after_headers]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                peak[0] = max(peak[0], rss(proc.pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        chunk = bytes(256 << 10)
        errors: list[int] = [-1] * clients

        def send_payload(n: int) -> None:
            for _ in range(32 * MiB // len(chunk)):
                conns[n].sock.sendall(chunk)
            errors[n] = conns[n].error_of(cookies[n])

        senders = [threading.Thread(target=send_payload, args=(n,)) for n in range(clients)]
        for t in senders:
            t.start()
        for t in senders:
            t.join(300)
        sampling.set()
        sampler.join()
        # Each connection: its receive buffer (resident as filled), the 64 KiB READ's reply
        # memory, its thread and objects; nothing for a refused payload.
        bound = clients * (RECV_SIZE + BULK + PER_CONNECTION) + NOISE
        print(f"RSS {baseline >> 20} MiB after the READs, {after_headers >> 20} MiB after the headers, "
              f"peak {peak[0] >> 20} MiB while the payloads came (bound: +{bound >> 20} MiB); "
              f"bystander: {bystander.reads} reads, slowest {bystander.slowest * 1000:.1f} ms")
        assert after_headers - baseline < NOISE, "memory was allocated for payloads that never came"
        assert peak[0] - baseline < bound
        assert errors == [nbd.Errno.EPERM] * clients
        for c in conns:  # the connection goes on
            read_4k(c)
        assert bystander.reads > 0 and bystander.slowest < 2.0
    finally:
        bystander.stop()
        for c in conns:
            c.close()


def test_a_thousand_silent_clients_of_a_tls_only_server(tmp_path: Path, creds: Creds) -> None:  # noqa: F811
    """Silent TCP connections to a server that requires TLS cost no receive buffer (1 MiB
    each before): at most HANDSHAKE_RECV bytes are ever received at a time in a handshake."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 3000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    count = 1000
    gen = start(tmp_path, "--tcp", f"127.0.0.1:{port}", "--tls-creds", str(creds.server),
                "--handshake-timeout", "60")
    proc, _sock = next(gen)
    silent: list[socket.socket] = []
    try:
        baseline = rss(proc.pid)
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", port))
            silent.append(s)
        # Every one accepted: each has had its greeting.
        for s in silent:
            s.settimeout(30)
            assert len(s.recv(nbd.GREETING.size, socket.MSG_WAITALL)) == nbd.GREETING.size
        time.sleep(1)
        grown = rss(proc.pid) - baseline
        print(f"RSS {baseline >> 20} MiB before, +{grown >> 10} KiB with {count} silent clients "
              f"({grown // count} bytes each)")
        assert grown < count * HANDSHAKE_RECV + NOISE
        assert proc.poll() is None
    finally:
        for s in silent:
            s.close()
        try:
            next(gen)
        except StopIteration:
            pass


@pytest.mark.parametrize("length", [4096, MiB, 32 * MiB], ids=["native", "threaded", "in-pieces"])
def test_a_client_that_stops_in_the_middle_of_a_write_payload(short_limit: tuple[subprocess.Popen[str], Path],
                                                              length: int) -> None:
    """WRITE header and half its payload, then nothing: dropped once the limit (here the
    handshake timeout, 2 s) has passed without a byte of it; others are served meanwhile."""
    proc, sock = short_limit
    bystander = Bystander(sock)
    c = connect(sock)
    try:
        c.request(nbd.Cmd.WRITE, 0, length, bytes(length // 2))
        started = time.monotonic()
        c.sock.settimeout(15)
        try:
            got = c.sock.recv(4096)
        except (ConnectionResetError, TimeoutError):
            got = b"timeout"
        waited = time.monotonic() - started
        assert got == b"", "no reply, and closed by the server"
        assert 1.5 < waited < 5, waited
        assert bystander.reads > 0 and bystander.slowest < 1.0
        assert length <= MAX_HELD_PAYLOAD or length == 32 * MiB
    finally:
        bystander.stop()
        c.close()


def test_a_client_that_stops_in_the_middle_of_a_refused_write(short_limit: tuple[subprocess.Popen[str], Path]) -> None:
    """A WRITE past the end of the export, half its payload, then nothing: dropped too."""
    _proc, sock = short_limit
    c = connect(sock)
    try:
        c.request(nbd.Cmd.WRITE, SIZE, MiB, bytes(MiB // 2))
        started = time.monotonic()
        c.sock.settimeout(15)
        assert c.sock.recv(4096) == b""
        assert 1.5 < time.monotonic() - started < 5
    finally:
        c.close()


def test_a_large_write_in_pieces_lands_whole(short_limit: tuple[subprocess.Popen[str], Path]) -> None:
    """A 32 MiB WRITE (received and written in pieces of MAX_HELD_PAYLOAD), with FUA, reads back."""
    _proc, sock = short_limit
    c = connect(sock)
    try:
        data = bytes(range(256)) * (32 * MiB // 256)
        cookie = c.request(nbd.Cmd.WRITE, 4096, len(data), data, flags=nbd.CmdFlags.FUA)
        assert c.error_of(cookie) == 0
        cookie = c.request(nbd.Cmd.READ, 4096, len(data))
        got, rtype, _flags, payload = c.structured_reply()
        assert (got, rtype) == (cookie, nbd.ChunkType.OFFSET_DATA)
        assert struct.unpack_from(">Q", payload)[0] == 4096 and payload[8:] == data
    finally:
        c.close()


@pytest.mark.parametrize("step", [1, 1000, 10 * MiB], ids=["byte-at-a-time", "chunks", "all-at-once"])
def test_the_protocol_refuses_a_write_on_its_header(step: int) -> None:
    """Sans-I/O: a WRITE to a read-only export is refused before its payload has come;
    the payload is dropped as it comes (never buffered), the refusal follows it, and the
    request behind it is served."""
    info = nbd.ExportInfo(name="d", size=1 << 20, read_only=True)
    protocol = nbd.NbdServerConnection(exports={"d": info})
    protocol.phase, protocol.export = nbd.Phase.TRANSMISSION, info
    length = 100_000 if step == 1 else 4 * MiB
    protocol.receive_data(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.Cmd.WRITE, 7, 0, length))
    assert protocol.next_event() is nbd.NEED_DATA and protocol.pending_write() == 0
    assert protocol.skipping == length and protocol.buffered == 0
    stream = bytes(length) + nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.Cmd.READ, 8, 0, 512)
    events = []
    for pos in range(0, len(stream), step):
        protocol.receive_data(stream[pos:pos + step])
        assert protocol.buffered <= nbd.REQUEST.size
        while (event := protocol.next_event()) is not nbd.NEED_DATA:
            events.append(event)
    assert [(type(e).__name__, e.cookie) for e in events] == [("Rejected", 7), ("Request", 8)]
    assert isinstance(events[0], nbd.Rejected) and events[0].error == nbd.Errno.EPERM
    # The end of the stream in the middle of a refused payload: the connection ends.
    protocol.receive_data(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.Cmd.WRITE, 9, 0, 4096) + bytes(100))
    assert protocol.next_event() is nbd.NEED_DATA
    protocol.receive_data(b"")
    with pytest.raises(nbd.NbdProtocolError):
        protocol.next_event()
