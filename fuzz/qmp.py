"""QMP, the server side: QEMU's JSON reader (qmp_json.JsonStream) and QmpSession dispatch.

Documented outcome: a list of actions; every error is a reply, nothing raises.
Checked besides: every reply is one line of JSON, every `Execute` carries
arguments its spec accepts, and the reader gives the same values and errors
(positions included) however the stream is chunked.
"""

from __future__ import annotations

import json

from fuzz import chunks
from qbackend.protocol import qmp
from qbackend.protocol.qmp import Arg, CommandSpec
from qbackend.protocol.qmp_json import JsonError, JsonStream, Parsed

SPECS = {spec.name: spec for spec in (
    CommandSpec("query-status"),
    CommandSpec("device_add", {"driver": Arg("str"), "id": Arg("str", optional=True),
                               "size": Arg("int", optional=True), "ratio": Arg("number", optional=True)}),
    CommandSpec("block-export-del", {"id": Arg("str"), "mode": Arg(("safe", "hard"), optional=True)}),
    CommandSpec("set", {"on": Arg("bool"), "props": Arg("object", optional=True),
                        "list": Arg("array", optional=True), "value": Arg("any", optional=True)}),
)}


def _check_message(data: bytes) -> None:
    assert data.endswith(b"\r\n") and data.count(b"\n") == 1, data
    msg = json.loads(data)
    assert isinstance(msg, dict) and ("return" in msg) != ("error" in msg), msg


def test_one_input(data: bytes) -> None:
    session = qmp.QmpSession(SPECS.get)
    whole = JsonStream()
    cut = JsonStream()
    stream = b""
    pieces: list[Parsed | JsonError] = []
    for chunk, _nfds in chunks(data):
        stream += chunk
        pieces += cut.feed(chunk)
        for action in session.receive_data(chunk):
            if isinstance(action, qmp.Reply):
                _check_message(action.data)
            else:
                assert action.spec is SPECS[action.spec.name]
                assert action.spec.validate(action.arguments) == action.arguments
                _check_message(session.returned(action, {"ok": True}))
                _check_message(session.failed(action, qmp.QmpCommandError("failed", qmp.ErrorClass.DEVICE_NOT_FOUND)))
    assert session.receive_data(b"") == [] and session.closed
    assert pieces == whole.feed(stream), (pieces, stream)
