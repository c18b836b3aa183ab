"""QED images (QEMU Enhanced Disk): the whole format, check and repair.

No trio, no sockets: everything runs against a `BlockFile`, so the same code
serves a file, a bytearray in property tests and a fault-injecting wrapper.

Layout (the QED spec): a header in cluster 0, an L1 table, L2 tables and data
clusters, all cluster-aligned.  A guest offset splits into L1 index, L2 index
and byte offset; an L2 entry of 0 is unallocated (read the backing file, or
zeros), 1 is a zero cluster, anything else the file offset of the data.

Crash safety.  Clusters and tables are only ever appended at the end of the
file and never reused, so a crash can leak clusters but not make two entries
share one.  On top of that:

1. Before the first allocating write, NEED_CHECK is set in the header and the
   header flushed; a clean `close` (or `mark_clean`) clears it.  A read-write
   open of an image with the bit set runs `check(repair=True)`, as QEMU does.
2. A new L2 table is written whole and flushed before the L1 entry that
   points at it.
3. New data clusters are flushed before the L2 entries that point at them
   whenever part of their contents came from the backing file (the copy of
   the untouched part of a partial cluster).  Without such a copy, the only
   bytes a lost data write can take with it are bytes of that same unflushed
   write; the untouched part was zeros before and reads zeros afterwards.  An
   L2 entry left pointing past the end of the file is a corruption that the
   repair on open removes.  This is QEMU's rule too, and it saves a flush on
   every allocating write to an image without a backing file.

Deviation from QEMU, following the spec: a partial write into a zero cluster
fills the rest of the cluster with zeros, not with the backing file's data.
"""

from __future__ import annotations

import bisect
import errno
import os
import struct
import sys
from _thread import RLock  # threading's RLock (threading itself: for the first write's Condition)
from array import array
from collections import OrderedDict
from itertools import compress

from qbackend.block.blockfile import FileBlock
from qbackend.errors import ImageError

# Start-up: `qbackend qed info` and `qed check` import this module, so it imports only what
# opening and checking an image use; the rest (logging, pathlib, the read map's C helper,
# typing, dataclasses for `QedHeader`, enum for `Feature` and `MapKind`) when used.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import logging
    import threading
    from collections.abc import Callable, Iterator, Sequence
    from pathlib import Path
    from typing import Protocol

    from qbackend.block.blockfile import BlockFile
    from qbackend.block.qed_check import CheckReport
    from qbackend.block.qed_kinds import Feature as Feature
    from qbackend.block.qed_kinds import MapKind as MapKind
    from qbackend.block.read_map import ReadMap


def _log() -> logging.Logger:
    import logging

    return logging.getLogger(__name__)

# -- constants (QED spec, "Header" and "Tables") ------------------------------

MAGIC = 0x00444551  # b"QED\0" read as a little-endian uint32
HEADER = struct.Struct("<4sIIIQQQQQII")
HEADER_SIZE_BYTES = HEADER.size  # 64
MIN_CLUSTER_SIZE = 1 << 12
MAX_CLUSTER_SIZE = 1 << 26
MIN_TABLE_SIZE = 1
MAX_TABLE_SIZE = 16
DEFAULT_CLUSTER_SIZE = 1 << 16
DEFAULT_TABLE_SIZE = 4
MAX_BACKING_NAME = 1023  # QEMU keeps the name in a 1024-byte buffer with a NUL
L2_ZERO = 1  # the zero-cluster marker
SECTOR = 512
MAX_BACKING_DEPTH = 16
DEFAULT_L2_CACHE_BYTES = 32 << 20


# ``features`` bits (QED spec, "Feature bits"), as the image code tests them; `Feature` is
# their IntFlag (qbackend.block.qed_kinds).
_BACKING_FILE = 0x01
_NEED_CHECK = 0x02
_BACKING_FORMAT_NO_PROBE = 0x04

KNOWN_FEATURES = _BACKING_FILE | _NEED_CHECK | _BACKING_FORMAT_NO_PROBE
KNOWN_COMPAT_FEATURES = 0
KNOWN_AUTOCLEAR_FEATURES = 0


# -- errors --------------------------------------------------------------------


class QedError(ImageError):
    """Base of the QED error tree; ``errno`` is what a block protocol should report."""

    errno = errno.EIO


class QedFormatError(QedError):
    """The header is not a valid QED header; the message names the field and value."""

    errno = errno.EINVAL


class QedUnsupportedError(QedFormatError):
    """A valid image using something this implementation does not support."""

    errno = errno.ENOTSUP


class QedCorruptError(QedError):
    """Metadata met on the I/O path is invalid; the message says what and where."""

    errno = errno.EIO


class QedRangeError(QedError):
    """A request outside the image or otherwise malformed."""

    errno = errno.EINVAL


class QedReadOnlyError(QedError):
    errno = errno.EPERM


class QedBackingError(QedError):
    """The backing file cannot be opened or is not available."""

    errno = errno.EIO


