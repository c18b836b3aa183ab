"""Pure model: FDT codec, DRC indexes and arrays, dynamic-memory-v2, and
the v6 hotplug event log, field by field."""

from __future__ import annotations

import struct
from datetime import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.models.spapr.drc import (
    Connector,
    Dimm,
    DrcError,
    DrcType,
    LmbFlags,
    MachineConfig,
    drc_arrays,
    drc_index,
    parse_drc_arrays,
    split_index,
)
from qbackend.models.spapr.events import EXTENDED_LEN, EventClass, EventLogError, HotplugEvent, HpAction, HpId, HpType
from qbackend.models.spapr.fdt import FdtError, Node, cells, decode, encode, to_dts

NOTES_CFG = MachineConfig(cpus=1, maxcpus=4, memory=1 << 30, maxmem=4 << 30, slots=4)


def sample_tree() -> Node:
    root = Node("")
    root.setprop_string("compatible", "qemu,pseries")
    cpus = root.add_subnode("cpus")
    cpus.setprop_cell("#size-cells", 0)
    root.add_subnode("chosen").setprop("empty", b"")
    cpus.add_subnode("cpu@0").setprop("reg", cells(0))
    return root


def test_libfdt_placement() -> None:
    n = Node("x")
    n.setprop_cell("a", 1)
    n.setprop_cell("b", 2)
    n.setprop_cell("a", 3)          # replaced in place
    assert list(n.props) == ["b", "a"] and n.props["a"] == cells(3)
    n.add_subnode("first")
    n.add_subnode("second")
    assert [c.name for c in n.children] == ["second", "first"]
    with pytest.raises(FdtError):
        n.add_subnode("first")


def test_fdt_round_trip_whole_and_with_trailing_data() -> None:
    root = sample_tree()
    blob = encode(root, reserve=[(0x1000, 0x2000)], boot_cpuid=3)
    parsed = decode(blob)
    assert parsed.root == root and parsed.reserve == ((0x1000, 0x2000),) and parsed.boot_cpuid == 3
    assert decode(blob + b"\xff" * 37).root == root
    assert encode(parsed.root, [(0x1000, 0x2000)], 3) == blob


def test_fdt_truncations_all_raise() -> None:
    blob = encode(sample_tree())
    for n in range(len(blob)):
        with pytest.raises(FdtError):
            decode(blob[:n])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 150))
def test_fdt_garbage_parses_or_raises_fdterror(noise: bytes, at: int) -> None:
    blob = bytearray(encode(sample_tree()))
    blob[at:at + len(noise)] = noise
    try:
        decode(bytes(blob))
    except FdtError:
        pass


def test_dts_rendering() -> None:
    text = to_dts(sample_tree())
    assert 'compatible = "qemu,pseries";' in text and "reg = <0x00>;" in text and "empty;" in text


def test_index_encoding() -> None:
    assert drc_index(DrcType.CPU, 3) == 0x10000003
    assert drc_index(DrcType.PHB, 30) == 0x2000001E
    assert drc_index(DrcType.VIO, 0x71000000) == 0x31000000   # id masked to 28 bits
    assert drc_index(DrcType.PCI, (1 << 16) | (5 << 8) | 0x10) == 0x40010510
    assert drc_index(DrcType.LMB, 4) == 0x80000004
    assert drc_index(DrcType.PMEM, 0) == 0x90000000
    assert split_index(0x80000004) == (DrcType.LMB, 4)
    for bad in (0x50000000, 0xF0000000, -1, 1 << 32):
        with pytest.raises(DrcError):
            split_index(bad)
    names = {k: (Connector.make(k, 7).name, k.type_name) for k in DrcType}
    assert names == {DrcType.CPU: ("CPU 7", "CPU"), DrcType.PHB: ("PHB 7", "PHB"),
                     DrcType.VIO: ("C7", "SLOT"), DrcType.PCI: ("C7", "28"),
                     DrcType.LMB: ("LMB 7", "MEM"), DrcType.PMEM: ("PMEM 7", "PMEM")}
    assert [k.physical for k in DrcType] == [False, False, True, True, False, False]


def test_arrays_layout() -> None:
    conns = [Connector.make(DrcType.CPU, 3), Connector.make(DrcType.LMB, 10)]
    a = drc_arrays(conns)
    assert a.indexes == cells(2, 0x10000003, 0x8000000A)
    assert a.power_domains == cells(2, -1, -1)
    assert a.names == cells(2) + b"CPU 3\0LMB 10\0"
    assert a.types == cells(2) + b"CPU\0MEM\0"
    assert [e.index for e in parse_drc_arrays(a.as_props())] == [0x10000003, 0x8000000A]
    assert drc_arrays([]).names == cells(0)
    bad = dict(a.as_props(), **{"ibm,drc-names": cells(3) + b"CPU 3\0LMB 10\0"})
    with pytest.raises(DrcError):
        parse_drc_arrays(bad)


