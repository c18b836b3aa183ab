"""The memory-hotplug register model driven the way QEMU's AML drives QEMU's
block (hw/acpi/memory_hotplug.c, build_memory_hotplug_aml): DWordAcc fields
for the registers, a ByteAcc/WriteAsZeros field at 0x14, and the MSCN,
_STA, _CRS, _PXM, _OST and _EJ0 methods.  Then hypothesis: random access
sequences against a small reference model, for both profiles."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.models.memhp import (
    CONTROL_CLEAR_INSERT,
    CONTROL_CLEAR_REMOVE,
    CONTROL_EJECT,
    EjectRefused,
    EjectRequested,
    MemoryHotplugBlock,
    OstReported,
    Profile,
)

GiB = 1 << 30


class Ospm:
    """The guest's ACPI methods over the block, with the AML's access widths."""

    def __init__(self, block: MemoryHotplugBlock) -> None:
        self.b = block
        self.notified: list[tuple[int, int]] = []  # MTFY(slot, event)
        self.effects: list[object] = []

    def dword(self, offset: int) -> int:
        return self.b.read(offset, 4)

    def select(self, slot: int) -> None:
        self.effects += self.b.write(0x0, 4, slot)

    def bit(self, n: int) -> int:  # reading a 1-bit field of the ByteAcc region
        return (self.b.read(0x14, 1) >> n) & 1

    def set_bit(self, n: int) -> None:  # WriteAsZeros: one byte with only that bit
        self.effects += self.b.write(0x14, 1, 1 << n)

    def mscn(self) -> None:
        for idx in range(len(self.b.slots)):
            self.select(idx)
            if self.bit(1):  # MINS
                self.notified.append((idx, 1))
                self.set_bit(1)
            elif self.bit(2):  # MRMV
                self.notified.append((idx, 3))
                self.set_bit(2)

    def sta(self, slot: int) -> int:
        self.select(slot)
        return 0xF if self.bit(0) else 0

    def crs(self, slot: int) -> tuple[int, int]:
        self.select(slot)
        hi, lo = self.dword(0x4), self.dword(0x0)  # MRBH, MRBL
        lhi, llo = self.dword(0xC), self.dword(0x8)  # MRLH, MRLL
        return hi << 32 | lo, lhi << 32 | llo

    def pxm(self, slot: int) -> int:
        self.select(slot)
        return self.dword(0x10)

    def ost(self, slot: int, event: int, status: int) -> None:
        self.select(slot)
        self.effects += self.b.write(0x4, 4, event)
        self.effects += self.b.write(0x8, 4, status)

    def ej0(self, slot: int) -> None:
        self.select(slot)
        self.set_bit(3)


def test_hot_add_as_the_guest_sees_it() -> None:
    b = MemoryHotplugBlock(4)
    b.plug(0, 4 * GiB, 512 << 20, 0, "cold", hotplugged=False)
    ospm = Ospm(b)
    ospm.mscn()
    assert ospm.notified == []  # cold-plugged: no insert event
    b.plug(2, 4 * GiB + (512 << 20), 256 << 20, 1, "hot")
    assert b.event_pending
    ospm.mscn()
    assert ospm.notified == [(2, 1)]
    assert not b.event_pending and not b.slots[2].inserting
    assert ospm.sta(2) == 0xF and ospm.sta(1) == 0
    assert ospm.crs(2) == (4 * GiB + (512 << 20), 256 << 20)
    assert ospm.pxm(2) == 1
    ospm.ost(2, 1, 0)
    assert ospm.effects[-1] == OstReported(2, "hot", 1, 0)


def test_hot_remove_as_the_guest_sees_it() -> None:
    b = MemoryHotplugBlock(2)
    b.plug(1, 5 * GiB, 1 << 30, 0, "d1")
    ospm = Ospm(b)
    ospm.mscn()
    b.request_unplug(1)
    ospm.mscn()
    assert ospm.notified[-1] == (1, 3)
    assert not b.slots[1].removing
    ospm.ost(1, 3, 0x84)  # eject in progress
    ospm.ej0(1)
    assert EjectRequested(1, "d1") in ospm.effects
    b.unplugged(1)
    assert ospm.sta(1) == 0 and ospm.crs(1) == (0, 0)


def test_eject_of_a_disabled_slot_is_ignored() -> None:
    b = MemoryHotplugBlock(2)
    ospm = Ospm(b)
    ospm.ej0(0)
    assert ospm.effects == []


def test_qemu_profile_register_details() -> None:
    b = MemoryHotplugBlock(2)
    b.plug(0, 0x1_2345_6000, 0x4000_0000, 3, "d")
    b.write(0, 1, 0)
    assert b.read(0x0, 4) == 0x2345_6000 and b.read(0x4, 4) == 1
    assert b.read(0x0, 1) == 0x00 and b.read(0x0, 2) == 0x6000  # narrow reads at 0 give the low bytes
    assert b.read(0x1, 1) == 0xFF and b.read(0x2, 2) == 0xFFFF  # undocumented offsets: all ones
    assert b.read(0x15, 1) == 0xFF
    b.write(0x0, 4, 7)  # out of range: everything reads 0
    assert [b.read(o, 4) for o in range(0, 0x18, 4)] == [0] * 6
    assert b.write(0x14, 1, CONTROL_EJECT) == []  # and writes are ignored
    b.write(0x0, 4, 0)
    b.slots[0].inserting = b.slots[0].removing = True
    b.write(0x14, 1, CONTROL_CLEAR_INSERT | CONTROL_CLEAR_REMOVE | CONTROL_EJECT)  # one action: clear insert
    assert not b.slots[0].inserting and b.slots[0].removing
    assert b.write(0x14, 1, CONTROL_CLEAR_REMOVE | CONTROL_EJECT) == []  # clear remove, no eject
    assert b.write(0x14, 1, CONTROL_EJECT) == [EjectRequested(0, "d")]


def test_spec_2_4_profile_register_details() -> None:
    b = MemoryHotplugBlock(2, Profile.SPEC_2_4)
    b.plug(0, 0x1_2345_6000, 0x4000_0000, 3, "d")
    assert b.read(0x1, 1) == 0x60 and b.read(0x4, 1) == 0x01  # each byte of a register reads as itself
    assert b.read(0x15, 1) == 0xFF
    b.write(0x0, 4, 7)
    assert b.read(0x0, 4) == 0xFFFFFFFF  # out of range: all ones, as the 2.4 text says
    b.write(0x0, 4, 0)
    b.slots[0].inserting = b.slots[0].removing = True
    effects = b.write(0x14, 1, CONTROL_CLEAR_INSERT | CONTROL_CLEAR_REMOVE | CONTROL_EJECT)
    assert not b.slots[0].inserting and not b.slots[0].removing  # every bit acts
    assert effects == [EjectRequested(0, "d")]


def test_fault_hooks_in_the_model() -> None:
    b = MemoryHotplugBlock(2)
    b.plug(0, 4 * GiB, 1 << 30, 0, "d")
    ospm = Ospm(b)
    b.faults.refuse_eject.add(0)
    ospm.ej0(0)
    assert ospm.effects[-1] == EjectRefused(0)
    b.faults.ost_status[0] = 0x82
    ospm.ost(0, 3, 0)
    assert ospm.effects[-1] == OstReported(0, "d", 3, 0x82)
    b.spurious_insert(1)
    ospm.mscn()
    assert (1, 1) in ospm.notified and ospm.sta(1) == 0
    b.faults.hold_remove.add(0)
    b.request_unplug(0)
    ospm.mscn()
    ospm.mscn()
    assert ospm.notified[-2:] == [(0, 3), (0, 3)]  # the remove event stays: OSPM sees it again
    assert b.event_pending


# -- random access sequences against a reference model ---------------------------------


@dataclass
class RefSlot:
    regs: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])
    flags: int = 0


class Reference:
    """The block as a table of dword registers and flag bits, written
    independently of backend.memhp from the notes' description."""

    def __init__(self, n: int, profile: Profile) -> None:
        self.profile, self.sel = profile, 0
        self.slots = [RefSlot() for _ in range(n)]
        self.ost_event = self.ost_status = 0

    def dword(self, slot: RefSlot, reg: int) -> int:
        return slot.flags if reg == 5 else slot.regs[reg]

    def read(self, off: int, size: int) -> int:
        mask = (1 << (8 * size)) - 1
        if not 0 <= self.sel < len(self.slots):
            return 0 if self.profile is Profile.QEMU else mask
        slot = self.slots[self.sel]
        if self.profile is Profile.QEMU:
            return self.dword(slot, off // 4) & mask if off % 4 == 0 and off <= 0x14 else mask
        data = b"".join(self.dword(slot, r).to_bytes(4, "little") for r in range(6))[:0x15] + b"\xff" * 3
        return int.from_bytes(data[off:off + size].ljust(size, b"\xff"), "little")

    def write(self, off: int, size: int, val: int) -> list[str]:
        val &= (1 << (8 * size)) - 1
        if off == 0:
            self.sel = val
            return []
        if not 0 <= self.sel < len(self.slots):
            return []
        slot = self.slots[self.sel]
        if off == 4:
            self.ost_event = val
        elif off == 8:
            self.ost_status = val
            return ["ost"]
        elif off == 0x14:
            bits = [b for b in (2, 4, 8) if val & b]
            if self.profile is Profile.QEMU:
                bits = bits[:1]
            out = []
            for b in bits:
                if b in (2, 4):
                    slot.flags &= ~b
                elif slot.flags & 1:
                    out.append("eject")
            return out
        return []


accesses = st.lists(st.tuples(
    st.sampled_from(["r", "w"]), st.integers(0, 0x17), st.sampled_from([1, 2, 4]), st.integers(0, 0xFFFFFFFF)),
    max_size=60)


@settings(max_examples=200, deadline=None)
@given(profile=st.sampled_from(list(Profile)), ops=accesses,
       plugged=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 40), st.integers(1, 1 << 36),
                                  st.integers(0, 7), st.booleans(), st.booleans()), max_size=4))
