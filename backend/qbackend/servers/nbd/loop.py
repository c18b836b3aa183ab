"""The loop driver: one thread serving the transmission phase of every plain
(not TLS) NBD connection, and its hand-over of connections to and from the
native loop.

A thread per connection pays, per request, for handing the GIL from thread
to thread, each handoff a wake-up of another CPU: 64 clients got 0.44x
qemu-nbd's rate so, with the server using only 0.7 of a CPU.  This thread
polls every connection's socket (epoll), reads what came and serves the
requests there, sending replies without blocking; what a socket does not
take waits in its connection (`NbdConnection.out`), which is not read until
it has gone (a client that never reads its replies stops being served, and
costs no more memory).  FLUSH and FUA writes still go to the connection's
pool, whose replies come back through the same send path.  The first READ
or WRITE of BULK bytes or more ends a connection's time here: it goes on in
a thread of its own (servers.nbd.threaded.run_promoted), as TLS
connections do from the start.

With native helpers the thread waits in C (servers.nbd_fast.NativeLoop):
every connection in *native state* is received, served and answered there
(plain READs and in-place WRITEs under BULK bytes), and a connection
reaches the Python code here only when it needs it (another request,
replies the socket would not take, the end).  It comes with what the C side
had pending (`_LoopDriver.readable` takes it over), and goes back to native
state once Python holds nothing of it (`_LoopDriver.resume_native`).  At 64
clients the Python loop had been the bottleneck (0.6x qemu-nbd).  Without
the helpers, `_EpollPoller` stands in for NativeLoop and every connection
is Python's.

A hand-over to a new process (NbdServer.pause) *parks* every connection of
the loop (`park_all`): between two polls, the thread takes back what the
native side had received, lets go of each connection as at its end, and
the thread that finishes it waits for the pool, sends what waits (PARK_SEND
seconds at most; what the client has not taken by then stays in `out` and
travels with the connection) and leaves the socket open.
"""

from __future__ import annotations

import select
import socket
import threading
import time
from collections.abc import Callable

from qbackend.block.exports import Export
from qbackend.plumbing.unix import clear_eventfd, close_fds, make_eventfd, signal_eventfd
from qbackend.servers.nbd.connection import BULK, LOOP_BATCH, Closed, NbdConnection, log
from qbackend.servers.nbd.threaded import run_promoted
from qbackend.servers.nbd_fast import NativeLoop, NativeRequests

# Seconds close() waits for the thread to end.
LOOP_JOIN = 10.0
# Seconds a parked connection's replies may take to leave (a client that does not read
# them keeps the rest, which goes with the connection to whoever serves it next).
PARK_SEND = 5.0


