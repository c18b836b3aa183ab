"""The trio side of vfio-user: a UNIX socket per device, one client at a
time, messages carried between the socket and the sans-IO protocol
(qbackend.protocol.vfio_user) and the device model (qbackend.vfio.function).

Each connection's receive loop runs in a worker thread of its own, started
and supervised from trio, doing blocking recvmsg/send.  Measured here (one
CPU, synchronous 4-byte reads), a round trip through trio's scheduler
(wait_readable) floors at about 35,000 per second, while a blocking loop
reaches about 65,000; the latency target is 60,000.  Everything else (the
listener, lifetimes, DMA requests from device models, QMP) stays in trio.
The device model is shared between that thread and trio tasks: both touch
it only under `device.lock`, which trio takes through `run_locked` (in a
worker thread, see qbackend.plumbing.threads), never directly.

A server hands over to a new process (qbackend.app.upgrade: pause, save,
adopt, resume).  The worker's blocking wait is a poll on the socket and the
connection's wake eventfd, so that a pause stops it at a message boundary
(everything received served and answered) without touching the socket;
what it holds of a message not yet whole travels with the state.
"""

from __future__ import annotations

import base64
import errno as E
import logging
import math
import os
import select
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import trio

from qbackend.plumbing.handover import HandoverError, Loader, Saver, State, adopt_socket
from qbackend.plumbing.threads import run_locked
from qbackend.plumbing.unix import (
    AcceptGate,
    adopt_owned,
    clear_eventfd,
    close_fds,
    fds_from_ancdata,
    listen_unix,
    make_eventfd,
    owned_inode,
    remove_socket,
    send_with_fds,
    sends_within,
    serve_unix,
    shutdown,
    signal_eventfd,
)
from qbackend.protocol import vfio_user as vu
from qbackend.servers.vfio_user_fast import NativeAccessLoop
from qbackend.vfio.dma import DmaError, DmaTable
from qbackend.vfio.function import PciFunction

log = logging.getLogger(__name__)

RECV_SIZE = 64 * 1024
SCM_MAX_FD = 253  # the kernel's limit per message; room for all, so none are lost unclosed
CMSG_BUFSIZE = socket.CMSG_SPACE(SCM_MAX_FD * struct.calcsize("i"))
# Adaptive polling (Connection.run_blocking): spin up to SPIN_NS for the next
# message when the last one came within SPIN_WINDOW_NS of the reply before it.
SPIN_NS = 100_000
SPIN_WINDOW_NS = 500_000
DMA_REPLY_TIMEOUT = 5.0
HANDSHAKE_TIMEOUT = 10.0  # seconds for a new client's first message
# Seconds a stopping connection's thread has to end before it is abandoned (a
# device callback that never returns holds it: qbackend.devices.faults).
STOP_WAIT = 2.0
# Seconds a pause waits for the device's own jobs (Device.defer) to end.
QUIESCE_WAIT = 5.0

# What run_blocking's receive step hands on: view, the length of view's bytes to handle, their fds.
Received = tuple[memoryview, int, tuple[int, ...]]


class ConnectionClosed(Exception):
    pass


class DmaAccess:
    """A connection's guest memory for device code in any thread but the
    connection's own (whose loop must be free to read the client's replies):
    direct through the DMA maps' fds, else DMA_READ / DMA_WRITE messages."""

    def __init__(self, conn: Connection, token: trio.lowlevel.TrioToken) -> None:
        self._conn = conn
        self._token = token

    def read(self, address: int, count: int) -> bytes:
        conn = self._conn
        with conn.device.lock:
            direct = conn._read_direct(address, count)
        if direct is not None:
            return direct
        self._check_thread()
        return trio.from_thread.run(conn.dma_read, address, count, trio_token=self._token)

    def write(self, address: int, data: bytes) -> None:
        conn = self._conn
        with conn.device.lock:
            if conn._write_direct(address, data):
                return
        self._check_thread()
        trio.from_thread.run(conn.dma_write, address, data, trio_token=self._token)

    def _check_thread(self) -> None:
        if threading.get_ident() == self._conn.worker_ident:
            raise DmaError("a DMA message cannot be sent from inside a region access (the client waits for "
                           "its reply): do it in Device.defer()", errno=E.EDEADLK)


