"""Unit tests of the sans-IO vfio-user codec and server connection state.

No sockets, no QEMU: bytes in, events out.  File descriptors here are plain
integers, as the protocol layer never touches them.
"""

from __future__ import annotations

import errno as E
import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.protocol import vfio_user as vu
from qbackend.protocol.vfio_user import (
    CAP_HEADER,
    DMA_ACCESS,
    DMA_MAP,
    DMA_UNMAP,
    HEADER,
    HEADER_SIZE,
    IRQ_SET,
    NEED_DATA,
    REGION_ACCESS,
    REGION_INFO,
    SPARSE_MMAP_AREA,
    SPARSE_MMAP_HEADER,
    TYPE_REPLY,
    VERSION_PREFIX,
    Command,
    DmaMapFlags,
    DmaUnmapFlags,
    IrqSetFlags,
    MessageReader,
    ProtocolError,
    RegionFlags,
    RegionRead,
    RegionWrite,
    Rejected,
    Request,
    ServerConnection,
    ServerReplyReceived,
    State,
    build_error_reply,
    build_message,
    build_reply,
    region_info_payload,
)

# -- helpers -------------------------------------------------------------------


def version_payload(major: int = 0, minor: int = 0, json_text: bytes | None = None) -> bytes:
    payload = VERSION_PREFIX.pack(major, minor)
    if json_text is not None:
        payload += json_text + b"\0"
    return payload


def ready() -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(build_message(0, Command.VERSION, version_payload()))
    event = conn.next_event()
    assert isinstance(event, Request) and event.command is Command.VERSION
    assert conn.state is State.READY
    return conn


def one_event(conn: ServerConnection, data: bytes, fds: tuple[int, ...] = ()) -> object:
    conn.receive_data(data, fds)
    event = conn.next_event()
    assert conn.next_event() is NEED_DATA
    return event


def region_read(msg_id: int, offset: int, region: int, count: int) -> bytes:
    return build_message(msg_id, Command.REGION_READ, REGION_ACCESS.pack(offset, region, count))


def region_write(msg_id: int, offset: int, region: int, data: bytes, count: int | None = None,
                 flags: int = 0) -> bytes:
    count = len(data) if count is None else count
    return build_message(msg_id, Command.REGION_WRITE, REGION_ACCESS.pack(offset, region, count) + data,
                         flags=flags)


def set_irqs(msg_id: int, flags: int, index: int = 2, start: int = 0, count: int = 1) -> bytes:
    return build_message(msg_id, Command.DEVICE_SET_IRQS, IRQ_SET.pack(IRQ_SET.size, flags, index, start, count))


def dma_map(msg_id: int, *, argsz: int = DMA_MAP.size, flags: int = DmaMapFlags.READ | DmaMapFlags.WRITE,
            offset: int = 0, addr: int = 0x10000, size: int = 0x1000) -> bytes:
    return build_message(msg_id, Command.DMA_MAP, DMA_MAP.pack(argsz, flags, offset, addr, size))


def assert_rejected(event: object, errno: int, msg_id: int, fds: tuple[int, ...] = ()) -> Rejected:
    assert isinstance(event, Rejected), event
    assert event.errno == errno, event.reason
    assert event.id == msg_id
    assert event.fds == fds
    hdr = vu.Header(*HEADER.unpack(event.reply))
    assert hdr.id == msg_id and hdr.flags == TYPE_REPLY | vu.FLAG_ERROR and hdr.error == errno
    assert hdr.size == HEADER_SIZE
    return event


# -- MessageReader -------------------------------------------------------------


STREAM = [
    build_message(1, Command.DEVICE_GET_INFO, struct.pack("=IIII", 16, 0, 0, 0)),
    build_message(2, Command.DEVICE_RESET),
    region_write(3, 0x20, 0, b"\x01\x02\x03"),
]


def drain(reader: MessageReader) -> list[vu.Message]:
    out = []
    while (msg := reader.next_message()) is not None:
        out.append(msg)
    return out


