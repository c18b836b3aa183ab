"""DIMM slots, after seeds 001 and 003: declared slots with an id, a size, a
NUMA node and populated=on|off; addresses laid out from the top of memory,
skipping the PCI hole below 4 GiB; hot-add and hot-remove carried out over
QMP; and the ACPI memory-hotplug block (qbackend.models.memhp) kept true to what
QEMU really has.

The hot-remove sequence of spec 000 is tracked as states: requested
(device_del sent), ejecting (the guest reported OST 0x84), then removed
(DEVICE_DELETED), or failed (OST 0x82, busy: no DEVICE_DELETED will come).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import trio

from qbackend.errors import ConfigError, QbackendError
from qbackend.machine.hold import ChangeHold
from qbackend.machine.qmp import QmpConnection, QmpError
from qbackend.machine.qmp_replies import DimmInfo, Event, OspmStatus, memory_size_summary
from qbackend.models.memhp import OST_BUSY, OST_EJECT_IN_PROGRESS, OST_EVENT_EJECT, MemoryHotplugBlock
from qbackend.options import DimmOptions
from qbackend.plumbing.handover import HandoverError, State
from qbackend.plumbing.threads import run_locked

log = logging.getLogger(__name__)

GiB = 1 << 30
FOUR_GIB = 4 * GiB
BLOCK_ALIGN = 128 << 20  # the guest's memory block size: keep DIMMs on block boundaries
# Where the PCI hole starts below 4 GiB when RAM would reach it (QEMU's
# pc_init / pc_q35_init defaults): RAM below it, the rest above 4 GiB.
PCI_HOLE_START = {"pc": 0xE0000000, "q35": 0x80000000}


def device_memory_base(machine: str, ram_size: int) -> int:
    """The first address for DIMMs: the top of memory, past the PCI hole.

    QEMU places its device-memory region at 4 GiB plus the RAM above
    4 GiB, aligned up to 1 GiB; DIMM addresses must fall inside it.
    """
    hole = PCI_HOLE_START.get(machine, PCI_HOLE_START["pc"])
    below = ram_size if ram_size <= hole else hole
    above = ram_size - below
    return -(-(FOUR_GIB + above) // GiB) * GiB


def layout(dimms: list[DimmOptions], machine: str, ram_size: int) -> list[int]:
    """Each declared slot's address, in declaration order, back to back."""
    addr = device_memory_base(machine, ram_size)
    out = []
    for d in dimms:
        out.append(addr)
        addr = -(-(addr + d.size) // BLOCK_ALIGN) * BLOCK_ALIGN
    return out


class RemovalState(Enum):
    REQUESTED = "remove requested"
    EJECTING = "eject in progress (OST 0x84)"
    REMOVED = "removed"
    FAILED = "failed: the guest reported busy (OST 0x82)"
    TIMED_OUT = "no answer from the guest"


@dataclass
class Dimm:
    opts: DimmOptions
    slot: int
    address: int
    plugged: bool = False
    removal: RemovalState | None = None
    hotplugged: bool = False
    changed: trio.Event = field(default_factory=trio.Event)
    reported: RemovalState | None = None  # the last outcome told to on_outcome
    ost_status: int | None = None  # the guest's last OST status for an eject of this DIMM

    @property
    def id(self) -> str:
        return self.opts.id

    @property
    def memdev(self) -> str:
        return f"mem-{self.opts.id}"

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "slot": self.slot, "address": self.address, "size": self.opts.size,
                "node": self.opts.node, "plugged": self.plugged,
                "removal": self.removal.value if self.removal else None}

    @property
    def state(self) -> str:
        """One word for query-memory-hotplug."""
        if self.removal in (RemovalState.REQUESTED, RemovalState.EJECTING) and self.plugged:
            return "removing"
        if self.removal is RemovalState.FAILED and self.plugged:
            return "remove-failed"
        return "plugged" if self.plugged else "empty"


class DimmError(QbackendError):
    """A DIMM request that cannot be done (unknown slot, already plugged, QEMU refused)."""