class TransmissionLoop:
    """The one transmission thread and its poller (see the module's docstring).

    The thread owns the poller (its epoll set) and the wake-up eventfd, and closes
    them on its way out: never another thread while it may still poll them."""

    def __init__(self, name: str) -> None:
        self.name = name
        native_loop = NativeLoop.start()
        self.poller: NativeLoop | _EpollPoller = native_loop if native_loop is not None else _EpollPoller()
        self._wake = make_eventfd()
        self.poller.register(self._wake, select.EPOLLIN)
        self._lock = threading.Lock()  # _new, and _closed with the fds it guards
        self._new: list[_LoopDriver] = []
        self._conns: dict[int, _LoopDriver] = {}
        self._stopping = False
        self._park = False  # park_all(): let go of every connection at the next wake-up
        self._closed = False  # the thread has closed the poller and the eventfd
        self._thread = threading.Thread(target=self._run, name=f"{name} transmission", daemon=True)
        self._thread.start()

    def add(self, conn: NbdConnection, export: Export, done: Callable[[], None]) -> None:
        """Serve conn from now; done() is called (from another thread) once it is over."""
        conn.sock.setblocking(False)
        conn.export = export
        conn.loop = self
        with self._lock:
            self._new.append(_LoopDriver(self, conn, export, done))
            if not self._closed:
                signal_eventfd(self._wake)

    @property
    def native(self) -> bool:
        """Whether the loop waits in C (and serves native connections there)."""
        return isinstance(self.poller, NativeLoop)

    def want_write(self, conn: NbdConnection) -> None:
        """conn has replies waiting: wait for the socket to take them, read nothing meanwhile."""
        with self._lock:  # (taken after a send lock, never before one)
            try:
                if not self._closed:
                    self.poller.modify(conn.sock.fileno(), select.EPOLLOUT)
            except OSError:
                pass  # being closed

    def park_all(self) -> None:
        """Let go of every connection (from any thread): each is finished as parked
        (conn.parked; see the module's docstring) and its done() called."""
        with self._lock:
            self._park = True
            if not self._closed:
                signal_eventfd(self._wake)

    def close(self) -> None:
        """Stop the thread and wait LOOP_JOIN seconds at most for it to end.  One that has
        not (a pread stuck on a hung mount) keeps its poller and eventfd, and closes them
        when it ends: they are not closed under it."""
        with self._lock:
            self._stopping = True
            if not self._closed:
                signal_eventfd(self._wake)
        self._thread.join(LOOP_JOIN)
        if self._thread.is_alive():
            log.warning("%s: the transmission thread has not ended %g s after the stop; "
                        "it closes its epoll set when it does", self.name, LOOP_JOIN)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            with self._lock:
                self._closed = True
                self.poller.close()
                close_fds([self._wake])

    def _serve(self) -> None:
        conns = self._conns
        while not self._stopping:
            try:
                events = self.poller.poll()
            except OSError:
                return
            for fd, mask in events:
                if fd == self._wake:
                    clear_eventfd(self._wake)
                    self._take_new()
                    if self._park:
                        self._park_all()
                    continue
                driver = conns.get(fd)
                if driver is None:
                    continue
                try:
                    alive = driver.writable() if mask & select.EPOLLOUT else driver.readable()
                except Closed:
                    alive = False
                if not alive:
                    self._end(fd, driver)

    def _take_new(self) -> None:
        with self._lock:
            new, self._new = self._new, []
        for driver in new:
            conn = driver.conn
            fd = conn.sock.fileno()
            self._conns[fd] = driver
            # Replies may wait already: those a parked connection's client had not taken.
            self.poller.register(fd, select.EPOLLOUT if conn.out else select.EPOLLIN, conn.native)
            # What the handshake's last read (or a parked connection) brought with it may hold
            # requests already.
            if not driver.serve_buffered():
                self._end(fd, driver)
            else:
                protocol = conn.protocol
                conn.waiting_since = time.monotonic() if protocol.buffered or protocol.skipping else 0.0
                driver.resume_native()

    def _park_all(self) -> None:
        """Between two polls: every connection leaves the loop, parked.  What the native side
        received and did not serve goes to the protocol first (the loop is not in C now)."""
        with self._lock:
            self._park = False
        for fd, driver in list(self._conns.items()):
            conn = driver.conn
            native = conn.native
            if native is not None:
                pending, unsent = native.take_over()
                if unsent:
                    with conn.send_lock:
                        conn.out += unsent
                if pending:
                    conn.protocol.receive_data(pending)
            conn.parked = True
            conn.waiting_since = 0.0
            self._end(fd, driver)

    def _end(self, fd: int, driver: _LoopDriver) -> None:
        del self._conns[fd]
        try:
            self.poller.unregister(fd)
        except OSError:
            pass
        conn = driver.conn

        def finish() -> None:
            try:
                if conn.promote:
                    run_promoted(conn)
                else:
                    driver.finish()
            finally:
                driver.done()

        threading.Thread(target=finish, name=f"{self.name} {'connection' if conn.promote else 'finish'}",
                         daemon=True).start()


