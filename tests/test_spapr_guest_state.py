"""What a booted guest changes in the DRC model, each against QEMU 11.1's
behaviour (issue 31's differential found them): the CAS outcome in a
hot-added core's node, a machine reset dropping queued events, and PCI node
names and resources from config space."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from qbackend.app.cli import main
from qbackend.models.spapr.drc import (
    Bar,
    BarType,
    DrcError,
    MachineConfig,
    PciFunction,
    cpu_node,
    pci_node,
    pci_node_name,
)
from qbackend.models.spapr.events import HotplugEvent, HpAction, HpId, HpType
from qbackend.models.spapr.fdt import cells
from qbackend.models.spapr.script import Script
from qbackend.models.spapr.state import (
    DeviceRemoved,
    DrcSet,
    DrcState,
    DrIndicator,
    FlatMemory,
    IrqPulse,
    Mmu,
    Released,
    walk_configure_connector,
)

ISO, ALLOC = 9001, 9003
CPU1 = 0x10000001
CFG = MachineConfig(cpus=1, maxcpus=4, memory=1 << 30, maxmem=4 << 30, slots=4)


def walk_core(s: DrcSet, index: int = CPU1) -> dict[str, bytes]:
    assert s.set_indicator([ALLOC, index, 1]).status == 0
    assert s.set_indicator([ISO, index, 1]).status == 0
    rc, node = walk_configure_connector(s, index)
    assert rc == 0 and node is not None
    return node.props


# -- 1. the CAS outcome in a hot-added core --------------------------------------------

def test_hot_added_core_after_radix_cas_is_qemus() -> None:
    """QEMU's tree for a core added after a Linux guest negotiated radix and
    the POWER11 logical PVR: ibm,pft-size all zeros, cpu-version 0x0f000007."""
    s = DrcSet.for_machine(CFG)
    s.plug_cpu(1, "core1")
    props = walk_core(s)
    assert props["ibm,pft-size"] == cells(0, 0)
    assert props["cpu-version"] == cells(0x0F000007)
    # the property keeps its place (QEMU overwrites the raw PVR in place; the
    # walk hands properties out last set first)
    assert list(props)[-4:] == ["cpu-version", "device_type", "reg", "ibm,my-drc-index"]


def test_hot_added_core_in_hash_mode_and_without_compat() -> None:
    s = DrcSet.for_machine(CFG, mmu=Mmu.HASH, compat_pvr=0)
    s.plug_cpu(1, "core1")
    props = walk_core(s)
    assert props["ibm,pft-size"] == cells(0, 0x17)          # 1 GiB of RAM: 2**23
    assert props["cpu-version"] == cells(0x00821200)       # the raw POWER11 PVR
    # the hash table is sized when it is made (CAS, reset), for the RAM present then
    s.plug_dimm(1 << 30, 2 << 30, "dimm0", hotplugged=False)
    s.cas(mmu="hash")
    s.plug_cpu(2, "core2")
    assert walk_core(s, 0x10000002)["ibm,pft-size"] == cells(0, 0x19)   # 3 GiB: 2**25
    s.cas(htab_shift=20)
    s.plug_cpu(3, "core3")
    assert walk_core(s, 0x10000003)["ibm,pft-size"] == cells(0, 20)


def test_core_node_is_built_at_the_first_configure_connector() -> None:
    """The node is made when the guest first asks for it, and kept across a
    reset (QEMU keeps a DRC's fdt until the device goes)."""
    s = DrcSet.for_machine(CFG, mmu=Mmu.HASH, compat_pvr=0)
    s.plug_cpu(1, "core1")
    s.cas(mmu="radix", compat_pvr=0x0F000006)
    props = walk_core(s)
    assert props["ibm,pft-size"] == cells(0, 0) and props["cpu-version"] == cells(0x0F000006)
    s.reset()
    assert s.mmu is Mmu.HASH and s.pft_shift() == 0x17 and s.effective_compat_pvr == 0
    rc, node = walk_configure_connector(s, CPU1)
    assert rc == 0 and node is not None and node.props["cpu-version"] == cells(0x0F000006)


def test_cpu_models_and_compat_modes() -> None:
    p9 = MachineConfig(cpus=1, maxcpus=2, cpu_model="POWER9")
    s = DrcSet.for_machine(p9)
    s.plug_cpu(1, "core1")
    props = walk_core(s)
    assert props["cpu-version"] == cells(0x0F000005)
    assert props["ibm,pa-features"][0] == 0x42          # the ISA 3.00 table
    with pytest.raises(DrcError):
        s.cas(compat_pvr=0x0F000006)                    # newer than a POWER9
    with pytest.raises(DrcError):
        MachineConfig(cpu_model="POWER7")
    node = cpu_node(CPU1, 1, 1, 0, 0, CFG.cpu, compat_pvr=0x0F000005)
    assert node.props["ibm,pa-features"][0] == 0x42     # POWER11 in POWER9 mode
    assert cpu_node(CPU1, 1, 1, 0, 0, CFG.cpu).props["ibm,pa-features"][0] == 0x4A


def test_cli_takes_the_cpu_model_and_cas(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "s.txt"
    script.write_text("plug-cpu 1\nset-indicator allocation 0x10000001 1\n"
                      "set-indicator isolation 0x10000001 1\nconfigure-connector 0x10000001\n"
                      "cas mmu=radix compat=0x0f000006 hp-events=on\n")
    args = ["drc", "run", "--cpus", "1", "--maxcpus", "2", "--memory", "1G", "--cpu-model", "POWER10",
            "--mmu", "hash", "--compat-pvr", "none", str(script)]
    assert main(args) == 0
    out = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "PowerPC,POWER10@1 {" in out[3]["dts"]
    assert "ibm,pft-size = <0x00 0x17>;" in out[3]["dts"] and "cpu-version = <0x801200>;" in out[3]["dts"]
    assert out[4] == {"cmd": out[4]["cmd"], "ok": True, "mmu": "radix", "compat": "0x0f000006",
                      "hp_events": True, "pft_shift": 0}
    assert main([*args[:-1], "--compat-pvr", "0x0f000007", str(script)]) == 2   # not a POWER10's
    assert "0x0f000007" in capsys.readouterr().err


def test_drc_run_help_documents_the_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["drc", "run", "--help"])
    text = capsys.readouterr().out
    for word in ("--cpu-model", "--mmu", "--compat-pvr", "--htab-shift", "--clock", "cas [mmu=",
                 "clock YYYY", "barN=io|mem32|mem64", "irq-pin", "subsystem-vendor", "type=DRIVER"):
        assert word in text, word


# -- 2. a machine reset ------------------------------------------------------------------

def test_reset_with_an_unplug_pending_drops_the_queued_events() -> None:
    """QEMU 11.1, a booted guest: device_del of a DIMM, system_reset before
    the guest takes the event, the guest boots again, a DIMM is added: the
    next check-exception gives 'memory add' for the new DIMM, and no event
    is left (QEMU's spapr_machine_reset drops pending events)."""
    cfg = MachineConfig(cpus=1, memory=1 << 30, maxmem=4 << 30, slots=4)
    s = DrcSet.for_machine(cfg)
    s.plug_dimm(1 << 30, 256 << 20, "dimm0", hotplugged=False)
    s.unplug("dimm0")
    assert len(s.events) == 1
    assert s.reset() == [Released(0x80000004, "dimm0"), DeviceRemoved("dimm0")]
    assert s.events == []
    assert s.drc(0x80000004).state is DrcState.LOGICAL_UNUSABLE
    s.cas(mmu="radix", compat_pvr=0x0F000007, hp_events=True)
    assert s.plug_dimm(1 << 30, 256 << 20, "dimm1") == [IrqPulse(s.events[0].source)]
    mem = FlatMemory(0x4000)
    res = s.check_exception([0, 0, 0xFFFFFFFF, 0, 0x1000, 2048], mem)
    assert res.status == 0 and res.effects == ()          # nothing left to pulse for
    ev = HotplugEvent.parse(mem.read(0x1000, 116))
    assert (ev.hp_type, ev.action, ev.id_type, ev.index, ev.count) == \
        (HpType.MEMORY, HpAction.ADD, HpId.DRC_COUNT_INDEXED, 0x80000004, 1)
    assert ev.plid == 1                                    # plids go on counting
    assert s.check_exception([0, 0, 0xFFFFFFFF, 0, 0x1000, 2048], mem).status == 1


def test_reset_forgets_cas_until_the_guest_negotiates_again() -> None:
    s = DrcSet.for_machine(CFG)
    s.reset()
    assert (s.mmu, s.effective_compat_pvr, s.hp_event_source) == (Mmu.HASH, 0, False)
    s.plug_dimm(1 << 30, 256 << 20, "d")                    # before CAS: EPOW source, by count
    assert s.events[0].event.id_type is HpId.DRC_COUNT


def test_reset_leaves_pci_indicators_as_qemu_does() -> None:
    """QEMU sets a physical DRC's indicator in a reset handler that runs
    before the DRCs are reset: a function whose unplug completes at the
    reset keeps ACTIVE on its now empty DRC."""
    s = DrcSet.for_machine(CFG)
    fn = PciFunction(devfn=0x18, vendor_id=0x1234, device_id=0x11E8, class_code=0x00FF00)
    s.plug_pci(0, fn, "edu", hotplugged=False)
    s.plug_pci(0, PciFunction(devfn=0x20, vendor_id=1, device_id=2, class_code=0x020000), "net",
               hotplugged=False)
    s.set_indicator([9002, 0x40000020, 0])
    s.unplug("edu")
    s.reset()
    edu, net = s.drc(0x40000018), s.drc(0x40000020)
    assert edu.device is None and edu.state is DrcState.PHYSICAL_POWERON
    assert edu.dr_indicator is DrIndicator.ACTIVE
    assert net.dr_indicator is DrIndicator.ACTIVE and net.state is DrcState.PHYSICAL_CONFIGURED


def test_script_reset_then_clock_and_events(capsys: pytest.CaptureFixture[str]) -> None:
    sc = Script(MachineConfig(cpus=1, memory=1 << 30, maxmem=2 << 30))
    lines = ["plug-dimm 0x40000000 256M d0", "set-indicator allocation 0x80000004 1",
             "set-indicator isolation 0x80000004 1", "configure-connector 0x80000004",
             "unplug d0", "reset", "events", "cas mmu=radix compat=0x0f000007 hp-events=on",
             "clock 2026-03-04T05:06:07", "plug-dimm 0x40000000 256M d1", "check-exception"]
    out = [sc.run_line(x) for x in lines]
    assert all(o is not None and o["ok"] for o in out)
    assert out[6] is not None and out[6]["pending"] == []
    last = out[-1]
    assert last is not None and last["event"]["action"] == "add" and last["event"]["index"] == "0x80000004"
    assert HotplugEvent.parse(bytes.fromhex(last["log"])).when == datetime(2026, 3, 4, 5, 6, 7)


# -- 3. PCI nodes ------------------------------------------------------------------------------

@pytest.mark.parametrize("code,name", [
    (0x00FF00, "legacy-device"), (0x000100, "display"), (0x020000, "ethernet"), (0x028000, "network"),
    (0x010000, "scsi"), (0x010802, "mass-storage"), (0x050000, "memory"), (0x058000, "memory-controller"),
    (0x060400, "pci"), (0x080010, "io-apic"), (0x080000, "interrupt-controller"),
    (0x0C0330, "usb-xhci"), (0x0C0340, "usb"), (0x0B2000, "powerpc"), (0x0E0000, "intelligent-io"),
    (0x100100, "entertainment-encryption"), (0x120000, "pci"), (0xFF0000, "pci"),
])
def test_pci_node_names_are_qemus(code: int, name: str) -> None:
    assert pci_node_name(code) == name


def test_pci_resources_interrupts_subsystem_and_location() -> None:
    fn = PciFunction(devfn=0x19, vendor_id=0x1AF4, device_id=0x1000, class_code=0x020000,
                     subsystem_vendor_id=0x1AF4, subsystem_id=1, irq_pin=1, type_name="virtio-net-pci",
                     bars=(Bar(0, BarType.IO, 0x20), Bar(1, BarType.MEM32, 0x1000),
                           Bar(4, BarType.MEM64, 0x4000, addr=0x210000000), Bar(6, BarType.MEM32, 0x40000)))
    node = pci_node(fn, 0x40010019, phb=1)
    assert node.name == "ethernet@3,1"
    p = node.props
    assert p["interrupts"] == cells(1)
    assert p["subsystem-id"] == cells(1) and p["subsystem-vendor-id"] == cells(0x1AF4)
    assert p["ibm,loc-code"] == b"qemu_virtio-net-pci:0001:00:03.1\0"
    dev = 0x19 << 8
    assert p["reg"] == cells(dev, 0, 0, 0, 0, dev | 0x01000010, 0, 0, 0, 0x20,
                             dev | 0x02000014, 0, 0, 0, 0x1000, dev | 0x03000020, 0, 0, 0, 0x4000,
                             dev | 0x02000030, 0, 0, 0, 0x40000)
    assert p["assigned-addresses"] == cells(dev | 0x83000020, 2, 0x10000000, 0, 0x4000)
    quiet = pci_node(PciFunction(devfn=0, vendor_id=1, device_id=2, class_code=0x00FF00, irq_pin=0), 1)
    assert "interrupts" not in quiet.props and "subsystem-id" not in quiet.props


def test_script_plug_pci_keys() -> None:
    sc = Script(CFG)
    out = [sc.run_line(x) for x in (
        "plug-pci 0 0x18 0x1234 0x11e8 0x00ff00 edu0 bar0=mem32:1M irq-pin=1 msi=1 type=edu revision=0x10",
        "set-indicator isolation 0x40000018 1", "configure-connector 0x40000018",
        "plug-pci 0 0x20 1 2 3 bar9=io:16")]
    assert out[0] is not None and out[0]["ok"], out[0]
    dts = out[2]["dts"] if out[2] else ""
    for line in ("legacy-device@3 {", 'ibm,loc-code = "qemu_edu:0000:00:03.0";', "ibm,req#msi = <0x01>;",
                 "reg = <0x1800 0x00 0x00 0x00 0x00 0x2001810 0x00 0x00 0x00 0x100000>;",
                 "revision-id = <0x10>;", "interrupts = <0x01>;"):
        assert line in dts, line
    assert out[3] is not None and not out[3]["ok"] and "bar9" in out[3]["error"]
