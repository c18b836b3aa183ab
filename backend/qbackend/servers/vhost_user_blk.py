"""vhost-user-blk: a disk image served to QEMU's `vhost-user-blk-pci` over
shared-memory virtqueues (QEMU's docs/interop/vhost-user.rst).

The front end (QEMU) connects to our UNIX socket, negotiates, hands over
guest RAM as fds (SET_MEM_TABLE, or ADD_MEM_REG / REM_MEM_REG one region at
a time once CONFIGURE_MEM_SLOTS is agreed, so a DIMM hot-plug is one more
region) and, for each virtqueue, where its rings are and two eventfds: the
guest's kick, and our call (the interrupt).  We map the memory, walk the
rings ourselves (qbackend.models.virtqueue), and carry the virtio-blk
requests (qbackend.models.virtio_blk) out against the same `Export` objects
the NBD server serves: one block layer, two front ends.

Threads (see qbackend.plumbing.threads):
- the trio task accepts one front end at a time; a client that sends
  nothing within the handshake limit is dropped without costing a thread;
- a connection worker reads and answers the control messages (blocking
  recvmsg, fds and all);
- one worker per started queue waits (poll) on the queue's kick and wake
  eventfds and drains the ring.
Each queue has its own `lock`: its worker holds it for one drain, and the
connection worker holds every queue's lock (and the connection's) for one
message, so a memory change or a ring stop never meets a half-served
request, while the queues share no lock with each other: a guest with N
queues and N vCPUs keeps N CPUs busy.

With native helpers (qbackend.servers.vhost_user_blk_fast) a queue worker
waits and serves in C, without the GIL: plain requests (IN and OUT of bytes
the export's read map locates, FLUSH, GET_ID) never reach Python.  The C
side stops before the first chain it does not serve; the worker gives the
ring's indices to the Python model, which serves that one chain (the model
is the reference: errors, allocating writes, DISCARD, WRITE_ZEROES, broken
rings), and takes them back.  While the connection worker handles a message
the model holds the indices (given before, reloaded after).

Surviving a restart (INFLIGHT_SHMFD): the front end asks for an inflight
region (GET_INFLIGHT_FD: a sealed memfd we make, zero filled) and hands it
back on every connection (SET_INFLIGHT_FD).  Both paths record in it each
chain they take and each they return (qbackend.models.inflight has the
layout and the order of the stores).  When a split queue starts with a
region, the region is read back: the requests the guest still waits for are
carried out again, oldest first, by the Python model, before anything new
(and before the ring goes to C); a region that does not fit the ring is
refused (logged, counted as `inflight_refused`), made fresh, and the queue
goes on from the ring base the front end gave.  A queue that starts looks at
its ring at once (requests the driver made while no back end served got no
kick we will see) and, once it serves, interrupts the driver once whatever it
pushes (the back end before may have stored used idx and died before its
interrupt: the driver would wait for good); so does a new call fd of a started
queue (libvhost-user does the same).  A notification owed when a message makes
the native side reload its rings stays owed.  At -v each start logs where the
queue goes on from (last_avail, used, the rings' own indices, the requests to
carry out again); at -vv every message is logged.  Packed rings are not
tracked.  The region is the front end's memory: mapped only from a memfd
sealed against shrinking, with every size checked, and unmapped when it is
replaced or the front end goes.

Testing only: QBACKEND_VHOST_TEST_REORDER=1 makes the Python path take every
available chain of a drain, carry them out, and return them in reverse
order (out-of-order completion, as a back end with parallel I/O does); with
it the native path is not used at all.

Hand-over to a new process (`qbackend upgrade`, qbackend.app.upgrade): pause()
stops the message loop between messages (it waits on the socket and an
eventfd, so a pause needs no shutdown) and every queue after its drain, so
every chain taken is answered; save() describes what the front end set up
(features, memory regions with their fds, the inflight region, each ring's
size, addresses, base and eventfds), and the new process sets up a fresh
Connection with the same messages made from that description, so every
check is made there as for the front end's own.  QEMU sees no close.

Bad input: a malformed message is refused (with REPLY_ACK, a failure
reply), its fds closed, and the connection goes on; a message that needs an
answer we cannot give, or broken framing, ends the connection.  A request
chain that points outside guest memory is answered with IOERR.  A ring that
cannot be trusted (a looping chain, an index that jumps, a bad indirect
table) stops that queue: there is no vhost-user message for "needs reset",
so the queue's error eventfd is signalled (QEMU reports "vhost vring error")
and the queue serves nothing until the front end sets it up again.
"""

from __future__ import annotations

import dataclasses
import errno as E
import fcntl
import functools
import logging
import mmap
import os
import select
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import trio

from qbackend.block.exports import Export
from qbackend.models import virtio_blk as blk
from qbackend.models.inflight import InflightRefused, InflightRegion
from qbackend.models.virtqueue import (
    VIRTIO_F_RING_PACKED,
    Chain,
    ChainError,
    GuestMemory,
    GuestMemoryError,
    PackedVirtqueue,
    QueueBroken,
    SplitVirtqueue,
    Virtqueue,
    VirtqueueError,
)
from qbackend.plumbing.handover import HandoverError, Loader, Saver, State, adopt_socket
from qbackend.plumbing.native_lock import device_lock
from qbackend.plumbing.peer_memory import PeerMemoryError, check_peer_memory
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
from qbackend.protocol import vhost_user as vu
from qbackend.servers.vhost_user_blk_fast import NativeMemory, NativeQueue
from qbackend.servers.vhost_user_blk_fast import load as load_native

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
PAUSE_WAIT = 5.0  # seconds for a front end's message in progress to end before a hand-over gives up
MAX_MEM_SLOTS = 64  # GET_MAX_MEM_SLOTS: regions at once (QEMU needs a few; each DIMM adds one)
RECV_SIZE = vu.HEADER_SIZE + vu.MAX_PAYLOAD
CMSG_SPACE = socket.CMSG_SPACE(vu.MAX_FDS * 4)
PROTOCOL_FEATURES = (vu.ProtocolFeature.MQ | vu.ProtocolFeature.REPLY_ACK | vu.ProtocolFeature.CONFIG
                     | vu.ProtocolFeature.CONFIGURE_MEM_SLOTS | vu.ProtocolFeature.INFLIGHT_SHMFD)
# Testing only (see the module doc): completions in reverse order, Python path alone.
REORDER_ENV = "QBACKEND_VHOST_TEST_REORDER"
INFLIGHT_MEMFD_NAME = "qbackend-vhost-inflight"
# The front end's offset into its inflight fd: the entries' u64 counters stay aligned.
INFLIGHT_OFFSET_ALIGN = vu.INFLIGHT_ALIGN
_PAGE = mmap.ALLOCATIONGRANULARITY
LOGICAL_BLOCK_SIZES = (512, 4096)
_FENCE = threading.Lock()
Request = vu.FrontendRequest


def full_fence() -> None:
    """A store-load barrier for the rings: a locked instruction on x86 (see models.virtqueue)."""
    _FENCE.acquire()
    _FENCE.release()


