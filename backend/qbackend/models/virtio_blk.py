"""The virtio-blk request layer (virtio 1.x, "Block Device"): feature bits,
the configuration space, and requests parsed from descriptor chains and
carried out against a block target.  Pure: the target does the I/O.

Values are the spec's (device-types/blk/description.tex) and QEMU's
include/standard-headers/linux/virtio_blk.h, which agree.

A request is a 16-byte header (type, reserved/ioprio, sector) in the
device-readable part, data, and a status byte, the last byte of the
device-writable part; the spec fixes no framing, so the header may be
split across descriptors and data may share a descriptor with either.

Who answers what:

- `parse_request` never raises for a request the device can answer: a
  short header, data in the wrong direction, a length that is not whole
  sectors, a range past the capacity, a write to a read-only disk give a
  request marked IOERR; an unknown type, unknown discard/write-zeroes
  flags, UNMAP on a discard, more segments than offered give UNSUPP.
  QEMU's virtio-blk turns a short header into virtio_error() (the device
  needs a reset); answering IOERR is kinder and just as safe, because the
  status byte is found without the header.
- A chain with no device-writable byte at all has nowhere for a status:
  `MissingStatus`, a `QueueBroken`, so the server treats it as it treats a
  broken ring (DEVICE_NEEDS_RESET).  Pushing it back with written=0 would
  return the descriptors, but the driver would then read a status byte the
  device never wrote, and a stale 0 reads as success.
- `execute` runs a request against a `BlockTarget` (an NBD `Export` fits
  as it is), writes the status byte and returns (status, written) for the
  used ring.  An OSError or QbackendError from the target is IOERR.

`written` counts the bytes of the writable part the device filled: the data
read (IN, GET_ID) plus the status byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace
from enum import IntEnum
from typing import Protocol

from qbackend.errors import ModelError, QbackendError
from qbackend.models.virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    Chain,
    QueueBroken,
)

DEVICE_ID = 2  # "Device ID" of the block device
SECTOR_SIZE = 512  # the unit of capacity and of `sector`, whatever blk_size says
SECTOR_SHIFT = 9
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES: a NUL-padded ASCII string, unterminated at 20 bytes
HEADER_SIZE = 16
SEGMENT_SIZE = 16  # struct virtio_blk_discard_write_zeroes
WRITE_ZEROES_FLAG_UNMAP = 1 << 0


class RequestType(IntEnum):
    IN = 0
    OUT = 1
    FLUSH = 4
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class Status(IntEnum):
    OK = 0
    IOERR = 1
    UNSUPP = 2


class Feature(IntEnum):
    """VIRTIO_BLK_F_* bit numbers."""

    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    FLUSH = 9  # called WCE in the legacy interface
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17


# struct virtio_blk_config: name -> (offset, size).  Through unused1 it is 60
# bytes; secure erase (60..72) and the zoned characteristics (72..96) follow.
CONFIG_LAYOUT: dict[str, tuple[int, int]] = {
    "capacity": (0, 8),
    "size_max": (8, 4),
    "seg_max": (12, 4),
    "cylinders": (16, 2),
    "heads": (18, 1),
    "sectors": (19, 1),
    "blk_size": (20, 4),
    "physical_block_exp": (24, 1),
    "alignment_offset": (25, 1),
    "min_io_size": (26, 2),
    "opt_io_size": (28, 4),
    "writeback": (32, 1),
    "num_queues": (34, 2),
    "max_discard_sectors": (36, 4),
    "max_discard_seg": (40, 4),
    "discard_sector_alignment": (44, 4),
    "max_write_zeroes_sectors": (48, 4),
    "max_write_zeroes_seg": (52, 4),
    "write_zeroes_may_unmap": (56, 1),
    "max_secure_erase_sectors": (60, 4),
    "max_secure_erase_seg": (64, 4),
    "secure_erase_sector_alignment": (68, 4),
    "zoned": (72, 24),
}
CONFIG_SIZE = 60
CONFIG_MAX_SIZE = 96  # sizeof(struct virtio_blk_config) with secure erase and zoned
_CONFIG = struct.Struct("<QIIHBBIBBHIBxHIIIIIB3x")  # the first 60 bytes; x: unused0, unused1[3]
_HEADER = struct.Struct("<IIQ")
_SEGMENT = struct.Struct("<QII")

_U8, _U16, _U32, _U64 = 0xFF, 0xFFFF, 0xFFFFFFFF, (1 << 64) - 1


# Plain ints for the per-request comparisons (an enum member is a class attribute lookup each time).
_IN, _OUT, _FLUSH, _GET_ID, _DISCARD, _WRITE_ZEROES = (int(t) for t in (
    RequestType.IN, RequestType.OUT, RequestType.FLUSH, RequestType.GET_ID, RequestType.DISCARD,
    RequestType.WRITE_ZEROES))


class VirtioBlkError(ModelError):
    """A block device configuration that cannot be expressed in config space."""


class MissingStatus(QueueBroken):
    """A request chain without a single device-writable byte: nowhere to answer."""

    def __init__(self, head: int) -> None:
        super().__init__(f"descriptor chain {head} has no device-writable byte for the status")
        self.head = head


# -- configuration ------------------------------------------------------------------


@dataclass(frozen=True)
class BlkConfig:
    """What the device offers: its config space fields and the features they imply.

    A zero limit means the feature is not offered (size_max, seg_max,
    geometry by cylinders, discard and write zeroes by their sector and
    segment limits); `readonly` offers VIRTIO_BLK_F_RO, `config_wce` lets
    the driver switch `writeback`.  `writeback` is the value after reset: if
    the driver takes CONFIG_WCE without FLUSH the spec wants it 0, which the
    server applies at FEATURES_OK (dataclasses.replace).
    """

    capacity: int  # in 512-byte sectors
    size_max: int = 0
    seg_max: int = 0
    cylinders: int = 0
    heads: int = 0
    sectors: int = 0
    blk_size: int = SECTOR_SIZE
    physical_block_exp: int = 0
    alignment_offset: int = 0
    min_io_size: int = 0
    opt_io_size: int = 0
    writeback: bool = True
    num_queues: int = 1
    max_discard_sectors: int = 0
    max_discard_seg: int = 0
    discard_sector_alignment: int = 0
    max_write_zeroes_sectors: int = 0
    max_write_zeroes_seg: int = 0
    write_zeroes_may_unmap: bool = False
    readonly: bool = False
    config_wce: bool = False

    def __post_init__(self) -> None:
        widths = {"capacity": _U64, "size_max": _U32, "seg_max": _U32, "cylinders": _U16, "heads": _U8,
                  "sectors": _U8, "blk_size": _U32, "physical_block_exp": _U8, "alignment_offset": _U8,
                  "min_io_size": _U16, "opt_io_size": _U32, "num_queues": _U16, "max_discard_sectors": _U32,
                  "max_discard_seg": _U32, "discard_sector_alignment": _U32, "max_write_zeroes_sectors": _U32,
                  "max_write_zeroes_seg": _U32}
        for name, limit in widths.items():
            value = getattr(self, name)
            if not 0 <= value <= limit:
                raise VirtioBlkError(f"virtio-blk {name} {value} does not fit its {limit.bit_length()}-bit field")
        if self.blk_size < SECTOR_SIZE or self.blk_size & (self.blk_size - 1):
            raise VirtioBlkError(f"virtio-blk blk_size {self.blk_size} is not a power of two >= {SECTOR_SIZE}")
        if self.num_queues < 1:
            raise VirtioBlkError("virtio-blk needs at least one queue")

    @property
    def discard(self) -> bool:
        return bool(self.max_discard_sectors and self.max_discard_seg)

    @property
    def write_zeroes(self) -> bool:
        return bool(self.max_write_zeroes_sectors and self.max_write_zeroes_seg)

    def features(self) -> int:
        """The device's feature bits: virtio-blk's, VERSION_1 and the ring features
        `SplitVirtqueue` implements.  (vhost-user's own bit 30 is the server's.)"""
        bits = [VIRTIO_F_VERSION_1, VIRTIO_F_INDIRECT_DESC, VIRTIO_F_EVENT_IDX,
                # FLUSH: the spec says a device SHOULD always offer it.
                Feature.BLK_SIZE, Feature.FLUSH, Feature.TOPOLOGY]
        bits += [bit for bit, on in ((Feature.SIZE_MAX, self.size_max), (Feature.SEG_MAX, self.seg_max),
                                     (Feature.GEOMETRY, self.cylinders), (Feature.RO, self.readonly),
                                     (Feature.CONFIG_WCE, self.config_wce), (Feature.MQ, self.num_queues > 1),
                                     (Feature.DISCARD, self.discard), (Feature.WRITE_ZEROES, self.write_zeroes))
                 if on]
        out = 0
        for bit in bits:
            out |= 1 << bit
        return out


def config_bytes(config: BlkConfig, size: int = CONFIG_SIZE) -> bytes:
    """The config space, `size` bytes of it: vhost-user's GET_CONFIG asks for the
    front end's config length (QEMU's virtio_blk_cfg_size_params: 36, then to
    the end of the discard fields 48, of write zeroes 57, of secure erase 72,
    zoned 96, by the features enabled).  Past the 60 bytes modelled here, zeros."""
    if not 0 <= size <= CONFIG_MAX_SIZE:
        raise VirtioBlkError(f"virtio-blk config space is at most {CONFIG_MAX_SIZE} bytes, not {size}")
    c = config
    data = _CONFIG.pack(c.capacity, c.size_max, c.seg_max, c.cylinders, c.heads, c.sectors, c.blk_size,
                        c.physical_block_exp, c.alignment_offset, c.min_io_size, c.opt_io_size, int(c.writeback),
                        c.num_queues, c.max_discard_sectors, c.max_discard_seg, c.discard_sector_alignment,
                        c.max_write_zeroes_sectors, c.max_write_zeroes_seg, int(c.write_zeroes_may_unmap))
    return data[:size].ljust(size, b"\0")


def config_write(config: BlkConfig, offset: int, data: bytes) -> BlkConfig:
    """A driver's write to config space (vhost-user SET_CONFIG): only `writeback`
    is writable, and only with VIRTIO_BLK_F_CONFIG_WCE offered; the rest is ignored."""
    wce = CONFIG_LAYOUT["writeback"][0]
    if config.config_wce and offset <= wce < offset + len(data):
        return replace(config, writeback=bool(data[wce - offset]))
    return config


def cache_writethrough(negotiated: int, config: BlkConfig) -> bool:
    """Whether a write must be stable before it completes (its `fua`), by the
    spec's rules: writethrough if CONFIG_WCE was negotiated and writeback is 0,
    or if neither CONFIG_WCE nor FLUSH was (FLUSH being offered)."""
    if negotiated >> Feature.CONFIG_WCE & 1:
        return not config.writeback
    return not negotiated >> Feature.FLUSH & 1


# -- requests ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """One range of a DISCARD or WRITE_ZEROES request."""

    sector: int
    num_sectors: int
    flags: int

    @property
    def offset(self) -> int:
        return self.sector << SECTOR_SHIFT

    @property
    def length(self) -> int:
        return self.num_sectors << SECTOR_SHIFT

    @property
    def unmap(self) -> bool:
        return bool(self.flags & WRITE_ZEROES_FLAG_UNMAP)


@dataclass(frozen=True, eq=False)
class BlkRequest:
    """A parsed request.  `status` None: carry it out; otherwise answer with it
    (`reason` says why).  `data` is the device-writable data for IN and GET_ID,
    the device-readable data for OUT, DISCARD and WRITE_ZEROES; `type` is -1
    when the header was missing."""

    head: int
    type: int
    sector: int
    ioprio: int
    data: tuple[memoryview, ...]
    status_byte: memoryview
    status: Status | None = None
    reason: str = ""
    segments: tuple[Segment, ...] = ()

    @property
    def offset(self) -> int:
        return self.sector << SECTOR_SHIFT

    @property
    def data_len(self) -> int:
        return sum(v.nbytes for v in self.data)


def _skip(views: tuple[memoryview, ...], n: int) -> tuple[memoryview, ...]:
    """The views after their first n bytes."""
    for i, view in enumerate(views):
        if n < view.nbytes:
            return (view[n:], *views[i + 1:]) if n else views[i:]
        n -= view.nbytes
    return ()


def _in_range(sector: int, count: int, capacity: int) -> bool:
    return sector <= capacity and count <= capacity - sector


class _Refused(Exception):
    """Inside parse_request: the request is answered with `status` without I/O."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def parse_request(chain: Chain, config: BlkConfig) -> BlkRequest:
    """The request a chain carries, checked against what the device offers;
    MissingStatus if it has no device-writable byte."""
    writable = chain.writable
    if not writable or not writable[-1].nbytes:  # pop() gives no empty views; a hand-made Chain might
        writable = tuple(v for v in writable if v.nbytes)
        if not writable:
            raise MissingStatus(chain.head)
    last = writable[-1]
    status_byte = last[-1:]
    in_data = writable[:-1] + ((last[:-1],) if last.nbytes > 1 else ())
    readable = chain.readable
    if readable and readable[0].nbytes >= HEADER_SIZE:
        type_, ioprio, sector = _HEADER.unpack_from(readable[0])
    else:
        header = b"".join(readable)[:HEADER_SIZE]  # a split header: a few small views
        if len(header) < HEADER_SIZE:
            return BlkRequest(chain.head, -1, 0, 0, (), status_byte, Status.IOERR,
                              f"the request header is {len(header)} bytes, not {HEADER_SIZE}")
        type_, ioprio, sector = _HEADER.unpack(header)
    out_data = _skip(readable, HEADER_SIZE)
    try:
        data, segments = _check(type_, sector, in_data, out_data, config)
    except _Refused as refused:
        return BlkRequest(chain.head, type_, sector, ioprio, (), status_byte, refused.status, refused.reason)
    return BlkRequest(chain.head, type_, sector, ioprio, data, status_byte, None, "", segments)


