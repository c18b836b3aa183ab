"""vfio-user, the server side: MessageReader framing, ServerConnection state and the
serve_access() fast path, on a chunked stream with fds.

Documented outcomes: events, `ProtocolError` (the connection ends) and, for the
DMA helpers, `RequestError`.  Checked besides: every fd handed in comes back
exactly once (with an event, an error, or `take_fds` at the end), and what the
fast path serves is exactly what the general path would hand out.
"""

from __future__ import annotations

from fuzz import FdCounter, chunks
from qbackend.protocol import vfio_user as vu


def _check_reply(reply: bytes, msg_id: int | None = None) -> None:
    if reply:
        hdr = vu.Header(*vu.HEADER.unpack_from(reply))
        assert hdr.size == len(reply), (hdr, len(reply))
        assert hdr.type == vu.TYPE_REPLY, hdr
        assert msg_id is None or hdr.id == msg_id, (hdr, msg_id)


def _serve_accesses(conn: vu.ServerConnection, chunk: bytes) -> int:
    """Serve whole region accesses at the front of `chunk`; how many bytes they took."""
    done: list[vu.Body] = []

    def read(region: int, offset: int, count: int) -> bytes:
        done.append(vu.RegionRead(region, offset, count))
        return bytes(count)

    def write(region: int, offset: int, data: bytes) -> None:
        done.append(vu.RegionWrite(region, offset, data))

    pos = 0
    while (reply := conn.serve_access(chunk, pos, len(chunk), read, write)) is not None:
        end = conn.access_end
        assert pos < end <= len(chunk), (pos, end)
        # The general path would have accepted this message and handed out the same access.
        hdr = vu.Header(*vu.HEADER.unpack_from(chunk, pos))
        assert hdr.size == end - pos and hdr.flags in (0, vu.FLAG_NO_REPLY), hdr
        body = vu.parse_body(vu.Command(hdr.command), chunk[pos + vu.HEADER_SIZE:end], 0,
                             conn.server_caps.max_data_xfer_size)
        assert done[-1:] == [body], (done, body)
        assert (reply == b"") == hdr.no_reply, (hdr, reply)
        _check_reply(reply, hdr.id)
        pos = end
    return pos


def _drain(conn: vu.ServerConnection, fds: FdCounter) -> bool:
    """Take events until more data is needed (True) or the connection ended (False)."""
    while True:
        try:
            event = conn.next_event()
        except vu.ProtocolError as exc:
            fds.back(exc.fds)
            _check_reply(exc.reply)
            return False
        if isinstance(event, vu.NeedData):
            return True
        fds.back(event.fds)
        if isinstance(event, vu.Request):
            if event.command is vu.Command.VERSION:
                assert conn.state is vu.State.READY
                _check_reply(conn.version_reply(event), event.id)
                _dma(conn)
            elif event.command is vu.Command.DEVICE_RESET:
                _dma(conn)
            _check_reply(conn.reply(event, b"\0" * 8), event.id)
            _check_reply(conn.error_reply(event, 22), event.id)
        elif isinstance(event, vu.Rejected):
            _check_reply(event.reply, event.id)
        elif event.command == vu.Command.DMA_READ and not event.error:
            try:
                vu.parse_dma_read_reply(event.payload, 8)
            except vu.RequestError:
                pass


def _dma(conn: vu.ServerConnection) -> None:
    """Server-initiated requests, so that the peer's replies have something to match."""
    try:
        conn.dma_read_request(0x1000, 8)
        conn.dma_write_request(0x2000, b"\1" * 8)
    except vu.RequestError:
        pass


def test_one_input(data: bytes) -> None:
    conn = vu.ServerConnection()
    fds = FdCounter()
    alive = True
    for chunk, nfds in chunks(data):
        given = fds.new(nfds)
        if not given:
            chunk = chunk[_serve_accesses(conn, chunk):]
        if chunk:
            conn.receive_data(chunk, given)
        alive = _drain(conn, fds)
        if not alive:
            break
    if alive:
        conn.receive_data(b"")
        _drain(conn, fds)
    fds.back(conn.reader.take_fds())
    fds.check()
