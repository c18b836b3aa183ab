"""vfio-user wire format and server-side connection state, sans-IO.

The byte layouts follow the vfio-user specification (QEMU's
docs/interop/vfio-user.rst); where QEMU 11.1 behaves differently from the
text, the comment says so.  Nothing here touches a socket, a file or a file
descriptor: file descriptors are plain integers handed in by the caller with
the bytes they arrived with, and handed back out attached to the message that
carried them.  Whoever receives a message owns its fds and must close the
ones it does not keep.
"""

from __future__ import annotations

import errno as E
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import NamedTuple, Union

# -- wire numbers -----------------------------------------------------------

# Spec "Header": every field is in the host's byte order.
HEADER = struct.Struct("=HHIII")  # id, command, size, flags, error
HEADER_SIZE = HEADER.size


class Command(IntEnum):
    """Spec "Commands"."""

    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13
    DIRTY_PAGES = 14
    REGION_WRITE_MULTI = 15
    DEVICE_FEATURE = 16
    MIG_DATA_READ = 17
    MIG_DATA_WRITE = 18


# Header flags: bits 0-3 are the message type.
TYPE_MASK = 0xF
TYPE_REQUEST = 0
TYPE_REPLY = 1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20
KNOWN_FLAGS = TYPE_MASK | FLAG_NO_REPLY | FLAG_ERROR


class DeviceFlags(IntFlag):
    """VFIO_DEVICE_FLAGS_* (linux/vfio.h)."""

    RESET = 1 << 0
    PCI = 1 << 1


class RegionFlags(IntFlag):
    """VFIO_REGION_INFO_FLAG_*."""

    READ = 1 << 0
    WRITE = 1 << 1
    MMAP = 1 << 2
    CAPS = 1 << 3


class IrqInfoFlags(IntFlag):
    """VFIO_IRQ_INFO_*."""

    EVENTFD = 1 << 0
    MASKABLE = 1 << 1
    AUTOMASKED = 1 << 2
    NORESIZE = 1 << 3


class IrqSetFlags(IntFlag):
    """VFIO_IRQ_SET_*: exactly one DATA_ and one ACTION_ bit per request."""

    DATA_NONE = 1 << 0
    DATA_BOOL = 1 << 1
    DATA_EVENTFD = 1 << 2
    ACTION_MASK = 1 << 3
    ACTION_UNMASK = 1 << 4
    ACTION_TRIGGER = 1 << 5


DATA_FLAGS = IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.DATA_EVENTFD
ACTION_FLAGS = IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_UNMASK | IrqSetFlags.ACTION_TRIGGER


class DmaMapFlags(IntFlag):
    READ = 1 << 0
    WRITE = 1 << 1


class DmaUnmapFlags(IntFlag):
    GET_DIRTY_BITMAP = 1 << 0
    ALL = 1 << 1


class PciRegion(IntEnum):
    """VFIO_PCI_*_REGION_INDEX."""

    BAR0 = 0
    BAR1 = 1
    BAR2 = 2
    BAR3 = 3
    BAR4 = 4
    BAR5 = 5
    ROM = 6
    CONFIG = 7
    VGA = 8


PCI_NUM_REGIONS = 9


class PciIrq(IntEnum):
    """VFIO_PCI_*_IRQ_INDEX."""

    INTX = 0
    MSI = 1
    MSIX = 2
    ERR = 3
    REQ = 4


PCI_NUM_IRQS = 5

SPARSE_MMAP_CAP_ID = 1  # VFIO_REGION_INFO_CAP_SPARSE_MMAP
SPARSE_MMAP_CAP_VERSION = 1

PAGE_SIZE = 4096
# Limits this server announces.  QEMU 11.1 refuses max_msg_fds above 16 and
# max_data_xfer_size above 64 MiB; 1 MiB matches what QEMU itself offers.
MAX_MSG_FDS = 16
MAX_DATA_XFER_SIZE = 1 << 20
MAX_DMA_MAPS = 65535
# The largest request payload: a REGION_WRITE's 16-byte prefix plus its data.
MAX_MESSAGE_SIZE = HEADER_SIZE + 16 + MAX_DATA_XFER_SIZE
# REGION_WRITE_MULTI: QEMU batches at most 200 writes of at most 8 bytes.
WRITE_MULTI_MAX = 200
WRITE_MULTI_DATA = 8

# -- payload layouts ---------------------------------------------------------

VERSION_PREFIX = struct.Struct("=HH")
DMA_MAP = struct.Struct("=IIQQQ")  # argsz flags offset addr size
DMA_UNMAP = struct.Struct("=IIQQ")  # argsz flags addr size
DEVICE_INFO = struct.Struct("=IIII")  # argsz flags num_regions num_irqs
REGION_INFO = struct.Struct("=IIIIQQ")  # argsz flags index cap_offset size offset
CAP_HEADER = struct.Struct("=HHI")  # id version next
SPARSE_MMAP_HEADER = struct.Struct("=II")  # nr_areas reserved
SPARSE_MMAP_AREA = struct.Struct("=QQ")  # offset size
IRQ_INFO = struct.Struct("=IIII")  # argsz flags index count
IRQ_SET = struct.Struct("=IIIII")  # argsz flags index start count
REGION_ACCESS = struct.Struct("=QII")  # offset region count
# QEMU 11.1 uses the spec's {u64 addr; u64 count} here, not protocol.h's
# {u64 offset; u32 count} (observed on the wire).
DMA_ACCESS = struct.Struct("=QQ")  # addr count
WRITE_MULTI_COUNT = struct.Struct("=Q")
WRITE_MULTI_ENTRY = struct.Struct("=QII8s")  # offset region count data[8]

