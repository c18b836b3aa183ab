"""The ivshmem-server protocol's client side, sans-IO: the setup sequence,
peer vectors and departures, each checked whole, byte by byte and with
trailing data; bad input raises ProtocolError and hands back its fds."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.protocol import ivshmem_server as wire

# Fake fds: the parser never touches them.
SHM, A0, A1, ME0, ME1 = 100, 101, 102, 103, 104

SETUP = [(0, None), (3, None), (-1, SHM)]
RUN = [(1, A0), (1, A1), (3, ME0), (3, ME1), (1, None)]
EXPECTED = [
    wire.Setup(3, SHM),
    wire.PeerVector(1, 0, A0), wire.PeerVector(1, 1, A1),
    wire.PeerVector(3, 0, ME0), wire.PeerVector(3, 1, ME1),
    wire.PeerGone(1),
]


def events(conn: wire.ClientConnection) -> Iterator[wire.Event]:
    while (event := conn.next_event()) is not wire.NEED_DATA:
        yield event


def feed_whole(messages: list[tuple[int, int | None]]) -> list[wire.Event]:
    """Fd-less messages glued together, each fd ending a read (as Linux does)."""
    conn = wire.ClientConnection()
    out: list[wire.Event] = []
    chunk = b""
    for value, fd in messages:
        chunk += wire.encode(value)
        if fd is not None:
            conn.receive_data(chunk, [fd])
            out += events(conn)
            chunk = b""
    if chunk:
        conn.receive_data(chunk)
    out += events(conn)
    return out


def feed_bytewise(messages: list[tuple[int, int | None]]) -> list[wire.Event]:
    conn = wire.ClientConnection()
    out: list[wire.Event] = []
    for value, fd in messages:
        data = wire.encode(value)
        for i in range(len(data)):
            last = i == len(data) - 1
            conn.receive_data(data[i:i + 1], [fd] if fd is not None and last else [])
            out += events(conn)
    return out


@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise])
def test_setup_then_vectors_then_departure(feed) -> None:  # type: ignore[no-untyped-def]
    assert feed(SETUP + RUN) == EXPECTED


def test_trailing_partial_message_waits() -> None:
    conn = wire.ClientConnection()
    conn.receive_data(b"".join(wire.encode(v) for v, _ in SETUP[:2]))
    conn.receive_data(wire.encode(-1), [SHM])
    conn.receive_data(wire.encode(7)[:5])
    assert list(events(conn)) == [wire.Setup(3, SHM)]
    conn.receive_data(wire.encode(7)[5:])
    assert list(events(conn)) == [wire.PeerGone(7)]
    conn.receive_data(b"")
    assert conn.state is wire.State.CLOSED


def test_vectors_restart_from_zero_after_a_peer_leaves() -> None:
    got = feed_whole(SETUP + [(5, A0), (5, None), (5, A1)])
    assert got[1:] == [wire.PeerVector(5, 0, A0), wire.PeerGone(5), wire.PeerVector(5, 0, A1)]


BAD: dict[str, list[tuple[int, int | None]]] = {
    "wrong version": [(1, None)],
    "version with an fd": [(0, A0)],
    "id out of range": [(0, None), (65536, None)],
    "negative id": [(0, None), (-2, None)],
    "shm without fd": [(0, None), (1, None), (-1, None)],
    "vector before shm": [(0, None), (1, None), (2, A0)],
    "second shm": SETUP + [(-1, A0)],
    "server says we left": SETUP + [(3, None)],
    "peer id out of range": SETUP + [(70000, A0)],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_sequences_raise_and_return_the_fd(case: str) -> None:
    messages = BAD[case]
    with pytest.raises(wire.ProtocolError) as exc:
        feed_whole(messages)
    last_fd = messages[-1][1]
    if last_fd is not None:
        assert last_fd in exc.value.fds


def test_too_many_vectors_for_one_peer() -> None:
    conn = wire.ClientConnection(max_vectors=2)
    conn.receive_data(b"".join(wire.encode(v) for v, _ in SETUP[:2]))
    conn.receive_data(wire.encode(-1), [SHM])
    for fd in (A0, A1):
        conn.receive_data(wire.encode(1), [fd])
    list(events(conn))
    conn.receive_data(wire.encode(1), [ME0])
    with pytest.raises(wire.ProtocolError) as exc:
        list(events(conn))
    assert exc.value.fds == (ME0,)


def test_fd_inside_a_message_or_two_fds_in_one_read() -> None:
    conn = wire.ClientConnection()
    with pytest.raises(wire.ProtocolError) as exc:
        conn.receive_data(wire.encode(0)[:4], [A0])
    assert exc.value.fds == (A0,)
    with pytest.raises(wire.ProtocolError) as exc:
        wire.ClientConnection().receive_data(wire.encode(0), [A0, A1])
    assert exc.value.fds == (A0, A1)


def test_eof_inside_a_message() -> None:
    conn = wire.ClientConnection()
    conn.receive_data(b"\0\0\0")
    with pytest.raises(wire.ProtocolError):
        conn.receive_data(b"")


def test_unbounded_input_is_refused() -> None:
    conn = wire.ClientConnection()
    with pytest.raises(wire.ProtocolError):
        conn.receive_data(bytes(wire.MAX_BUFFER + 8))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1), st.booleans()), max_size=12))
def test_garbage_parses_or_raises_protocol_error(items: list[tuple[int, bool]]) -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        conn = wire.ClientConnection()
        try:
            for value, with_fd in items:
                conn.receive_data(wire.encode(value), [fd] if with_fd else [])
                list(events(conn))
        except wire.ProtocolError:
            pass
    finally:
        os.close(fd)