def test_random_accesses_match_the_reference(profile: Profile, ops: list[tuple[str, int, int, int]],
                                             plugged: list[tuple[int, int, int, int, bool, bool]]) -> None:
    b = MemoryHotplugBlock(4, profile)
    ref = Reference(4, profile)
    for slot, addr, size, node, inserting, removing in plugged:
        b.plug(slot, addr, size, node, f"d{slot}", hotplugged=inserting)
        b.slots[slot].removing = removing
        ref.slots[slot] = RefSlot([addr & 0xFFFFFFFF, addr >> 32, size & 0xFFFFFFFF, size >> 32, node],
                                  1 | (2 if inserting else 0) | (4 if removing else 0))
    for kind, off, size, val in ops:
        if kind == "r":
            assert b.read(off, size) == ref.read(off, size), (kind, off, size)
        else:
            got = b.write(off, size, val)
            want = ref.write(off, size, val)
            assert ["ost" if isinstance(e, OstReported) else "eject" for e in got] == want
    assert [s.status for s in b.slots] == [s.flags for s in ref.slots]


def test_a_machine_reset_keeps_the_dimms_and_drops_pending_inserts() -> None:
    """What was plugged stays (address, size, node, enabled); its insert event is stale after a
    reset (the DIMM is present at boot); a requested removal stays requested, as in QEMU."""
    block = MemoryHotplugBlock(3)
    block.plug(0, 0x1_0000_0000, 128 << 20, 1, "d0")
    block.plug(1, 0x1_0800_0000, 128 << 20, 0, "d1")
    block.request_unplug(1)
    block.machine_reset()
    assert [(s.address, s.size, s.node, s.enabled, s.inserting, s.removing) for s in block.slots] == [
        (0x1_0000_0000, 128 << 20, 1, True, False, False),
        (0x1_0800_0000, 128 << 20, 0, True, False, True),
        (0, 0, 0, False, False, False)]
    assert block.event_pending  # the removal request
