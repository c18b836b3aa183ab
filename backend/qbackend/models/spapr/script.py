"""A line-oriented driver for the DRC model, for scripts and tests:

    plug-cpu CORE [ID]                 plug-dimm ADDR SIZE [ID] [NODE]
    plug-pci PHB DEVFN VENDOR DEVICE CLASS [ID]          plug-phb INDEX [ID]
    unplug ID                          reset
    set-indicator SENSOR INDEX VALUE   get-sensor-state SENSOR INDEX
    set-power-level DOMAIN LEVEL       get-power-level DOMAIN
    configure-connector INDEX          cc-step INDEX
    check-exception [MASK]             state INDEX
    events                             # a comment

Numbers take 0x prefixes; sizes take K/M/G; SENSOR is 9001..9003 or
isolation / dr-indicator / allocation / entity-sense.  `Script.run_line`
returns one JSON-able dict per command ("ok": false with "error" on a
refused host request); RTAS results carry "status" and "rets" exactly as the
guest would see them, plus the effects the backend must carry out.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict
from typing import Any

from qbackend.errors import QbackendError
from qbackend.models.spapr.drc import MachineConfig, PciFunction
from qbackend.models.spapr.events import EventClass, HotplugEvent
from qbackend.models.spapr.fdt import to_dts
from qbackend.models.spapr.state import (
    CC_WA_LEN,
    CcResponse,
    DeviceRemoved,
    DrcSet,
    Effect,
    FlatMemory,
    IrqPulse,
    Released,
    RtasResult,
    Sensor,
    UnplugRejected,
    walk_configure_connector,
)
from qbackend.sizes import parse_size

SENSORS = {"isolation": Sensor.ISOLATION_STATE, "dr-indicator": Sensor.DR_INDICATOR,
           "allocation": Sensor.ALLOCATION_STATE, "entity-sense": Sensor.ENTITY_SENSE}
WA = 0x1000
BUF = 0x3000


def _num(text: str) -> int:
    return int(text, 0)


def _cell(text: str) -> int:
    """A number the guest passes in one 32-bit RTAS cell."""
    n = _num(text)
    if not 0 <= n <= 0xFFFFFFFF:
        raise ValueError(f"{text} does not fit in a 32-bit cell")
    return n


def _sensor(text: str) -> int:
    return int(SENSORS[text]) if text in SENSORS else _num(text)


def effect_json(e: Effect) -> dict[str, Any]:
    if isinstance(e, IrqPulse):
        return {"effect": "irq-pulse", "source": e.source.name.lower().replace("_", "-")}
    name = {Released: "released", DeviceRemoved: "device-removed",
            UnplugRejected: "unplug-rejected"}[type(e)]
    out: dict[str, Any] = {"effect": name, **asdict(e)}
    if "index" in out:
        out["index"] = f"{out['index']:#010x}"
    return out


def result_json(r: RtasResult) -> dict[str, Any]:
    return {"status": int(r.status), "rets": list(r.rets),
            "effects": [effect_json(e) for e in r.effects]}


class Script:
    def __init__(self, config: MachineConfig, hp_event_source: bool = True) -> None:
        self.drcs = DrcSet.for_machine(config, hp_event_source=hp_event_source)
        self.mem = FlatMemory(0x10000)

    def run_line(self, line: str) -> dict[str, Any] | None:
        try:
            words = shlex.split(line, comments=True)
        except ValueError as e:  # an unclosed quote: a refused line, as an unknown command is
            return {"cmd": line.strip(), "ok": False, "error": f"{type(e).__name__}: {e}"}
        if not words:
            return None
        cmd, args = words[0], words[1:]
        try:
            out = self._dispatch(cmd, args)
        except (QbackendError, ValueError, KeyError, IndexError) as e:
            out = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        return {"cmd": line.strip(), **out}

    def _effects(self, effects: list[Effect]) -> dict[str, Any]:
        return {"ok": True, "effects": [effect_json(e) for e in effects]}

    def _dispatch(self, cmd: str, a: list[str]) -> dict[str, Any]:
        d = self.drcs
        if cmd == "plug-cpu":
            core = _num(a[0])
            return self._effects(d.plug_cpu(core, a[1] if len(a) > 1 else f"core{core}"))
        if cmd == "plug-dimm":
            addr, size = _num(a[0]), parse_size(a[1], "size", default_unit="M")
            return self._effects(d.plug_dimm(addr, size, a[2] if len(a) > 2 else f"dimm@{addr:#x}",
                                             node_id=_num(a[3]) if len(a) > 3 else 0))
        if cmd == "plug-pci":
            phb, devfn = _num(a[0]), _num(a[1])
            fn = PciFunction(devfn=devfn, vendor_id=_num(a[2]), device_id=_num(a[3]),
                             class_code=_num(a[4]))
            return self._effects(d.plug_pci(phb, fn, a[5] if len(a) > 5 else f"pci{phb}:{devfn:#x}"))
        if cmd == "plug-phb":
            n = _num(a[0])
            return self._effects(d.plug_phb(n, a[1] if len(a) > 1 else f"phb{n}"))
        if cmd == "unplug":
            return self._effects(d.unplug(a[0]))
        if cmd == "reset":
            return self._effects(d.reset())
        if cmd == "set-indicator":
            return {"ok": True, **result_json(d.set_indicator([_sensor(a[0]), _num(a[1]), _num(a[2])]))}
        if cmd == "get-sensor-state":
            return {"ok": True, **result_json(d.get_sensor_state([_sensor(a[0]), _num(a[1])]))}
        if cmd == "set-power-level":
            return {"ok": True, **result_json(d.set_power_level([_num(a[0]), _num(a[1])]))}
        if cmd == "get-power-level":
            return {"ok": True, **result_json(d.get_power_level([_num(a[0])]))}
        if cmd == "cc-step":
            self.mem.write(WA, _cell(a[0]).to_bytes(4, "big"))
            r = d.configure_connector([WA, 0], self.mem)
            out = {"ok": True, **result_json(r)}
            try:
                out["response"] = CcResponse(r.status).name.lower().replace("_", "-")
            except ValueError:
                pass
            if r.status in (CcResponse.NEXT_CHILD, CcResponse.NEXT_PROPERTY):
                wa = self.mem.read(WA, CC_WA_LEN)
                off = int.from_bytes(wa[8:12], "big")
                out["name"] = wa[off:wa.index(b"\0", off)].decode()
                if r.status == CcResponse.NEXT_PROPERTY:
                    n, data = int.from_bytes(wa[12:16], "big"), int.from_bytes(wa[16:20], "big")
                    out["value"] = wa[data:data + n].hex()
            return out
        if cmd == "configure-connector":
            rc, node = walk_configure_connector(d, _num(a[0]), self.mem, WA)
            return {"ok": True, "status": int(rc), "dts": to_dts(node, header=False) if node else None}
        if cmd == "check-exception":
            mask = _num(a[0]) if a else EventClass.HOT_PLUG.mask | EventClass.EPOW.mask
            r = d.check_exception([0, 0, mask, 0, BUF, 2048], self.mem)
            out = {"ok": True, **result_json(r)}
            if r.status == 0:
                raw = self.mem.read(BUF, 116)
                ev = HotplugEvent.parse(raw, d.plid_order)
                out["event"] = {"type": ev.hp_type.name.lower(), "action": ev.action.name.lower(),
                                "id": ev.id_type.name.lower().replace("_", "-"), "index": f"{ev.index:#010x}",
                                "count": ev.count, "plid": ev.plid}
                out["log"] = raw.hex()
            return out
        if cmd == "state":
            drc = d.drc(_num(a[0]))
            return {"ok": True, "index": f"{drc.index:#010x}", "type": drc.kind.name,
                    "state": drc.state.name, "device": drc.device.id if drc.device else None,
                    "unplug_requested": drc.unplug_requested,
                    "entity_sense": drc.entity_sense().name,
                    **({"dr_indicator": drc.dr_indicator.name} if drc.physical else {})}
        if cmd == "events":
            return {"ok": True, "pending": [
                {"source": p.source.name.lower().replace("_", "-"), "type": p.event.hp_type.name.lower(),
                 "action": p.event.action.name.lower(), "index": f"{p.event.index:#010x}",
                 "count": p.event.count} for p in d.events]}
        raise ValueError(f"unknown command {cmd!r}")
