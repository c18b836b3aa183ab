"""The PCI-hotplug register model driven the way QEMU's AML drives QEMU's
block (hw/acpi/pcihp.c: PCNT reads PCIU/PCID after BNUM, PCEJ writes BNUM
then B0EJ, AIDX writes BNUM then PIDX and reads PIDX; all DWordAcc), and
the 2011 profile's differences."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.models.pcihp import AIDX, DOWN, EJ, RMV, SEL, UP, EjectSlot, PciHotplugBlock, Profile


class Aml:
    def __init__(self, block: PciHotplugBlock) -> None:
        self.b = block
        self.notified: list[tuple[int, int, int]] = []  # (bsel, slot, type)
        self.effects: list[EjectSlot] = []

    def pcnt(self, bsel: int) -> None:
        self.b.write(SEL, 4, bsel)
        up, down = self.b.read(UP, 4), self.b.read(DOWN, 4)
        for slot in range(32):
            if up & (1 << slot):
                self.notified.append((bsel, slot, 1))
            if down & (1 << slot):
                self.notified.append((bsel, slot, 3))

    def pcej(self, bsel: int, sun: int) -> None:
        self.b.write(SEL, 4, bsel)
        self.effects += self.b.write(EJ, 4, 1 << sun)

    def aidx(self, bsel: int, sun: int) -> int:
        self.b.write(SEL, 4, bsel)
        self.b.write(AIDX, 4, 1 << sun)
        return self.b.read(AIDX, 4)


def test_hotplug_then_unplug_on_pc() -> None:
    b = PciHotplugBlock()
    b.set_removable(0, 0, False)  # host bridge
    b.set_removable(0, 1, False)  # ISA bridge
    b.plug(0, 2, "cold", hotplugged=False)
    aml = Aml(b)
    aml.pcnt(0)
    assert aml.notified == []
    b.plug(0, 3, "iv1", acpi_index=7)
    assert b.event_pending
    aml.pcnt(0)
    assert aml.notified == [(0, 3, 1)]
    assert b.read(UP, 4) == 0  # cleared by PCNT's read (bridge support)
    assert not b.event_pending
    assert aml.aidx(0, 3) == 7
    assert b.read(AIDX, 4) == 0  # read once, then cleared
    assert b.read(RMV, 4) == 0xFFFFFFFC
    b.request_unplug(0, 3)
    aml.pcnt(0)
    assert aml.notified[-1] == (0, 3, 3)
    assert b.read(DOWN, 4) == 1 << 3  # DOWN is not cleared on read
    aml.pcej(0, 3)
    assert aml.effects == [EjectSlot(0, 3, "iv1")]
    assert b.read(DOWN, 4) == 0
    b.unplugged(0, 3)
    assert b.slot_of("iv1") is None


def test_qemu_profile_details() -> None:
    b = PciHotplugBlock(buses=2)
    b.plug(1, 0, "d")
    assert b.read(UP, 1) == 0 and b.read(UP, 2) == 0  # only dword accesses decode
    b.write(SEL, 4, 1)
    assert b.read(SEL, 4) == 1
    b.write(SEL, 1, 0)  # ignored: not 4 bytes
    assert b.read(SEL, 4) == 1
    assert b.read(UP, 4) == 1
    assert b.read(EJ, 4) == 0
    b.write(SEL, 4, 300)  # no such bus: everything reads 0
    assert [b.read(o, 4) for o in (UP, DOWN, RMV, SEL)] == [0, 0, 0, 0]
    b.write(SEL, 4, 1)
    b.plug(1, 4, "e", acpi_index=9)
    b.write(AIDX, 4, 1 << 4)
    b.write(UP, 4, 0)  # any write clears the acpi-index first
    assert b.read(AIDX, 4) == 0
    effects = b.write(EJ, 4, (1 << 4) | (1 << 0))  # the lowest set bit only
    assert effects == [EjectSlot(1, 0, "d")]
    b.set_removable(1, 4, False)
    assert b.write(EJ, 4, 1 << 4) == []  # not removable: nothing happens


def test_without_bridge_support_up_is_sticky_and_sel_is_zero() -> None:
    b = PciHotplugBlock(buses=2, bridge_support=False)
    b.plug(0, 5, "x")
    b.write(SEL, 4, 1)
    assert b.read(SEL, 4) == 0
    assert b.read(UP, 4) == 1 << 5
    assert b.read(UP, 4) == 1 << 5


def test_2011_profile() -> None:
    b = PciHotplugBlock(profile=Profile.SPEC_2011)
    b.plug(0, 3, "a")
    b.plug(0, 4, "b")  # a new event zeroes the old one
    assert b.read(UP, 4) == 1 << 4
    assert b.read(UP, 4) == 1 << 4  # not cleared on read
    assert b.read(UP + 1, 1) == 0 and b.read(UP, 1) == 0x10  # byte reads work
    b.write(UP, 4, 0)  # UP and DOWN were writable
    assert b.read(UP, 4) == 0
    b.request_unplug(0, 4)
    assert b.write(EJ, 4, 1 << 4) == [EjectSlot(0, 4, "b")]
    assert b.read(DOWN, 4) == 1 << 4  # 2011: eject did not clear DOWN
    assert b.read(0x10, 4) == 0xFFFFFFFF  # no SEL in 2011


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["plug", "unplug_req", "read", "write"]),
                          st.integers(0, 31), st.sampled_from([0, 4, 8, 12, 16, 20]),
                          st.integers(0, 0xFFFFFFFF)), max_size=50))
def test_random_sequences_keep_the_invariants(ops: list[tuple[str, int, int, int]]) -> None:
    b = PciHotplugBlock(buses=2)
    for kind, slot, offset, value in ops:
        if kind == "plug":
            b.plug(slot % 2, slot, f"d{slot}")
        elif kind == "unplug_req":
            b.request_unplug(slot % 2, slot)
        elif kind == "read":
            got = b.read(offset, 4)
            assert 0 <= got <= 0xFFFFFFFF
        else:
            for effect in b.write(offset, 4, value):
                lowest = (value & -value).bit_length() - 1
                assert effect.slot == lowest and effect.bsel == (b.select if b.select < 256 else effect.bsel)
                bus = b.buses[effect.bsel]
                assert not (bus.up | bus.down) & (1 << lowest)  # eject cleared the slot's events
    for bus in b.buses.values():
        assert 0 <= bus.up <= 0xFFFFFFFF and 0 <= bus.down <= 0xFFFFFFFF


def test_a_machine_reset_keeps_the_devices_and_ends_pending_events() -> None:
    """QEMU carries out pending removals at a reset (DEVICE_DELETED follows); what stays is
    present at boot, so no UP is pending any more."""
    block = PciHotplugBlock()
    block.plug(0, 3, "a")
    block.plug(0, 4, "b")
    block.request_unplug(0, 4)
    block.machine_reset()
    bus = block.buses[0]
    assert (bus.up, bus.down, bus.devices) == (0, 0, {3: "a", 4: "b"})
    assert not block.event_pending