def serve_one(vq: Virtqueue, export: blk.BlockTarget, config: blk.BlkConfig, *, writethrough: bool,
              serial: bytes, counters: Counter[str] | None = None, where: str = "vhost-user-blk") -> bool:
    """The Python path for one chain: pop it and answer it (the model's rules); False when
    the ring is empty.  QueueBroken passes (the caller stops the queue)."""
    counters = counters if counters is not None else Counter()
    try:
        chain = vq.pop()
    except ChainError as exc:
        log.warning("%s: %s; answered with IOERR", where, str(exc))
        counters["bad_chains"] += 1
        if exc.tail is not None:
            exc.tail[0] = blk.Status.IOERR
        vq.push(exc.head, 1 if exc.tail is not None else 0)
        return True
    if chain is None:
        return False
    request = blk.parse_request(chain, config)
    if request.status is not None:
        log.info("%s: request refused (%s): %s", where, request.status.name, request.reason)
        counters["refused_requests"] += 1
    status, used = blk.execute(request, export, writethrough=writethrough, serial=serial)
    if status is blk.Status.IOERR and request.status is None:
        counters["io_errors"] += 1
        log.info("%s: request type %d at sector %d (%d bytes) failed: IOERR", where, request.type, request.sector,
                 request.data_len)
    del request
    chain.release()
    vq.push(chain.head, used)
    return True


class Refused(Exception):
    """A message we do not carry out; the connection goes on (REPLY_ACK says failure)."""


