"""QMP replies are checked field by field: whatever QEMU (or something
pretending to be QEMU) sends, the readers return records or raise
QmpReplyError, never KeyError/TypeError/AttributeError."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.machine.qmp_replies import (
    DimmInfo,
    Event,
    OspmStatus,
    QmpReplyError,
    memory_size_summary,
    pci_bus_devices,
)

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
                        st.sampled_from(["type", "data", "slot", "addr", "size", "node", "id", "event", "bus",
                                         "devices", "function", "class_info", "class", "vendor", "device",
                                         "qdev_id", "pci_bridge", "secondary", "base-memory", "info",
                                         "slot-type", "source", "status"]), inner, max_size=6),
                    max_leaves=20)

READERS = [DimmInfo.from_memory_devices, OspmStatus.from_reply, Event.parse, memory_size_summary,
           lambda r: pci_bus_devices(r, None), lambda r: pci_bus_devices(r, "rp1")]


@settings(max_examples=300, deadline=None)
@given(reply=JSON, which=st.integers(0, len(READERS) - 1))
def test_any_json_is_a_record_or_a_reply_error(reply: Any, which: int) -> None:
    try:
        READERS[which](reply)
    except QmpReplyError:
        pass


def test_a_real_looking_reply_reads() -> None:
    reply = [{"type": "dimm", "data": {"slot": 1, "addr": 1 << 32, "size": 128 << 20, "node": 0, "id": "d1",
                                       "hotplugged": True, "memdev": "/objects/m"}},
             {"type": "virtio-mem", "data": {}}]
    assert DimmInfo.from_memory_devices(reply) == [DimmInfo(1, 1 << 32, 128 << 20, 0, "d1", True)]


@pytest.mark.parametrize("reply, what", [
    ([{"type": "dimm", "data": {"slot": 1, "addr": 0, "size": 1, "node": 0}}, {"type": "dimm"}], "no 'data'"),
    ([{"type": "dimm", "data": {"slot": "1", "addr": 0, "size": 1, "node": 0}}], "'slot' is '1'"),
    ([{"type": "dimm", "data": {"slot": True, "addr": 0, "size": 1, "node": 0}}], "'slot' is True"),
    ({"type": "dimm"}, "expected an array"),
])
def test_malformed_memory_devices_say_what_is_wrong(reply: Any, what: str) -> None:
    with pytest.raises(QmpReplyError, match=what):
        DimmInfo.from_memory_devices(reply)


def test_event_without_data_reads_as_empty() -> None:
    ev = Event.parse({"event": "RESUME", "timestamp": {"seconds": 1, "microseconds": 2}})
    assert ev.name == "RESUME" and ev.data.string("device", "") == ""
    with pytest.raises(QmpReplyError, match="no 'event'"):
        Event.parse({"data": {}})
