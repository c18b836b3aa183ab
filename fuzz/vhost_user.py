"""vhost-user, the back-end side: MessageReader framing and the payload parsers,
on a chunked stream with fds.

Documented outcomes: messages, and `VhostUserProtocolError` from the reader (the
connection ends) or from a parser (the message is refused).  Checked besides:
every fd handed in comes back exactly once (with a message or from
`take_stray_fds`), the reader never holds more than one message, the messages
are the stream's bytes cut up, and what a parser accepts its builder
writes back to the same values.
"""

from __future__ import annotations

from collections.abc import Callable

from fuzz import FdCounter, chunks
from qbackend.protocol import vhost_user as vu

_LAYOUTS: tuple[Callable[[bytes], vu.VringState | vu.VringAddr | vu.ConfigSpace | vu.Inflight | vu.LogArea], ...] = (
    vu.VringState.parse, vu.VringAddr.parse, vu.ConfigSpace.parse, vu.Inflight.parse, vu.LogArea.parse)


def _parse_all(msg: vu.Message) -> None:
    """Every parser on every payload: each returns or refuses, and round-trips what it returns."""
    payload = msg.payload
    try:
        assert vu.u64(vu.parse_u64(payload)) == payload
    except vu.VhostUserProtocolError:
        pass
    for parse in _LAYOUTS:
        try:
            parsed = parse(payload)
        except vu.VhostUserProtocolError:
            continue
        # Padding (Inflight's 4 tail bytes) is not read, so compare what was read.
        packed = parsed.pack()
        assert len(packed) == len(payload) and parse(packed) == parsed, parsed
    try:
        index, has_fd = vu.parse_vring_fd(payload)
    except vu.VhostUserProtocolError:
        pass
    else:
        assert vu.vring_fd(index, has_fd) == payload
        try:
            assert vu.parse_vring_file(msg) == (index, msg.fds[0] if has_fd else None)
        except vu.VhostUserProtocolError:
            assert len(msg.fds) != has_fd
    try:
        table = vu.parse_memory_table(payload, msg.fds)
    except vu.VhostUserProtocolError:
        pass
    else:
        assert len(table) == len(msg.fds) <= vu.VHOST_MEMORY_BASELINE_NREGIONS
        assert vu.parse_memory_table(vu.memory_table(table), msg.fds) == table
        for r in table:
            assert r.memory_size and r.guest_phys_addr + r.memory_size <= 1 << 64
    try:
        single = vu.parse_single_region(payload)
    except vu.VhostUserProtocolError:
        pass
    else:
        assert vu.parse_single_region(vu.single_region(single)) == single
    # What the back end would answer reads back as a reply to the same request.
    reply = vu.MessageReader().feed(vu.reply_ack(msg.request, True))
    assert len(reply) == 1 and reply[0].request == msg.request and reply[0].is_reply


def test_one_input(data: bytes) -> None:
    reader = vu.MessageReader()
    fds = FdCounter()
    fed = bytearray()
    out = bytearray()
    alive = True
    for chunk, nfds in chunks(data):
        try:
            messages = reader.feed(chunk, fds.new(nfds))
        except vu.VhostUserProtocolError:
            assert reader.broken
            alive = False
            break
        fed += chunk
        for msg in messages:
            assert msg.version == vu.VERSION and len(msg.payload) <= vu.MAX_PAYLOAD
            assert len(msg.fds) <= vu.MAX_FDS
            out += msg.pack()
            fds.back(msg.fds)
            _parse_all(msg)
        assert reader.buffered <= vu.HEADER_SIZE + vu.MAX_PAYLOAD
        # The messages and the incomplete one are exactly the bytes fed so far.
        assert bytes(out) == bytes(fed[:len(out)]) and len(out) + reader.buffered == len(fed)
    if alive:
        try:
            reader.end_of_stream()
        except vu.VhostUserProtocolError:
            assert reader.buffered
    fds.back(reader.take_stray_fds())
    fds.check()
