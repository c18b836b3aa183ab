"""Dynamic-reconfiguration connectors of a pseries machine: their indexes,
names and types, and the device-tree properties that describe them.

A DRC index is ``type_shift << 28 | id`` (PAPR 13.5.2.4 convention as QEMU
uses it).  The ids follow QEMU 11.1's pseries machine:

* CPU: the vCPU id of the core's first thread, ``core * vsmt`` (``vsmt``
  is the threads per core on current machine types);
* PHB: the host-bridge index, 0 .. 30 (all 31 exist from the start);
* PCI: ``phb_index << 16 | chassis << 8 | devfn`` (chassis 0 for a PHB's root
  bus, a bridge's ``chassis_nr`` below it), 256 per bus;
* LMB: ``address / 256 MiB`` for every block of the device-memory region,
  which starts at the RAM size rounded up to 1 GiB;
* PMEM: the memory slot number, 0 .. slots-1.

`MachineConfig.drc_properties()` gives the four ``ibm,drc-*`` arrays for the
root node (LMB, PHB, PMEM), ``/cpus`` (CPU) and each PCI bus node (PCI).
Entries are sorted by index by default; QEMU writes them in the iteration
order of a GLib hash table, which ``order="qemu"`` reproduces (`ghash`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag

from qbackend.errors import ModelError
from qbackend.models.spapr.fdt import Node, cell, cells, read_cells, u64
from qbackend.models.spapr.ghash import iteration_order

INDEX_TYPE_SHIFT = 28
INDEX_ID_MASK = (1 << INDEX_TYPE_SHIFT) - 1
LMB_SIZE = 256 << 20
"""SPAPR_MEMORY_BLOCK_SIZE: the granule of memory hotplug."""
DEVICE_MEM_ALIGN = 1 << 30
MAX_PHBS = 31
MAX_RAM_SLOTS = 32
PCI_SLOTS_PER_BUS = 256
PHB_BUID_BASE = 0x800000020000000
POWER_DOMAIN_LIVE_INSERT = 0xFFFFFFFF
"""Every QEMU DRC sits in the "live insertion" power domain, -1."""


class DrcError(ModelError):
    """A machine description QEMU would refuse, or an unknown connector."""


class DrcType(IntEnum):
    """Connector types, valued by their index type field (bits 31..28)."""

    CPU = 1
    PHB = 2
    VIO = 3
    PCI = 4
    LMB = 8
    PMEM = 9

    @property
    def mask(self) -> int:
        """The SpaprDrcType bit QEMU filters with."""
        return 1 << self.value

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES[self]

    @property
    def name_prefix(self) -> str:
        return _NAME_PREFIXES[self]

    @property
    def physical(self) -> bool:
        """PCI (and VIO slots) are physical DRCs; the rest are logical."""
        return self in (DrcType.PCI, DrcType.VIO)


_TYPE_NAMES = {DrcType.CPU: "CPU", DrcType.PHB: "PHB", DrcType.VIO: "SLOT", DrcType.PCI: "28",
               DrcType.LMB: "MEM", DrcType.PMEM: "PMEM"}
_NAME_PREFIXES = {DrcType.CPU: "CPU ", DrcType.PHB: "PHB ", DrcType.VIO: "C", DrcType.PCI: "C",
                  DrcType.LMB: "LMB ", DrcType.PMEM: "PMEM "}


def drc_index(kind: DrcType, drc_id: int) -> int:
    return (kind.value << INDEX_TYPE_SHIFT) | (drc_id & INDEX_ID_MASK)


def split_index(index: int) -> tuple[DrcType, int]:
    """(type, id) of an index; an unknown type field raises DrcError."""
    if not 0 <= index <= 0xFFFFFFFF:
        raise DrcError(f"DRC index {index:#x} is not a 32-bit value")
    try:
        kind = DrcType(index >> INDEX_TYPE_SHIFT)
    except ValueError:
        raise DrcError(f"DRC index {index:#010x} has no known type") from None
    return kind, index & INDEX_ID_MASK


@dataclass(frozen=True, order=True)
class Connector:
    """One DRC as the device tree lists it."""

    index: int
    kind: DrcType = field(compare=False)
    id: int = field(compare=False)
    owner: str = field(default="/", compare=False)
    """Path of the node whose ``ibm,drc-*`` arrays list this connector."""

    @classmethod
    def make(cls, kind: DrcType, drc_id: int, owner: str = "/") -> Connector:
        return cls(drc_index(kind, drc_id), kind, drc_id, owner)

    @property
    def name(self) -> str:
        # QEMU prints the id with %d; ids are far below 2**31.
        return f"{self.kind.name_prefix}{self.id}"


@dataclass(frozen=True)
class DrcArrays:
    """The four properties, keyed as in the device tree."""

    indexes: bytes
    names: bytes
    power_domains: bytes
    types: bytes

    PROPS = ("ibm,drc-indexes", "ibm,drc-names", "ibm,drc-power-domains", "ibm,drc-types")

    def as_props(self) -> dict[str, bytes]:
        return dict(zip(self.PROPS, (self.indexes, self.names, self.power_domains, self.types)))


def drc_arrays(connectors: Iterable[Connector]) -> DrcArrays:
    """Encode connectors in the order given: each array starts with a BE
    count; names and types are NUL-terminated strings."""
    conns = list(connectors)
    n = cell(len(conns))
    return DrcArrays(
        indexes=n + b"".join(cell(c.index) for c in conns),
        names=n + b"".join(c.name.encode() + b"\0" for c in conns),
        power_domains=n + cell(POWER_DOMAIN_LIVE_INSERT) * len(conns),
        types=n + b"".join(c.kind.type_name.encode() + b"\0" for c in conns),
    )


@dataclass(frozen=True)
class DrcEntry:
    index: int
    name: str
    power_domain: int
    type: str


def parse_drc_arrays(props: dict[str, bytes]) -> list[DrcEntry]:
    """Entries of a node's ``ibm,drc-*`` properties, in their stored order."""
    try:
        raw = [props[p] for p in DrcArrays.PROPS]
    except KeyError as e:
        raise DrcError(f"node lacks {e.args[0]}") from None
    idx = read_cells(raw[0])
    pwr = read_cells(raw[2])

    def strings(value: bytes, what: str) -> tuple[int, list[str]]:
        if len(value) < 4:
            raise DrcError(f"{what} has no count")
        (count,) = read_cells(value[:4])
        body = value[4:]
        if count == 0:
            if body:
                raise DrcError(f"{what}: trailing bytes after 0 entries")
            return 0, []
        if not body.endswith(b"\0"):
            raise DrcError(f"{what} does not end in NUL")
        return count, [s.decode() for s in body[:-1].split(b"\0")]

    ncount, names = strings(raw[1], "ibm,drc-names")
    tcount, types = strings(raw[3], "ibm,drc-types")
    counts = {idx[0], pwr[0], ncount, tcount}
    lens = {len(idx) - 1, len(pwr) - 1, len(names), len(types)}
    if len(counts) != 1 or lens != counts:
        raise DrcError(f"inconsistent counts {counts} and lengths {lens}")
    return [DrcEntry(i, n, p, t) for i, n, p, t in zip(idx[1:], names, pwr[1:], types)]