class Connection:
    """One client of one device."""

    def __init__(self, server: VfioUserServer, sock: socket.socket, protocol: vu.ServerConnection | None = None,
                 dma: DmaTable | None = None) -> None:
        self.server = server
        self.device = server.device
        self.sock = sock
        self.worker_ident: int | None = None  # the thread of run_blocking, once it runs
        self.native: NativeAccessLoop | None = None  # the native access loop, once it serves
        # A connection handed over from another process comes with its protocol state and maps.
        self.protocol = protocol if protocol is not None else vu.ServerConnection()
        self.dma = dma if dma is not None else DmaTable(vu.MAX_DMA_MAPS)
        # The receive buffer, kept across pauses: the native loop points into it.
        self.buffer = bytearray(RECV_SIZE)
        # Pausing (VfioUserServer.pause): `pausing[0]` asks the worker to return at the
        # next message boundary, and the wake eventfd ends its blocking wait; `paused`
        # says it did.  A list: the receive loop reads it through a local name.
        self.wake = make_eventfd()
        self.pausing = [False]
        self.paused = False
        self.resumed = trio.Event()
        self.ended = trio.Event()  # the current worker's end (VfioUserServer._run_worker)
        self.released = trio.Event()  # the server has let go of it
        self._trio_token = trio.lowlevel.current_trio_token()
        self._send_lock = threading.Lock()
        # Waiters for replies to our DMA requests: id -> (event, slot).
        self._replies: dict[int, tuple[trio.Event, list[vu.ServerReplyReceived]]] = {}
        self.closed = False
        self.abandoned = False  # its thread did not end when stopped (see STOP_WAIT)
        cmd = vu.Command
        self._handlers = {
            cmd.VERSION: self._version,
            cmd.DMA_MAP: self._dma_map,
            cmd.DMA_UNMAP: self._dma_unmap,
            cmd.DEVICE_GET_INFO: self._get_info,
            cmd.DEVICE_GET_REGION_INFO: self._get_region_info,
            cmd.DEVICE_GET_IRQ_INFO: self._get_irq_info,
            cmd.DEVICE_SET_IRQS: self._set_irqs,
            cmd.REGION_READ: self._region_read,
            cmd.REGION_WRITE: self._region_write,
            cmd.REGION_WRITE_MULTI: self._region_write_multi,
            cmd.DEVICE_RESET: self._reset,
        }

    # -- the receive loop (worker thread) -------------------------------------------

    def run_blocking(self) -> None:
        """Serve the client until it goes away; runs in the connection's thread.

        Each round is three steps: receive (one recvmsg, or the native
        access loop until it hands bytes back), serve (everything those
        bytes ask, under the device lock) and send (the replies, in one
        write).  The steps are closures made once per connection by
        _receive_step, _serve_step and _send_step: on one CPU every Python
        call or attribute lookup here is a visible share of a round trip,
        so each holds what it uses in local names.
        """
        self.worker_ident = threading.get_ident()
        # One preallocated buffer: a fresh large bytes object per recvmsg()
        # costs more than the rest of a round trip.
        receive = self._receive_step(self.buffer)
        serve = self._serve_step()
        send = self._send_step()
        out = bytearray()  # replies to a chunk of several messages
        try:
            while True:
                view, n, fds = receive()
                if n < 0:  # paused, at a message boundary: nothing received is unanswered
                    self.paused = True
                    return
                reply = serve(view, n, fds, out)
                if reply:
                    send(reply)
                    if out:
                        out.clear()
                if not n:
                    return
        except vu.ProtocolError as exc:
            log.warning("%s: closing the connection: %s", self.server.name, exc)
            self.server.stats["protocol_errors"] += 1
            close_fds(exc.fds)
            try:
                self._send_blocking(bytes(out) + exc.reply)
            except ConnectionClosed:
                pass
        except ConnectionClosed:
            pass
        except Exception:
            # A bug of ours costs this client its connection, not the device
            # its server.  (A device's own exceptions never come here: they
            # are its faults, qbackend.devices.faults.)
            log.exception("%s: internal error; closing the connection", self.server.name)
            self.server.stats["internal_errors"] += 1

    def _receive_step(self, buffer: bytearray) -> Callable[[], Received]:
        """run_blocking's receive: a function returning (view, n, fds), the next
        bytes to handle (view[0:n]; n == 0 at the end of the stream) and the fds
        that came with them, or raising ConnectionClosed.

        Once the client is ready, receiving is the native access loop's
        (NativeAccessLoop, when it can run here): it serves the plain
        register accesses itself and hands back the bytes that need Python,
        which run_blocking handles exactly as bytes received here.  Python
        receives itself before that, without the native loop, and while the
        protocol holds part of a message (the rest must come to it).

        n == -1: a pause was asked for (`pausing`); the blocking wait is a poll
        on the socket and the wake eventfd, then a receive that does not block.

        Adaptive polling.  A guest vCPU waits for each reply, and on this kind
        of machine most of a round trip is the wake-up of a sleeping CPU on
        each side.  So after a reply, while the client keeps sending within
        SPIN_WINDOW_NS, look for its next message without sleeping (yielding
        the CPU each time, in case the client runs on ours) for up to SPIN_NS
        before blocking; a spin that finds nothing turns spinning off until
        messages come close together again, so an idle client costs one
        spin, then nothing.  The native loop does the same.
        """
        sock = self.sock
        fd = sock.fileno()
        protocol = self.protocol
        ready = vu.State.READY
        recvmsg_into = sock.recvmsg_into
        buffers = [buffer]
        whole = memoryview(buffer)
        clock = time.perf_counter_ns
        yield_cpu = os.sched_yield
        dontwait = socket.MSG_DONTWAIT
        spin = False
        # After a pause, the loop that served before goes on (it points into self.buffer).
        native: NativeAccessLoop | None = self.native
        native_wanted = self.server.native and native is None
        pausing = self.pausing
        wake = self.wake
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(wake, select.POLLIN)
        wait = poller.poll

        def receive() -> Received:
            nonlocal spin, native, native_wanted
            if pausing[0]:
                return whole, -1, ()
            if native_wanted and protocol.state is ready:
                native_wanted = False
                native = self._start_native(fd, buffer)
            if native is not None and not protocol.reader.buffered:
                return self._receive_native(native, whole)
            got = False
            if spin:
                deadline = clock() + SPIN_NS
                while True:
                    try:
                        n, ancdata, _flags, _ = recvmsg_into(buffers, CMSG_BUFSIZE, dontwait)
                        got = True
                        break
                    except BlockingIOError:
                        if clock() > deadline:
                            break
                        yield_cpu()
                    except OSError:
                        break  # the blocking receive below says what it was
                spin = got
            if not got:
                waited = clock()
                while True:
                    for ready_fd, _events in wait():
                        if ready_fd == wake:
                            return whole, -1, ()
                    try:
                        n, ancdata, _flags, _ = recvmsg_into(buffers, CMSG_BUFSIZE, dontwait)
                        break
                    except BlockingIOError:
                        continue  # woken for nothing (another reader cannot be: this thread is the only one)
                    except InterruptedError:
                        continue
                    except (ConnectionResetError, BrokenPipeError):
                        n, ancdata = 0, []
                        break
                    except OSError as exc:
                        raise ConnectionClosed(str(exc)) from None
                spin = clock() - waited < SPIN_WINDOW_NS
            return whole, n, tuple(fds_from_ancdata(ancdata)) if ancdata else ()

        return receive

    def _start_native(self, fd: int, buffer: bytearray) -> NativeAccessLoop | None:
        """The native access loop for this connection, once the client is ready (None: stay in Python)."""
        native = NativeAccessLoop.start(self.device, fd, buffer, self.protocol.server_caps.max_data_xfer_size,
                                        SPIN_NS, SPIN_WINDOW_NS, self.wake)
        self.native = native
        if native is not None:
            if self.pausing[0]:  # asked for before this loop existed: it must see it too
                native.request_pause(True)
            log.debug("%s: native access loop serving", self.server.name)
        return native

    def _receive_native(self, native: NativeAccessLoop, whole: memoryview) -> Received:
        """Run the native loop (without the GIL) until a message needs Python: what it hands back."""
        status = native.serve()
        if status == native.PAUSED:
            return whole, -1, ()
        if status > 0:
            begin, end = native.pending
            fds = native.take_fds()
            return (whole[begin:end] if begin else whole), end - begin, fds
        if status == 0 or status in (-E.ECONNRESET, -E.EPIPE):
            return whole, 0, ()
        raise ConnectionClosed(os.strerror(-status))

    def _serve_step(self) -> Callable[[memoryview, int, tuple[int, ...], bytearray], bytes | bytearray | None]:
        """run_blocking's serve: a function that handles view[0:n] (and its fds)
        under the device lock and returns the replies to send.

        Region accesses (nearly all traffic) are served straight from the
        receive buffer by the protocol's serve_access(), which parses,
        checks, calls the device and packs the reply.  A buffer holding
        exactly one access (a vCPU waiting on an MMIO or config access) is
        the common case and is finished here; anything else goes on in
        _handle_chunk, which puts the replies in `out` (returned then).
        """
        protocol = self.protocol
        serve_access = protocol.serve_access
        # [read, write]: the device's methods, or a trace's (qbackend.vfio.trace) while one runs.
        accessors = self.device.accessors
        handle_chunk = self._handle_chunk
        access_refused = self._access_refused
        # Bound methods rather than `with`: a with-statement looks up
        # __enter__/__exit__ and makes two method objects each time.
        lock_acquire, lock_release = self.device.lock.acquire, self.device.lock.release

        def serve(view: memoryview, n: int, fds: tuple[int, ...], out: bytearray) -> bytes | bytearray | None:
            lock_acquire()
            try:
                reply: bytes | bytearray | None = None
                if not fds:
                    try:
                        reply = serve_access(view, 0, n, accessors[0], accessors[1])
                    except (vu.RequestError, DmaError) as exc:
                        reply = access_refused(exc)
                if reply is None or protocol.access_end != n:
                    handle_chunk(view, n, fds, reply, out)
                    reply = out
            finally:
                lock_release()
            return reply

        return serve

    def _send_step(self) -> Callable[[bytes | bytearray], None]:
        """run_blocking's send: a function that sends replies that carry no fds, or raises ConnectionClosed."""
        sock = self.sock
        fd = sock.fileno()
        write = os.write  # cheaper than sock.send
        send_acquire, send_release = self._send_lock.acquire, self._send_lock.release

        def send(reply: bytes | bytearray) -> None:
            send_acquire()
            try:
                sent = write(fd, reply)
                if sent != len(reply):
                    sock.sendall(reply[sent:])
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from None
            finally:
                send_release()

        return send

    def _access_refused(self, exc: vu.RequestError | DmaError) -> bytes:
        """The error reply for the access serve_access() failed to carry out."""
        access = self.protocol.failed_access
        assert access is not None
        msg_id, command, _size, flags, _error, _offset, _region, _count = access
        return self._refused(msg_id, command, bool(flags), exc)

    def _handle_chunk(self, view: memoryview, n: int, fds: tuple[int, ...], first: bytes | bytearray | None,
                      out: bytearray) -> None:
        """Go on with what one recvmsg() brought (nothing at the end); replies go to `out`.

        `first` is the reply to the access at the front that run_blocking()
        has served already (None if it did not).  Further accesses are served
        from the buffer; from the first other message on, the bytes go to the
        protocol's general path.
        """
        protocol = self.protocol
        pos = 0
        if first is not None:
            out += first
            pos = protocol.access_end
            serve_access, (read, write) = protocol.serve_access, self.device.accessors
            while pos < n:
                try:
                    reply = serve_access(view, pos, n, read, write)
                except (vu.RequestError, DmaError) as exc:
                    reply = self._access_refused(exc)
                if reply is None:
                    break
                out += reply
                pos = protocol.access_end
        if pos < n or not n:
            protocol.receive_data(bytes(view[pos:n]), fds)
            self._handle_events(out)

    def _handle_events(self, out: bytearray) -> None:
        """Handle every whole message buffered; replies go to `out`.

        A reply that carries fds cannot share a sendmsg() with earlier bytes
        (the fds would arrive with the earlier reply), so it is sent at once,
        after flushing what `out` holds.
        """
        protocol = self.protocol
        stats = self.server.stats
        while True:
            event = protocol.next_event()
            if event is vu.NEED_DATA:
                return
            if isinstance(event, vu.Request):
                self._handle_request(event, out)
            elif isinstance(event, vu.ServerReplyReceived):
                close_fds(event.fds)
                self._trio_token.run_sync_soon(self._deliver_reply, event)
            else:
                assert isinstance(event, vu.Rejected)
                stats["rejected"] += 1
                log.info("%s: message %d (command %d) rejected: %s", self.server.name, event.id,
                         event.command, event.reason)
                close_fds(event.fds)
                out += event.reply

    def _handle_request(self, request: vu.Request, out: bytearray) -> None:
        self.server.command_counts[request.command] += 1
        try:
            reply, fds = self._handlers[request.command](request)
        except (vu.RequestError, DmaError) as exc:
            out += self._refused(request.id, request.command, request.no_reply, exc)
            return
        if fds:
            self._send_blocking(bytes(out))
            out.clear()
            self._send_blocking(reply, fds)
        else:
            out += reply

    def _refused(self, msg_id: int, command: int, no_reply: bool, exc: vu.VfioUserError | DmaError) -> bytes:
        """Count and log a refused request; the error reply to send (b"" for none)."""
        self.server.stats["request_errors"] += 1
        log.info("%s: %s request %d refused: %s", self.server.name, vu.Command(command).name, msg_id, exc)
        return b"" if no_reply else vu.build_error_reply(msg_id, command, exc.errno)

    def _deliver_reply(self, event: vu.ServerReplyReceived) -> None:
        waiter = self._replies.get(event.id)
        if waiter is not None:
            waiter[1].append(event)
            waiter[0].set()

    # -- sending (any thread) -------------------------------------------------------

    def _send_blocking(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        if not data:
            return
        with self._send_lock:
            try:
                send_with_fds(self.sock, data, fds)
            except OSError as exc:
                raise ConnectionClosed(str(exc)) from None

    # -- requests ---------------------------------------------------------------

    Reply = tuple[bytes, tuple[int, ...]]

    def _version(self, req: vu.Request) -> Reply:
        self._lifecycle("connect", self.device.client_connected)
        caps = self.protocol.client_caps
        log.info("%s: client connected (max_msg_fds=%d, max_data_xfer_size=%d)", self.server.name,
                 caps.max_msg_fds, caps.max_data_xfer_size)
        return self.protocol.version_reply(req), ()

    def _dma_map(self, req: vu.Request) -> Reply:
        body = req.body
        assert isinstance(body, vu.DmaMap)
        self.dma.add(body, req.fds[0] if req.fds else None)
        return self.protocol.reply(req), ()

    def _dma_unmap(self, req: vu.Request) -> Reply:
        body = req.body
        assert isinstance(body, vu.DmaUnmap)
        self.dma.remove(body)
        # The reply repeats the request's table entry (as libvfio-user does).
        payload = vu.DMA_UNMAP.pack(vu.DMA_UNMAP.size, int(body.flags), body.addr, body.size)
        return self.protocol.reply(req, payload), ()

    def _get_info(self, req: vu.Request) -> Reply:
        payload = vu.device_info_payload(vu.DeviceFlags.PCI | vu.DeviceFlags.RESET,
                                         vu.PCI_NUM_REGIONS, vu.PCI_NUM_IRQS)
        return self.protocol.reply(req, payload), ()

    def _get_region_info(self, req: vu.Request) -> Reply:
        body = req.body
        assert isinstance(body, vu.GetRegionInfo)
        index = body.index
        if not 0 <= index < vu.PCI_NUM_REGIONS:
            raise vu.RequestError(f"region {index} does not exist (0..{vu.PCI_NUM_REGIONS - 1})")
        region = self.device.region(index)
        areas: tuple[tuple[int, int], ...]
        if index == vu.PciRegion.CONFIG:
            flags, size, areas, fd = vu.RegionFlags.READ | vu.RegionFlags.WRITE, self.device.region_size(index), (), None
        elif region is None:
            flags, size, areas, fd = vu.RegionFlags(0), 0, (), None
        else:
            flags, size, areas, fd = region.flags, region.size, region.sparse_areas, region.mmap_fd
        payload = vu.region_info_payload(body.argsz, index, flags, size, 0, areas)
        (full,) = struct.unpack_from("=I", payload)
        # Like libvfio-user, send the fd only with the whole reply: QEMU asks
        # again with a larger argsz when the capabilities did not fit.
        fds = (fd,) if fd is not None and body.argsz >= full else ()
        return self.protocol.reply(req, payload), fds

    def _get_irq_info(self, req: vu.Request) -> Reply:
        body = req.body
        assert isinstance(body, vu.GetIrqInfo)
        irq = self.device.irqs.info(body.index)
        return self.protocol.reply(req, vu.irq_info_payload(body.index, irq.flags, irq.count)), ()

    def _set_irqs(self, req: vu.Request) -> Reply:
        body = req.body
        assert isinstance(body, vu.SetIrqs)
        tracer = self.device.tracer
        if tracer is not None:
            tracer.note("set-irqs", index=body.index, flags=int(body.flags), start=body.start, count=body.count,
                        fds=len(req.fds), bools=body.bools.hex())
        try:
            unused = self.device.irqs.set_irqs(body, req.fds)
        except vu.RequestError:
            close_fds(req.fds)
            raise
        close_fds(unused)
        return self.protocol.reply(req), ()

    def _region_read(self, req: vu.Request) -> Reply:
        body = req.body
        assert isinstance(body, vu.RegionRead)
        data = self.device.accessors[0](body.region, body.offset, body.count)
        if req.no_reply:
            return b"", ()
        return vu.build_region_read_reply(req.id, body, data), ()

    def _region_write(self, req: vu.Request) -> Reply:
        body = req.body
        assert isinstance(body, vu.RegionWrite)
        self.device.accessors[1](body.region, body.offset, body.data)
        return self.protocol.reply(req, vu.region_write_reply_payload(body)), ()

    def _region_write_multi(self, req: vu.Request) -> Reply:
        body = req.body
        assert isinstance(body, vu.RegionWriteMulti)
        device_write = self.device.accessors[1]
        for write in body.writes:
            device_write(write.region, write.offset, write.data)
        return self.protocol.reply(req), ()

    def _reset(self, req: vu.Request) -> Reply:
        self._lifecycle("reset", self.device.reset)
        return self.protocol.reply(req), ()

    def _lifecycle(self, ev: str, call: Callable[[], object]) -> None:
        """Call one of the device's lifecycle entry points; a trace records it."""
        tracer = self.device.tracer
        if tracer is None:
            call()
        else:
            tracer.lifecycle(ev, call)

    # -- DMA, for device models -----------------------------------------------------

    async def dma_read(self, addr: int, count: int) -> bytes:
        """Read guest memory: directly where the map has an fd, else by DMA_READ."""
        direct = await run_locked(self.device.lock, self._read_direct, addr, count)
        if direct is not None:
            return direct
        out = bytearray()
        limit = self.protocol.client_caps.max_data_xfer_size
        for pos in range(0, count, limit):
            n = min(limit, count - pos)
            await self.server.wait_unpaused()  # no message goes out while paused (a hand-over)
            msg_id, data = await run_locked(self.device.lock, self.protocol.dma_read_request, addr + pos, n)
            reply = await self._server_request(msg_id, data)
            out += vu.parse_dma_read_reply(reply.payload, n)
        return bytes(out)

    async def dma_write(self, addr: int, data: bytes) -> None:
        if await run_locked(self.device.lock, self._write_direct, addr, data):
            return
        limit = self.protocol.client_caps.max_data_xfer_size
        for pos in range(0, len(data), limit):
            await self.server.wait_unpaused()
            msg_id, msg = await run_locked(self.device.lock, self.protocol.dma_write_request, addr + pos,
                                           data[pos:pos + limit])
            await self._server_request(msg_id, msg)

    def _read_direct(self, addr: int, count: int) -> bytes | None:
        """Under the device lock: the bytes, where a DMA map with an fd holds them (else None)."""
        mapping = self.dma.find(addr, count)
        return self.dma.read_direct(mapping, addr, count) if mapping.memory is not None else None

    def _write_direct(self, addr: int, data: bytes) -> bool:
        """Under the device lock: write through a DMA map with an fd; False if the map has none."""
        mapping = self.dma.find(addr, len(data))
        if mapping.memory is None:
            return False
        self.dma.write_direct(mapping, addr, data)
        return True

    async def _server_request(self, msg_id: int, data: bytes) -> vu.ServerReplyReceived:
        # Paused between the id and the send: still nothing goes out until resume (a
        # hand-over leaves the id reserved, harmlessly).
        await self.server.wait_unpaused()
        if self.closed:
            raise DmaError("the client has disconnected", errno=E.ENOTCONN)
        event = trio.Event()
        self._replies[msg_id] = (event, [])
        try:
            try:
                await trio.to_thread.run_sync(self._send_blocking, data)
            except ConnectionClosed as exc:
                raise DmaError(f"cannot send DMA request: {exc}", errno=E.ENOTCONN) from None
            with trio.move_on_after(DMA_REPLY_TIMEOUT):
                await event.wait()
            got = self._replies[msg_id][1]
        finally:
            self._replies.pop(msg_id, None)
            with trio.CancelScope(shield=True):
                await run_locked(self.device.lock, self.protocol.forget_server_request, msg_id)
        if not got:
            if self.closed:
                raise DmaError("the client disconnected before replying", errno=E.ENOTCONN)
            raise DmaError(f"no reply to DMA request {msg_id} within {DMA_REPLY_TIMEOUT} s", errno=E.ETIMEDOUT)
        if got[0].error:
            raise DmaError(f"client refused DMA request {msg_id}: {os.strerror(got[0].error)}", errno=got[0].error)
        return got[0]

    # -- pausing and the hand-over (VfioUserServer.pause / save / adopt) ----------------

    def request_pause(self) -> None:
        """Ask the worker to return at the next message boundary (from trio)."""
        self.pausing[0] = True
        if self.native is not None:
            self.native.request_pause(True)
        signal_eventfd(self.wake)

    def cancel_pause(self) -> None:
        """Serve on: a worker that has not stopped yet goes on; one that has is restarted
        by whoever waits on `resumed`."""
        self.pausing[0] = False
        if self.native is not None:
            self.native.request_pause(False)
        clear_eventfd(self.wake)
        self.resumed.set()

    def save(self, saver: Saver) -> State:
        """The connection, stopped at a boundary: its socket, what it holds of a message
        not yet whole (and that message's fds), the protocol state, DMA maps and interrupts."""
        protocol = self.protocol
        reader = protocol.reader
        caps = protocol.client_caps
        return {
            "socket": saver.fd(self.sock.fileno()),
            "buffered": base64.b64encode(reader._buffer).decode(),
            "buffered_fds": [[pos, [saver.fd(fd) for fd in group]] for pos, group in reader._fd_marks],
            "protocol": {"state": int(protocol.state), "client_caps": list(caps),
                         "next_server_id": protocol._next_server_id,
                         "pending_server": [[msg_id, int(cmd)] for msg_id, cmd in protocol._pending_server.items()]},
            "dma": self.dma.save(saver),
            "interrupts": self.device.irqs.save_state(saver),
        }

    # -- teardown -------------------------------------------------------------------

    def stop(self) -> None:
        """Make the worker thread's recvmsg return (from any thread)."""
        self.closed = True
        shutdown(self.sock)

    def close(self) -> None:
        """Drop everything the client gave us; the device state stays (once the
        worker thread has ended: never for an abandoned connection)."""
        self.closed = True
        for event, _ in self._replies.values():
            event.set()
        if self.native is not None:
            self.server.stats["native_accesses"] += self.native.served
            self.native.close()
        with self.device.lock:
            self.dma.clear()
            self.device.irqs.close()
            close_fds(self.protocol.reader.take_fds())
            self._lifecycle("disconnect", self.device.client_disconnected)
        self.sock.close()
        os.close(self.wake)
        self.wake = -1


class AdoptedConnection(NamedTuple):
    """A connection handed over by the process before, waiting for serve()."""

    sock: socket.socket
    protocol: vu.ServerConnection
    dma: DmaTable


class VfioUserServer:
    """Serves one device on one UNIX socket (mode 0600), one client at a time.

    A second client waits until the first has gone: after device_del and
    device_add, QEMU's new connection may be accepted before the old one's
    end is read.

    Hands over to a new process as a qbackend.app.upgrade Part: pause(),
    save(), then in the new process adopt() before serve(); or resume().
    """

    def __init__(self, device: PciFunction, socket_path: str | os.PathLike[str], name: str = "", *,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT, native: bool = True) -> None:
        self.device = device
        self.handshake_timeout = handshake_timeout  # seconds a client has to send its first message
        # Serve plain register accesses in the native loop where it can run
        # (servers.vfio_user_fast); False keeps every access in Python.
        self.native = native
        self.socket_path = Path(socket_path)
        self.name = name or f"{device.name}@{self.socket_path}"
        self.stats: Counter[str] = Counter()
        # Requests other than region accesses, by command number; region
        # accesses are counted per region by the device (region_accesses).
        self.command_counts = [0] * (max(vu.Command) + 1)
        self.connection: Connection | None = None
        self.connections_served = 0
        self.abandoned = False  # a connection's thread was abandoned, stuck in the device (see STOP_WAIT)
        self._one_client = trio.Lock()
        self.gate = AcceptGate()
        self.paused = False
        self._unpaused = trio.Event()
        self._unpaused.set()
        # Accepted clients that have not started to be served (waiting for their first
        # bytes, or for the client before them to go): handed over as they are.
        self._waiting: set[socket.socket] = set()
        # What adopt() took, for serve().
        self._adopted_listener: socket.socket | None = None
        self._adopted_connection: AdoptedConnection | None = None
        self._adopted_waiting: list[socket.socket] = []

    def counts(self) -> Counter[str]:
        """`stats` (errors, rejected accesses, ...) with `native_accesses`: the region
        accesses the native access loop served, the current client's included; and a
        user device's `faults` and `stalls` (qbackend.devices.faults)."""
        out = Counter(self.stats)
        conn = self.connection
        if conn is not None and conn.native is not None and not conn.closed:
            out["native_accesses"] += conn.native.served
        faults = getattr(self.device, "faults", None)
        if faults is not None:
            out.update(faults.counts())
        return out

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener, self._adopted_listener = self._adopted_listener, None
        if listener is None:  # listening first, outside the nursery: a bad path is the caller's plain error
            listener = listen_unix(self.socket_path, backlog=128)
        adopted, self._adopted_connection = self._adopted_connection, None
        waiting, self._adopted_waiting = self._adopted_waiting, []
        served = False
        try:
            async with trio.open_nursery() as nursery:
                if adopted is not None:
                    # It holds the one-client lock before anyone accepted here can ask for it.
                    await nursery.start(self._serve_adopted, adopted)
                # What the device deferred in its restore_state runs now, with its DMA port.
                self.device.resume_jobs()
                for sock in waiting:
                    nursery.start_soon(self._serve_client, sock)
                served = True  # serve_unix closes the listener and removes the socket from here on
                await serve_unix(self.socket_path, self.name, self._serve_client, backlog=128, gate=self.gate,
                                 adopted=listener, task_status=task_status)
        finally:
            if not served:
                listener.close()
                remove_socket(self.socket_path)

    async def _serve_client(self, sock: socket.socket) -> None:
        conn: Connection | None = None
        self._waiting.add(sock)
        try:
            if not await sends_within(sock, self.handshake_timeout):  # not even VERSION
                log.info("%s: a client sent nothing within %g s: dropped", self.name, self.handshake_timeout)
                self.stats["handshake_timeouts"] += 1
                return
            async with self._one_client:
                await self.wait_unpaused()  # a client waiting now is handed over untouched
                self._waiting.discard(sock)
                sock.setblocking(True)  # the connection's worker thread does blocking I/O
                conn = Connection(self, sock)
                self.connections_served += 1
                await self._serve_connection(conn)
        finally:
            self._waiting.discard(sock)
            if conn is None or not conn.abandoned:  # else its thread may still send on it
                sock.close()

    async def _serve_adopted(self, adopted: AdoptedConnection, *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """A connection handed over: served at once, as if just accepted and handshaken."""
        conn: Connection | None = None
        try:
            async with self._one_client:
                conn = Connection(self, adopted.sock, adopted.protocol, adopted.dma)
                task_status.started()
                await self._serve_connection(conn)
        finally:
            if conn is None or not conn.abandoned:
                adopted.sock.close()

    async def _serve_connection(self, conn: Connection) -> None:
        """Under the one-client lock: serve `conn` until its client goes (restarting its
        worker after each pause that ended in resume()), then release what it held."""
        self.connection = conn
        self.device.dma_port = DmaAccess(conn, trio.lowlevel.current_trio_token())
        try:
            while True:
                await self._run_worker(conn)
                if not conn.paused:
                    break
                if conn.pausing[0]:  # still paused: wait for resume() (or the process's end)
                    await conn.resumed.wait()
                conn.paused = False
                conn.resumed = trio.Event()
        finally:
            # Release the client's fds before saying there is no
            # client: "no connection" means "nothing held" to callers.
            try:
                self.device.dma_port = None
                await self._close(conn)
            finally:
                self.connection = None
                conn.released.set()
            log.info("%s: client disconnected", self.name)

    async def _run_worker(self, conn: Connection) -> None:
        """conn.run_blocking in a thread of its own until the client goes or a pause
        stops it; when cancelled, stop it, and abandon it if it has not ended within
        STOP_WAIT (a device's callback that never returns holds it; it is a daemon thread)."""
        ended = trio.Event()
        conn.ended = ended
        token = trio.lowlevel.current_trio_token()
        device = self.device
        # A thread that takes over a client already connected (after a pause, or
        # from another process) is not the one that saw its VERSION.
        taking_over = conn.protocol.state is vu.State.READY

        def run() -> None:
            try:
                if taking_over:
                    device.worker_started()
                conn.run_blocking()
                if conn.paused:
                    device.worker_stopped()
            finally:
                try:
                    token.run_sync_soon(ended.set)
                except trio.RunFinishedError:
                    pass

        threading.Thread(target=run, name=f"{self.name}-vfio-user", daemon=True).start()
        try:
            await ended.wait()
        finally:
            if not ended.is_set():
                conn.stop()
                with trio.move_on_after(STOP_WAIT, shield=True):
                    await ended.wait()
                if not ended.is_set():
                    conn.abandoned = True
                    self.abandoned = True
                    log.error("%s: its connection's thread did not stop within %g s (a device callback does "
                              "not return: its stack is logged above) and is abandoned", self.name, STOP_WAIT)

    async def _close(self, conn: Connection) -> None:
        """conn.close() in a worker thread (it calls the device's disconnected());
        waited for, except when stopping, for at most STOP_WAIT."""
        if conn.abandoned:
            conn.closed = True  # its thread may still use what it holds: leave it be
            return
        stopping = trio.current_effective_deadline() == -math.inf  # cancelled
        with trio.CancelScope(shield=True) as scope:
            if stopping:
                scope.deadline = trio.current_time() + STOP_WAIT
            await trio.to_thread.run_sync(conn.close, abandon_on_cancel=True)
        if scope.cancelled_caught:
            log.error("%s: closing the connection did not end within %g s (the device's disconnected() does not "
                      "return?); left behind", self.name, STOP_WAIT)

    # -- hand-over to a new process (qbackend.app.upgrade's Part) --------------------

    def handover_refusal(self) -> str | None:
        """Why this server cannot be handed over (one line), or None."""
        if self.abandoned:
            return f"device {self.name}: a connection's thread is stuck in the device; it cannot be handed over"
        return self.device.handover_refusal()

    async def wait_unpaused(self) -> None:
        await self._unpaused.wait()

    async def pause(self) -> None:
        """Accept nothing; let the device's own jobs and our DMA requests finish; stop the
        connection's worker at a message boundary, its socket untouched.  Raises
        HandoverError (the caller then resume()s) when something does not settle in time."""
        self.gate.close()
        if not self.paused:
            self.paused = True
            self._unpaused = trio.Event()
        conn = self.connection
        if conn is None:
            return
        # First what needs the worker running: a job's DMA messages wait for their replies.
        if not await trio.to_thread.run_sync(self.device.quiesce, QUIESCE_WAIT, abandon_on_cancel=True):
            raise HandoverError(f"device {self.name}: its deferred jobs did not end within {QUIESCE_WAIT:g} s")
        with trio.move_on_after(DMA_REPLY_TIMEOUT + 1):
            while conn._replies:  # each waiter removes its entry once woken
                event, _slot = next(iter(conn._replies.values()))
                await event.wait()
        if conn._replies:
            raise HandoverError(f"device {self.name}: its DMA requests were not answered")
        conn.request_pause()
        with trio.move_on_after(STOP_WAIT):
            await conn.ended.wait()
        if not conn.ended.is_set():
            raise HandoverError(f"device {self.name}: its connection did not stop within {STOP_WAIT:g} s "
                                "(a device callback does not return?)")
        if not conn.paused:  # the client went meanwhile: wait until it is let go
            with trio.move_on_after(STOP_WAIT):
                await conn.released.wait()
            if self.connection is conn:
                raise HandoverError(f"device {self.name}: its closing connection did not end")

    async def resume(self) -> None:
        """Serve on as before pause()."""
        conn = self.connection
        if conn is not None:
            conn.cancel_pause()
        self.device.resume_jobs()
        self.paused = False
        self._unpaused.set()
        self.gate.open()

    def save(self, saver: Saver) -> State:
        """After pause(): the listener, the connection (if any), accepted clients not yet
        served, and the device's state."""
        listener = self.gate.listener
        if listener is None:
            raise HandoverError(f"device {self.name}: it is not serving")
        conn = self.connection
        with self.device.lock:
            device = self.device.save_state(saver)
            connection = conn.save(saver) if conn is not None and conn.paused else None
        inode = owned_inode(self.socket_path)
        return {
            "listener": saver.fd(listener.fileno()),
            "socket_inode": list(inode) if inode is not None else None,
            "device": device,
            "connection": connection,
            "waiting": [saver.fd(sock.fileno()) for sock in self._waiting if sock.fileno() >= 0],
        }

    def adopt(self, state: State, loader: Loader) -> None:
        """In the new process, before serve(): take the listener, the connection and the
        device's state as save() gave them."""
        listener = adopt_socket(loader.take(state["listener"]))
        listener.setblocking(False)
        self._adopted_listener = listener
        adopt_owned(self.socket_path, state["socket_inode"])
        with self.device.lock:
            self.device.restore_state(state["device"], loader)
        saved = state["connection"]
        if saved is not None:
            sock = adopt_socket(loader.take(saved["socket"]))
            sock.setblocking(True)
            self._adopted_connection = AdoptedConnection(sock, self._adopt_protocol(saved, loader),
                                                         self._adopt_dma(saved, loader))
            with self.device.lock:
                self.device.irqs.restore_state(saved["interrupts"], loader)
        for index in state["waiting"]:
            sock = adopt_socket(loader.take(index))
            sock.setblocking(False)
            self._adopted_waiting.append(sock)

    def _adopt_protocol(self, saved: State, loader: Loader) -> vu.ServerConnection:
        protocol = vu.ServerConnection()
        fields = saved["protocol"]
        protocol.state = vu.State(fields["state"])
        protocol.client_caps = vu.Capabilities(*fields["client_caps"])
        protocol._next_server_id = int(fields["next_server_id"])
        protocol._pending_server = {int(msg_id): vu.Command(cmd) for msg_id, cmd in fields["pending_server"]}
        reader = protocol.reader
        reader._buffer = bytearray(base64.b64decode(saved["buffered"]))
        reader._fd_marks = [(int(pos), [loader.take(i) for i in group]) for pos, group in saved["buffered_fds"]]
        return protocol

    def _adopt_dma(self, saved: State, loader: Loader) -> DmaTable:
        dma = DmaTable(vu.MAX_DMA_MAPS)
        try:
            dma.restore(saved["dma"], loader)
        except BaseException:
            dma.clear()
            raise
        return dma

    def open_fds(self) -> list[int]:
        """The fds this server holds for its client (for leak checks)."""
        fds = list(self.device.irqs.open_fds())
        conn = self.connection
        if conn is not None and conn.sock.fileno() >= 0:
            fds.append(conn.sock.fileno())
            fds += conn.dma.open_fds()
            if conn.wake >= 0:
                fds.append(conn.wake)
        return fds
