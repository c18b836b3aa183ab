"""QMP replies and events, checked field by field before use.

QEMU documents what each reply holds (qapi/*.json); a reply that does not
(a QEMU of another version, a fake monitor, a bug) must become a logged
`QmpReplyError`, never a KeyError or TypeError inside a slot manager.  Each
reader here turns one kind of reply into a small frozen record.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qbackend.machine.qmp import QmpError


class QmpReplyError(QmpError):
    """A QMP reply or event lacks a field QEMU documents, or has the wrong type."""


class Fields:
    """A JSON object from QMP, read with types checked; ``where`` names it in errors."""

    def __init__(self, obj: object, where: str) -> None:
        if not isinstance(obj, dict):
            raise QmpReplyError(f"{where}: expected an object, got {type(obj).__name__}")
        self.obj: dict[str, Any] = obj
        self.where = where

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        if key not in self.obj:
            if default is ...:
                raise QmpReplyError(f"{self.where}: no {key!r}")
            return default
        value = self.obj[key]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise QmpReplyError(f"{self.where}: {key!r} is {value!r}, not a {getattr(kind, '__name__', kind)}")
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        return int(self._get(key, int, ... if default is None else default))

    def string(self, key: str, default: str | None = None) -> str:
        return str(self._get(key, str, ... if default is None else default))

    def opt_string(self, key: str) -> str | None:
        value = self._get(key, (str, type(None)), None)
        return None if value is None else str(value)

    def boolean(self, key: str, default: bool = False) -> bool:
        return bool(self._get(key, bool, default))

    def nested(self, key: str, default: dict[str, Any] | None = None) -> Fields:
        return Fields(self._get(key, dict, ... if default is None else default), f"{self.where}.{key}")

    def nested_list(self, key: str, default: list[Any] | None = None) -> list[Fields]:
        items = self._get(key, list, ... if default is None else default)
        return [Fields(item, f"{self.where}.{key}[{i}]") for i, item in enumerate(items)]


def as_list(reply: object, where: str) -> list[Fields]:
    """A reply that QEMU documents as an array of objects."""
    if not isinstance(reply, list):
        raise QmpReplyError(f"{where}: expected an array, got {type(reply).__name__}")
    return [Fields(item, f"{where}[{i}]") for i, item in enumerate(reply)]


@dataclass(frozen=True)
class Event:
    """A QMP event: its name and its data (empty when it carries none)."""

    name: str
    data: Fields

    @staticmethod
    def parse(event: object) -> Event:
        f = Fields(event, "QMP event")
        name = f.string("event")
        return Event(name, f.nested("data", {}) if "data" in f.obj else Fields({}, f"{name}.data"))


@dataclass(frozen=True)
class DimmInfo:
    """A pc-dimm of query-memory-devices (PCDIMMDeviceInfo)."""

    slot: int
    addr: int
    size: int
    node: int
    id: str | None
    hotplugged: bool

    @staticmethod
    def from_memory_devices(reply: object) -> list[DimmInfo]:
        out = []
        for dev in as_list(reply, "query-memory-devices"):
            if dev.string("type") != "dimm":
                continue
            d = dev.nested("data")
            out.append(DimmInfo(d.integer("slot"), d.integer("addr"), d.integer("size"), d.integer("node"), d.opt_string("id"),
                                d.boolean("hotplugged")))
        return out


@dataclass(frozen=True)
class OspmStatus:
    """One entry of query-acpi-ospm-status, or the info of ACPI_DEVICE_OST (ACPIOSTInfo)."""

    device: str
    slot_type: str
    source: int
    status: int

    @staticmethod
    def parse(f: Fields) -> OspmStatus:
        return OspmStatus(f.string("device", ""), f.string("slot-type"), f.integer("source"), f.integer("status"))

    @staticmethod
    def from_reply(reply: object) -> list[OspmStatus]:
        return [OspmStatus.parse(f) for f in as_list(reply, "query-acpi-ospm-status")]


@dataclass(frozen=True)
class PciDeviceInfo:
    """A device of query-pci (PciDeviceInfo), with what the slot manager uses."""

    slot: int
    function: int
    qdev_id: str
    class_code: int
    vendor: int
    device: int

    @staticmethod
    def parse(f: Fields) -> PciDeviceInfo:
        ids = f.nested("id")
        return PciDeviceInfo(f.integer("slot"), f.integer("function"), f.string("qdev_id", ""),
                             f.nested("class_info").integer("class"), ids.integer("vendor"), ids.integer("device"))


def pci_bus_devices(reply: object, bus_id: str | None) -> tuple[int, list[PciDeviceInfo] | None]:
    """The bus number and devices of the hotpluggable bus in a query-pci reply.

    bus_id None: the root bus; else the secondary bus of the bridge with that qdev id.
    The devices are None when QEMU cannot list them: a bridge whose secondary bus
    number is 0 has not been numbered by the guest's firmware (a machine reset
    clears it), and query-pci then shows nothing behind it although its devices
    are all still there.
    """
    for host in as_list(reply, "query-pci"):
        if bus_id is None:
            return host.integer("bus"), [PciDeviceInfo.parse(d) for d in host.nested_list("devices")]
        for dev in host.nested_list("devices"):
            if "pci_bridge" in dev.obj and dev.string("qdev_id", "") == bus_id:
                bridge = dev.nested("pci_bridge")
                secondary = bridge.nested("bus").integer("secondary")
                if secondary == 0:
                    return secondary, None
                return secondary, [PciDeviceInfo.parse(d) for d in bridge.nested_list("devices", [])]
    raise QmpReplyError(f"query-pci: QEMU has no bus behind {bus_id!r}")


def qom_child_names(reply: object) -> set[str]:
    """qom-list: the names of the children of a QOM path (properties of type 'child<...>')."""
    return {p.string("name") for p in as_list(reply, "qom-list") if p.string("type", "").startswith("child<")}


def memory_size_summary(reply: object) -> tuple[int, int]:
    """query-memory-size-summary: (base-memory, plugged-memory)."""
    f = Fields(reply, "query-memory-size-summary")
    return f.integer("base-memory"), f.integer("plugged-memory", 0)
