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
import mmap
import select
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import trio

from qbackend.block.exports import Export
from qbackend.plumbing.libc import trim_heap
from qbackend.plumbing.unix import (
    accept_forever,
    clear_eventfd,
    close_fds,
    listen_tcp,
    listen_unix,
    make_eventfd,
    remove_socket,
    shutdown,
    signal_eventfd,
)
from qbackend.protocol import nbd
from qbackend.servers.nbd_fast import BATCH, NativeLoop, NativeRequests

log = logging.getLogger(__name__)

RECV_SIZE = 1 << 20
# A connection receives large WRITE payloads of up to this many bytes into memory it keeps
# (and larger ones into their own): see NbdServerConnection.take_payload.
MAX_HELD_PAYLOAD = 4 << 20
HANDSHAKE_TIMEOUT = 10.0  # seconds, as qemu-nbd's handshake-max-seconds
LOOP_LET_GO = 30.0  # seconds a stopping server waits for the loop to finish a connection
MAX_DESCRIPTORS = 1 << 20
_ERRNOS = {E.EPERM: nbd.Errno.EPERM, E.EIO: nbd.Errno.EIO, E.ENOMEM: nbd.Errno.ENOMEM,
           E.EINVAL: nbd.Errno.EINVAL, E.ENOSPC: nbd.Errno.ENOSPC, E.EOVERFLOW: nbd.Errno.EOVERFLOW,
           E.ENOTSUP: nbd.Errno.ENOTSUP, E.EFBIG: nbd.Errno.ENOSPC, E.EROFS: nbd.Errno.EPERM}


def nbd_errno(exc: BaseException) -> nbd.Errno:
    code = getattr(exc, "errno", None)
    return _ERRNOS.get(code, nbd.Errno.EIO) if isinstance(code, int) else nbd.Errno.EIO


class _Closed(Exception):
    pass


