"""A line-oriented driver for the DRC model, for scripts and tests:

    plug-cpu CORE [ID]                 plug-dimm ADDR SIZE [ID] [NODE]
    plug-pci PHB DEVFN VENDOR DEVICE CLASS [ID] [KEY=VALUE ...]
    plug-phb INDEX [ID]                unplug ID
    reset                              cas [mmu=radix|hash] [compat=PVR|none] [hp-events=on|off] [htab-shift=N]
    clock YYYY-MM-DDTHH:MM:SS          set-indicator SENSOR INDEX VALUE
    get-sensor-state SENSOR INDEX      set-power-level DOMAIN LEVEL
    get-power-level DOMAIN             configure-connector INDEX
    cc-step INDEX                      check-exception [MASK]
    state INDEX                        events
    # a comment

Numbers take 0x prefixes; sizes take K/M/G; SENSOR is 9001..9003 or
isolation / dr-indicator / allocation / entity-sense.  plug-pci's keys
describe the function as its config space does: barN=io|mem32|mem64:SIZE[@ADDR]
(N 0..5; ADDR once the guest mapped it), rom=SIZE[@ADDR], irq-pin=N (0: none;
default 1), subsystem-vendor=N, subsystem=N, revision=N, type=DRIVER (QEMU's
device type, for ibm,loc-code), bus=N, msi=N, msix=N (vectors), express=1,
status=N, cache-line=N, min-grant=N, max-latency=N.  `reset` is a machine
reset (system_reset): pending unplugs complete, queued events are dropped and
the CAS state is forgotten until `cas` (what the rebooted guest negotiates;
compat=none is no compatibility mode).  `clock` sets the guest's clock, which
an event log's date and time show (the time the event was queued).

`Script.run_line`
returns one JSON-able dict per command ("ok": false with "error" on a
refused host request); RTAS results carry "status" and "rets" exactly as the
guest would see them, plus the effects the backend must carry out.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict
from datetime import datetime
from typing import Any

from qbackend.errors import QbackendError
from qbackend.models.spapr.drc import Bar, BarType, MachineConfig, PciFunction
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
    Mmu,
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


_PCI_KEYS = {"irq-pin": "irq_pin", "subsystem-vendor": "subsystem_vendor_id", "subsystem": "subsystem_id",
             "revision": "revision", "bus": "bus", "msi": "msi_vectors", "msix": "msix_vectors",
             "status": "status", "cache-line": "cache_line_size", "min-grant": "min_grant",
             "max-latency": "max_latency"}
_BAR_TYPES = {"io": BarType.IO, "mem32": BarType.MEM32, "mem64": BarType.MEM64}


def _bar(index: int, text: str) -> Bar:
    """``[TYPE:]SIZE[@ADDR]``; the ROM is mem32 whatever is written."""
    kind, _, rest = text.rpartition(":")
    size, _, addr = rest.partition("@")
    if index == 6:
        kind = kind or "mem32"
    if kind not in _BAR_TYPES:
        raise ValueError(f"BAR {index}: type io, mem32 or mem64 expected, not {kind!r}")
    nbytes = _num(size) if size.lower().startswith("0x") else parse_size(size, f"BAR {index} size",
                                                                          default_unit="B")
    return Bar(index, _BAR_TYPES[kind], nbytes,
               _num(addr) if addr else None)


def pci_function(phb_devfn: int, vendor: int, device: int, class_code: int, keys: dict[str, str]) -> PciFunction:
    """A PciFunction from plug-pci's KEY=VALUE words."""
    kw: dict[str, Any] = {}
    bars = []
    for key, value in keys.items():
        if key in _PCI_KEYS:
            kw[_PCI_KEYS[key]] = _num(value)
        elif key.startswith("bar") and key[3:].isdigit() and int(key[3:]) < 6:
            bars.append(_bar(int(key[3:]), value))
        elif key == "rom":
            bars.append(_bar(6, value))
        elif key == "type":
            kw["type_name"] = value
        elif key == "express":
            kw["express"] = value not in ("0", "off", "no")
        elif key == "name":
            kw["name"] = value
        else:
            raise ValueError(f"plug-pci: unknown key {key!r}")
    return PciFunction(devfn=phb_devfn, vendor_id=vendor, device_id=device, class_code=class_code,
                       bars=tuple(bars), **kw)


def _switch(text: str) -> bool:
    if text in ("on", "1", "yes"):
        return True
    if text in ("off", "0", "no"):
        return False
    raise ValueError(f"on or off expected, not {text!r}")


class Script:
    def __init__(self, config: MachineConfig, hp_event_source: bool = True, mmu: str = "radix",
                 compat_pvr: int | None = None, htab_shift: int | None = None,
                 clock: datetime | None = None) -> None:
        self.now = clock or datetime(2000, 1, 1)
        self.drcs = DrcSet.for_machine(config, hp_event_source=hp_event_source, mmu=Mmu(mmu),
                                       compat_pvr=compat_pvr, htab_shift=htab_shift,
                                       clock=lambda: self.now)
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
            rest = a[5:]
            ident = rest.pop(0) if rest and "=" not in rest[0] else f"pci{phb}:{devfn:#x}"
            keys = dict(w.split("=", 1) for w in rest)
            fn = pci_function(devfn, _num(a[2]), _num(a[3]), _num(a[4]), keys)
            return self._effects(d.plug_pci(phb, fn, ident))
        if cmd == "plug-phb":
            n = _num(a[0])
            return self._effects(d.plug_phb(n, a[1] if len(a) > 1 else f"phb{n}"))
        if cmd == "unplug":
            return self._effects(d.unplug(a[0]))
        if cmd == "reset":
            return self._effects(d.reset())
        if cmd == "cas":
            keys = dict(w.split("=", 1) for w in a)
            unknown = set(keys) - {"mmu", "compat", "hp-events", "htab-shift"}
            if unknown:
                raise ValueError(f"cas: unknown key {sorted(unknown)[0]!r}")
            compat = keys.get("compat")
            d.cas(mmu=Mmu(keys["mmu"]) if "mmu" in keys else None,
                  compat_pvr=None if compat is None else 0 if compat == "none" else _cell(compat),
                  hp_events=_switch(keys["hp-events"]) if "hp-events" in keys else None,
                  htab_shift=_num(keys["htab-shift"]) if "htab-shift" in keys else None)
            return {"ok": True, "mmu": d.mmu.value, "compat": f"{d.effective_compat_pvr:#010x}",
                    "hp_events": d.hp_event_source, "pft_shift": d.pft_shift()}
        if cmd == "clock":
            self.now = datetime.fromisoformat(a[0])
            return {"ok": True, "clock": self.now.isoformat()}
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
