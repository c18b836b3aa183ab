"""NbdServer: the listeners, each client's way from its handshake to the driver
that serves its transmission, and exports added and removed at run time.

Time limits (docs/resources.md): a client has handshake_timeout seconds to
choose an export, and once in transmission, payload_timeout seconds (the
handshake timeout unless set) for the next bytes of a request it has begun
(a header, a WRITE payload, refused or not); one that stops in the middle
of a request is dropped.  Between requests a client may stay idle.

At the end, what a thread may still use is not freed under it: a
connection the transmission loop has not let go of LOOP_LET_GO seconds
after the stop is left to the loop, which frees it when it does (`_LetGo`),
and its export is left open.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import trio

from qbackend.block.exports import Export
from qbackend.plumbing.libc import trim_heap
from qbackend.plumbing.unix import accept_forever, listen_tcp, listen_unix, remove_socket
from qbackend.servers.nbd.connection import NbdConnection, log
from qbackend.servers.nbd.handshake import negotiate
from qbackend.servers.nbd.loop import TransmissionLoop
from qbackend.servers.nbd.threaded import run_blocking
from qbackend.servers.nbd_fast import NativeLoop

HANDSHAKE_TIMEOUT = 10.0  # seconds, as qemu-nbd's handshake-max-seconds
LOOP_LET_GO = 30.0  # seconds a stopping server waits for the loop to finish a connection
WATCH_INTERVAL = 0.5  # seconds between two looks for clients stopped in the middle of a request


class ExportInUse(Exception):
    """block-export-del mode=safe of an export that clients still use."""


class NbdServer:
    """Serves exports on a UNIX socket and/or a TCP address until cancelled.

    On the way out it stops reading new requests, lets what is in flight
    finish, flushes every writable export and closes them.
    """

    def __init__(self, exports: dict[str, Export], socket_path: Path | None = None,
                 tcp: tuple[str, int] | None = None, *, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_connections: int = 0, tls_mode: str = "off", tls_context: ssl.SSLContext | None = None,
                 payload_timeout: float | None = None) -> None:
        if tls_mode not in ("off", "on", "require") or (tls_mode != "off") != (tls_context is not None):
            raise ValueError("TLS: mode on or require with a context, or off without one")
        if socket_path is None and tcp is None:
            raise ValueError("an NBD server needs a socket path or a TCP address")
        self.exports = exports
        self.socket_path = socket_path
        self.tcp = tcp
        self.tcp_port: int | None = None
        self.stats: Counter[str] = Counter()
        self.connections: set[NbdConnection] = set()
        self.connections_served = 0
        self.handshake_timeout = handshake_timeout  # seconds a client has to choose an export
        # Seconds a client in transmission may keep the rest of a request it has begun waiting.
        self.payload_timeout = handshake_timeout if payload_timeout is None else payload_timeout
        self.max_connections = max_connections  # 0: no limit
        self.tls_mode = tls_mode  # off, on (offered) or require (nothing but STARTTLS and ABORT before it)
        self.tls_context = tls_context
        self._left = trio.Event()  # set (and renewed) whenever a connection ends
        self._loop: TransmissionLoop | None = None  # started with the first plain connection
        # Exports that a connection the loop never let go of may still use: never closed.
        self._left_open: set[str] = set()

    def counts(self) -> Counter[str]:
        """`stats` (requests by command, errors, ...) with what the native transmission loop
        has served so far: READ and WRITE include them, native_reads and native_writes
        say how many of them were served in C."""
        out = Counter(self.stats)
        if self._loop is not None:
            _add_native_counts(out, self._loop)
        return out

    def _transmission_loop(self) -> TransmissionLoop:
        if self._loop is None:
            self._loop = TransmissionLoop("nbd")
        return self._loop

    def _listeners(self) -> list[socket.socket]:
        out = []
        if self.socket_path is not None:
            out.append(listen_unix(self.socket_path, backlog=64))
        if self.tcp is not None:
            sock = listen_tcp(*self.tcp)
            self.tcp_port = sock.getsockname()[1]
            out.append(sock)
        return out

    # -- exports at run time (QMP block-export-add / -del) --

    def add_export(self, name: str, export: Export) -> None:
        """Serve ``export`` as ``name`` to clients that connect from now on."""
        if name in self.exports:
            raise ValueError(f"an NBD export named {name!r} exists already")
        self.exports[name] = export

    def clients_of(self, name: str) -> list[NbdConnection]:
        return [c for c in self.connections if c.export_name == name]

    async def remove_export(self, name: str, *, hard: bool) -> None:
        """Stop serving ``name``: refused while clients use it, unless ``hard``
        (they are disconnected); the export is flushed and closed."""
        if name not in self.exports:
            raise KeyError(name)
        users = self.clients_of(name)
        if users and not hard:
            raise ExportInUse(name)
        export = self.exports.pop(name)
        for conn in users:
            conn.drop()
        with trio.move_on_after(30):
            while self.clients_of(name):
                await self._left.wait()
        if self.clients_of(name) or name in self._left_open:
            # A thread may still read or write it (a pread stuck on a hung mount): left open.
            log.warning("nbd: export %r still has clients 30 s after its removal: left open", name)
            return
        await trio.to_thread.run_sync(_flush_and_close, export)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = self._listeners()
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(accept_forever, listener, "nbd", nursery, self._serve_client)
                nursery.start_soon(self._watch_requests)
                task_status.started()
        finally:
            for listener in listeners:
                listener.close()
            if self._loop is not None:  # every connection has ended (the nursery waited for them)
                self._loop.close()
                _add_native_counts(self.stats, self._loop)
                self._loop = None
            if self.socket_path is not None:
                remove_socket(self.socket_path)
            exports, self.exports = self.exports, {}
            for name, export in exports.items():
                if name in self._left_open:
                    log.warning("nbd: export %r left open: the transmission loop may still use it", name)
                    continue
                _flush_and_close(export)  # every connection has ended: nobody else holds its lock

    async def _serve_client(self, sock: socket.socket) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            host, port = sock.getpeername()[:2]
            peer = f"{host}:{port}"
        else:
            peer = "unix"
        if self.max_connections and len(self.connections) >= self.max_connections:
            log.warning("nbd %s: %d connections already (--max-connections): refused", peer, len(self.connections))
            self.stats["refused"] += 1
            sock.close()
            return
        conn = NbdConnection(self, sock, peer)
        self.connections.add(conn)
        self.connections_served += 1
        over: trio.Event | None = None  # set once the transmission loop has let go of conn
        let_go: _LetGo | None = None
        try:
            sock.setblocking(False)
            export = None
            with trio.move_on_after(self.handshake_timeout) as scope:
                export = await negotiate(conn)
            if scope.cancelled_caught:
                log.info("nbd %s: no handshake within %g s: dropped", peer, self.handshake_timeout)
                self.stats["handshake_timeouts"] += 1
            if export is None:
                return
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_cancel, conn)
                if isinstance(conn.sock, ssl.SSLSocket):
                    conn.sock.setblocking(True)  # TLS: a thread of its own, blocking I/O
                    await trio.to_thread.run_sync(run_blocking, conn, export, limiter=trio.CapacityLimiter(1))
                else:
                    over = trio.Event()
                    let_go = _LetGo(_setter(trio.lowlevel.current_trio_token(), over),
                                    lambda: _free(conn, sock))
                    self._transmission_loop().add(conn, export, let_go.loop_let_go)
                    await over.wait()
                nursery.cancel_scope.cancel()
        except Exception:
            # A bug of ours costs this client its connection, not the server its life.
            log.exception("nbd %s: internal error; dropping the connection", peer)
            self.stats["internal_errors"] += 1
        finally:
            if over is not None and not over.is_set():
                # Cancelled (the server stops): conn.stop() has ended its reading, and the loop
                # lets go of it soon; its socket and buffers (the C loop's too) may go only then.
                with trio.move_on_after(LOOP_LET_GO) as waiting:
                    waiting.shield = True
                    await over.wait()
            if let_go is not None and not let_go.server_gives_up():
                # The loop may still be inside this connection (a pread stuck on a hung mount):
                # its socket, buffers and export stay; the loop frees the first two when it lets go.
                log.warning("nbd %s: the transmission loop kept the connection %g s after the stop: "
                            "its socket and buffers are left to the loop", peer, LOOP_LET_GO)
                self.stats["left_to_the_loop"] += 1
                if conn.export_name is not None:
                    self._left_open.add(conn.export_name)
            else:
                _free(conn, sock)
            self.connections.discard(conn)
            if not self.connections:
                trim_heap()  # the last client gone: what the connection threads freed goes back
            self._left.set()
            self._left = trio.Event()


    async def _watch_requests(self) -> None:
        """Drop the clients that stopped in the middle of a request payload_timeout seconds ago
        (a header, a WRITE payload): what the request holds is not held for them longer."""
        while True:
            await trio.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            for conn in list(self.connections):
                since = conn.waiting_since
                native = conn.native
                if not since and native is not None and native.in_loop:
                    since = native.waiting_since
                if since and now - since > self.payload_timeout and not conn.stopping:
                    log.info("nbd %s: no byte of its unfinished request for %g s: dropped",
                             conn.peer, self.payload_timeout)
                    self.stats["request_timeouts"] += 1
                    conn.drop()


class _LetGo:
    """The end of a connection the transmission loop serves, which the server and the
    loop reach in either order: the loop lets go of it (done(): its thread will not
    touch it again), or the server gives up waiting for that at a stop.  The socket and
    buffers are freed by the server once the loop has let go, else by the loop's thread
    when it does."""

    def __init__(self, tell_server: Callable[[], None], free: Callable[[], None]) -> None:
        self._lock = threading.Lock()  # held for a few lines, never across I/O
        self._let_go = False
        self._given_up = False
        self._tell_server = tell_server
        self._free = free

    def loop_let_go(self) -> None:
        """From the thread that finished the connection for the loop."""
        with self._lock:
            self._let_go = True
            given_up = self._given_up
        if given_up:
            self._free()
        else:
            self._tell_server()

    def server_gives_up(self) -> bool:
        """The server is done waiting: True if the loop has let go (the server frees the
        connection), False if the loop will free it when it does."""
        with self._lock:
            self._given_up = not self._let_go
            return self._let_go


def _free(conn: NbdConnection, sock: socket.socket) -> None:
    conn.sock.close()  # the TLS socket, once STARTTLS wrapped the plain one
    sock.close()
    conn.release_buffers()


def _flush_and_close(export: Export) -> None:
    try:
        if not export.info.read_only:
            export.flush()
    finally:
        export.close()


def _add_native_counts(stats: Counter[str], loop: TransmissionLoop) -> None:
    if isinstance(loop.poller, NativeLoop):
        native = loop.poller.counts()
        for command, key in (("READ", "reads"), ("WRITE", "writes")):
            stats[command] += native[key]
            stats[f"native_{key}"] += native[key]


def _setter(token: trio.lowlevel.TrioToken, event: trio.Event) -> Callable[[], None]:
    """`event.set()` from any thread; nothing once trio has stopped (the server went
    first, and nobody waits any more)."""
    def set_event() -> None:
        try:
            token.run_sync_soon(event.set)
        except trio.RunFinishedError:
            pass

    return set_event


async def _stop_on_cancel(conn: NbdConnection) -> None:
    try:
        await trio.sleep_forever()
    finally:
        conn.stop()