class _Mapping:
    """One region of guest memory, mapped from the front end's fd."""

    def __init__(self, region: vu.MemoryRegion, fd: int) -> None:
        self.region = region
        start = region.mmap_offset - region.mmap_offset % _PAGE  # mmap wants an aligned offset
        skip = region.mmap_offset - start
        try:
            check_peer_memory(fd, region.mmap_offset, region.memory_size)
        except PeerMemoryError as exc:
            raise Refused(f"guest memory at {region.guest_phys_addr:#x}: {exc}") from None
        try:
            self.map = mmap.mmap(fd, skip + region.memory_size, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError, OverflowError) as exc:
            raise Refused(f"cannot map guest memory at {region.guest_phys_addr:#x} "
                          f"({region.memory_size:#x} bytes): {exc}") from None
        self.view: memoryview | None = memoryview(self.map)[skip:skip + region.memory_size]
        # Its own copy of the fd: a hand-over to a new process (qbackend upgrade) passes it on.
        self.fd: int | None = os.dup(fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
        if self.view is not None:
            self.view.release()
            self.view = None
        try:
            self.map.close()
        except BufferError:
            # A view is still alive somewhere (a request's buffer on its way out):
            # the mapping goes when the last one does.
            log.debug("guest memory at %#x: unmapped later, when its last view goes",
                      self.region.guest_phys_addr)


class _Queue:
    """One virtqueue of a connection, and the worker that serves it once started."""

    def __init__(self, index: int, memory: GuestMemory) -> None:
        self.index = index
        self.vq: Virtqueue = SplitVirtqueue(memory, barrier=full_fence)
        self.lock = device_lock()  # this queue's state and ring (see the module doc)
        self.native: NativeQueue | None = None  # the C side, with native helpers
        self.kick: int | None = None
        self.call: int | None = None
        self.err: int | None = None
        self.enabled = False
        self.started = False
        self.wake = make_eventfd()  # tells the worker to look at `started` / `enabled` again
        self.thread: threading.Thread | None = None
        self.python_requests = 0
        self.region: InflightRegion | None = None  # this queue's part of the inflight region
        self.notify_owed = False  # interrupt the driver once the queue serves (see _start_queue)
        self.packed_untracked_logged = False

    @property
    def requests(self) -> int:
        """Requests answered, by either path."""
        native = self.native.c.requests if self.native is not None else 0
        return self.python_requests + int(native)

    def fds(self) -> list[int]:
        return [fd for fd in (self.kick, self.call, self.err, self.wake) if fd is not None]


class Connection:
    """One front end of one vhost-user-blk server."""

    def __init__(self, server: VhostUserBlkServer, sock: socket.socket) -> None:
        self.server = server
        self.export = server.export
        self.sock = sock
        self.lock = threading.Lock()
        # The Python path serves one chain at a time per connection, whatever the queue (the
        # model and block layer are not exercised concurrently; with 2 queues in Python at
        # once a guest saw I/O errors not yet understood).  Native requests never take it.
        self.python_lock = threading.Lock()
        self.reader = vu.MessageReader()
        self.memory = GuestMemory()
        self.mappings: list[_Mapping] = []
        self.queues = [_Queue(i, self.memory) for i in range(server.num_queues)]
        helper = load_native() if server.native else None
        self.native_memory = NativeMemory(helper) if helper is not None else None
        for q in self.queues:
            q.native = NativeQueue.create(self.native_memory, self.export, q.lock, q.wake, server.serial)
        self.config = server.config
        self.features = 0  # SET_FEATURES
        self.protocol_features = 0  # SET_PROTOCOL_FEATURES
        self.closed = False
        self._kept: set[int] = set()  # fds of the message being handled that a queue keeps
        self._reply_fds: list[int] = []  # fds of our own to send with the reply, then close
        self.inflight_map: mmap.mmap | None = None  # SET_INFLIGHT_FD's mapping
        self._inflight_view: memoryview | None = None
        self.inflight: tuple[vu.Inflight, int] | None = None  # SET_INFLIGHT_FD's description and a copy of its fd
        # A hand-over (pause): the message loop stops at a message boundary, its socket untouched.
        self.wake = make_eventfd()
        self.pause_requested = False
        self.paused = False
        self._running: list[int] = []  # the queues a pause stopped, started again by resume
        self._handlers: dict[int, Callable[[vu.Message], bytes | None]] = {
            Request.GET_FEATURES: lambda m: vu.reply_u64(Request.GET_FEATURES, self.server.features),
            Request.SET_FEATURES: self._set_features,
            Request.SET_OWNER: lambda m: None,
            Request.RESET_OWNER: self._reset_owner,
            Request.GET_PROTOCOL_FEATURES: lambda m: vu.reply_u64(Request.GET_PROTOCOL_FEATURES,
                                                                  int(PROTOCOL_FEATURES)),
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.GET_QUEUE_NUM: lambda m: vu.reply_u64(Request.GET_QUEUE_NUM, len(self.queues)),
            Request.GET_MAX_MEM_SLOTS: lambda m: vu.reply_u64(Request.GET_MAX_MEM_SLOTS, MAX_MEM_SLOTS),
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            Request.SET_INFLIGHT_FD: self._set_inflight_fd,
        }

    # -- the message loop (connection worker thread) -------------------------------------

    def run_blocking(self) -> None:
        buffer = bytearray(RECV_SIZE)
        view = memoryview(buffer)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        poller.register(self.wake, select.POLLIN)
        self.paused = False
        try:
            while True:
                ready = {fd for fd, _ in poller.poll()}
                if self.wake in ready:
                    clear_eventfd(self.wake)
                if self.pause_requested and not self.reader.buffered:
                    self.paused = True  # between messages: the next process reads the next one
                    return
                if self.sock.fileno() not in ready:
                    continue
                try:
                    n, ancdata, _flags, _ = self.sock.recvmsg_into([buffer], CMSG_SPACE)
                except OSError:
                    return
                fds = fds_from_ancdata(ancdata)
                if not n:
                    close_fds(fds)
                    self.reader.end_of_stream()
                    return
                messages = self.reader.feed(view[:n], fds)
                for i, message in enumerate(messages):
                    try:
                        self._handle(message)
                    except BaseException:
                        # One recvmsg may bring several messages, the fds with the last: when one
                        # ends the connection, the fds of those behind it are ours to close too.
                        close_fds(fd for later in messages[i + 1:] for fd in later.fds)
                        raise
        except vu.VhostUserProtocolError as exc:
            log.warning("%s: closing the connection: %s", self.server.name, exc)
            self.server.counters["protocol_errors"] += 1
        except _Hangup as exc:
            log.warning("%s: closing the connection: %s", self.server.name, exc)
        except Exception:
            log.exception("%s: internal error; closing the connection", self.server.name)
            self.server.counters["internal_errors"] += 1
        finally:
            if not self.paused:
                close_fds(self.reader.take_stray_fds())

    def _handle(self, message: vu.Message) -> None:
        self.server.counters["messages"] += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: %s %s fds %s", self.server.name, message.name, bytes(message.payload[:16]).hex(),
                      list(message.fds))
        handler = self._handlers.get(message.request)
        ok, reply = True, None
        self._kept.clear()
        try:
            if handler is None:
                raise Refused(f"request {message.name} is not supported")
            with self.lock, self._queues_held():
                reply = handler(message)
        except (Refused, vu.VhostUserProtocolError, VirtqueueError, blk.VirtioBlkError) as exc:
            ok = False
            self.server.counters["refused"] += 1
            # str(exc), not exc: a record that keeps its args (pytest's capture, a MemoryHandler)
            # would keep the traceback's frames, and in them views of guest memory (the mmap and
            # its fd would outlive the front end).  The same goes for the logs of _drain.
            log.warning("%s: refused %s: %s", self.server.name, message.name, str(exc))
        finally:
            close_fds(fd for fd in message.fds if fd not in self._kept)
            if not ok or reply is None:
                close_fds(self._reply_fds)
                self._reply_fds.clear()
        if not ok and message.request in vu.REPLIES:
            raise _Hangup(f"{message.name} needs an answer we cannot give")
        if reply is None and message.need_reply and self.protocol_features & vu.ProtocolFeature.REPLY_ACK:
            reply = vu.reply_ack(message.request, ok)
        if reply is not None:
            try:
                send_with_fds(self.sock, reply, self._reply_fds)
            except OSError as exc:
                raise _Hangup(f"cannot reply: {exc}") from None
            finally:
                close_fds(self._reply_fds)  # the front end has its own copies now
                self._reply_fds.clear()

    @contextmanager
    def _queues_held(self) -> Iterator[None]:
        """Every queue's lock, taken after asking the native workers to let go (`pause`);
        the models hold the rings' indices meanwhile, and the native sides reload after."""
        natives = [q.native for q in self.queues if q.native is not None]
        for nq in natives:
            nq.pause()
        held: list[_Queue] = []
        try:
            for q in self.queues:
                q.lock.acquire()
                held.append(q)
            for q in self.queues:
                if q.native is not None:
                    if isinstance(q.vq, SplitVirtqueue):
                        q.native.give(q.vq)
                    q.native.forget_rings()
            yield
        finally:
            for q in reversed(held):
                q.lock.release()
            for nq in natives:
                nq.unpause()
            for q in self.queues:
                if q.native is not None and q.thread is not None:
                    signal_eventfd(q.wake)  # a worker waiting for the pause to end

    # -- negotiation -------------------------------------------------------------------

    def _set_features(self, message: vu.Message) -> None:
        features = vu.parse_u64(message.payload)
        unknown = features & ~self.server.features
        if unknown:
            raise Refused(f"features {unknown:#x} were not offered")
        self.features = features
        packed = bool(features >> VIRTIO_F_RING_PACKED & 1)
        for q in self.queues:
            if packed != isinstance(q.vq, PackedVirtqueue):
                # VIRTIO_F_RING_PACKED: the rings QEMU sets up next are of the other layout.
                self._stop_queue(q)
                q.vq.reset()
                q.vq = (PackedVirtqueue if packed else SplitVirtqueue)(self.memory, barrier=full_fence)
            q.vq.set_features(features)
            if not features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
                q.enabled = True  # spec: without protocol features a ring starts enabled

    def _set_protocol_features(self, message: vu.Message) -> None:
        features = vu.parse_u64(message.payload)
        if features & ~int(PROTOCOL_FEATURES):
            raise Refused(f"protocol features {features & ~int(PROTOCOL_FEATURES):#x} were not offered")
        self.protocol_features = features

    def _reset_owner(self, message: vu.Message) -> None:
        for q in self.queues:
            self._stop_queue(q)
            q.vq.reset()

    # -- guest memory ------------------------------------------------------------------

    def _set_mem_table(self, message: vu.Message) -> None:
        regions = vu.parse_memory_table(message.payload, message.fds)
        # Refuse an overlapping table before the old one goes, so that a bad
        # message leaves the device with the memory it had.
        spans = sorted((r.guest_phys_addr, r.guest_phys_addr + r.memory_size) for r in regions)
        for (_, end), (start, _) in zip(spans, spans[1:]):
            if start < end:
                raise Refused(f"memory table regions overlap at {start:#x}")
        new = []
        try:
            for region, fd in zip(regions, message.fds):
                new.append(_Mapping(region, fd))
        except Refused:
            for m in new:
                m.close()
            raise
        self._unmap_all()
        try:
            for m in new:
                assert m.view is not None
                r = m.region
                self.memory.add_region(r.guest_phys_addr, r.memory_size, r.userspace_addr, m.view)
                self.mappings.append(m)
        except GuestMemoryError:
            self._unmap_all()
            for m in new:
                m.close()
            raise
        self._native_memory_changed()
        self.server.counters["memory_tables"] += 1

    def _add_mem_reg(self, message: vu.Message) -> None:
        vu.require_fds(message, 1)
        region = vu.parse_single_region(message.payload)
        if len(self.mappings) >= MAX_MEM_SLOTS:
            raise Refused(f"all {MAX_MEM_SLOTS} memory slots are in use")
        m = _Mapping(region, message.fds[0])
        assert m.view is not None
        try:
            self.memory.add_region(region.guest_phys_addr, region.memory_size, region.userspace_addr, m.view)
        except GuestMemoryError:
            m.close()
            raise
        self.mappings.append(m)
        self._native_memory_changed()
        self.server.counters["regions_added"] += 1

    def _rem_mem_reg(self, message: vu.Message) -> None:
        region = vu.parse_single_region(message.payload)  # QEMU 11.1 sends an fd with it too; closed
        for m in self.mappings:
            r = m.region
            if (r.guest_phys_addr, r.memory_size, r.userspace_addr) == (
                    region.guest_phys_addr, region.memory_size, region.userspace_addr):
                break
        else:
            raise Refused(f"no region at {region.guest_phys_addr:#x} of {region.memory_size:#x} bytes to remove")
        if self.native_memory is not None:
            self.native_memory.clear()  # C lets go of the region before the model does
        self.memory.remove_region(r.guest_phys_addr)
        for q in self.queues:
            q.vq.detach()  # they find their rings again on next use; the old views must go first
        self.mappings.remove(m)
        m.close()
        self._native_memory_changed()
        self.server.counters["regions_removed"] += 1

    def _native_memory_changed(self) -> None:
        """C's table follows the model's (every queue's lock is held; the queues reload)."""
        if self.native_memory is not None:
            self.native_memory.rebuild(self.memory)

    def _unmap_all(self) -> None:
        for q in self.queues:
            q.vq.detach()
        if self.native_memory is not None:
            self.native_memory.clear()
        self.memory.clear()
        while self.mappings:
            self.mappings.pop().close()

    # -- rings -------------------------------------------------------------------------

    def _queue(self, index: int) -> _Queue:
        if not 0 <= index < len(self.queues):
            raise Refused(f"queue {index} does not exist (the device has {len(self.queues)})")
        return self.queues[index]

    def _set_vring_num(self, message: vu.Message) -> None:
        state = vu.VringState.parse(message.payload)
        self._queue(state.index).vq.set_num(state.num)

    def _set_vring_addr(self, message: vu.Message) -> None:
        addr = vu.VringAddr.parse(message.payload)
        self._queue(addr.index).vq.set_addresses(addr.desc_user_addr, addr.avail_user_addr, addr.used_user_addr)

    def _set_vring_base(self, message: vu.Message) -> None:
        state = vu.VringState.parse(message.payload)
        self._queue(state.index).vq.set_base(state.num)

    def _get_vring_base(self, message: vu.Message) -> bytes:
        state = vu.VringState.parse(message.payload)
        q = self._queue(state.index)
        self._stop_queue(q)
        if q.kick is not None:  # spec: the ring is stopped; a restart brings a new kick fd
            close_fds([q.kick])
            q.kick = None
        return vu.reply_vring_state(q.index, q.vq.get_base())

    def _set_vring_kick(self, message: vu.Message) -> None:
        index, fd = vu.parse_vring_file(message)
        q = self._queue(index)
        if fd is None:
            raise Refused("polling a ring without a kick fd is not supported")
        self._stop_queue(q)
        if q.kick is not None:
            close_fds([q.kick])
        q.kick = self._keep(fd)
        self._start_queue(q)  # spec: a ring starts when its kick fd arrives

    def _set_vring_call(self, message: vu.Message) -> None:
        index, fd = vu.parse_vring_file(message)
        q = self._queue(index)
        if q.call is not None:
            close_fds([q.call])
        q.call = self._keep(fd) if fd is not None else None
        if q.thread is not None and q.call is not None:
            # An interrupt signalled on the fd before may not have reached the driver (the
            # front end swaps fds as it masks and unmasks): one on the new fd, as
            # libvhost-user does; one the driver did not need is harmless.
            q.notify_owed = True
            signal_eventfd(q.wake)

    def _set_vring_err(self, message: vu.Message) -> None:
        index, fd = vu.parse_vring_file(message)
        q = self._queue(index)
        if q.err is not None:
            close_fds([q.err])
        q.err = self._keep(fd) if fd is not None else None

    def _set_vring_enable(self, message: vu.Message) -> None:
        state = vu.VringState.parse(message.payload)
        if state.num not in (0, 1):
            raise Refused(f"SET_VRING_ENABLE {state.num}: 0 or 1")
        q = self._queue(state.index)
        q.enabled = bool(state.num)
        signal_eventfd(q.wake)  # an enabled ring may hold requests already

    def _keep(self, fd: int) -> int:
        self._kept.add(fd)
        return fd


    # -- inflight I/O tracking --------------------------------------------------------

    def _get_inflight_fd(self, message: vu.Message) -> bytes:
        """A fresh zero-filled region of the size asked, as a sealed memfd (the front end
        keeps it and hands it back with SET_INFLIGHT_FD).  A request we cannot meet gets
        a region of size 0, which tells the front end to track nothing."""
        req = vu.Inflight.parse(message.payload)
        if not 1 <= req.num_queues <= len(self.queues) or not 1 <= req.queue_size <= vu.INFLIGHT_MAX_QUEUE_SIZE:
            log.warning("%s: GET_INFLIGHT_FD for %d queues of %d: the device has %d queues of at most %d; "
                        "no inflight tracking", self.server.name, req.num_queues, req.queue_size, len(self.queues),
                        vu.INFLIGHT_MAX_QUEUE_SIZE)
            self.server.counters["inflight_refused"] += 1
            return vu.build_reply(Request.GET_INFLIGHT_FD, vu.Inflight(0, 0, req.num_queues, req.queue_size).pack())
        size = req.num_queues * vu.inflight_queue_size(req.queue_size)
        fd = os.memfd_create(INFLIGHT_MEMFD_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(fd)
            raise
        self._reply_fds.append(fd)
        self.server.counters["inflight_regions_made"] += 1
        return vu.build_reply(Request.GET_INFLIGHT_FD, vu.Inflight(size, 0, req.num_queues, req.queue_size).pack())

    def _set_inflight_fd(self, message: vu.Message) -> None:
        """Map the front end's region (hostile: every size checked against the formula and
        the file), replacing any before; started queues read their part back at once."""
        vu.require_fds(message, 1)
        req = vu.Inflight.parse(message.payload)
        if not 1 <= req.num_queues <= len(self.queues):
            raise Refused(f"SET_INFLIGHT_FD for {req.num_queues} queues: the device has {len(self.queues)}")
        if not 1 <= req.queue_size <= vu.INFLIGHT_MAX_QUEUE_SIZE:
            raise Refused(f"SET_INFLIGHT_FD queue size {req.queue_size}: 1..{vu.INFLIGHT_MAX_QUEUE_SIZE}")
        per_queue = vu.inflight_queue_size(req.queue_size)
        if req.mmap_size != req.num_queues * per_queue:
            raise Refused(f"SET_INFLIGHT_FD size {req.mmap_size:#x}: {req.num_queues} queues of {req.queue_size} "
                          f"take {req.num_queues * per_queue:#x}")
        if req.mmap_offset % INFLIGHT_OFFSET_ALIGN:
            raise Refused(f"SET_INFLIGHT_FD offset {req.mmap_offset:#x} is not {INFLIGHT_OFFSET_ALIGN}-byte aligned")
        fd = message.fds[0]
        try:
            check_peer_memory(fd, req.mmap_offset, req.mmap_size)
        except PeerMemoryError as exc:
            raise Refused(f"inflight region: {exc}") from None
        start = req.mmap_offset - req.mmap_offset % _PAGE
        skip = req.mmap_offset - start
        try:
            new = mmap.mmap(fd, skip + req.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError, OverflowError) as exc:
            raise Refused(f"cannot map the inflight region ({req.mmap_size:#x} bytes): {exc}") from None
        self._unmap_inflight()
        self.inflight_map = new
        self.inflight = (req, os.dup(fd))
        self._inflight_view = memoryview(new)[skip:skip + req.mmap_size]
        for q in self.queues[:req.num_queues]:
            q.region = InflightRegion(self._inflight_view[q.index * per_queue:(q.index + 1) * per_queue])
            if q.started:
                self._track_inflight(q)
        self.server.counters["inflight_regions_set"] += 1

    def _unmap_inflight(self) -> None:
        """Every queue stops tracking, then the mapping goes (every queue's lock is held)."""
        for q in self.queues:
            if isinstance(q.vq, SplitVirtqueue):
                q.vq.track_inflight(None)
            if q.native is not None:
                q.native.drop_inflight()
            if q.region is not None:
                q.region.release()
                q.region = None
        if self._inflight_view is not None:
            self._inflight_view.release()
            self._inflight_view = None
        if self.inflight_map is not None:
            self.inflight_map.close()
            self.inflight_map = None
        if self.inflight is not None:
            os.close(self.inflight[1])
            self.inflight = None

    def _track_inflight(self, q: _Queue) -> None:
        """A queue that starts reads its region back (holding the queue's lock): what was
        in flight is carried out again first; a region that does not fit is made fresh."""
        vq, region = q.vq, q.region
        if region is None or not vq.configured:
            return
        if not isinstance(vq, SplitVirtqueue):
            if not q.packed_untracked_logged:
                log.warning("%s: queue %d is a packed ring: its requests are not tracked in the inflight region",
                            self.server.name, q.index)
                q.packed_untracked_logged = True
            return
        try:
            recovery = vq.track_inflight(region)
        except QueueBroken:
            return  # the worker finds the queue broken and says so
        except InflightRefused as exc:
            log.warning("%s: queue %d: inflight region refused (%s); starting it afresh, nothing carried out again",
                        self.server.name, q.index, str(exc))
            self.server.counters["inflight_refused"] += 1
            try:
                vq.start_fresh_inflight(region)
            except (InflightRefused, QueueBroken) as again:
                log.warning("%s: queue %d: not tracked: %s", self.server.name, q.index, str(again))
            return
        if recovery is not None and recovery.resubmit:
            log.info("%s: queue %d: %d requests were in flight when the last back end stopped; carried out again "
                     "first (heads %s)", self.server.name, q.index, len(recovery.resubmit),
                     list(recovery.resubmit[:16]))
            self.server.counters["inflight_resubmitted"] += len(recovery.resubmit)
        signal_eventfd(q.wake)  # a request may be waiting in the ring with no kick to come

    # -- config space ------------------------------------------------------------------

    def _get_config(self, message: vu.Message) -> bytes:
        req = vu.ConfigSpace.parse(message.payload)
        if req.offset + req.size > blk.CONFIG_MAX_SIZE:
            return vu.reply_config_error()
        data = blk.config_bytes(self.config, req.offset + req.size)[req.offset:]
        return vu.reply_config(req.offset, req.size, req.flags, data)

    def _set_config(self, message: vu.Message) -> None:
        req = vu.ConfigSpace.parse(message.payload)
        self.config = blk.config_write(self.config, req.offset, req.data)

    # -- queue workers -----------------------------------------------------------------

    def _start_queue(self, q: _Queue) -> None:
        """Called holding the queue's lock, with q stopped.

        A queue that starts is looked at at once (the driver's requests made while no back
        end served, or while the queue was stopped, got no kick we will see), and once it
        serves the driver is interrupted once, whatever was pushed: a back end killed
        between its used idx store and its interrupt left a driver waiting for one that
        never comes (an interrupt it did not need is harmless)."""
        q.started = True
        q.notify_owed = True
        clear_eventfd(q.wake)
        self._track_inflight(q)
        if q.native is not None:
            q.native.request_stop(False)
        # The native path serves split rings; a packed ring is the model's alone (and every
        # ring is, with the test knob that reorders completions).
        native = q.native is not None and isinstance(q.vq, SplitVirtqueue) and not self.server.reorder
        log.info("%s: queue %d started (%s path, %s)", self.server.name, q.index, "native" if native else "Python",
                 "tracked in the inflight region" if isinstance(q.vq, SplitVirtqueue) and q.vq.inflight is not None
                 else "not tracked")
        self._log_indices(q, "start")
        target = self._serve_queue_native if native else self._serve_queue
        q.thread = threading.Thread(target=target, args=(q,), daemon=True,
                                    name=f"{self.server.name} queue {q.index}")
        q.thread.start()

    def _log_indices(self, q: _Queue, what: str) -> None:
        """At -v: where the queue goes on from (ours, and what the rings hold now)."""
        if not log.isEnabledFor(logging.INFO):
            return
        vq = q.vq
        rings = vq.ring_indices() if isinstance(vq, SplitVirtqueue) else None
        resubmit = len(vq.resubmit) if isinstance(vq, SplitVirtqueue) else 0
        log.info("%s: queue %d %s: last_avail %d, used %d; rings: guest avail idx %s, used idx %s; "
                 "%d in flight to carry out again; enabled %s, kick fd %s, call fd %s", self.server.name, q.index,
                 what, vq.last_avail_idx, vq.used_idx, "?" if rings is None else rings[0],
                 "?" if rings is None else rings[1], resubmit, q.enabled, q.kick, q.call)

    def _stop_queue(self, q: _Queue) -> None:
        """Called holding the queue's lock.  The worker is between drains then (a drain holds
        the lock), so once `started` is off it serves nothing more; it exits at its next look."""
        if q.thread is None:
            return
        q.started = False
        if q.native is not None:
            q.native.request_stop()
        signal_eventfd(q.wake)
        if q.thread is not threading.current_thread():
            q.lock.release()  # the worker may be waiting for the lock to see `started`
            try:
                q.thread.join()
            finally:
                q.lock.acquire()
        q.thread = None

    def _serve_queue(self, q: _Queue) -> None:
        """The Python path's worker."""
        kick, wake = q.kick, q.wake
        assert kick is not None
        poller = select.poll()
        poller.register(kick, select.POLLIN)
        poller.register(wake, select.POLLIN)
        first = True  # a ring that starts may hold requests made before (a reconnect)
        try:
            while True:
                if not first:
                    events = poller.poll()
                    for fd, _ in events:
                        clear_eventfd(fd)
                first = False
                with q.lock:
                    if not q.started:
                        return
                    if q.enabled and q.vq.configured and not q.vq.broken:
                        with self.python_lock:
                            self._drain(q)
                        if q.notify_owed:
                            q.notify_owed = False
                            if q.call is not None:
                                signal_eventfd(q.call)
        except Exception:
            log.exception("%s: queue %d: internal error; the queue stops", self.server.name, q.index)
            self.server.counters["internal_errors"] += 1

    def _serve_queue_native(self, q: _Queue) -> None:
        """The native path's worker: C waits and serves; Python acts when C says so."""
        nq = q.native
        assert nq is not None and q.kick is not None
        try:
            while True:
                rc = nq.run()
                with q.lock:
                    if not q.started:
                        return
                    pushed = int(nq.c.pushed)  # since the last return: a break interrupts for them
                    nq.c.pushed = 0
                    if rc == nq.FAILED:
                        log.warning("%s: queue %d: waiting for kicks failed (%s); the queue stops",
                                    self.server.name, q.index, os.strerror(nq.error))
                        return
                    self._load_native(q, nq)
                    if rc == nq.PYTHON and nq.serving:
                        self._serve_python_one(q, nq, pushed)
        except Exception:
            log.exception("%s: queue %d: internal error; the queue stops", self.server.name, q.index)
            self.server.counters["internal_errors"] += 1

    def _load_native(self, q: _Queue, nq: NativeQueue) -> None:
        """Bring the C side up to date (holding the queue's lock)."""
        vq = q.vq
        assert isinstance(vq, SplitVirtqueue)  # a packed ring gets the Python worker
        nq.give(vq)  # the model's indices are C's (a memory change re-resolves from them)
        usable = q.enabled and vq.configured and vq.broken is None
        if usable:
            try:
                vq.ready()
            except QueueBroken as exc:
                self._queue_broke(q, exc)
                usable = False
        if usable and vq.resubmit:
            # What the inflight region says was in flight: the model carries it out again before
            # C takes the ring (C's drain only takes new chains).
            with self.python_lock:
                served = self._drain(q, resubmits_only=True)
            nq.take(vq, bool(served))
            usable = vq.broken is None
        if usable and q.notify_owed:
            q.notify_owed = False
            nq.owe_notification()  # C decides at its next notify, after its first drain
        config = self.config
        nq.load(vq, serving=usable, capacity=config.capacity, readonly=config.readonly,
                writethrough=blk.cache_writethrough(self.features, config), kick=q.kick, call=q.call)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: queue %d: C loaded: serving %s, last_avail %d, used %d, kick %s, call %s, rings %s",
                      self.server.name, q.index, nq.serving, nq.c.last_avail_idx, nq.c.used_idx, q.kick, q.call,
                      vq.ring_indices())

    def _serve_python_one(self, q: _Queue, nq: NativeQueue, pushed_before: int) -> None:
        """The chain C stopped at, served by the model (holding the queue's lock)."""
        vq = q.vq
        assert isinstance(vq, SplitVirtqueue)
        nq.give(vq)
        writethrough = blk.cache_writethrough(self.features, self.config)
        try:
            with self.python_lock:
                pushed = self._serve_one(q, writethrough)
        except QueueBroken as exc:
            self._queue_broke(q, exc)
            nq.take(vq, False)
            nq.load(vq, serving=False, capacity=self.config.capacity, readonly=self.config.readonly,
                    writethrough=writethrough, kick=q.kick, call=q.call)
            # The requests served before the break are in the used ring: interrupt for them
            # (as the Python path does), whatever the driver asked.
            if pushed_before and q.call is not None:
                signal_eventfd(q.call)
            return
        if pushed:
            q.python_requests += 1
            self.server.counters["requests"] += 1
        nq.take(vq, pushed)

    def _queue_broke(self, q: _Queue, exc: QueueBroken) -> None:
        log.warning("%s: queue %d: %s; the queue stops until the front end sets it up again",
                    self.server.name, q.index, str(exc))
        self.server.counters["broken_queues"] += 1
        if not q.vq.broken:
            q.vq.mark_broken(str(exc))
        if q.err is not None:
            signal_eventfd(q.err)

    def _serve_reordered(self, q: _Queue, writethrough: bool) -> int:
        """The test knob's drain: take every available chain, carry them out, return them
        in reverse order in one batch; how many were answered."""
        vq = q.vq
        where = f"{self.server.name}: queue {q.index}"
        taken: list[Chain] = []
        done: list[tuple[int, int]] = []
        broken: QueueBroken | None = None
        try:
            while True:
                try:
                    chain = vq.pop()
                except ChainError as exc:
                    log.warning("%s: %s; answered with IOERR", where, str(exc))
                    self.server.counters["bad_chains"] += 1
                    if exc.tail is not None:
                        exc.tail[0] = blk.Status.IOERR
                    done.append((exc.head, 1 if exc.tail is not None else 0))
                    continue
                if chain is None:
                    break
                taken.append(chain)
        except QueueBroken as exc:
            broken = exc
        for chain in taken:
            try:
                request = blk.parse_request(chain, self.config)
            except QueueBroken as exc:
                broken = broken or exc
                chain.release()
                continue
            status, used = blk.execute(request, self.export, writethrough=writethrough, serial=self.server.serial)
            if status is blk.Status.IOERR and request.status is None:
                self.server.counters["io_errors"] += 1
            del request
            chain.release()
            done.append((chain.head, used))
        if done:
            # The chains taken before a break are answered (as the in-order drain answers them
            # before it meets it): the queue is marked broken again right after.
            reason = vq.broken
            vq.broken = None
            try:
                vq.push_many(reversed(done))
            finally:
                if reason is not None:
                    vq.mark_broken(reason)
        if broken is not None:
            raise broken
        return len(done)

    def _serve_one(self, q: _Queue, writethrough: bool) -> bool:
        return serve_one(q.vq, self.export, self.config, writethrough=writethrough, serial=self.server.serial,
                         counters=self.server.counters, where=f"{self.server.name}: queue {q.index}")

    def _drain(self, q: _Queue, *, resubmits_only: bool = False) -> int:
        """Serve every request the driver has made available (the Python path, holding the lock),
        or with `resubmits_only` just those the inflight region said to carry out again; how many."""
        vq = q.vq
        writethrough = blk.cache_writethrough(self.features, self.config)
        served = 0
        try:
            if resubmits_only:
                while isinstance(vq, SplitVirtqueue) and vq.resubmit and self._serve_one(q, writethrough):
                    served += 1
            elif self.server.reorder:
                served = self._serve_reordered(q, writethrough)
            else:
                while self._serve_one(q, writethrough):
                    served += 1
        except QueueBroken as exc:
            self._queue_broke(q, exc)
        q.python_requests += served
        self.server.counters["requests"] += served
        # A broken queue raises QueueBroken from should_notify() too (it is sticky): the
        # requests served before the break are in the used ring, so interrupt for them anyway.
        if served and q.call is not None and (vq.broken is not None or vq.should_notify()):
            signal_eventfd(q.call)
        return served

    # -- teardown ----------------------------------------------------------------------

    def stop(self) -> None:
        """Make the connection worker's recvmsg return (from any thread)."""
        self.closed = True
        shutdown(self.sock)

    def close(self) -> None:
        """Stop the queues, unmap guest memory, close every fd the front end gave us."""
        with self.lock, self._queues_held():
            for q in self.queues:
                self._stop_queue(q)
            self._unmap_inflight()
            for q in self.queues:
                q.vq.reset()
                close_fds(fd for fd in (q.kick, q.call, q.err) if fd is not None)
                q.kick = q.call = q.err = None
            self._unmap_all()
        close_fds(q.wake for q in self.queues)
        close_fds([self.wake])
        self.sock.close()

    def open_fds(self) -> list[int]:
        fds = [fd for q in self.queues for fd in q.fds()]
        fds += [m.fd for m in self.mappings if m.fd is not None]
        if self.inflight is not None:
            fds.append(self.inflight[1])
        fds.append(self.wake)
        if self.sock.fileno() >= 0:
            fds.append(self.sock.fileno())
        return fds

    # -- hand-over to a new process (qbackend.app.upgrade) ------------------------------
    #
    # The message loop has stopped between messages (`paused`); pause_queues stops every
    # queue worker after its drain, so every chain taken is answered and each ring's base
    # is where the next process goes on.  save() describes what the front end set up;
    # restore() in the new process sets up a fresh Connection with the same messages,
    # built from that description, so every check and mapping is done there as for the
    # front end's own.

    def pause_queues(self) -> None:
        with self.lock, self._queues_held():
            self._running = [q.index for q in self.queues if q.thread is not None]
            for q in self.queues:
                self._stop_queue(q)

    def resume_queues(self) -> None:
        with self.lock, self._queues_held():
            for index in self._running:
                self._start_queue(self.queues[index])
            self._running = []

    def save(self, saver: Saver) -> State:
        """What the front end set up (after pause_queues), with its fds."""
        with self.lock, self._queues_held():
            regions = []
            for m in self.mappings:
                assert m.fd is not None
                r = m.region
                regions.append({"gpa": r.guest_phys_addr, "size": r.memory_size, "uva": r.userspace_addr,
                                "offset": r.mmap_offset, "fd": saver.fd(m.fd)})
            inflight = None
            if self.inflight is not None:
                req, fd = self.inflight
                inflight = {"size": req.mmap_size, "offset": req.mmap_offset, "queues": req.num_queues,
                            "queue_size": req.queue_size, "fd": saver.fd(fd)}
            queues = []
            for q in self.queues:
                addr = q.vq.addresses
                queues.append({
                    "num": q.vq.num, "base": q.vq.get_base(),
                    "addresses": None if addr is None else [addr.desc, addr.avail, addr.used],
                    "enabled": q.enabled, "running": q.index in self._running,
                    "kick": saver.optional_fd(q.kick), "call": saver.optional_fd(q.call),
                    "err": saver.optional_fd(q.err)})
            return {"socket": saver.fd(self.sock.fileno()), "features": self.features,
                    "protocol_features": self.protocol_features, "writeback": self.config.writeback,
                    "regions": regions, "inflight": inflight, "queues": queues}

    def restore(self, state: State, fds: dict[str, Any]) -> None:
        """Set this new connection up as save() described (in the new process, before it serves)."""
        def send(request: int, payload: bytes, *message_fds: int) -> None:
            refused = self.server.counters["refused"]
            message = vu.Message(request, vu.VERSION, payload, message_fds)
            self._handle(message)
            if self.server.counters["refused"] != refused:
                raise HandoverError(f"{self.server.name}: {message.name} of the old process's set-up was refused "
                                    "here (see the log)")

        send(Request.SET_FEATURES, vu.u64(int(state["features"])))
        if state["features"] & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            send(Request.SET_PROTOCOL_FEATURES, vu.u64(int(state["protocol_features"])))
        regions = [vu.MemoryRegion(r["gpa"], r["size"], r["uva"], r["offset"]) for r in state["regions"]]
        if regions:
            send(Request.SET_MEM_TABLE, vu.memory_table(regions[:vu.VHOST_MEMORY_BASELINE_NREGIONS]),
                 *fds["regions"][:vu.VHOST_MEMORY_BASELINE_NREGIONS])
            for region, fd in zip(regions[vu.VHOST_MEMORY_BASELINE_NREGIONS:],
                                  fds["regions"][vu.VHOST_MEMORY_BASELINE_NREGIONS:], strict=True):
                send(Request.ADD_MEM_REG, vu.single_region(region), fd)
        inflight = state["inflight"]
        if inflight is not None:
            send(Request.SET_INFLIGHT_FD, vu.Inflight(inflight["size"], inflight["offset"], inflight["queues"],
                                                      inflight["queue_size"]).pack(), fds["inflight"])
        for index, (q, fq) in enumerate(zip(state["queues"], fds["queues"], strict=True)):
            if q["num"]:
                send(Request.SET_VRING_NUM, vu.vring_state(index, q["num"]))
            if q["addresses"] is not None:
                desc, avail, used = q["addresses"]
                send(Request.SET_VRING_ADDR, vu.vring_addr(index, desc, used, avail))
            send(Request.SET_VRING_BASE, vu.vring_state(index, q["base"]))
            for request, fd in ((Request.SET_VRING_CALL, fq["call"]), (Request.SET_VRING_ERR, fq["err"])):
                if fd is not None:
                    send(request, vu.vring_fd(index), fd)
            if self.protocol_features and state["features"] & vu.VHOST_USER_F_PROTOCOL_FEATURES:
                send(Request.SET_VRING_ENABLE, vu.vring_state(index, int(q["enabled"])))
            if fq["kick"] is not None:  # set, not started: resume_queues() starts it once this process serves
                self.queues[index].kick = fq["kick"]
                if q["running"]:
                    self._running.append(index)
        self.config = dataclasses.replace(self.config, writeback=bool(state["writeback"]))


