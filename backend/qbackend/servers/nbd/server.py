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

A hand-over to a new process (qbackend.app.upgrade; the state's form is in
servers.nbd.handover):

- `pause()`: the listeners stop accepting (AcceptGate; clients that connect
  meanwhile wait in the backlog), and every plain connection in
  transmission is *parked*: it stops reading at a request boundary, what it
  had read is answered and sent (replies the client does not take within
  PARK_SEND seconds travel with it), its socket is neither closed nor shut
  down, and what it received of the next request stays in its protocol.  A
  connection still in its handshake is let finish it (handshake_timeout at
  most) and parked then.  A TLS connection cannot be handed over (its TLS
  state is in this process's ssl objects): at a request boundary, what it
  had read answered, it sends TLS's close_notify and is closed; QEMU's NBD
  client, given reconnect-delay, connects again, to the new process.  Then
  every writable export is flushed (a QED image marked clean).
- `resume()`: the hand-over failed; the parked connections are served on.
- `save(saver)` / `adopt(state, loader)`: the listeners and the parked
  connections, negotiated state and unhandled bytes included; a server made
  with the same exports in the new process serves them from serve() on.
- `release()`: after a hand-over in the same process (tests): serve(),
  cancelled, then closes this process's copies of the sockets only (no
  shutdown, no socket file removed) and leaves the exports to the caller
  (the new server has its own; closing a QED image writes its header).
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
from qbackend.block.qed_export import QedExport
from qbackend.plumbing.handover import HandoverError, Loader, Saver, State
from qbackend.plumbing.libc import trim_heap
from qbackend.plumbing.unix import (
                                    AcceptGate,
                                    accept_forever,
                                    clear_eventfd,
                                    close_fds,
                                    listen_tcp,
                                    listen_unix,
                                    make_eventfd,
                                    remove_socket,
                                    signal_eventfd,
)
from qbackend.servers.nbd import handover
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
        # The hand-over (see the module's docstring).
        self.pausing = False  # read by the connections' threads: park at the next request boundary
        self._gates: list[AcceptGate] = []  # one per listener, while serve() runs
        self._wake: int | None = None  # eventfd that wakes the threads' receives at a pause
        self._resumed = trio.Event()  # set by resume(); renewed at each pause
        self._parked: set[NbdConnection] = set()  # parked, their tasks waiting for resume()
        self._released = False
        self._adopted_listeners: list[socket.socket] = []
        self._adopted: list[NbdConnection] = []

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
        """The adopted listeners (adopt()), else new ones."""
        out = []
        adopted: dict[bool, socket.socket | None] = {sock.family == socket.AF_UNIX: sock
                                                     for sock in self._adopted_listeners}
        self._adopted_listeners = []
        try:
            if self.socket_path is not None:
                out.append(adopted.pop(True, None) or listen_unix(self.socket_path, backlog=64))
            if self.tcp is not None:
                sock = adopted.pop(False, None) or listen_tcp(*self.tcp)
                self.tcp_port = sock.getsockname()[1]
                out.append(sock)
        except BaseException:
            for sock in out:
                sock.close()
            raise
        finally:
            for left in adopted.values():  # (adopt() takes only the listeners this server has)
                if left is not None:
                    left.close()
        return out

    def wake_fd(self) -> int:
        """The eventfd a pause signals, for the threads that wait for a client's bytes
        (made when serve() starts)."""
        assert self._wake is not None
        return self._wake

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
        adopted, self._adopted = self._adopted, []
        self._wake = make_eventfd()
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    gate = AcceptGate()
                    gate.listener = listener
                    self._gates.append(gate)
                    nursery.start_soon(accept_forever, listener, "nbd", nursery, self._serve_client, gate)
                for conn in adopted:
                    nursery.start_soon(self._serve_client, conn.sock, conn)
                adopted = []
                nursery.start_soon(self._watch_requests)
                task_status.started()
        finally:
            for conn in adopted:  # (serve() failed before their tasks started)
                _free(conn, conn.sock)
            self._gates = []
            for listener in listeners:
                listener.close()  # (this process's copy only: no shutdown)
            if self._loop is not None:  # every connection has ended (the nursery waited for them)
                self._loop.close()
                _add_native_counts(self.stats, self._loop)
                self._loop = None
            if self._wake is not None and not self.connections:
                close_fds([self._wake])  # (else a thread may still poll it: left open)
                self._wake = None
            # Handed over (release()): the socket file and the exports are the new server's now.
            if self.socket_path is not None and not self._released:
                remove_socket(self.socket_path)
            exports, self.exports = self.exports, {}
            for name, export in exports.items():
                if self._released:
                    break
                if name in self._left_open:
                    log.warning("nbd: export %r left open: the transmission loop may still use it", name)
                    continue
                _flush_and_close(export)  # every connection has ended: nobody else holds its lock

    async def _serve_client(self, sock: socket.socket, adopted: NbdConnection | None = None) -> None:
        """One client from its accept (or its adoption from the process before, in
        transmission already) to its end; parked meanwhile while the server is paused."""
        if adopted is not None:
            conn, peer = adopted, adopted.peer
        else:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                host, port = sock.getpeername()[:2]
                peer = f"{host}:{port}"
            else:
                peer = "unix"
            if self.max_connections and len(self.connections) >= self.max_connections:
                log.warning("nbd %s: %d connections already (--max-connections): refused", peer,
                            len(self.connections))
                self.stats["refused"] += 1
                sock.close()
                return
            conn = NbdConnection(self, sock, peer)
        self.connections.add(conn)
        self.connections_served += 1
        over: trio.Event | None = None  # set once the transmission loop has let go of conn
        let_go: _LetGo | None = None
        try:
            if adopted is not None:
                assert conn.export_name is not None
                export: Export | None = self.exports[conn.export_name]
            else:
                sock.setblocking(False)
                export = None
                with trio.move_on_after(self.handshake_timeout) as scope:
                    export = await negotiate(conn)
                if scope.cancelled_caught:
                    log.info("nbd %s: no handshake within %g s: dropped", peer, self.handshake_timeout)
                    self.stats["handshake_timeouts"] += 1
            if export is None:
                return
            tls = isinstance(conn.sock, ssl.SSLSocket)
            while True:
                if self.pausing and tls:
                    log.info("nbd %s: TLS connections are not handed over: closed", peer)
                    self.stats["closed_at_pause"] += 1
                    return
                while self.pausing:  # (parked by its driver, or it finished its handshake just now)
                    conn.parked = True
                    over = let_go = None
                    await self._park(conn)
                conn.parked = False
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_stop_on_cancel, conn)
                    if tls:
                        conn.sock.setblocking(True)  # TLS: a thread of its own, blocking I/O
                        await trio.to_thread.run_sync(run_blocking, conn, export,
                                                      limiter=trio.CapacityLimiter(1))
                    else:
                        over = trio.Event()
                        let_go = _LetGo(_setter(trio.lowlevel.current_trio_token(), over),
                                        lambda: _free(conn, sock))
                        self._transmission_loop().add(conn, export, let_go.loop_let_go)
                        await over.wait()
                    nursery.cancel_scope.cancel()
                if not conn.parked:
                    return
        except Exception:
            # A bug of ours costs this client its connection, not the server its life.
            log.exception("nbd %s: internal error; dropping the connection", peer)
            self.stats["internal_errors"] += 1
        finally:
            self._parked.discard(conn)
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
                _free(conn, sock)  # (close() only: a parked socket handed over stays the new process's)
            self.connections.discard(conn)
            if not self.connections:
                trim_heap()  # the last client gone: what the connection threads freed goes back
            self._left.set()
            self._left = trio.Event()

    async def _park(self, conn: NbdConnection) -> None:
        """A parked connection's task, until resume() (cancelled: the server stops)."""
        self._parked.add(conn)
        self._left.set()  # (pause() waits for this)
        self._left = trio.Event()
        try:
            await self._resumed.wait()
        finally:
            self._parked.discard(conn)

    # -- the hand-over to a new process (see the module's docstring) --

    async def pause(self) -> None:
        """Accept nothing more, park every connection (TLS ones are closed) and flush the
        exports; nothing of this server touches a socket or an export until resume()."""
        if self.pausing:
            return
        self.pausing = True
        self._resumed = trio.Event()
        for gate in self._gates:
            gate.close()
        if self._wake is not None:
            signal_eventfd(self._wake)
        if self._loop is not None:
            self._loop.park_all()
        for conn in list(self.connections):
            if isinstance(conn.sock, ssl.SSLSocket) and conn.export_name is not None:
                # Its thread (woken by the eventfd) answers what it read, sends close_notify and ends.
                log.info("nbd %s: TLS connections are not handed over: closed", conn.peer)
                self.stats["closed_at_pause"] += 1
        while not self.connections <= self._parked:
            await self._left.wait()
        await trio.to_thread.run_sync(self._flush_exports)
        log.info("nbd: paused (%d connections parked)", len(self._parked))

    def _flush_exports(self) -> None:
        for export in self.exports.values():
            if export.info.read_only:
                continue
            image = export.image if isinstance(export, QedExport) else None
            if image is not None and not image._keep_need_check and not (
                    image.open_check is not None and image.open_check.corruptions_remaining):
                # Flushed and marked clean: the new process opens it without a check, and this
                # one marks it again at its next allocation if it serves on (resume()).
                image.mark_clean()
            else:
                export.flush()

    async def resume(self) -> None:
        """The hand-over failed: accept and serve on as before pause()."""
        if not self.pausing:
            return
        self.pausing = False
        if self._wake is not None:
            clear_eventfd(self._wake)
        for gate in self._gates:
            gate.open()
        self._resumed.set()
        log.info("nbd: resumed (%d connections)", len(self._parked))

    def save(self, saver: Saver) -> State:
        """After pause(): the listeners and the parked connections (servers.nbd.handover)."""
        if not self.pausing:
            raise HandoverError("nbd: save() before pause()")
        listeners = [gate.listener for gate in self._gates if gate.listener is not None]
        return handover.save_server(self, listeners, sorted(self._parked, key=id), saver)

    def adopt(self, state: State, loader: Loader) -> None:
        """Before serve(): the listeners and connections of `state` (save() of a server made
        with the same exports, in the process before) are this server's; serve() listens
        on them and serves the connections at once."""
        self._adopted_listeners, self._adopted = handover.load_server(self, state, loader)

    def release(self) -> None:
        """After a hand-over from this process (tests; a real upgrade's process exits): once
        serve() is cancelled it closes its copies of the sockets, shuts none down, removes
        no socket file and leaves the exports to the caller."""
        if not self.pausing:
            raise HandoverError("nbd: release() before pause()")
        self._released = True

    async def _watch_requests(self) -> None:
        """Drop the clients that stopped in the middle of a request payload_timeout seconds ago
        (a header, a WRITE payload): what the request holds is not held for them longer."""
        while True:
            await trio.sleep(WATCH_INTERVAL)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.parked:
                    continue  # (its socket is not this server's to shut down while paused)
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
        if not conn.parked:  # a parked socket is shut down by nobody: it may go to a new process
            conn.stop()