def test_notes_machine_topology() -> None:
    """The measured DT of guest-and-hotplug-facts.md section 6."""
    props = NOTES_CFG.drc_properties()
    root = {e.index for e in parse_drc_arrays(props["/"].as_props())}
    assert root == ({0x20000000 + n for n in range(31)} | {0x90000000 + n for n in range(4)}
                    | {0x80000000 + n for n in range(4, 16)})
    cpus = [e.name for e in parse_drc_arrays(props["/cpus"].as_props())]
    assert cpus == ["CPU 0", "CPU 1", "CPU 2", "CPU 3"]
    pci = parse_drc_arrays(props["/pci@800000020000000"].as_props())
    assert len(pci) == 256 and pci[255].name == "C255" and pci[255].type == "28"


def test_qemu_order_reproduces_the_measured_order() -> None:
    """guest-and-hotplug-facts.md section 6 lists QEMU's root and /cpus order."""
    measured_root = [0x2000000F, 0x20000008, 0x20000009, 0x90000000, 0x90000001, 0x90000002,
                     0x90000003, 0x8000000A, 0x8000000B, 0x80000004, 0x8000000C, 0x20000010]
    props = NOTES_CFG.drc_properties(order="qemu")
    root = [e.index for e in parse_drc_arrays(props["/"].as_props())]
    assert root[:12] == measured_root and root[-1] == 0x20000007 and len(root) == 47
    cpus = [e.index for e in parse_drc_arrays(props["/cpus"].as_props())]
    assert cpus == [0x10000003, 0x10000000, 0x10000001, 0x10000002]
    with pytest.raises(DrcError):
        NOTES_CFG.drc_properties(order="random")


def test_ghash_table_behaviour() -> None:
    from qbackend.models.spapr.ghash import StrHashTable, iteration_order, str_hash
    assert str_hash("") == 5381 and str_hash("a") == (5381 * 33 + 97) & 0xFFFFFFFF
    keys = [f"{i:x}" for i in range(500)]
    assert sorted(iteration_order(keys)) == sorted(keys)
    t = StrHashTable()
    for k in keys:
        t.insert(k)
    t.insert("0")                       # present already: no change
    for k in keys[:450]:
        t.remove(k)                     # shrinks, tombstones cleaned
    assert sorted(t) == sorted(keys[450:]) and t.size < 1024


def test_dynamic_memory_v2_matches_the_guest_measurement() -> None:
    measured = bytes.fromhex("00000002 00000004 0000000000000000 00000000 ffffffff 000000a0"
                             " 0000000c 0000000040000000 80000004 ffffffff 00000000")
    assert NOTES_CFG.dynamic_memory_v2() == measured
    node = NOTES_CFG.dynamic_reconfiguration_memory()
    assert node is not None
    assert node.props["ibm,lmb-size"] == bytes.fromhex("0000000010000000")
    assert node.props["ibm,associativity-lookup-arrays"] == cells(1, 1, 0)
    assert node.props["ibm,memory-flags-mask"] == cells(0xFF)
    assert node.props["ibm,memory-preservation-time"] == cells(0)
    assert list(node.props)[0] == "ibm,associativity-lookup-arrays"  # libfdt order: last set first
    assert MachineConfig(memory=1 << 30).dynamic_reconfiguration_memory() is None
    assert NOTES_CFG.dynamic_reconfiguration_memory(numa_form=1).props[
        "ibm,associativity-lookup-arrays"] == cells(1, 4, 0, 0, 0, 0)


def test_dynamic_memory_v2_with_dimms_and_gap() -> None:
    cfg = MachineConfig(memory=1536 << 20, maxmem=5 << 30,
                        dimms=(Dimm(3 << 30, 512 << 20, node=0), Dimm(2 << 30, 256 << 20)))
    raw = cfg.dynamic_memory_v2()
    (count,) = struct.unpack_from(">I", raw)
    sets = [struct.unpack_from(">IQIII", raw, 4 + 24 * i) for i in range(count)]
    base = 2 << 30      # 1.5 GiB rounded up to 1 GiB
    assert sets == [
        (8, 0, 0, 0xFFFFFFFF, LmbFlags.RESERVED | LmbFlags.DRC_INVALID),
        (1, 2 << 30, 0x80000008, 0, LmbFlags.ASSIGNED | LmbFlags.HOTREMOVABLE),
        (3, (2 << 30) + (256 << 20), 0x80000009, 0xFFFFFFFF, 0),
        (2, 3 << 30, 0x8000000C, 0, LmbFlags.ASSIGNED | LmbFlags.HOTREMOVABLE),
        (8, (3 << 30) + (512 << 20), 0x8000000E, 0xFFFFFFFF, 0),
    ]
    assert sum(s[0] for s in sets[1:]) * (256 << 20) == cfg.device_mem_size
    assert cfg.device_mem_base == base


