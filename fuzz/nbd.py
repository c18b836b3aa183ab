"""NBD, the server side: the fixed-newstyle handshake and the transmission phase.

The first byte picks the TLS policy (off, on, require); STARTTLS accepted is
followed by `tls_started()` as if the TLS handshake had happened.

Documented outcomes: events and `NbdProtocolError` (the connection is dropped).
Checked besides: a `Request` is valid for the negotiated export, as the module
promises (in range, within the limits, writable where it writes).
"""

from __future__ import annotations

from fuzz import chunks
from qbackend.protocol import nbd

EXPORTS = {
    "disk": nbd.ExportInfo("disk", 1 << 20, description="a writable disk"),
    "ro": nbd.ExportInfo("ro", 64 << 10, read_only=True, can_trim=False, can_multi_conn=False, max_block=4096),
}
_WRITES = (nbd.Cmd.WRITE, nbd.Cmd.TRIM, nbd.Cmd.WRITE_ZEROES)


def _check_request(conn: nbd.NbdServerConnection, req: nbd.Request) -> None:
    export = conn.export
    assert export is not None and conn.phase is nbd.Phase.TRANSMISSION
    assert not req.flags & ~nbd.ALLOWED_FLAGS[req.command], req
    assert len(req.data) == (req.length if req.command is nbd.Cmd.WRITE else 0), req
    if req.command is not nbd.Cmd.FLUSH:
        assert 0 < req.length and req.offset + req.length <= export.size, (req, export)
    if req.command in (nbd.Cmd.READ, nbd.Cmd.CACHE):
        assert req.length <= nbd.MAX_REQUEST, req
    if req.command in _WRITES:
        assert not export.read_only, (req, export)
    if req.command is nbd.Cmd.BLOCK_STATUS:
        assert conn.meta_contexts, req
    assert conn.error_reply(req.cookie, nbd.Errno.EIO, "fuzz")


def _drain(conn: nbd.NbdServerConnection) -> bool:
    while True:
        try:
            event = conn.next_event()
        except nbd.NbdProtocolError:
            return False
        if isinstance(event, nbd.NeedData):
            return True
        if isinstance(event, nbd.OptionHandled):
            assert event.reply
            if event.start_tls:
                try:
                    conn.tls_started()
                except nbd.NbdProtocolError:
                    return False
                assert conn.tls_active and not conn.structured
            if conn.phase is nbd.Phase.TRANSMISSION:
                negotiated = conn.negotiated()
                assert negotiated.export in EXPORTS.values()
                assert set(negotiated.meta_contexts) <= {nbd.BASE_ALLOCATION}
        elif isinstance(event, nbd.Request):
            _check_request(conn, event)
        elif isinstance(event, nbd.Rejected):
            assert event.reply


TLS = ("off", "on", "require")


def test_one_input(data: bytes) -> None:
    if not data:
        return
    conn = nbd.NbdServerConnection(exports=dict(EXPORTS), default_export="disk", tls=TLS[data[0] % len(TLS)])
    assert conn.greeting()
    for chunk, _nfds in chunks(data[1:]):
        conn.receive_data(chunk)
        if not _drain(conn):
            return
    conn.receive_data(b"")
    _drain(conn)
