"""The threaded driver: an NBD connection's transmission in a thread of its own,
with blocking I/O.  TLS connections are served so from their handshake on (an
SSL socket does not mix with the transmission loop), and plain ones once the
loop hands them over for a READ or WRITE of BULK bytes or more (one thread
cannot overlap several clients' megabyte transfers).

Plain READs and WRITEs at the front of what was received are served natively
(NbdConnection.serve_native); a large WRITE's payload is received straight
into memory the driver keeps for it, one copy from the socket, and only
once its header has passed the checks (a refused WRITE's payload is
dropped as it comes: NbdServerConnection.skipping).  That memory is
MAX_HELD_PAYLOAD bytes: a longer payload is received and written in
pieces of that size, so a WRITE header claiming 32 MiB costs no more than
one of 4 MiB (docs/resources.md).  While a request is unfinished,
`conn.waiting_since` says since when its next bytes are awaited: the
server drops a client that stops sending in the middle of one.

A hand-over to a new process (NbdServer.pause) parks a plain connection
here between requests: before each receive the driver looks at
`server.pausing`, and a receive that would block waits in poll() on the
socket and the server's wake eventfd (signalled by pause), never in a
blocking recv() that only a shutdown() could end.  Parking waits for the
pool (its replies are sent) and leaves the socket open, with what the
protocol holds of the next request.  A TLS connection is not parked (its
TLS state cannot travel): at the same point it waits for its pool, sends
TLS's close_notify and ends, a clean close.
"""

from __future__ import annotations

import mmap
import select
import socket
import ssl
import time

from qbackend.block.exports import Export
from qbackend.protocol import nbd
from qbackend.servers.nbd.connection import BULK, RECV_SIZE, NbdConnection, log, nbd_errno

# A connection receives large WRITE payloads into this many bytes of memory it keeps
# (anonymous: resident as used), longer ones in pieces of this size.
MAX_HELD_PAYLOAD = 4 << 20


def run_blocking(conn: NbdConnection, export: Export, first: nbd.Request | None = None) -> None:
    """Transmission, in the connection's own thread, until the client goes."""
    _ThreadedDriver(conn, export).run(first)