@pytest.mark.parametrize("kw", [
    dict(cpus=0), dict(cpus=3, maxcpus=2), dict(threads=3), dict(cpus=1, threads=2),
    dict(memory=300 << 20), dict(memory=64 << 20), dict(memory=1 << 30, maxmem=512 << 20),
    dict(slots=33), dict(phbs=(31,)), dict(phbs=(0,)), dict(phbs=(2, 2)),
    dict(memory=1 << 30, maxmem=2 << 30, dimms=(Dimm(0, 256 << 20),)),
])
def test_machine_validation(kw: dict[str, object]) -> None:
    with pytest.raises(DrcError):
        MachineConfig(**kw)  # type: ignore[arg-type]


def test_parse_size() -> None:
    """The one size parser: a bare number is in the unit the caller names."""
    from qbackend.sizes import SizeError, parse_size

    assert parse_size("512M", "m", default_unit="M") == parse_size("512", "m", default_unit="M") == 512 << 20
    assert parse_size("512", "s", default_unit="B") == 512
    assert parse_size("4G", "m", default_unit="B") == 4 << 30
    assert parse_size("1536MiB", "m", default_unit="B") == 1536 << 20
    assert parse_size("64k", "s", default_unit="B") == 64 << 10
    for bad in ("lots", "", "4X", "-1", "1.5G", "4Mi"):
        with pytest.raises(SizeError, match="is not a size"):
            parse_size(bad, "--size", default_unit="B")


# -- event log ------------------------------------------------------------------------------

WHEN = datetime(2026, 3, 9, 14, 5, 59)


@pytest.mark.parametrize("action", list(HpAction))
@pytest.mark.parametrize("id_type,index,count,union", [
    (HpId.DRC_INDEX, 0x80000004, 0, bytes.fromhex("80000004 00000000")),
    (HpId.DRC_COUNT, 0, 3, bytes.fromhex("00000003 00000000")),
    (HpId.DRC_COUNT_INDEXED, 0x80000010, 4, bytes.fromhex("00000004 80000010")),
])
def test_event_log_field_by_field(action: HpAction, id_type: HpId, index: int, count: int,
                                  union: bytes) -> None:
    ev = HotplugEvent(HpType.MEMORY, action, id_type, index=index, count=count, plid=0x01020304,
                      when=WHEN)
    b = ev.log()
    assert len(b) == 8 + 108 == 8 + EXTENDED_LEN
    # rtas_error_log header
    assert b[0:4] == bytes.fromhex("063460e5")      # v6 | event | not recovered | optional | hotplug | 0xE5
    assert b[4:8] == struct.pack(">I", 108)
    v6 = b[8:24]
    assert v6[0] == 0x86 and v6[1] == 0 and v6[2] == 0x8E and v6[3:12] == bytes(9) and v6[12:16] == b"IBM\0"
    maina = b[24:72]
    assert maina[0:2] == b"PH" and maina[2:4] == struct.pack(">H", 48) and maina[4:8] == bytes(4)
    assert maina[8:12] == bytes.fromhex("20260309")                  # BCD date
    assert maina[12:16] == bytes.fromhex("14055900")                 # BCD time
    assert maina[16:24] == bytes(8) and maina[24:25] == b"H" and maina[25:27] == bytes(2)
    assert maina[27] == 3 and maina[28:40] == bytes(12)
    assert maina[40:44] == bytes.fromhex("04030201")                 # plid, host (little) order
    assert maina[44:48] == bytes(4)
    mainb = b[72:96]
    assert mainb[0:2] == b"UH" and mainb[2:4] == struct.pack(">H", 24) and mainb[4:8] == bytes(4)
    assert mainb[8] == 0x80 and mainb[9:24] == bytes(15)
    hp = b[96:116]
    assert hp[0:2] == b"HP" and hp[2:4] == struct.pack(">H", 20)
    assert hp[4] == 1 and hp[5] == 0 and hp[6:8] == bytes(2)         # version 1, subtype, creator
    assert hp[8] == HpType.MEMORY == 2 and hp[9] == action and hp[10] == id_type and hp[11] == 0
    assert hp[12:20] == union
    assert HotplugEvent.parse(b + b"\0" * 64) == ev
    assert HotplugEvent.parse(ev.log("big"), "big").plid == 0x01020304
    assert ev.log("big")[64:68] == bytes.fromhex("01020304")


def test_event_log_types_and_garbage() -> None:
    assert [int(t) for t in HpType] == [1, 2, 3, 4, 5, 6]
    assert EventClass.HOT_PLUG.mask == 0x10000000 and EventClass.EPOW.mask == 0x40000000
    good = HotplugEvent(HpType.CPU, HpAction.ADD, HpId.DRC_INDEX, index=0x10000001, when=WHEN).log()
    for n in range(len(good)):
        with pytest.raises(EventLogError):
            HotplugEvent.parse(good[:n])
    for pos in (0, 8, 10, 24, 48, 72, 96, 104, 105, 106):
        bad = bytearray(good)
        bad[pos] ^= 0xFF
        with pytest.raises(EventLogError):
            HotplugEvent.parse(bytes(bad))
    with pytest.raises(EventLogError):
        HotplugEvent(HpType.CPU, HpAction.ADD, HpId.DRC_NAME)