class _LoopDriver:
    """One connection in the loop: its readable and writable callbacks, called by the
    loop's thread only, and its end."""

    def __init__(self, loop: TransmissionLoop, conn: NbdConnection, export: Export, done: Callable[[], None]) -> None:
        self.loop = loop
        self.conn = conn
        self.export = export
        self.done = done  # called once the connection is over, or in a thread of its own

    def readable(self) -> bool:
        """Serve what the client sent; False once the connection is over (the loop
        then hands it to finish(), or to a thread of its own)."""
        conn, export = self.conn, self.export

        def serve() -> bool:
            native = conn.native
            if native is not None and native.handed_over:
                # The native loop stopped at something of Python's: go on from where it was.
                # Then receive as Python does: the loop may have stopped at the end of the stream.
                pending, unsent = native.take_over()
                if unsent:
                    conn.send(unsent)
                if pending:
                    conn.protocol.receive_data(pending)
                if not conn.serve_events(export):
                    return False
                if conn.out:
                    return True  # the socket is full: nothing more is read until it drains
            try:
                n = conn.sock.recv_into(conn.buffer)
            except BlockingIOError:
                return True
            except OSError:
                n = 0
            if not n and conn.stopping:
                return False
            data = conn.serve_native(conn.view[:n]) if n else conn.view[:0]
            if n and not data:
                return True  # all served natively
            conn.protocol.receive_data(data)
            return conn.serve_events(export)

        alive = conn.guarded(serve)
        if alive:
            protocol = conn.protocol
            # In the middle of a request: since when its next bytes are awaited (the server
            # drops a client that stops sending there).
            conn.waiting_since = time.monotonic() if protocol.buffered or protocol.skipping else 0.0
            self.resume_native()
        return alive

    def writable(self) -> bool:
        """Send what waits; once nothing does, serve the requests that waited behind
        it, then read the client again.  False once it is over."""
        conn = self.conn
        with conn.send_lock:
            try:
                sent = conn.sock.send(conn.out) if conn.out else 0
            except BlockingIOError:
                return True
            except OSError:
                return False
            del conn.out[:sent]
            if conn.out:
                return True
        alive = self.serve_buffered()
        # Under the send lock, as want_write() is: a pool thread's reply queued
        # meanwhile cannot lose its wait for the socket.
        with conn.send_lock:
            if alive and not conn.out and conn.loop is not None:
                conn.loop.poller.modify(conn.sock.fileno(), select.EPOLLIN)
        if alive:
            self.resume_native()
        return alive

    def serve_buffered(self) -> bool:
        """Serve the requests the protocol holds whole already; False once it is over."""
        return self.conn.guarded(lambda: self.conn.serve_events(self.export))

    def resume_native(self) -> None:
        """Give the connection back to the native loop once Python holds nothing of it
        (no request bytes, no replies waiting, nothing in the pool, which sends on this
        socket too).  Only the loop's thread calls this, between its polls."""
        conn = self.conn
        native = conn.native
        if (native is None or not self.loop.native or native.in_loop or conn.out
                or conn.protocol.buffered or conn.protocol.skipping or conn.pool_busy or conn.promote
                or conn.stopping):
            return
        native.resume(BULK - 1, LOOP_BATCH)

    def finish(self) -> None:
        """In a thread of its own, once the loop has let go: what is in flight finishes,
        what waits is sent (blocking now), then the pool goes; the connection is over
        (or parked, its socket left open: park())."""
        conn = self.conn
        if conn.parked:
            self.park()
            return
        try:
            conn.drain()
            with conn.send_lock:
                conn.loop = None
                if conn.out:
                    conn.sock.setblocking(True)
                    conn.sock.settimeout(10)
                    conn.sock.sendall(conn.out)
                    conn.out.clear()
        except (OSError, Closed):
            pass
        finally:
            conn.shut_pool()


    def park(self) -> None:
        """finish() of a parked connection: what is in flight finishes, what waits is sent
        without blocking for PARK_SEND seconds at most (the rest stays in `out`), the pool
        goes; the socket stays open.  A client gone meanwhile is not parked: it ends."""
        conn = self.conn
        try:
            conn.drain()
            with conn.send_lock:
                conn.loop = None
                if not _send_out(conn, PARK_SEND):
                    conn.parked = False
        finally:
            conn.shut_pool()


def _send_out(conn: NbdConnection, seconds: float) -> bool:
    """Send conn.out on its non-blocking socket for `seconds` at most (under the send lock);
    what the socket has not taken by then stays.  False if the socket failed."""
    deadline = time.monotonic() + seconds
    poller = select.poll()
    poller.register(conn.sock.fileno(), select.POLLOUT)
    while conn.out:
        try:
            sent = conn.sock.send(conn.out, socket.MSG_DONTWAIT)
        except BlockingIOError:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            poller.poll(left * 1000)
            continue
        except OSError:
            return False
        del conn.out[:sent]
    return True


class _EpollPoller:
    """The transmission loop's poller without native helpers: select.epoll, with
    NativeLoop's interface (every connection is Python's)."""

    def __init__(self) -> None:
        self._epoll = select.epoll()

    def register(self, fd: int, events: int, requests: NativeRequests | None = None) -> None:
        self._epoll.register(fd, events)

    def modify(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def unregister(self, fd: int) -> None:
        self._epoll.unregister(fd)

    def poll(self) -> list[tuple[int, int]]:
        return self._epoll.poll()

    def close(self) -> None:
        self._epoll.close()