def test_reader_whole_bytewise_and_trailing_agree() -> None:
    data = b"".join(STREAM)

    whole = MessageReader()
    whole.receive_data(data)
    expected = drain(whole)
    assert [m.header.id for m in expected] == [1, 2, 3]
    assert expected[2].payload == REGION_ACCESS.pack(0x20, 0, 3) + b"\x01\x02\x03"

    bytewise = MessageReader()
    got = []
    for i in range(len(data)):
        bytewise.receive_data(data[i:i + 1])
        got += drain(bytewise)
    assert got == expected
    assert bytewise.buffered == 0

    trailing = MessageReader()
    partial = build_message(4, Command.DEVICE_RESET)[:10]
    trailing.receive_data(data + partial)
    assert drain(trailing) == expected
    assert trailing.buffered == len(partial)


def test_reader_fds_go_to_message_holding_last_byte_of_chunk() -> None:
    a, b, c = (build_message(i, Command.DEVICE_RESET) for i in (1, 2, 3))
    reader = MessageReader()
    reader.receive_data(a + b, (10, 11))
    reader.receive_data(c[:5], (12,))
    first, second = drain(reader)
    assert first.fds == ()
    assert second.fds == (10, 11)
    reader.receive_data(c[5:])
    (third,) = drain(reader)
    assert third.header.id == 3 and third.fds == (12,)


def test_reader_fds_of_chunk_ending_mid_message_wait_for_it() -> None:
    a, b = build_message(1, Command.DEVICE_RESET), build_message(2, Command.DEVICE_RESET)
    reader = MessageReader()
    reader.receive_data(a + b[:7], (20,))
    (first,) = drain(reader)
    assert first.fds == ()
    reader.receive_data(b[7:])
    (second,) = drain(reader)
    assert second.fds == (20,)


def test_reader_size_below_header_is_fatal_and_returns_fds() -> None:
    reader = MessageReader()
    reader.receive_data(HEADER.pack(1, Command.DEVICE_RESET, 8, 0, 0), (30,))
    with pytest.raises(ProtocolError) as info:
        reader.next_message()
    assert info.value.reply == b""
    assert info.value.fds == (30,)


def test_reader_oversize_request_gets_einval_reply() -> None:
    reader = MessageReader(max_message_size=1024)
    reader.receive_data(HEADER.pack(7, Command.REGION_WRITE, 1025, 0, 0))
    with pytest.raises(ProtocolError) as info:
        reader.next_message()
    assert info.value.reply == build_error_reply(7, Command.REGION_WRITE, E.EINVAL)


def test_reader_oversize_reply_gets_no_reply() -> None:
    reader = MessageReader(max_message_size=1024)
    reader.receive_data(HEADER.pack(7, Command.DMA_READ, 1 << 20, TYPE_REPLY, 0))
    with pytest.raises(ProtocolError) as info:
        reader.next_message()
    assert info.value.reply == b""


@pytest.mark.parametrize("cut", [5, HEADER_SIZE + 3])
def test_reader_eof_inside_a_message_is_fatal(cut: int) -> None:
    reader = MessageReader()
    reader.receive_data(region_write(1, 0, 0, b"abcdefgh")[:cut], (40,))
    assert reader.next_message() is None
    reader.receive_data(b"")
    with pytest.raises(ProtocolError) as info:
        reader.next_message()
    assert info.value.fds == (40,)


def test_reader_eof_between_messages_is_clean() -> None:
    reader = MessageReader()
    reader.receive_data(build_message(1, Command.DEVICE_RESET))
    reader.receive_data(b"")
    assert reader.next_message() is not None
    assert reader.next_message() is None
    assert reader.eof


# -- handshake -------------------------------------------------------------------


def test_first_message_must_be_version() -> None:
    conn = ServerConnection()
    conn.receive_data(build_message(5, Command.DEVICE_RESET), (50,))
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.reply == build_error_reply(5, Command.DEVICE_RESET, E.EINVAL)
    assert info.value.fds == (50,)
    assert conn.state is State.CLOSED
    with pytest.raises(ProtocolError):
        conn.next_event()


