"""The ivshmem-server protocol, the client side (what QEMU's ivshmem-doorbell does).

Documented outcomes: events and `ProtocolError`.  Checked besides: every fd
handed in comes back exactly once (with an event, an error or `pending_fds`),
and no peer gets more vectors than `max_vectors`.
"""

from __future__ import annotations

from fuzz import FdCounter, chunks
from qbackend.protocol import ivshmem_server as iv

MAX_VECTORS = 4


def _drain(conn: iv.ClientConnection, fds: FdCounter) -> bool:
    while True:
        try:
            event = conn.next_event()
        except iv.ProtocolError as exc:
            fds.back(exc.fds)
            return False
        if isinstance(event, iv.NeedData):
            return True
        if isinstance(event, iv.Setup):
            assert 0 <= event.own_id <= iv.MAX_PEER_ID and conn.state is iv.State.RUNNING
            fds.back([event.shm_fd])
        elif isinstance(event, iv.PeerVector):
            assert 0 <= event.vector < MAX_VECTORS and 0 <= event.peer <= iv.MAX_PEER_ID, event
            fds.back([event.fd])
        else:
            assert event.peer != conn.own_id


def test_one_input(data: bytes) -> None:
    conn = iv.ClientConnection(max_vectors=MAX_VECTORS)
    fds = FdCounter()
    alive = True
    for chunk, nfds in chunks(data):
        try:
            conn.receive_data(chunk, fds.new(nfds))
        except iv.ProtocolError as exc:
            fds.back(exc.fds)
            alive = False
            break
        if not (alive := _drain(conn, fds)):
            break
    if alive:
        try:
            conn.receive_data(b"")
        except iv.ProtocolError as exc:
            fds.back(exc.fds)
        else:
            assert conn.state is iv.State.CLOSED
    fds.back(conn.pending_fds())
    fds.check()