# -- header ----------------------------------------------------------------------


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class Header:
    """A QED header's fields (immutable; `replace` makes a changed copy), packed, unpacked
    and validated.  `QedHeader` is the same as a frozen dataclass (for dataclasses.replace
    and friends), made when first asked for: the image keeps a Header, as dataclasses
    costs more to import than a `qbackend qed info` takes otherwise."""

    FIELDS = ("cluster_size", "table_size", "header_size", "features", "compat_features", "autoclear_features",
              "l1_table_offset", "image_size", "backing_filename_offset", "backing_filename_size")
    DEFAULTS = 2  # the last two fields default to 0 (no backing file name)

    cluster_size: int
    table_size: int
    header_size: int
    features: int
    compat_features: int
    autoclear_features: int
    l1_table_offset: int
    image_size: int
    backing_filename_offset: int
    backing_filename_size: int

    def __init__(self, cluster_size: int, table_size: int, header_size: int, features: int,
                 compat_features: int, autoclear_features: int, l1_table_offset: int, image_size: int,
                 backing_filename_offset: int = 0, backing_filename_size: int = 0) -> None:
        self.__dict__.update(zip(self.FIELDS, (cluster_size, table_size, header_size, features, compat_features,
                                               autoclear_features, l1_table_offset, image_size,
                                               backing_filename_offset, backing_filename_size), strict=True))

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of an immutable header (use replace)")

    def _values(self) -> tuple[int, ...]:
        return tuple(self.__dict__[name] for name in self.FIELDS)

    def __eq__(self, other: object) -> bool:
        return self._values() == other._values() if isinstance(other, Header) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in zip(self.FIELDS, self._values()))})"

    def replace(self, **changes: int) -> Header:
        """A copy with `changes` (field=value) made."""
        return type(self)(**{**dict(zip(self.FIELDS, self._values(), strict=True)), **changes})

    def pack(self) -> bytes:
        return HEADER.pack(b"QED\0", self.cluster_size, self.table_size, self.header_size, self.features,
                           self.compat_features, self.autoclear_features, self.l1_table_offset,
                           self.image_size, self.backing_filename_offset, self.backing_filename_size)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        """Decode (magic checked); `validate` checks the rest."""
        if len(data) < HEADER.size:
            raise QedFormatError(f"file too short for a QED header: {len(data)} bytes, need {HEADER.size}")
        magic, *fields = HEADER.unpack_from(data)
        if magic != b"QED\0":
            raise QedFormatError(f"magic: {magic!r} is not b'QED\\x00'")
        return cls(*fields)

    # derived sizes
    @property
    def table_bytes(self) -> int:
        return self.table_size * self.cluster_size

    @property
    def table_entries(self) -> int:
        return self.table_bytes // 8

    @property
    def header_bytes(self) -> int:
        return self.header_size * self.cluster_size

    @property
    def max_image_size(self) -> int:
        return self.table_entries * self.table_entries * self.cluster_size

    @property
    def has_backing(self) -> bool:
        return bool(self.features & _BACKING_FILE)

    def validate(self, file_size: int) -> None:
        """Every field, in QEMU's order, against a file of ``file_size`` bytes."""
        unknown = self.features & ~KNOWN_FEATURES
        if unknown:
            raise QedUnsupportedError(f"features: unknown bits {unknown:#x} (features={self.features:#x})")
        cs = self.cluster_size
        if not (_is_pow2(cs) and MIN_CLUSTER_SIZE <= cs <= MAX_CLUSTER_SIZE):
            raise QedFormatError(f"cluster_size: {cs} is not a power of two in [{MIN_CLUSTER_SIZE}, "
                                 f"{MAX_CLUSTER_SIZE}]")
        if not (_is_pow2(self.table_size) and MIN_TABLE_SIZE <= self.table_size <= MAX_TABLE_SIZE):
            raise QedFormatError(f"table_size: {self.table_size} is not a power of two in "
                                 f"[{MIN_TABLE_SIZE}, {MAX_TABLE_SIZE}]")
        if self.header_size < 1 or self.header_bytes > 0xFFFFFFFF:
            raise QedFormatError(f"header_size: {self.header_size} clusters is not in [1, 4 GiB / cluster_size]")
        if self.image_size % SECTOR:
            raise QedFormatError(f"image_size: {self.image_size} is not a multiple of {SECTOR}")
        if self.image_size > self.max_image_size:
            raise QedFormatError(f"image_size: {self.image_size} exceeds the maximum {self.max_image_size} "
                                 f"for cluster_size {cs} and table_size {self.table_size}")
        whole = file_size - file_size % cs
        l1 = self.l1_table_offset
        if l1 % cs:
            raise QedFormatError(f"l1_table_offset: {l1:#x} is not a multiple of cluster_size {cs}")
        if l1 < self.header_bytes:
            raise QedFormatError(f"l1_table_offset: {l1:#x} lies inside the header ({self.header_size} "
                                 "clusters)")
        if l1 + self.table_bytes > whole:
            raise QedFormatError(f"l1_table_offset: the table at {l1:#x} ({self.table_bytes} bytes) does not "
                                 f"fit in the file ({file_size} bytes)")
        if self.has_backing:
            off, size = self.backing_filename_offset, self.backing_filename_size
            if size == 0 or size > MAX_BACKING_NAME:
                raise QedFormatError(f"backing_filename_size: {size} is not in [1, {MAX_BACKING_NAME}]")
            if off + size > self.header_bytes:
                raise QedFormatError(f"backing_filename_offset: {off} + size {size} lies outside the header "
                                     f"({self.header_bytes} bytes)")


# -- backing files -------------------------------------------------------------


def __getattr__(name: str) -> object:
    """`QedHeader`: the frozen dataclass of `Header`'s fields, made on first use; the enums
    `Feature` and `MapKind` (from qbackend.block.qed_kinds)."""
    if name in ("Feature", "MapKind"):
        from qbackend.block import qed_kinds

        return getattr(qed_kinds, name)
    if name != "QedHeader":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from dataclasses import field, make_dataclass

    required = len(Header.FIELDS) - Header.DEFAULTS
    made = make_dataclass("QedHeader", [(n, int) if i < required else (n, int, field(default=0))
                                        for i, n in enumerate(Header.FIELDS)],
                          bases=(Header,), frozen=True)
    made.__module__, made.__doc__ = __name__, Header.__doc__
    globals()["QedHeader"] = made
    return made


if TYPE_CHECKING:
    QedHeader = Header  # at run time, the dataclass of Header's fields (module __getattr__)

    class Backing(Protocol):
        """What a QED image reads unallocated clusters from."""

        def size(self) -> int: ...

        def read(self, offset: int, n: int) -> bytes:
            """``n`` bytes at ``offset``, inside [0, size())."""
            ...

        def close(self) -> None: ...


class RawBacking:
    """A raw backing file: the file's bytes, its length the size."""

    def __init__(self, f: BlockFile) -> None:
        self.f = f
        self._size = f.size()

    def size(self) -> int:
        return self._size

    def read(self, offset: int, n: int) -> bytes:
        data = self.f.pread(offset, n)
        return data if len(data) == n else data + bytes(n - len(data))

    def close(self) -> None:
        self.f.close()


FileIdentity = tuple[int, int]  # (st_dev, st_ino)


def file_identity(f: BlockFile) -> FileIdentity | None:
    """Which file `f` is, for telling a backing chain that loops; None if it has no fd."""
    fd = getattr(f, "fd", None)
    if not isinstance(fd, int):
        return None
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


def open_backing_file(path: Path, *, raw: bool, depth: int = 0, chain: frozenset[FileIdentity] = frozenset()
                      ) -> Backing:
    """Open a backing file read-only: raw when told so, else probed (QED or raw).
    `chain`: the files above it; a backing file that is one of them (the same file by
    another name included) is refused, not opened again and again."""
    if depth >= MAX_BACKING_DEPTH:
        raise QedBackingError(f"backing chain deeper than {MAX_BACKING_DEPTH} at {path}")
    try:
        f = FileBlock.open(path, writable=False)
    except OSError as exc:
        raise QedBackingError(f"cannot open backing file {path}: {exc.strerror}") from exc
    except ImageError as exc:
        raise QedBackingError(f"backing file {exc}") from exc
    try:
        if file_identity(f) in chain:
            raise QedBackingError(f"backing file {path} is already in the chain above it (a loop)")
        if raw:
            return RawBacking(f)
        magic = f.pread(0, 4)
        if magic == b"QED\0":
            return QedImage.open(f, read_only=True, base_dir=path.parent, _depth=depth + 1, _chain=chain)
        if magic == b"QFI\xfb":
            raise QedBackingError(f"backing file {path} is qcow2, which is not supported")
        return RawBacking(f)
    except BaseException:
        f.close()
        raise


# -- results -------------------------------------------------------------------


class ClusterKind:
    """What an L2 entry makes of its cluster: the kinds `_runs` yields (plain ints)."""

    UNALLOCATED = 0
    ZERO = 1
    DATA = 2