BAD_VERSION_PAYLOADS = {
    "too short": b"\0\0",
    "no NUL": VERSION_PREFIX.pack(0, 0) + b"{}",
    "embedded NUL": VERSION_PREFIX.pack(0, 0) + b"{}\0{}\0",
    "not JSON": version_payload(json_text=b"{capabilities"),
    "not UTF-8": version_payload(json_text=b'{"\xff": 1}'),
    "not an object": version_payload(json_text=b"[1, 2]"),
    "capabilities not object": version_payload(json_text=b'{"capabilities": []}'),
    "max_msg_fds string": version_payload(json_text=b'{"capabilities": {"max_msg_fds": "16"}}'),
    "max_msg_fds float": version_payload(json_text=b'{"capabilities": {"max_msg_fds": 16.0}}'),
    "max_msg_fds bool": version_payload(json_text=b'{"capabilities": {"max_msg_fds": true}}'),
    "max_msg_fds negative": version_payload(json_text=b'{"capabilities": {"max_msg_fds": -1}}'),
    "max_data_xfer_size zero": version_payload(json_text=b'{"capabilities": {"max_data_xfer_size": 0}}'),
    "pgsizes 512": version_payload(json_text=b'{"capabilities": {"pgsizes": 512}}'),
    "pgsizes 4k|512": version_payload(json_text=b'{"capabilities": {"pgsizes": 4608}}'),
    "migration not object": version_payload(json_text=b'{"capabilities": {"migration": 1}}'),
    "migration pgsize": version_payload(json_text=b'{"capabilities": {"migration": {"pgsize": 100}}}'),
    "write_multiple int": version_payload(json_text=b'{"capabilities": {"write_multiple": 1}}'),
    "deeply nested": version_payload(json_text=b"[" * 100_000),
}


@pytest.mark.parametrize("payload", BAD_VERSION_PAYLOADS.values(), ids=BAD_VERSION_PAYLOADS.keys())
def test_malformed_version_is_fatal(payload: bytes) -> None:
    conn = ServerConnection()
    conn.receive_data(build_message(3, Command.VERSION, payload))
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.reply == build_error_reply(3, Command.VERSION, E.EINVAL)
    assert conn.state is State.CLOSED


def test_version_with_fds_is_fatal_and_hands_them_back() -> None:
    conn = ServerConnection()
    conn.receive_data(build_message(3, Command.VERSION, version_payload()), (60,))
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.reply == build_error_reply(3, Command.VERSION, E.EINVAL)
    assert info.value.fds == (60,)
    assert conn.state is State.CLOSED


def test_version_major_other_than_zero_is_fatal() -> None:
    conn = ServerConnection()
    conn.receive_data(build_message(3, Command.VERSION, version_payload(major=1)))
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.errno == E.ENOTSUP
    assert info.value.reply == build_error_reply(3, Command.VERSION, E.ENOTSUP)
    assert conn.state is State.CLOSED


@pytest.mark.parametrize("json_text", [None, b"{}", b"  ", b'{"capabilities": {}}'])
def test_version_without_capabilities_gets_defaults(json_text: bytes | None) -> None:
    conn = ServerConnection()
    event = one_event(conn, build_message(1, Command.VERSION, version_payload(0, 5, json_text)))
    assert isinstance(event, Request)
    assert event.body == vu.Version(0, 5, vu.Capabilities())
    assert conn.state is State.READY
    assert conn.client_caps == vu.Capabilities()


def test_version_capabilities_are_read() -> None:
    doc = {"capabilities": {"max_msg_fds": 8, "max_data_xfer_size": 65536, "pgsizes": 4096,
                            "max_dma_maps": 10, "migration": {"pgsize": 8192}, "write_multiple": True}}
    conn = ServerConnection()
    one_event(conn, build_message(1, Command.VERSION, version_payload(json_text=json.dumps(doc).encode())))
    assert conn.client_caps == vu.Capabilities(8, 65536, 4096, 10, 8192, True, False)


def test_version_reply_fits_qemu_and_parses() -> None:
    conn = ServerConnection()
    req = one_event(conn, build_message(9, Command.VERSION, version_payload()))
    assert isinstance(req, Request)
    reply = conn.version_reply(req)
    assert len(reply) <= 214
    hdr = vu.Header(*HEADER.unpack_from(reply))
    assert (hdr.id, hdr.command, hdr.size, hdr.flags, hdr.error) == (9, Command.VERSION, len(reply), TYPE_REPLY, 0)
    major, minor = VERSION_PREFIX.unpack_from(reply, HEADER_SIZE)
    assert (major, minor) == (0, 0)
    text = reply[HEADER_SIZE + VERSION_PREFIX.size:]
    assert text.endswith(b"\0") and b"\0" not in text[:-1]
    caps = json.loads(text[:-1])["capabilities"]
    assert 1 <= caps["max_msg_fds"] <= 16
    assert 0 < caps["max_data_xfer_size"] <= 64 << 20
    assert caps["pgsizes"] % 4096 == 0