def _check(type_: int, sector: int, in_data: tuple[memoryview, ...], out_data: tuple[memoryview, ...],
           config: BlkConfig) -> tuple[tuple[memoryview, ...], tuple[Segment, ...]]:
    """The data and segments of a request; _Refused for one answered without I/O."""
    if type_ == _IN or type_ == _OUT:
        reading = type_ == _IN
        data, wrong = (in_data, out_data) if reading else (out_data, in_data)
        if wrong:
            raise _Refused(Status.IOERR, f"{'a read' if reading else 'a write'} with data in the wrong direction")
        if not reading and config.readonly:
            raise _Refused(Status.IOERR, "a write to a read-only disk")
        length = sum(v.nbytes for v in data)
        if length % SECTOR_SIZE:
            raise _Refused(Status.IOERR, f"{length} bytes of data, not whole {SECTOR_SIZE}-byte sectors")
        if not _in_range(sector, length >> SECTOR_SHIFT, config.capacity):
            raise _Refused(Status.IOERR, f"sectors {sector}+{length >> SECTOR_SHIFT} are past the capacity "
                                         f"of {config.capacity}")
        return data, ()
    if type_ == _FLUSH:
        return (), ()  # sector MUST be 0 and data SHOULD be absent: neither matters to a flush
    if type_ == _GET_ID:
        if out_data:
            raise _Refused(Status.IOERR, "GET_ID with device-readable data")
        return in_data, ()
    if type_ == _DISCARD or type_ == _WRITE_ZEROES:
        return (), _segments(type_, in_data, out_data, config)
    raise _Refused(Status.UNSUPP, f"request type {type_} is not supported")


