"""The state one NBD connection's drivers share, and the serving of its requests.

`NbdConnection` holds what stays with a connection whichever driver serves
it (handshake, threaded, loop): the sans-IO protocol, the chosen export,
the socket, the send lock and the replies the socket has not taken yet, the
receive buffer (which the native loop receives into too), the native
requests, and the pool for FLUSH and FUA writes.  Serving a request is the
same in every mode; what differs is how a reply goes out: with a blocking
send in a thread of the connection's own, or without blocking while the
transmission loop serves the connection (`loop` set), the rest waiting in
`out` until the socket takes it.
"""

from __future__ import annotations

import dataclasses
import errno as E
import logging
import mmap
import socket
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from qbackend.block.exports import Export
from qbackend.plumbing.unix import shutdown
from qbackend.protocol import nbd
from qbackend.servers.nbd_fast import BATCH, NativeRequests

if TYPE_CHECKING:
    from qbackend.servers.nbd.loop import TransmissionLoop
    from qbackend.servers.nbd.server import NbdServer

# One logger for the package: what operators filter on is the NBD server, not its modules.
log = logging.getLogger("qbackend.servers.nbd")

# A connection in transmission receives into RECV_SIZE bytes of its own (anonymous memory,
# resident only as far as a receive filled it); during the handshake it has none (the
# handshake receives at most HANDSHAKE_RECV bytes at a time).  See docs/resources.md.
RECV_SIZE = 1 << 20
HANDSHAKE_RECV = 16 << 10
MAX_DESCRIPTORS = 1 << 20
# Requests of at least BULK bytes take a connection out of the transmission loop into
# a thread of its own (servers.nbd.loop): large reads and writes overlap across threads.
BULK = 64 << 10
# In the loop, the replies of one native batch (servers.nbd_fast) are at most this
# many bytes: what a client that stops reading can make the server hold for it.
LOOP_BATCH = BULK + 64
_BULK_COMMANDS = frozenset({nbd.Cmd.READ, nbd.Cmd.WRITE})
# WRITE_ZEROES and TRIM of at least this many bytes (up to the whole export with extended
# headers) go to the pool, as FLUSH does: their work, in bounded steps of the block layer,
# holds up neither the transmission loop's other clients nor this one's next requests.
LONG_ZEROING = 32 << 20
_NAMES = {cmd: cmd.name for cmd in nbd.Cmd}  # stats keys (an enum's .name is a slow property)
_ERRNOS = {E.EPERM: nbd.Errno.EPERM, E.EIO: nbd.Errno.EIO, E.ENOMEM: nbd.Errno.ENOMEM,
           E.EINVAL: nbd.Errno.EINVAL, E.ENOSPC: nbd.Errno.ENOSPC, E.EOVERFLOW: nbd.Errno.EOVERFLOW,
           E.ENOTSUP: nbd.Errno.ENOTSUP, E.EFBIG: nbd.Errno.ENOSPC, E.EROFS: nbd.Errno.EPERM}


def nbd_errno(exc: BaseException) -> nbd.Errno:
    code = getattr(exc, "errno", None)
    return _ERRNOS.get(code, nbd.Errno.EIO) if isinstance(code, int) else nbd.Errno.EIO


class Closed(Exception):
    """The client is gone (or its socket failed): the connection ends without a reply."""