def test_version_reply_announces_write_multiple_and_still_fits() -> None:
    conn = ServerConnection(server_caps=vu.Capabilities(max_msg_fds=16, max_data_xfer_size=64 << 20,
                                                        write_multiple=True))
    req = one_event(conn, build_message(1, Command.VERSION, version_payload()))
    assert isinstance(req, Request)
    reply = conn.version_reply(req)
    assert len(reply) <= 214
    caps = json.loads(reply[HEADER_SIZE + VERSION_PREFIX.size:-1])["capabilities"]
    assert caps["write_multiple"] is True and caps["max_data_xfer_size"] == 64 << 20


def test_second_version_is_rejected() -> None:
    conn = ready()
    assert_rejected(one_event(conn, build_message(4, Command.VERSION, version_payload())), E.EINVAL, 4)
    assert conn.state is State.READY


# -- request checks ----------------------------------------------------------------


def test_unknown_command_is_rejected_and_connection_goes_on() -> None:
    conn = ready()
    assert_rejected(one_event(conn, build_message(5, 99, b"xyz")), E.ENOSYS, 5)
    # A known command this server does not implement.
    assert_rejected(one_event(conn, build_message(6, Command.DEVICE_GET_REGION_IO_FDS, bytes(16))), E.ENOSYS, 6)
    event = one_event(conn, region_read(7, 0, 0, 4))
    assert isinstance(event, Request) and event.body == RegionRead(0, 0, 4)


def test_fds_on_a_command_that_takes_none_are_handed_back() -> None:
    conn = ready()
    assert_rejected(one_event(conn, region_read(5, 0, 0, 4), (70, 71)), E.EINVAL, 5, (70, 71))
    assert_rejected(one_event(conn, build_message(6, Command.DEVICE_RESET), (72,)), E.EINVAL, 6, (72,))


def test_too_many_fds_are_rejected() -> None:
    conn = ready()
    fds = tuple(range(100, 100 + conn.server_caps.max_msg_fds + 1))
    msg = set_irqs(5, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, count=len(fds))
    assert_rejected(one_event(conn, msg, fds), E.EINVAL, 5, fds)


def test_set_irqs_eventfds_are_passed_on() -> None:
    conn = ready()
    event = one_event(conn, set_irqs(5, IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, count=2), (80, 81))
    assert isinstance(event, Request) and event.fds == (80, 81)
    assert event.body == vu.SetIrqs(IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER, 2, 0, 2)


@pytest.mark.parametrize(("payload", "errno"), [
    (REGION_ACCESS.pack(0, 0, 0), E.EINVAL),
    (REGION_ACCESS.pack(0, 0, vu.MAX_DATA_XFER_SIZE + 1), E.E2BIG),
    (REGION_ACCESS.pack(vu.U64_MAX, 0, 2), E.EINVAL),
    (REGION_ACCESS.pack(0, 0, 4)[:12], E.EINVAL),
    (REGION_ACCESS.pack(0, 0, 4) + b"\0", E.EINVAL),
], ids=["count 0", "count over max", "offset overflow", "short", "long"])
def test_bad_region_read_is_rejected(payload: bytes, errno: int) -> None:
    conn = ready()
    assert_rejected(one_event(conn, build_message(8, Command.REGION_READ, payload)), errno, 8)


def test_region_read_at_the_top_of_the_address_space_is_allowed() -> None:
    conn = ready()
    event = one_event(conn, region_read(8, vu.U64_MAX - 3, 0, 4))
    assert isinstance(event, Request) and event.body == RegionRead(0, vu.U64_MAX - 3, 4)


@pytest.mark.parametrize(("data", "count"), [(b"abcd", 3), (b"abcd", 5), (b"", 4)])
def test_region_write_data_length_must_match_count(data: bytes, count: int) -> None:
    conn = ready()
    assert_rejected(one_event(conn, region_write(9, 0, 0, data, count)), E.EINVAL, 9)


