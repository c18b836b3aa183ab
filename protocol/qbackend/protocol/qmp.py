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
line may hold several.  `JsonSplitter` finds where each value ends by
counting brackets outside strings, as QEMU's json-streamer does, and
bounds what it buffers: a value longer than `MAX_VALUE` or nested deeper
than `MAX_NESTING` (half QEMU's limit: what Python's json can both decode
and encode) is answered with QEMU's limit error, then skipped up to the
next newline.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

MAX_VALUE = 4 << 20  # bytes of one JSON value (QEMU allows 64 MiB; qbackend's commands need far less)
# QEMU's json-streamer allows 1024, but Python's json decodes and encodes by recursion and
# stops near 1000 levels less the stack in use: a value nested a little shallower than
# that decodes, and then its id cannot be encoded into the reply (RecursionError).
MAX_NESTING = 512


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


# -- framing ------------------------------------------------------------------------------

_STRUCTURAL = re.compile(rb'["\\{}\[\]\n]')


class JsonSplitter:
    """Bytes in, whole JSON values (as bytes) out; `LimitExceeded` for oversized ones."""

    @dataclass(frozen=True)
    class LimitExceeded:
        desc: str

    def __init__(self) -> None:
        self._buf = bytearray()
        self._scan = 0  # how far _buf has been scanned
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._skipping = False  # after a limit error: drop input up to the next newline

    def feed(self, data: bytes) -> list[bytes | JsonSplitter.LimitExceeded]:
        out: list[bytes | JsonSplitter.LimitExceeded] = []
        rest: bytes | None = data
        while rest is not None:  # a loop, not recursion: a chunk may hold many over-limit values
            rest = self._feed_once(rest, out)
        return out

    def _feed_once(self, data: bytes, out: list[bytes | JsonSplitter.LimitExceeded]) -> bytes | None:
        """Scan `data` into `out`; after a limit error, the input left to scan (else None)."""
        if self._skipping:
            nl = data.find(b"\n")
            if nl < 0:
                return None
            self._skipping = False
            data = data[nl + 1:]
        self._buf += data
        pos = self._scan
        start = 0  # where the value being scanned began
        buf = self._buf
        while True:
            m = _STRUCTURAL.search(buf, pos)
            end = m.start() if m else len(buf)
            if self._escape and end > pos:  # the byte after a backslash, whatever it is
                self._escape = False
                pos += 1
                continue
            if m is None:
                pos = len(buf)
                break
            ch = buf[end]
            pos = end + 1
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == 0x5C:  # backslash
                    self._escape = True
                elif ch == 0x22:  # quote
                    self._in_string = False
                continue
            if ch == 0x22:
                self._in_string = True
            elif ch in (0x7B, 0x5B):  # { [
                self._depth += 1
                if self._depth > MAX_NESTING:
                    out.append(self.LimitExceeded("JSON nesting depth limit exceeded"))
                    rest = bytes(buf[pos:])
                    self._skip_line()
                    return rest or None
            elif ch in (0x7D, 0x5D):  # } ]
                self._depth -= 1
                if self._depth <= 0:
                    self._depth = 0
                    out.append(bytes(buf[start:pos]))
                    start = pos
            elif ch == 0x0A and self._depth == 0:
                # A newline outside any bracket ends a scalar (or a stray token) at the top level.
                if buf[start:end].strip():
                    out.append(bytes(buf[start:end]))
                start = pos
        del buf[:start]
        self._scan = pos - start
        if len(buf) > MAX_VALUE:
            out.append(self.LimitExceeded("JSON token size limit exceeded"))
            self._skip_line()
            return None
        if not self._in_string and not buf.strip():
            buf.clear()
            self._scan = 0
        return None

    def _skip_line(self) -> None:
        """After a limit error: forget the value and drop input up to the next newline."""
        self._buf.clear()
        self._scan = self._depth = 0
        self._in_string = self._escape = False
        self._skipping = True


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
        self._splitter = JsonSplitter()
        self.negotiated = False
        self.closed = False

    def receive_data(self, data: bytes) -> list[Action]:
        if not data:
            self.closed = True
            return []
        actions: list[Action] = []
        for value in self._splitter.feed(data):
            if isinstance(value, JsonSplitter.LimitExceeded):
                actions.append(Reply(error_message(ErrorClass.GENERIC, value.desc)))
            else:
                actions.append(self._message(value))
        return actions

    def _message(self, raw: bytes) -> Action:
        try:
            obj = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            text = str(exc).split(":", 1)[0] if isinstance(exc, json.JSONDecodeError) else str(exc)
            return Reply(error_message(ErrorClass.GENERIC, f"JSON parse error, {text}"))
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