# -- the machine ----------------------------------------------------------------------

@dataclass(frozen=True)
class PciBridge:
    """A PCI-to-PCI bridge on a PHB's root bus; its bus has 256 PCI DRCs of
    its own (ids with ``chassis_nr``), listed in the bridge's node."""

    phb: int
    chassis_nr: int
    devfn: int


@dataclass(frozen=True)
class Dimm:
    """A pc-dimm plugged at ``addr`` (inside the device-memory region)."""

    addr: int
    size: int
    node: int = 0


@dataclass(frozen=True)
class MachineConfig:
    """A pseries machine as ``-m``/``-smp``/``-device`` describe it
    (QEMU 11.1, current machine type, TCG)."""

    cpus: int = 1
    maxcpus: int | None = None
    threads: int = 1
    memory: int = 512 << 20
    maxmem: int | None = None
    slots: int = 0
    phbs: tuple[int, ...] = ()
    """Extra spapr-pci-host-bridge indexes; PHB 0 always exists."""
    bridges: tuple[PciBridge, ...] = ()
    dimms: tuple[Dimm, ...] = ()
    cpu_model: str = "POWER11"
    """``-cpu``: a key of `CPU_MODELS`."""

    def __post_init__(self) -> None:
        cpu_model(self.cpu_model)
        mc = self.max_cpus
        if self.cpus < 1 or mc < self.cpus:
            raise DrcError(f"cpus={self.cpus} maxcpus={mc}: need 1 <= cpus <= maxcpus")
        if self.threads < 1 or self.threads & (self.threads - 1) or self.threads > 8:
            raise DrcError(f"threads={self.threads}: must be a power of 2, at most 8")
        if self.cpus % self.threads or mc % self.threads:
            raise DrcError(f"cpus and maxcpus must be multiples of threads ({self.threads})")
        if self.memory % LMB_SIZE or self.max_mem % LMB_SIZE:
            raise DrcError("memory and maxmem must be multiples of 256 MiB")
        if self.memory < 128 << 20:
            raise DrcError("pseries needs at least 128 MiB of RAM (the RMA for SLOF)")
        if self.max_mem < self.memory:
            raise DrcError("maxmem is smaller than memory")
        if not 0 <= self.slots <= MAX_RAM_SLOTS:
            raise DrcError(f"slots={self.slots}: at most {MAX_RAM_SLOTS}")
        seen = {0}
        for p in self.phbs:
            if not 0 <= p < MAX_PHBS or p in seen:
                raise DrcError(f"PHB index {p} is out of range or used twice")
            seen.add(p)
        for b in self.bridges:
            if b.phb not in seen or not 1 <= b.chassis_nr <= 255 or not 0 <= b.devfn < 256:
                raise DrcError(f"bad bridge {b}")
        end = self.device_mem_base + self.device_mem_size
        for d in self.dimms:
            if d.size % LMB_SIZE or d.addr % LMB_SIZE or d.addr < self.device_mem_base \
                    or d.addr + d.size > end or d.size == 0:
                raise DrcError(f"{d} does not fit the device-memory region")

    @property
    def max_cpus(self) -> int:
        return self.maxcpus if self.maxcpus is not None else self.cpus

    @property
    def max_mem(self) -> int:
        return self.maxmem if self.maxmem is not None else self.memory

    @property
    def cpu(self) -> CpuModel:
        return cpu_model(self.cpu_model)

    @property
    def vsmt(self) -> int:
        return self.threads

    @property
    def device_mem_base(self) -> int:
        """Start of the hotplug region: RAM rounded up to 1 GiB (0 if none)."""
        if self.max_mem == self.memory:
            return 0
        return -(-self.memory // DEVICE_MEM_ALIGN) * DEVICE_MEM_ALIGN

    @property
    def device_mem_size(self) -> int:
        return self.max_mem - self.memory

    @staticmethod
    def phb_buid(index: int) -> int:
        return PHB_BUID_BASE + index

    @staticmethod
    def phb_path(index: int) -> str:
        return f"/pci@{MachineConfig.phb_buid(index):x}"

    def bridge_path(self, b: PciBridge) -> str:
        slot, func = b.devfn >> 3, b.devfn & 7
        unit = f"{slot:x}" if func == 0 else f"{slot:x},{func:x}"
        return f"{self.phb_path(b.phb)}/pci@{unit}"

    # -- connectors --------------------------------------------------------------
    def cpu_connectors(self) -> list[Connector]:
        return [Connector.make(DrcType.CPU, core * self.vsmt, "/cpus")
                for core in range(self.max_cpus // self.threads)]

    def lmb_connectors(self) -> list[Connector]:
        first = self.device_mem_base // LMB_SIZE
        return [Connector.make(DrcType.LMB, first + i)
                for i in range(self.device_mem_size // LMB_SIZE)]

    def phb_connectors(self) -> list[Connector]:
        return [Connector.make(DrcType.PHB, i) for i in range(MAX_PHBS)]

    def pmem_connectors(self) -> list[Connector]:
        return [Connector.make(DrcType.PMEM, i) for i in range(self.slots)]

    def pci_connectors(self, phb: int, chassis: int = 0, owner: str | None = None) -> list[Connector]:
        path = owner or self.phb_path(phb)
        return [Connector.make(DrcType.PCI, (phb << 16) | (chassis << 8) | devfn, path)
                for devfn in range(PCI_SLOTS_PER_BUS)]

    def connectors(self) -> list[Connector]:
        """Every DRC of the machine, sorted by index."""
        out = self.cpu_connectors() + self.lmb_connectors() + self.phb_connectors() \
            + self.pmem_connectors()
        for phb in (0, *self.phbs):
            out += self.pci_connectors(phb)
        for b in self.bridges:
            out += self.pci_connectors(b.phb, b.chassis_nr, self.bridge_path(b))
        return sorted(out)

    def creation_order(self) -> list[Connector]:
        """Connectors in the order QEMU 11.1 creates them: CPU slots, LMBs,
        PMEM slots, PHBs, then 256 PCI slots per PHB bus (PHB 0, the extra
        PHBs, bridges)."""
        out = self.cpu_connectors() + self.lmb_connectors() + self.pmem_connectors() \
            + self.phb_connectors()
        for phb in (0, *self.phbs):
            out += self.pci_connectors(phb)
        for b in self.bridges:
            out += self.pci_connectors(b.phb, b.chassis_nr, self.bridge_path(b))
        return out

    def qemu_order(self) -> list[Connector]:
        """Connectors in the order QEMU's device tree lists them: the
        iteration order of its DRC container, a GLib hash table keyed by the
        index in hex, filled in creation order (see `ghash`)."""
        by_key = {f"{c.index:x}": c for c in self.creation_order()}
        return [by_key[k] for k in iteration_order(by_key)]

    def drc_properties(self, order: str = "index") -> dict[str, DrcArrays]:
        """Node path -> the four arrays, as QEMU's spapr_dt_drc writes them.
        ``order`` "index" sorts entries by index; "qemu" lists them as QEMU
        does, which makes the properties byte-identical to QEMU's."""
        if order not in ("index", "qemu"):
            raise DrcError(f"unknown order {order!r}")
        conns = self.connectors() if order == "index" else self.qemu_order()
        by_owner: dict[str, list[Connector]] = {}
        for c in conns:
            by_owner.setdefault(c.owner, []).append(c)
        return {path: drc_arrays(cs) for path, cs in sorted(by_owner.items())}

    # -- ibm,dynamic-reconfiguration-memory ---------------------------------------------
    def dynamic_memory_v2(self) -> bytes:
        """``ibm,dynamic-memory-v2``: count, then sets of {seq_lmbs u32,
        base u64, drc_index u32, aa_index u32, flags u32}.  One set covers
        boot RAM and the gap below the device region (reserved, no DRC); each
        DIMM gets an assigned, hot-removable set; free stretches get an empty
        set."""
        sets: list[bytes] = []

        def add(n: int, base: int, index: int, aa: int, flags: int) -> None:
            sets.append(cell(n) + u64(base) + cells(index, aa, flags))

        base = self.device_mem_base
        add(base // LMB_SIZE, 0, 0, -1, LmbFlags.RESERVED | LmbFlags.DRC_INVALID)
        cur = base
        for d in sorted(self.dimms, key=lambda d: d.addr):
            if cur < d.addr:
                add((d.addr - cur) // LMB_SIZE, cur, drc_index(DrcType.LMB, cur // LMB_SIZE), -1, 0)
            add(d.size // LMB_SIZE, d.addr, drc_index(DrcType.LMB, d.addr // LMB_SIZE), d.node,
                LmbFlags.ASSIGNED | LmbFlags.HOTREMOVABLE)
            cur = d.addr + d.size
        end = base + self.device_mem_size
        if cur < end:
            add((end - cur) // LMB_SIZE, cur, drc_index(DrcType.LMB, cur // LMB_SIZE), -1, 0)
        return cell(len(sets)) + b"".join(sets)

    def dynamic_reconfiguration_memory(self, numa_form: int = 2) -> Node | None:
        """The node the guest gets after CAS, or None without device memory
        (and then QEMU writes no node).  ``numa_form`` 2 is what a current
        Linux negotiates; 1 gives FORM1 lookup arrays."""
        if self.max_mem == self.memory:
            return None
        node = Node("ibm,dynamic-reconfiguration-memory")
        node.setprop("ibm,lmb-size", u64(LMB_SIZE))
        node.setprop_cell("ibm,memory-flags-mask", 0xFF)
        node.setprop_cell("ibm,memory-preservation-time", 0)
        node.setprop("ibm,dynamic-memory-v2", self.dynamic_memory_v2())
        node.setprop("ibm,associativity-lookup-arrays", associativity_lookup_arrays(numa_form))
        return node

    def device_tree(self, numa_form: int = 2, order: str = "index") -> Node:
        """A tree holding only what this module models: the DRC arrays at
        their nodes and the dynamic-reconfiguration-memory node."""
        root = Node("")
        for path, arrays in self.drc_properties(order).items():
            node = root
            for part in (p for p in path.split("/") if p):
                node = node.child(part) or node.add_subnode(part)
            for name, value in reversed(list(arrays.as_props().items())):
                node.setprop(name, value)
        drmem = self.dynamic_reconfiguration_memory(numa_form)
        if drmem is not None:
            root.children.append(drmem)
        return root


class LmbFlags(IntFlag):
    """Flags of an ``ibm,dynamic-memory(-v2)`` entry."""

    ASSIGNED = 0x08
    DRC_INVALID = 0x20
    RESERVED = 0x80
    HOTREMOVABLE = 0x100


def associativity(node_id: int, numa_form: int) -> bytes:
    """``ibm,associativity`` of a memory node (single-node machine)."""
    if numa_form == 1:
        return cells(4, 0, 0, 0, node_id)
    return cells(1, node_id)


def associativity_lookup_arrays(numa_form: int, nodes: int = 1) -> bytes:
    width = 4 if numa_form == 1 else 1
    body = b"".join(associativity(n, numa_form)[4:] for n in range(nodes))
    return cells(nodes, width) + body


# -- node builders for configure-connector ---------------------------------------------

def lmb_node(index: int, node_id: int = 0, numa_form: int = 2) -> Node:
    """The fragment QEMU's configure-connector hands out for an LMB.

    QEMU computes the address as ``drc_index * 256 MiB`` (type bits
    included, wrapping at 64 bits), not ``id * 256 MiB``; Linux never asks
    for LMB nodes (it reads ibm,dynamic-memory-v2), so the quirk is latent.
    This model reproduces it."""
    addr = (index * LMB_SIZE) & 0xFFFFFFFFFFFFFFFF
    node = Node(f"memory@{addr:x}")
    node.setprop_string("device_type", "memory")
    node.setprop("reg", u64(addr) + u64(LMB_SIZE))
    node.setprop("ibm,associativity", associativity(node_id, numa_form))
    return node


PA_FEATURES_300 = bytes.fromhex(
    "4200f63fc7c000f0800000000000000000008000800080000000800080008000"
    "00008000c000000000008000800080008000800080008000800080008000800080000000")
"""``ibm,pa-features`` at ISA 3.00 (POWER9, or a newer core in POWER9 compatibility)."""
PA_FEATURES_310 = bytes.fromhex(
    "4a00f63fc7c000f0800000000000000000008000800080000000800080008000"
    "00008000c0000000000080008000800080008000800080008000800080008000"
    "800080000000ce0000008000")
"""``ibm,pa-features`` at ISA 3.10 and later (POWER10, POWER11)."""
LOGICAL_PVR_3_00 = 0x0F000005
LOGICAL_PVR_3_10 = 0x0F000006
LOGICAL_PVR_3_11 = 0x0F000007


@dataclass(frozen=True)
class CpuModel:
    """What a CPU node says about the core type.  Defaults are QEMU 11.1's
    pseries default CPU (POWER11) under TCG, as its device tree shows;
    `CPU_MODELS` has the others (``-cpu``)."""

    fw_name: str = "PowerPC,POWER11"
    pvr: int = 0x00821200
    logical_pvr: int = LOGICAL_PVR_3_11
    """The logical (compatibility) PVR of the core's own ISA level: the
    newest compatibility mode it accepts at CAS."""
    cache_line: int = 0x80
    l1_dcache: int = 0x8000
    l1_icache: int = 0x8000
    timebase_hz: int = 512_000_000
    clock_hz: int = 1_000_000_000
    slb_size: int = 32
    segment_sizes: tuple[int, ...] = (28, 40, 0xFFFFFFFF, 0xFFFFFFFF)
    vmx: int = 2
    dfp: bool = True
    segment_page_sizes: tuple[int, ...] = (0x0C, 0x00, 0x01, 0x0C, 0x00, 0x10, 0x110, 0x01, 0x10, 0x01)
    pi_features: bytes = bytes.fromhex("010000")
    radix_ap: tuple[int, ...] = (0x0C, 0xA0000010, 0x20000015, 0x4000001E)
    dec_bits: int = 56

    @property
    def compat_pvrs(self) -> tuple[int, ...]:
        """Compatibility PVRs this model can run with (ISA 3.00 up to its
        own level; older modes change more of the tree than is modelled)."""
        return tuple(range(LOGICAL_PVR_3_00, self.logical_pvr + 1))

    def pa_features(self, compat_pvr: int = 0) -> bytes:
        """``ibm,pa-features`` as spapr_dt_pa_features picks it: by the
        compatibility level when one is set, else by the core's own."""
        level = compat_pvr or self.logical_pvr
        return PA_FEATURES_300 if level == LOGICAL_PVR_3_00 else PA_FEATURES_310


CPU_MODELS: dict[str, CpuModel] = {
    "POWER9": CpuModel(fw_name="PowerPC,POWER9", pvr=0x004E1202, logical_pvr=LOGICAL_PVR_3_00),
    "POWER10": CpuModel(fw_name="PowerPC,POWER10", pvr=0x00801200, logical_pvr=LOGICAL_PVR_3_10),
    "POWER11": CpuModel(),
}
"""The -cpu models of QEMU 11.1's pseries machine this module describes
(their boot CPU nodes are compared with QEMU's in tests/test_spapr_qemu.py)."""


def cpu_model(name: str) -> CpuModel:
    try:
        return CPU_MODELS[name.upper()]
    except KeyError:
        raise DrcError(f"CPU model {name!r}: one of {', '.join(CPU_MODELS)}") from None


def cpu_node(index: int, vcpu_id: int, threads: int, chip_id: int, htab_shift: int,
             model: CpuModel = CpuModel(), hotplugged: bool = True, compat_pvr: int = 0) -> Node:
    """A CPU core node as QEMU's spapr_dt_cpu builds it (hot-added cores also
    carry ``name``).  ``htab_shift`` is the hash table order the guest runs
    with, 0 in radix mode (QEMU frees the HPT when the guest picks radix at
    CAS), and ``compat_pvr`` the compatibility PVR negotiated at CAS (0:
    none, the raw PVR shows), which replaces ``cpu-version`` in place."""
    if compat_pvr and compat_pvr not in model.compat_pvrs:
        raise DrcError(f"compatibility PVR {compat_pvr:#010x} is not one of {model.fw_name}'s "
                       f"({', '.join(f'{p:#010x}' for p in model.compat_pvrs)})")
    node = Node(f"{model.fw_name}@{vcpu_id:x}")
    node.setprop_cell("ibm,my-drc-index", index)
    node.setprop_cell("reg", vcpu_id)
    node.setprop_string("device_type", "cpu")
    node.setprop_cell("cpu-version", compat_pvr or model.pvr)
    for p in ("d-cache-block-size", "d-cache-line-size", "i-cache-block-size", "i-cache-line-size"):
        node.setprop_cell(p, model.cache_line)
    node.setprop_cell("d-cache-size", model.l1_dcache)
    node.setprop_cell("i-cache-size", model.l1_icache)
    node.setprop_cell("timebase-frequency", model.timebase_hz)
    node.setprop_cell("clock-frequency", model.clock_hz)
    node.setprop_cell("slb-size", model.slb_size)
    node.setprop_cell("ibm,slb-size", model.slb_size)
    node.setprop_string("status", "okay")
    node.setprop("64-bit", b"")
    node.setprop_cell("ibm,purr", 1)
    node.setprop_cell("ibm,spurr", 1)
    node.setprop("ibm,processor-segment-sizes", cells(*model.segment_sizes))
    node.setprop_cell("ibm,vmx", model.vmx)
    if model.dfp:
        node.setprop_cell("ibm,dfp", 1)
    node.setprop("ibm,segment-page-sizes", cells(*model.segment_page_sizes))
    node.setprop("ibm,pa-features", model.pa_features(compat_pvr))
    node.setprop("ibm,pi-features", model.pi_features)
    node.setprop_cell("ibm,chip-id", chip_id)
    node.setprop("ibm,pft-size", cells(0, htab_shift))
    node.setprop("ibm,ppc-interrupt-server#s", cells(*(vcpu_id + t for t in range(threads))))
    node.setprop("ibm,ppc-interrupt-gserver#s",
                 b"".join(cells(vcpu_id + t, 0) for t in range(threads)))
    node.setprop("ibm,processor-radix-AP-encodings", cells(*model.radix_ap))
    node.setprop_cell("ibm,dec-bits", model.dec_bits)
    if hotplugged:
        node.setprop_string("name", node.name)
    return node


def htab_shift_for(ram: int) -> int:
    """The hash page table order QEMU picks for ``ram`` bytes (1/128 of RAM,
    between 2**18 and 2**46)."""
    shift = 18
    while shift < 46 and (1 << (shift + 7)) < ram:
        shift += 1
    return shift


# PCI node names by class code: QEMU 11.1 spapr_pci.c's table (class -> name
# and subclasses; a subclass may name programming interfaces).  A class past
# the table is "pci"; a subclass or interface not listed keeps the name found
# so far.
_PCI_IFACES_PIC = {0x10: "io-apic", 0x20: "io-xapic"}
_PCI_IFACES_USB = {0x00: "usb-uhci", 0x10: "usb-ohci", 0x20: "usb-ehci", 0x30: "usb-xhci",
                   0x80: "usb-unknown", 0xFE: "usb-device"}
PCI_CLASS_NAMES: tuple[tuple[str, dict[int, tuple[str, dict[int, str]]]], ...] = (
    ("legacy-device", {0x01: ("display", {})}),
    ("mass-storage", {0x00: ("scsi", {}), 0x01: ("ide", {}), 0x02: ("fdc", {}), 0x03: ("ipi", {}),
                      0x04: ("raid", {}), 0x05: ("ata", {}), 0x06: ("sata", {}), 0x07: ("sas", {})}),
    ("network", {0x00: ("ethernet", {}), 0x01: ("token-ring", {}), 0x02: ("fddi", {}),
                 0x03: ("atm", {}), 0x04: ("isdn", {}), 0x05: ("worldfip", {}), 0x06: ("picmg", {})}),
    ("display", {0x00: ("vga", {}), 0x01: ("xga", {}), 0x02: ("3d-controller", {})}),
    ("multimedia-device", {0x00: ("video", {}), 0x01: ("sound", {}), 0x02: ("telephony", {})}),
    ("memory-controller", {0x00: ("memory", {}), 0x01: ("flash", {})}),
    ("unknown-bridge", {0x00: ("host", {}), 0x01: ("isa", {}), 0x02: ("eisa", {}), 0x03: ("mca", {}),
                        0x04: ("pci", {}), 0x05: ("pcmcia", {}), 0x06: ("nubus", {}),
                        0x07: ("cardbus", {}), 0x08: ("raceway", {}),
                        0x09: ("semi-transparent-pci", {}), 0x0A: ("infiniband", {})}),
    ("communication-controller", {0x00: ("serial", {}), 0x01: ("parallel", {}),
                                  0x02: ("multiport-serial", {}), 0x03: ("modem", {}),
                                  0x04: ("gpib", {}), 0x05: ("smart-card", {})}),
    ("system-peripheral", {0x00: ("interrupt-controller", _PCI_IFACES_PIC),
                           0x01: ("dma-controller", {}), 0x02: ("timer", {}), 0x03: ("rtc", {}),
                           0x04: ("hot-plug-controller", {}), 0x05: ("sd-host-controller", {})}),
    ("input-controller", {0x00: ("keyboard", {}), 0x01: ("pen", {}), 0x02: ("mouse", {}),
                          0x03: ("scanner", {}), 0x04: ("gameport", {})}),
    ("docking-station", {0x00: ("dock", {})}),
    ("cpu", {0x02: ("pentium", {}), 0x20: ("powerpc", {}), 0x30: ("mips", {}),
             0x40: ("co-processor", {})}),
    ("serial-bus", {0x00: ("firewire", {}), 0x01: ("access-bus", {}), 0x02: ("ssa", {}),
                    0x03: ("usb", _PCI_IFACES_USB), 0x04: ("fibre-channel", {}), 0x05: ("smb", {}),
                    0x06: ("infiniband", {}), 0x07: ("ipmi", {}), 0x08: ("sercos", {}),
                    0x09: ("canbus", {})}),
    ("wireless-controller", {0x00: ("irda", {}), 0x01: ("consumer-ir", {}),
                             0x10: ("rf-controller", {}), 0x11: ("bluetooth", {}),
                             0x12: ("broadband", {})}),
    ("intelligent-io", {}),
    ("satellite-device", {0x00: ("satellite-tv", {}), 0x01: ("satellite-audio", {}),
                          0x03: ("satellite-voice", {}), 0x04: ("satellite-data", {})}),
    ("encryption", {0x00: ("network-encryption", {}), 0x01: ("entertainment-encryption", {})}),
    ("data-processing-controller", {0x00: ("dpio", {}), 0x01: ("counter", {}),
                                    0x10: ("measurement", {}), 0x20: ("management-card", {})}),
)


def pci_node_name(class_code: int) -> str:
    """The node base name QEMU gives a function of this 24-bit class code
    (spapr_pci.c's dt_name_from_class)."""
    base, sub, iface = (class_code >> 16) & 0xFF, (class_code >> 8) & 0xFF, class_code & 0xFF
    if base >= len(PCI_CLASS_NAMES):
        return "pci"
    name, subclasses = PCI_CLASS_NAMES[base]
    if sub not in subclasses:
        return name
    name, ifaces = subclasses[sub]
    return ifaces.get(iface, name)


class BarType(IntEnum):
    """The space code of a ``reg`` / ``assigned-addresses`` entry (IEEE
    1275 PCI binding: phys.hi bits 25..24)."""

    IO = 1
    MEM32 = 2
    MEM64 = 3


ROM_BAR = 6
PCI_BAR_UNMAPPED = None


@dataclass(frozen=True)
class Bar:
    """One region of a PCI function: ``index`` 0..5 for the BARs, 6 for the
    expansion ROM; ``addr`` is where the BAR is mapped (None: unmapped, as
    every BAR of a function the guest has not set up yet)."""

    index: int
    type: BarType
    size: int
    addr: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.index <= ROM_BAR or self.size <= 0 or self.size >= 1 << 64:
            raise DrcError(f"bad BAR {self}")
        if self.index == ROM_BAR and self.type is not BarType.MEM32:
            raise DrcError("the expansion ROM is a 32-bit memory region")

    def register(self, bridge: bool = False) -> int:
        """Config-space offset of the BAR (pci_bar)."""
        if self.index == ROM_BAR:
            return 0x38 if bridge else 0x30
        return 0x10 + 4 * self.index


@dataclass(frozen=True)
class PciFunction:
    """Config-space facts a PCI device node is built from."""

    devfn: int
    vendor_id: int
    device_id: int
    class_code: int
    revision: int = 0
    irq_pin: int = 1
    subsystem_vendor_id: int = 0
    subsystem_id: int = 0
    cache_line_size: int = 0
    status: int = 0x0010
    msi_vectors: int = 0
    msix_vectors: int = 0
    express: bool = False
    min_grant: int = 0
    max_latency: int = 0
    bars: tuple[Bar, ...] = ()
    """The function's regions, in BAR order (``reg`` and ``assigned-addresses``
    are built from them unless given as bytes below)."""
    bus: int = 0
    """The bus number the guest gave the function's bus (0 for a PHB's root bus)."""
    type_name: str = ""
    """QEMU's device type (``-device`` driver), which the made-up
    ``ibm,loc-code`` carries: ``qemu_TYPE:PHB:BUS:SLOT.FUNC``."""
    reg: bytes | None = None
    """``reg`` cells as bytes, overriding `bars`."""
    assigned_addresses: bytes | None = None
    loc_code: str | None = None
    """``ibm,loc-code``, overriding the one made from `type_name`."""
    name: str | None = None
    """Node base name; by default QEMU's name for the class code (`pci_node_name`)."""

    def __post_init__(self) -> None:
        if len({b.index for b in self.bars}) != len(self.bars):
            raise DrcError("a BAR index is given twice")

    @property
    def node_name(self) -> str:
        return self.name if self.name is not None else pci_node_name(self.class_code)

    def resource_props(self) -> tuple[bytes, bytes]:
        """(``reg``, ``assigned-addresses``) as populate_resource_props
        makes them: the config space entry, then per region {phys.hi with
        bus/device/function, space code and BAR register, 0, 0, size}; the
        mapped regions again with the non-relocatable bit and their address."""
        dev = (self.bus & 0xFF) << 16 | (self.devfn >> 3) << 11 | (self.devfn & 7) << 8
        reg = [cells(dev, 0, 0, 0, 0)]
        assigned = []
        for b in sorted(self.bars, key=lambda b: b.index):
            hi = dev | b.register() | b.type << 24
            reg.append(cells(hi, 0, 0, b.size >> 32, b.size & 0xFFFFFFFF))
            if b.addr is not None:
                assigned.append(cells(hi | 1 << 31, b.addr >> 32, b.addr & 0xFFFFFFFF,
                                      b.size >> 32, b.size & 0xFFFFFFFF))
        return b"".join(reg), b"".join(assigned)

    def location(self, phb: int) -> str:
        if self.loc_code is not None:
            return self.loc_code
        return f"qemu_{self.type_name}:{phb:04x}:{self.bus:02x}:{self.devfn >> 3:02x}.{self.devfn & 7:x}"


def pci_node(fn: PciFunction, index: int, pcie_ecs: bool = True, phb: int = 0) -> Node:
    """A PCI function's node as spapr_dt_pci_device builds it."""
    slot, func = fn.devfn >> 3, fn.devfn & 7
    unit = f"{slot:x}" if func == 0 else f"{slot:x},{func:x}"
    node = Node(f"{fn.node_name}@{unit}")
    node.setprop_cell("vendor-id", fn.vendor_id)
    node.setprop_cell("device-id", fn.device_id)
    node.setprop_cell("revision-id", fn.revision)
    node.setprop_cell("class-code", fn.class_code)
    if fn.irq_pin:
        node.setprop_cell("interrupts", fn.irq_pin)
    if fn.subsystem_id:
        node.setprop_cell("subsystem-id", fn.subsystem_id)
    if fn.subsystem_vendor_id:
        node.setprop_cell("subsystem-vendor-id", fn.subsystem_vendor_id)
    node.setprop_cell("cache-line-size", fn.cache_line_size)
    node.setprop_cell("devsel-speed", fn.status & 0x0600)
    if fn.status & 0x0080:
        node.setprop("fast-back-to-back", b"")
    if fn.status & 0x0020:
        node.setprop("66mhz-capable", b"")
    if fn.status & 0x0040:
        node.setprop("udf-supported", b"")
    node.setprop_string("ibm,loc-code", fn.location(phb))
    node.setprop_cell("ibm,my-drc-index", index)
    if fn.msi_vectors:
        node.setprop_cell("ibm,req#msi", fn.msi_vectors)
    if fn.msix_vectors:
        node.setprop_cell("ibm,req#msi-x", fn.msix_vectors)
    reg, assigned = fn.resource_props()
    node.setprop("reg", fn.reg if fn.reg is not None else reg)
    assigned = fn.assigned_addresses if fn.assigned_addresses is not None else assigned
    if assigned:
        # QEMU 11.1 leaves the property out while no BAR is mapped (seen in
        # the booted-guest differential: a hot-added function has none).
        node.setprop("assigned-addresses", assigned)
    if pcie_ecs and fn.express:
        node.setprop_cell("ibm,pci-config-space-type", 1)
    node.setprop_cell("min-grant", fn.min_grant)
    node.setprop_cell("max-latency", fn.max_latency)
    return node