class NbdConnection:
    """One client's connection: its state, shared by the driver serving it now."""

    def __init__(self, server: NbdServer, sock: socket.socket, peer: str) -> None:
        self.server = server
        self.sock = sock  # the TLS socket once STARTTLS has wrapped the plain one
        self.peer = peer
        # With one connection at most, multi-conn is not offered (as QEMU does).
        infos = {name: e.info if server.max_connections != 1 else dataclasses.replace(e.info, can_multi_conn=False)
                 for name, e in server.exports.items()}
        self.protocol = nbd.NbdServerConnection(
            tls=server.tls_mode,
            exports=infos,
            default_export=next(iter(server.exports), None))
        self.export_name: str | None = None  # once the handshake has chosen one
        self.export: Export | None = None  # the chosen export, once a transmission driver has it
        self.stopping = False
        # Parked for a hand-over to a new process (NbdServer.pause): no driver serves it, its
        # socket stays open and is shut down by nobody.
        self.parked = False
        # Sends come from the driver and from the pool's threads.
        self.send_lock = threading.Lock()
        # While the transmission loop serves the connection: replies the socket would not
        # take at once, in order; while any wait, the client is not read (backpressure).
        self.loop: TransmissionLoop | None = None
        self.out = bytearray()
        # A bulk request ends loop mode: the loop hands the connection to a thread of its own,
        # which starts with `first` (or with the WRITE whose payload is still coming).
        self.promote = False
        self.first: nbd.Request | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._inflight: set[Future[None]] = set()
        # The receive buffer: none until transmission starts (start_receiving).
        self.buffer: mmap.mmap | bytearray = bytearray()
        self.view = memoryview(self.buffer)
        self.native: NativeRequests | None = None  # plain READs and WRITEs in C, once transmission starts
        # time.monotonic() when the connection began waiting for more of an unfinished request
        # (0.0: it does not): the server drops it once that is payload_timeout seconds ago.
        self.waiting_since = 0.0

    def start_receiving(self) -> None:
        """Transmission starts: the connection's receive buffer, anonymous memory whose
        pages become resident only as far as a receive fills them."""
        if not len(self.buffer):
            self.view.release()
            self.buffer = mmap.mmap(-1, RECV_SIZE)
            self.view = memoryview(self.buffer)

    # -- sending -------------------------------------------------------------------------

    def send(self, *parts: bytes | memoryview) -> None:
        with self.send_lock:
            if self.loop is not None:
                self._send_nonblocking(self.loop, parts)
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
                raise Closed(str(exc)) from None

    def _send_nonblocking(self, loop: TransmissionLoop, parts: tuple[bytes | memoryview, ...]) -> None:
        """Loop mode, holding the send lock: send what the socket takes, keep the rest."""
        if self.out:
            for part in parts:
                self.out += part
            return
        try:
            sent = self.sock.sendmsg(parts) if len(parts) > 1 else self.sock.send(parts[0])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            raise Closed(str(exc)) from None
        total = sum(len(p) for p in parts)
        if sent < total:
            self.out += b"".join(parts)[sent:]
            loop.want_write(self)

    # -- serving what was received ------------------------------------------------------

    def serve_native(self, data: memoryview | bytes) -> memoryview | bytes:
        """Serve the plain READs and WRITEs at the front of `data` natively (NativeRequests);
        what is left for the protocol.  Only while the protocol holds nothing back:
        requests are taken in the order they came."""
        native = self.native
        if native is None or self.protocol.buffered or self.protocol.skipping:
            return data  # (while a refused WRITE's payload is dropped, its bytes are no requests)
        # The transmission loop serves small requests only: a bulk one moves the connection
        # to a thread of its own (see BULK), which the protocol's path does.
        max_length, limit = (BULK - 1, LOOP_BATCH) if self.loop is not None else (nbd.MAX_REQUEST, BATCH)
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
                self.send(native.out[:produced])
            view = view[consumed:]
            if self.out:  # loop mode: the socket is full; the protocol keeps the rest until it drains
                break
        return view

    def serve_events(self, export: Export) -> bool:
        """Serve the requests the protocol has whole; False after a disconnect."""
        protocol = self.protocol
        while True:
            if self.out:  # loop mode: replies wait for the socket; the rest waits for them
                return True
            event = protocol.next_event()
            if event is nbd.NEED_DATA:
                if self.loop is not None and protocol.buffered and protocol.pending_write() >= BULK:
                    # A bulk WRITE whose payload is still coming: the thread of its own receives
                    # it (in bounded pieces), the loop does not gather it here.
                    self.promote = True
                    return False
                return True
            if not self.serve_event(export, event):
                return False

    def serve_event(self, export: Export, event: nbd.Event) -> bool:
        """Serve one event of the protocol; False after a disconnect (or a promotion)."""
        stats = self.server.stats
        if isinstance(event, nbd.Request):
            stats[_NAMES[event.command]] += 1
            if self.loop is not None and event.length >= BULK and event.command in _BULK_COMMANDS:
                self.promote, self.first = True, event  # the loop hands this connection to a thread of its own
                return False
            self.handle(export, event)
        elif isinstance(event, nbd.Rejected):
            stats["rejected"] += 1
            log.info("nbd %s: request %#x refused: %s", self.peer, event.cookie, event.reason)
            self.send(event.reply)
        else:
            assert isinstance(event, nbd.Disconnect)
            if self.loop is None:
                self.drain()
            return False
        return True

    def guarded(self, work: Callable[[], bool]) -> bool:
        """work() (serving requests); what ends the connection instead (a protocol
        error, the client gone, a bug of ours) is dealt with here: then False."""
        try:
            return work()
        except nbd.NbdProtocolError as exc:
            self._protocol_error(exc)
        except Closed:
            pass
        except Exception:
            # A bug of ours must cost this client its connection, not the server its life.
            log.exception("nbd %s: internal error; dropping the connection", self.peer)
            self.server.stats["internal_errors"] += 1
        return False

    def _protocol_error(self, exc: nbd.NbdProtocolError) -> None:
        log.info("nbd %s: dropping the connection: %s", self.peer, exc)
        self.server.stats["protocol_errors"] += 1
        if exc.reply:
            try:
                self.send(exc.reply)
            except Closed:
                pass

    # -- requests -----------------------------------------------------------------------

    def handle(self, export: Export, req: nbd.Request) -> None:
        """Serve one request and send its reply (FLUSH and FUA writes: from the pool)."""
        cmd = req.command
        try:
            if cmd == nbd.Cmd.READ:
                data = export.read(req.offset, req.length)
                self.send(self.protocol.read_reply_header(req.cookie, req.offset, req.length), data)
                return
            if cmd == nbd.Cmd.WRITE:
                if req.flags & nbd.CmdFlags.FUA:
                    data = bytes(req.data)  # the pool writes it after the next request has come
                    self.to_pool(req, lambda: export.write(req.offset, data, True))
                    return
                export.write(req.offset, req.data, False)
            elif cmd == nbd.Cmd.FLUSH:
                self.to_pool(req, export.flush)
                return
            elif cmd == nbd.Cmd.TRIM:
                fua = bool(req.flags & nbd.CmdFlags.FUA)
                if req.length >= LONG_ZEROING:  # long work: not in the driver's thread
                    self.to_pool(req, lambda: export.trim(req.offset, req.length, fua))
                    return
                export.trim(req.offset, req.length, fua)
            elif cmd == nbd.Cmd.WRITE_ZEROES:
                may_trim = not req.flags & nbd.CmdFlags.NO_HOLE
                if req.flags & nbd.CmdFlags.FAST_ZERO and not may_trim:
                    # Zeroing without punching holes means writing zeros: not fast.
                    self.send(self.protocol.error_reply(req.cookie, nbd.Errno.ENOTSUP, "zeroing is not fast",
                                                        req.offset))
                    return
                fua = bool(req.flags & nbd.CmdFlags.FUA)
                if req.length >= LONG_ZEROING:
                    self.to_pool(req, lambda: export.write_zeroes(req.offset, req.length, may_trim, fua))
                    return
                export.write_zeroes(req.offset, req.length, may_trim, fua)
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
                self.send(b"".join(chunks))
                return
            elif cmd == nbd.Cmd.CACHE:
                pass  # the page cache already holds what was read; nothing to prefetch into
            self.send(self.protocol.done_reply(req.cookie, req.offset))
        except Closed:
            raise
        except Exception as exc:  # an I/O error on the image: tell the client, keep serving
            log.warning("nbd %s: %s %#x+%d failed: %s", self.peer, cmd.name, req.offset, req.length, exc)
            self.server.stats["io_errors"] += 1
            self.send(self.protocol.error_reply(req.cookie, nbd_errno(exc), str(exc), req.offset))

    # -- FLUSH, FUA writes, long zeroing: a small pool, so that they hold up no read -----

    def to_pool(self, req: nbd.Request, work: Callable[[], object]) -> None:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="nbd-flush")

        def run() -> None:
            try:
                work()
                reply = self.protocol.done_reply(req.cookie, req.offset)
            except Exception as exc:
                log.warning("nbd %s: %s failed: %s", self.peer, req.command.name, exc)
                reply = self.protocol.error_reply(req.cookie, nbd_errno(exc), str(exc), req.offset)
            try:
                self.send(reply)
            except Closed:
                pass

        future = self._pool.submit(run)
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)

    @property
    def pool_busy(self) -> bool:
        """Whether the pool has requests of this connection in flight (they send on its socket)."""
        return bool(self._inflight)

    def drain(self) -> None:
        """Wait for what is in the pool."""
        for future in list(self._inflight):
            future.result()

    def shut_pool(self) -> None:
        """The driver is done: wait for the pool's threads and let them go."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None  # (a parked connection served again makes a new one)

    # -- the end -------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop reading new requests (from any thread); what is in flight finishes."""
        self.stopping = True
        shutdown(self.sock, socket.SHUT_RD)

    def drop(self) -> None:
        """Disconnect the client now (from any thread): its export is going away."""
        self.stopping = True
        shutdown(self.sock)

    def release_buffers(self) -> None:
        """Give the receive buffers back now, not when a reference cycle is collected
        (64 clients that leave would otherwise hold their memory until the next GC)."""
        if self.native is not None:
            self.native.close()  # it receives into self.buffer too: first
            self.native = None
        self.view.release()
        if isinstance(self.buffer, mmap.mmap):
            self.buffer.close()
        self.buffer = bytearray()


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