@pytest.mark.parametrize("flags", [
    IrqSetFlags.DATA_NONE | IrqSetFlags.DATA_BOOL | IrqSetFlags.ACTION_TRIGGER,
    IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK | IrqSetFlags.ACTION_UNMASK,
    IrqSetFlags.DATA_NONE,
    IrqSetFlags.ACTION_TRIGGER,
    0,
    IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER | (1 << 6),
], ids=["two DATA", "two ACTION", "no ACTION", "no DATA", "none", "unknown bit"])
def test_set_irqs_flag_combinations_are_rejected(flags: int) -> None:
    conn = ready()
    assert_rejected(one_event(conn, set_irqs(10, flags)), E.EINVAL, 10)


def test_set_irqs_count_zero_only_disables() -> None:
    conn = ready()
    event = one_event(conn, set_irqs(1, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER, count=0))
    assert isinstance(event, Request)
    assert_rejected(one_event(conn, set_irqs(2, IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK, count=0)),
                    E.EINVAL, 2)


@pytest.mark.parametrize(("kwargs", "nfds"), [
    ({"argsz": DMA_MAP.size + 8}, 0),
    ({"argsz": DMA_MAP.size - 1}, 0),
    ({"flags": 4}, 0),
    ({"addr": 0x10800}, 0),
    ({"size": 0x1800}, 0),
    ({"size": 0}, 0),
    ({"addr": vu.U64_MAX - 0xFFF, "size": 0x2000}, 0),
    ({}, 2),
], ids=["argsz big", "argsz small", "flags", "addr unaligned", "size unaligned", "size 0", "wraps", "2 fds"])
def test_bad_dma_map_is_rejected(kwargs: dict[str, int], nfds: int) -> None:
    conn = ready()
    fds = tuple(range(90, 90 + nfds))
    assert_rejected(one_event(conn, dma_map(11, **kwargs), fds), E.EINVAL, 11, fds)


def test_good_dma_map_keeps_its_fd() -> None:
    conn = ready()
    event = one_event(conn, dma_map(11, offset=0x3000), (95,))
    assert isinstance(event, Request)
    assert event.body == vu.DmaMap(DmaMapFlags.READ | DmaMapFlags.WRITE, 0x3000, 0x10000, 0x1000)
    assert event.fds == (95,)


def test_bad_dma_unmap_is_rejected() -> None:
    conn = ready()
    for msg_id, (addr, size) in enumerate([(0x1000, 0), (0, 0x1000)], 1):
        payload = DMA_UNMAP.pack(DMA_UNMAP.size, DmaUnmapFlags.ALL, addr, size)
        assert_rejected(one_event(conn, build_message(msg_id, Command.DMA_UNMAP, payload)), E.EINVAL, msg_id)
    payload = DMA_UNMAP.pack(DMA_UNMAP.size, DmaUnmapFlags.ALL | 4, 0, 0)
    assert_rejected(one_event(conn, build_message(3, Command.DMA_UNMAP, payload)), E.EINVAL, 3)
    payload = DMA_UNMAP.pack(DMA_UNMAP.size, DmaUnmapFlags.GET_DIRTY_BITMAP, 0x1000, 0x1000)
    assert_rejected(one_event(conn, build_message(3, Command.DMA_UNMAP, payload)), E.ENOTSUP, 3)
    payload = DMA_UNMAP.pack(DMA_UNMAP.size, DmaUnmapFlags.ALL, 0, 0)
    event = one_event(conn, build_message(3, Command.DMA_UNMAP, payload))
    assert isinstance(event, Request) and event.body.flags == DmaUnmapFlags.ALL


