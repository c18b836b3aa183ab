"""The region-access fast path (ServerConnection.serve_access and the
server's use of it) against the general path it short-cuts.

serve_access() must serve only what the general path would accept, and
answer it the same way; it may leave odd requests to the general path.  The server must
give the same replies, in order, however the stream is cut into reads and
whatever is mixed in with the accesses.
"""

from __future__ import annotations

import errno as E
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend
from qbackend.options import IvshmemOptions
from qbackend.protocol import vfio_user as vu
from qbackend.protocol.vfio_user import REGION_ACCESS, Command, Request, ServerConnection
from qbackend.testing.vfio_user_client import VfioUserClient

CONFIG = vu.PciRegion.CONFIG


def ready() -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(vu.build_message(0, Command.VERSION, vu.VERSION_PREFIX.pack(0, 0)))
    assert isinstance(conn.next_event(), Request)
    return conn


def access(msg_id: int, command: int, offset: int, region: int, count: int, data: bytes = b"",
           flags: int = 0, size: int | None = None) -> bytes:
    body = REGION_ACCESS.pack(offset, region, count) + data
    size = vu.HEADER_SIZE + len(body) if size is None else size
    return vu.HEADER.pack(msg_id, command, size, flags, 0) + body


class Device:
    """Records the calls serve_access makes; reads return count bytes."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def read(self, region: int, offset: int, count: int) -> bytes:
        self.calls.append(("read", region, offset, count))
        return bytes(range(count % 251))[:count].ljust(count, b"r")

    def write(self, region: int, offset: int, data: bytes) -> None:
        self.calls.append(("write", region, offset, data))


@settings(max_examples=500, deadline=None)
@given(
    command=st.sampled_from([Command.REGION_READ] * 3 + [Command.REGION_WRITE] * 3 + [Command.DEVICE_RESET, 99]),
    flags=st.sampled_from([0, 0, 0, vu.FLAG_NO_REPLY, vu.FLAG_NO_REPLY, vu.TYPE_REPLY, vu.FLAG_ERROR, 0x80]),
    offset=st.one_of(st.integers(0, 300), st.integers((1 << 64) - 8, (1 << 64) - 1)),
    region=st.integers(0, 9),
    count=st.one_of(st.integers(0, 9), st.sampled_from([vu.MAX_DATA_XFER_SIZE, vu.MAX_DATA_XFER_SIZE + 1])),
    data_len=st.one_of(st.none(), st.none(), st.integers(0, 10)),  # None: as many bytes as count
    size_delta=st.sampled_from([0, 0, 0, 0, -1, 1, 8]),
    tail=st.binary(max_size=40),
)
def test_serve_access_serves_exactly_what_the_general_path_accepts(
        command: int, flags: int, offset: int, region: int, count: int, data_len: int | None, size_delta: int,
        tail: bytes) -> None:
    data = b""
    if command == Command.REGION_WRITE:
        data = bytes(range(count % 256)).ljust(count, b"w") if data_len is None else bytes(data_len)
    msg = access(7, command, offset, region, count, data, flags)
    size = len(msg) + size_delta
    msg = msg[:4] + size.to_bytes(4, "little") + msg[8:]
    stream = msg + tail

    device = Device()
    fast = ready()
    reply = fast.serve_access(stream, 0, len(stream), device.read, device.write)

    general = ready()
    general.receive_data(stream)
    try:
        event: object = general.next_event()
    except vu.ProtocolError:
        event = None

    accepted = isinstance(event, Request) and event.command in (Command.REGION_READ, Command.REGION_WRITE)
    if reply is not None:
        assert accepted
    elif accepted:
        # Only odd ones (a request with the ERROR flag set) are left to the general path.
        assert flags & ~vu.FLAG_NO_REPLY
    if reply is None:
        assert device.calls == []
        return
    # Served: the general path accepts the same request, and the reply and
    # the device call are what the server makes of that request.
    assert isinstance(event, Request), event
    assert fast.access_end == event.size == size
    body = event.body
    no_reply = bool(flags & vu.FLAG_NO_REPLY)
    assert event.no_reply == no_reply
    if isinstance(body, vu.RegionRead):
        assert device.calls == [("read", body.region, body.offset, body.count)]
        expected = device.read(body.region, body.offset, body.count)
        assert reply == (b"" if no_reply else vu.build_region_read_reply(7, body, expected))
    else:
        assert isinstance(body, vu.RegionWrite)
        assert device.calls == [("write", body.region, body.offset, body.data)]
        assert reply == (b"" if no_reply else general.reply(event, vu.region_write_reply_payload(body)))


def test_serve_access_leaves_everything_alone_before_version_and_behind_buffered_bytes() -> None:
    device = Device()
    msg = access(1, Command.REGION_READ, 0, CONFIG, 4)
    assert ServerConnection().serve_access(msg, 0, len(msg), device.read, device.write) is None
    conn = ready()
    conn.receive_data(msg[:5])  # a partial message is buffered: order must be kept
    assert conn.serve_access(msg, 0, len(msg), device.read, device.write) is None
    assert device.calls == []


def test_serve_access_reports_the_access_a_device_error_stopped() -> None:
    conn = ready()
    msg = access(1, Command.REGION_READ, 0, CONFIG, 4) + access(9, Command.REGION_WRITE, 8, 2, 2, b"xy")

    def refuse(region: int, offset: int, data: bytes) -> None:
        raise vu.RequestError("no", E.EPERM)

    assert conn.serve_access(msg, 0, len(msg), Device().read, refuse) is not None
    assert conn.access_end == 32
    with pytest.raises(vu.RequestError):
        conn.serve_access(msg, 32, len(msg), Device().read, refuse)
    assert conn.failed_access is not None and conn.failed_access[:2] == (9, Command.REGION_WRITE)
    assert conn.access_end == len(msg)


# -- the server -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def connect(tmp_path_factory: pytest.TempPathFactory, access_path: str) -> Iterator[Callable[[], VfioUserClient]]:
    workdir: Path = tmp_path_factory.mktemp("vfu-fast")
    backend = Backend()
    served = backend.add_ivshmem(IvshmemOptions(socket=workdir / "dev.sock", vectors=2))
    with BackendThread(backend):
        def new_client() -> VfioUserClient:
            c = VfioUserClient(served.server.socket_path, timeout=5)
            c.negotiate()
            return c
        yield new_client


def _mixed_stream(c: VfioUserClient) -> tuple[bytes, list[tuple[int, int]]]:
    """Accesses of every kind with other requests among them; the ids and
    errnos (0 for success) of the replies expected, in order."""
    parts: list[bytes] = []
    expect: list[tuple[int, int]] = []

    def add(msg: bytes, errno: int | None) -> None:
        parts.append(msg)
        if errno is not None:
            expect.append((int.from_bytes(msg[:2], "little"), errno))

    for i in range(3):
        add(access(c.next_id(), Command.REGION_READ, 0, CONFIG, 4), 0)
        add(access(c.next_id(), Command.REGION_WRITE, 0x3C, CONFIG, 1, bytes([i + 1]),
                   flags=vu.FLAG_NO_REPLY), None)
        add(access(c.next_id(), Command.REGION_READ, 0x3C, CONFIG, 1), 0)
        add(access(c.next_id(), Command.REGION_READ, 254, CONFIG, 4), E.EINVAL)  # past the end
        add(access(c.next_id(), Command.REGION_WRITE, 0x3C, CONFIG, 1, bytes([0x40 + i])), 0)
        add(vu.build_message(c.next_id(), Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, 2, 0)), 0)
        add(access(c.next_id(), Command.REGION_READ, 0, CONFIG, 0), E.EINVAL)  # count 0: general path
        add(access(c.next_id(), Command.REGION_READ, 0x3C, CONFIG, 1), 0)
    return b"".join(parts), expect


@pytest.mark.parametrize("piece", [None, 1, 7, 33, 100])
def test_mixed_pipelined_stream_gets_the_general_paths_answers_in_order(
        connect: Callable[[], VfioUserClient], piece: int | None) -> None:
    c = connect()
    try:
        stream, expect = _mixed_stream(c)
        if piece is None:
            c.send_raw(stream)
        else:
            for pos in range(0, len(stream), piece):
                c.send_raw(stream[pos:pos + piece])
                if pos // piece % 5 == 0:
                    time.sleep(0.0005)  # let some reads end mid-message
        got = []
        for _ in expect:
            reply = c.receive()
            got.append((reply.header.id, reply.header.error))
        assert got == expect
        c.sock.settimeout(0.2)
        with pytest.raises((socket.timeout, TimeoutError, BlockingIOError)):
            c.sock.recv(1)  # nothing more: NO_REPLY writes got no reply
        c.sock.settimeout(5)
        assert c.read(CONFIG, 0x3C, 1) == bytes([0x42])
    finally:
        c.close()


def test_read_after_posted_write_sees_it_in_one_chunk(connect: Callable[[], VfioUserClient]) -> None:
    c = connect()
    try:
        for value in (0x11, 0x22, 0x33):
            write = access(c.next_id(), Command.REGION_WRITE, 0x3C, CONFIG, 1, bytes([value]),
                           flags=vu.FLAG_NO_REPLY)
            read_id = c.next_id()
            c.send_raw(write + access(read_id, Command.REGION_READ, 0x3C, CONFIG, 1))
            reply = c.receive()
            assert reply.header.id == read_id and reply.payload[REGION_ACCESS.size:] == bytes([value])
    finally:
        c.close()


def test_adaptive_polling_stops_when_the_client_goes_quiet(connect: Callable[[], VfioUserClient]) -> None:
    """After each reply the connection worker spins briefly for the next request
    (servers.vfio_user, SPIN_NS) while requests come close together; a client that
    goes quiet must cost the process nearly no CPU (a spin that never stopped
    would burn a whole CPU here), and the next request is still answered."""
    import resource

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    with connect() as client:
        for _ in range(2000):  # back to back: the worker is spinning by now
            assert client.read(CONFIG, 0, 4) == b"\xf4\x1a\x10\x11"
        time.sleep(0.2)
        before, start = cpu(), time.monotonic()
        time.sleep(2.0)
        used = (cpu() - before) / (time.monotonic() - start)
        assert used < 0.10, f"the process used {used:.0%} of a CPU while its client was quiet"
        assert client.read(CONFIG, 0, 4) == b"\xf4\x1a\x10\x11"