# Requests of at least BULK bytes take a connection out of the transmission loop into
# a thread of its own (TransmissionLoop): large reads and writes overlap across threads.
BULK = 64 << 10
# In the loop, the replies of one native batch (servers.nbd_fast) are at most this
# many bytes: what a client that stops reading can make the server hold for it.
LOOP_BATCH = BULK + 64
_BULK_COMMANDS = frozenset({nbd.Cmd.READ, nbd.Cmd.WRITE})
_NAMES = {cmd: cmd.name for cmd in nbd.Cmd}  # stats keys (an enum's .name is a slow property)


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
        self._payload: mmap.mmap | None = None  # large WRITE payloads (_receive_payload)
        self._view = memoryview(self._buffer)
        # In the transmission loop (TransmissionLoop): replies the socket would not
        # take at once, in order; while any wait, the client is not read (backpressure).
        self._loop: TransmissionLoop | None = None
        self._export: Export | None = None
        self._out = bytearray()
        self.promote: nbd.Request | None = None  # the bulk request that ends loop mode
        self.stopping = False
        self.export_name: str | None = None  # once the handshake has chosen one
        self._native: NativeRequests | None = None  # plain READs and WRITEs in C, once transmission starts

    # -- I/O -------------------------------------------------------------------

    def _send(self, *parts: bytes | memoryview) -> None:
        with self._send_lock:
            if self._loop is not None:
                self._send_nonblocking(parts)
                return
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

    def _send_nonblocking(self, parts: tuple[bytes | memoryview, ...]) -> None:
        """Loop mode, holding the send lock: send what the socket takes, keep the rest."""
        loop = self._loop
        assert loop is not None
        if self._out:
            for part in parts:
                self._out += part
            return
        try:
            sent = self.sock.sendmsg(parts) if len(parts) > 1 else self.sock.send(parts[0])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise _Closed(str(exc)) from None
        total = sum(len(p) for p in parts)
        if sent < total:
            self._out += b"".join(parts)[sent:]
            loop.want_write(self)

    def writable(self) -> bool:
        """Loop mode: send what waits; once nothing does, serve the requests that
        waited behind it, then read the client again.  False once it is over."""
        with self._send_lock:
            try:
                sent = self.sock.send(self._out) if self._out else 0
            except BlockingIOError:
                return True
            except OSError:
                return False
            del self._out[:sent]
            if self._out:
                return True
        assert self._export is not None
        alive = self._serve_buffered(self._export)
        # Under the send lock, as want_write() is: a pool thread's reply queued
        # meanwhile cannot lose its wait for the socket.
        with self._send_lock:
            if alive and not self._out and self._loop is not None:
                self._loop.poller.modify(self.sock.fileno(), select.EPOLLIN)
        if alive:
            self._resume_native()
        return alive

    def readable(self) -> bool:
        """Loop mode: serve what the client sent; False once the connection is over
        (the loop then hands it to finish())."""
        export = self._export
        assert export is not None

        def serve() -> bool:
            native = self._native
            if native is not None and native.handed_over:
                # The native loop stopped at something of Python's: go on from where it was.
                # Then receive as Python does: the loop may have stopped at the end of the stream.
                pending, unsent = native.take_over()
                if unsent:
                    self._send(unsent)
                if pending:
                    self.protocol.receive_data(pending)
                if not self._serve_events(export):
                    return False
                if self._out:
                    return True  # the socket is full: nothing more is read until it drains
            try:
                n = self.sock.recv_into(self._buffer)
            except BlockingIOError:
                return True
            except OSError:
                n = 0
            if not n and self.stopping:
                return False
            data = self._serve_native(self._view[:n]) if n else self._view[:0]
            if n and not data:
                return True  # all served natively
            self.protocol.receive_data(data)
            return self._serve_events(export)

        alive = self._guarded(serve)
        if alive:
            self._resume_native()
        return alive

    def _resume_native(self) -> None:
        """Loop mode: give the connection back to the native loop once Python holds nothing
        of it (no request bytes, no replies waiting, nothing in the pool, which sends on
        this socket too).  Only the loop's thread calls this, between its polls."""
        native, loop = self._native, self._loop
        if (native is None or loop is None or not loop.native or native.in_loop or self._out
                or self.protocol.buffered or self._inflight or self.promote is not None or self.stopping):
            return
        native.resume(BULK - 1, LOOP_BATCH)

    def _serve_buffered(self, export: Export) -> bool:
        return self._guarded(lambda: self._serve_events(export))

    def _guarded(self, work: Callable[[], bool]) -> bool:
        """work() (serving requests); what ends the connection instead (a protocol
        error, the client gone, a bug of ours) is dealt with here: then False."""
        try:
            return work()
        except nbd.NbdProtocolError as exc:
            self._protocol_error(exc)
        except _Closed:
            pass
        except Exception:
            # A bug of ours must cost this client its connection, not the server its life.
            log.exception("nbd %s: internal error; dropping the connection", self.peer)
            self.server.stats["internal_errors"] += 1
        return False

    def finish(self) -> None:
        """Loop mode, in a thread of its own: what is in flight finishes, what waits
        is sent (blocking now), then the pool goes; the connection is over."""
        try:
            self._drain()
            with self._send_lock:
                self._loop = None
                if self._out:
                    self.sock.setblocking(True)
                    self.sock.settimeout(10)
                    self.sock.sendall(self._out)
                    self._out.clear()
        except (OSError, _Closed):
            pass
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _recv(self, size: int = RECV_SIZE) -> memoryview | bytes:
        """The next bytes from the client (at most `size`), valid until the next call.

        Into one preallocated buffer: a fresh 1 MiB bytes object per recv()
        costs more than most requests; the protocol copies what it keeps.
        """
        try:
            n = self.sock.recv_into(self._buffer, size)
        except OSError:
            return b""
        return self._view[:n]

    def release_buffers(self) -> None:
        """Give the receive buffers back now, not when a reference cycle is collected
        (64 clients that leave would otherwise hold their memory until the next GC)."""
        self._view.release()
        self._buffer = bytearray()
        if self._payload is not None:
            self._payload.close()
            self._payload = None
        if self._native is not None:
            self._native.close()
            self._native = None

    def stop(self) -> None:
        """Stop reading new requests (from any thread); what is in flight finishes."""
        self.stopping = True
        shutdown(self.sock, socket.SHUT_RD)

    def drop(self) -> None:
        """Disconnect the client now (from any thread): its export is going away."""
        self.stopping = True
        shutdown(self.sock)

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

    def run_promoted(self) -> None:
        """Leave the loop for a thread of this connection's own (a bulk request came:
        one thread cannot overlap many clients' megabyte reads); then go on as
        run_blocking does, starting with that request."""
        export, first = self._export, self.promote
        assert export is not None and first is not None
        self.promote = None
        self.server.stats["promoted_to_thread"] += 1
        with self._send_lock:
            self._loop = None
            try:
                self.sock.setblocking(True)
                if self._out:
                    self.sock.sendall(self._out)
                    self._out.clear()
            except OSError:
                self.stopping = True  # the client is gone; run_blocking ends at once
        self.run_blocking(export, first)

    def run_blocking(self, export: Export, first: nbd.Request | None = None) -> None:
        """Transmission, in the connection's worker thread, until the client goes."""
        def serve() -> bool:
            if first is not None:
                self._handle(export, first)
            self._transmission(export)
            return False

        try:
            self._guarded(serve)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _protocol_error(self, exc: nbd.NbdProtocolError) -> None:
        log.info("nbd %s: dropping the connection: %s", self.peer, exc)
        self.server.stats["protocol_errors"] += 1
        if exc.reply:
            try:
                self._send(exc.reply)
            except _Closed:
                pass

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
        mode = "extended" if protocol.extended else "structured" if negotiated.structured else "simple"
        self._native = NativeRequests.start(export, mode, self._buffer)
        return export

    def _transmission(self, export: Export) -> None:
        recv_size = RECV_SIZE
        while self._serve_events(export):
            if self.protocol.pending_write() >= BULK:
                # A large WRITE: its payload straight into memory of its own, and then only
                # the next request's header, so the next payload comes straight too.
                event = self._receive_payload()
                try:
                    if not self._serve_event(export, event):
                        return
                finally:
                    if isinstance(event, nbd.Request) and isinstance(event.data, memoryview):
                        event.data.release()  # served: the memory is the next payload's
                recv_size = self.protocol.request_header_size
                continue
            data = self._recv(recv_size)
            recv_size = RECV_SIZE
            if not data and self.stopping:
                self._drain()
                return
            if data:
                data = self._serve_native(data)
                if not data:
                    continue
            self.protocol.receive_data(data)

    def _receive_payload(self) -> nbd.Event:
        """The pending WRITE's payload, received into the connection's payload memory (one
        copy: from the socket); its event.  Payloads over MAX_HELD_PAYLOAD get memory
        of their own, given back after the request."""
        protocol = self.protocol
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
                n = self.sock.recv_into(view[got:])
            except OSError:
                n = 0
            if not n:
                view.release()
                raise nbd.NbdProtocolError(f"client went away in the middle of a WRITE payload ({got} of {length} bytes)")
            got += n
        return protocol.payload_received(view)

    def _serve_native(self, data: memoryview | bytes) -> memoryview | bytes:
        """Serve the plain READs and WRITEs at the front of `data` natively (NativeRequests);
        what is left for the protocol.  Only while the protocol holds nothing back:
        requests are taken in the order they came."""
        native = self._native
        if native is None or self.protocol.buffered:
            return data
        # The transmission loop serves small requests only: a bulk one moves the connection
        # to a thread of its own (see BULK), which the protocol's path does.
        max_length, limit = (BULK - 1, LOOP_BATCH) if self._loop is not None else (nbd.MAX_REQUEST, BATCH)
        view = memoryview(data)
        stats = self.server.stats
        # Not sendfile for large READs: on this kernel it hands the socket the page cache's
        # pages, not a copy, so a WRITE served after it changed a reply still on its way.
        while view:
            reads, writes = native.reads, native.writes
            consumed, produced = native.serve(view, max_length, limit)
            if not consumed:
                break
            reads, writes = native.reads - reads, native.writes - writes
            stats["READ"] += reads
            stats["native_reads"] += reads
            stats["WRITE"] += writes
            stats["native_writes"] += writes
            if produced:
                self._send(native.out[:produced])
            view = view[consumed:]
            if self._out:  # loop mode: the socket is full; the protocol keeps the rest until it drains
                break
        return view

    def _serve_events(self, export: Export) -> bool:
        """Serve the requests the protocol has whole; False after a disconnect."""
        protocol = self.protocol
        while True:
            if self._out:  # loop mode: replies wait for the socket; the rest waits for them
                return True
            event = protocol.next_event()
            if event is nbd.NEED_DATA:
                return True
            if not self._serve_event(export, event):
                return False

    def _serve_event(self, export: Export, event: nbd.Event) -> bool:
        """Serve one event of the protocol; False after a disconnect (or a promotion)."""
        stats = self.server.stats
        if isinstance(event, nbd.Request):
            stats[_NAMES[event.command]] += 1
            if self._loop is not None and event.length >= BULK and event.command in _BULK_COMMANDS:
                self.promote = event  # the loop hands this connection to a thread of its own
                return False
            self._handle(export, event)
        elif isinstance(event, nbd.Rejected):
            stats["rejected"] += 1
            log.info("nbd %s: request %#x refused: %s", self.peer, event.cookie, event.reason)
            self._send(event.reply)
        else:
            assert isinstance(event, nbd.Disconnect)
            if self._loop is None:
                self._drain()
            return False
        return True

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
                    data = bytes(req.data)  # the pool writes it after the next request has come
                    self._in_pool(req, lambda: export.write(req.offset, data, True))
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
        self._loop: TransmissionLoop | None = None  # started with the first plain connection

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
            if self._loop is not None:  # every connection has ended (the nursery waited for them)
                self._loop.close()
                _add_native_counts(self.stats, self._loop)
                self._loop = None
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
        over: trio.Event | None = None  # set once the transmission loop has let go of conn
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
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_stop_on_cancel, conn)
                if isinstance(conn.sock, ssl.SSLSocket):
                    conn.sock.setblocking(True)  # TLS: a worker thread of its own, blocking I/O
                    await trio.to_thread.run_sync(conn.run_blocking, export, limiter=trio.CapacityLimiter(1))
                else:
                    over = trio.Event()
                    token = trio.lowlevel.current_trio_token()
                    self._transmission_loop().add(conn, export, _setter(token, over))
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
                if not over.is_set():
                    log.warning("nbd %s: the transmission loop kept the connection %g s after the stop",
                                peer, LOOP_LET_GO)
            conn.sock.close()  # the TLS socket, once STARTTLS wrapped the plain one
            sock.close()
            conn.release_buffers()
            self.connections.discard(conn)
            if not self.connections:
                trim_heap()  # the last client gone: what the connection threads freed goes back
            self._left.set()
            self._left = trio.Event()


