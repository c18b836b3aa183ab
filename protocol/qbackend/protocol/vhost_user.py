"""vhost-user wire format, back-end (server) side, sans-IO.

The byte layouts follow QEMU's docs/interop/vhost-user.rst; where QEMU (the
front end) puts on the wire something other than what the text suggests,
the comment says so.  This module only frames messages and reads and builds
their payloads: which request is legal when, and what the device does with
it, is the caller's business.

Nothing here touches a socket, a file or a file descriptor.  File
descriptors are plain integers handed in by the caller with the bytes they
arrived with, and handed back out attached to the message that carried them
(`Message.fds`).  Whoever receives a message owns its fds and must close the
ones it does not keep; the parsers below never take ownership, so when one
raises, the message's fds are still the caller's to close.  The builders
return bytes only: fds to pass go into the ancillary data of the sendmsg()
that sends the message's first byte.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum, IntFlag

# -- wire numbers ------------------------------------------------------------------

# Spec "Message Specification": every number is in the host's byte order, and the
# C struct is packed, so "=" (native order, no alignment) is the layout.
HEADER = struct.Struct("=III")  # request, flags, size (of the payload, header not counted)
HEADER_SIZE = HEADER.size


class FrontendRequest(IntEnum):
    """Spec "Front-end message types": what the front end (QEMU) sends us."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4  # deprecated: QEMU no longer sends it
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # the spec's older name: SET_SLAVE_REQ_FD
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43
    GET_SHMEM_CONFIG = 44  # the newest revision of the spec (VIRTIO Shared Memory Regions)


class BackendRequest(IntEnum):
    """Spec "Back-end message types": what a back end sends on the channel it gets
    with SET_BACKEND_REQ_FD (the numbers overlap FrontendRequest's)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5
    SHARED_OBJECT_ADD = 6
    SHARED_OBJECT_REMOVE = 7
    SHARED_OBJECT_LOOKUP = 8
    SHMEM_MAP = 9
    SHMEM_UNMAP = 10


# Header flags.  The version sits in the low 2 bits and is 1; QEMU refuses a reply
# whose flags are anything but VERSION | FLAG_REPLY.
VERSION = 1
VERSION_MASK = 0x3
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3


class ProtocolFeature(IntFlag):
    """Spec "Protocol features" (VHOST_USER_PROTOCOL_F_*), as masks."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4  # the spec's table says MTU, its text and libvhost-user NET_MTU
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16
    XEN_MMAP = 1 << 17  # changes the region layout (two more u32); not parsed here
    SHARED_OBJECT = 1 << 18
    DEVICE_STATE = 1 << 19
    SHMEM = 1 << 20


# The spec's `#define VHOST_USER_F_PROTOCOL_FEATURES 30` is a bit number in the
# GET_FEATURES/SET_FEATURES word (the virtio "UNUSED" bit 30); this is its mask.
VHOST_USER_F_PROTOCOL_FEATURES = 1 << 30

# linux/vhost_types.h's `#define VHOST_VRING_F_LOG 0` is a bit number too: the
# SET_VRING_ADDR flags carry 1 << 0 when the used ring is to be logged.
VHOST_VRING_F_LOG = 1 << 0

# SET_VRING_KICK / CALL / ERR carry a u64: the ring index in bits 0-7, and bit 8
# set when no fd comes with the message (poll instead).
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 1 << 8

# SET_MEM_TABLE has room for 8 regions (and so at most 8 fds); with
# CONFIGURE_MEM_SLOTS the front end adds regions one by one (ADD_MEM_REG), up to
# what GET_MAX_MEM_SLOTS announced, capped by QEMU at VHOST_USER_MAX_RAM_SLOTS.
VHOST_MEMORY_BASELINE_NREGIONS = 8
VHOST_USER_MAX_RAM_SLOTS = 509

# GET_CONFIG / SET_CONFIG move at most this much of the virtio config space.
VHOST_USER_MAX_CONFIG_SIZE = 256


class ConfigFlags(IntEnum):
    """The flags word of SET_CONFIG (VhostSetConfigType)."""

    FRONTEND = 0  # the guest wrote a (writable) field
    MIGRATION = 1  # restoring on a migration target: read-only fields may be set too


