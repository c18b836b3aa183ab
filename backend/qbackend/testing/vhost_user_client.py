"""A small blocking vhost-user front end for tests: it plays QEMU's part
against a vhost-user back end (qbackend's vhost-user-blk server, in the same
process or not), with guest RAM of its own.

Guest RAM is a memfd (os.memfd_create, ftruncate, mmap) that the front end
maps too and hands over with SET_MEM_TABLE (or one region at a time with
ADD_MEM_REG); each region has a guest physical address (GPA) and a pretend
front-end userspace address (UVA), which is what SET_VRING_ADDR speaks.
For each queue the front end lays out a split ring's descriptor table,
available and used rings inside that memory, creates the kick and call
eventfds (and the error eventfd if asked), and then drives the ring the way
a guest driver does: descriptors, the available ring, a kick, the used ring
read back.  `make_request` builds virtio-blk requests (header, data, status:
direct, indirect, with a split header, or with the data anywhere, even
outside guest memory); `write_desc`, `offer` and `set_avail_idx` write raw
descriptors and indices for the bad cases.

Messages go out with NEED_REPLY once REPLY_ACK is agreed, and `call`
returns whether the back end acked success.  Nothing here asserts: what the
back end does to the rings happens on its own threads, so every effect is
waited for with a deadline (`wait_used`, `wait_call`, `wait_err`); a wait
that runs out raises TimeoutError naming what it saw last.

It speaks just enough of the protocol to act like QEMU; it is not a driver
and has no trio in it.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from qbackend.errors import QbackendError
from qbackend.models.virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_RING_PACKED,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)
from qbackend.plumbing.peer_memory import sealed_memfd
from qbackend.plumbing.unix import close_fds, fds_from_ancdata, send_with_fds
from qbackend.protocol import vhost_user as vu

Request = vu.FrontendRequest

DEFAULT_RAM_SIZE = 4 << 20
DEFAULT_GPA = 0x4000_0000  # guest RAM at 1 GiB
DEFAULT_UVA = 0x7F12_3400_0000  # where "QEMU" pretends to have it mapped
RING_ZONE = 64 << 10  # the start of the first region holds the rings; requests' buffers follow
DEFAULT_TIMEOUT = 5.0
STATUS_UNSET = 0xFF  # written into a status byte before the request goes out

# virtio-blk request types and status values (the spec's numbers, as qbackend.models.virtio_blk has them)
VIRTIO_BLK_T_IN = 0
VIRTIO_BLK_T_OUT = 1
VIRTIO_BLK_T_FLUSH = 4
VIRTIO_BLK_T_GET_ID = 8
VIRTIO_BLK_S_OK = 0
VIRTIO_BLK_S_IOERR = 1
VIRTIO_BLK_S_UNSUPP = 2
SECTOR_SIZE = 512
ID_BYTES = 20

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")  # id, len
_BLK_HEADER = struct.Struct("<IIQ")  # type, ioprio, sector
_U64 = struct.Struct("<Q")


class FrontendError(QbackendError):
    """The back end refused a step that had to work, answered what was not
    asked, or the front end ran out of something (descriptors, memory)."""


# -- guest memory ---------------------------------------------------------------------------


@dataclass(eq=False)
class GuestRegion:
    """One memfd of guest RAM: `size` bytes at guest `gpa`, which the front end
    "sees" at `uva`; the region starts `mmap_offset` bytes into the memfd."""

    gpa: int
    size: int
    uva: int
    fd: int
    map: mmap.mmap
    mmap_offset: int = 0
    heap_start: int = 0  # offset (in the region) where request buffers start
    heap: int = 0  # the next free offset

    @classmethod
    def create(cls, gpa: int, size: int, uva: int, *, mmap_offset: int = 0, name: str = "qbackend-guest-ram",
               heap_start: int = 0) -> GuestRegion:
        fd = sealed_memfd(name, mmap_offset + size)  # as QEMU's memory-backend-memfd
        try:
            m = mmap.mmap(fd, mmap_offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            raise
        return cls(gpa, size, uva, fd, m, mmap_offset, heap_start, heap_start)

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def describe(self, **override: int) -> vu.MemoryRegion:
        """The region as the vhost-user messages carry it (fields may be overridden, to lie)."""
        fields = {"guest_phys_addr": self.gpa, "memory_size": self.size, "userspace_addr": self.uva,
                  "mmap_offset": self.mmap_offset, **override}
        return vu.MemoryRegion(**fields)

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end

    def uva_of(self, gpa: int) -> int:
        return gpa - self.gpa + self.uva

    def offset(self, gpa: int) -> int:
        """Where `gpa` is in the mmap (which starts at the memfd's first byte)."""
        return gpa - self.gpa + self.mmap_offset

    def alloc(self, n: int, align: int = 16) -> int:
        """n bytes of the region's heap; their GPA."""
        start = (self.heap + align - 1) & ~(align - 1)
        if start + n > self.size:
            raise FrontendError(f"guest region at {self.gpa:#x} is out of memory ({n} bytes wanted); reset_heap()")
        self.heap = start + n
        return self.gpa + start

    def reset_heap(self) -> None:
        self.heap = self.heap_start

    def close(self) -> None:
        if self.fd < 0:
            return
        self.map.close()
        os.close(self.fd)
        self.fd = -1


# -- rings and requests -------------------------------------------------------------------


@dataclass(frozen=True)
class Used:
    """One used ring element: the head the device returned and how much it wrote."""

    id: int
    len: int


@dataclass(eq=False)
class Vring:
    """The driver's side of one split virtqueue."""

    index: int
    num: int
    region: GuestRegion
    desc: int  # GPAs of the three parts
    avail: int
    used: int
    avail_idx: int = 0  # the next avail ring slot the driver fills
    last_used: int = 0  # the used idx the driver has read up to
    free: list[int] = field(default_factory=list)
    chains: dict[int, list[int]] = field(default_factory=dict)  # head -> its ring descriptors
    kick: int | None = None  # the front end's copies of the eventfds it sent
    call: int | None = None
    err: int | None = None

    def fds(self) -> list[int]:
        return [fd for fd in (self.kick, self.call, self.err) if fd is not None]


@dataclass(frozen=True)
class BlkRequest:
    """A virtio-blk request laid out in guest memory and made available."""

    queue: int
    head: int
    type: int
    sector: int
    data_gpa: int  # where the data buffer is (0 with none)
    data_len: int
    status_gpa: int


def _eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def _read_eventfd(fd: int) -> int:
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0


def _wait_eventfd(fd: int, timeout: float, what: str) -> int:
    """Wait (poll) for an eventfd to be signalled; its counter, which this resets."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if poller.poll(max(0, int(left * 1000))):
            count = _read_eventfd(fd)
            if count:
                return count
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


class VhostUserFrontend:
    """A vhost-user front end on a UNIX socket, with guest RAM of its own.

    The first region of guest RAM (`ram`) is made now: `ram_size` bytes at
    `gpa`, pretend-mapped at `uva`.  More regions come from `new_region` and
    are sent with `set_mem_table` or `add_mem_reg`.  `close` closes the
    socket, every eventfd and memfd, and unmaps everything.
    """

    def __init__(self, path: str | os.PathLike[str], *, ram_size: int = DEFAULT_RAM_SIZE, gpa: int = DEFAULT_GPA,
                 uva: int = DEFAULT_UVA, timeout: float = DEFAULT_TIMEOUT, connect: bool = True) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.regions: list[GuestRegion] = []
        self.vrings: dict[int, Vring] = {}
        self.offered_features = 0  # GET_FEATURES
        self.features = 0  # SET_FEATURES
        self.offered_protocol_features = 0
        self.protocol_features = 0
        self.queue_num = 0
        self._reader = vu.MessageReader()
        self._extra_fds: list[int] = []  # eventfds made for raw messages, closed with the front end
        try:
            self.ram = self.new_region(ram_size, gpa, uva, heap_start=min(RING_ZONE, ram_size // 2))
            if connect:
                self.connect()
        except BaseException:
            self.close()
            raise

    # -- the connection ------------------------------------------------------------------

    def connect(self) -> None:
        """Connect (again): a fresh socket; guest memory stays, the rings are forgotten."""
        self.disconnect()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self.timeout)
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                sock.connect(self.path)
                break
            except (BlockingIOError, FileNotFoundError, ConnectionRefusedError):
                if time.monotonic() >= deadline:
                    sock.close()
                    raise
                time.sleep(0.01)
            except BaseException:
                sock.close()
                raise
        self.sock = sock
        self._reader = vu.MessageReader()
        self.features = self.protocol_features = 0

    def disconnect(self) -> None:
        """Close the socket and the rings' eventfds (what a QEMU that goes away closes)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        for ring in self.vrings.values():
            close_fds(ring.fds())
        self.vrings.clear()
        close_fds(self._extra_fds)
        self._extra_fds.clear()
        close_fds(self._reader.take_stray_fds())

    def reconnect(self) -> None:
        self.connect()

    def close(self) -> None:
        self.disconnect()
        while self.regions:
            self.regions.pop().close()

    def __enter__(self) -> VhostUserFrontend:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _sock(self) -> socket.socket:
        if self.sock is None:
            raise FrontendError("not connected")
        return self.sock

    # -- raw messages ----------------------------------------------------------------------

    @property
    def reply_ack(self) -> bool:
        return bool(self.protocol_features & vu.ProtocolFeature.REPLY_ACK)

    def send_raw(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Bytes as they are, the fds with the first of them (one sendmsg)."""
        send_with_fds(self._sock(), data, fds)

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (), *, need_reply: bool = False) -> None:
        self.send_raw(vu.build_request(request, payload, need_reply), fds)

    def receive(self, timeout: float | None = None) -> vu.Message:
        """The next message from the back end; EOFError if it closed the connection."""
        sock = self._sock()
        sock.settimeout(self.timeout if timeout is None else timeout)
        try:
            while True:
                data, ancdata, _flags, _ = sock.recvmsg(vu.HEADER_SIZE + vu.MAX_PAYLOAD,
                                                        socket.CMSG_SPACE(vu.MAX_FDS * 4))
                fds = fds_from_ancdata(ancdata)
                if not data:
                    close_fds(fds)
                    raise EOFError("the back end closed the connection")
                messages = self._reader.feed(data, fds)
                if messages:
                    extra = messages[1:]
                    if extra:
                        close_fds([fd for m in messages for fd in m.fds])
                        raise FrontendError(f"the back end sent {extra[0].name} unasked")
                    return messages[0]
        finally:
            sock.settimeout(self.timeout)

    def _reply(self, request: int) -> vu.Message:
        reply = self.receive()
        close_fds(reply.fds)
        if reply.request != request or not reply.is_reply:
            raise FrontendError(f"asked {_name(request)}, got {reply.name} "
                                f"(flags {reply.flags:#x})")
        return reply

    def ask(self, request: int, payload: bytes = b"") -> bytes:
        """A request that has a reply of its own (GET_*); the reply's payload."""
        self.send(request, payload)
        return self._reply(request).payload

    def ask_u64(self, request: int) -> int:
        return vu.parse_u64(self.ask(request))

    def call(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> bool:
        """A request without a reply of its own, sent with NEED_REPLY: whether the
        back end acked success.  Before REPLY_ACK is agreed it is just sent (True)."""
        if not self.reply_ack:
            self.send(request, payload, fds)
            return True
        self.send(request, payload, fds, need_reply=True)
        return vu.parse_u64(self._reply(request).payload) == 0

    def must(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """`call`, and FrontendError if the back end refused."""
        if not self.call(request, payload, fds):
            raise FrontendError(f"the back end refused {_name(request)}")

    def closed_by_peer(self, timeout: float | None = None) -> bool:
        """Whether the back end closes the connection within `timeout` (reading
        and dropping anything it sends first)."""
        sock = self._sock()
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                sock.settimeout(left)
                try:
                    data, ancdata, _flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(vu.MAX_FDS * 4))
                except TimeoutError:
                    return False
                except (ConnectionResetError, BrokenPipeError):
                    return True
                close_fds(fds_from_ancdata(ancdata))
                if not data:
                    return True
        finally:
            sock.settimeout(self.timeout)

    def eventfd(self) -> int:
        """An eventfd for a raw message (closed with the connection)."""
        fd = _eventfd()
        self._extra_fds.append(fd)
        return fd

    # -- negotiation ----------------------------------------------------------------------

    def negotiate(self, features: int | None = None, protocol_features: int | None = None) -> int:
        """QEMU's opening: GET_FEATURES, GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES,
        GET_QUEUE_NUM, SET_OWNER, SET_FEATURES.  By default every feature offered is
        taken but VIRTIO_F_RING_PACKED (this client lays out split rings, as QEMU's device
        does unless packed=on); the features set (also in `self.features`)."""
        self.offered_features = self.ask_u64(Request.GET_FEATURES)
        if self.offered_features & vu.VHOST_USER_F_PROTOCOL_FEATURES:
            self.offered_protocol_features = self.ask_u64(Request.GET_PROTOCOL_FEATURES)
            wanted = self.offered_protocol_features if protocol_features is None else protocol_features
            # As QEMU: without NEED_REPLY (whether this message is acked is what it negotiates);
            # GET_QUEUE_NUM's reply below shows the back end has taken it.
            self.send(Request.SET_PROTOCOL_FEATURES, vu.u64(wanted))
            self.protocol_features = wanted
            if wanted & vu.ProtocolFeature.MQ:
                self.queue_num = self.ask_u64(Request.GET_QUEUE_NUM)
        self.must(Request.SET_OWNER)
        wanted = self.offered_features & ~(1 << VIRTIO_F_RING_PACKED) if features is None else features
        self.must(Request.SET_FEATURES, vu.u64(wanted))
        self.features = wanted
        return wanted

    def get_max_mem_slots(self) -> int:
        return self.ask_u64(Request.GET_MAX_MEM_SLOTS)

    # -- guest memory ------------------------------------------------------------------

    def new_region(self, size: int, gpa: int, uva: int, *, mmap_offset: int = 0, heap_start: int = 0) -> GuestRegion:
        """Another memfd of guest RAM (not sent: see set_mem_table / add_mem_reg)."""
        region = GuestRegion.create(gpa, size, uva, mmap_offset=mmap_offset, heap_start=heap_start)
        self.regions.append(region)
        return region

    def drop_region(self, region: GuestRegion) -> None:
        """Unmap and close a region the back end no longer has."""
        if region in self.regions:
            self.regions.remove(region)
        region.close()

    def set_mem_table(self, regions: Sequence[GuestRegion] | None = None) -> bool:
        regions = [self.ram] if regions is None else list(regions)
        return self.set_mem_table_raw([r.describe() for r in regions], [r.fd for r in regions])

    def set_mem_table_raw(self, regions: Sequence[vu.MemoryRegion], fds: Sequence[int]) -> bool:
        """SET_MEM_TABLE with any regions and fds (to lie about them)."""
        return self.call(Request.SET_MEM_TABLE, vu.memory_table(regions), fds)

    def add_mem_reg(self, region: GuestRegion) -> bool:
        return self.call(Request.ADD_MEM_REG, vu.single_region(region.describe()), [region.fd])

    def rem_mem_reg(self, region: GuestRegion) -> bool:
        return self.call(Request.REM_MEM_REG, vu.single_region(region.describe()))

    def region_of(self, gpa: int, length: int = 1) -> GuestRegion:
        for region in self.regions:
            if region.contains(gpa, length):
                return region
        raise FrontendError(f"guest address {gpa:#x}+{length:#x} is in none of the front end's regions")

    def write(self, gpa: int, data: bytes) -> None:
        region = self.region_of(gpa, len(data))
        start = region.offset(gpa)
        region.map[start:start + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        region = self.region_of(gpa, length)
        start = region.offset(gpa)
        return region.map[start:start + length]

    def _put16(self, gpa: int, value: int) -> None:
        self.write(gpa, _U16.pack(value & 0xFFFF))

    def _get16(self, gpa: int) -> int:
        return int(_U16.unpack(self.read(gpa, 2))[0])

    def alloc(self, n: int, data: bytes | None = None, region: GuestRegion | None = None, align: int = 16) -> int:
        """n bytes of guest memory for a buffer (in `region`, by default the first); its GPA."""
        gpa = (region or self.ram).alloc(n, align)
        self.write(gpa, data if data is not None else bytes(n))
        return gpa

    def reset_heap(self) -> None:
        """Forget every request buffer (none may be in flight)."""
        for region in self.regions:
            region.reset_heap()

    # -- rings ---------------------------------------------------------------------------

    def _ring(self, index: int) -> Vring:
        try:
            return self.vrings[index]
        except KeyError:
            raise FrontendError(f"queue {index} is not set up") from None

    def layout_ring(self, index: int, num: int, base: int = 0) -> Vring:
        """Lay a ring out in the first region's ring zone (the same place again for
        a queue set up again at the same size), zeroed, both indices at `base`."""
        old = self.vrings.get(index)
        if old is not None and old.num == num and old.region is self.ram:
            desc, avail, used = old.desc, old.avail, old.used
            close_fds(old.fds())
        else:
            if old is not None:
                close_fds(old.fds())
            start = self._ring_cursor()
            desc = start
            avail = desc + desc_table_size(num)
            used = (avail + avail_ring_size(num) + 3) & ~3
            if used + used_ring_size(num) > self.ram.gpa + self.ram.heap_start:
                raise FrontendError(f"no room for a ring of {num} in the ring zone")
        self.write(desc, bytes(desc_table_size(num)))
        self.write(avail, bytes(avail_ring_size(num)))
        self.write(used, bytes(used_ring_size(num)))
        self._put16(avail + 2, base)
        self._put16(used + 2, base)
        ring = Vring(index, num, self.ram, desc, avail, used, base, base, list(range(num)))
        self.vrings[index] = ring
        return ring

    def _ring_cursor(self) -> int:
        end = self.ram.gpa
        for ring in self.vrings.values():
            end = max(end, ring.used + used_ring_size(ring.num))
        return (end + 4095) & ~4095

    def set_vring_num(self, index: int, num: int) -> bool:
        return self.call(Request.SET_VRING_NUM, vu.vring_state(index, num))

    def set_vring_base(self, index: int, base: int) -> bool:
        return self.call(Request.SET_VRING_BASE, vu.vring_state(index, base))

    def set_vring_addr(self, index: int, desc_uva: int, used_uva: int, avail_uva: int) -> bool:
        return self.call(Request.SET_VRING_ADDR, vu.vring_addr(index, desc_uva, used_uva, avail_uva))

    def _vring_file(self, request: int, index: int, fd: int | None) -> bool:
        return self.call(request, vu.vring_fd(index, fd is not None), [fd] if fd is not None else [])

    def set_vring_kick(self, index: int, fd: int | None) -> bool:
        return self._vring_file(Request.SET_VRING_KICK, index, fd)

    def set_vring_call(self, index: int, fd: int | None) -> bool:
        return self._vring_file(Request.SET_VRING_CALL, index, fd)

    def set_vring_err(self, index: int, fd: int | None) -> bool:
        return self._vring_file(Request.SET_VRING_ERR, index, fd)

    def set_vring_enable(self, index: int, enable: bool = True) -> bool:
        return self.call(Request.SET_VRING_ENABLE, vu.vring_state(index, int(enable)))

    def setup_queue(self, index: int = 0, num: int = 16, *, base: int = 0, err: bool = True,
                    enable: bool = True) -> Vring:
        """Lay the ring out and hand it over as QEMU does: SET_VRING_NUM, _BASE,
        _ADDR, (_ERR), _CALL, _KICK, _ENABLE 1.  FrontendError names a refused step."""
        ring = self.layout_ring(index, num, base)
        r = ring.region
        steps: list[tuple[str, bool]] = []
        steps.append(("SET_VRING_NUM", self.set_vring_num(index, num)))
        steps.append(("SET_VRING_BASE", self.set_vring_base(index, base)))
        steps.append(("SET_VRING_ADDR", self.set_vring_addr(index, r.uva_of(ring.desc), r.uva_of(ring.used),
                                                            r.uva_of(ring.avail))))
        if err:
            ring.err = _eventfd()
            steps.append(("SET_VRING_ERR", self.set_vring_err(index, ring.err)))
        ring.call = _eventfd()
        steps.append(("SET_VRING_CALL", self.set_vring_call(index, ring.call)))
        ring.kick = _eventfd()
        steps.append(("SET_VRING_KICK", self.set_vring_kick(index, ring.kick)))
        if enable:
            steps.append(("SET_VRING_ENABLE", self.set_vring_enable(index, True)))
        refused = [name for name, ok in steps if not ok]
        if refused:
            raise FrontendError(f"queue {index}: the back end refused {', '.join(refused)}")
        return ring

    def resume_queue(self, old: Vring, base: int, *, enable: bool = True) -> Vring:
        """Hand a ring over again as it is in guest memory (a front end reconnecting to a
        back end that was restarted): SET_VRING_NUM, _BASE, _ADDR, _ERR, _CALL, _KICK,
        _ENABLE with new eventfds, and the driver's view of the ring (`old`) kept."""
        ring = Vring(old.index, old.num, old.region, old.desc, old.avail, old.used, old.avail_idx, old.last_used,
                     list(old.free), dict(old.chains))
        self.vrings[ring.index] = ring
        r, index = ring.region, ring.index
        self.must(Request.SET_VRING_NUM, vu.vring_state(index, ring.num))
        self.must(Request.SET_VRING_BASE, vu.vring_state(index, base))
        self.must(Request.SET_VRING_ADDR, vu.vring_addr(index, r.uva_of(ring.desc), r.uva_of(ring.used),
                                                        r.uva_of(ring.avail)))
        ring.err, ring.call, ring.kick = _eventfd(), _eventfd(), _eventfd()
        self.must(Request.SET_VRING_ERR, vu.vring_fd(index), [ring.err])
        self.must(Request.SET_VRING_CALL, vu.vring_fd(index), [ring.call])
        self.must(Request.SET_VRING_KICK, vu.vring_fd(index), [ring.kick])
        if enable:
            self.must(Request.SET_VRING_ENABLE, vu.vring_state(index, 1))
        return ring

    # -- inflight I/O tracking --------------------------------------------------------------

    def get_inflight_fd(self, num_queues: int, queue_size: int) -> tuple[vu.Inflight, int | None]:
        """GET_INFLIGHT_FD: the back end's answer and the region's fd (the caller's to close;
        None with a size of 0)."""
        self.send(Request.GET_INFLIGHT_FD, vu.Inflight(0, 0, num_queues, queue_size).pack())
        reply = self.receive()
        if reply.request != Request.GET_INFLIGHT_FD or not reply.is_reply:
            close_fds(reply.fds)
            raise FrontendError(f"asked GET_INFLIGHT_FD, got {reply.name}")
        answer = vu.Inflight.parse(reply.payload)
        fds = list(reply.fds)
        if len(fds) > 1 or (answer.mmap_size and not fds):
            close_fds(fds)
            raise FrontendError(f"GET_INFLIGHT_FD answered with {len(fds)} fds")
        return answer, fds[0] if fds else None

    def set_inflight_fd(self, inflight: vu.Inflight, fd: int) -> bool:
        """SET_INFLIGHT_FD: hand the region back (a copy of `fd` goes; the caller keeps its own)."""
        return self.call(Request.SET_INFLIGHT_FD, inflight.pack(), [fd])

    def restart_queue(self, index: int, base: int | None = None) -> None:
        """Start a stopped ring again where its memory is (what QEMU does after
        GET_VRING_BASE): SET_VRING_BASE if `base` is given, then a new kick fd."""
        ring = self._ring(index)
        if base is not None:
            self.must(Request.SET_VRING_BASE, vu.vring_state(index, base))
        if ring.kick is not None:
            close_fds([ring.kick])
        ring.kick = _eventfd()
        self.must(Request.SET_VRING_KICK, vu.vring_fd(index), [ring.kick])

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: the back end stops the ring and says where it got to."""
        state = vu.VringState.parse(self.ask(Request.GET_VRING_BASE, vu.vring_state(index, 0)))
        if state.index != index:
            raise FrontendError(f"GET_VRING_BASE for queue {index} answered for queue {state.index}")
        return state.num

    def get_config(self, size: int, offset: int = 0) -> bytes:
        """GET_CONFIG: `size` bytes of the device's config space at `offset`."""
        payload = self.ask(Request.GET_CONFIG, vu.config(offset, size))
        if not payload:
            raise FrontendError(f"GET_CONFIG of {size} bytes at {offset}: the back end failed it")
        reply = vu.ConfigSpace.parse(payload)
        if (reply.offset, reply.size) != (offset, size):
            raise FrontendError(f"GET_CONFIG of {size} bytes at {offset} answered with {reply.size} at {reply.offset}")
        return reply.data

    def capacity(self) -> int:
        """virtio-blk's capacity field, in 512-byte sectors."""
        return int(_U64.unpack(self.get_config(8))[0])

    # -- the driver: descriptors, avail ring, kick, used ring ------------------------------------

    def take_descs(self, index: int, n: int) -> list[int]:
        """n free descriptor indices of the ring's table (for raw chains)."""
        ring = self._ring(index)
        if len(ring.free) < n:
            raise FrontendError(f"queue {index}: {n} descriptors wanted, {len(ring.free)} free")
        ids, ring.free = ring.free[:n], ring.free[n:]
        return ids

    def write_desc(self, index: int, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
                   table: int | None = None) -> None:
        """Descriptor i of the ring's table (or of an indirect table at GPA `table`), as given."""
        base = self._ring(index).desc if table is None else table
        self.write(base + 16 * i, _DESC.pack(addr, length, flags, nxt))

    def add_chain(self, index: int, bufs: Sequence[tuple[int, int, bool]]) -> int:
        """Chain (gpa, length, device-writable) buffers through free descriptors; the head (not offered)."""
        ring = self._ring(index)
        ids = self.take_descs(index, len(bufs))
        for k, (gpa, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(index, ids[k], gpa, length, flags, 0 if last else ids[k + 1])
        ring.chains[ids[0]] = ids
        return ids[0]

    def add_indirect(self, index: int, bufs: Sequence[tuple[int, int, bool]], *, table_len: int | None = None,
                     flags: int = 0) -> int:
        """One ring descriptor naming an indirect table of bufs (its length `table_len`
        if given, to lie; `flags` ORed into INDIRECT); the head (not offered)."""
        ring = self._ring(index)
        table = self.alloc(16 * max(1, len(bufs)))
        for k, (gpa, length, writable) in enumerate(bufs):
            last = k == len(bufs) - 1
            dflags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(index, k, gpa, length, dflags, 0 if last else k + 1, table=table)
        [head] = self.take_descs(index, 1)
        self.write_desc(index, head, table, 16 * len(bufs) if table_len is None else table_len,
                        VIRTQ_DESC_F_INDIRECT | flags)
        ring.chains[head] = [head]
        return head

    def offer(self, index: int, *heads: int) -> None:
        """Put heads in the available ring and publish them (avail idx).  With
        EVENT_IDX, used_event asks for an interrupt at the next used entry."""
        ring = self._ring(index)
        for head in heads:
            self._put16(ring.avail + 4 + 2 * (ring.avail_idx % ring.num), head)
            ring.avail_idx = (ring.avail_idx + 1) & 0xFFFF
        if self.features >> VIRTIO_F_EVENT_IDX & 1:
            self._put16(ring.avail + 4 + 2 * ring.num, ring.last_used)
        self._put16(ring.avail + 2, ring.avail_idx)

    def set_avail_idx(self, index: int, value: int) -> None:
        """Write the avail idx as it is (a bad driver)."""
        ring = self._ring(index)
        ring.avail_idx = value & 0xFFFF
        self._put16(ring.avail + 2, value)

    def kick(self, index: int) -> None:
        fd = self._ring(index).kick
        if fd is None:
            raise FrontendError(f"queue {index} has no kick fd")
        os.write(fd, (1).to_bytes(8, "little"))

    def used_idx(self, index: int) -> int:
        ring = self._ring(index)
        return self._get16(ring.used + 2)

    def avail_flags_used_event(self, index: int) -> tuple[int, int]:
        ring = self._ring(index)
        return self._get16(ring.avail), self._get16(ring.avail + 4 + 2 * ring.num)

    def avail_event(self, index: int) -> int:
        """The back end's avail event (VIRTIO_F_EVENT_IDX): a driver kicks once it makes
        the entry of this index available."""
        ring = self._ring(index)
        return self._get16(ring.used + 4 + 8 * ring.num)

    def wait_used(self, index: int, count: int = 1, timeout: float | None = None) -> list[Used]:
        """Poll the used idx until `count` more entries are there; the new entries
        (their descriptors are free again).  TimeoutError if they do not come."""
        ring = self._ring(index)
        timeout = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            idx = self.used_idx(index)
            ready = (idx - ring.last_used) & 0xFFFF
            if ready >= count:
                break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"queue {index}: timed out after {timeout} s waiting for {count} used entries "
                                   f"past {ring.last_used}; used idx is {idx}")
            time.sleep(0.002)
        out = []
        while ring.last_used != idx:
            elem = ring.used + 4 + 8 * (ring.last_used % ring.num)
            used = Used(*_USED_ELEM.unpack(self.read(elem, 8)))
            out.append(used)
            ring.free += ring.chains.pop(used.id, [])
            ring.last_used = (ring.last_used + 1) & 0xFFFF
        return out

    def wait_call(self, index: int, timeout: float | None = None) -> int:
        """Wait for the back end to signal the queue's call eventfd; the count (reset)."""
        fd = self._ring(index).call
        if fd is None:
            raise FrontendError(f"queue {index} has no call fd")
        return _wait_eventfd(fd, self.timeout if timeout is None else timeout, f"queue {index}'s call eventfd")

    def wait_err(self, index: int, timeout: float | None = None) -> int:
        """Wait for the back end to signal the queue's error eventfd (SET_VRING_ERR)."""
        fd = self._ring(index).err
        if fd is None:
            raise FrontendError(f"queue {index} has no error fd")
        return _wait_eventfd(fd, self.timeout if timeout is None else timeout, f"queue {index}'s error eventfd")

    def calls(self, index: int) -> int:
        """The call eventfd's count now, without waiting (and reset)."""
        fd = self._ring(index).call
        return _read_eventfd(fd) if fd is not None else 0

    def errs(self, index: int) -> int:
        fd = self._ring(index).err
        return _read_eventfd(fd) if fd is not None else 0

    # -- virtio-blk requests --------------------------------------------------------------

    def make_request(self, index: int, type: int, sector: int = 0, *, out: bytes = b"", in_len: int = 0,
                     indirect: bool = False, split_header: bool = False, data_gpa: int | None = None,
                     region: GuestRegion | None = None, offer: bool = True) -> BlkRequest:
        """Lay a virtio-blk request out as a driver does: the 16-byte header
        (device-readable; in two descriptors, apart, with `split_header`), then
        `out` (device-readable data) or `in_len` bytes (device-writable data),
        then the status byte, set to STATUS_UNSET.  Data goes into `region` (by
        default the first) or at `data_gpa` if given (which may be outside
        guest memory: nothing is written there then).  Made available unless
        `offer` is False; not kicked."""
        header = _BLK_HEADER.pack(type, 0, sector)
        bufs: list[tuple[int, int, bool]] = []
        if split_header:
            first = self.alloc(8, header[:8])
            self.alloc(64)  # a gap: the halves are not adjacent
            bufs += [(first, 8, False), (self.alloc(8, header[8:]), 8, False)]
        else:
            bufs.append((self.alloc(16, header), 16, False))
        length = len(out) if out else in_len
        if length:
            if data_gpa is None:
                data_gpa = self.alloc(length, out or None, region=region)
            elif out and any(r.contains(data_gpa, length) for r in self.regions):
                self.write(data_gpa, out)
            bufs.append((data_gpa, length, not out))
        status = self.alloc(1, bytes([STATUS_UNSET]))
        bufs.append((status, 1, True))
        head = self.add_indirect(index, bufs) if indirect else self.add_chain(index, bufs)
        if offer:
            self.offer(index, head)
        return BlkRequest(index, head, type, sector, data_gpa or 0, length, status)

    def status(self, req: BlkRequest) -> int:
        return self.read(req.status_gpa, 1)[0]

    def data(self, req: BlkRequest) -> bytes:
        return self.read(req.data_gpa, req.data_len)

    def run(self, *reqs: BlkRequest, timeout: float | None = None) -> list[int]:
        """Kick, wait for every request to be used, check the used entries name
        them; their status bytes."""
        queues = sorted({r.queue for r in reqs})
        for q in queues:
            self.kick(q)
        for q in queues:
            mine = {r.head for r in reqs if r.queue == q}
            used = self.wait_used(q, len(mine), timeout)
            if {u.id for u in used} != mine:
                raise FrontendError(f"queue {q}: used entries {used}, expected heads {sorted(mine)}")
        return [self.status(r) for r in reqs]

    def read_sectors(self, index: int, sector: int, count: int, *, indirect: bool = False,
                     split_header: bool = False, region: GuestRegion | None = None) -> tuple[int, bytes]:
        """IN: (status, the data read)."""
        req = self.make_request(index, VIRTIO_BLK_T_IN, sector, in_len=count * SECTOR_SIZE, indirect=indirect,
                                split_header=split_header, region=region)
        [status] = self.run(req)
        return status, self.data(req)

    def write_sectors(self, index: int, sector: int, data: bytes, *, indirect: bool = False,
                      split_header: bool = False, region: GuestRegion | None = None) -> int:
        """OUT: the status."""
        req = self.make_request(index, VIRTIO_BLK_T_OUT, sector, out=data, indirect=indirect,
                                split_header=split_header, region=region)
        return self.run(req)[0]

    def flush(self, index: int = 0) -> int:
        return self.run(self.make_request(index, VIRTIO_BLK_T_FLUSH))[0]

    def get_id(self, index: int = 0) -> tuple[int, bytes]:
        """GET_ID: (status, the 20 id bytes)."""
        req = self.make_request(index, VIRTIO_BLK_T_GET_ID, in_len=ID_BYTES)
        [status] = self.run(req)
        return status, self.data(req)


def _name(request: int) -> str:
    try:
        return vu.FrontendRequest(request).name
    except ValueError:
        return f"request {request}"