class Extent:
    """A piece of the guest view (immutable)."""

    __slots__ = ("host_offset", "kind", "length", "start")
    start: int
    length: int
    kind: MapKind
    host_offset: int | None

    def __init__(self, start: int, length: int, kind: MapKind, host_offset: int | None = None) -> None:
        setattr_ = object.__setattr__
        setattr_(self, "start", start)
        setattr_(self, "length", length)
        setattr_(self, "kind", kind)
        setattr_(self, "host_offset", host_offset)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of an Extent")

    def _values(self) -> tuple[int, int, MapKind, int | None]:
        return self.start, self.length, self.kind, self.host_offset

    def __eq__(self, other: object) -> bool:
        return self._values() == other._values() if isinstance(other, Extent) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        return (f"Extent(start={self.start!r}, length={self.length!r}, kind={self.kind!r}, "
                f"host_offset={self.host_offset!r})")

    @property
    def reads_zero(self) -> bool:
        from qbackend.block.qed_kinds import MapKind

        return self.kind in (MapKind.ZERO, MapKind.UNALLOCATED)


# -- helpers ---------------------------------------------------------------------

_BIG_ENDIAN = sys.byteorder == "big"


def _table_from_bytes(data: bytes) -> array[int]:
    arr = array("Q")
    arr.frombytes(data)
    if _BIG_ENDIAN:
        arr.byteswap()
    return arr


def _table_to_bytes(arr: array[int]) -> bytes:
    if _BIG_ENDIAN:
        arr = array("Q", arr)
        arr.byteswap()
    return arr.tobytes()


class _Auto:
    pass


# Bounded walks.  WRITE_ZEROES and TRIM go through the tables in steps of at most
# STEP_ENTRIES entries (or one new L2 table), the image lock held for one step at a time;
# a bounded map (block status) stops once STATUS_BUDGET is spent: about a unit per run
# found, per data entry looked at, per absent L2 table; _TABLE_COST per table read.
STEP_ENTRIES = 4096
STATUS_BUDGET = 1 << 14
_TABLE_COST = 1024  # (a table read from the file, checked and searched: about 0.3 ms)
_FEW_CLUSTERS = 16  # spans of up to this many clusters are walked entry by entry (reads, writes)
_ONES = array("Q", [L2_ZERO])


_RUN_CHUNK = 1 << 13  # entries compared at once by _same_entries
_SAME = {0: bytes(8 * _RUN_CHUNK), L2_ZERO: L2_ZERO.to_bytes(8, "little") * _RUN_CHUNK}


def _same_entries(le: bytes, k: int, count: int, value: int) -> int:
    """How many entries from entry k on (of `count`, in little-endian bytes `le`) are `value`
    (0 or 1), entry k being one: compared by doubling, then halving, stretches, so the bytes
    compared are about twice the run's."""
    pattern = _SAME[value]
    n, step, growing = 1, 1, True
    while step and k + n < count:
        m = min(step, count - k - n)
        if le[8 * (k + n):8 * (k + n + m)] == pattern[:8 * m]:
            n += m
            step = m * 2 if growing else m // 2
        else:
            growing = False
            step = m // 2
    return n


def _no_data(le: bytes) -> bool:
    """Whether the little-endian entries `le` are all 0 or 1 (unallocated or zero clusters)."""
    n = len(le) // 8
    return not le[0::8].translate(None, b"\0\1") and all(le[i::8].count(0) == n for i in range(1, 8))


class _Budget:
    """What a bounded walk may still spend."""

    def __init__(self, left: int = STATUS_BUDGET) -> None:
        self.left = left


_AUTO = _Auto()
if TYPE_CHECKING:
    ProgressFn = Callable[[int, int], None]


# -- the image -----------------------------------------------------------------