def run_promoted(conn: NbdConnection) -> None:
    """Take over from the transmission loop, which has let go of conn for its bulk request
    (conn.first, or the WRITE whose payload is still coming): send what waited there,
    blocking now; then go on as run_blocking does, starting with that request."""
    export, first = conn.export, conn.first
    assert export is not None and conn.promote
    conn.promote, conn.first = False, None
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
        # Receives that would block wait here, on the socket and on the server's wake
        # eventfd (pause).
        self._tls = isinstance(conn.sock, ssl.SSLSocket)
        self._waiter = select.poll()
        self._waiter.register(conn.sock.fileno(), select.POLLIN)
        self._waiter.register(conn.server.wake_fd(), select.POLLIN)

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
        monotonic = time.monotonic
        while conn.serve_events(export):
            if protocol.pending_write() >= BULK:
                # A large WRITE (its header checked): its payload straight into memory of its
                # own, and then only the next request's header, so the next payload comes
                # straight too.
                if not self._receive_payload():
                    return
                recv_size = protocol.request_header_size
                continue
            if conn.server.pausing:
                self._park()
                return
            if protocol.buffered or protocol.skipping:
                conn.waiting_since = monotonic()  # in the middle of a request
            data = self._recv(recv_size)
            conn.waiting_since = 0.0
            if data is None:  # woken by a pause
                self._park()
                return
            recv_size = RECV_SIZE
            if not data and conn.stopping:
                conn.drain()
                return
            if data:
                data = conn.serve_native(data)
                if not data:
                    continue
            protocol.receive_data(data)

    def _park(self) -> None:
        """Stop here for a hand-over: what is in flight finishes (its replies sent), the
        socket stays open, the protocol keeps what it holds of the next request.  A TLS
        connection ends instead, with a close_notify."""
        conn = self.conn
        conn.drain()
        if not self._tls:
            conn.parked = True
            return
        assert isinstance(conn.sock, ssl.SSLSocket)
        try:
            # Non-blocking: close_notify goes out, the client's own is not waited for.
            conn.sock.setblocking(False)
            conn.sock.unwrap()
        except (OSError, ValueError):
            pass

    def _recv(self, size: int) -> memoryview | bytes | None:
        """The next bytes from the client (at most `size`), valid until the next call; None
        when a pause woke the wait for them (nothing was received).

        Into the connection's one preallocated buffer: a fresh 1 MiB bytes object per
        recv() costs more than most requests; the protocol copies what it keeps.
        """
        conn = self.conn
        sock = conn.sock
        try:
            if isinstance(sock, ssl.SSLSocket):
                # TLS: what its buffer holds already, else wait for the socket (a whole record
                # then comes soon: the client sends them whole).
                if not sock.pending() and not self._wait_readable():
                    return None
                n = sock.recv_into(conn.buffer, size)
            else:
                # What is there already, without a wait; else wait (one more system call
                # only when there was nothing).
                try:
                    n = sock.recv_into(conn.buffer, size, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    if not self._wait_readable():
                        return None
                    n = sock.recv_into(conn.buffer, size)
        except OSError:
            return b""
        return conn.view[:n]

    def _wait_readable(self) -> bool:
        """Until the socket is readable (True) or a pause wakes the thread (False)."""
        conn = self.conn
        fd = conn.sock.fileno()
        while not conn.server.pausing:
            ready = self._waiter.poll()
            # (POLLNVAL: the server has closed its eventfd: a blocking receive then)
            if any(got == fd or events & select.POLLNVAL for got, events in ready):
                return True
        return False

    def _receive_payload(self) -> bool:
        """Receive the pending WRITE's payload into the driver's payload memory (one copy:
        from the socket) and serve it; False after a disconnect.  A payload longer than
        that memory is received and written piece by piece (_write_in_pieces)."""
        conn = self.conn
        protocol = conn.protocol
        length = protocol.pending_write()
        if self._payload is None:
            self._payload = mmap.mmap(-1, MAX_HELD_PAYLOAD)  # pages become resident as used
        with memoryview(self._payload) as memory:
            if length > MAX_HELD_PAYLOAD:
                self._write_in_pieces(memory, protocol.take_payload(memory))
                return True
            view = memory[:length]
            try:
                self._fill(view, protocol.take_payload(view))
                return conn.serve_event(self.export, protocol.payload_received(view))
            finally:
                view.release()  # served (a FUA write's pool has a copy): the memory is the next payload's

    def _fill(self, view: memoryview, got: int) -> None:
        """Receive into view[got:] until it is full (the rest of a WRITE payload)."""
        conn = self.conn
        sock = conn.sock
        monotonic = time.monotonic
        length = len(view)
        while got < length:
            conn.waiting_since = monotonic()
            try:
                n = sock.recv_into(view[got:])
            except OSError:
                n = 0
            conn.waiting_since = 0.0
            if not n:
                raise nbd.NbdProtocolError(f"client went away in the middle of a WRITE payload ({got} of {length} "
                                           "bytes)" if not conn.stopping else "stopped in the middle of a WRITE payload")
            got += n

    def _write_in_pieces(self, memory: memoryview, got: int) -> None:
        """The WRITE of protocol.receiving, longer than `memory`: its payload received and
        written a piece at a time (`got` bytes of the first piece are there), then its reply.
        A failed piece's error is the reply; the rest of the payload is still received
        (and dropped), as the protocol requires.  FUA: the export is flushed at the end."""
        conn, export = self.conn, self.export
        protocol = conn.protocol
        req = protocol.receiving
        assert req is not None
        error: Exception | None = None
        done = 0
        while done < req.length:
            with memory[:min(len(memory), req.length - done)] as piece:
                self._fill(piece, got)
                got = 0
                if error is None:
                    try:
                        export.write(req.offset + done, piece, False)
                    except Exception as exc:
                        error = exc
                done += len(piece)
        event = protocol.payload_received(None)
        assert isinstance(event, nbd.Request)  # its header was checked before its payload
        stats = conn.server.stats
        stats["WRITE"] += 1
        stats["written_in_pieces"] += 1
        if error is not None:
            log.warning("nbd %s: WRITE %#x+%d failed: %s", conn.peer, req.offset, req.length, error)
            stats["io_errors"] += 1
            conn.send(protocol.error_reply(req.cookie, nbd_errno(error), str(error), req.offset))
        elif req.flags & nbd.CmdFlags.FUA:
            conn.to_pool(req, export.flush)  # durable with its reply: every piece, flushed
        else:
            conn.send(protocol.done_reply(req.cookie, req.offset))