U64_MAX = (1 << 64) - 1
_U64_END = 1 << 64

# -- errors -------------------------------------------------------------------


class VfioUserError(Exception):
    """Base of this module's errors; `errno` is what the peer is told."""

    errno: int = E.EINVAL

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        if errno is not None:
            self.errno = errno


class RequestError(VfioUserError):
    """A request that cannot be carried out; the connection goes on."""


class ProtocolError(VfioUserError):
    """The peer broke the framing or the handshake; the connection ends.

    `reply` holds the bytes of a last error reply to send before closing,
    when the broken message had a header sane enough to answer.
    """

    def __init__(self, message: str, errno: int = E.EINVAL, reply: bytes = b"",
                 fds: tuple[int, ...] = ()) -> None:
        super().__init__(message, errno)
        self.reply = reply
        self.fds = fds  # fds of the broken message, for the caller to close


# -- headers and framing --------------------------------------------------------


class Header(NamedTuple):
    id: int
    command: int
    size: int
    flags: int
    error: int

    @property
    def type(self) -> int:
        return self.flags & TYPE_MASK

    @property
    def no_reply(self) -> bool:
        return bool(self.flags & FLAG_NO_REPLY)

    def pack(self) -> bytes:
        return HEADER.pack(self.id, self.command, self.size, self.flags, self.error)


def build_message(msg_id: int, command: int, payload: bytes = b"", *, flags: int = TYPE_REQUEST) -> bytes:
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), flags, 0) + payload


def build_reply(msg_id: int, command: int, payload: bytes = b"") -> bytes:
    return HEADER.pack(msg_id, command, HEADER_SIZE + len(payload), TYPE_REPLY, 0) + payload


def build_error_reply(msg_id: int, command: int, errno: int) -> bytes:
    # An error reply is the header alone (QEMU's vfio_user_send_error).
    return HEADER.pack(msg_id, command, HEADER_SIZE, TYPE_REPLY | FLAG_ERROR, errno)


class Message(NamedTuple):
    """One whole message off the wire, with the fds that came with it."""

    header: Header
    payload: bytes
    fds: tuple[int, ...] = ()