def _segments(type_: int, in_data: tuple[memoryview, ...], out_data: tuple[memoryview, ...],
              config: BlkConfig) -> tuple[Segment, ...]:
    discard = type_ == _DISCARD
    name = "DISCARD" if discard else "WRITE_ZEROES"
    if discard:
        offered, max_sectors, max_seg = config.discard, config.max_discard_sectors, config.max_discard_seg
    else:
        offered, max_sectors, max_seg = config.write_zeroes, config.max_write_zeroes_sectors, config.max_write_zeroes_seg
    if not offered:
        raise _Refused(Status.UNSUPP, f"{name} is not offered")
    if in_data:
        raise _Refused(Status.IOERR, f"{name} with device-writable data")
    if config.readonly:
        raise _Refused(Status.IOERR, f"{name} on a read-only disk")
    payload = b"".join(out_data)
    if not payload or len(payload) % SEGMENT_SIZE:
        raise _Refused(Status.IOERR, f"{name} with {len(payload)} bytes of segments, not a nonzero multiple "
                                     f"of {SEGMENT_SIZE}")
    count = len(payload) // SEGMENT_SIZE
    if count > max_seg:
        raise _Refused(Status.UNSUPP, f"{name} with {count} segments, more than the {max_seg} offered")
    segments = tuple(Segment(*_SEGMENT.unpack_from(payload, SEGMENT_SIZE * i)) for i in range(count))
    # The UNSUPP cases are MUSTs of the spec: they win over any IOERR.
    for seg in segments:
        if seg.flags & ~WRITE_ZEROES_FLAG_UNMAP:
            raise _Refused(Status.UNSUPP, f"{name} segment flags {seg.flags:#x} have unknown bits")
        if discard and seg.unmap:
            raise _Refused(Status.UNSUPP, "DISCARD with the unmap flag")
    for seg in segments:
        if seg.num_sectors > max_sectors:
            raise _Refused(Status.IOERR, f"{name} of {seg.num_sectors} sectors, more than the {max_sectors} "
                                         "offered")
        if not _in_range(seg.sector, seg.num_sectors, config.capacity):
            raise _Refused(Status.IOERR, f"{name} of sectors {seg.sector}+{seg.num_sectors}, past the capacity "
                                         f"of {config.capacity}")
    return segments