# Limits of the reader.  The largest payload in the spec's union is the
# GET_SHMEM_CONFIG reply (8 + 256 * 8 = 2056 bytes); of what a front end sends,
# CREATE_CRYPTO_SESSION (about 1.1 KiB with a 1024-byte asymmetric key), then
# SET_CONFIG (12 + 256) and SET_MEM_TABLE (8 + 8 * 32).  A page is over all of
# them, and small enough that a bogus size costs nothing before it is refused.
MAX_PAYLOAD = 4096
# No message carries more than 8 fds (SET_MEM_TABLE's 8 regions; the back-end
# channel's limit is the same), and libvhost-user's control buffer has room for 8.
MAX_FDS = VHOST_MEMORY_BASELINE_NREGIONS

# Requests a back end answers whatever the flags say (spec "Communication" and the
# "reply payload" of each request).  Besides: SET_LOG_BASE with LOG_SHMFD,
# SET_MEM_TABLE / ADD_MEM_REG / REM_MEM_REG after POSTCOPY_LISTEN, and, with
# REPLY_ACK negotiated, every other request that has NEED_REPLY (`reply_ack`).
REPLIES = frozenset({
    FrontendRequest.GET_FEATURES,
    FrontendRequest.GET_PROTOCOL_FEATURES,
    FrontendRequest.GET_VRING_BASE,
    FrontendRequest.GET_QUEUE_NUM,
    FrontendRequest.IOTLB_MSG,
    FrontendRequest.GET_CONFIG,
    FrontendRequest.CREATE_CRYPTO_SESSION,
    FrontendRequest.POSTCOPY_ADVISE,
    FrontendRequest.POSTCOPY_END,
    FrontendRequest.GET_INFLIGHT_FD,
    FrontendRequest.GET_MAX_MEM_SLOTS,
    FrontendRequest.GET_STATUS,
    FrontendRequest.GET_SHARED_OBJECT,
    FrontendRequest.SET_DEVICE_STATE_FD,
    FrontendRequest.CHECK_DEVICE_STATE,
    FrontendRequest.GET_SHMEM_CONFIG,
})

# -- payload layouts -------------------------------------------------------------------

U64 = struct.Struct("=Q")
VRING_STATE = struct.Struct("=II")  # index num
# The older spec's table shows a "size" column here; there is none on the wire
# (struct vhost_vring_addr, 40 bytes).
VRING_ADDR = struct.Struct("=IIQQQQ")  # index flags desc used avail log
MEMORY_REGION = struct.Struct("=QQQQ")  # guest_phys_addr memory_size userspace_addr mmap_offset
MEMORY_TABLE_HEADER = struct.Struct("=II")  # nregions padding
SINGLE_REGION_PADDING = struct.Struct("=Q")
CONFIG_HEADER = struct.Struct("=III")  # offset size flags, then `size` bytes
LOG = struct.Struct("=QQ")  # mmap_size mmap_offset
# VhostUserInflight is not packed in C: 20 bytes of fields padded to 24, and both
# QEMU and libvhost-user insist on sizeof() == 24.
INFLIGHT = struct.Struct("=QQHH4x")  # mmap_size mmap_offset num_queues queue_size

# The inflight region itself (spec "Inflight I/O tracking", split rings): per queue a
# QueueRegionSplit of INFLIGHT_HEADER, then desc_num DescStateSplit entries (INFLIGHT_DESC),
# the whole padded to INFLIGHT_ALIGN; queue i's region starts at i * inflight_queue_size().
INFLIGHT_VERSION = 1
INFLIGHT_ALIGN = 64
INFLIGHT_HEADER = struct.Struct("<QHHHH")  # features version desc_num last_batch_head used_idx
INFLIGHT_DESC = struct.Struct("<B5xHQ")  # inflight pad[5] next counter
INFLIGHT_HEADER_SIZE = INFLIGHT_HEADER.size  # 16
INFLIGHT_DESC_SIZE = INFLIGHT_DESC.size  # 16
# Byte offsets inside those, for the stores that must happen one at a time and in order.
INFLIGHT_VERSION_OFFSET = 8
INFLIGHT_DESC_NUM_OFFSET = 10
INFLIGHT_LAST_BATCH_HEAD_OFFSET = 12
INFLIGHT_USED_IDX_OFFSET = 14
INFLIGHT_DESC_NEXT_OFFSET = 6
INFLIGHT_DESC_COUNTER_OFFSET = 8
INFLIGHT_MAX_QUEUE_SIZE = 32768

