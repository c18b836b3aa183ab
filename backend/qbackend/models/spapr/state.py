"""The DRC state machine and the RTAS calls that drive it, as QEMU 11.1's
pseries machine implements them (spapr_drc.c, spapr_rtas.c,
spapr_events.c), sans-IO.

States (their values are what QEMU migrates)::

    logical  (CPU, LMB, PHB, PMEM): UNUSABLE 1, AVAILABLE 2, UNISOLATE 3, CONFIGURED 4
    physical (PCI):                 POWERON 6, UNISOLATE 7, CONFIGURED 8  (AVAILABLE 5 unused)

A DRC without a device rests in its *empty* state (UNUSABLE / POWERON); a
cold-plugged device, or any device after a reset, sits in the *ready* state
(CONFIGURED).  Hot-plugged devices start empty, and the guest walks them up:
allocation USABLE (logical only), isolation UNISOLATE, configure-connector
until it answers 0, which makes the DRC CONFIGURED.

`TRANSITIONS` is the whole state machine: one table per (class, operation),
one `Rule` per state, applied by `DrcSet.apply`.  RTAS calls return an
`RtasResult` (the return cells plus the effects the backend must carry out:
released devices, rejected unplugs, interrupts to pulse).

Guest memory for configure-connector and check-exception is anything with
``read(addr, n)`` and ``write(addr, data)``; `FlatMemory` is a bytearray.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum, IntEnum, StrEnum
from typing import Protocol

from qbackend.errors import ModelError
from qbackend.models.spapr.drc import (
    LMB_SIZE,
    DrcError,
    DrcType,
    MachineConfig,
    PciFunction,
    cpu_node,
    drc_index,
    htab_shift_for,
    lmb_node,
    pci_node,
)
from qbackend.models.spapr.events import HP_TYPE_OF, EventClass, HotplugEvent, HpAction, HpId
from qbackend.models.spapr.fdt import Node, Tag, Token, tokens


class Mmu(StrEnum):
    """The MMU mode a guest picks at CAS (option vector 5, byte 24)."""

    HASH = "hash"
    RADIX = "radix"


class RtasStatus(IntEnum):
    """RTAS return codes.  PARAM_ERROR, NOT_SUPPORTED and NO_SUCH_INDICATOR
    are all -3 in QEMU (aliases here)."""

    SUCCESS = 0
    NO_ERRORS_FOUND = 1
    HW_ERROR = -1
    PARAM_ERROR = -3
    NOT_SUPPORTED = -3
    NO_SUCH_INDICATOR = -3
    NOT_CONFIGURABLE = -9003


class CcResponse(IntEnum):
    """ibm,configure-connector answers (PAPR 13.5.3.5)."""

    NOT_CONFIGURABLE = -9003
    ERROR = -1
    SUCCESS = 0
    NEXT_SIB = 1
    NEXT_CHILD = 2
    NEXT_PROPERTY = 3
    PREV_PARENT = 4
    CALL_AGAIN = 5


class DrcState(IntEnum):
    LOGICAL_UNUSABLE = 1
    LOGICAL_AVAILABLE = 2
    LOGICAL_UNISOLATE = 3
    LOGICAL_CONFIGURED = 4
    PHYSICAL_AVAILABLE = 5
    PHYSICAL_POWERON = 6
    PHYSICAL_UNISOLATE = 7
    PHYSICAL_CONFIGURED = 8


class Sensor(IntEnum):
    """Sensor / indicator tokens of set-indicator and get-sensor-state."""

    ISOLATION_STATE = 9001
    DR_INDICATOR = 9002
    ALLOCATION_STATE = 9003
    ENTITY_SENSE = 9003


class Isolation(IntEnum):
    ISOLATED = 0
    UNISOLATED = 1


class Allocation(IntEnum):
    UNUSABLE = 0
    USABLE = 1
    EXCHANGE = 2
    RECOVER = 3


class DrIndicator(IntEnum):
    INACTIVE = 0
    ACTIVE = 1
    IDENTIFY = 2
    ACTION = 3


class EntitySense(IntEnum):
    EMPTY = 0
    PRESENT = 1
    UNUSABLE = 2
    EXCHANGE = 3
    RECOVER = 4


class Op(Enum):
    ISOLATE = "isolate"
    UNISOLATE = "unisolate"
    SET_USABLE = "set-usable"
    SET_UNUSABLE = "set-unusable"


class Cond(Enum):
    """Guards checked, in order, before a transition is taken."""

    NO_DEVICE = "no device attached"
    UNPLUG_REQUESTED = "unplug requested"
    LMB_NOT_UNPLUGGING = "LMB not marked for unplug"


class Action(Enum):
    RELEASE_IF_UNPLUG = "release the device if an unplug is pending"
    REWIND = "rewind the configure-connector cursor"
    REJECT_UNPLUG = "guest rejected a pending unplug"


@dataclass(frozen=True)
class Rule:
    rc: RtasStatus = RtasStatus.SUCCESS
    to: DrcState | None = None
    guards: tuple[tuple[Cond, RtasStatus], ...] = ()
    actions: tuple[Action, ...] = ()


_S = DrcState
_R = RtasStatus
OK = Rule()

TRANSITIONS: dict[tuple[bool, Op], dict[DrcState, Rule]] = {
    # (physical?, op) -> state -> rule
    (True, Op.ISOLATE): {
        _S.PHYSICAL_POWERON: OK,
        _S.PHYSICAL_CONFIGURED: Rule(to=_S.PHYSICAL_POWERON, actions=(Action.RELEASE_IF_UNPLUG,)),
        _S.PHYSICAL_UNISOLATE: Rule(_R.PARAM_ERROR),
    },
    (True, Op.UNISOLATE): {
        _S.PHYSICAL_UNISOLATE: OK,
        _S.PHYSICAL_CONFIGURED: OK,
        _S.PHYSICAL_POWERON: Rule(to=_S.PHYSICAL_UNISOLATE,
                                  guards=((Cond.NO_DEVICE, _R.NO_SUCH_INDICATOR),),
                                  actions=(Action.REWIND,)),
    },
    (False, Op.ISOLATE): {
        _S.LOGICAL_AVAILABLE: OK,
        _S.LOGICAL_UNUSABLE: OK,
        _S.LOGICAL_CONFIGURED: Rule(to=_S.LOGICAL_AVAILABLE,
                                    guards=((Cond.LMB_NOT_UNPLUGGING, _R.HW_ERROR),)),
        _S.LOGICAL_UNISOLATE: Rule(_R.PARAM_ERROR),
    },
    (False, Op.UNISOLATE): {
        _S.LOGICAL_UNISOLATE: Rule(actions=(Action.REJECT_UNPLUG,)),
        _S.LOGICAL_CONFIGURED: Rule(actions=(Action.REJECT_UNPLUG,)),
        _S.LOGICAL_AVAILABLE: Rule(to=_S.LOGICAL_UNISOLATE, actions=(Action.REWIND,)),
        _S.LOGICAL_UNUSABLE: Rule(_R.NO_SUCH_INDICATOR),
    },
    (False, Op.SET_USABLE): {
        _S.LOGICAL_AVAILABLE: OK,
        _S.LOGICAL_UNISOLATE: OK,
        _S.LOGICAL_CONFIGURED: OK,
        _S.LOGICAL_UNUSABLE: Rule(to=_S.LOGICAL_AVAILABLE,
                                  guards=((Cond.NO_DEVICE, _R.NO_SUCH_INDICATOR),
                                          (Cond.UNPLUG_REQUESTED, _R.NO_SUCH_INDICATOR))),
    },
    (False, Op.SET_UNUSABLE): {
        _S.LOGICAL_UNUSABLE: OK,
        _S.LOGICAL_AVAILABLE: Rule(to=_S.LOGICAL_UNUSABLE, actions=(Action.RELEASE_IF_UNPLUG,)),
        _S.LOGICAL_UNISOLATE: Rule(_R.NO_SUCH_INDICATOR),
        _S.LOGICAL_CONFIGURED: Rule(_R.NO_SUCH_INDICATOR),
    },
}


class DrcStateError(ModelError, RuntimeError):
    """The host side asked for something QEMU would refuse or assert on
    (attaching to a busy DRC, a state outside the tables)."""


# -- effects -------------------------------------------------------------------------

@dataclass(frozen=True)
class Released:
    """A DRC let go of its device (QEMU: drck->release)."""

    index: int
    device: str


@dataclass(frozen=True)
class DeviceRemoved:
    """A device has no DRC left: QEMU unplugs it (DEVICE_DELETED)."""

    device: str


@dataclass(frozen=True)
class UnplugRejected:
    """The guest unisolated (or reconfigured) a DRC marked for unplug:
    QEMU clears the request and sends DEVICE_UNPLUG_GUEST_ERROR (and
    MEM_UNPLUG_ERROR for memory)."""

    device: str


@dataclass(frozen=True)
class IrqPulse:
    """Pulse the interrupt of an event source (an event was queued, or more
    remain after check-exception)."""

    source: EventClass


Effect = Released | DeviceRemoved | UnplugRejected | IrqPulse


@dataclass(frozen=True)
class RtasResult:
    status: int
    values: tuple[int, ...] = ()
    """Return cells after the status (None-free: cells QEMU leaves alone are absent)."""
    effects: tuple[Effect, ...] = ()

    @property
    def rets(self) -> tuple[int, ...]:
        """All return cells as the guest sees them (unsigned 32-bit)."""
        return tuple(v & 0xFFFFFFFF for v in (self.status, *self.values))


# -- devices and connectors ----------------------------------------------------------------

@dataclass
class Device:
    """What a DRC holds.  ``populate`` builds the node configure-connector
    hands out (None: QEMU has no node for it here, the walk answers -1)."""

    id: str
    populate: Callable[[int], Node] | None = None


@dataclass
class Drc:
    index: int
    kind: DrcType
    id: int
    state: DrcState
    device: Device | None = None
    unplug_requested: bool = False
    dr_indicator: DrIndicator = DrIndicator.INACTIVE
    fdt: list[Token] | None = None
    ccs_offset: int = -1
    ccs_depth: int = -1

    @property
    def physical(self) -> bool:
        return self.kind.physical

    @property
    def empty_state(self) -> DrcState:
        return _S.PHYSICAL_POWERON if self.physical else _S.LOGICAL_UNUSABLE

    @property
    def ready_state(self) -> DrcState:
        return _S.PHYSICAL_CONFIGURED if self.physical else _S.LOGICAL_CONFIGURED

    def entity_sense(self) -> EntitySense:
        if self.physical:
            return EntitySense.PRESENT if self.device else EntitySense.EMPTY
        if self.state is _S.LOGICAL_UNUSABLE:
            return EntitySense.UNUSABLE
        return EntitySense.PRESENT

    def rewind(self) -> None:
        self.ccs_offset, self.ccs_depth = 0, 0


class GuestMemory(Protocol):
    def read(self, addr: int, n: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


class FlatMemory:
    """Guest memory as one bytearray starting at address 0."""

    def __init__(self, size: int) -> None:
        self.data = bytearray(size)

    def read(self, addr: int, n: int) -> bytes:
        if addr < 0 or addr + n > len(self.data):
            raise DrcError(f"guest access [{addr:#x}, +{n}) outside {len(self.data):#x} bytes")
        return bytes(self.data[addr:addr + n])

    def write(self, addr: int, data: bytes) -> None:
        if addr < 0 or addr + len(data) > len(self.data):
            raise DrcError(f"guest access [{addr:#x}, +{len(data)}) outside {len(self.data):#x} bytes")
        self.data[addr:addr + len(data)] = data


def _ld(mem: GuestMemory, addr: int, i: int) -> int:
    return int.from_bytes(mem.read(addr + 4 * i, 4), "big")


def _st(mem: GuestMemory, addr: int, i: int, value: int) -> None:
    mem.write(addr + 4 * i, (value & 0xFFFFFFFF).to_bytes(4, "big"))


CC_WA_LEN = 4096
CC_VAL_DATA_OFFSET = 20


# -- the machine's connectors ---------------------------------------------------------------

@dataclass
class PendingEvent:
    event: HotplugEvent
    source: EventClass


@dataclass
class DrcSet:
    """Every DRC of a machine, the devices on them and the event queue."""

    config: MachineConfig
    hp_event_source: bool = True
    """OV5_HP_EVT negotiated at CAS: hotplug events go to the dedicated
    hot-plug source and memory is added by count-indexed."""
    numa_form: int = 2
    clock: Callable[[], datetime] = field(default=lambda: datetime(2000, 1, 1))
    """The guest's clock (QEMU's RTC): an event log carries the date and time
    its event was queued at."""
    plid_order: str = "little"
    mmu: Mmu = Mmu.RADIX
    """The MMU mode the guest picked at CAS; after a reset, hash until it
    negotiates again."""
    compat_pvr: int | None = None
    """The compatibility PVR negotiated at CAS: 0 for none (the raw PVR),
    None for the CPU model's own logical PVR, which a current Linux gets."""
    htab_shift: int | None = None
    """The hash page table order in hash mode; None: QEMU's choice for the
    RAM (boot RAM and DIMMs) present when the table was made."""
    drcs: dict[int, Drc] = field(default_factory=dict)
    events: list[PendingEvent] = field(default_factory=list)
    next_plid: int = 0

    def __post_init__(self) -> None:
        self.mmu = Mmu(self.mmu)
        self._check_compat(self.compat_pvr)

    def _check_compat(self, pvr: int | None) -> None:
        model = self.config.cpu
        if pvr and pvr not in model.compat_pvrs:
            raise DrcError(f"compatibility PVR {pvr:#010x} is not one {model.fw_name} accepts "
                           f"({', '.join(f'{p:#010x}' for p in model.compat_pvrs)}, or 0 for none)")

    # -- what the guest negotiated ----------------------------------------------------------
    @property
    def effective_compat_pvr(self) -> int:
        return self.config.cpu.logical_pvr if self.compat_pvr is None else self.compat_pvr

    def plugged_memory(self) -> int:
        return LMB_SIZE * sum(1 for d in self.drcs.values() if d.kind is DrcType.LMB and d.device)

    def pft_shift(self) -> int:
        """The second cell of ``ibm,pft-size``: 0 in radix mode, else the HPT order."""
        if self.mmu is Mmu.RADIX:
            return 0
        if self.htab_shift is None:
            self.htab_shift = htab_shift_for(self.config.memory + self.plugged_memory())
        return self.htab_shift

    def cas(self, mmu: Mmu | str | None = None, compat_pvr: int | None = None,
            hp_events: bool | None = None, htab_shift: int | None = None) -> None:
        """What h_client_architecture_support settles: the MMU mode (QEMU frees
        the hash table for radix and sets one up for hash, sized for the RAM
        present now unless ``htab_shift`` says otherwise), the compatibility
        PVR (0: none) and whether hotplug events get their own source.  What
        is not given stays."""
        if compat_pvr is not None:
            self._check_compat(compat_pvr)
            self.compat_pvr = compat_pvr
        if hp_events is not None:
            self.hp_event_source = hp_events
        if mmu is not None:
            self.mmu = Mmu(mmu)
            self.htab_shift = None
        if htab_shift is not None:
            if not 18 <= htab_shift <= 46:
                raise DrcError(f"htab-shift {htab_shift}: QEMU's hash tables are 2**18 .. 2**46 bytes")
            self.htab_shift = htab_shift
        if self.mmu is Mmu.HASH:
            self.pft_shift()

    @classmethod
    def for_machine(cls, config: MachineConfig, **kw: object) -> DrcSet:
        """All connectors, with the cold-plugged devices QEMU starts with:
        boot CPU cores, PHB 0 and extra PHBs, DIMMs, bridges."""
        s = cls(config, **kw)  # type: ignore[arg-type]
        for c in config.connectors():
            empty = _S.PHYSICAL_POWERON if c.kind.physical else _S.LOGICAL_UNUSABLE
            s.drcs[c.index] = Drc(c.index, c.kind, c.id, empty)
        for core in range(config.cpus // config.threads):
            s.plug_cpu(core, f"core{core}", hotplugged=False)
        for phb in (0, *config.phbs):
            s.plug_phb(phb, f"phb{phb}", hotplugged=False)
        for i, d in enumerate(config.dimms):
            s.plug_dimm(d.addr, d.size, f"dimm{i}", node_id=d.node, hotplugged=False)
        for b in config.bridges:
            s.attach(drc_index(DrcType.PCI, (b.phb << 16) | b.devfn), Device(f"bridge{b.chassis_nr}"))
            s.drc(drc_index(DrcType.PCI, (b.phb << 16) | b.devfn)).state = _S.PHYSICAL_CONFIGURED
        return s

    # -- lookup -------------------------------------------------------------------------
    def drc(self, index: int) -> Drc:
        try:
            return self.drcs[index]
        except KeyError:
            raise DrcError(f"no DRC {index:#010x}") from None

    def device_drcs(self, device: str) -> list[Drc]:
        return [d for d in self.drcs.values() if d.device is not None and d.device.id == device]

    # -- the table ----------------------------------------------------------------------------
    def apply(self, drc: Drc, op: Op) -> tuple[RtasStatus, list[Effect]]:
        table = TRANSITIONS.get((drc.physical, op))
        if table is None or drc.state not in table:
            raise DrcStateError(f"{op.value} has no rule for {drc.state.name} on {drc.kind.name}")
        rule = table[drc.state]
        for cond, rc in rule.guards:
            if (cond is Cond.NO_DEVICE and drc.device is None) \
                    or (cond is Cond.UNPLUG_REQUESTED and drc.unplug_requested) \
                    or (cond is Cond.LMB_NOT_UNPLUGGING and drc.kind is DrcType.LMB
                        and not drc.unplug_requested):
                return rc, []
        effects: list[Effect] = []
        if rule.to is not None:
            drc.state = rule.to
        for action in rule.actions:
            if action is Action.REWIND:
                drc.rewind()
            elif action is Action.RELEASE_IF_UNPLUG and drc.unplug_requested:
                effects += self._release(drc)
            elif action is Action.REJECT_UNPLUG and drc.unplug_requested and drc.device:
                effects += self._reject_unplug(drc)
        return rule.rc, effects

    def _release(self, drc: Drc) -> list[Effect]:
        assert drc.device is not None
        dev = drc.device
        drc.unplug_requested = False
        drc.fdt = None
        drc.device = None
        effects: list[Effect] = [Released(drc.index, dev.id)]
        if not self.device_drcs(dev.id):
            effects.append(DeviceRemoved(dev.id))
        return effects

    def _reject_unplug(self, drc: Drc) -> list[Effect]:
        assert drc.device is not None
        if drc.kind is DrcType.LMB:
            # spapr_memory_unplug_rollback: the whole DIMM stays.
            for other in self.device_drcs(drc.device.id):
                other.unplug_requested = False
        drc.unplug_requested = False
        return [UnplugRejected(drc.device.id)]

    # -- host side: attach, unplug, reset ------------------------------------------------------
    def attach(self, index: int, device: Device) -> Drc:
        drc = self.drc(index)
        if drc.device is not None or drc.state is not drc.empty_state:
            raise DrcStateError(f"DRC {index:#010x} is busy ({drc.state.name})")
        drc.device = device
        return drc

    def reset_drc(self, drc: Drc, dr_indicator: bool = True) -> list[Effect]:
        """spapr_drc_reset: finish a pending unplug, then ready or empty.
        ``dr_indicator``: also set a physical DRC's indicator from whether it
        holds a device (QEMU does that in a reset handler of its own)."""
        if drc.physical and dr_indicator:
            drc.dr_indicator = DrIndicator.ACTIVE if drc.device else DrIndicator.INACTIVE
        effects = self._release(drc) if drc.unplug_requested and drc.device else []
        if drc.device is not None:
            drc.state = drc.ready_state
            drc.rewind()
        else:
            drc.state = drc.empty_state
            drc.ccs_offset = drc.ccs_depth = -1
        return effects

    def reset(self) -> list[Effect]:
        """A machine reset as spapr_machine_reset does it: a hash table for
        the RAM present, the physical DRCs' indicators set from their devices (a reset handler that runs with
        the devices, before the DRCs), then every DRC is reset (a pending
        unplug completes: the device is released), the queued events are
        dropped, and what the guest negotiated at CAS is forgotten: no
        compatibility mode, hash MMU, hotplug events on the EPOW source,
        until the guest negotiates again (`cas`)."""
        self.mmu, self.htab_shift = Mmu.HASH, None
        self.pft_shift()     # spapr_setup_hpt, first: DIMMs about to be released still count
        for drc in self.drcs.values():
            if drc.physical:
                drc.dr_indicator = DrIndicator.ACTIVE if drc.device else DrIndicator.INACTIVE
        effects: list[Effect] = []
        for drc in list(self.drcs.values()):
            effects += self.reset_drc(drc, dr_indicator=False)
        self.events.clear()
        self.compat_pvr = 0
        self.hp_event_source = False
        return effects

    def unplug_request_drc(self, drc: Drc) -> list[Effect]:
        if drc.device is None:
            raise DrcStateError(f"DRC {drc.index:#010x} has no device to unplug")
        drc.unplug_requested = True
        if drc.state is drc.empty_state:
            return self._release(drc)
        return []

    def _queue(self, kind: DrcType, action: HpAction, id_type: HpId, index: int = 0,
               count: int = 0) -> list[Effect]:
        ev = HotplugEvent(HP_TYPE_OF[kind], action, id_type, index=index, count=count,
                          plid=self.next_plid, when=self.clock())
        self.next_plid = (self.next_plid + 1) & 0xFFFFFFFF
        source = EventClass.HOT_PLUG if self.hp_event_source else EventClass.EPOW
        self.events.append(PendingEvent(ev, source))
        return [IrqPulse(source)]

    def plug_cpu(self, core: int, device: str, hotplugged: bool = True,
                 chip_id: int | None = None) -> list[Effect]:
        """Plug a core.  Its node is built when the guest first asks for it
        (configure-connector), from what was negotiated then: the MMU mode
        (``ibm,pft-size``) and the compatibility PVR (``cpu-version``)."""
        cfg = self.config
        vcpu = core * cfg.vsmt
        index = drc_index(DrcType.CPU, vcpu)
        cores_per_chip = max(1, cfg.max_cpus // cfg.threads)
        chip = chip_id if chip_id is not None else (core * cfg.threads) // (cfg.threads * cores_per_chip)
        drc = self.attach(index, Device(device, lambda i: cpu_node(
            i, vcpu, cfg.threads, chip, self.pft_shift(), cfg.cpu, hotplugged=True,
            compat_pvr=self.effective_compat_pvr)))
        if not hotplugged:
            return self.reset_drc(drc)
        return self._queue(DrcType.CPU, HpAction.ADD, HpId.DRC_INDEX, index=index)

    def plug_phb(self, phb: int, device: str, hotplugged: bool = True,
                 node: Node | None = None) -> list[Effect]:
        index = drc_index(DrcType.PHB, phb)
        drc = self.attach(index, Device(device, (lambda i: node) if node is not None else None))
        if not hotplugged:
            return self.reset_drc(drc)
        return self._queue(DrcType.PHB, HpAction.ADD, HpId.DRC_INDEX, index=index)

    def plug_dimm(self, addr: int, size: int, device: str, node_id: int = 0,
                  hotplugged: bool = True) -> list[Effect]:
        if size <= 0 or size % LMB_SIZE or addr % LMB_SIZE:
            raise DrcError("DIMM size and address must be multiples of 256 MiB")
        n = size // LMB_SIZE
        first = drc_index(DrcType.LMB, addr // LMB_SIZE)
        indexes = [first + i for i in range(n)]
        for i in indexes:
            d = self.drcs.get(i)
            if d is None or d.kind is not DrcType.LMB or d.device is not None:
                raise DrcStateError(f"LMB {i:#010x} is missing or busy")
        effects: list[Effect] = []
        form = self.numa_form
        for i in indexes:
            drc = self.attach(i, Device(device, lambda idx: lmb_node(idx, node_id, form)))
            if not hotplugged:
                effects += self.reset_drc(drc)
        if hotplugged:
            if self.hp_event_source:
                effects += self._queue(DrcType.LMB, HpAction.ADD, HpId.DRC_COUNT_INDEXED,
                                       index=first, count=n)
            else:
                effects += self._queue(DrcType.LMB, HpAction.ADD, HpId.DRC_COUNT, count=n)
        return effects

    def plug_pci(self, phb: int, fn: PciFunction, device: str, chassis: int = 0,
                 hotplugged: bool = True) -> list[Effect]:
        index = drc_index(DrcType.PCI, (phb << 16) | (chassis << 8) | fn.devfn)
        drc = self.attach(index, Device(device, lambda i: pci_node(fn, i, phb=phb)))
        if not hotplugged:
            return self.reset_drc(drc)
        if fn.devfn & 7:
            return []  # functions other than 0 are announced with function 0
        effects: list[Effect] = []
        for f in range(8):
            other = self.drcs[index + f]
            if other.entity_sense() is EntitySense.PRESENT:
                effects += self._queue(DrcType.PCI, HpAction.ADD, HpId.DRC_INDEX, index=other.index)
        return effects

    def unplug(self, device: str) -> list[Effect]:
        """device_del: mark the device's DRCs and queue the remove request."""
        drcs = sorted(self.device_drcs(device), key=lambda d: d.index)
        if not drcs:
            raise DrcError(f"no device {device!r}")
        kind = drcs[0].kind
        if kind is DrcType.CPU and drcs[0].id == 0:
            raise DrcStateError("Boot CPU core may not be unplugged")
        effects: list[Effect] = []
        if kind is DrcType.LMB:
            if any(d.unplug_requested for d in drcs):
                raise DrcStateError(f"Memory unplug already in progress for device {device}")
            for d in drcs:
                effects += self.unplug_request_drc(d)
            return effects + self._queue(kind, HpAction.REMOVE, HpId.DRC_COUNT_INDEXED,
                                         index=drcs[0].index, count=len(drcs))
        drc = drcs[0]
        if kind is DrcType.PHB and drc.unplug_requested:
            raise DrcStateError(f"PCI Host Bridge unplug already in progress for device {device}")
        if kind is DrcType.PCI:
            if drc.unplug_requested:
                return []
            effects += self.unplug_request_drc(drc)
            if drc.id & 7 == 0:
                base = drc.index
                for f in range(7, -1, -1):
                    other = self.drcs[base + f]
                    if other.entity_sense() is EntitySense.PRESENT or other is drc:
                        effects += self._queue(kind, HpAction.REMOVE, HpId.DRC_INDEX, index=other.index)
            return effects
        if not drc.unplug_requested:
            effects += self.unplug_request_drc(drc)
        return effects + self._queue(kind, HpAction.REMOVE, HpId.DRC_INDEX, index=drc.index)

    # -- RTAS ------------------------------------------------------------------------------------
    def set_indicator(self, args: Sequence[int], nret: int = 1) -> RtasResult:
        """set-indicator(type, index, value)."""
        if len(args) != 3 or nret != 1:
            return RtasResult(_R.PARAM_ERROR)
        sensor, index, value = (a & 0xFFFFFFFF for a in args)
        drc = self.drcs.get(index)
        if sensor == Sensor.ISOLATION_STATE:
            if drc is None:
                return RtasResult(_R.NO_SUCH_INDICATOR)
            if value == Isolation.ISOLATED:
                rc, eff = self.apply(drc, Op.ISOLATE)
            elif value == Isolation.UNISOLATED:
                rc, eff = self.apply(drc, Op.UNISOLATE)
            else:
                return RtasResult(_R.PARAM_ERROR)
            return RtasResult(rc, (), tuple(eff))
        if sensor == Sensor.DR_INDICATOR:
            if drc is None or not drc.physical:
                return RtasResult(_R.NO_SUCH_INDICATOR)
            if value not in tuple(DrIndicator):
                return RtasResult(_R.PARAM_ERROR)
            drc.dr_indicator = DrIndicator(value)
            return RtasResult(_R.SUCCESS)
        if sensor == Sensor.ALLOCATION_STATE:
            if drc is None or drc.physical:
                return RtasResult(_R.NO_SUCH_INDICATOR)
            if value == Allocation.USABLE:
                rc, eff = self.apply(drc, Op.SET_USABLE)
            elif value == Allocation.UNUSABLE:
                rc, eff = self.apply(drc, Op.SET_UNUSABLE)
            else:
                return RtasResult(_R.PARAM_ERROR)
            return RtasResult(rc, (), tuple(eff))
        return RtasResult(_R.NOT_SUPPORTED)

    def get_sensor_state(self, args: Sequence[int], nret: int = 2) -> RtasResult:
        """get-sensor-state(type, index) -> value; the value cell is 0 on errors."""
        if len(args) != 2 or nret != 2:
            return RtasResult(_R.PARAM_ERROR, (0,))
        sensor, index = (a & 0xFFFFFFFF for a in args)
        if sensor != Sensor.ENTITY_SENSE:
            return RtasResult(_R.NOT_SUPPORTED, (0,))
        drc = self.drcs.get(index)
        if drc is None:
            return RtasResult(_R.PARAM_ERROR, (0,))
        return RtasResult(_R.SUCCESS, (drc.entity_sense(),))

    def set_power_level(self, args: Sequence[int], nret: int = 2) -> RtasResult:
        if len(args) != 2 or nret != 2:
            return RtasResult(_R.PARAM_ERROR)
        if args[0] & 0xFFFFFFFF != 0xFFFFFFFF:
            return RtasResult(_R.NOT_SUPPORTED)
        return RtasResult(_R.SUCCESS, (100,))

    def get_power_level(self, args: Sequence[int], nret: int = 2) -> RtasResult:
        if len(args) != 1 or nret != 2:
            return RtasResult(_R.PARAM_ERROR)
        if args[0] & 0xFFFFFFFF != 0xFFFFFFFF:
            return RtasResult(_R.NOT_SUPPORTED)
        return RtasResult(_R.SUCCESS, (100,))

    def configure_connector(self, args: Sequence[int], mem: GuestMemory, nret: int = 1) -> RtasResult:
        """One step of ibm,configure-connector(work area low, high)."""
        if len(args) != 2 or nret != 1:
            return RtasResult(_R.PARAM_ERROR)
        wa = ((args[1] & 0xFFFFFFFF) << 32) | (args[0] & 0xFFFFFFFF)
        index = _ld(mem, wa, 0)
        drc = self.drcs.get(index)
        if drc is None:
            return RtasResult(_R.PARAM_ERROR)
        if drc.state not in (_S.LOGICAL_UNISOLATE, _S.PHYSICAL_UNISOLATE,
                             _S.LOGICAL_CONFIGURED, _S.PHYSICAL_CONFIGURED):
            return RtasResult(CcResponse.NOT_CONFIGURABLE)
        effects: list[Effect] = []
        if drc.kind is DrcType.LMB and drc.unplug_requested and drc.device is not None:
            effects += self._reject_unplug(drc)
        if drc.fdt is None:
            node = drc.device.populate(index) if drc.device and drc.device.populate else None
            if node is None:
                return RtasResult(CcResponse.ERROR, (), tuple(effects))
            drc.fdt = [*tokens(node), (Tag.END, "", b"")]
            drc.rewind()
        while True:
            tag, name, value = drc.fdt[drc.ccs_offset]
            nxt = drc.ccs_offset + 1
            if tag is Tag.BEGIN_NODE:
                drc.ccs_depth += 1
                _st(mem, wa, 2, CC_VAL_DATA_OFFSET)
                self._cc_write(mem, wa, CC_VAL_DATA_OFFSET, name.encode() + b"\0")
                resp = CcResponse.NEXT_CHILD
            elif tag is Tag.END_NODE:
                drc.ccs_depth -= 1
                if drc.ccs_depth == 0:
                    drc.state = drc.ready_state
                    drc.rewind()
                    nxt = 0
                    resp = CcResponse.SUCCESS
                else:
                    resp = CcResponse.PREV_PARENT
            elif tag is Tag.PROP:
                raw = name.encode() + b"\0"
                _st(mem, wa, 2, CC_VAL_DATA_OFFSET)
                self._cc_write(mem, wa, CC_VAL_DATA_OFFSET, raw)
                _st(mem, wa, 3, len(value))
                _st(mem, wa, 4, CC_VAL_DATA_OFFSET + len(raw))
                self._cc_write(mem, wa, CC_VAL_DATA_OFFSET + len(raw), value)
                resp = CcResponse.NEXT_PROPERTY
            elif tag is Tag.END:
                resp = CcResponse.ERROR
            else:
                drc.ccs_offset = nxt
                continue
            if tag is not Tag.END:
                drc.ccs_offset = nxt
            return RtasResult(resp, (), tuple(effects))

    @staticmethod
    def _cc_write(mem: GuestMemory, wa: int, offset: int, data: bytes) -> None:
        room = max(0, CC_WA_LEN - offset)
        if room:
            mem.write(wa + offset, data[:room])

    def check_exception(self, args: Sequence[int], mem: GuestMemory, nret: int = 1) -> RtasResult:
        """check-exception(vector, xinfo, mask, critical, buf, len[, xinfo hi]).

        Like QEMU, the whole log is written whatever ``len`` says."""
        if not 6 <= len(args) <= 7 or nret != 1:
            return RtasResult(_R.PARAM_ERROR)
        mask, buf = args[2] & 0xFFFFFFFF, args[4] & 0xFFFFFFFF
        for i, pending in enumerate(self.events):
            if pending.source.mask & mask:
                del self.events[i]
                mem.write(buf, pending.event.log(self.plid_order))
                pulses = [IrqPulse(c) for c in EventClass
                          if any(p.source is c for p in self.events)]
                return RtasResult(_R.SUCCESS, (), tuple(pulses))
        return RtasResult(_R.NO_ERRORS_FOUND)


def walk_configure_connector(drcs: DrcSet, index: int, mem: GuestMemory | None = None,
                             wa: int = 0x1000, limit: int = 100_000) -> tuple[int, Node | None]:
    """What a guest does: call configure-connector until it answers 0 (or an
    error), rebuilding the node from the work area.  Returns (last response,
    node)."""
    mem = mem or FlatMemory(wa + CC_WA_LEN)
    _st(mem, wa, 0, index)
    stack: list[Node] = []
    root: Node | None = None
    for _ in range(limit):
        rc = drcs.configure_connector([wa & 0xFFFFFFFF, wa >> 32], mem).status
        if rc == CcResponse.NEXT_CHILD:
            off = _ld(mem, wa, 2)
            raw = mem.read(wa + off, CC_WA_LEN - off)
            node = Node(raw[:raw.index(b"\0")].decode())
            if stack:
                stack[-1].children.append(node)
            else:
                root = node
            stack.append(node)
        elif rc in (CcResponse.NEXT_PROPERTY, CcResponse.PREV_PARENT) and not stack:
            raise DrcStateError(f"DRC {index:#010x}: the configure-connector walk was already "
                                "under way; finish it step by step (it restarts after 0)")
        elif rc == CcResponse.NEXT_PROPERTY:
            off, length, data_off = _ld(mem, wa, 2), _ld(mem, wa, 3), _ld(mem, wa, 4)
            raw = mem.read(wa + off, data_off - off)
            stack[-1].props[raw[:raw.index(b"\0")].decode()] = mem.read(wa + data_off, length)
        elif rc == CcResponse.PREV_PARENT:
            stack.pop()
        else:
            return rc, root
    raise DrcStateError("configure-connector did not finish")


def rtas_call(drcs: DrcSet, name: str, args: Iterable[int], mem: GuestMemory | None = None) -> RtasResult:
    """Dispatch by RTAS service name (the names QEMU registers)."""
    a = list(args)
    if name == "set-indicator":
        return drcs.set_indicator(a)
    if name == "get-sensor-state":
        return drcs.get_sensor_state(a)
    if name == "set-power-level":
        return drcs.set_power_level(a)
    if name == "get-power-level":
        return drcs.get_power_level(a)
    if name in ("ibm,configure-connector", "check-exception"):
        if mem is None:
            raise DrcError(f"{name} needs guest memory")
        fn = drcs.configure_connector if name == "ibm,configure-connector" else drcs.check_exception
        return fn(a, mem)
    raise DrcError(f"unknown RTAS call {name!r}")


__all__ = [
    "TRANSITIONS",
    "Action",
    "Allocation",
    "CcResponse",
    "Cond",
    "Device",
    "DeviceRemoved",
    "DrIndicator",
    "Drc",
    "DrcSet",
    "DrcState",
    "DrcStateError",
    "Effect",
    "EntitySense",
    "FlatMemory",
    "GuestMemory",
    "IrqPulse",
    "Isolation",
    "Mmu",
    "Op",
    "Released",
    "RtasResult",
    "RtasStatus",
    "Rule",
    "Sensor",
    "UnplugRejected",
    "rtas_call",
    "walk_configure_connector",
]
