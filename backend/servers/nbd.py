"""The NBD server: listeners on a UNIX socket and optionally TCP, the
sans-IO protocol in qbackend.protocol.nbd, exports in qbackend.block.exports.

A client's handshake runs in trio, bounded by `handshake_timeout` (10 s by
default, as qemu-nbd): clients that connect and say nothing cost a task
and are dropped with a log line.  Once it has chosen an export, the
connection gets a worker thread for transmission (as for vfio-user:
blocking I/O keeps a request's cost low).  `max_connections` bounds the
clients at once (0: no bound); with 1, multi-conn is not offered.

Requests are read in order and most are answered in order by the
connection thread.  FLUSH and FUA writes go to a small pool, so a slow
flush does not hold up the reads behind it: their replies can come back
out of order, which NBD allows (replies carry the request's cookie).
"""

from __future__ import annotations

import dataclasses
import errno as E
import logging
import socket
import ssl
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import trio

from qbackend.block.exports import Export
from qbackend.plumbing.libc import trim_heap
from qbackend.plumbing.unix import accept_forever, listen_tcp, listen_unix, remove_socket
from qbackend.protocol import nbd

log = logging.getLogger(__name__)

RECV_SIZE = 1 << 20
HANDSHAKE_TIMEOUT = 10.0  # seconds, as qemu-nbd's handshake-max-seconds
MAX_DESCRIPTORS = 1 << 20
_ERRNOS = {E.EPERM: nbd.Errno.EPERM, E.EIO: nbd.Errno.EIO, E.ENOMEM: nbd.Errno.ENOMEM,
           E.EINVAL: nbd.Errno.EINVAL, E.ENOSPC: nbd.Errno.ENOSPC, E.EOVERFLOW: nbd.Errno.EOVERFLOW,
           E.ENOTSUP: nbd.Errno.ENOTSUP, E.EFBIG: nbd.Errno.ENOSPC, E.EROFS: nbd.Errno.EPERM}


def nbd_errno(exc: BaseException) -> nbd.Errno:
    code = getattr(exc, "errno", None)
    return _ERRNOS.get(code, nbd.Errno.EIO) if isinstance(code, int) else nbd.Errno.EIO


class _Closed(Exception):
    pass