_U64_END = 1 << 64

# -- errors --------------------------------------------------------------------------


class VhostUserProtocolError(Exception):
    """The front end broke the framing or sent a payload that does not parse.

    The spec gives a back end no way to report either (REPLY_ACK answers
    requests, not garbage), so the caller closes the connection.
    """


# -- messages and framing ------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    """One whole message off the wire, with the fds that came with it.

    `request` is a `FrontendRequest` (or the reader's enum) when the number is
    known and a plain int otherwise: an unknown request still has to be
    answered (or refused) by the caller, so it is not a framing error.
    """

    request: int
    flags: int
    payload: bytes = b""
    fds: tuple[int, ...] = ()

    @property
    def version(self) -> int:
        return self.flags & VERSION_MASK

    @property
    def is_reply(self) -> bool:
        return bool(self.flags & FLAG_REPLY)

    @property
    def need_reply(self) -> bool:
        """NEED_REPLY: with REPLY_ACK negotiated, answer with `reply_ack` unless
        the request has a reply of its own (`REPLIES`)."""
        return bool(self.flags & FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        return self.request.name if isinstance(self.request, IntEnum) else f"request {self.request}"

    def pack(self) -> bytes:
        """The message's bytes (its fds travel beside them)."""
        return HEADER.pack(self.request, self.flags, len(self.payload)) + self.payload


class MessageReader:
    """Cuts a byte stream into messages and hands each its fds.

    Which message do fds belong to?  The spec has the front end send them
    with the sendmsg() that carries the first byte of the message, and QEMU
    sends each message, header and payload, with one sendmsg().  Linux's
    stream recvmsg() may glue earlier fd-less bytes in front of the segment
    that carries fds, but stops right after that segment; so the fds that
    arrive with a chunk belong to the message that holds the chunk's last
    byte.  With a caller that reads the 12 header bytes first (as
    libvhost-user does) that is the message whose header they came with.

    The reader works through each chunk as it is fed, so it never holds more
    than one incomplete message: at most HEADER_SIZE + `max_payload` bytes,
    and a header with a bigger size is refused as soon as its 12 bytes are in.

    fds and errors: every fd handed to `feed` either goes out attached to a
    message `feed` returns, or stays in the reader until `take_stray_fds`.
    When `feed` raises, the messages it had completed in that call are not
    returned; their fds, those of the incomplete message and those handed in
    with the failing call are all strays.  After an error the reader is broken
    (every later `feed` raises), and the caller closes the connection and the
    fds `take_stray_fds` returns.  At the end of a stream, the same call
    returns the fds of an incomplete message.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD, max_fds: int = MAX_FDS,
                 requests: type[IntEnum] = FrontendRequest) -> None:
        self.max_payload = max_payload
        self.max_fds = max_fds
        self.requests = requests  # known numbers become members of this enum
        self._buffer = bytearray()  # header bytes, then (once it is parsed) payload bytes
        self._header: tuple[int, int, int] | None = None  # request, flags, size
        self._fds: list[int] = []  # of the incomplete message
        self._stray: list[int] = []
        self._broken = False

    @property
    def buffered(self) -> int:
        """Bytes of the incomplete message held (0 at a message boundary)."""
        return len(self._buffer) + (HEADER_SIZE if self._header is not None else 0)

    @property
    def broken(self) -> bool:
        return self._broken

    def take_stray_fds(self) -> list[int]:
        """Every fd the reader holds that no returned message took, for the caller
        to close: after an error, or when the connection ends."""
        fds = self._stray + self._fds
        self._stray, self._fds = [], []
        return fds

    def end_of_stream(self) -> None:
        """The peer closed the connection: refuse a half-received message.
        Either way, `take_stray_fds` then returns what the reader holds."""
        if self.buffered:
            self._broken = True
            raise VhostUserProtocolError(f"the stream ended inside a message ({self.buffered} bytes of it received)")

    def feed(self, data: bytes | bytearray | memoryview, fds: Sequence[int] = ()) -> list[Message]:
        """Take bytes and the fds received with them; the messages they complete."""
        new_fds = list(fds)
        if self._broken:
            self._stray += new_fds
            raise VhostUserProtocolError("the stream already broke the framing")
        view = memoryview(data).cast("B")
        end = len(view)
        out: list[Message] = []
        try:
            if not end:
                if new_fds:
                    raise VhostUserProtocolError(f"{len(new_fds)} fds arrived without a byte of data")
                return out
            pos = 0
            while pos < end:
                if self._header is None:
                    take = min(HEADER_SIZE - len(self._buffer), end - pos)
                    self._buffer += view[pos:pos + take]
                    pos += take
                    if len(self._buffer) < HEADER_SIZE:
                        break
                    self._header = self._check_header(*HEADER.unpack(self._buffer))
                    self._buffer.clear()
                request, flags, size = self._header
                take = min(size - len(self._buffer), end - pos)
                self._buffer += view[pos:pos + take]
                pos += take
                if len(self._buffer) < size:
                    break
                if pos == end:  # this message holds the chunk's last byte: the fds are its
                    given, new_fds = new_fds, []  # from here on the reader's list holds them
                    self._add_fds(given, request)
                out.append(Message(request, flags, bytes(self._buffer), tuple(self._fds)))
                self._fds = []
                self._buffer.clear()
                self._header = None
            if new_fds:  # the chunk ended inside a message
                given, new_fds = new_fds, []
                self._add_fds(given, self._header[0] if self._header is not None else None)
        except VhostUserProtocolError:
            self._broken = True
            self._stray += [fd for message in out for fd in message.fds] + self._fds + new_fds
            self._fds = []
            self._buffer.clear()
            self._header = None
            raise
        return out

    def _check_header(self, request: int, flags: int, size: int) -> tuple[int, int, int]:
        try:
            request = self.requests(request)
        except ValueError:
            pass  # unknown: kept as a number for the caller to refuse
        name = request.name if isinstance(request, IntEnum) else f"request {request}"
        if flags & VERSION_MASK != VERSION:
            raise VhostUserProtocolError(f"{name}: version {flags & VERSION_MASK} in flags {flags:#x}, "
                                         f"not {VERSION}")
        if size > self.max_payload:
            raise VhostUserProtocolError(f"{name}: payload of {size} bytes is over the {self.max_payload}-byte limit")
        return request, flags, size

    def _add_fds(self, fds: list[int], request: int | None) -> None:
        self._fds += fds
        if len(self._fds) > self.max_fds:
            what = "a message" if request is None else (
                request.name if isinstance(request, IntEnum) else f"request {request}")
            raise VhostUserProtocolError(f"{len(self._fds)} fds with {what}, over the limit of {self.max_fds}")


def require_fds(message: Message, *counts: int) -> None:
    """Refuse `message` unless it carries one of `counts` fds (spec: which
    requests carry fds, and how many)."""
    if len(message.fds) not in counts:
        expected = " or ".join(str(c) for c in counts)
        raise VhostUserProtocolError(f"{message.name} came with {len(message.fds)} fds, not {expected}")


# -- payloads ------------------------------------------------------------------------------


def _exact(payload: bytes, layout: struct.Struct, what: str) -> tuple[int, ...]:
    if len(payload) != layout.size:
        raise VhostUserProtocolError(f"{what} payload of {len(payload)} bytes, not {layout.size}")
    return layout.unpack(payload)


def parse_u64(payload: bytes) -> int:
    """The single u64 of SET_FEATURES, SET_PROTOCOL_FEATURES, SET_STATUS, a
    REPLY_ACK, ... (SEND_RARP too: the MAC is in its first 6 bytes)."""
    (value,) = _exact(payload, U64, "u64")
    return value


def u64(value: int) -> bytes:
    return U64.pack(value)


@dataclass(frozen=True)
class VringState:
    """SET_VRING_NUM, SET_VRING_BASE, GET_VRING_BASE (request and reply),
    SET_VRING_ENABLE, SET_VRING_ENDIAN, VRING_KICK.

    For SET/GET_VRING_BASE `num` is the next available-ring index (split
    rings: low 16 bits; packed rings: bits 0-14 and the driver wrap counter
    in bit 15, the used index in bits 16-30 and its wrap counter in bit 31).
    """

    index: int
    num: int

    @classmethod
    def parse(cls, payload: bytes) -> VringState:
        return cls(*_exact(payload, VRING_STATE, "vring state"))

    def pack(self) -> bytes:
        return VRING_STATE.pack(self.index, self.num)


def parse_vring_state(payload: bytes) -> VringState:
    return VringState.parse(payload)


def vring_state(index: int, num: int) -> bytes:
    return VringState(index, num).pack()


@dataclass(frozen=True)
class VringAddr:
    """SET_VRING_ADDR.  The ring addresses are front-end virtual addresses
    (IOVAs with VIRTIO_F_IOMMU_PLATFORM); `log_guest_addr` is a guest
    physical address, used when `flags` has VHOST_VRING_F_LOG."""

    index: int
    flags: int
    desc_user_addr: int
    used_user_addr: int
    avail_user_addr: int
    log_guest_addr: int

    @property
    def log(self) -> bool:
        return bool(self.flags & VHOST_VRING_F_LOG)

    @classmethod
    def parse(cls, payload: bytes) -> VringAddr:
        return cls(*_exact(payload, VRING_ADDR, "vring address"))

    def pack(self) -> bytes:
        return VRING_ADDR.pack(self.index, self.flags, self.desc_user_addr, self.used_user_addr,
                               self.avail_user_addr, self.log_guest_addr)


def parse_vring_addr(payload: bytes) -> VringAddr:
    return VringAddr.parse(payload)


def vring_addr(index: int, desc_user_addr: int, used_user_addr: int, avail_user_addr: int,
               log_guest_addr: int = 0, flags: int = 0) -> bytes:
    return VringAddr(index, flags, desc_user_addr, used_user_addr, avail_user_addr, log_guest_addr).pack()


def parse_vring_fd(payload: bytes) -> tuple[int, bool]:
    """The u64 of SET_VRING_KICK / CALL / ERR: (ring index, whether an fd comes with it)."""
    value = parse_u64(payload)
    if value & ~(VHOST_USER_VRING_IDX_MASK | VHOST_USER_VRING_NOFD_MASK):
        # Nothing is defined there; a front end that sets those bits means
        # something this back end would silently get wrong.
        raise VhostUserProtocolError(f"vring fd word {value:#x} has bits above bit 8")
    return value & VHOST_USER_VRING_IDX_MASK, not value & VHOST_USER_VRING_NOFD_MASK


def parse_vring_file(message: Message) -> tuple[int, int | None]:
    """SET_VRING_KICK / CALL / ERR as a whole: (ring index, its fd or None),
    checking that an fd comes exactly when the NOFD bit says so."""
    index, has_fd = parse_vring_fd(message.payload)
    require_fds(message, 1 if has_fd else 0)
    return index, message.fds[0] if has_fd else None


def vring_fd(index: int, has_fd: bool = True) -> bytes:
    if not 0 <= index <= VHOST_USER_VRING_IDX_MASK:
        raise ValueError(f"ring index {index} does not fit in 8 bits")
    return u64(index | (0 if has_fd else VHOST_USER_VRING_NOFD_MASK))


@dataclass(frozen=True)
class MemoryRegion:
    """One region of guest memory: `memory_size` bytes at guest physical
    `guest_phys_addr`, which the front end sees at `userspace_addr`, found at
    `mmap_offset` in the region's fd."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    @classmethod
    def parse(cls, payload: bytes | memoryview) -> MemoryRegion:
        """One region, checked: not empty, and neither its guest nor its user
        range wraps 64 bits (the back end's address arithmetic relies on it).
        `mmap_offset` is left to the mapping, which checks it against the fd's size."""
        if len(payload) != MEMORY_REGION.size:
            raise VhostUserProtocolError(f"memory region of {len(payload)} bytes, not {MEMORY_REGION.size}")
        region = cls(*MEMORY_REGION.unpack(payload))
        if region.memory_size == 0:
            raise VhostUserProtocolError(f"memory region at guest {region.guest_phys_addr:#x} is empty")
        if region.guest_phys_addr + region.memory_size > _U64_END:
            raise VhostUserProtocolError(f"memory region {region.guest_phys_addr:#x}+{region.memory_size:#x} "
                                         "wraps the guest address space")
        if region.userspace_addr + region.memory_size > _U64_END:
            raise VhostUserProtocolError(f"memory region at user address {region.userspace_addr:#x}"
                                         f"+{region.memory_size:#x} wraps 64 bits")
        return region

    def pack(self) -> bytes:
        return MEMORY_REGION.pack(self.guest_phys_addr, self.memory_size, self.userspace_addr, self.mmap_offset)


def parse_memory_table(payload: bytes, fds: Sequence[int]) -> tuple[MemoryRegion, ...]:
    """SET_MEM_TABLE: its regions, in the order of the message's fds.

    The spec draws 8 region slots, but QEMU sends only the `nregions` it
    fills (8 + nregions * 32 bytes), so any whole number of slots from
    `nregions` to 8 is accepted and slots past `nregions` are ignored.  The
    message must carry exactly one fd per region.
    """
    if len(payload) < MEMORY_TABLE_HEADER.size:
        raise VhostUserProtocolError(f"memory table of {len(payload)} bytes, shorter than its 8-byte header")
    nregions, _padding = MEMORY_TABLE_HEADER.unpack_from(payload)
    if nregions > VHOST_MEMORY_BASELINE_NREGIONS:
        raise VhostUserProtocolError(f"memory table of {nregions} regions, over the "
                                     f"{VHOST_MEMORY_BASELINE_NREGIONS} it has room for")
    slots, partial = divmod(len(payload) - MEMORY_TABLE_HEADER.size, MEMORY_REGION.size)
    if partial or not nregions <= slots <= VHOST_MEMORY_BASELINE_NREGIONS:
        raise VhostUserProtocolError(f"memory table of {nregions} regions in a {len(payload)}-byte payload "
                                     f"(8 + 32 per region, {nregions} to {VHOST_MEMORY_BASELINE_NREGIONS} regions)")
    if len(fds) != nregions:
        raise VhostUserProtocolError(f"memory table of {nregions} regions came with {len(fds)} fds")
    view = memoryview(payload)
    return tuple(MemoryRegion.parse(view[start:start + MEMORY_REGION.size])
                 for start in range(MEMORY_TABLE_HEADER.size, MEMORY_TABLE_HEADER.size + nregions * MEMORY_REGION.size,
                                    MEMORY_REGION.size))


def memory_table(regions: Sequence[MemoryRegion], *, full: bool = False) -> bytes:
    """A SET_MEM_TABLE payload: QEMU's compact form, or with `full` all 8 slots
    (the spec's drawing); send one fd per region with it, in order."""
    if len(regions) > VHOST_MEMORY_BASELINE_NREGIONS:
        raise ValueError(f"{len(regions)} regions do not fit in a memory table")
    body = b"".join(region.pack() for region in regions)
    if full:
        body = body.ljust(VHOST_MEMORY_BASELINE_NREGIONS * MEMORY_REGION.size, b"\0")
    return MEMORY_TABLE_HEADER.pack(len(regions), 0) + body


def parse_single_region(payload: bytes) -> MemoryRegion:
    """ADD_MEM_REG (one fd, `require_fds(message, 1)`) and REM_MEM_REG (no fd;
    the spec lets a back end accept, and close unused, one): u64 padding, then
    a region.  REM_MEM_REG names its region by guest address, user address
    and size; its mmap offset means nothing."""
    if len(payload) != SINGLE_REGION_PADDING.size + MEMORY_REGION.size:
        raise VhostUserProtocolError(f"single memory region payload of {len(payload)} bytes, "
                                     f"not {SINGLE_REGION_PADDING.size + MEMORY_REGION.size}")
    return MemoryRegion.parse(memoryview(payload)[SINGLE_REGION_PADDING.size:])


def single_region(region: MemoryRegion) -> bytes:
    return SINGLE_REGION_PADDING.pack(0) + region.pack()


@dataclass(frozen=True)
class ConfigSpace:
    """GET_CONFIG (request and reply) and SET_CONFIG: `size` bytes of the
    virtio config space at `offset`.  In a GET_CONFIG request `data` is
    `size` placeholder bytes (QEMU sends zeros).  Whether offset + size fits
    the device's config space is the device's check."""

    offset: int
    size: int
    flags: int
    data: bytes

    @classmethod
    def parse(cls, payload: bytes) -> ConfigSpace:
        if len(payload) < CONFIG_HEADER.size:
            raise VhostUserProtocolError(f"config payload of {len(payload)} bytes, shorter than its "
                                         f"{CONFIG_HEADER.size}-byte header")
        offset, size, flags = CONFIG_HEADER.unpack_from(payload)
        if size > VHOST_USER_MAX_CONFIG_SIZE:
            raise VhostUserProtocolError(f"config access of {size} bytes, over {VHOST_USER_MAX_CONFIG_SIZE}")
        if len(payload) - CONFIG_HEADER.size != size:
            raise VhostUserProtocolError(f"config access of {size} bytes with {len(payload) - CONFIG_HEADER.size} "
                                         "bytes of data")
        return cls(offset, size, flags, bytes(payload[CONFIG_HEADER.size:]))

    def pack(self) -> bytes:
        return CONFIG_HEADER.pack(self.offset, self.size, self.flags) + self.data


def config(offset: int, size: int, flags: int = 0, data: bytes | None = None) -> bytes:
    """A config payload; without `data`, `size` zero bytes (a GET_CONFIG request)."""
    if data is None:
        data = bytes(size)
    if len(data) != size or size > VHOST_USER_MAX_CONFIG_SIZE:
        raise ValueError(f"config access of {size} bytes with {len(data)} bytes of data "
                         f"(at most {VHOST_USER_MAX_CONFIG_SIZE})")
    return ConfigSpace(offset, size, flags, data).pack()


def parse_config(payload: bytes) -> ConfigSpace:
    return ConfigSpace.parse(payload)


@dataclass(frozen=True)
class LogArea:
    """SET_LOG_BASE with LOG_SHMFD: the dirty log is `mmap_size` bytes at
    `mmap_offset` in the message's fd."""

    mmap_size: int
    mmap_offset: int

    @classmethod
    def parse(cls, payload: bytes) -> LogArea:
        return cls(*_exact(payload, LOG, "log description"))

    def pack(self) -> bytes:
        return LOG.pack(self.mmap_size, self.mmap_offset)


def parse_log(payload: bytes) -> LogArea:
    return LogArea.parse(payload)


@dataclass(frozen=True)
class Inflight:
    """GET_INFLIGHT_FD (request; the reply has the same layout and an fd) and
    SET_INFLIGHT_FD (with the fd back): the shared buffer that tracks
    in-flight descriptors across a back-end restart."""

    mmap_size: int
    mmap_offset: int
    num_queues: int
    queue_size: int

    @classmethod
    def parse(cls, payload: bytes) -> Inflight:
        return cls(*_exact(payload, INFLIGHT, "inflight description"))

    def pack(self) -> bytes:
        return INFLIGHT.pack(self.mmap_size, self.mmap_offset, self.num_queues, self.queue_size)


def parse_inflight(payload: bytes) -> Inflight:
    return Inflight.parse(payload)


def inflight_queue_size(queue_size: int) -> int:
    """Bytes of one queue's inflight region for a ring of `queue_size` descriptors."""
    size = INFLIGHT_HEADER_SIZE + INFLIGHT_DESC_SIZE * queue_size
    return (size + INFLIGHT_ALIGN - 1) // INFLIGHT_ALIGN * INFLIGHT_ALIGN


# -- message builders ------------------------------------------------------------------------


def _message(request: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes is over the {MAX_PAYLOAD}-byte limit")
    return HEADER.pack(request, flags, len(payload)) + payload


def build_request(request: int, payload: bytes = b"", need_reply: bool = False) -> bytes:
    """A front-end request (what a test harness playing QEMU sends)."""
    return _message(request, VERSION | (FLAG_NEED_REPLY if need_reply else 0), payload)


def build_reply(request: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """The back end's reply to `request`.  `flags` are ORed into VERSION |
    FLAG_REPLY; leave them 0 for QEMU, which refuses any other reply flags."""
    return _message(request, VERSION | FLAG_REPLY | flags, payload)


def reply_u64(request: int, value: int) -> bytes:
    """GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS, GET_STATUS, ..."""
    return build_reply(request, u64(value))


def reply_vring_state(index: int, num: int) -> bytes:
    """GET_VRING_BASE's reply (the ring is stopped by then)."""
    return build_reply(FrontendRequest.GET_VRING_BASE, vring_state(index, num))


def reply_config(offset: int, size: int, flags: int, data: bytes) -> bytes:
    """GET_CONFIG's reply: the request's offset, size and flags with `size` bytes of config space."""
    return build_reply(FrontendRequest.GET_CONFIG, config(offset, size, flags, data))


def reply_config_error() -> bytes:
    """GET_CONFIG failed: the spec's way to say so is an empty payload."""
    return build_reply(FrontendRequest.GET_CONFIG)


def reply_ack(request: int, ok: bool) -> bytes:
    """REPLY_ACK: u64 0 for success, nonzero (1) for failure."""
    return reply_u64(request, 0 if ok else 1)