class QedImage:
    """An open QED image.  Methods are thread-safe (one lock); sizes in bytes."""

    # ---- create / open / close

    @staticmethod
    def create(f: BlockFile, image_size: int, *, cluster_size: int = DEFAULT_CLUSTER_SIZE,
               table_size: int = DEFAULT_TABLE_SIZE, backing_file: str | None = None,
               backing_raw: bool = False) -> Header:
        """Format ``f`` (truncated first) as an empty QED image; returns the header written.

        ``image_size`` is rounded up to a multiple of 512, as qemu-img does.
        ``backing_raw`` sets BACKING_FORMAT_NO_PROBE (the backing file is raw).
        """
        if image_size < 0:
            raise QedRangeError(f"image size {image_size} is negative")
        image_size = -(-image_size // SECTOR) * SECTOR
        name = os.fsencode(backing_file) if backing_file is not None else b""
        if backing_file is not None and not 0 < len(name) <= MAX_BACKING_NAME:
            raise QedRangeError(f"backing file name must be 1..{MAX_BACKING_NAME} bytes, got {len(name)}")
        if backing_raw and backing_file is None:
            raise QedRangeError("backing_raw needs a backing file")
        header_size = max(1, -(-(HEADER_SIZE_BYTES + len(name)) // max(cluster_size, 1)))
        features = 0
        if backing_file is not None:
            features |= _BACKING_FILE
            if backing_raw:
                features |= _BACKING_FORMAT_NO_PROBE
        header = Header(cluster_size=cluster_size, table_size=table_size, header_size=header_size,
                           features=int(features), compat_features=0, autoclear_features=0,
                           l1_table_offset=header_size * cluster_size, image_size=image_size,
                           backing_filename_offset=HEADER_SIZE_BYTES if name else 0,
                           backing_filename_size=len(name))
        try:
            header.validate(header.l1_table_offset + header.table_bytes)
        except QedFormatError as exc:
            raise QedRangeError(f"cannot create: {exc}") from None
        f.truncate(0)
        f.pwrite(0, header.pack() + name)
        f.truncate(header.l1_table_offset + header.table_bytes)
        f.flush()
        return header

    @classmethod
    def open_path(cls, path: str | os.PathLike[str], *, read_only: bool = False, open_backing: bool = True,
                  check_on_open: bool = True, native_map: bool = False) -> QedImage:
        f = FileBlock.open(path, writable=not read_only)
        try:
            return cls.open(f, read_only=read_only, open_backing=open_backing, check_on_open=check_on_open,
                            native_map=native_map)  # the backing file's folder: the image's
        except BaseException:
            f.close()
            raise

    @classmethod
    def open(cls, f: BlockFile, *, read_only: bool = False, backing: Backing | None = None,
             open_backing: bool = True, base_dir: Path | None = None, check_on_open: bool = True,
             l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES, native_map: bool = False, _depth: int = 0,
             _chain: frozenset[FileIdentity] = frozenset()) -> QedImage:
        """Open an image on ``f`` (the image owns ``f`` from now on: `close` closes it).

        The backing file is ``backing`` if given, else opened by name relative
        to ``base_dir`` (or to the file's folder) unless ``open_backing`` is
        false; then reads that would reach it raise `QedBackingError`.
        A read-write open of an image with NEED_CHECK runs ``check(repair=True)``
        unless ``check_on_open`` is false; its report is kept in `open_check`.
        """
        header = Header.unpack(f.pread(0, HEADER.size))
        header.validate(f.size())
        img = cls(f, header, read_only=read_only, l2_cache_bytes=l2_cache_bytes, native_map=native_map)
        try:
            if header.has_backing:
                raw_name = f.pread(header.backing_filename_offset, header.backing_filename_size)
                img.backing_name = os.fsdecode(raw_name)
                if backing is not None:
                    img.backing = backing
                elif open_backing:
                    from pathlib import Path

                    base = base_dir if base_dir is not None else _block_dir(f)
                    target = Path(img.backing_name)
                    if not target.is_absolute():
                        if base is None:
                            raise QedBackingError(f"backing file {img.backing_name!r} is relative and the "
                                                  "image has no folder; pass backing=")
                        target = base / target
                    here = file_identity(f)
                    img.backing = open_backing_file(target, raw=bool(header.features
                                                                     & _BACKING_FORMAT_NO_PROBE),
                                                    depth=_depth, chain=_chain | {here} if here else _chain)
                else:
                    img._backing_missing = True
            if not read_only:
                if header.autoclear_features & ~KNOWN_AUTOCLEAR_FEATURES:
                    img.header = header.replace(autoclear_features=header.autoclear_features
                                         & KNOWN_AUTOCLEAR_FEATURES)
                    img._write_header()
                    f.flush()
                if header.features & _NEED_CHECK and check_on_open:
                    img.open_check = report = img._check(repair=True, leaks_only=False, progress=None)
                    for p in report.corruptions:
                        _log().warning("%s", p)
                    # Users see that the last writer did not close the image, and what it cost.
                    _log().warning("%s: NEED_CHECK was set (not closed cleanly); checked on open: %d leaked "
                                "clusters freed, %d corruptions fixed, %d remain",
                                getattr(f, "path", None) or "image", report.leaks_fixed,
                                report.corruptions_fixed, report.corruptions_remaining)
            return img
        except BaseException:
            if img.backing is not None and backing is None:
                img.backing.close()
            raise

    def __init__(self, f: BlockFile, header: Header, *, read_only: bool,
                 l2_cache_bytes: int = DEFAULT_L2_CACHE_BYTES, native_map: bool = False) -> None:
        self.f = f
        self.header = header
        self.read_only = read_only
        self.backing: Backing | None = None
        self.backing_name: str | None = None
        self._backing_missing = False
        self.open_check: CheckReport | None = None
        self.closed = False
        self._lock = RLock()
        # Guest clusters whose new data is being written outside the lock (write()),
        # and the condition their writers signal when the tables point at it.
        self._allocating: set[int] = set()
        self._allocated_condition: threading.Condition | None = None  # `_allocated`
        cs = header.cluster_size
        self._cs = cs
        self._ne = header.table_entries
        self._tb = header.table_bytes
        self._data_start = header.header_bytes
        self._l2_cache: OrderedDict[int, array[int]] = OrderedDict()
        self._l2_cache_max = max(1, l2_cache_bytes // self._tb)
        self._tail_trimmed = False
        self._keep_need_check = False  # a check was interrupted: close leaves NEED_CHECK as it is
        # For native readers and writers (the NBD server's): the data clusters reads have
        # found.  Rewriting one of them in place is all a write there takes (write() does it
        # outside the lock too), so native writers may, unless the image is read-only.
        # Only an image a native server reads asks for it (`native_map`): the tools and
        # backing files do not, and so never load the C helper (nor cffi) for nothing.
        fd = getattr(f, "fd", None)
        self.read_map: ReadMap | None = None
        if native_map and isinstance(fd, int):
            from qbackend.block.read_map import ReadMap

            self.read_map = ReadMap.create(fd, header.image_size, cs, writable=not read_only)
        self._load_metadata()

    def _load_metadata(self) -> None:
        """(Re)read the file size and the L1 table; find L1 entries the I/O path must refuse."""
        size = self.f.size()
        self._file_size = size - size % self._cs
        self._tail_trimmed = size == self._file_size
        # Only the L1 entries that cover the guest size: the rest cannot be reached (a table
        # of up to 1 GiB in a sparse file would otherwise be read whole, as QEMU does; the
        # entries the image size needs are at most 16 MiB whatever the header says).
        self._l1 = _table_from_bytes(self.f.pread(self.header.l1_table_offset, 8 * self._l1_used()))
        self._l2_cache.clear()
        if self.read_map is not None:
            self.read_map.forget_all()
        self._bad_l1: dict[int, str] = {}
        starts: list[tuple[int, int]] = []
        for i, e in compress(enumerate(self._l1), self._l1):  # the nonzero entries
            why = self._table_offset_problem(e, self._file_size)
            if why:
                self._bad_l1[i] = why
            else:
                starts.append((e, i))
        starts.sort()
        for (a, i), (b, j) in zip(starts, starts[1:], strict=False):
            if b < a + self._tb:
                self._bad_l1.setdefault(i, f"L2 table {a:#x} overlaps the L2 table at {b:#x}")
                self._bad_l1.setdefault(j, f"L2 table {b:#x} overlaps the L2 table at {a:#x}")
        self._l2_starts = [e for e, i in starts]

    def _l1_used(self) -> int:
        """How many L1 entries the guest size reaches."""
        span = self._ne * self._cs
        return min(self._ne, -(-self.header.image_size // span))

    def _table_offset_problem(self, e: int, file_size: int) -> str | None:
        if e % self._cs:
            return f"offset {e:#x} is not a multiple of the cluster size"
        if e < self._data_start:
            return f"offset {e:#x} lies in the header"
        if e + self._tb > file_size:
            return f"table at {e:#x} ({self._tb} bytes) runs past the end of the file ({file_size:#x})"
        l1 = self.header.l1_table_offset
        if e < l1 + self._tb and l1 < e + self._tb:
            return f"table at {e:#x} overlaps the L1 table at {l1:#x}"
        return None

    def _data_offset_problem(self, e: int) -> str | None:
        if e % self._cs:
            return f"offset {e:#x} is not a multiple of the cluster size"
        if e < self._data_start:
            return f"offset {e:#x} lies in the header"
        if e >= self._file_size:
            return f"offset {e:#x} is past the end of the file ({self._file_size:#x})"
        l1 = self.header.l1_table_offset
        if l1 <= e < l1 + self._tb:
            return f"offset {e:#x} lies in the L1 table"
        i = bisect.bisect_right(self._l2_starts, e) - 1
        if i >= 0 and e < self._l2_starts[i] + self._tb:
            return f"offset {e:#x} lies in the L2 table at {self._l2_starts[i]:#x}"
        return None

    def close(self) -> None:
        """Flush, clear NEED_CHECK (unless corruption remains), close the file and backing."""
        with self._lock:
            if self.closed:
                return
            while self._allocating:  # writes whose new clusters are on their way to the file
                self._allocated.wait()
            try:
                if not self.read_only:
                    remaining = self.open_check is not None and self.open_check.corruptions_remaining
                    if not remaining and not self._keep_need_check:
                        self._mark_clean()
                    else:
                        self.f.flush()
            finally:
                self.closed = True
                if self.read_map is not None:
                    self.read_map.close()  # no native reader uses the file after this
                if self.backing is not None:
                    self.backing.close()
                self.f.close()

    @property
    def _allocated(self) -> threading.Condition:
        """The condition a write that allocated signals (made on first use, under the lock)."""
        if self._allocated_condition is None:
            import threading

            self._allocated_condition = threading.Condition(self._lock)
        return self._allocated_condition

    def __enter__(self) -> QedImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- properties

    @property
    def cluster_size(self) -> int:
        return self._cs

    @property
    def image_size(self) -> int:
        return self.header.image_size

    def size(self) -> int:
        return self.header.image_size

    @property
    def file_size(self) -> int:
        return self._file_size

    @property
    def backing_format(self) -> str | None:
        """raw, qed, or None (no backing file; or not opened and not marked raw)."""
        if self.backing_name is None:
            return None
        if self.header.features & _BACKING_FORMAT_NO_PROBE or isinstance(self.backing, RawBacking):
            return "raw"
        return "qed" if isinstance(self.backing, QedImage) else None

    @property
    def dirty(self) -> bool:
        return bool(self.header.features & _NEED_CHECK)

    # ---- header

    def _write_header(self) -> None:
        self.f.pwrite(0, self.header.pack())

    def _mark_dirty(self) -> None:
        """NEED_CHECK on, durable, before anything is allocated; drop a partial tail cluster."""
        if not self._tail_trimmed:
            self.f.truncate(self._file_size)
            self._tail_trimmed = True
        if self.dirty:
            return
        self.header = self.header.replace(features=self.header.features | _NEED_CHECK)
        self._write_header()
        self.f.flush()

    def _mark_clean(self) -> None:
        self.f.flush()
        if self.dirty:
            self.header = self.header.replace(features=self.header.features & ~_NEED_CHECK)
            self._write_header()
            self.f.flush()

    def mark_clean(self) -> None:
        """Flush and clear NEED_CHECK (for an idle timer, as QEMU does after 5 s)."""
        with self._lock:
            self._check_writable()
            self._mark_clean()

    # ---- table access

    def _l2(self, l1i: int) -> array[int] | None:
        """The L2 table of L1 entry ``l1i`` (None if unallocated)."""
        e = self._l1[l1i]
        if e == 0:
            return None
        why = self._bad_l1.get(l1i)
        if why is not None:
            raise QedCorruptError(f"L1 entry {l1i} (guest offset {l1i * self._ne * self._cs:#x}): {why}")
        table = self._l2_cache.get(e)
        if table is not None:
            self._l2_cache.move_to_end(e)
            return table
        data = self.f.pread(e, self._tb)
        if len(data) != self._tb:
            raise QedCorruptError(f"L1 entry {l1i}: L2 table at {e:#x} is cut short by the end of the file")
        table = _table_from_bytes(data)
        self._cache_l2(e, table)
        if self.read_map is not None:
            self._map_table(l1i, table)
        return table

    def _map_table(self, l1i: int, table: array[int]) -> None:
        """Tell the read map where the data clusters of a table just read are: the
        entries the I/O path would take (zero clusters, unallocated ones and bad
        offsets stay with it)."""
        assert self.read_map is not None
        if _no_data(_table_to_bytes(table)):
            return  # no data clusters: nothing to map (and the map has none of this table's)
        problem = self._data_offset_problem
        mapped = array("Q", (e if e > L2_ZERO and problem(e) is None else 0 for e in table))
        self.read_map.set_many(l1i * self._ne, mapped)

    def _cache_l2(self, offset: int, table: array[int]) -> None:
        self._l2_cache[offset] = table
        self._l2_cache.move_to_end(offset)
        while len(self._l2_cache) > self._l2_cache_max:
            self._l2_cache.popitem(last=False)

    def _runs(self, offset: int, n: int, budget: _Budget | None = None
              ) -> Iterator[tuple[int, int, int, int]]:
        """(guest offset, length, kind, file offset) runs over [offset, offset+n), merged.

        With a `budget`, the walk stops early once it is spent (the runs then cover a
        prefix of the range, at least one piece): what block status answers per request."""
        cs, ne = self._cs, self._ne
        end = offset + n
        pos = offset
        cur: list[int] | None = None  # [start, length, kind, host]
        span = ne * cs
        while pos < end:
            l1i = pos // span
            table_end = min(end, (l1i + 1) * span)
            table = self._l2(l1i)
            if table is None:
                pieces: Iterator[tuple[int, int, int, int]] = iter(((pos, table_end - pos, 0, 0),))
            elif table_end - pos <= _FEW_CLUSTERS * cs:
                pieces = self._table_pieces(table, l1i, pos, table_end)
            else:
                pieces = self._table_runs(table, l1i, pos, table_end, budget)
            if budget is not None:
                budget.left -= 1 if table is None else _TABLE_COST
            for start, length, kind, host in pieces:
                if cur is not None and cur[2] == kind and cur[0] + cur[1] == start and (
                        kind != ClusterKind.DATA or cur[3] + cur[1] == host):
                    cur[1] += length
                    continue
                if cur is not None:
                    yield cur[0], cur[1], cur[2], cur[3]
                cur = [start, length, kind, host]
                if budget is not None and budget.left <= 0:
                    break
            else:
                pos = table_end
                if budget is None or budget.left > 0:
                    continue
            break
        if cur is not None:
            yield cur[0], cur[1], cur[2], cur[3]

    def _table_pieces(self, table: array[int], l1i: int, pos: int,
                      end: int) -> Iterator[tuple[int, int, int, int]]:
        cs, ne = self._cs, self._ne
        l2_off = self._l1[l1i]
        while pos < end:
            ci = pos // cs
            l2i = ci - l1i * ne
            cend = min(end, (ci + 1) * cs)
            e = table[l2i]
            if e == 0:
                yield pos, cend - pos, 0, 0
            elif e == L2_ZERO:
                yield pos, cend - pos, 1, 0
            else:
                why = self._data_offset_problem(e)
                if why is not None:
                    raise QedCorruptError(f"L2 table at {l2_off:#x} entry {l2i} (guest offset {ci * cs:#x}): "
                                          f"data cluster {why}")
                yield pos, cend - pos, 2, e + pos - ci * cs
            pos = cend

    def _table_runs(self, table: array[int], l1i: int, pos: int, end: int,
                    budget: _Budget | None) -> Iterator[tuple[int, int, int, int]]:
        """_table_pieces for long spans: runs of unallocated and of zero clusters are found by
        comparing the entries' bytes at C speed (_same_entries), runs of consecutive data
        clusters one entry at a time and checked as a whole.  Each piece costs the budget 1,
        and each data entry 1 more."""
        cs = self._cs
        first = l1i * self._ne
        j = pos // cs - first
        jend = -(-end // cs) - first
        while j < jend:
            count = min(jend - j, _RUN_CHUNK)
            le = _table_to_bytes(table[j:j + count])
            k = 0
            while k < count:
                ci = first + j + k
                start = max(pos, ci * cs)
                e = table[j + k]
                if e <= L2_ZERO:
                    run = _same_entries(le, k, count, e)
                    kind, host = e, 0
                else:
                    run = 1
                    while k + run < count and table[j + k + run] == e + run * cs:
                        run += 1
                    if self._data_run_problem(e, run) is not None:
                        for r in range(run):  # the first bad entry, named as _table_pieces names it
                            why = self._data_offset_problem(e + r * cs)
                            if why is not None:
                                raise QedCorruptError(f"L2 table at {self._l1[l1i]:#x} entry {j + k + r} (guest "
                                                      f"offset {(ci + r) * cs:#x}): data cluster {why}")
                    kind, host = 2, e + start - ci * cs
                    if budget is not None:
                        budget.left -= run
                stop = min(end, (ci + run) * cs)
                yield start, stop - start, kind, host
                if budget is not None:
                    budget.left -= 1
                k += run
            j += count

    def _data_run_problem(self, e: int, run: int) -> str | None:
        """_data_offset_problem for the `run` consecutive clusters from file offset e: None if
        none of them has one."""
        why = self._data_offset_problem(e)
        if why is not None or run == 1:
            return why
        last = e + (run - 1) * self._cs
        if last >= self._file_size:
            return f"offset {last:#x} is past the end of the file ({self._file_size:#x})"
        l1 = self.header.l1_table_offset
        if e < l1 + self._tb and l1 <= last:
            return f"the run at {e:#x} overlaps the L1 table"
        i = bisect.bisect_right(self._l2_starts, last) - 1
        if i >= 0 and self._l2_starts[i] + self._tb > e:
            return f"the run at {e:#x} overlaps the L2 table at {self._l2_starts[i]:#x}"
        return None

    # ---- requests

    def _check_range(self, offset: int, n: int) -> None:
        if offset < 0 or n < 0 or offset + n > self.header.image_size:
            raise QedRangeError(f"request {offset:#x}+{n:#x} is outside the image "
                                f"({self.header.image_size:#x} bytes)")

    def _check_writable(self) -> None:
        if self.closed:
            raise QedError("image is closed")
        if self.read_only:
            raise QedReadOnlyError("image is open read-only")

    def _backing_read(self, offset: int, n: int) -> bytes:
        if self.backing is None:
            if self._backing_missing:
                raise QedBackingError(f"backing file {self.backing_name!r} is not open")
            return bytes(n)
        bsize = self.backing.size()
        if offset >= bsize:
            return bytes(n)
        inside = min(n, bsize - offset)
        data = self.backing.read(offset, inside)
        return data if inside == n else data + bytes(n - inside)

    def _reads_backing(self, offset: int, n: int) -> bool:
        """Whether unallocated [offset, offset+n) would show backing-file bytes."""
        if self.backing is None:
            return self._backing_missing
        return offset < self.backing.size()

    def read(self, offset: int, n: int) -> bytes:
        with self._lock:
            if self.closed:
                raise QedError("image is closed")
            self._check_range(offset, n)
            runs = list(self._runs(offset, n))
            if not (len(runs) == 1 and runs[0][2] == ClusterKind.DATA):
                return self._assemble(offset, n, runs)
        # One contiguous stretch of the file: read it outside the lock, with
        # no assembling.  Clusters are never reused, so a concurrent writer
        # cannot turn this stretch into someone else's data.
        data = self.f.pread(runs[0][3], n)
        if len(data) != n:
            raise QedCorruptError(f"data at file offset {runs[0][3]:#x} is cut short by the end of file")
        return data

    def readinto(self, offset: int, views: Sequence[memoryview]) -> None:
        """read() into ``views``: one contiguous stretch of the file goes straight in
        (preadv, when the block file has it); anything else through read()."""
        n = sum(v.nbytes for v in views)
        preadv = getattr(self.f, "preadv", None)
        with self._lock:
            if self.closed:
                raise QedError("image is closed")
            self._check_range(offset, n)
            runs = list(self._runs(offset, n))
            direct = preadv is not None and len(runs) == 1 and runs[0][2] == ClusterKind.DATA
        if direct and preadv is not None:  # outside the lock, as read() does: clusters are never reused
            if preadv(runs[0][3], views) != n:
                raise QedCorruptError(f"data at file offset {runs[0][3]:#x} is cut short by the end of file")
            return
        data = memoryview(self.read(offset, n))
        pos = 0
        for view in views:
            view[:] = data[pos:pos + view.nbytes]
            pos += view.nbytes

    def _assemble(self, offset: int, n: int, runs: list[tuple[int, int, int, int]]) -> bytes:
        out = bytearray(n)
        for start, length, kind, host in runs:
            pos = start - offset
            if kind == ClusterKind.DATA:
                data = self.f.pread(host, length)
                if len(data) != length:
                    raise QedCorruptError(f"data at file offset {host:#x} is cut short by the end of file")
                out[pos:pos + length] = data
            elif kind == ClusterKind.UNALLOCATED and self._reads_backing(start, length):
                out[pos:pos + length] = self._backing_read(start, length)
        return bytes(out)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        cs = self._cs
        with self._lock:
            while True:
                self._check_writable()
                self._check_range(offset, len(data))
                if not data:
                    return
                to_alloc: list[tuple[int, int]] = []  # (guest cluster index, old kind)
                in_place: list[tuple[int, int, int]] = []  # (file offset, data offset, length)
                for start, length, kind, host in self._runs(offset, len(data)):
                    if kind == ClusterKind.DATA:
                        in_place.append((host, start - offset, length))
                    else:
                        for ci in range(start // cs, (start + length - 1) // cs + 1):
                            to_alloc.append((ci, kind))
                # A cluster another write is allocating: wait for it, then look again
                # (it is then allocated, and written in place).
                if not any(ci in self._allocating for ci, _ in to_alloc):
                    break
                self._allocated.wait()
            if to_alloc:
                for host, pos, length in in_place:
                    self.f.pwrite(host, view[pos:pos + length])
                base, parts, copied_backing = self._reserve(offset, view, to_alloc)
        if not to_alloc:
            # Only clusters that are allocated already: their data goes outside the
            # lock, as a read's does (clusters are never reused, so the file offsets
            # stay this range's), and many clients' rewrites proceed at once.
            for host, pos, length in in_place:
                self.f.pwrite(host, view[pos:pos + length])
            return
        # The new clusters' data goes outside the lock too, into file space reserved
        # for them; the table entries that make them the guest's follow it.
        entries = [(ci, base + k * cs) for k, (ci, _) in enumerate(to_alloc)]
        try:
            pwritev = getattr(self.f, "pwritev", None)
            if pwritev is not None:
                pwritev(base, parts)
            else:
                self.f.pwrite(base, b"".join(parts))
            if copied_backing:
                self.f.flush()
            with self._lock:
                self._set_entries(entries)
        finally:
            with self._lock:
                self._allocating.difference_update(ci for ci, _ in to_alloc)
                self._allocated.notify_all()

    def _reserve(self, offset: int, view: memoryview,
                 clusters: list[tuple[int, int]]) -> tuple[int, list[memoryview], bool]:
        """Under the lock: file space for `clusters` at the end of the file, and what goes
        there (views of the caller's bytes for whole clusters; else built with the backing
        file's or zero bytes around them); whether backing data was copied."""
        cs = self._cs
        end = offset + len(view)
        self._mark_dirty()
        base = self._file_size
        self._file_size = base + len(clusters) * cs
        self._allocating.update(ci for ci, _ in clusters)
        if all(offset <= ci * cs and (ci + 1) * cs <= end for ci, _ in clusters):
            # Whole clusters (a large aligned write): the caller's bytes go to the file as they
            # are, with no buffer to build (and fault in) for them.
            return base, [view[ci * cs - offset:(ci + 1) * cs - offset] for ci, _ in clusters], False
        buf = bytearray(len(clusters) * cs)
        copied_backing = False
        for k, (ci, kind) in enumerate(clusters):
            cstart = ci * cs
            lo, hi = max(offset, cstart), min(end, cstart + cs)
            b = k * cs
            if hi - lo < cs:
                # the untouched part: backing data for unallocated clusters, zeros for zero clusters
                if kind == ClusterKind.UNALLOCATED and self._reads_backing(cstart, cs):
                    buf[b:b + cs] = self._backing_read(cstart, cs)
                    copied_backing = True
            buf[b + lo - cstart:b + hi - cstart] = view[lo - offset:hi - offset]
        return base, [memoryview(buf)], copied_backing

    def _set_entries(self, updates: list[tuple[int, int]]) -> None:
        """Point L2 entries (guest cluster index -> value) at new values, allocating tables.

        New tables are written whole and flushed before the L1 entries that
        point at them are written.
        """
        ne = self._ne
        by_table: dict[int, list[tuple[int, int]]] = {}
        read_map = self.read_map
        for ci, value in updates:
            by_table.setdefault(ci // ne, []).append((ci % ne, value))
            if read_map is not None:  # the one place entries change: the map follows (0 for a zero cluster)
                read_map.set(ci, 0 if value == L2_ZERO else value)
        new_l1: list[int] = []
        for l1i, entries in by_table.items():
            table = self._l2(l1i)
            if table is None:
                self._mark_dirty()
                table = array("Q", bytes(self._tb))
                for l2i, value in entries:
                    table[l2i] = value
                toff = self._file_size
                self.f.pwrite(toff, _table_to_bytes(table))
                self._file_size = toff + self._tb
                self._cache_l2(toff, table)
                self._l1[l1i] = toff
                bisect.insort(self._l2_starts, toff)
                new_l1.append(l1i)
            else:
                for l2i, value in entries:
                    table[l2i] = value
                lo = min(i for i, _ in entries)
                hi = max(i for i, _ in entries) + 1
                self.f.pwrite(self._l1[l1i] + lo * 8, _table_to_bytes(table[lo:hi]))
        if new_l1:
            self.f.flush()
            new_l1.sort()
            # contiguous L1 indexes go out in one write
            run_start = prev = new_l1[0]
            for i in new_l1[1:] + [-1]:
                if i != prev + 1:
                    self.f.pwrite(self.header.l1_table_offset + run_start * 8,
                                  _table_to_bytes(self._l1[run_start:prev + 1]))
                    run_start = i
                prev = i

    def write_zeroes(self, offset: int, n: int) -> None:
        """Make [offset, offset+n) read as zeros: allocated clusters are zeroed in place (their
        file space freed), unallocated ones that would show the backing file become zero
        clusters, partial clusters are written.

        In bounded steps (STEP_ENTRIES, or one new L2 table), the lock held per step: a
        request over the whole of a large image holds up other requests no longer than a
        step, and takes no memory per cluster.  Clusters past the backing file's end (or
        with no backing file) are left unallocated: they read zeros already.  QEMU makes
        every unallocated cluster a zero cluster, with or without a backing file (qemu-nbd
        11.1 wrote 128 MiB of L2 tables for one WRITE_ZEROES over 1 TiB of an image whose
        backing file is 1 GiB); what a guest reads is the same."""
        with self._lock:
            self._check_writable()
            self._check_range(offset, n)
        if n == 0:
            return
        cs = self._cs
        end = offset + n
        a = -(-offset // cs) * cs
        b = end // cs * cs
        if a >= b:  # inside one cluster
            self._zero_partial(offset, n)
            return
        if offset < a:
            self._zero_partial(offset, a - offset)
        self._zero_clusters(a // cs, b // cs, make_zero_clusters=True)
        if b < end:
            self._zero_partial(b, end - b)

    def discard(self, offset: int, n: int) -> None:
        """Free the file space of whole allocated clusters in the range (they then read zeros).

        Partial clusters, zero clusters and unallocated clusters are left as
        they are (an unallocated cluster keeps showing the backing file).
        In bounded steps, as write_zeroes.
        """
        with self._lock:
            self._check_writable()
            self._check_range(offset, n)
        cs = self._cs
        a = -(-offset // cs)
        b = (offset + n) // cs
        if a < b:
            self._zero_clusters(a, b, make_zero_clusters=False)

    def _zero_partial(self, offset: int, n: int) -> None:
        with self._lock:
            runs = list(self._runs(offset, n))  # inside one cluster: one or two runs
        for start, length, kind, _host in runs:
            if kind == ClusterKind.ZERO:
                continue
            if kind == ClusterKind.UNALLOCATED and not self._reads_backing(start, length):
                continue
            self.write(start, bytes(length))

    def _zero_clusters(self, first: int, stop: int, *, make_zero_clusters: bool) -> None:
        """Clusters [first, stop): allocated ones punched (they read zeros), and with
        `make_zero_clusters` unallocated ones showing the backing file made zero clusters;
        one bounded step at a time, each under the lock."""
        ci = first
        while ci < stop:
            with self._lock:
                self._check_writable()
                ci = self._zero_step(ci, stop, make_zero_clusters)

    def _zero_limit(self) -> int:
        """The first cluster that shows no backing file when unallocated."""
        if self.backing is None:
            return -(-self.header.image_size // self._cs) if self._backing_missing else 0
        return -(-self.backing.size() // self._cs)

    def _zero_step(self, ci: int, stop: int, make_zero_clusters: bool) -> int:
        """One step of _zero_clusters from cluster ci, under the lock; where the next begins."""
        ne = self._ne
        l1i = ci // ne
        base = l1i * ne
        hi = min(stop, base + ne)
        zero_to = min(hi, self._zero_limit()) if make_zero_clusters else ci
        table = self._l2(l1i)
        if table is None:
            if zero_to > ci:  # a new table, whole, with zero clusters where the backing file shows
                self._new_table(l1i, ci - base, zero_to - base)
            return hi
        hi = min(hi, ci + STEP_ENTRIES)
        zero_to = min(zero_to, hi)
        lo, top = ci - base, hi - base
        no_data = _no_data(_table_to_bytes(table[lo:top]))
        if not no_data:
            self._punch_data(table, l1i, lo, top)
        if zero_to > ci:
            zhi = zero_to - base
            if 0 in table[lo:zhi]:
                if no_data:
                    table[lo:zhi] = _ONES * (zhi - lo)
                else:
                    for j in range(lo, zhi):
                        if table[j] == 0:
                            table[j] = L2_ZERO
                # (the read map has no entry for these: they were unallocated)
                self.f.pwrite(self._l1[l1i] + lo * 8, _table_to_bytes(table[lo:zhi]))
        return hi

    def _punch_data(self, table: array[int], l1i: int, lo: int, hi: int) -> None:
        """Free the file space of the data clusters of entries lo:hi (they stay allocated and
        read zeros), runs of consecutive clusters at once."""
        cs = self._cs
        run_start = run_len = 0
        for j in range(lo, hi):
            e = table[j]
            if e <= L2_ZERO:
                continue
            why = self._data_offset_problem(e)
            if why is not None:
                raise QedCorruptError(f"L2 table at {self._l1[l1i]:#x} entry {j} (guest offset "
                                      f"{(l1i * self._ne + j) * cs:#x}): data cluster {why}")
            if run_len and e == run_start + run_len:
                run_len += cs
                continue
            if run_len:
                self.f.discard(run_start, run_len)
            run_start, run_len = e, cs
        if run_len:
            self.f.discard(run_start, run_len)

    def _new_table(self, l1i: int, lo: int, hi: int) -> None:
        """A new L2 table for L1 entry l1i, entries lo:hi zero clusters: written whole and
        flushed before the L1 entry that points at it."""
        self._mark_dirty()
        table = array("Q", bytes(self._tb))
        table[lo:hi] = _ONES * (hi - lo)
        toff = self._file_size
        self.f.pwrite(toff, _table_to_bytes(table))
        self._file_size = toff + self._tb
        self._cache_l2(toff, table)
        bisect.insort(self._l2_starts, toff)
        self.f.flush()
        self._l1[l1i] = toff
        self.f.pwrite(self.header.l1_table_offset + l1i * 8, _table_to_bytes(self._l1[l1i:l1i + 1]))

    def flush(self) -> None:
        with self._lock:
            if self.closed:
                raise QedError("image is closed")
            if not self.read_only:
                self.f.flush()

    def grow(self, new_size: int) -> None:
        """Grow the guest size (a multiple of 512); shrinking is refused, as in QEMU."""
        with self._lock:
            self._check_writable()
            if new_size % SECTOR:
                raise QedRangeError(f"new size {new_size} is not a multiple of {SECTOR}")
            if new_size < self.header.image_size:
                raise QedUnsupportedError(f"shrinking from {self.header.image_size} to {new_size} is not supported")
            if new_size > self.header.max_image_size:
                raise QedRangeError(f"new size {new_size} exceeds the maximum {self.header.max_image_size}")
            if new_size == self.header.image_size:
                return
            self.header = self.header.replace(image_size=new_size)
            self._write_header()
            self.f.flush()
            if self._l1_used() != len(self._l1):  # more L1 entries in reach now
                self._load_metadata()

    # ---- allocation map

    def map(self, offset: int = 0, length: int | None = None, *, bounded: bool = False) -> list[Extent]:
        """Extents of [offset, offset+length): data here, zero here, from backing, or unallocated.

        `bounded`: the walk stops once STATUS_BUDGET is spent, and the extents cover a
        prefix of the range (at least one cluster's worth, or the range): what one block
        status request gets (NBD lets the reply be shorter than asked)."""
        from qbackend.block.qed_kinds import MapKind

        budget = _Budget() if bounded else None
        with self._lock:
            if length is None:
                length = self.header.image_size - offset
            self._check_range(offset, length)
            out: list[Extent] = []
            bsize = (self.backing.size() if self.backing is not None
                     else self.header.image_size if self._backing_missing else 0)
            bsize = -(-bsize // SECTOR) * SECTOR  # block status works in sectors
            for start, n, kind, host in self._runs(offset, length, budget):
                if kind == ClusterKind.DATA:
                    out.append(Extent(start, n, MapKind.DATA, host))
                elif kind == ClusterKind.ZERO:
                    out.append(Extent(start, n, MapKind.ZERO))
                else:
                    split = min(max(bsize, start), start + n)
                    if split > start:
                        out.append(Extent(start, split - start, MapKind.BACKING))
                    if split < start + n:
                        out.append(Extent(split, start + n - split, MapKind.UNALLOCATED))
            merged: list[Extent] = []
            for ext in out:
                last = merged[-1] if merged else None
                if last is not None and last.kind is ext.kind and ext.kind is not MapKind.DATA:
                    merged[-1] = Extent(last.start, last.length + ext.length, ext.kind)
                else:
                    merged.append(ext)
            return merged

    def allocation_depth(self, offset: int, length: int, *, bounded: bool = False) -> list[tuple[int, int]]:
        """(length, depth) of [offset, offset+length) through the backing chain: 1 where this
        image holds the data (or a zero cluster), 2 where its backing file does, and so on;
        0 where no layer does.  A raw backing file holds everything up to its end, and a
        backing file shorter than the image holds the rest too (as QEMU reports it).
        `bounded`: as map's; the runs then cover a prefix of the range."""
        from qbackend.block.qed_kinds import MapKind

        out: list[tuple[int, int]] = []
        for ext in self.map(offset, length, bounded=bounded):
            if ext.kind in (MapKind.DATA, MapKind.ZERO):
                out.append((ext.length, 1))
            elif self.backing is None:
                out.append((ext.length, 0))
            elif ext.kind is MapKind.UNALLOCATED:
                # Past the end of a shorter backing file: QEMU counts it to the backing layer
                # (its end of file reads zeros), and so does this, to report what qemu-nbd -A does.
                out.append((ext.length, 2))
            elif isinstance(self.backing, QedImage):
                below = self.backing.allocation_depth(ext.start, ext.length, bounded=bounded)
                out += [(n, depth + 1 if depth else 0) for n, depth in below]
                if sum(n for n, _ in below) < ext.length:
                    break  # the backing file's walk stopped early: so does this one
            else:
                out.append((ext.length, 2))
        return out

    # ---- check and repair

    def check(self, repair: bool = False, *, leaks_only: bool = False,
              progress: ProgressFn | None = None) -> CheckReport:
        """Check every invariant of the spec, count leaks, and with ``repair`` fix what can be fixed.

        Repairs: invalid L1/L2 entries (unaligned, in the header, past the end
        of the file, tables running past it, pointing into the header or the L1
        table) are set to 0 like QEMU does; leaked clusters at the end of the
        file are truncated away (leaks in the middle stay: QED has no free
        list).  Clusters referenced twice cannot be repaired.  NEED_CHECK is
        cleared when no corruption remains.  ``leaks_only`` repairs only leaks.
        """
        with self._lock:
            if repair:
                self._check_writable()
            try:
                return self._check(repair=repair, leaks_only=leaks_only, progress=progress)
            except BaseException:
                # Interrupted (Ctrl-C) or failed: the scan wrote nothing, and each repair it made is
                # whole on its own (an entry zeroed, leaked clusters truncated, after a flush); close
                # then leaves NEED_CHECK as it is, so the image is checked again on its next open.
                self._keep_need_check = True
                raise

    def _check(self, *, repair: bool, leaks_only: bool, progress: ProgressFn | None) -> CheckReport:
        from qbackend.block.qed_check import QedCheck  # the check is loaded only when used

        return QedCheck(self).run(repair=repair, leaks_only=leaks_only, progress=progress)

    # ---- info

    def info(self) -> dict[str, object]:
        h = self.header
        return {
            "format": "qed",
            "virtual-size": h.image_size,
            "cluster-size": h.cluster_size,
            "table-size": h.table_size,
            "header-size": h.header_size,
            "l1-table-offset": h.l1_table_offset,
            "features": h.features,
            "compat-features": h.compat_features,
            "autoclear-features": h.autoclear_features,
            "dirty-flag": self.dirty,
            "file-length": self.f.size(),
            "backing-filename": self.backing_name,
            "backing-filename-format": self.backing_format,
        }


def _block_dir(f: BlockFile) -> Path | None:
    from pathlib import Path

    path = getattr(f, "path", None)
    return Path(path).parent if path is not None else None