class DimmManager:
    """The slots of one machine.  Methods that talk to QEMU are async (trio)."""

    def __init__(self, dimms: list[DimmOptions], *, machine: str, ram_size: int, slots: int,
                 block: MemoryHotplugBlock, lock: Any, on_change: Callable[[], None] = lambda: None,
                 on_outcome: Callable[[Dimm], None] = lambda d: None, hold: ChangeHold | None = None) -> None:
        if len(dimms) > slots:
            raise ConfigError(f"{len(dimms)} DIMMs declared but the machine has {slots} slots (--hotplug slots=N)")
        ids = [d.id for d in dimms]
        if len(set(ids)) != len(ids):
            raise ConfigError(f"DIMM ids must be unique: {ids}")
        self.machine = machine
        self.ram_size = ram_size
        self.block = block
        self.lock = lock  # the controller's device lock: the block is shared with the guest's accesses
        self.on_change = on_change
        self.on_outcome = on_outcome  # a removal ended: REMOVED or FAILED (whoever asked for it)
        self.hold = hold or ChangeHold()  # held off while an upgrade pauses (qbackend.machine.hold)
        self.dimms = {d.id: Dimm(d, slot, addr)
                      for slot, (d, addr) in enumerate(zip(dimms, layout(dimms, machine, ram_size)))}
        # DIMMs QEMU has that are none of the declared ones (plugged by anyone
        # on QEMU's own monitor), by QEMU's slot number: kept by `reconcile`.
        self.others: dict[int, DimmInfo] = {}
        self.qmp: QmpConnection | None = None
        self.ost: list[OspmStatus] = []  # ACPI_DEVICE_OST events seen, newest last

    # -- QEMU's command line for populated slots ---------------------------------------

    def cold_plug_args(self) -> list[str]:
        args = []
        for d in self.dimms.values():
            if d.opts.populated:
                args += ["-object", f"memory-backend-memfd,id={d.memdev},size={d.opts.size},share=on",
                         "-device", f"pc-dimm,id={d.id},memdev={d.memdev},addr={d.address},"
                                    f"node={d.opts.node},slot={d.slot}"]
        return args

    # -- QMP ------------------------------------------------------------------------------

    def _qmp(self) -> QmpConnection:
        if self.qmp is None:
            raise DimmError("not connected to QEMU's QMP monitor")
        return self.qmp

    async def attach(self, qmp: QmpConnection, *, plug_populated: bool = False) -> None:
        """Start working against a QEMU; with plug_populated, hot-add the
        populated slots it lacks (for a QEMU started without them)."""
        self.qmp = qmp
        await self.reconcile()
        await self._settle_removals()
        if plug_populated:
            for d in self.dimms.values():
                if d.opts.populated and not d.plugged:
                    await self.add(d.id)

    async def _settle_removals(self) -> None:
        """Removals under way whose outcome came while nobody listened (the QMP events of
        the moments an upgrade's new process was not connected yet): a DIMM QEMU does
        not have any more was removed; one whose eject the guest had begun and now
        reports busy (OST 0x82) failed."""
        statuses = {s.device: s for s in OspmStatus.from_reply(await self._qmp().execute("query-acpi-ospm-status"))
                    if s.slot_type == "DIMM" and s.source == OST_EVENT_EJECT}
        for d in self.dimms.values():
            if d.removal not in (RemovalState.REQUESTED, RemovalState.EJECTING):
                continue
            if not d.plugged:
                d.removal = RemovalState.REMOVED
                try:
                    await self._qmp().execute("object-del", {"id": d.memdev})
                except QmpError as exc:
                    log.warning("DIMM %s removed but its memory backend stays: %s", d.id, exc)
            elif d.removal is RemovalState.EJECTING and d.id in statuses and statuses[d.id].status == OST_BUSY:
                d.removal, d.ost_status = RemovalState.FAILED, OST_BUSY
                await run_locked(self.lock, setattr, self.block.slots[d.slot], "removing", False)
            else:
                continue
            self._changed(d)

    async def add(self, dimm_id: str) -> Dimm:
        async with self.hold.change(refuse=True):
            return await self._add(dimm_id)

    async def _add(self, dimm_id: str) -> Dimm:
        d = self._get(dimm_id)
        if d.plugged:
            raise DimmError(f"DIMM {dimm_id} is already plugged (slot {d.slot} at {d.address:#x})")
        qmp = self._qmp()
        await qmp.execute("object-add", {"qom-type": "memory-backend-memfd", "id": d.memdev,
                                         "size": d.opts.size, "share": True})
        try:
            await qmp.execute("device_add", {"driver": "pc-dimm", "id": d.id, "memdev": d.memdev,
                                             "addr": d.address, "node": d.opts.node, "slot": d.slot})
        except QmpError:
            await qmp.execute("object-del", {"id": d.memdev})
            raise
        def plugged() -> None:
            d.plugged, d.hotplugged, d.removal, d.reported = True, True, None, None
            self.block.plug(d.slot, d.address, d.opts.size, d.opts.node, d.id, hotplugged=True)

        await run_locked(self.lock, plugged)
        self._changed(d)
        return d

    async def remove(self, dimm_id: str, timeout: float = 30.0) -> RemovalState:
        """device_del, then follow the guest's answer to the end."""
        d = await self.request_removal(dimm_id)
        return await self.wait_removal(d, timeout)

    async def request_removal(self, dimm_id: str) -> Dimm:
        """device_del; the outcome comes later (`wait_removal`, `on_outcome`)."""
        async with self.hold.change(refuse=True):
            return await self._request_removal(dimm_id)

    async def _request_removal(self, dimm_id: str) -> Dimm:
        d = self._get(dimm_id)
        if not d.plugged:
            raise DimmError(f"DIMM {dimm_id} is not plugged")
        await self._qmp().execute("device_del", {"id": d.id})

        def requested() -> None:
            d.removal, d.reported, d.ost_status = RemovalState.REQUESTED, None, None
            self.block.request_unplug(d.slot)

        await run_locked(self.lock, requested)
        self._changed(d)
        return d

    async def wait_removal(self, d: Dimm, timeout: float = 30.0) -> RemovalState:
        with trio.move_on_after(timeout):
            while d.removal in (RemovalState.REQUESTED, RemovalState.EJECTING):
                await d.changed.wait()
        if d.removal in (RemovalState.REQUESTED, RemovalState.EJECTING):
            d.removal = RemovalState.TIMED_OUT
        assert d.removal is not None
        return d.removal

    def _get(self, dimm_id: str) -> Dimm:
        try:
            return self.dimms[dimm_id]
        except KeyError:
            raise DimmError(f"no DIMM slot {dimm_id!r}; declared: {', '.join(self.dimms) or 'none'}") from None

    def _changed(self, d: Dimm | None) -> None:
        if d is not None:
            d.changed.set()
            d.changed = trio.Event()
            if d.removal in (RemovalState.REMOVED, RemovalState.FAILED) and d.reported is not d.removal:
                d.reported = d.removal
                self.on_outcome(d)
        self.on_change()

    async def handle_event(self, event: Event) -> None:
        """A QMP event; DIMM events update the slots."""
        if event.name == "ACPI_DEVICE_OST":
            info = OspmStatus.parse(event.data.nested("info"))
            if info.slot_type != "DIMM":
                return
            self.ost.append(info)
            d = self.dimms.get(info.device)
            if d is not None and info.source == OST_EVENT_EJECT:
                d.ost_status = info.status
                if info.status == OST_EJECT_IN_PROGRESS:
                    d.removal = RemovalState.EJECTING
                elif info.status == OST_BUSY:
                    d.removal = RemovalState.FAILED
                    await run_locked(self.lock, setattr, self.block.slots[d.slot], "removing", False)
                self._changed(d)
            await self.reconcile()
        elif event.name == "DEVICE_DELETED":
            d = self.dimms.get(event.data.string("device", ""))
            if d is not None:
                def removed(d: Dimm = d) -> None:
                    d.plugged, d.removal = False, RemovalState.REMOVED
                    self.block.unplugged(d.slot)

                await run_locked(self.lock, removed)
                try:
                    await self._qmp().execute("object-del", {"id": d.memdev})
                except QmpError as exc:
                    log.warning("DIMM %s removed but its memory backend stays: %s", d.id, exc)
                self._changed(d)
            else:
                await self.reconcile()

    async def reconcile(self) -> None:
        """Make the slots and the block say what QEMU says (query-memory-devices),
        whoever plugged what."""
        seen = {dimm.slot: dimm for dimm in DimmInfo.from_memory_devices(
            await self._qmp().execute("query-memory-devices"))}
        changed = await run_locked(self.lock, self._reconcile_slots, seen)
        # OSPM's last word per DIMM (query-acpi-ospm-status) tells about
        # removals someone else asked for (a device_del typed elsewhere).
        # Removals of ours follow the events instead: the status of an
        # earlier attempt would be stale for them.
        for status in OspmStatus.from_reply(await self._qmp().execute("query-acpi-ospm-status")):
            found = self.dimms.get(status.device)
            if found is None:
                continue
            d = found
            if (d.removal is not None or not d.plugged or status.slot_type != "DIMM"
                    or status.source != OST_EVENT_EJECT):
                continue
            if status.status == OST_BUSY:
                d.removal, d.ost_status = RemovalState.FAILED, status.status
            elif status.status == OST_EJECT_IN_PROGRESS:
                d.removal = RemovalState.EJECTING
            else:
                continue
            changed = True
            self._changed(d)
        if changed:
            self._changed(None)

    def _reconcile_slots(self, seen: dict[int, DimmInfo]) -> bool:
        """Under the controller's lock: the block and the slots as QEMU has them; True if anything changed."""
        changed = False
        for slot_no, slot in enumerate(self.block.slots):
            data = seen.get(slot_no)
            if data is None:
                if slot.enabled:
                    self.block.unplugged(slot_no)
                    changed = True
                continue
            if (slot.address, slot.size, slot.node, slot.device_id, slot.enabled) != (
                    data.addr, data.size, data.node, data.id, True):
                self.block.plug(slot_no, data.addr, data.size, data.node, data.id,
                                hotplugged=data.hotplugged and not slot.enabled)
                changed = True
        for d in self.dimms.values():
            data = seen.get(d.slot)
            plugged = data is not None and data.id == d.id
            if plugged != d.plugged:
                d.plugged = plugged
                changed = True
        declared_at = {d.slot: d.id for d in self.dimms.values()}
        others = {slot: data for slot, data in seen.items() if declared_at.get(slot) != data.id}
        if others != self.others:
            self.others = others
            changed = True
        return changed

    async def memory_total(self) -> dict[str, int]:
        """Base plus plugged, as query-memory-total reports it, beside QEMU's summary."""
        plugged = sum(s.size for s in self.block.slots if s.enabled)
        total: dict[str, int] = {"base": self.ram_size, "plugged": plugged, "total": self.ram_size + plugged}
        if self.qmp is not None:  # QEMU's own figures beside ours, when there is a QEMU
            total["qemu-base"], total["qemu-plugged"] = memory_size_summary(
                await self.qmp.execute("query-memory-size-summary"))
        return total

    # -- hand-over to a new process (qbackend.app.upgrade) -------------------------------

    def save(self) -> State:
        """What the slots know beyond the options they were made from: which DIMM is
        plugged (by `dimm add`, at start, or found in QEMU), where each removal stands,
        the DIMMs QEMU has that are none of the declared ones, the OST events seen.
        The register block itself travels with the controller's state."""
        return {
            "dimms": {d.id: {"plugged": d.plugged, "hotplugged": d.hotplugged,
                             "removal": d.removal.name if d.removal else None,
                             "reported": d.reported.name if d.reported else None, "ost_status": d.ost_status}
                      for d in self.dimms.values()},
            "others": [[slot, info.slot, info.addr, info.size, info.node, info.id, info.hotplugged]
                       for slot, info in sorted(self.others.items())],
            "ost": [[o.device, o.slot_type, o.source, o.status] for o in self.ost],
        }

    def restore(self, state: State) -> None:
        """What save() gave, into slots made from the same options (before attach)."""
        saved = state["dimms"]
        if set(saved) != set(self.dimms):
            raise HandoverError(f"DIMM slots {sorted(saved)} handed over to slots {sorted(self.dimms)}")
        for dimm_id, s in saved.items():
            d = self.dimms[dimm_id]
            d.plugged, d.hotplugged = bool(s["plugged"]), bool(s["hotplugged"])
            d.removal = None if s["removal"] is None else RemovalState[s["removal"]]
            d.reported = None if s["reported"] is None else RemovalState[s["reported"]]
            d.ost_status = None if s["ost_status"] is None else int(s["ost_status"])
        self.others = {int(key): DimmInfo(int(slot), int(addr), int(size), int(node),
                                          None if dimm_id is None else str(dimm_id), bool(hotplugged))
                       for key, slot, addr, size, node, dimm_id, hotplugged in state["others"]}
        self.ost = [OspmStatus(str(device), str(kind), int(source), int(status))
                    for device, kind, source, status in state["ost"]]

    def as_json(self) -> list[dict[str, Any]]:
        out = [d.as_json() for d in self.dimms.values()]
        out += [{"id": v.id, "slot": v.slot, "address": v.addr, "size": v.size, "node": v.node,
                 "plugged": True, "removal": None, "declared": False} for _, v in sorted(self.others.items())]
        return out

    def hotplug_status(self) -> list[dict[str, Any]]:
        """query-memory-hotplug: every declared slot and its state, then each
        DIMM QEMU has that is none of them (plugged on QEMU's own monitor,
        by anyone), ``declared: false``, its id None if it was given none.
        What QEMU plugs and unplugs shows within a reconcile interval."""
        rows: list[dict[str, Any]] = [
            {"id": d.id, "slot": d.slot, "address": d.address, "size": d.opts.size, "node": d.opts.node,
             "state": d.state, "declared": True} for d in self.dimms.values()]
        rows += [{"id": v.id, "slot": v.slot, "address": v.addr, "size": v.size, "node": v.node,
                  "state": "plugged", "declared": False} for _, v in sorted(self.others.items())]
        return rows
