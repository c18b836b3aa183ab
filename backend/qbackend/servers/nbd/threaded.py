"""The threaded driver: an NBD connection's transmission in a thread of its own,
with blocking I/O.  TLS connections are served so from their handshake on (an
SSL socket does not mix with the transmission loop), and plain ones once the
loop hands them over for a READ or WRITE of BULK bytes or more (one thread
cannot overlap several clients' megabyte transfers).

Plain READs and WRITEs at the front of what was received are served natively
(NbdConnection.serve_native); a large WRITE's payload is received straight
into memory the driver keeps for it, one copy from the socket.
"""

from __future__ import annotations

import mmap

from qbackend.block.exports import Export
from qbackend.protocol import nbd
from qbackend.servers.nbd.connection import BULK, RECV_SIZE, NbdConnection

# A connection receives large WRITE payloads of up to this many bytes into memory it keeps
# (and larger ones into their own): see NbdServerConnection.take_payload.
MAX_HELD_PAYLOAD = 4 << 20


def run_blocking(conn: NbdConnection, export: Export, first: nbd.Request | None = None) -> None:
    """Transmission, in the connection's own thread, until the client goes."""
    _ThreadedDriver(conn, export).run(first)


def run_promoted(conn: NbdConnection) -> None:
    """Take over from the transmission loop, which has let go of conn for its bulk request
    (conn.promote): send what waited there, blocking now; then go on as run_blocking
    does, starting with that request."""
    export, first = conn.export, conn.promote
    assert export is not None and first is not None
    conn.promote = None
    conn.server.stats["promoted_to_thread"] += 1
    with conn.send_lock:
        conn.loop = None
        try:
            conn.sock.setblocking(True)
            if conn.out:
                conn.sock.sendall(conn.out)
                conn.out.clear()
        except OSError:
            conn.stopping = True  # the client is gone; run_blocking ends at once
    run_blocking(conn, export, first)


class _ThreadedDriver:
    def __init__(self, conn: NbdConnection, export: Export) -> None:
        self.conn = conn
        self.export = export
        self._payload: mmap.mmap | None = None  # large WRITE payloads (_receive_payload)

    def run(self, first: nbd.Request | None) -> None:
        conn = self.conn

        def serve() -> bool:
            if first is not None:
                conn.handle(self.export, first)
            self._transmission()
            return False

        try:
            conn.guarded(serve)
        finally:
            conn.shut_pool()
            if self._payload is not None:
                self._payload.close()

    def _transmission(self) -> None:
        conn, export = self.conn, self.export
        protocol = conn.protocol
        recv_size = RECV_SIZE
        while conn.serve_events(export):
            if protocol.pending_write() >= BULK:
                # A large WRITE: its payload straight into memory of its own, and then only
                # the next request's header, so the next payload comes straight too.
                event = self._receive_payload()
                try:
                    if not conn.serve_event(export, event):
                        return
                finally:
                    if isinstance(event, nbd.Request) and isinstance(event.data, memoryview):
                        event.data.release()  # served: the memory is the next payload's
                recv_size = protocol.request_header_size
                continue
            data = self._recv(recv_size)
            recv_size = RECV_SIZE
            if not data and conn.stopping:
                conn.drain()
                return
            if data:
                data = conn.serve_native(data)
                if not data:
                    continue
            protocol.receive_data(data)

    def _recv(self, size: int) -> memoryview | bytes:
        """The next bytes from the client (at most `size`), valid until the next call.

        Into the connection's one preallocated buffer: a fresh 1 MiB bytes object per
        recv() costs more than most requests; the protocol copies what it keeps.
        """
        conn = self.conn
        try:
            n = conn.sock.recv_into(conn.buffer, size)
        except OSError:
            return b""
        return conn.view[:n]

    def _receive_payload(self) -> nbd.Event:
        """The pending WRITE's payload, received into the driver's payload memory (one
        copy: from the socket); its event.  Payloads over MAX_HELD_PAYLOAD get memory
        of their own, given back after the request."""
        protocol = self.conn.protocol
        length = protocol.pending_write()
        if length > MAX_HELD_PAYLOAD:
            view = memoryview(bytearray(length))
        else:
            if self._payload is None:
                self._payload = mmap.mmap(-1, MAX_HELD_PAYLOAD)  # pages become resident as used
            view = memoryview(self._payload)[:length]
        got = protocol.take_payload(view)
        while got < length:
            try:
                n = self.conn.sock.recv_into(view[got:])
            except OSError:
                n = 0
            if not n:
                view.release()
                raise nbd.NbdProtocolError(f"client went away in the middle of a WRITE payload ({got} of {length} bytes)")
            got += n
        return protocol.payload_received(view)
