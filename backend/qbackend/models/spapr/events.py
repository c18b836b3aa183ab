"""RTAS event logs for hotplug requests: the version-6 layout QEMU 11.1
queues for ``check-exception`` (spapr_events.c), sans-IO.

A log is an 8-byte header ``{summary, extended_length}`` followed by the
extended log: the v6 header (16 bytes), Main-A "PH" (48), Main-B "UH" (24)
and the hotplug section "HP" (20), 108 bytes in all, big-endian except
Main-A's ``plid``, which QEMU stores in host byte order.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum, IntFlag

from qbackend.errors import ModelError
from qbackend.models.spapr.drc import DrcType


class EventLogError(ModelError):
    """Bytes that are not a hotplug event log of this layout."""


class Summary(IntFlag):
    VERSION_6 = 0x06000000
    SEVERITY_EVENT = 0x00200000
    DISPOSITION_NOT_RECOVERED = 0x00100000
    OPTIONAL_PART_PRESENT = 0x00040000
    INITIATOR_HOTPLUG = 0x00006000


class LogType(IntEnum):
    EPOW = 0x40
    HOTPLUG = 0xE5


HOTPLUG_SUMMARY = (Summary.VERSION_6 | Summary.SEVERITY_EVENT | Summary.DISPOSITION_NOT_RECOVERED
                   | Summary.OPTIONAL_PART_PRESENT | Summary.INITIATOR_HOTPLUG) | LogType.HOTPLUG


class EventClass(IntEnum):
    """check-exception event classes; the mask bit is ``1 << (31 - class)``."""

    INTERNAL_ERRORS = 0
    EPOW = 1
    HOT_PLUG = 3
    IO = 4

    @property
    def mask(self) -> int:
        return 1 << (31 - self.value)


class HpType(IntEnum):
    CPU = 1
    MEMORY = 2
    SLOT = 3
    PHB = 4
    PCI = 5
    PMEM = 6


HP_TYPE_OF = {DrcType.CPU: HpType.CPU, DrcType.LMB: HpType.MEMORY, DrcType.PHB: HpType.PHB,
              DrcType.PCI: HpType.PCI, DrcType.PMEM: HpType.PMEM}


class HpAction(IntEnum):
    ADD = 1
    REMOVE = 2


class HpId(IntEnum):
    DRC_NAME = 1
    DRC_INDEX = 2
    DRC_COUNT = 3
    DRC_COUNT_INDEXED = 4


HEADER = struct.Struct(">II")
V6HDR = struct.Struct(">BBB9sI")           # b0, reserved, b2, reserved, company
SECTION = struct.Struct(">2sHBBH")          # id, length, version, subtype, creator component
MAINA_TAIL = struct.Struct(">II8scxxB4x8s4s4x")  # date, time, platform, creator, count, platform, plid
MAINB_TAIL = struct.Struct(">BxBB4x2xH4x")  # subsystem, severity, subtype, action flags
HP_TAIL = struct.Struct(">BBBx8s")          # type, action, identifier, union
V6_B0 = 0x80 | 0x04 | 0x02                  # valid, new log, big-endian
V6_B2 = 0x80 | 0x0E                         # PowerPC format, platform event
COMPANY_IBM = 0x49424D00
MAINA_LEN, MAINB_LEN, HP_LEN = 48, 24, 20
EXTENDED_LEN = V6HDR.size + MAINA_LEN + MAINB_LEN + HP_LEN


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _unbcd(v: int) -> int:
    hi, lo = v >> 4, v & 0xF
    if hi > 9 or lo > 9:
        raise EventLogError(f"{v:#x} is not BCD")
    return hi * 10 + lo


@dataclass(frozen=True)
class HotplugEvent:
    """One hotplug request.  ``index`` is for DRC_INDEX and
    DRC_COUNT_INDEXED, ``count`` for DRC_COUNT and DRC_COUNT_INDEXED."""

    hp_type: HpType
    action: HpAction
    id_type: HpId
    index: int = 0
    count: int = 0
    plid: int = 0
    when: datetime = datetime(2000, 1, 1)

    def __post_init__(self) -> None:
        if self.id_type is HpId.DRC_NAME:
            raise EventLogError("QEMU never identifies a DRC by name")
        for v in (self.index, self.count, self.plid):
            if not 0 <= v <= 0xFFFFFFFF:
                raise EventLogError(f"{v} does not fit 32 bits")

    @property
    def summary(self) -> int:
        return int(HOTPLUG_SUMMARY)

    def identifier(self) -> bytes:
        if self.id_type is HpId.DRC_INDEX:
            return struct.pack(">I4x", self.index)
        if self.id_type is HpId.DRC_COUNT:
            return struct.pack(">I4x", self.count)
        return struct.pack(">II", self.count, self.index)

    def extended(self, plid_order: str = "little") -> bytes:
        """The 108-byte extended log; ``plid_order`` is QEMU's host byte order."""
        w = self.when
        date = (_bcd(w.year // 100) << 24) | (_bcd(w.year % 100) << 16) | (_bcd(w.month) << 8) \
            | _bcd(w.day)
        time = (_bcd(w.hour) << 24) | (_bcd(w.minute) << 16) | (_bcd(w.second) << 8)
        plid = self.plid.to_bytes(4, "little" if plid_order == "little" else "big")
        v6 = V6HDR.pack(V6_B0, 0, V6_B2, b"", COMPANY_IBM)
        maina = SECTION.pack(b"PH", MAINA_LEN, 0, 0, 0) + MAINA_TAIL.pack(
            date, time, b"", b"H", 3, b"", plid)
        mainb = SECTION.pack(b"UH", MAINB_LEN, 0, 0, 0) + MAINB_TAIL.pack(0x80, 0, 0, 0)
        hp = SECTION.pack(b"HP", HP_LEN, 1, 0, 0) + HP_TAIL.pack(
            self.hp_type, self.action, self.id_type, self.identifier())
        out = v6 + maina + mainb + hp
        assert len(out) == EXTENDED_LEN
        return out

    def log(self, plid_order: str = "little") -> bytes:
        """Header plus extended log: what check-exception writes."""
        ext = self.extended(plid_order)
        return HEADER.pack(self.summary, len(ext)) + ext

    @classmethod
    def parse(cls, data: bytes, plid_order: str = "little") -> HotplugEvent:
        """Decode a full log, checking every fixed field; trailing bytes are
        ignored (the guest's buffer is larger)."""
        if len(data) < HEADER.size + EXTENDED_LEN:
            raise EventLogError(f"{len(data)} bytes is shorter than a hotplug log")
        summary, ext_len = HEADER.unpack_from(data)
        if summary != HOTPLUG_SUMMARY:
            raise EventLogError(f"summary {summary:#010x} is not a v6 hotplug event")
        if ext_len != EXTENDED_LEN:
            raise EventLogError(f"extended length {ext_len}, expected {EXTENDED_LEN}")
        pos = HEADER.size
        b0, _, b2, _, company = V6HDR.unpack_from(data, pos)
        if (b0, b2, company) != (V6_B0, V6_B2, COMPANY_IBM):
            raise EventLogError("bad v6 header")
        pos += V6HDR.size
        sections = []
        for sid, length in ((b"PH", MAINA_LEN), (b"UH", MAINB_LEN), (b"HP", HP_LEN)):
            got = SECTION.unpack_from(data, pos)
            if got[0] != sid or got[1] != length:
                raise EventLogError(f"expected section {sid!r} of {length} bytes, got {got[:2]}")
            sections.append((got, pos + SECTION.size))
            pos += length
        (_, a_off), (_, b_off), (hp_hdr, h_off) = sections
        date, time, _, creator, count, _, plid = MAINA_TAIL.unpack_from(data, a_off)
        if creator != b"H" or count != 3:
            raise EventLogError("Main-A is not a hypervisor log of 3 sections")
        subsystem, _, _, _ = MAINB_TAIL.unpack_from(data, b_off)
        if subsystem != 0x80 or hp_hdr[2] != 1:
            raise EventLogError("bad Main-B subsystem or HP section version")
        hp_type, action, id_type, union = HP_TAIL.unpack_from(data, h_off)
        try:
            t, a, i = HpType(hp_type), HpAction(action), HpId(id_type)
        except ValueError as e:
            raise EventLogError(str(e)) from None
        first, second = struct.unpack(">II", union)
        index, cnt = {HpId.DRC_INDEX: (first, 0), HpId.DRC_COUNT: (0, first),
                      HpId.DRC_COUNT_INDEXED: (second, first)}.get(i, (0, 0))
        when = datetime(_unbcd(date >> 24) * 100 + _unbcd((date >> 16) & 0xFF),
                        _unbcd((date >> 8) & 0xFF), _unbcd(date & 0xFF),
                        _unbcd(time >> 24), _unbcd((time >> 16) & 0xFF), _unbcd((time >> 8) & 0xFF))
        return cls(t, a, i, index=index, count=cnt,
                   plid=int.from_bytes(plid, "little" if plid_order == "little" else "big"),
                   when=when)