class _Hangup(Exception):
    """The connection cannot go on (a reply we cannot give or send)."""


class VhostUserBlkServer:
    """One disk on one UNIX socket (mode 0600), one front end at a time.

    `export` is an opened Export (qbackend.block.exports), served as it is:
    the server flushes it when a front end goes, and closes it only if it
    was told to (`close_export`), since an export may also be served over NBD.
    `logical_block_size` (512 or 4096) is the guest's logical block size
    (virtio-blk's blk_size, as qemu-storage-daemon's option of that name);
    `native` False serves every request in Python (default: as
    QBACKEND_NATIVE says; qbackend.plumbing.native).
    """

    def __init__(self, export: Export, socket_path: str | os.PathLike[str], *, name: str = "",
                 num_queues: int = 1, serial: str = "", handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 logical_block_size: int = blk.SECTOR_SIZE, native: bool = True) -> None:
        if not 1 <= num_queues <= 64:
            raise ValueError(f"num-queues={num_queues}: 1..64")
        if logical_block_size not in LOGICAL_BLOCK_SIZES:
            raise ValueError(f"logical-block-size={logical_block_size}: 512 or 4096")
        self.export = export
        self.socket_path = Path(socket_path)
        self.name = name or f"vhost-user-blk@{self.socket_path}"
        self.num_queues = num_queues
        self.serial = serial.encode()[:blk.ID_BYTES]
        self.handshake_timeout = handshake_timeout
        info = export.info
        # seg_max: what one request may carry; QEMU's own virtio-blk says queue size - 2.
        # size_max: a request's buffers are gathered into one bytes, so keep each bounded.
        self.config = blk.BlkConfig(
            capacity=info.size // blk.SECTOR_SIZE, seg_max=126, size_max=1 << 20, num_queues=num_queues,
            blk_size=logical_block_size,
            readonly=info.read_only,
            max_discard_sectors=0 if info.read_only else (32 << 20) // blk.SECTOR_SIZE, max_discard_seg=1,
            discard_sector_alignment=8,
            max_write_zeroes_sectors=0 if info.read_only else (32 << 20) // blk.SECTOR_SIZE,
            max_write_zeroes_seg=1, write_zeroes_may_unmap=True)
        self.features = self.config.features() | 1 << VIRTIO_F_RING_PACKED | vu.VHOST_USER_F_PROTOCOL_FEATURES
        self.logical_block_size = logical_block_size
        self.native = native
        self.reorder = os.environ.get(REORDER_ENV, "") not in ("", "0")
        """Testing only: completions in reverse order, every request in Python (module doc)."""
        if self.reorder:
            log.warning("%s: %s is set: completions go out in reverse order, and every request is served in "
                        "Python (testing only)", self.name, REORDER_ENV)
        self.counters: Counter[str] = Counter()
        """What the server counted (the Python path's requests among them); see `stats`."""
        self._native_requests = 0  # of connections gone
        self.connection: Connection | None = None
        self.connections_served = 0
        self._one_client = trio.Lock()
        self.gate = AcceptGate()
        self._resumed = trio.Event()  # set by resume(): a paused connection serves on
        self._paused = trio.Event()  # set once the connection's message loop stopped for a pause
        self._adopted_listener: socket.socket | None = None
        self._adopted: Connection | None = None  # the front end a process before handed over

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Listening first, outside the nursery: a path we cannot take is the caller's plain error.
        listener, self._adopted_listener = self._adopted_listener, None
        if listener is None:
            listener = listen_unix(self.socket_path)
        adopted, self._adopted = self._adopted, None
        try:
            async with trio.open_nursery() as nursery:
                if adopted is not None:
                    await nursery.start(self._serve_adopted, adopted)
                await nursery.start(functools.partial(serve_unix, self.socket_path, self.name, self._serve_client,
                                                      gate=self.gate, adopted=listener))
                listener = None  # serve_unix's now: it closes it and removes the socket
                task_status.started()
        finally:
            if listener is not None:
                listener.close()
                remove_socket(self.socket_path)

    async def _serve_client(self, sock: socket.socket) -> None:
        try:
            if not await sends_within(sock, self.handshake_timeout):
                log.info("%s: a client sent nothing within %g s: dropped", self.name, self.handshake_timeout)
                self.counters["handshake_timeouts"] += 1
                return
            sock.setblocking(True)
            async with self._one_client:
                conn = Connection(self, sock)
                log.info("%s: front end connected", self.name)
                await self._run_connection(conn)
        finally:
            sock.close()

    async def _serve_adopted(self, conn: Connection, *,
                             task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The front end an old process handed over (set up by adopt()): its queues start, and
        it is served as any."""
        try:
            async with self._one_client:
                task_status.started()
                await trio.to_thread.run_sync(conn.resume_queues)
                log.info("%s: front end taken over from the process before", self.name)
                await self._run_connection(conn)
        finally:
            conn.sock.close()

    async def _run_connection(self, conn: Connection) -> None:
        """Serve `conn` until its front end goes (or we stop); a pause (hand-over) holds it
        until resume(), or for good once the process has handed over."""
        self.connection = conn
        self.connections_served += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._stop_on_cancel, conn)
                while True:
                    await trio.to_thread.run_sync(conn.run_blocking, limiter=trio.CapacityLimiter(1))
                    if not conn.paused:
                        break
                    self._paused.set()
                    await self._resumed.wait()
                nursery.cancel_scope.cancel()
        finally:
            try:
                await trio.to_thread.run_sync(self._close_connection, conn)
            finally:
                self.connection = None
            log.info("%s: front end disconnected", self.name)

    # -- hand-over to a new process (qbackend.app.upgrade's Part) -------------------------

    async def pause(self) -> None:
        """Accept nothing; stop the connection's message loop between messages and every
        queue after its drain (all taken chains answered), the sockets untouched."""
        self.gate.close()
        self._resumed = trio.Event()
        self._paused = trio.Event()
        conn = self.connection
        if conn is None:
            return
        conn.pause_requested = True
        signal_eventfd(conn.wake)
        with trio.move_on_after(PAUSE_WAIT):
            await self._paused.wait()
        if not self._paused.is_set():
            raise HandoverError(f"{self.name}: the front end's messages did not reach a boundary within "
                                f"{PAUSE_WAIT:g} s")
        await trio.to_thread.run_sync(conn.pause_queues)

    async def resume(self) -> None:
        conn = self.connection
        if conn is not None and conn.pause_requested:
            conn.pause_requested = False
            if conn.paused:
                await trio.to_thread.run_sync(conn.resume_queues)
        self._resumed.set()
        self.gate.open()

    def save(self, saver: Saver) -> State:
        listener = self.gate.listener
        if listener is None:
            raise HandoverError(f"{self.name}: it is not serving")
        conn = self.connection
        return {"listener": saver.fd(listener.fileno()), "inode": owned_inode(self.socket_path),
                "connection": conn.save(saver) if conn is not None and conn.paused else None}

    def adopt(self, state: State, loader: Loader) -> None:
        """In the new process, before serve(): the listener, and the front end as it was set up."""
        listener = adopt_socket(loader.take(state["listener"]))
        listener.setblocking(False)
        self._adopted_listener = listener
        adopt_owned(self.socket_path, state["inode"])
        saved = state["connection"]
        if saved is not None:
            fds = {"regions": [loader.take(r["fd"]) for r in saved["regions"]],
                   "inflight": None if saved["inflight"] is None else loader.take(saved["inflight"]["fd"]),
                   "queues": [{key: loader.take_optional(q[key]) for key in ("kick", "call", "err")}
                              for q in saved["queues"]]}
            sock = adopt_socket(loader.take(saved["socket"]))
            sock.setblocking(True)
            conn = Connection(self, sock)
            try:
                conn.restore(saved, fds)
            except BaseException:
                conn.close()
                raise
            self._adopted = conn

    @property
    def stats(self) -> Counter[str]:
        """The counters, with the requests the native path answered counted in `requests`
        (and apart, in `native_requests`)."""
        out = Counter(self.counters)
        native = self._native_requests
        conn = self.connection
        if conn is not None:
            native += sum(int(q.native.c.requests) for q in conn.queues if q.native is not None)
        out["native_requests"] = native
        out["requests"] += native
        return out

    def _close_connection(self, conn: Connection) -> None:
        if log.isEnabledFor(logging.INFO):
            # Where a queue's requests went (the first thing to look at when a bench row moves).
            for q in conn.queues:
                native = q.native.counts() if q.native is not None else {}
                log.info("%s: queue %d served %d requests: %d native (%d interrupts, held %d times with "
                         "more and %d alone, %d handed to Python, woken by %d kicks), %d in Python", self.name,
                         q.index, q.requests, native.get("requests", 0), native.get("notifications", 0),
                         native.get("holds_caught", 0), native.get("holds_missed", 0), native.get("handed_over", 0),
                         native.get("kicks", 0), q.python_requests)
        conn.close()
        self._native_requests += sum(int(q.native.c.requests) for q in conn.queues if q.native is not None)
        try:
            self.export.flush()
        except OSError as exc:
            log.warning("%s: flush after the front end went: %s", self.name, os.strerror(exc.errno or E.EIO))

    @staticmethod
    async def _stop_on_cancel(conn: Connection) -> None:
        try:
            await trio.sleep_forever()
        finally:
            conn.stop()

    def open_fds(self) -> list[int]:
        """The fds this server holds for its front end (for leak checks)."""
        return self.connection.open_fds() if self.connection is not None else []