class TransmissionLoop:
    """One thread serving the transmission phase of every plain (not TLS) connection.

    A thread per connection pays, per request, for handing the GIL from thread
    to thread, each handoff a wake-up of another CPU: 64 clients got 0.44x
    qemu-nbd's rate so, with the server using only 0.7 of a CPU.  This thread
    polls every connection's socket (epoll), reads what came and serves the
    requests there, sending replies without blocking; what a socket does not
    take waits in its connection, which is not read until it has gone (a
    client that never reads its replies stops being served, and costs no more
    memory).  FLUSH and FUA writes still go to the connection's pool, whose
    replies come back through the same send path.  TLS connections keep a
    thread each (an SSL socket does not mix with this), and so does a
    connection from its first READ or WRITE of BULK bytes or more on: one
    thread cannot overlap several clients' megabyte transfers (qbackend's
    sequential read fell to half of qemu-nbd's in the loop).

    With native helpers the thread waits in C (servers.nbd_fast.NativeLoop),
    which serves plain small READs and in-place WRITEs of every connection
    itself and hands a connection to the Python code here only for the rest:
    at 64 clients the Python loop had been the bottleneck (0.6x qemu-nbd).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        native_loop = NativeLoop.start()
        self.poller: NativeLoop | _EpollPoller = native_loop if native_loop is not None else _EpollPoller()
        self._wake = make_eventfd()
        self.poller.register(self._wake, select.EPOLLIN)
        self._lock = threading.Lock()
        self._new: list[tuple[NbdConnection, Export, Callable[[], None]]] = []
        self._conns: dict[int, tuple[NbdConnection, Callable[[], None]]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"{name} transmission", daemon=True)
        self._thread.start()

    def add(self, conn: NbdConnection, export: Export, done: Callable[[], None]) -> None:
        """Serve conn from now; done() is called (from another thread) once it is over."""
        conn.sock.setblocking(False)
        conn._export = export
        conn._loop = self
        with self._lock:
            self._new.append((conn, export, done))
        signal_eventfd(self._wake)

    @property
    def native(self) -> bool:
        """Whether the loop waits in C (and serves native connections there)."""
        return isinstance(self.poller, NativeLoop)

    def want_write(self, conn: NbdConnection) -> None:
        """conn has replies waiting: wait for the socket to take them, read nothing meanwhile."""
        try:
            self.poller.modify(conn.sock.fileno(), select.EPOLLOUT)
        except OSError:
            pass  # being closed

    def close(self) -> None:
        self._stopping = True
        signal_eventfd(self._wake)
        self._thread.join(10)
        self.poller.close()
        close_fds([self._wake])

    def _run(self) -> None:
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
                    continue
                entry = conns.get(fd)
                if entry is None:
                    continue
                conn, done = entry
                try:
                    alive = conn.writable() if mask & select.EPOLLOUT else conn.readable()
                except _Closed:
                    alive = False
                if not alive:
                    self._end(fd, conn, done)

    def _take_new(self) -> None:
        with self._lock:
            new, self._new = self._new, []
        for conn, export, done in new:
            fd = conn.sock.fileno()
            self._conns[fd] = (conn, done)
            self.poller.register(fd, select.EPOLLIN, conn._native)
            # What the handshake's last read brought with it may hold requests already.
            if not conn._serve_buffered(export):
                self._end(fd, conn, done)
            else:
                conn._resume_native()

    def _end(self, fd: int, conn: NbdConnection, done: Callable[[], None]) -> None:
        del self._conns[fd]
        try:
            self.poller.unregister(fd)
        except OSError:
            pass

        def finish() -> None:
            try:
                if conn.promote is not None:
                    conn.run_promoted()
                else:
                    conn.finish()
            finally:
                done()

        threading.Thread(target=finish, name=f"{self.name} {'connection' if conn.promote else 'finish'}",
                         daemon=True).start()


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


class ExportInUse(Exception):
    """block-export-del mode=safe of an export that clients still use."""


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