class MessageReader:
    """Cuts a byte stream into messages.

    Which message do ancillary fds belong to?  Linux's stream recvmsg()
    glues earlier fd-less data onto a segment that carries fds but stops
    right after that segment, and the sender (QEMU) sends each message with
    one sendmsg().  So fds received with a chunk belong to the message that
    holds the chunk's last byte.
    """

    def __init__(self, max_message_size: int = MAX_MESSAGE_SIZE) -> None:
        self.max_message_size = max_message_size
        self._buffer = bytearray()
        self._fd_marks: list[tuple[int, list[int]]] = []  # (buffer index of a chunk's last byte, fds)
        self._eof = False

    def receive_data(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        """Add bytes (b"" means end of stream) and the fds received with them."""
        if not data:
            self._eof = True
            if fds:
                self._fd_marks.append((len(self._buffer), list(fds)))
            return
        self._buffer += data
        if fds:
            self._fd_marks.append((len(self._buffer) - 1, list(fds)))

    @property
    def eof(self) -> bool:
        return self._eof

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def take_fds(self) -> list[int]:
        """Every fd still held, for the caller to close when the connection ends."""
        fds = [fd for _, group in self._fd_marks for fd in group]
        self._fd_marks = []
        return fds

    def next_message(self) -> Message | None:
        """The next whole message, or None until more bytes arrive."""
        buf = self._buffer
        if len(buf) < HEADER_SIZE:
            if self._eof and buf:
                raise ProtocolError(f"stream ended inside a message header ({len(buf)} of 16 bytes)",
                                    fds=tuple(self.take_fds()))
            return None
        msg_id, command, size, flags, error = HEADER.unpack_from(buf)
        if size < HEADER_SIZE:
            raise ProtocolError(f"message size {size} is smaller than the 16-byte header",
                                fds=tuple(self.take_fds()))
        if size > self.max_message_size:
            reply = b"" if flags & TYPE_MASK else build_error_reply(msg_id, command, E.EINVAL)
            raise ProtocolError(
                f"message size {size} is over the limit of {self.max_message_size} bytes",
                reply=reply, fds=tuple(self.take_fds()))
        if len(buf) < size:
            if self._eof:
                raise ProtocolError(f"stream ended inside a message ({len(buf)} of {size} bytes)",
                                    fds=tuple(self.take_fds()))
            return None
        payload = bytes(buf[HEADER_SIZE:size])
        del buf[:size]
        fds: tuple[int, ...] = ()
        if self._fd_marks:
            fds = self._take_marks(size)
        return Message(Header(msg_id, command, size, flags, error), payload, fds)

    def _take_marks(self, size: int) -> tuple[int, ...]:
        mine: list[int] = []
        rest: list[tuple[int, list[int]]] = []
        for pos, group in self._fd_marks:
            if pos < size:
                mine.extend(group)
            else:
                rest.append((pos - size, group))
        self._fd_marks = rest
        return tuple(mine)


# -- requests -------------------------------------------------------------------


class Capabilities(NamedTuple):
    """The capabilities object of a VERSION message (spec "Version")."""

    max_msg_fds: int = 1
    max_data_xfer_size: int = MAX_DATA_XFER_SIZE
    pgsizes: int = PAGE_SIZE
    max_dma_maps: int = MAX_DMA_MAPS
    migration_pgsize: int | None = None
    write_multiple: bool = False
    twin_socket: bool = False


class Version(NamedTuple):
    major: int
    minor: int
    capabilities: Capabilities


class DmaMap(NamedTuple):
    flags: DmaMapFlags
    offset: int
    addr: int
    size: int


class DmaUnmap(NamedTuple):
    flags: DmaUnmapFlags
    addr: int
    size: int
    argsz: int


class DeviceGetInfo(NamedTuple):
    argsz: int


class GetRegionInfo(NamedTuple):
    argsz: int
    index: int  # type: ignore[assignment]  # a field named like a tuple method, as the spec names it


class GetIrqInfo(NamedTuple):
    argsz: int
    index: int  # type: ignore[assignment]  # a field named like a tuple method, as the spec names it


class SetIrqs(NamedTuple):
    flags: IrqSetFlags
    index: int  # type: ignore[assignment]  # a field named like a tuple method, as the spec names it
    start: int
    count: int  # type: ignore[assignment]  # a field named like a tuple method, as the spec names it
    bools: bytes = b""  # one byte per vector with DATA_BOOL

    @property
    def data(self) -> IrqSetFlags:
        return self.flags & DATA_FLAGS

    @property
    def action(self) -> IrqSetFlags:
        return self.flags & ACTION_FLAGS


class RegionRead(NamedTuple):
    region: int
    offset: int
    count: int  # type: ignore[assignment]  # a field named like a tuple method, as the spec names it


class RegionWrite(NamedTuple):
    region: int
    offset: int
    data: bytes


class RegionWriteMulti(NamedTuple):
    writes: tuple[RegionWrite, ...]


class DeviceReset(NamedTuple):
    pass


Body = Union[
    Version, DmaMap, DmaUnmap, DeviceGetInfo, GetRegionInfo, GetIrqInfo, SetIrqs,
    RegionRead, RegionWrite, RegionWriteMulti, DeviceReset,
]


class Request(NamedTuple):
    """A client request, parsed and checked against the wire rules.

    Checks that need the device (region and irq index ranges) are the
    backend's.  `fds` are the caller's to own from here on.
    """

    id: int
    command: Command
    body: Body
    no_reply: bool = False
    fds: tuple[int, ...] = ()
    size: int = 0


class Rejected(NamedTuple):
    """A request refused before it reached the device.

    Send `reply` (empty for a request that wants none), close `fds`.
    """

    id: int
    command: int
    errno: int
    reason: str
    reply: bytes
    fds: tuple[int, ...] = ()


class ServerReplyReceived(NamedTuple):
    """The client's answer to a request this server sent (DMA_READ/WRITE)."""

    id: int
    command: int
    error: int  # 0, or the errno the client reported
    payload: bytes
    fds: tuple[int, ...] = ()


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()
Event = Union[Request, Rejected, ServerReplyReceived, NeedData]


def _require(condition: bool, message: str, errno: int = E.EINVAL) -> None:
    if not condition:
        raise RequestError(message, errno)


def _parse_capabilities(raw: bytes) -> Capabilities:
    """Parse the NUL-terminated JSON after the VERSION numbers.

    No JSON at all means defaults (libvfio-user accepts it too).
    """
    if not raw:
        return Capabilities()
    _require(raw.endswith(b"\0"), "VERSION JSON is not NUL-terminated")
    text = raw[:-1]
    _require(b"\0" not in text, "VERSION JSON has an embedded NUL")
    if not text.strip():
        return Capabilities()
    try:
        doc = json.loads(text.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RequestError(f"VERSION JSON does not parse: {exc}") from None
    _require(isinstance(doc, dict), "VERSION JSON is not an object")
    caps = doc.get("capabilities", {})
    _require(isinstance(caps, dict), "VERSION 'capabilities' is not an object")

    def integer(name: str, default: int, lo: int, hi: int, source: dict[str, object] = caps) -> int:
        value = source.get(name, default)
        _require(type(value) is int, f"VERSION capability {name!r} is not an integer: {value!r}")
        assert isinstance(value, int)
        _require(lo <= value <= hi, f"VERSION capability {name!r}={value} is outside [{lo}, {hi}]")
        return value

    max_msg_fds = integer("max_msg_fds", 1, 0, 1 << 16)
    max_xfer = integer("max_data_xfer_size", MAX_DATA_XFER_SIZE, 1, 1 << 32)
    pgsizes = integer("pgsizes", PAGE_SIZE, 1, U64_MAX)
    _require(pgsizes & (PAGE_SIZE - 1) == 0, f"VERSION pgsizes={pgsizes:#x} has no 4 KiB multiple")
    max_dma_maps = integer("max_dma_maps", MAX_DMA_MAPS, 0, 1 << 32)
    migration_pgsize = None
    if "migration" in caps:
        migration = caps["migration"]
        _require(isinstance(migration, dict), "VERSION 'migration' is not an object")
        migration_pgsize = integer("pgsize", PAGE_SIZE, 1, U64_MAX, migration)
        _require(migration_pgsize % PAGE_SIZE == 0, "VERSION migration pgsize is not a 4 KiB multiple")
    flags = {}
    for name in ("write_multiple", "twin_socket"):
        value = caps.get(name, False)
        _require(isinstance(value, bool), f"VERSION capability {name!r} is not a boolean")
        flags[name] = value
    return Capabilities(
        max_msg_fds=max_msg_fds,
        max_data_xfer_size=max_xfer,
        pgsizes=pgsizes,
        max_dma_maps=max_dma_maps,
        migration_pgsize=migration_pgsize,
        write_multiple=flags["write_multiple"],
        twin_socket=flags["twin_socket"],
    )


def access_in_limits(offset: int, count: int, max_xfer: int) -> bool:
    """The range rule of a region access, the one every path that serves
    accesses applies: 1 to `max_xfer` bytes, none past the 64-bit space.
    The parsers of REGION_READ and REGION_WRITE and serve_access() call it;
    the native access loop (servers/vfio_user_fast.c, serve_one) mirrors it
    and serve_access()'s other checks, and the differential tests
    (tests/test_vfio_user_native.py) hold the two paths to the same replies."""
    return 0 < count <= max_xfer and offset + count <= _U64_END


def _check_range(offset: int, count: int, max_xfer: int) -> None:
    """Raise the RequestError that says how an access breaks access_in_limits()."""
    _require(count > 0, "access of 0 bytes")
    _require(count <= max_xfer, f"access of {count} bytes is over the limit of {max_xfer}", E.E2BIG)
    _require(offset + count - 1 <= U64_MAX, f"offset {offset:#x} + count {count} overflows 64 bits")


def _parse_version(payload: bytes, n: int, nfds: int, max_xfer: int) -> Body:
    _require(n >= VERSION_PREFIX.size, f"VERSION payload of {n} bytes is too short")
    major, minor = VERSION_PREFIX.unpack_from(payload)
    return Version(major, minor, _parse_capabilities(payload[VERSION_PREFIX.size:]))


def _parse_dma_map(payload: bytes, n: int, nfds: int, max_xfer: int) -> Body:
    _require(n >= DMA_MAP.size, f"DMA_MAP payload of {n} bytes is too short")
    argsz, flags, offset, addr, size = DMA_MAP.unpack_from(payload)
    _require(argsz == DMA_MAP.size, f"DMA_MAP argsz {argsz} is not {DMA_MAP.size}")
    _require(flags & ~int(DmaMapFlags.READ | DmaMapFlags.WRITE) == 0, f"DMA_MAP flags {flags:#x} unknown")
    _require(nfds <= 1, f"DMA_MAP carries {nfds} fds; at most 1")
    _require(size > 0, "DMA_MAP of size 0")
    _require(addr % PAGE_SIZE == 0 and size % PAGE_SIZE == 0,
             f"DMA_MAP addr {addr:#x} / size {size:#x} not page aligned")
    _require(addr + size - 1 <= U64_MAX, "DMA_MAP range wraps 64 bits")
    _require(offset + size - 1 <= U64_MAX, "DMA_MAP file offset wraps 64 bits")
    return DmaMap(DmaMapFlags(flags), offset, addr, size)


def _parse_dma_unmap(payload: bytes, n: int, nfds: int, max_xfer: int) -> Body:
    _require(n >= DMA_UNMAP.size, f"DMA_UNMAP payload of {n} bytes is too short")
    argsz, flags, addr, size = DMA_UNMAP.unpack_from(payload)
    _require(argsz >= DMA_UNMAP.size, f"DMA_UNMAP argsz {argsz} is too small")
    _require(flags & ~int(DmaUnmapFlags.ALL | DmaUnmapFlags.GET_DIRTY_BITMAP) == 0,
             f"DMA_UNMAP flags {flags:#x} unknown")
    _require(not flags & DmaUnmapFlags.GET_DIRTY_BITMAP, "dirty page tracking is not supported",
             E.ENOTSUP)
    if flags & DmaUnmapFlags.ALL:
        _require(addr == 0 and size == 0, "DMA_UNMAP of ALL with a nonzero range")
    else:
        _require(addr + size - 1 <= U64_MAX, "DMA_UNMAP range wraps 64 bits")
    return DmaUnmap(DmaUnmapFlags(flags), addr, size, argsz)


def _parse_device_get_info(payload: bytes, n: int, nfds: int, max_xfer: int) -> Body:
    _require(n >= DEVICE_INFO.size, f"DEVICE_GET_INFO payload of {n} bytes is too short")
    (argsz,) = struct.unpack_from("=I", payload)
    _require(argsz >= DEVICE_INFO.size, f"DEVICE_GET_INFO argsz {argsz} is too small")
    return DeviceGetInfo(argsz)


def _parse_device_get_region_info(payload: bytes, n: int, nfds: int, max_xfer: int) -> Body:
    _require(n >= REGION_INFO.size, f"GET_REGION_INFO payload of {n} bytes is too short")
    argsz, _flags, index, _cap, _size, _off = REGION_INFO.unpack_from(payload)
    _require(argsz >= REGION_INFO.size, f"GET_REGION_INFO argsz {argsz} is too small")
    return GetRegionInfo(argsz, index)


def _parse_device_get_irq_info(payload: bytes, n: int, nfds: int, max_xfer: int) -> Body:
    _require(n >= IRQ_INFO.size, f"GET_IRQ_INFO payload of {n} bytes is too short")
    argsz, _flags, index, _count = IRQ_INFO.unpack_from(payload)
    _require(argsz >= IRQ_INFO.size, f"GET_IRQ_INFO argsz {argsz} is too small")
    return GetIrqInfo(argsz, index)


def _parse_device_set_irqs(payload: bytes, n: int, nfds: int, max_xfer: int) -> Body:
    _require(n >= IRQ_SET.size, f"SET_IRQS payload of {n} bytes is too short")
    argsz, flags, index, start, count = IRQ_SET.unpack_from(payload)
    _require(argsz >= IRQ_SET.size, f"SET_IRQS argsz {argsz} is too small")
    _require(flags & ~int(DATA_FLAGS | ACTION_FLAGS) == 0, f"SET_IRQS flags {flags:#x} unknown")
    data, action = flags & DATA_FLAGS, flags & ACTION_FLAGS
    _require(bin(data).count("1") == 1, f"SET_IRQS flags {flags:#x}: need exactly one DATA_ flag")
    _require(bin(action).count("1") == 1, f"SET_IRQS flags {flags:#x}: need exactly one ACTION_ flag")
    _require(start + count <= 0xFFFFFFFF, "SET_IRQS start + count overflows")
    bools = b""
    if data == IrqSetFlags.DATA_EVENTFD:
        _require(nfds in (0, count), f"SET_IRQS with {nfds} fds for {count} vectors")
    else:
        _require(nfds == 0, "SET_IRQS carries fds without DATA_EVENTFD")
    if data == IrqSetFlags.DATA_BOOL:
        bools = payload[IRQ_SET.size:IRQ_SET.size + count]
        _require(len(bools) == count, f"SET_IRQS DATA_BOOL needs {count} bytes, has {len(bools)}")
    if count == 0:
        _require(data == IrqSetFlags.DATA_NONE and action == IrqSetFlags.ACTION_TRIGGER,
                 "SET_IRQS count 0 is only allowed to disable (DATA_NONE|ACTION_TRIGGER)")
        _require(start == 0, "SET_IRQS disable with start != 0")
    return SetIrqs(IrqSetFlags(flags), index, start, count, bools)


# The two parsers below are the hot path (every BAR and config access), so
# they test before they format a message.

def _parse_region_read(payload: bytes, n: int, nfds: int, max_xfer: int) -> Body:
    if n != REGION_ACCESS.size:
        raise RequestError(f"REGION_READ payload of {n} bytes; expected 16")
    offset, region, count = REGION_ACCESS.unpack_from(payload)
    if not access_in_limits(offset, count, max_xfer):
        _check_range(offset, count, max_xfer)
    return RegionRead(region, offset, count)


def _parse_region_write(payload: bytes, n: int, nfds: int, max_xfer: int) -> Body:
    if n < REGION_ACCESS.size:
        raise RequestError(f"REGION_WRITE payload of {n} bytes is too short")
    offset, region, count = REGION_ACCESS.unpack_from(payload)
    if not access_in_limits(offset, count, max_xfer):
        _check_range(offset, count, max_xfer)
    if n - REGION_ACCESS.size != count:
        raise RequestError(f"REGION_WRITE count {count} but {n - REGION_ACCESS.size} bytes of data")
    return RegionWrite(region, offset, payload[REGION_ACCESS.size:])


def _parse_region_write_multi(payload: bytes, n: int, nfds: int, max_xfer: int) -> Body:
    _require(n >= WRITE_MULTI_COUNT.size, "REGION_WRITE_MULTI payload is too short")
    (wr_cnt,) = WRITE_MULTI_COUNT.unpack_from(payload)
    _require(0 < wr_cnt <= WRITE_MULTI_MAX, f"REGION_WRITE_MULTI of {wr_cnt} writes")
    _require(n == WRITE_MULTI_COUNT.size + wr_cnt * WRITE_MULTI_ENTRY.size,
             f"REGION_WRITE_MULTI of {wr_cnt} writes in {n} bytes")
    writes = []
    for i in range(wr_cnt):
        offset, region, count, data = WRITE_MULTI_ENTRY.unpack_from(
            payload, WRITE_MULTI_COUNT.size + i * WRITE_MULTI_ENTRY.size)
        _require(0 < count <= WRITE_MULTI_DATA, f"REGION_WRITE_MULTI entry {i} count {count}")
        _check_range(offset, count, max_xfer)
        writes.append(RegionWrite(region, offset, data[:count]))
    return RegionWriteMulti(tuple(writes))


def _parse_device_reset(payload: bytes, n: int, nfds: int, max_xfer: int) -> Body:
    _require(n == 0, f"DEVICE_RESET carries {n} payload bytes")
    return DeviceReset()


_PARSERS = {
    Command.VERSION: _parse_version,
    Command.DMA_MAP: _parse_dma_map,
    Command.DMA_UNMAP: _parse_dma_unmap,
    Command.DEVICE_GET_INFO: _parse_device_get_info,
    Command.DEVICE_GET_REGION_INFO: _parse_device_get_region_info,
    Command.DEVICE_GET_IRQ_INFO: _parse_device_get_irq_info,
    Command.DEVICE_SET_IRQS: _parse_device_set_irqs,
    Command.REGION_READ: _parse_region_read,
    Command.REGION_WRITE: _parse_region_write,
    Command.REGION_WRITE_MULTI: _parse_region_write_multi,
    Command.DEVICE_RESET: _parse_device_reset,
}


def parse_body(command: Command, payload: bytes, nfds: int, max_xfer: int = MAX_DATA_XFER_SIZE) -> Body:
    """Decode and check one request payload; raises RequestError."""
    if nfds and command is not Command.DMA_MAP and command is not Command.DEVICE_SET_IRQS:
        raise RequestError(f"{command.name} carries {nfds} fds but takes none")
    parser = _PARSERS.get(command)
    if parser is None:
        raise RequestError(f"{command.name} is not supported by this server", E.ENOSYS)
    return parser(payload, len(payload), nfds, max_xfer)


# -- reply payloads --------------------------------------------------------------


def version_reply_payload(caps: Capabilities) -> bytes:
    # Compact JSON: QEMU refuses a reply larger than its 214-byte request.
    doc: dict[str, object] = {
        "max_msg_fds": caps.max_msg_fds,
        "max_data_xfer_size": caps.max_data_xfer_size,
        "pgsizes": caps.pgsizes,
        "max_dma_maps": caps.max_dma_maps,
    }
    if caps.write_multiple:
        doc["write_multiple"] = True
    text = json.dumps({"capabilities": doc}, separators=(",", ":")).encode()
    return VERSION_PREFIX.pack(0, 0) + text + b"\0"


def device_info_payload(flags: DeviceFlags, num_regions: int, num_irqs: int) -> bytes:
    return DEVICE_INFO.pack(DEVICE_INFO.size, int(flags), num_regions, num_irqs)


def region_info_payload(
    argsz: int, index: int, flags: RegionFlags, size: int, offset: int = 0,
    sparse_areas: tuple[tuple[int, int], ...] = (),
) -> bytes:
    """A GET_REGION_INFO reply payload, cut to what the client's argsz holds.

    argsz in the reply is the full size, so a client that offered too small
    a buffer asks again with a larger one (QEMU does).
    """
    caps = b""
    cap_offset = 0
    if sparse_areas:
        flags |= RegionFlags.CAPS
        cap_offset = REGION_INFO.size
        caps = CAP_HEADER.pack(SPARSE_MMAP_CAP_ID, SPARSE_MMAP_CAP_VERSION, 0)
        caps += SPARSE_MMAP_HEADER.pack(len(sparse_areas), 0)
        caps += b"".join(SPARSE_MMAP_AREA.pack(o, s) for o, s in sparse_areas)
    full = REGION_INFO.size + len(caps)
    body = REGION_INFO.pack(full, int(flags), index, cap_offset, size, offset) + caps
    return body[:max(argsz, REGION_INFO.size)]


@dataclass(frozen=True)
class RegionInfo:
    """A GET_REGION_INFO reply as a client reads it: the fixed part and, when
    FLAG_CAPS is set, the sparse-mmap areas from its capability chain
    (VFIO_REGION_INFO_CAP_SPARSE_MMAP; other capabilities are skipped)."""

    argsz: int
    flags: RegionFlags
    index: int
    size: int
    offset: int
    sparse_areas: tuple[tuple[int, int], ...] = ()

    @classmethod
    def unpack(cls, payload: bytes) -> RegionInfo:
        """Parse a reply payload; ProtocolError if it is short or its chain is broken
        (a reply cut to a small argsz has no chain to read: FLAG_CAPS with argsz
        beyond the payload gives the fixed part alone)."""
        if len(payload) < REGION_INFO.size:
            raise ProtocolError(f"GET_REGION_INFO reply of {len(payload)} bytes is too short")
        argsz, raw_flags, index, cap_offset, size, offset = REGION_INFO.unpack_from(payload)
        flags = RegionFlags(raw_flags)
        areas: list[tuple[int, int]] = []
        if flags & RegionFlags.CAPS and argsz <= len(payload):
            seen: set[int] = set()
            at = cap_offset
            while at:
                if at in seen or at < REGION_INFO.size or at + CAP_HEADER.size > len(payload):
                    raise ProtocolError(f"region {index}: capability at {at} is outside the reply or loops")
                seen.add(at)
                cap_id, version, next_at = CAP_HEADER.unpack_from(payload, at)
                if cap_id == SPARSE_MMAP_CAP_ID:
                    body = at + CAP_HEADER.size
                    if version != SPARSE_MMAP_CAP_VERSION or body + SPARSE_MMAP_HEADER.size > len(payload):
                        raise ProtocolError(f"region {index}: sparse-mmap capability version {version} or short")
                    (count, _reserved) = SPARSE_MMAP_HEADER.unpack_from(payload, body)
                    first = body + SPARSE_MMAP_HEADER.size
                    if first + count * SPARSE_MMAP_AREA.size > len(payload):
                        raise ProtocolError(f"region {index}: {count} sparse-mmap areas do not fit the reply")
                    areas += [SPARSE_MMAP_AREA.unpack_from(payload, first + n * SPARSE_MMAP_AREA.size)
                              for n in range(count)]
                at = next_at
        return cls(argsz, flags, index, size, offset, tuple(areas))


def irq_info_payload(index: int, flags: IrqInfoFlags, count: int) -> bytes:
    return IRQ_INFO.pack(IRQ_INFO.size, int(flags), index, count)



# A header and a region access prefix: id, command, size, flags, error,
# offset, region, count (serve_access()'s failed_access).
_ACCESS_MESSAGE = struct.Struct("=HHIIIQII")
_ACCESS_PACK = _ACCESS_MESSAGE.pack
_ACCESS_UNPACK = _ACCESS_MESSAGE.unpack_from
AccessTuple = tuple[int, int, int, int, int, int, int, int]
# Plain ints: reading an enum member costs a hundred nanoseconds or more.
_REGION_READ = int(Command.REGION_READ)
_REGION_WRITE = int(Command.REGION_WRITE)


def build_region_read_reply(msg_id: int, req: RegionRead, data: bytes) -> bytes:
    """A whole REGION_READ reply in one pack (the hottest reply there is)."""
    return _ACCESS_PACK(msg_id, _REGION_READ, 32 + len(data), TYPE_REPLY, 0, req.offset, req.region,
                        len(data)) + data


def region_write_reply_payload(req: RegionWrite) -> bytes:
    return REGION_ACCESS.pack(req.offset, req.region, len(req.data))


# -- the server side of one connection ---------------------------------------------


_COMMANDS = {int(c): c for c in Command}
_NOT_NO_REPLY = ~FLAG_NO_REPLY
_HOT_PARSERS = {int(Command.REGION_READ): _parse_region_read, int(Command.REGION_WRITE): _parse_region_write}


class State(IntEnum):
    AWAIT_VERSION = 0
    READY = 1
    CLOSED = 2


_READY = State.READY


@dataclass
class ServerConnection:
    """Protocol state of one client connection, as seen by the server.

    Feed it bytes with receive_data(); take events with next_event().
    Region accesses may be served before that with serve_access().  The
    first request must be VERSION.  Requests are handed out in order; the
    caller answers each (unless no_reply) with reply() or error_reply().
    Requests the server itself sends (DMA_READ/WRITE) share the socket,
    so replies to them arrive mixed in with client requests.
    """

    server_caps: Capabilities = field(default_factory=lambda: Capabilities(max_msg_fds=MAX_MSG_FDS))
    reader: MessageReader = field(default_factory=MessageReader)
    state: State = State.AWAIT_VERSION
    client_caps: Capabilities = field(default_factory=Capabilities)
    _next_server_id: int = 0
    _pending_server: dict[int, Command] = field(default_factory=dict)
    # Set by serve_access().
    access_end: int = 0
    failed_access: AccessTuple | None = None

    def __post_init__(self) -> None:
        self._max_xfer = self.server_caps.max_data_xfer_size

    def receive_data(self, data: bytes, fds: tuple[int, ...] | list[int] = ()) -> None:
        self.reader.receive_data(data, fds)

    def next_event(self) -> Event:
        if self.state is State.CLOSED:
            raise ProtocolError("connection is closed")
        try:
            msg = self.reader.next_message()
        except ProtocolError:
            self.state = State.CLOSED
            raise
        if msg is None:
            return NEED_DATA
        hdr = msg.header
        if hdr.flags & ~FLAG_NO_REPLY == TYPE_REQUEST and not msg.fds and self.state is State.READY:
            # Fast path for region accesses, the bulk of all traffic.
            parser = _HOT_PARSERS.get(hdr.command)
            if parser is not None:
                try:
                    body = parser(msg.payload, len(msg.payload), 0, self.server_caps.max_data_xfer_size)
                except RequestError as exc:
                    return self._reject(msg, exc.errno, str(exc))
                return Request(hdr.id, _COMMANDS[hdr.command], body, hdr.flags == FLAG_NO_REPLY, (), hdr.size)
        if hdr.flags & ~KNOWN_FLAGS or hdr.type not in (TYPE_REQUEST, TYPE_REPLY):
            self.state = State.CLOSED
            raise ProtocolError(f"message {hdr.id} has unknown header flags {hdr.flags:#x}", fds=msg.fds)
        if len(msg.fds) > self.server_caps.max_msg_fds:
            return self._reject(msg, E.EINVAL,
                                f"message carries {len(msg.fds)} fds; at most {self.server_caps.max_msg_fds}")
        if hdr.type == TYPE_REPLY:
            return self._server_reply(msg)
        command = _COMMANDS.get(hdr.command)
        if self.state is State.AWAIT_VERSION and command is not Command.VERSION:
            self.state = State.CLOSED
            raise ProtocolError(
                f"first message is command {hdr.command}, not VERSION",
                reply=build_error_reply(hdr.id, hdr.command, E.EINVAL), fds=msg.fds)
        if command is None:
            return self._reject(msg, E.ENOSYS, f"unknown command {hdr.command}")
        if self.state is State.READY and command is Command.VERSION:
            return self._reject(msg, E.EINVAL, "VERSION sent twice")
        if command in (Command.DMA_READ, Command.DMA_WRITE):
            return self._reject(msg, E.EINVAL, f"{command.name} is a server-to-client request")
        try:
            body = parse_body(command, msg.payload, len(msg.fds), self.server_caps.max_data_xfer_size)
        except RequestError as exc:
            if command is Command.VERSION:
                self.state = State.CLOSED
                raise ProtocolError(str(exc), exc.errno,
                                    reply=build_error_reply(hdr.id, hdr.command, exc.errno),
                                    fds=msg.fds) from None
            return self._reject(msg, exc.errno, str(exc))
        if isinstance(body, Version):
            if body.major != 0:
                self.state = State.CLOSED
                raise ProtocolError(
                    f"client speaks vfio-user {body.major}.{body.minor}; this server speaks 0.0",
                    E.ENOTSUP, reply=build_error_reply(hdr.id, hdr.command, E.ENOTSUP), fds=msg.fds)
            self.client_caps = body.capabilities
            self.state = State.READY
        return Request(hdr.id, command, body, hdr.no_reply, msg.fds, hdr.size)

    def serve_access(self, buffer: bytes | bytearray | memoryview, pos: int, end: int,
                     read: Callable[[int, int, int], bytes],
                     write: Callable[[int, int, bytes], None]) -> bytes | None:
        """Fast path for the bulk of all traffic: one region access.

        When `buffer[pos:end]` starts with a whole, well-formed REGION_READ
        or REGION_WRITE request, nothing is buffered in the reader, and no
        fds came with these bytes (the caller's part), carry it out with
        `read(region, offset, count) -> bytes` or `write(region, offset,
        data)` and return the reply (b"" for NO_REPLY); `access_end` is then
        where the message ended in `buffer`.  Otherwise return None having
        consumed nothing, and the caller hands the bytes from `pos` on to
        receive_data(); that general path also produces the errors for
        malformed accesses.  Every check the general path makes on an access
        is made here too.

        An exception from `read` or `write` passes through; the access's
        header and prefix numbers `(id, command, size, flags, error, offset,
        region, count)` are then in `failed_access` for the caller's error
        reply, and `access_end` is set.  One call per message, parsing,
        calling the device and packing the reply: on one CPU every Python
        call on this path is a visible share of a round trip.
        """
        if end - pos < 32 or self.state is not _READY or self.reader._buffer:
            return None
        access = _ACCESS_UNPACK(buffer, pos)
        msg_id, command, size, flags, _error, offset, region, count = access
        if flags & _NOT_NO_REPLY or not access_in_limits(offset, count, self._max_xfer):
            return None
        if command == _REGION_READ:
            if size != 32:
                return None
            self.access_end = pos + 32
            try:
                data = read(region, offset, count)
            except BaseException:
                self.failed_access = access
                raise
            if flags:
                return b""
            count = len(data)
            return _ACCESS_PACK(msg_id, _REGION_READ, 32 + count, TYPE_REPLY, 0, offset, region, count) + data
        if command != _REGION_WRITE or size != 32 + count or pos + size > end:
            return None
        self.access_end = pos + size
        try:
            write(region, offset, bytes(buffer[pos + 32:pos + size]))
        except BaseException:
            self.failed_access = access
            raise
        return b"" if flags else _ACCESS_PACK(msg_id, _REGION_WRITE, 32, TYPE_REPLY, 0, offset, region, count)

    def version_reply(self, request: Request) -> bytes:
        return build_reply(request.id, Command.VERSION, version_reply_payload(self.server_caps))

    def reply(self, request: Request, payload: bytes = b"") -> bytes:
        """Bytes answering `request`; b"" for a request that wants no reply."""
        if request.no_reply:
            return b""
        return build_reply(request.id, request.command, payload)

    def error_reply(self, request: Request, errno: int) -> bytes:
        if request.no_reply:
            return b""
        return build_error_reply(request.id, request.command, errno)

    # Server-initiated requests: DMA_READ / DMA_WRITE.

    def dma_read_request(self, addr: int, count: int) -> tuple[int, bytes]:
        self._check_dma(addr, count)
        return self._server_request(Command.DMA_READ, DMA_ACCESS.pack(addr, count))

    def dma_write_request(self, addr: int, data: bytes) -> tuple[int, bytes]:
        self._check_dma(addr, len(data))
        return self._server_request(Command.DMA_WRITE, DMA_ACCESS.pack(addr, len(data)) + data)

    def _check_dma(self, addr: int, count: int) -> None:
        if self.state is not State.READY:
            raise RequestError("no client is connected", E.ENOTCONN)
        limit = self.client_caps.max_data_xfer_size
        if not 0 < count <= limit:
            raise RequestError(f"DMA of {count} bytes; the client takes 1..{limit}", E.E2BIG)
        if addr + count - 1 > U64_MAX:
            raise RequestError("DMA range wraps 64 bits")

    def _server_request(self, command: Command, payload: bytes) -> tuple[int, bytes]:
        msg_id = self._next_server_id
        while msg_id in self._pending_server:
            msg_id = (msg_id + 1) & 0xFFFF
        self._next_server_id = (msg_id + 1) & 0xFFFF
        self._pending_server[msg_id] = command
        return msg_id, build_message(msg_id, command, payload)

    def forget_server_request(self, msg_id: int) -> None:
        """Stop waiting for a reply (the caller timed out)."""
        self._pending_server.pop(msg_id, None)

    def _server_reply(self, msg: Message) -> Event:
        hdr = msg.header
        command = self._pending_server.pop(hdr.id, None)
        if command is None or command != hdr.command:
            if command is not None:
                self._pending_server[hdr.id] = command
            # Never answer a reply: drop it and say so.
            return Rejected(hdr.id, hdr.command, E.EINVAL,
                            f"reply {hdr.id} (command {hdr.command}) matches no request of ours",
                            b"", msg.fds)
        error = hdr.error if hdr.flags & FLAG_ERROR else 0
        return ServerReplyReceived(hdr.id, command, error, msg.payload, msg.fds)

    def _reject(self, msg: Message, errno: int, reason: str) -> Rejected:
        hdr = msg.header
        reply = b"" if hdr.no_reply else build_error_reply(hdr.id, hdr.command, errno)
        return Rejected(hdr.id, hdr.command, errno, reason, reply, msg.fds)


def parse_dma_read_reply(payload: bytes, count: int) -> bytes:
    """The data of a DMA_READ reply: {addr, count, data}."""
    if len(payload) != DMA_ACCESS.size + count:
        raise RequestError(f"DMA_READ reply of {len(payload)} bytes for {count} requested", E.EIO)
    return payload[DMA_ACCESS.size:]
