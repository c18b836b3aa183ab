"""The DRC state machine and RTAS calls, transition by transition and
return code by return code (QEMU 11.1 spapr_drc.c / spapr_rtas.c)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from qbackend.models.spapr.drc import (
    DrcError,
    DrcType,
    MachineConfig,
    PciFunction,
    cpu_node,
    drc_index,
    lmb_node,
    pci_node,
)
from qbackend.models.spapr.events import EventClass, HotplugEvent, HpAction, HpId, HpType
from qbackend.models.spapr.fdt import Node, decode, encode, to_dts
from qbackend.models.spapr.state import (
    TRANSITIONS,
    CcResponse,
    Device,
    DeviceRemoved,
    DrcSet,
    DrcState,
    DrcStateError,
    FlatMemory,
    IrqPulse,
    Op,
    Released,
    RtasStatus,
    UnplugRejected,
    rtas_call,
    walk_configure_connector,
)

S = DrcState
R = RtasStatus
ISO, IND, ALLOC = 9001, 9002, 9003
CPU1, LMB4, PCI8, PHB1 = 0x10000001, 0x80000004, 0x40000008, 0x20000001


def machine() -> DrcSet:
    return DrcSet.for_machine(MachineConfig(cpus=1, maxcpus=4, memory=1 << 30, maxmem=2 << 30, slots=2))


def put(s: DrcSet, index: int, state: DrcState, device: bool = True, unplug: bool = False) -> None:
    drc = s.drc(index)
    drc.device = Device(f"dev{index:x}", lambda i: Node(f"n@{i:x}")) if device else None
    drc.state, drc.unplug_requested = state, unplug


# (index, op value for set-indicator, from state, device?, unplug requested?)
#   -> (rc, state after, effect types)
CASES = [
    # physical isolate
    (PCI8, (ISO, 0), S.PHYSICAL_POWERON, True, False, R.SUCCESS, S.PHYSICAL_POWERON, []),
    (PCI8, (ISO, 0), S.PHYSICAL_CONFIGURED, True, False, R.SUCCESS, S.PHYSICAL_POWERON, []),
    (PCI8, (ISO, 0), S.PHYSICAL_CONFIGURED, True, True, R.SUCCESS, S.PHYSICAL_POWERON,
     [Released, DeviceRemoved]),
    (PCI8, (ISO, 0), S.PHYSICAL_UNISOLATE, True, False, R.PARAM_ERROR, S.PHYSICAL_UNISOLATE, []),
    # physical unisolate
    (PCI8, (ISO, 1), S.PHYSICAL_UNISOLATE, True, False, R.SUCCESS, S.PHYSICAL_UNISOLATE, []),
    (PCI8, (ISO, 1), S.PHYSICAL_CONFIGURED, True, False, R.SUCCESS, S.PHYSICAL_CONFIGURED, []),
    (PCI8, (ISO, 1), S.PHYSICAL_POWERON, True, False, R.SUCCESS, S.PHYSICAL_UNISOLATE, []),
    (PCI8, (ISO, 1), S.PHYSICAL_POWERON, False, False, R.NO_SUCH_INDICATOR, S.PHYSICAL_POWERON, []),
    # logical isolate
    (CPU1, (ISO, 0), S.LOGICAL_AVAILABLE, True, False, R.SUCCESS, S.LOGICAL_AVAILABLE, []),
    (CPU1, (ISO, 0), S.LOGICAL_UNUSABLE, False, False, R.SUCCESS, S.LOGICAL_UNUSABLE, []),
    (CPU1, (ISO, 0), S.LOGICAL_CONFIGURED, True, False, R.SUCCESS, S.LOGICAL_AVAILABLE, []),
    (LMB4, (ISO, 0), S.LOGICAL_CONFIGURED, True, False, R.HW_ERROR, S.LOGICAL_CONFIGURED, []),
    (LMB4, (ISO, 0), S.LOGICAL_CONFIGURED, True, True, R.SUCCESS, S.LOGICAL_AVAILABLE, []),
    (CPU1, (ISO, 0), S.LOGICAL_UNISOLATE, True, False, R.PARAM_ERROR, S.LOGICAL_UNISOLATE, []),
    # logical unisolate
    (CPU1, (ISO, 1), S.LOGICAL_UNISOLATE, True, False, R.SUCCESS, S.LOGICAL_UNISOLATE, []),
    (CPU1, (ISO, 1), S.LOGICAL_CONFIGURED, True, False, R.SUCCESS, S.LOGICAL_CONFIGURED, []),
    (CPU1, (ISO, 1), S.LOGICAL_CONFIGURED, True, True, R.SUCCESS, S.LOGICAL_CONFIGURED, [UnplugRejected]),
    (LMB4, (ISO, 1), S.LOGICAL_UNISOLATE, True, True, R.SUCCESS, S.LOGICAL_UNISOLATE, [UnplugRejected]),
    (CPU1, (ISO, 1), S.LOGICAL_AVAILABLE, True, False, R.SUCCESS, S.LOGICAL_UNISOLATE, []),
    (CPU1, (ISO, 1), S.LOGICAL_UNUSABLE, False, False, R.NO_SUCH_INDICATOR, S.LOGICAL_UNUSABLE, []),
    # allocation usable
    (CPU1, (ALLOC, 1), S.LOGICAL_UNUSABLE, True, False, R.SUCCESS, S.LOGICAL_AVAILABLE, []),
    (CPU1, (ALLOC, 1), S.LOGICAL_UNUSABLE, False, False, R.NO_SUCH_INDICATOR, S.LOGICAL_UNUSABLE, []),
    (CPU1, (ALLOC, 1), S.LOGICAL_UNUSABLE, True, True, R.NO_SUCH_INDICATOR, S.LOGICAL_UNUSABLE, []),
    (CPU1, (ALLOC, 1), S.LOGICAL_AVAILABLE, True, False, R.SUCCESS, S.LOGICAL_AVAILABLE, []),
    (CPU1, (ALLOC, 1), S.LOGICAL_UNISOLATE, True, False, R.SUCCESS, S.LOGICAL_UNISOLATE, []),
    (CPU1, (ALLOC, 1), S.LOGICAL_CONFIGURED, True, False, R.SUCCESS, S.LOGICAL_CONFIGURED, []),
    # allocation unusable
    (CPU1, (ALLOC, 0), S.LOGICAL_UNUSABLE, True, False, R.SUCCESS, S.LOGICAL_UNUSABLE, []),
    (CPU1, (ALLOC, 0), S.LOGICAL_AVAILABLE, True, False, R.SUCCESS, S.LOGICAL_UNUSABLE, []),
    (CPU1, (ALLOC, 0), S.LOGICAL_AVAILABLE, True, True, R.SUCCESS, S.LOGICAL_UNUSABLE,
     [Released, DeviceRemoved]),
    (CPU1, (ALLOC, 0), S.LOGICAL_UNISOLATE, True, False, R.NO_SUCH_INDICATOR, S.LOGICAL_UNISOLATE, []),
    (CPU1, (ALLOC, 0), S.LOGICAL_CONFIGURED, True, False, R.NO_SUCH_INDICATOR, S.LOGICAL_CONFIGURED, []),
]


@pytest.mark.parametrize("index,call,start,dev,unplug,rc,end,effects", CASES)
def test_transition(index: int, call: tuple[int, int], start: DrcState, dev: bool, unplug: bool,
                    rc: RtasStatus, end: DrcState, effects: list[type]) -> None:
    s = machine()
    put(s, index, start, dev, unplug)
    res = s.set_indicator([call[0], index, call[1]])
    assert res.status == rc
    assert s.drc(index).state is end
    assert [type(e) for e in res.effects] == effects
    if Released in effects:
        assert s.drc(index).device is None and not s.drc(index).unplug_requested
    if UnplugRejected in effects:
        assert not s.drc(index).unplug_requested and s.drc(index).device is not None


def test_cases_cover_every_table_entry() -> None:
    covered = set()
    for index, (sensor, value), start, *_ in CASES:
        physical = index >> 28 == DrcType.PCI
        op = {(ISO, 0): Op.ISOLATE, (ISO, 1): Op.UNISOLATE, (ALLOC, 1): Op.SET_USABLE,
              (ALLOC, 0): Op.SET_UNUSABLE}[(sensor, value)]
        covered.add((physical, op, start))
    table = {(p, op, st) for (p, op), rules in TRANSITIONS.items() for st in rules}
    assert covered == table


def test_rtas_return_codes() -> None:
    s = machine()
    assert R.PARAM_ERROR == R.NOT_SUPPORTED == R.NO_SUCH_INDICATOR == -3
    # wrong nargs / nret
    assert s.set_indicator([ISO, CPU1]).status == R.PARAM_ERROR
    assert s.set_indicator([ISO, CPU1, 1], nret=2).status == R.PARAM_ERROR
    # unknown index, other sensor type, bad values
    assert s.set_indicator([ISO, 0x10000040, 1]).status == R.NO_SUCH_INDICATOR
    assert s.set_indicator([9005, CPU1, 1]).status == R.NOT_SUPPORTED
    assert s.set_indicator([ISO, CPU1, 2]).status == R.PARAM_ERROR
    assert s.set_indicator([ALLOC, CPU1, 2]).status == R.PARAM_ERROR   # exchange: unused in QEMU
    assert s.set_indicator([ALLOC, CPU1, 3]).status == R.PARAM_ERROR   # recover
    # class mismatch: allocation is logical-only, the DR indicator physical-only
    assert s.set_indicator([ALLOC, PCI8, 1]).status == R.NO_SUCH_INDICATOR
    assert s.set_indicator([IND, CPU1, 1]).status == R.NO_SUCH_INDICATOR
    assert s.set_indicator([IND, 0x40000999, 1]).status == R.NO_SUCH_INDICATOR
    for v in range(4):
        assert s.set_indicator([IND, PCI8, v]).status == R.SUCCESS
        assert s.drc(PCI8).dr_indicator == v
    assert s.set_indicator([IND, PCI8, 4]).status == R.PARAM_ERROR
    # -3 comes back to the guest as 0xfffffffd
    assert s.set_indicator([ISO, 0x10000040, 1]).rets == (0xFFFFFFFD,)


def test_get_sensor_state() -> None:
    s = machine()
    assert s.get_sensor_state([ALLOC, CPU1]).values == (2,)        # logical, unusable
    assert s.get_sensor_state([ALLOC, 0x10000000]).values == (1,)  # boot core, configured
    assert s.get_sensor_state([ALLOC, PCI8]).values == (0,)        # physical, empty
    put(s, PCI8, S.PHYSICAL_POWERON)
    assert s.get_sensor_state([ALLOC, PCI8]).values == (1,)        # physical, present
    for state in (S.LOGICAL_AVAILABLE, S.LOGICAL_UNISOLATE, S.LOGICAL_CONFIGURED):
        put(s, CPU1, state)
        assert s.get_sensor_state([ALLOC, CPU1]).values == (1,)
    assert s.get_sensor_state([ISO, CPU1]).status == R.NOT_SUPPORTED
    assert s.get_sensor_state([ALLOC, 0x10000040]).status == R.PARAM_ERROR
    assert s.get_sensor_state([ALLOC]).status == R.PARAM_ERROR
    assert s.get_sensor_state([ALLOC, CPU1], nret=1).status == R.PARAM_ERROR


def test_power_levels() -> None:
    s = machine()
    assert s.set_power_level([-1, 50]).rets == (0, 100)
    assert s.get_power_level([0xFFFFFFFF]).rets == (0, 100)
    assert s.set_power_level([0, 100]).status == R.NOT_SUPPORTED
    assert s.get_power_level([1]).status == R.NOT_SUPPORTED
    assert s.set_power_level([-1]).status == R.PARAM_ERROR
    assert s.get_power_level([-1], nret=1).status == R.PARAM_ERROR
    assert rtas_call(s, "get-power-level", [-1]).values == (100,)


def test_attach_reset_and_unplug_request() -> None:
    s = machine()
    with pytest.raises(DrcStateError):
        s.attach(0x10000000, Device("again"))              # boot core is there
    assert s.plug_cpu(1, "core1") == [IrqPulse(EventClass.HOT_PLUG)]
    assert s.drc(CPU1).state is S.LOGICAL_UNUSABLE          # hot-plugged: empty state
    # unplug before the guest took it: released at once
    assert s.unplug("core1")[:2] == [Released(CPU1, "core1"), DeviceRemoved("core1")]
    with pytest.raises(DrcStateError):
        s.unplug("core0")                                   # boot core
    s.plug_cpu(1, "core1")
    put(s, CPU1, S.LOGICAL_AVAILABLE)
    s.drc(CPU1).device = Device("core1")
    s.unplug("core1")
    assert s.drc(CPU1).unplug_requested
    assert s.reset() == [Released(CPU1, "core1"), DeviceRemoved("core1")]
    assert s.drc(CPU1).state is S.LOGICAL_UNUSABLE
    s.plug_cpu(2, "core2")
    assert s.reset() == [] and s.drc(0x10000002).state is S.LOGICAL_CONFIGURED


def test_full_cpu_hotplug_and_unplug_cycle() -> None:
    s = machine()
    s.plug_cpu(3, "core3")
    idx = 0x10000003
    assert s.set_indicator([ALLOC, idx, 1]).status == 0
    assert s.set_indicator([ISO, idx, 1]).status == 0
    rc, node = walk_configure_connector(s, idx)
    assert rc == CcResponse.SUCCESS and s.drc(idx).state is S.LOGICAL_CONFIGURED
    assert node is not None and node.name == "PowerPC,POWER11@3"
    assert node.props["name"] == b"PowerPC,POWER11@3\0"
    # the walk can repeat in CONFIGURED
    assert walk_configure_connector(s, idx)[1] == node
    s.unplug("core3")
    assert s.set_indicator([ISO, idx, 0]).status == 0
    assert s.set_indicator([ALLOC, idx, 0]).effects == (Released(idx, "core3"), DeviceRemoved("core3"))


def test_lmb_unplug_rejection_rolls_back_the_whole_dimm() -> None:
    s = machine()
    s.plug_dimm(1 << 30, 512 << 20, "dimm0", hotplugged=False)
    a, b = 0x80000004, 0x80000005
    s.unplug("dimm0")
    assert s.drc(a).unplug_requested and s.drc(b).unplug_requested
    # the guest unisolates a still-configured LMB: it refuses the unplug
    assert s.set_indicator([ISO, a, 1]).effects == (UnplugRejected("dimm0"),)
    assert not s.drc(a).unplug_requested and not s.drc(b).unplug_requested
    # or it isolates, unisolates again and re-reads the node: rolled back too
    s.unplug("dimm0")
    assert s.set_indicator([ISO, a, 0]).status == 0
    assert s.set_indicator([ISO, a, 1]).effects == ()
    mem = FlatMemory(0x2000)
    mem.write(0x1000, a.to_bytes(4, "big"))
    assert s.configure_connector([0x1000, 0], mem).effects == (UnplugRejected("dimm0"),)
    assert not s.drc(b).unplug_requested
    s.set_indicator([ISO, a, 0])  # PARAM_ERROR from UNISOLATE; walk on instead
    while s.configure_connector([0x1000, 0], mem).status != 0:
        pass
    assert s.drc(a).state is S.LOGICAL_CONFIGURED
    with pytest.raises(DrcStateError):
        s.plug_dimm(1 << 30, 256 << 20, "dimm1")
    # a second unplug goes through: both LMBs released, then the DIMM
    s.unplug("dimm0")
    effects = []
    for i in (a, b):
        for call in ([ISO, i, 0], [ALLOC, i, 0]):
            effects += s.set_indicator(call).effects
    assert effects == [Released(a, "dimm0"), Released(b, "dimm0"), DeviceRemoved("dimm0")]


def test_configure_connector_codes() -> None:
    s = machine()
    mem = FlatMemory(0x3000)
    mem.write(0x1000, (0x10000040).to_bytes(4, "big"))
    assert s.configure_connector([0x1000, 0], mem).status == R.PARAM_ERROR
    mem.write(0x1000, CPU1.to_bytes(4, "big"))
    assert s.configure_connector([0x1000, 0], mem).status == CcResponse.NOT_CONFIGURABLE == -9003
    assert s.configure_connector([0x1000], mem).status == R.PARAM_ERROR
    # a device with no node to give: -1
    put(s, CPU1, S.LOGICAL_UNISOLATE)
    s.drc(CPU1).device = Device("nodeless")
    assert s.configure_connector([0x1000, 0], mem).status == CcResponse.ERROR
    # the work-area cells of each step
    s.drc(CPU1).device = Device("x", lambda i: Node("n@1", {"ab": b"\1\2\3"}))
    s.drc(CPU1).fdt = None
    assert s.configure_connector([0x1000, 0], mem).status == CcResponse.NEXT_CHILD
    assert mem.read(0x1008, 4) == (20).to_bytes(4, "big") and mem.read(0x1014, 4) == b"n@1\0"
    assert s.configure_connector([0x1000, 0], mem).status == CcResponse.NEXT_PROPERTY
    assert mem.read(0x1008, 12) == bytes.fromhex("00000014 00000003 00000017")
    assert mem.read(0x1014, 6) == b"ab\0\1\2\3"
    assert s.configure_connector([0x1000, 0], mem).status == CcResponse.SUCCESS
    assert s.drc(CPU1).state is S.LOGICAL_CONFIGURED


def test_configure_connector_nested_nodes_and_clipping() -> None:
    s = machine()
    inner = Node("child", {"big": b"\xaa" * 5000})
    outer = Node("outer", {"p": b"\0\0\0\1"}, [inner])
    put(s, CPU1, S.LOGICAL_UNISOLATE)
    s.drc(CPU1).device = Device("x", lambda i: outer)
    mem = FlatMemory(0x10000)
    mem.write(0x2000, CPU1.to_bytes(4, "big"))
    codes = [s.configure_connector([0x2000, 0], mem).status for _ in range(6)]
    assert codes == [2, 3, 2, 3, 4, 0]
    # the 5000-byte value was clipped at the 4096-byte work area
    assert mem.read(0x2000 + 4096, 1) == b"\0"
    assert mem.read(0x2000 + 4095, 1) == b"\xaa"


@pytest.fixture
def dtc() -> str:
    path = shutil.which("dtc")
    if not path:
        pytest.skip("dtc (device-tree-compiler) is not installed; make setup installs it")
    return path


def walk_to_dts(s: DrcSet, index: int, dtc: str, tmp: Path) -> str:
    # -f: QEMU's hot-added CPU nodes carry name = "PowerPC,POWER11@1", unit
    # address included, which dtc's name_properties check calls an error.
    rc, node = walk_configure_connector(s, index)
    assert rc == 0 and node is not None
    root = Node("", children=[node])
    blob = tmp / "cc.dtb"
    blob.write_bytes(encode(root))
    out = subprocess.run([dtc, "-q", "-f", "-I", "dtb", "-O", "dts", str(blob)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_configure_connector_walk_decodes_with_dtc(dtc: str, tmp_path: Path) -> None:
    cfg = MachineConfig(cpus=1, maxcpus=2, memory=1 << 30, maxmem=2 << 30)
    s = DrcSet.for_machine(cfg)
    # LMB
    s.plug_dimm(1 << 30, 256 << 20, "dimm0")
    for call in ([ALLOC, LMB4, 1], [ISO, LMB4, 1]):
        assert s.set_indicator(call).status == 0
    text = walk_to_dts(s, LMB4, dtc, tmp_path)
    assert "memory@800000040000000 {" in text
    assert 'device_type = "memory";' in text
    assert "reg = <0x8000000 0x40000000 0x00 0x10000000>;" in text
    assert "ibm,associativity = <0x01 0x00>;" in text
    # CPU
    s.plug_cpu(1, "core1")
    for call in ([ALLOC, CPU1, 1], [ISO, CPU1, 1]):
        assert s.set_indicator(call).status == 0
    text = walk_to_dts(s, CPU1, dtc, tmp_path)
    assert "PowerPC,POWER11@1 {" in text and 'name = "PowerPC,POWER11@1";' in text
    assert "ibm,my-drc-index = <0x10000001>;" in text and "reg = <0x01>;" in text
    assert "ibm,ppc-interrupt-server#s = <0x01>;" in text
    # PCI
    fn = PciFunction(devfn=0x18, vendor_id=0x1af4, device_id=0x1110, class_code=0x050000,
                     revision=1, reg=bytes(20), assigned_addresses=b"", loc_code="qemu_ivshmem:0000:00:03.0",
                     name="memory")
    s.plug_pci(0, fn, "iv0")
    idx = 0x40000018
    assert s.set_indicator([ISO, idx, 1]).status == 0
    text = walk_to_dts(s, idx, dtc, tmp_path)
    for line in ("memory@3 {", "vendor-id = <0x1af4>;", "device-id = <0x1110>;",
                 "class-code = <0x50000>;", "ibm,my-drc-index = <0x40000018>;",
                 'ibm,loc-code = "qemu_ivshmem:0000:00:03.0";', "interrupts = <0x01>;"):
        assert line in text, line
    assert s.drc(idx).state is S.PHYSICAL_CONFIGURED


def test_walk_output_equals_node_builders() -> None:
    s = machine()
    s.plug_dimm(1 << 30, 256 << 20, "d")
    s.set_indicator([ALLOC, LMB4, 1])
    s.set_indicator([ISO, LMB4, 1])
    assert walk_configure_connector(s, LMB4)[1] == lmb_node(LMB4)
    assert decode(encode(Node("", children=[lmb_node(LMB4)]))).root.children[0] == lmb_node(LMB4)


def test_hotplug_events_and_check_exception() -> None:
    s = machine()
    mem = FlatMemory(0x4000)
    args = lambda mask: [0, 0, mask, 0, 0x1000, 2048]  # noqa: E731
    assert s.check_exception(args(EventClass.HOT_PLUG.mask), mem).status == R.NO_ERRORS_FOUND
    s.plug_dimm(1 << 30, 512 << 20, "dimm0")
    s.plug_cpu(1, "core1")
    assert s.check_exception(args(EventClass.EPOW.mask), mem).status == R.NO_ERRORS_FOUND
    res = s.check_exception(args(EventClass.HOT_PLUG.mask), mem)
    assert res.status == R.SUCCESS and res.effects == (IrqPulse(EventClass.HOT_PLUG),)
    ev = HotplugEvent.parse(mem.read(0x1000, 116))
    assert (ev.hp_type, ev.action, ev.id_type, ev.count, ev.index, ev.plid) == \
        (HpType.MEMORY, HpAction.ADD, HpId.DRC_COUNT_INDEXED, 2, LMB4, 0)
    res = s.check_exception(args(0xFFFFFFFF), mem)
    assert res.effects == ()
    ev = HotplugEvent.parse(mem.read(0x1000, 116))
    assert (ev.hp_type, ev.id_type, ev.index, ev.plid) == (HpType.CPU, HpId.DRC_INDEX, CPU1, 1)
    assert s.check_exception([0, 0, 0, 0, 0], mem).status == R.PARAM_ERROR
    # without OV5_HP_EVT: the EPOW source, memory by count
    legacy = DrcSet.for_machine(MachineConfig(memory=1 << 30, maxmem=2 << 30), hp_event_source=False)
    assert legacy.plug_dimm(1 << 30, 256 << 20, "d") == [IrqPulse(EventClass.EPOW)]
    assert legacy.check_exception(args(EventClass.EPOW.mask), mem).status == R.SUCCESS
    ev = HotplugEvent.parse(mem.read(0x1000, 116))
    assert (ev.id_type, ev.count) == (HpId.DRC_COUNT, 1)


def test_pci_multifunction_events() -> None:
    s = machine()
    f1 = PciFunction(devfn=0x21, vendor_id=1, device_id=2, class_code=0)
    f0 = PciFunction(devfn=0x20, vendor_id=1, device_id=2, class_code=0)
    assert s.plug_pci(0, f1, "f1") == []                   # deferred to function 0
    s.plug_pci(0, f0, "f0")
    assert [p.event.index for p in s.events] == [0x40000020, 0x40000021]
    s.events.clear()
    s.unplug("f0")
    assert [p.event.index for p in s.events] == [0x40000021, 0x40000020]


def test_bad_host_requests() -> None:
    s = machine()
    with pytest.raises(DrcError):
        s.drc(0x12345678)
    with pytest.raises(DrcError):
        s.unplug("nothing")
    with pytest.raises(DrcStateError):
        s.plug_dimm(0, 256 << 20, "x")                    # boot RAM has no LMB DRCs
    with pytest.raises(DrcError):
        s.plug_dimm(1 << 30, 100, "x")
    with pytest.raises(DrcError):
        rtas_call(s, "ibm,configure-connector", [0, 0])
    with pytest.raises(DrcError):
        rtas_call(s, "nope", [])
    assert cpu_node(CPU1, 1, 1, 0, 23).props["name"] == b"PowerPC,POWER11@1\0"
    assert pci_node(PciFunction(devfn=9, vendor_id=1, device_id=2, class_code=3), 5).name == "legacy-device@1,1"
    assert drc_index(DrcType.PMEM, 3) == 0x90000003
    assert "memory@" in to_dts(lmb_node(LMB4))
