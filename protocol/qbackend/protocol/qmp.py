"""QMP, the server side, sans-IO (QEMU's docs/interop/qmp-spec.rst).

A client connects, gets a greeting, negotiates with ``qmp_capabilities``
and then sends commands, one JSON object each:

    {"execute": NAME, "arguments": {...}, "id": ANY}

and gets ``{"return": VALUE, "id": ANY}`` or ``{"error": {"class": C,
"desc": TEXT}, "id": ANY}``; events ``{"event": NAME, "data": {...},
"timestamp": {"seconds": S, "microseconds": US}}`` arrive in between.

`QmpSession` is one client: ``receive_data(bytes)`` returns what to do, a
list of ready replies (`Reply`) and commands to run (`Execute`, arguments
already checked against the command's `CommandSpec`); ``receive_data(b"")``
is EOF.  The errors and their texts are QEMU's own (checked against
qemu-storage-daemon 11.1 in tests/test_qmp_monitor.py).

Input is a stream of JSON values, not lines: a value may span lines and a
line may hold several.  `qmp_json.JsonStream` reads it as QEMU's monitor
does, errors and their positions included.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from qbackend.protocol.qmp_json import JsonError, JsonStream


class ErrorClass(StrEnum):
    """QMP error classes (qapi/error.json) that qbackend answers with."""

    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_FOUND = "DeviceNotFound"


class QmpCommandError(Exception):
    """A command failed; the client gets ``class`` and ``desc`` (QEMU's words where QEMU has them)."""

    def __init__(self, desc: str, error_class: ErrorClass = ErrorClass.GENERIC) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


# -- argument schemas ---------------------------------------------------------------------

def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


_TYPE_CHECKS: dict[str, Callable[[object], bool]] = {
    "str": lambda v: isinstance(v, str),
    "int": _is_int,
    "number": _is_number,
    "bool": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "any": lambda v: True,
}


@dataclass(frozen=True)
class Arg:
    """One argument of a command: its JSON type and whether it may be left out.

    ``kind``: "str", "int", "number", "bool", "object", "array", "any", or
    a tuple of allowed strings (an enum, as QAPI's).
    """

    kind: str | tuple[str, ...]
    optional: bool = False
    doc: str = ""

    def check(self, name: str, value: object) -> None:
        kind = self.kind
        if isinstance(kind, tuple):
            if not isinstance(value, str):
                raise QmpCommandError(f"Invalid parameter type for '{name}', expected: string")
            if value not in kind:
                raise QmpCommandError(f"Parameter '{name}' does not accept value '{value}'")
            return
        ok = _TYPE_CHECKS[kind](value)
        if not ok:
            expected = {"str": "string", "int": "integer", "number": "number", "bool": "boolean",
                        "object": "object", "array": "array"}[kind]
            raise QmpCommandError(f"Invalid parameter type for '{name}', expected: {expected}")


@dataclass(frozen=True)
class CommandSpec:
    """A command's name, its arguments, and one line of documentation."""

    name: str
    args: Mapping[str, Arg] = field(default_factory=dict)
    doc: str = ""
    returns: str = "{}"

    def validate(self, arguments: Mapping[str, object]) -> dict[str, Any]:
        """The arguments, checked: missing, unexpected and mistyped ones are QEMU's errors."""
        for name, spec in self.args.items():
            if name not in arguments and not spec.optional:
                raise QmpCommandError(f"Parameter '{name}' is missing")
        for name, value in arguments.items():
            arg = self.args.get(name)
            if arg is None:
                raise QmpCommandError(f"Parameter '{name}' is unexpected")
            arg.check(name, value)
        return dict(arguments)


# -- messages -------------------------------------------------------------------------------

def _dump(obj: object) -> bytes:
    return json.dumps(obj, separators=(", ", ": ")).encode() + b"\r\n"


def greeting(version: tuple[int, int, int], package: str) -> bytes:
    major, minor, micro = version
    return _dump({"QMP": {"version": {"qemu": {"micro": micro, "minor": minor, "major": major},
                                      "package": package}, "capabilities": []}})


def return_message(value: object, msg_id: object = None, has_id: bool = False) -> bytes:
    msg: dict[str, object] = {"return": value}
    if has_id:
        msg["id"] = msg_id
    return _dump(msg)


def error_message(error_class: ErrorClass, desc: str, msg_id: object = None, has_id: bool = False) -> bytes:
    msg: dict[str, object] = {}
    if has_id:
        msg["id"] = msg_id
    msg["error"] = {"class": error_class.value, "desc": desc}
    return _dump(msg)


def event_message(name: str, data: Mapping[str, object] | None, seconds: int, microseconds: int) -> bytes:
    msg: dict[str, object] = {"event": name}
    if data is not None:
        msg["data"] = dict(data)
    msg["timestamp"] = {"seconds": seconds, "microseconds": microseconds}
    return _dump(msg)


# -- one client -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reply:
    """Bytes to send to the client now."""

    data: bytes


@dataclass(frozen=True)
class Execute:
    """A command to run; answer it with `QmpSession.returned` or `QmpSession.failed`."""

    spec: CommandSpec
    arguments: dict[str, Any]
    msg_id: object
    has_id: bool


Action = Reply | Execute

_TOP_KEYS = ("execute", "arguments", "id")


class QmpSession:
    """One client's QMP state: capabilities negotiation, then commands.

    ``lookup(name)`` gives the `CommandSpec` of a command, or None if there
    is no such command.  ``qmp_capabilities`` is handled here.
    """

    NEGOTIATE = "qmp_capabilities"

    def __init__(self, lookup: Callable[[str], CommandSpec | None]) -> None:
        self._lookup = lookup
        self._stream = JsonStream()
        self.negotiated = False
        self.closed = False

    def receive_data(self, data: bytes) -> list[Action]:
        if not data:
            self.closed = True
            return []
        actions: list[Action] = []
        for item in self._stream.feed(data):
            if isinstance(item, JsonError):
                actions.append(Reply(error_message(ErrorClass.GENERIC, item.desc)))
            else:
                actions.append(self._message(item.value))
        return actions

    def _message(self, obj: object) -> Action:
        if not isinstance(obj, dict):
            return Reply(error_message(ErrorClass.GENERIC, "QMP input must be a JSON object"))
        has_id = "id" in obj
        msg_id = obj.get("id")

        def error(desc: str, cls: ErrorClass = ErrorClass.GENERIC) -> Reply:
            return Reply(error_message(cls, desc, msg_id, has_id))

        # Each member is checked in the order given, then the command's presence (QEMU's order).
        for key, value in obj.items():
            if key == "execute" and not isinstance(value, str):
                return error("QMP input member 'execute' must be a string")
            if key == "arguments" and not isinstance(value, dict):
                return error("QMP input member 'arguments' must be an object")
            if key not in _TOP_KEYS:
                return error(f"QMP input member '{key}' is unexpected")
        if "execute" not in obj:
            return error("QMP input lacks member 'execute'")
        name = obj["execute"]
        arguments = obj.get("arguments", {})
        if name == self.NEGOTIATE:
            if self.negotiated:
                return error("Capabilities negotiation is already complete, command ignored",
                             ErrorClass.COMMAND_NOT_FOUND)
            enable = arguments.get("enable", [])
            unexpected = [k for k in arguments if k != "enable"]
            if unexpected:
                return error(f"Parameter '{unexpected[0]}' is unexpected")
            if not isinstance(enable, list) or not all(isinstance(c, str) for c in enable):
                return error("Invalid parameter type for 'enable', expected: array of strings")
            if enable:
                return error(f"Capability '{enable[0]}' not available")
            self.negotiated = True
            return Reply(return_message({}, msg_id, has_id))
        if not self.negotiated:
            return error("Expecting capabilities negotiation with 'qmp_capabilities'",
                         ErrorClass.COMMAND_NOT_FOUND)
        spec = self._lookup(name)
        if spec is None:
            return error(f"The command {name} has not been found", ErrorClass.COMMAND_NOT_FOUND)
        try:
            checked = spec.validate(arguments)
        except QmpCommandError as exc:
            return error(exc.desc, exc.error_class)
        return Execute(spec, checked, msg_id, has_id)

    @staticmethod
    def returned(cmd: Execute, value: object) -> bytes:
        return return_message(value, cmd.msg_id, cmd.has_id)

    @staticmethod
    def failed(cmd: Execute, exc: QmpCommandError) -> bytes:
        return error_message(exc.error_class, exc.desc, cmd.msg_id, cmd.has_id)