class NbdConnection:
    def __init__(self, server: NbdServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        # With one connection at most, multi-conn is not offered (as QEMU does).
        infos = {name: e.info if server.max_connections != 1 else dataclasses.replace(e.info, can_multi_conn=False)
                 for name, e in server.exports.items()}
        self.protocol = nbd.NbdServerConnection(
            tls=server.tls_mode,
            exports=infos,
            default_export=next(iter(server.exports), None))
        self._send_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: set[Future[None]] = set()
        self._buffer = bytearray(RECV_SIZE)
        self._view = memoryview(self._buffer)
        self.stopping = False
        self.export_name: str | None = None  # once the handshake has chosen one

    # -- I/O -------------------------------------------------------------------

    def _send(self, *parts: bytes) -> None:
        with self._send_lock:
            try:
                if isinstance(self.sock, ssl.SSLSocket):  # TLS has no sendmsg
                    self.sock.sendall(b"".join(parts))
                elif len(parts) == 1:
                    self.sock.sendall(parts[0])
                else:
                    total = sum(len(p) for p in parts)
                    sent = self.sock.sendmsg(parts)
                    if sent < total:
                        self.sock.sendall(b"".join(parts)[sent:])
            except OSError as exc:
                raise _Closed(str(exc)) from None

    def _recv(self) -> memoryview | bytes:
        """The next bytes from the client, valid until the next call.

        Into one preallocated buffer: a fresh 1 MiB bytes object per recv()
        costs more than most requests; the protocol copies what it keeps.
        """
        try:
            n = self.sock.recv_into(self._buffer)
        except OSError:
            return b""
        return self._view[:n]

    def release_buffers(self) -> None:
        """Give the receive buffers back now, not when a reference cycle is collected
        (64 clients that leave would otherwise hold their memory until the next GC)."""
        self._view.release()
        self._buffer = bytearray()

    def stop(self) -> None:
        """Stop reading new requests (from any thread); what is in flight finishes."""
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def drop(self) -> None:
        """Disconnect the client now (from any thread): its export is going away."""
        self.stopping = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- the loop (worker thread) ------------------------------------------------------

    async def negotiate(self) -> Export | None:
        """The greeting and the option haggling, in trio: a client that has not
        finished its handshake costs a task, not a thread.  The export it chose,
        or None when it ended (or broke the protocol) without choosing one."""
        try:
            await self._asend(self.protocol.greeting())
            return await self._handshake()
        except nbd.NbdProtocolError as exc:
            log.info("nbd %s: dropping the connection: %s", self.peer, exc)
            self.server.stats["protocol_errors"] += 1
            if exc.reply:
                try:
                    await self._asend(exc.reply)
                except _Closed:
                    pass
        except _Closed:
            pass
        return None

    async def _arecv(self) -> bytes:
        while True:
            try:
                return self.sock.recv(RECV_SIZE)
            except (BlockingIOError, ssl.SSLWantReadError):
                await trio.lowlevel.wait_readable(self.sock)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(self.sock)
            except OSError as exc:
                raise _Closed(str(exc)) from None

    async def _asend(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except (BlockingIOError, ssl.SSLWantWriteError):
                await trio.lowlevel.wait_writable(self.sock)
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(self.sock)
            except OSError as exc:
                raise _Closed(str(exc)) from None

    async def _start_tls(self) -> None:
        """After STARTTLS's ACK: the TLS handshake, then everything goes through TLS."""
        context = self.server.tls_context
        assert context is not None
        tls = context.wrap_socket(self.sock, server_side=True, do_handshake_on_connect=False)
        self.sock = tls
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(tls)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(tls)
            except (ssl.SSLError, OSError) as exc:
                log.info("nbd %s: TLS handshake failed: %s", self.peer, exc)
                self.server.stats["tls_failures"] += 1
                raise _Closed(f"TLS handshake failed: {exc}") from None
        self.protocol.tls_started()
        log.info("nbd %s: TLS on (%s)", self.peer, tls.version())

    def run_blocking(self, export: Export) -> None:
        """Transmission, in the connection's worker thread, until the client goes."""
        try:
            self._transmission(export)
        except nbd.NbdProtocolError as exc:
            log.info("nbd %s: dropping the connection: %s", self.peer, exc)
            self.server.stats["protocol_errors"] += 1
            if exc.reply:
                try:
                    self._send(exc.reply)
                except _Closed:
                    pass
        except _Closed:
            pass
        except Exception:
            # A bug of ours must cost this client its connection, not the
            # server its life.
            log.exception("nbd %s: internal error; dropping the connection", self.peer)
            self.server.stats["internal_errors"] += 1
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    async def _handshake(self) -> Export | None:
        protocol = self.protocol
        while protocol.phase is not nbd.Phase.TRANSMISSION:
            event = protocol.next_event()
            if event is nbd.NEED_DATA:
                protocol.receive_data(await self._arecv())
                continue
            assert isinstance(event, nbd.OptionHandled)
            await self._asend(event.reply)
            if event.done:
                return None
            if event.start_tls:
                await self._start_tls()
        negotiated = protocol.negotiated()
        log.info("nbd %s: export %r (structured replies: %s, extended headers: %s, contexts: %s)", self.peer,
                 negotiated.export.name, negotiated.structured, self.protocol.extended,
                 ", ".join(negotiated.meta_contexts) or "none")
        export = self.server.exports.get(negotiated.export.name)
        if export is None:  # removed while this client negotiated
            raise _Closed(f"export {negotiated.export.name!r} was removed")
        self.export_name = negotiated.export.name
        return export

    def _transmission(self, export: Export) -> None:
        protocol = self.protocol
        stats = self.server.stats
        while True:
            event = protocol.next_event()
            if event is nbd.NEED_DATA:
                data = self._recv()
                if not data and self.stopping:
                    self._drain()
                    return
                protocol.receive_data(data)
                continue
            if isinstance(event, nbd.Request):
                stats[event.command.name] += 1
                self._handle(export, event)
            elif isinstance(event, nbd.Rejected):
                stats["rejected"] += 1
                log.info("nbd %s: request %#x refused: %s", self.peer, event.cookie, event.reason)
                self._send(event.reply)
            else:
                assert isinstance(event, nbd.Disconnect)
                self._drain()
                return

    def _drain(self) -> None:
        for future in list(self._inflight):
            future.result()

    # -- requests -----------------------------------------------------------------------

    def _handle(self, export: Export, req: nbd.Request) -> None:
        cmd = req.command
        try:
            if cmd == nbd.Cmd.READ:
                data = export.read(req.offset, req.length)
                self._send(self.protocol.read_reply_header(req.cookie, req.offset, req.length), data)
                return
            if cmd == nbd.Cmd.WRITE:
                if req.flags & nbd.CmdFlags.FUA:
                    self._in_pool(req, lambda: export.write(req.offset, req.data, True))
                    return
                export.write(req.offset, req.data, False)
            elif cmd == nbd.Cmd.FLUSH:
                self._in_pool(req, export.flush)
                return
            elif cmd == nbd.Cmd.TRIM:
                export.trim(req.offset, req.length, bool(req.flags & nbd.CmdFlags.FUA))
            elif cmd == nbd.Cmd.WRITE_ZEROES:
                may_trim = not req.flags & nbd.CmdFlags.NO_HOLE
                if req.flags & nbd.CmdFlags.FAST_ZERO and not may_trim:
                    # Zeroing without punching holes means writing zeros: not fast.
                    self._send(self.protocol.error_reply(req.cookie, nbd.Errno.ENOTSUP, "zeroing is not fast",
                                                         req.offset))
                    return
                export.write_zeroes(req.offset, req.length, may_trim, bool(req.flags & nbd.CmdFlags.FUA))
            elif cmd == nbd.Cmd.BLOCK_STATUS:
                contexts = self.protocol.meta_contexts
                chunks = []
                for n, context in enumerate(contexts):
                    extents = (export.allocation_depth(req.offset, req.length) if context == nbd.ALLOCATION_DEPTH
                               else export.block_status(req.offset, req.length))
                    chunks.append(self.protocol.block_status_chunk(
                        req.cookie, req.offset, nbd.CONTEXT_IDS[context],
                        _clip(extents, req.length, bool(req.flags & nbd.CmdFlags.REQ_ONE)),
                        done=n == len(contexts) - 1))
                self._send(b"".join(chunks))
                return
            elif cmd == nbd.Cmd.CACHE:
                pass  # the page cache already holds what was read; nothing to prefetch into
            self._send(self.protocol.done_reply(req.cookie, req.offset))
        except _Closed:
            raise
        except Exception as exc:  # an I/O error on the image: tell the client, keep serving
            log.warning("nbd %s: %s %#x+%d failed: %s", self.peer, cmd.name, req.offset, req.length, exc)
            self.server.stats["io_errors"] += 1
            self._send(self.protocol.error_reply(req.cookie, nbd_errno(exc), str(exc), req.offset))

    def _in_pool(self, req: nbd.Request, work: object) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nbd-flush")

        def run() -> None:
            try:
                work()  # type: ignore[operator]
                reply = self.protocol.done_reply(req.cookie, req.offset)
            except Exception as exc:
                log.warning("nbd %s: %s failed: %s", self.peer, req.command.name, exc)
                reply = self.protocol.error_reply(req.cookie, nbd_errno(exc), str(exc), req.offset)
            try:
                self._send(reply)
            except _Closed:
                pass

        future = self._pool.submit(run)
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)


def _clip(extents: list[tuple[int, int]], length: int, only_one: bool) -> list[tuple[int, int]]:
    """Extents cut to the requested length (and to one with REQ_ONE)."""
    out: list[tuple[int, int]] = []
    left = length
    for n, flags in extents:
        if left <= 0 or len(out) >= MAX_DESCRIPTORS:
            break
        out.append((min(n, left), flags))
        left -= n
        if only_one:
            break
    return out


class NbdServer:
    """Serves exports on a UNIX socket and/or a TCP address until cancelled.

    On the way out it stops reading new requests, lets what is in flight
    finish, flushes every writable export and closes them.
    """

    def __init__(self, exports: dict[str, Export], socket_path: Path | None = None,
                 tcp: tuple[str, int] | None = None, *, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 max_connections: int = 0, tls_mode: str = "off", tls_context: ssl.SSLContext | None = None) -> None:
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
        self.max_connections = max_connections  # 0: no limit
        self.tls_mode = tls_mode  # off, on (offered) or require (nothing but STARTTLS and ABORT before it)
        self.tls_context = tls_context
        self._left = trio.Event()  # set (and renewed) whenever a connection ends

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
        await trio.to_thread.run_sync(_flush_and_close, export)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = self._listeners()
        try:
            async with trio.open_nursery() as nursery:
                for listener in listeners:
                    nursery.start_soon(accept_forever, listener, "nbd", nursery, self._serve_client)
                task_status.started()
        finally:
            for listener in listeners:
                listener.close()
            if self.socket_path is not None:
                remove_socket(self.socket_path)
            exports, self.exports = list(self.exports.values()), {}
            for export in exports:
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
        try:
            sock.setblocking(False)
            export = None
            with trio.move_on_after(self.handshake_timeout) as scope:
                export = await conn.negotiate()
            if scope.cancelled_caught:
                log.info("nbd %s: no handshake within %g s: dropped", peer, self.handshake_timeout)
                self.stats["handshake_timeouts"] += 1
            if export is None:
                return
            conn.sock.setblocking(True)  # the worker thread does blocking I/O from here on (TLS or not)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_cancel, conn)
                await trio.to_thread.run_sync(conn.run_blocking, export, limiter=trio.CapacityLimiter(1))
                nursery.cancel_scope.cancel()
        except Exception:
            # A bug of ours costs this client its connection, not the server its life.
            log.exception("nbd %s: internal error; dropping the connection", peer)
            self.stats["internal_errors"] += 1
        finally:
            self.connections.discard(conn)
            conn.sock.close()  # the TLS socket, once STARTTLS wrapped the plain one
            sock.close()
            conn.release_buffers()
            if not self.connections:
                trim_heap()  # the last client gone: what the connection threads freed goes back
            self._left.set()
            self._left = trio.Event()


class ExportInUse(Exception):
    """block-export-del mode=safe of an export that clients still use."""


def _flush_and_close(export: Export) -> None:
    try:
        if not export.info.read_only:
            export.flush()
    finally:
        export.close()


async def _stop_on_cancel(conn: NbdConnection) -> None:
    try:
        await trio.sleep_forever()
    finally:
        conn.stop()
