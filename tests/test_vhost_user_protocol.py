"""Unit tests of the sans-IO vhost-user codec (protocol/vhost_user.py).

No sockets, no QEMU: bytes in, messages out.  File descriptors are plain
integers, as the protocol layer never touches them.  The tests play the
front end with the module's own request builders, and check the wire
numbers against the spec (docs/interop/vhost-user.rst).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.protocol import vhost_user as vu
from qbackend.protocol.vhost_user import (
    FLAG_NEED_REPLY,
    FLAG_REPLY,
    HEADER,
    HEADER_SIZE,
    MAX_FDS,
    MAX_PAYLOAD,
    VERSION,
    ConfigSpace,
    FrontendRequest,
    Inflight,
    LogArea,
    MemoryRegion,
    Message,
    MessageReader,
    ProtocolFeature,
    VhostUserProtocolError,
    VringAddr,
    VringState,
    build_reply,
    build_request,
)

# -- helpers -----------------------------------------------------------------------


def one(reader: MessageReader, data: bytes, fds: tuple[int, ...] = ()) -> Message:
    messages = reader.feed(data, fds)
    assert len(messages) == 1, messages
    assert reader.buffered == 0
    return messages[0]


def region(gpa: int = 0, size: int = 0x10000, uva: int = 0x7F0000000000, offset: int = 0) -> MemoryRegion:
    return MemoryRegion(gpa, size, uva, offset)


def raw(request: int, flags: int, payload: bytes = b"", size: int | None = None) -> bytes:
    return HEADER.pack(request, flags, len(payload) if size is None else size) + payload


class KernelStream:
    """A unix stream socket as Linux delivers it: each sendmsg() is one segment;
    recvmsg() copies up to n bytes across segments, takes a segment's fds on the
    first read that touches it, and stops right after a segment with fds."""

    def __init__(self) -> None:
        self.segments: list[list[object]] = []  # [bytes, fds]

    def send(self, data: bytes, fds: tuple[int, ...] = ()) -> None:
        self.segments.append([data, fds])

    def recv(self, n: int) -> tuple[bytes, tuple[int, ...]]:
        out, got = bytearray(), ()
        while self.segments and len(out) < n:
            seg = self.segments[0]
            data, fds = seg
            assert isinstance(data, bytes) and isinstance(fds, tuple)
            take = data[:n - len(out)]
            out += take
            if fds:
                got, seg[1] = fds, ()
            if len(take) < len(data):
                seg[0] = data[len(take):]
                break
            self.segments.pop(0)
            if got:
                break
        return bytes(out), got


# -- wire numbers --------------------------------------------------------------------


def test_request_numbers_are_the_specs() -> None:
    spec = {
        "GET_FEATURES": 1, "SET_FEATURES": 2, "SET_OWNER": 3, "RESET_OWNER": 4, "SET_MEM_TABLE": 5,
        "SET_LOG_BASE": 6, "SET_LOG_FD": 7, "SET_VRING_NUM": 8, "SET_VRING_ADDR": 9, "SET_VRING_BASE": 10,
        "GET_VRING_BASE": 11, "SET_VRING_KICK": 12, "SET_VRING_CALL": 13, "SET_VRING_ERR": 14,
        "GET_PROTOCOL_FEATURES": 15, "SET_PROTOCOL_FEATURES": 16, "GET_QUEUE_NUM": 17, "SET_VRING_ENABLE": 18,
        "SEND_RARP": 19, "NET_SET_MTU": 20, "SET_BACKEND_REQ_FD": 21, "IOTLB_MSG": 22, "SET_VRING_ENDIAN": 23,
        "GET_CONFIG": 24, "SET_CONFIG": 25, "CREATE_CRYPTO_SESSION": 26, "CLOSE_CRYPTO_SESSION": 27,
        "POSTCOPY_ADVISE": 28, "POSTCOPY_LISTEN": 29, "POSTCOPY_END": 30, "GET_INFLIGHT_FD": 31,
        "SET_INFLIGHT_FD": 32, "GPU_SET_SOCKET": 33, "RESET_DEVICE": 34, "VRING_KICK": 35,
        "GET_MAX_MEM_SLOTS": 36, "ADD_MEM_REG": 37, "REM_MEM_REG": 38, "SET_STATUS": 39, "GET_STATUS": 40,
        "GET_SHARED_OBJECT": 41, "SET_DEVICE_STATE_FD": 42, "CHECK_DEVICE_STATE": 43, "GET_SHMEM_CONFIG": 44,
    }
    assert {r.name: r.value for r in FrontendRequest} == spec


def test_protocol_feature_bits_are_the_specs() -> None:
    bits = ["MQ", "LOG_SHMFD", "RARP", "REPLY_ACK", "NET_MTU", "BACKEND_REQ", "CROSS_ENDIAN", "CRYPTO_SESSION",
            "PAGEFAULT", "CONFIG", "BACKEND_SEND_FD", "HOST_NOTIFIER", "INFLIGHT_SHMFD", "RESET_DEVICE",
            "INBAND_NOTIFICATIONS", "CONFIGURE_MEM_SLOTS", "STATUS", "XEN_MMAP", "SHARED_OBJECT", "DEVICE_STATE",
            "SHMEM"]
    assert {f.name: f.value for f in ProtocolFeature} == {name: 1 << bit for bit, name in enumerate(bits)}


def test_other_constants() -> None:
    assert HEADER_SIZE == 12
    assert (VERSION, FLAG_REPLY, FLAG_NEED_REPLY) == (1, 4, 8)
    assert vu.VHOST_USER_F_PROTOCOL_FEATURES == 1 << 30
    assert vu.VHOST_VRING_F_LOG == 1
    assert (vu.VHOST_USER_VRING_IDX_MASK, vu.VHOST_USER_VRING_NOFD_MASK) == (0xFF, 0x100)
    assert vu.VHOST_MEMORY_BASELINE_NREGIONS == 8
    # The layouts' sizes, as the C structs (and QEMU's hdr.size) have them.
    assert (vu.VRING_STATE.size, vu.VRING_ADDR.size, vu.MEMORY_REGION.size, vu.INFLIGHT.size, vu.LOG.size) == (
        8, 40, 32, 24, 16)
    # Room for the biggest payloads: a full memory table, a whole config read.
    assert MAX_PAYLOAD >= 8 + 8 * 32 and MAX_PAYLOAD >= 12 + 256


# -- framing -----------------------------------------------------------------------


def test_request_round_trip() -> None:
    data = build_request(FrontendRequest.SET_FEATURES, vu.u64(1 << 30 | 1), need_reply=True)
    assert data == struct.pack("=IIIQ", 2, VERSION | FLAG_NEED_REPLY, 8, 1 << 30 | 1)
    msg = one(MessageReader(), data)
    assert msg.request is FrontendRequest.SET_FEATURES and msg.name == "SET_FEATURES"
    assert msg.need_reply and not msg.is_reply and msg.version == VERSION
    assert vu.parse_u64(msg.payload) == 1 << 30 | 1
    assert msg.pack() == data


def test_reply_flags_are_exactly_version_and_reply() -> None:
    # QEMU refuses a reply whose flags are anything else.
    reply = vu.reply_u64(FrontendRequest.GET_FEATURES, 0x1234)
    assert reply == struct.pack("=IIIQ", 1, VERSION | FLAG_REPLY, 8, 0x1234)
    msg = one(MessageReader(), reply)
    assert msg.is_reply and not msg.need_reply


def test_reply_builders() -> None:
    reader = MessageReader()
    msg = one(reader, vu.reply_vring_state(3, 0x8001))
    assert msg.request is FrontendRequest.GET_VRING_BASE and VringState.parse(msg.payload) == VringState(3, 0x8001)
    msg = one(reader, vu.reply_config(0, 4, 0, b"\1\2\3\4"))
    assert msg.request is FrontendRequest.GET_CONFIG
    assert vu.parse_config(msg.payload) == ConfigSpace(0, 4, 0, b"\1\2\3\4")
    assert one(reader, vu.reply_config_error()).payload == b""
    ok = one(reader, vu.reply_ack(FrontendRequest.SET_VRING_NUM, True))
    bad = one(reader, vu.reply_ack(FrontendRequest.SET_VRING_NUM, False))
    assert ok.request is bad.request is FrontendRequest.SET_VRING_NUM
    assert vu.parse_u64(ok.payload) == 0 and vu.parse_u64(bad.payload) != 0
    assert all(m.flags == VERSION | FLAG_REPLY for m in (ok, bad))


def test_zero_payload_messages_and_several_per_chunk() -> None:
    data = b"".join(build_request(r) for r in (FrontendRequest.GET_FEATURES, FrontendRequest.SET_OWNER,
                                                FrontendRequest.GET_PROTOCOL_FEATURES))
    messages = MessageReader().feed(data)
    assert [m.request for m in messages] == [1, 3, 15]
    assert all(m.payload == b"" and m.fds == () for m in messages)


def test_unknown_request_numbers_are_kept() -> None:
    reader = MessageReader()
    for number in (0, 45, 99, 0xFFFFFFFF):
        msg = one(reader, build_request(number, b"xyz"))
        assert msg.request == number and type(msg.request) is int
        assert msg.name == f"request {number}" and msg.payload == b"xyz"
    # The back-end channel's numbers, with a reader told so.
    msg = one(MessageReader(requests=vu.BackendRequest), build_request(vu.BackendRequest.CONFIG_CHANGE_MSG))
    assert msg.request is vu.BackendRequest.CONFIG_CHANGE_MSG


def test_split_byte_by_byte() -> None:
    stream = [
        (build_request(FrontendRequest.GET_FEATURES), ()),
        (build_request(FrontendRequest.SET_VRING_KICK, vu.vring_fd(1)), (7,)),
        (build_request(FrontendRequest.SET_MEM_TABLE, vu.memory_table([region(), region(0x100000)])), (8, 9)),
        (build_request(FrontendRequest.SET_VRING_ADDR, vu.vring_addr(0, 1, 2, 3)), ()),
    ]
    reader = MessageReader()
    got: list[Message] = []
    for data, fds in stream:
        for i in range(len(data)):
            # The front end sends a message's fds with its first byte.
            got += reader.feed(data[i:i + 1], fds if i == 0 else ())
            if i < len(data) - 1:
                assert reader.buffered == i + 1
    assert [(m.pack(), m.fds) for m in got] == stream


def test_fds_go_with_the_message_whose_header_they_came_with() -> None:
    first = build_request(FrontendRequest.SET_VRING_CALL, vu.vring_fd(0))
    second = build_request(FrontendRequest.SET_VRING_CALL, vu.vring_fd(1))
    reader = MessageReader()
    # libvhost-user style: the 12 header bytes (with the fds), then the payload.
    assert reader.feed(first[:HEADER_SIZE], (5,)) == []
    msg = one(reader, first[HEADER_SIZE:])
    assert msg.fds == (5,) and vu.parse_vring_file(msg) == (0, 5)
    # One read that glues the end of an fd-less message to the next one's header:
    # the fds are the second message's (the chunk's last byte is in it).
    reader.feed(first[:5])
    assert reader.feed(first[5:] + second[:3], (6,)) == [Message(FrontendRequest.SET_VRING_CALL, VERSION,
                                                                 vu.vring_fd(0))]
    msg = one(reader, second[3:])
    assert vu.parse_vring_file(msg) == (1, 6)


def test_fds_arriving_with_a_message_end() -> None:
    kick = build_request(FrontendRequest.SET_VRING_KICK, vu.vring_fd(2))
    messages = MessageReader().feed(build_request(FrontendRequest.GET_FEATURES) + kick, (4,))
    assert [m.fds for m in messages] == [(), (4,)]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([FrontendRequest.SET_VRING_KICK, FrontendRequest.GET_FEATURES,
                                           FrontendRequest.SET_MEM_TABLE, FrontendRequest.SET_CONFIG, 77]),
                          st.integers(0, 3), st.binary(max_size=300)), min_size=1, max_size=8),
       st.lists(st.integers(1, 400), min_size=1, max_size=40))
def test_kernel_delivery_keeps_fds_with_their_message(specs: list[tuple[int, int, bytes]],
                                                      reads: list[int]) -> None:
    stream = KernelStream()
    sent = []
    next_fd = 100
    for request, nfds, payload in specs:
        fds = tuple(range(next_fd, next_fd + nfds))
        next_fd += nfds
        data = build_request(request, payload)
        stream.send(data, fds)
        sent.append((data, fds))
    reader = MessageReader()
    got: list[Message] = []
    i = 0
    while stream.segments:
        data, fds = stream.recv(reads[i % len(reads)])
        i += 1
        got += reader.feed(data, fds)
        assert reader.buffered <= HEADER_SIZE + MAX_PAYLOAD
    assert [(m.pack(), m.fds) for m in got] == sent
    assert reader.take_stray_fds() == []


def test_oversized_size_is_refused_at_the_header() -> None:
    reader = MessageReader()
    # Only the header is needed to refuse it: nothing of the payload is buffered.
    with pytest.raises(VhostUserProtocolError, match="over the 4096-byte limit"):
        reader.feed(raw(FrontendRequest.SET_CONFIG, VERSION, size=MAX_PAYLOAD + 1), (3,))
    assert reader.broken and reader.buffered == 0
    assert reader.take_stray_fds() == [3]
    # The limit itself is fine.
    msg = one(MessageReader(), build_request(FrontendRequest.SET_CONFIG, bytes(MAX_PAYLOAD)))
    assert len(msg.payload) == MAX_PAYLOAD
    with pytest.raises(VhostUserProtocolError):
        MessageReader().feed(raw(99, VERSION, size=0xFFFFFFFF))
    with pytest.raises(ValueError):
        build_request(FrontendRequest.SET_CONFIG, bytes(MAX_PAYLOAD + 1))


@pytest.mark.parametrize("version", [0, 2, 3])
def test_bad_version_is_refused(version: int) -> None:
    reader = MessageReader()
    with pytest.raises(VhostUserProtocolError, match=f"version {version}"):
        reader.feed(raw(FrontendRequest.GET_FEATURES, version | FLAG_NEED_REPLY))
    # Broken for good: later bytes are refused, their fds kept for the caller.
    with pytest.raises(VhostUserProtocolError):
        reader.feed(build_request(FrontendRequest.GET_FEATURES), (11,))
    assert reader.take_stray_fds() == [11]


def test_error_hands_back_every_fd_of_the_failing_feed() -> None:
    reader = MessageReader()
    assert reader.feed(build_request(FrontendRequest.SET_VRING_CALL, vu.vring_fd(0))[:4], (1,)) == []
    data = (build_request(FrontendRequest.SET_VRING_CALL, vu.vring_fd(0))[4:]
            + build_request(FrontendRequest.SET_VRING_KICK, vu.vring_fd(0))
            + raw(FrontendRequest.GET_FEATURES, 2))
    with pytest.raises(VhostUserProtocolError):
        reader.feed(data, (2, 3))
    # The message completed before the bad header is not returned: its fd (1) is a stray,
    # as are those that came with the failing chunk.
    assert sorted(reader.take_stray_fds()) == [1, 2, 3]
    assert reader.take_stray_fds() == []


def test_too_many_fds_for_one_message() -> None:
    reader = MessageReader()
    data = build_request(FrontendRequest.SET_MEM_TABLE, vu.memory_table([region()]))
    reader.feed(data[:3], tuple(range(MAX_FDS)))
    with pytest.raises(VhostUserProtocolError, match="over the limit"):
        reader.feed(data[3:], (99,))
    assert sorted(reader.take_stray_fds()) == [*range(MAX_FDS), 99]


def test_fds_without_data_are_refused() -> None:
    reader = MessageReader()
    assert reader.feed(b"") == []
    with pytest.raises(VhostUserProtocolError, match="without a byte"):
        reader.feed(b"", (4,))
    assert reader.take_stray_fds() == [4]


def test_end_of_stream() -> None:
    reader = MessageReader()
    reader.feed(build_request(FrontendRequest.GET_FEATURES))
    reader.end_of_stream()  # at a boundary: fine
    reader.feed(build_request(FrontendRequest.SET_VRING_KICK, vu.vring_fd(0))[:14], (9,))
    with pytest.raises(VhostUserProtocolError, match="ended inside a message"):
        reader.end_of_stream()
    assert reader.take_stray_fds() == [9]


def test_reader_holds_one_message_at_most() -> None:
    reader = MessageReader()
    big = build_request(FrontendRequest.SET_CONFIG, vu.config(0, 256, data=bytes(range(256))))
    messages = reader.feed(big * 50 + big[:100])
    assert len(messages) == 50 and reader.buffered == 100
    assert len(reader._buffer) <= HEADER_SIZE + MAX_PAYLOAD


# -- payloads ----------------------------------------------------------------------


@given(st.integers(0, (1 << 64) - 1))
def test_u64_round_trip(value: int) -> None:
    assert vu.parse_u64(vu.u64(value)) == value


@pytest.mark.parametrize("length", [0, 4, 7, 9, 16])
def test_u64_wrong_size(length: int) -> None:
    with pytest.raises(VhostUserProtocolError, match="not 8"):
        vu.parse_u64(bytes(length))


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF))
def test_vring_state_round_trip(index: int, num: int) -> None:
    assert vu.parse_vring_state(vu.vring_state(index, num)) == VringState(index, num)


u64s = st.integers(0, (1 << 64) - 1)


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), u64s, u64s, u64s, u64s)
def test_vring_addr_round_trip(index: int, flags: int, desc: int, used: int, avail: int, log: int) -> None:
    addr = vu.parse_vring_addr(vu.vring_addr(index, desc, used, avail, log, flags))
    assert addr == VringAddr(index, flags, desc, used, avail, log)
    assert addr.log == bool(flags & 1)


def test_vring_state_and_addr_wrong_size() -> None:
    with pytest.raises(VhostUserProtocolError, match="vring state"):
        VringState.parse(bytes(12))
    with pytest.raises(VhostUserProtocolError, match="vring address"):
        VringAddr.parse(bytes(48))  # the old spec table's phantom "size" field


@given(st.integers(0, 255), st.booleans())
def test_vring_fd_round_trip(index: int, has_fd: bool) -> None:
    assert vu.parse_vring_fd(vu.vring_fd(index, has_fd)) == (index, has_fd)


def test_vring_file_checks_the_fd_against_the_nofd_bit() -> None:
    kick = FrontendRequest.SET_VRING_KICK
    assert vu.parse_vring_file(Message(kick, VERSION, vu.vring_fd(3), (10,))) == (3, 10)
    assert vu.parse_vring_file(Message(kick, VERSION, vu.vring_fd(3, has_fd=False))) == (3, None)
    with pytest.raises(VhostUserProtocolError, match="0 fds, not 1"):
        vu.parse_vring_file(Message(kick, VERSION, vu.vring_fd(3)))
    with pytest.raises(VhostUserProtocolError, match="1 fds, not 0"):
        vu.parse_vring_file(Message(kick, VERSION, vu.vring_fd(3, has_fd=False), (10,)))
    with pytest.raises(VhostUserProtocolError, match="above bit 8"):
        vu.parse_vring_fd(vu.u64(1 << 9))
    with pytest.raises(ValueError):
        vu.vring_fd(256)


regions = st.builds(lambda gpa, size, uva, off: MemoryRegion(gpa, size, uva, off),
                    st.integers(0, 1 << 48), st.integers(1, 1 << 40), st.integers(0, 1 << 47), u64s)


@given(st.lists(regions, max_size=8), st.booleans())
def test_memory_table_round_trip(table: list[MemoryRegion], full: bool) -> None:
    payload = vu.memory_table(table, full=full)
    assert len(payload) == 8 + 32 * (8 if full else len(table))
    fds = tuple(range(20, 20 + len(table)))
    assert vu.parse_memory_table(payload, fds) == tuple(table)


def test_memory_table_as_qemu_sends_it() -> None:
    # QEMU: hdr.size = 8 + nregions * 32, one fd per region, in order.
    payload = struct.pack("=II", 2, 0) + struct.pack("=QQQQ", 0, 0xA0000, 0x7F0000000000, 0) + struct.pack(
        "=QQQQ", 0xC0000, 0x3FF40000, 0x7F00000C0000, 0xC0000)
    msg = one(MessageReader(), build_request(FrontendRequest.SET_MEM_TABLE, payload), (30, 31))
    table = vu.parse_memory_table(msg.payload, msg.fds)
    assert table == (MemoryRegion(0, 0xA0000, 0x7F0000000000, 0),
                     MemoryRegion(0xC0000, 0x3FF40000, 0x7F00000C0000, 0xC0000))


def test_memory_table_refusals() -> None:
    one_region = vu.memory_table([region()])
    with pytest.raises(VhostUserProtocolError, match="over the 8"):
        vu.parse_memory_table(struct.pack("=II", 9, 0) + bytes(9 * 32), range(9))
    with pytest.raises(VhostUserProtocolError, match="came with 0 fds"):
        vu.parse_memory_table(one_region, ())
    with pytest.raises(VhostUserProtocolError, match="came with 2 fds"):
        vu.parse_memory_table(one_region, (1, 2))
    with pytest.raises(VhostUserProtocolError, match="is empty"):
        vu.parse_memory_table(vu.memory_table([region(), region(0x100000, size=0)]), (1, 2))
    with pytest.raises(VhostUserProtocolError, match="wraps the guest"):
        vu.parse_memory_table(vu.memory_table([region(gpa=(1 << 64) - 0x1000, size=0x2000)]), (1,))
    with pytest.raises(VhostUserProtocolError, match="wraps 64 bits"):
        vu.parse_memory_table(vu.memory_table([region(uva=(1 << 64) - 0x1000, size=0x2000)]), (1,))
    # The end of the guest address space exactly is fine.
    vu.parse_memory_table(vu.memory_table([region(gpa=(1 << 64) - 0x2000, size=0x2000)]), (1,))
    with pytest.raises(VhostUserProtocolError, match="shorter than its 8-byte header"):
        vu.parse_memory_table(b"\1\0\0\0", (1,))
    with pytest.raises(VhostUserProtocolError, match="8 \\+ 32 per region"):
        vu.parse_memory_table(one_region[:-1], (1,))  # a partial slot
    with pytest.raises(VhostUserProtocolError, match="8 \\+ 32 per region"):
        vu.parse_memory_table(struct.pack("=II", 2, 0) + region().pack(), (1, 2))  # fewer slots than regions
    with pytest.raises(VhostUserProtocolError, match="8 \\+ 32 per region"):
        vu.parse_memory_table(one_region + bytes(8 * 32), (1,))  # nine slots
    with pytest.raises(ValueError):
        vu.memory_table([region()] * 9)


def test_empty_memory_table() -> None:
    assert vu.parse_memory_table(vu.memory_table([]), ()) == ()


@given(regions)
def test_single_region_round_trip(r: MemoryRegion) -> None:
    payload = vu.single_region(r)
    assert len(payload) == 40 and payload[:8] == bytes(8)
    assert vu.parse_single_region(payload) == r


def test_single_region_refusals_and_fds() -> None:
    with pytest.raises(VhostUserProtocolError, match="not 40"):
        vu.parse_single_region(region().pack())  # no padding word
    with pytest.raises(VhostUserProtocolError, match="is empty"):
        vu.parse_single_region(vu.single_region(region(size=0)))
    add = Message(FrontendRequest.ADD_MEM_REG, VERSION, vu.single_region(region()), (5,))
    vu.require_fds(add, 1)
    with pytest.raises(VhostUserProtocolError, match="ADD_MEM_REG came with 0 fds, not 1"):
        vu.require_fds(Message(FrontendRequest.ADD_MEM_REG, VERSION, add.payload), 1)
    # REM_MEM_REG: no fd, or (tolerated) one.
    vu.require_fds(Message(FrontendRequest.REM_MEM_REG, VERSION, add.payload), 0, 1)


@given(st.integers(0, 0xFFFFFFFF), st.binary(max_size=256), st.sampled_from([0, 1]))
def test_config_round_trip(offset: int, data: bytes, flags: int) -> None:
    payload = vu.config(offset, len(data), flags, data)
    assert vu.parse_config(payload) == ConfigSpace(offset, len(data), flags, data)


def test_config_request_placeholder() -> None:
    assert vu.config(0, 8) == struct.pack("=III", 0, 8, 0) + bytes(8)


def test_config_refusals() -> None:
    with pytest.raises(VhostUserProtocolError, match="4 bytes with 3 bytes"):
        vu.parse_config(struct.pack("=III", 0, 4, 0) + b"abc")
    with pytest.raises(VhostUserProtocolError, match="4 bytes with 5 bytes"):
        vu.parse_config(struct.pack("=III", 0, 4, 0) + b"abcde")
    with pytest.raises(VhostUserProtocolError, match="over 256"):
        vu.parse_config(struct.pack("=III", 0, 257, 0) + bytes(257))
    with pytest.raises(VhostUserProtocolError, match="shorter than its 12-byte header"):
        vu.parse_config(b"\0" * 11)
    with pytest.raises(ValueError):
        vu.config(0, 4, 0, b"abc")
    with pytest.raises(ValueError):
        vu.config(0, 257)


@given(u64s, u64s, st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
def test_inflight_round_trip(size: int, offset: int, queues: int, qsize: int) -> None:
    payload = Inflight(size, offset, queues, qsize).pack()
    assert len(payload) == 24
    assert vu.parse_inflight(payload) == Inflight(size, offset, queues, qsize)


def test_inflight_tail_padding_is_not_read() -> None:
    payload = struct.pack("=QQHH", 0x4000, 0, 2, 256) + b"\xff" * 4
    assert vu.parse_inflight(payload) == Inflight(0x4000, 0, 2, 256)
    assert Inflight(0x4000, 0, 2, 256).pack()[20:] == bytes(4)


def test_inflight_and_log_wrong_size() -> None:
    with pytest.raises(VhostUserProtocolError, match="not 24"):
        vu.parse_inflight(bytes(20))  # the fields without C's tail padding
    assert vu.parse_log(LogArea(0x1000, 0).pack()) == LogArea(0x1000, 0)
    with pytest.raises(VhostUserProtocolError, match="not 16"):
        vu.parse_log(bytes(8))


def test_a_front_end_session() -> None:
    """The start of a QEMU session, as the back end's reader sees it."""
    kick, call, mem = 40, 41, 42
    stream = b"".join([
        build_request(FrontendRequest.GET_FEATURES),
        build_request(FrontendRequest.GET_PROTOCOL_FEATURES),
        build_request(FrontendRequest.SET_PROTOCOL_FEATURES,
                      vu.u64(ProtocolFeature.MQ | ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG)),
        build_request(FrontendRequest.SET_OWNER),
        build_request(FrontendRequest.GET_CONFIG, vu.config(0, 60)),
    ])
    reader = MessageReader()
    messages = reader.feed(stream)
    assert [m.request for m in messages] == [1, 15, 16, 3, 24]
    assert ConfigSpace.parse(messages[4].payload).size == 60
    messages = reader.feed(build_request(FrontendRequest.SET_MEM_TABLE, vu.memory_table([region()]),
                                         need_reply=True), (mem,))
    messages += reader.feed(build_request(FrontendRequest.SET_VRING_NUM, vu.vring_state(0, 256)))
    messages += reader.feed(build_request(FrontendRequest.SET_VRING_KICK, vu.vring_fd(0)), (kick,))
    messages += reader.feed(build_request(FrontendRequest.SET_VRING_CALL, vu.vring_fd(0)), (call,))
    assert [m.fds for m in messages] == [(mem,), (), (kick,), (call,)]
    assert messages[0].need_reply and FrontendRequest.SET_MEM_TABLE not in vu.REPLIES
    assert vu.parse_memory_table(messages[0].payload, messages[0].fds) == (region(),)
    assert [vu.parse_vring_file(m) for m in messages[2:]] == [(0, kick), (0, call)]
    assert build_reply(FrontendRequest.GET_FEATURES, vu.u64(1)) == vu.reply_u64(FrontendRequest.GET_FEATURES, 1)
