"""The enums of the QED code (qbackend.block.qed and qed_check, which re-export them), in a
module of their own: opening, reading and checking a sound image need none of them, and
enum costs more to import than a `qbackend qed info` takes otherwise."""

from __future__ import annotations

from enum import Enum, IntFlag

from qbackend.block.qed import _BACKING_FILE, _BACKING_FORMAT_NO_PROBE, _NEED_CHECK


class Feature(IntFlag):
    """``features`` bits (QED spec, "Feature bits")."""

    BACKING_FILE = _BACKING_FILE
    NEED_CHECK = _NEED_CHECK
    BACKING_FORMAT_NO_PROBE = _BACKING_FORMAT_NO_PROBE


class MapKind(Enum):
    """What an extent of the guest view is (for block status)."""

    DATA = "data"  # allocated in this image
    ZERO = "zero"  # a zero cluster in this image
    BACKING = "backing"  # not in this image; read from the backing file
    UNALLOCATED = "unallocated"  # not in this image, nothing below: reads zeros


class ProblemKind(Enum):
    """What a check found wrong (qbackend.block.qed_check)."""

    BAD_L1_ENTRY = "bad L1 entry"  # unaligned, in the header, past EOF, table overruns EOF
    L1_INTO_METADATA = "L1 entry points into metadata"
    BAD_L2_ENTRY = "bad L2 entry"
    L2_INTO_METADATA = "L2 entry points into metadata"
    DUPLICATE = "cluster referenced twice"
    PARTIAL_CLUSTER = "partial cluster at end of file"


Feature.__module__ = MapKind.__module__ = "qbackend.block.qed"  # where they are documented and imported from
ProblemKind.__module__ = "qbackend.block.qed_check"