def test_no_reply_requests_get_no_reply_bytes() -> None:
    conn = ready()
    good = one_event(conn, region_write(1, 0, 0, b"ab", flags=vu.FLAG_NO_REPLY))
    assert isinstance(good, Request) and good.no_reply
    assert conn.reply(good, b"payload") == b""
    assert conn.error_reply(good, E.EIO) == b""
    # Rejected on the fast path and on the general path: still nothing to send.
    bad = one_event(conn, region_write(2, 0, 0, b"ab", count=3, flags=vu.FLAG_NO_REPLY))
    assert isinstance(bad, Rejected) and bad.reply == b""
    unknown = one_event(conn, build_message(3, 99, flags=vu.FLAG_NO_REPLY))
    assert isinstance(unknown, Rejected) and unknown.errno == E.ENOSYS and unknown.reply == b""
    # And a normal request does get its reply.
    normal = one_event(conn, build_message(4, Command.DEVICE_RESET))
    assert isinstance(normal, Request)
    assert conn.reply(normal) == build_reply(4, Command.DEVICE_RESET)


def test_unknown_header_flags_are_fatal() -> None:
    conn = ready()
    conn.receive_data(build_message(1, Command.DEVICE_RESET, flags=0x40))
    with pytest.raises(ProtocolError):
        conn.next_event()
    assert conn.state is State.CLOSED


# -- server-initiated requests -------------------------------------------------------


def test_dma_read_reply_is_matched_by_id() -> None:
    conn = ready()
    id1, msg1 = conn.dma_read_request(0x1000, 4)
    id2, _ = conn.dma_read_request(0x2000, 4)
    assert id1 != id2
    hdr = vu.Header(*HEADER.unpack_from(msg1))
    assert (hdr.command, hdr.type, hdr.size) == (Command.DMA_READ, vu.TYPE_REQUEST, len(msg1))
    assert DMA_ACCESS.unpack_from(msg1, HEADER_SIZE) == (0x1000, 4)

    payload = DMA_ACCESS.pack(0x2000, 4) + b"wxyz"
    event = one_event(conn, build_reply(id2, Command.DMA_READ, payload))
    assert event == ServerReplyReceived(id2, Command.DMA_READ, 0, payload, ())
    assert vu.parse_dma_read_reply(event.payload, 4) == b"wxyz"

    # The same reply again matches nothing now: dropped, never answered.
    again = one_event(conn, build_reply(id2, Command.DMA_READ, payload))
    assert isinstance(again, Rejected) and again.reply == b""

    # A reply with the right id but the wrong command does not consume the id.
    wrong = one_event(conn, build_reply(id1, Command.DMA_WRITE, DMA_ACCESS.pack(0x1000, 4)))
    assert isinstance(wrong, Rejected) and wrong.reply == b""
    error = HEADER.pack(id1, Command.DMA_READ, HEADER_SIZE, TYPE_REPLY | vu.FLAG_ERROR, E.EFAULT)
    event = one_event(conn, error)
    assert isinstance(event, ServerReplyReceived) and event.id == id1 and event.error == E.EFAULT


def test_unsolicited_reply_is_dropped_with_its_fds() -> None:
    conn = ready()
    event = one_event(conn, build_reply(1234, Command.DMA_READ, b"junk"), (77,))
    assert isinstance(event, Rejected)
    assert event.reply == b"" and event.fds == (77,)


def test_dma_requests_need_a_client_and_a_sane_size() -> None:
    conn = ServerConnection()
    with pytest.raises(vu.RequestError):
        conn.dma_read_request(0, 4)
    conn = ready()
    with pytest.raises(vu.RequestError):
        conn.dma_read_request(0, 0)
    with pytest.raises(vu.RequestError):
        conn.dma_read_request(0, conn.client_caps.max_data_xfer_size + 1)
    with pytest.raises(vu.RequestError):
        conn.dma_write_request(vu.U64_MAX, b"ab")


# -- reply payloads ----------------------------------------------------------------


def test_region_info_payload_without_caps() -> None:
    payload = region_info_payload(REGION_INFO.size, 0, RegionFlags.READ | RegionFlags.WRITE, 256)
    assert REGION_INFO.unpack(payload) == (REGION_INFO.size, 3, 0, 0, 256, 0)