# -- carrying requests out ---------------------------------------------------------------


class TargetInfo(Protocol):
    @property
    def size(self) -> int: ...

    @property
    def read_only(self) -> bool: ...


class BlockTarget(Protocol):
    """What a request needs of a disk: qbackend.block.exports.Export's methods,
    so an NBD export can be served as it is (its `info` is an ExportInfo)."""

    @property
    def info(self) -> TargetInfo: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes, fua: bool) -> None: ...

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fua: bool) -> None: ...

    def trim(self, offset: int, length: int, fua: bool) -> None: ...

    def flush(self) -> None: ...


def complete(request: BlkRequest, status: Status, data_written: int = 0) -> int:
    """Write the status byte; the used length to push (data written plus the status byte)."""
    request.status_byte[0] = status
    return data_written + 1


def _scatter(views: tuple[memoryview, ...], data: bytes) -> None:
    pos = 0
    for view in views:
        n = min(view.nbytes, len(data) - pos)
        view[:n] = data[pos:pos + n]
        pos += n
        if pos == len(data):
            return


def execute(request: BlkRequest, target: BlockTarget, *, writethrough: bool = False,
            serial: bytes = b"") -> tuple[Status, int]:
    """Carry a request out against target; writes the status byte and returns
    (status, used length).  `writethrough` is `cache_writethrough(...)` for the
    negotiated features (a write's fua); `serial` is what GET_ID answers."""
    if request.status is not None:
        return request.status, complete(request, request.status)
    status, written = Status.OK, 0
    size, read_only = target.info.size, target.info.read_only
    try:
        kind = request.type
        if kind == _IN:
            n = request.data_len
            if request.offset + n > size:
                status = Status.IOERR
            elif n:
                # An export that can read straight into the guest's buffers (readinto,
                # qbackend.block.exports) saves a copy of every byte.
                readinto = getattr(target, "readinto", None)
                if readinto is not None:
                    readinto(request.offset, request.data)
                    written = n
                else:
                    data = target.read(request.offset, n)
                    if len(data) != n:
                        status = Status.IOERR
                    else:
                        _scatter(request.data, data)
                        written = n
        elif kind == _OUT:
            n = request.data_len
            if read_only or request.offset + n > size:
                status = Status.IOERR
            elif n:
                target.write(request.offset, b"".join(request.data), writethrough)
        elif kind == _FLUSH:
            target.flush()
        elif kind == _GET_ID:
            ident = serial[:ID_BYTES].ljust(ID_BYTES, b"\0")[:request.data_len]
            _scatter(request.data, ident)
            written = len(ident)
        elif kind == _DISCARD or kind == _WRITE_ZEROES:
            if read_only or any(seg.offset + seg.length > size for seg in request.segments):
                status = Status.IOERR
            else:
                for seg in request.segments:
                    if kind == _DISCARD:
                        target.trim(seg.offset, seg.length, writethrough)
                    else:
                        target.write_zeroes(seg.offset, seg.length, seg.unmap, writethrough)
        else:
            status = Status.UNSUPP  # parse_request marks these; a request built by hand may not be
    except (OSError, QbackendError):
        status, written = Status.IOERR, 0
    return status, complete(request, status, written)
