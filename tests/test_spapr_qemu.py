"""Differential tests: the DRC model against QEMU 11.1's pseries device tree.

Each configuration starts qemu-system-ppc64 stopped (-S), dumps its device
tree over QMP and compares every node that carries ibm,drc-* arrays with the
model: the same nodes, the same connectors (keyed by index) with the same
name, type and power domain bytes, the same counts, and the model's arrays
re-serialized in QEMU's order equal QEMU's property bytes exactly.  Boot CPU
nodes are compared property by property, in order.
"""

from __future__ import annotations

import time

import pytest

from qbackend.machine.launch import QemuNotFound
from qbackend.models.spapr.drc import (
    Connector,
    DrcType,
    MachineConfig,
    PciBridge,
    cpu_node,
    drc_arrays,
    htab_shift_for,
    parse_drc_arrays,
    split_index,
)
from qbackend.models.spapr.fdt import Node, decode

try:
    from qbackend.machine.ppc import dump_pseries_dtb, find_qemu_ppc
    QEMU_PPC = find_qemu_ppc()
    SKIP = ""
except QemuNotFound as exc:  # pragma: no cover - depends on provisioning
    SKIP = str(exc)

pytestmark = pytest.mark.skipif(bool(SKIP), reason=f"ppc QEMU not provisioned: {SKIP}")

CONFIGS: dict[str, tuple[list[str], MachineConfig]] = {
    "notes-1G-4slots-4G-4cpus": (
        ["-m", "1G,slots=4,maxmem=4G", "-smp", "1,maxcpus=4"],
        MachineConfig(cpus=1, maxcpus=4, memory=1 << 30, maxmem=4 << 30, slots=4)),
    "1G-maxmem2G-noslots": (
        ["-m", "1G,maxmem=2G", "-smp", "1"],
        MachineConfig(cpus=1, memory=1 << 30, maxmem=2 << 30)),
    "1536M-gap-smt2-phb3": (
        ["-m", "1536M,slots=2,maxmem=3G", "-smp", "2,threads=2,maxcpus=8",
         "-device", "spapr-pci-host-bridge,index=3,id=phb3"],
        MachineConfig(cpus=2, maxcpus=8, threads=2, memory=1536 << 20, maxmem=3 << 30, slots=2,
                      phbs=(3,))),
    "512M-nohotmem-2phbs-bridge": (
        ["-m", "512M", "-smp", "2",
         "-device", "spapr-pci-host-bridge,index=1,id=phb1",
         "-device", "spapr-pci-host-bridge,index=30,id=phb30",
         "-device", "pci-bridge,chassis_nr=5,id=br5,bus=phb1.0,addr=0x2"],
        MachineConfig(cpus=2, memory=512 << 20, phbs=(1, 30),
                      bridges=(PciBridge(phb=1, chassis_nr=5, devfn=0x10),))),
    "2G-8slots-16G-4of16cpus": (
        ["-m", "2G,slots=8,maxmem=16G", "-smp", "4,maxcpus=16"],
        MachineConfig(cpus=4, maxcpus=16, memory=2 << 30, maxmem=16 << 30, slots=8)),
}


# -cpu and the machine's max-cpu-compat (which sets the compatibility PVR at
# reset, as CAS does later): the boot core's node, built as a hot-added core's is.
CPU_CONFIGS: dict[str, tuple[list[str], str, int]] = {
    "POWER9": (["-cpu", "POWER9"], "POWER9", 0),
    "POWER10": (["-cpu", "POWER10"], "POWER10", 0),
    "POWER11-compat-power10": (["-cpu", "POWER11", "-M", "pseries,max-cpu-compat=power10"], "POWER11",
                               0x0F000006),
    "POWER10-compat-power9": (["-cpu", "POWER10", "-M", "pseries,max-cpu-compat=power9"], "POWER10",
                              0x0F000005),
}