def test_region_info_payload_is_cut_to_argsz_but_reports_full_size() -> None:
    areas = ((0, 0x100000), (0x200000, 0x1000))
    full_size = REGION_INFO.size + CAP_HEADER.size + SPARSE_MMAP_HEADER.size + 2 * SPARSE_MMAP_AREA.size
    flags = RegionFlags.READ | RegionFlags.WRITE | RegionFlags.MMAP

    short = region_info_payload(REGION_INFO.size, 2, flags, 0x400000, 0, areas)
    assert len(short) == REGION_INFO.size
    argsz, got_flags, index, cap_offset, size, offset = REGION_INFO.unpack(short)
    assert argsz == full_size
    assert got_flags == flags | RegionFlags.CAPS
    assert (index, cap_offset, size, offset) == (2, REGION_INFO.size, 0x400000, 0)

    middle = region_info_payload(REGION_INFO.size + 10, 2, flags, 0x400000, 0, areas)
    assert middle == region_info_payload(full_size, 2, flags, 0x400000, 0, areas)[:REGION_INFO.size + 10]

    full = region_info_payload(full_size + 100, 2, flags, 0x400000, 0, areas)
    assert len(full) == full_size
    pos = REGION_INFO.size
    assert CAP_HEADER.unpack_from(full, pos) == (1, 1, 0)  # id sparse-mmap, version 1, last cap
    pos += CAP_HEADER.size
    assert SPARSE_MMAP_HEADER.unpack_from(full, pos) == (2, 0)
    pos += SPARSE_MMAP_HEADER.size
    assert SPARSE_MMAP_AREA.unpack_from(full, pos) == (0, 0x100000)
    assert SPARSE_MMAP_AREA.unpack_from(full, pos + SPARSE_MMAP_AREA.size) == (0x200000, 0x1000)


def test_region_info_payload_never_shorter_than_the_fixed_part() -> None:
    assert len(region_info_payload(0, 1, RegionFlags.READ, 16)) == REGION_INFO.size


# -- property tests ----------------------------------------------------------------


EVENT_TYPES = (Request, Rejected, ServerReplyReceived)


def feed_garbage(conn: ServerConnection, chunks: list[bytes]) -> None:
    try:
        for chunk in chunks:
            conn.receive_data(chunk)
            for _ in range(len(chunk) + 1):
                event = conn.next_event()
                if event is NEED_DATA:
                    break
                assert isinstance(event, EVENT_TYPES), event
        conn.receive_data(b"")
        while (event := conn.next_event()) is not NEED_DATA:
            assert isinstance(event, EVENT_TYPES), event
    except ProtocolError:
        assert conn.state is State.CLOSED


def message_like() -> st.SearchStrategy[bytes]:
    """Headers that are mostly sane, so the parsers behind them are reached."""
    return st.builds(
        lambda msg_id, cmd, flags, payload: build_message(msg_id, cmd, payload, flags=flags),
        st.integers(0, 0xFFFF),
        st.integers(0, 20),
        st.sampled_from([0, 1, vu.FLAG_NO_REPLY, vu.FLAG_ERROR | 1, 0x40]),
        st.binary(max_size=64),
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=80), message_like()), max_size=6))
def test_garbage_to_ready_connection_yields_only_events_or_protocol_error(chunks: list[bytes]) -> None:
    feed_garbage(ready(), chunks)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=80), message_like()), max_size=4))
def test_garbage_before_version_yields_only_events_or_protocol_error(chunks: list[bytes]) -> None:
    feed_garbage(ServerConnection(), chunks)


@settings(max_examples=200, deadline=None)
@given(
    msg_id=st.integers(0, 0xFFFF),
    region=st.integers(0, 0xFFFFFFFF),
    data=st.binary(min_size=1, max_size=512),
    offset=st.integers(0, vu.U64_MAX),
    no_reply=st.booleans(),
)
def test_region_write_round_trip(msg_id: int, region: int, data: bytes, offset: int, no_reply: bool) -> None:
    offset = min(offset, (1 << 64) - len(data))
    conn = ready()
    flags = vu.FLAG_NO_REPLY if no_reply else 0
    msg = region_write(msg_id, offset, region, data, flags=flags)
    # Whole, and split at an arbitrary point, give the same request.
    event = one_event(conn, msg)
    assert isinstance(event, Request)
    assert event.command is Command.REGION_WRITE
    assert event.body == RegionWrite(region, offset, data)
    assert (event.id, event.no_reply, event.size) == (msg_id, no_reply, len(msg))
    cut = len(msg) // 2
    conn.receive_data(msg[:cut])
    assert conn.next_event() is NEED_DATA
    assert one_event(conn, msg[cut:]) == event