@pytest.mark.parametrize("name", list(CPU_CONFIGS))
def test_cpu_models_and_compat_match_qemu(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    args, model, compat = CPU_CONFIGS[name]
    blob = dump_pseries_dtb(["-m", "1G", "-smp", "1", *args], tmp_path_factory.mktemp(name), QEMU_PPC)
    cpus = decode(blob).root.find("/cpus")
    assert cpus is not None
    (node,) = [c for c in cpus.children if c.name.startswith("PowerPC,")]
    config = MachineConfig(cpus=1, memory=1 << 30, cpu_model=model)
    ours = cpu_node(0x10000000, 0, 1, 0, htab_shift_for(config.memory), config.cpu, hotplugged=False,
                    compat_pvr=compat)
    assert ours.name == node.name
    assert list(ours.props.items()) == list(node.props.items())


@pytest.fixture(scope="module")
def dumps(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Node, float]]:
    out = {}
    for name, (args, _) in CONFIGS.items():
        t = time.monotonic()
        blob = dump_pseries_dtb(args, tmp_path_factory.mktemp(name), QEMU_PPC)
        out[name] = decode(blob).root, time.monotonic() - t
    return out


def drc_nodes(root: Node) -> dict[str, dict[str, bytes]]:
    return {path: node.props for path, node in root.walk() if "ibm,drc-indexes" in node.props}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_drc_properties_match_qemu(name: str, dumps: dict[str, tuple[Node, float]]) -> None:
    root, _ = dumps[name]
    config = CONFIGS[name][1]
    qemu_nodes = drc_nodes(root)
    model = config.drc_properties()
    assert sorted(qemu_nodes) == sorted(model)
    by_index = {c.index: c for c in config.connectors()}
    for path, props in qemu_nodes.items():
        theirs = parse_drc_arrays(props)
        ours = parse_drc_arrays(model[path].as_props())
        assert len(theirs) == len(ours)
        assert {e.index: e for e in theirs} == {e.index: e for e in ours}, path
        # Re-serialised in QEMU's iteration order, the model's arrays are
        # QEMU's bytes exactly.
        reordered = drc_arrays([by_index[e.index] for e in theirs]).as_props()
        for prop, value in reordered.items():
            assert props[prop] == value, f"{path} {prop}"
        for e in theirs:
            kind, drc_id = split_index(e.index)
            assert (e.name, e.type) == (Connector.make(kind, drc_id).name, kind.type_name)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_drc_properties_in_qemu_order_are_byte_identical(
        name: str, dumps: dict[str, tuple[Node, float]]) -> None:
    """With the GLib hash-table order replayed, whole properties match."""
    root, _ = dumps[name]
    for path, arrays in CONFIGS[name][1].drc_properties(order="qemu").items():
        node = root.find(path)
        assert node is not None
        for prop, value in arrays.as_props().items():
            assert node.props[prop] == value, f"{path} {prop}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_boot_cpu_nodes_match_qemu(name: str, dumps: dict[str, tuple[Node, float]]) -> None:
    root, _ = dumps[name]
    config = CONFIGS[name][1]
    cpus = root.find("/cpus")
    assert cpus is not None
    nodes = [c for c in cpus.children if c.name.startswith("PowerPC,")]
    assert len(nodes) == config.cpus // config.threads
    for core, node in enumerate(nodes):
        vcpu = core * config.vsmt
        ours = cpu_node(0x10000000 | vcpu, vcpu, config.threads, 0, htab_shift_for(config.memory),
                        hotplugged=False)
        assert ours.name == node.name
        assert list(ours.props.items()) == list(node.props.items())


def test_my_drc_index_of_phbs_and_bridges(dumps: dict[str, tuple[Node, float]]) -> None:
    root, _ = dumps["512M-nohotmem-2phbs-bridge"]
    config = CONFIGS["512M-nohotmem-2phbs-bridge"][1]
    for phb in (0, *config.phbs):
        node = root.find(config.phb_path(phb))
        assert node is not None and node.props["ibm,my-drc-index"] == (0x20000000 | phb).to_bytes(4, "big")
    bridge = root.find(config.bridge_path(config.bridges[0]))
    assert bridge is not None
    assert bridge.props["ibm,my-drc-index"] == (0x40010010).to_bytes(4, "big")
    assert split_index(0x40010010) == (DrcType.PCI, 0x10010)


def test_qemu_starts_are_quick(dumps: dict[str, tuple[Node, float]]) -> None:
    assert all(t < 10 for _, t in dumps.values()), {k: round(t, 2) for k, (_, t) in dumps.items()}
