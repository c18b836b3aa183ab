"""An NBD connection's handshake, in trio: the greeting, the option haggling,
STARTTLS.  A client that has not finished its handshake costs a task, not a
thread; the server bounds it with handshake_timeout (servers.nbd.server).

Until it ends a connection has no receive buffer of its own: each receive
is at most HANDSHAKE_RECV bytes, and the protocol keeps at most one option
of 64 KiB (docs/resources.md).  It ends with the chosen export, the
connection's receive buffer, its native requests started for it (when the
helpers and the export's read map are there), and, after STARTTLS,
`conn.sock` the TLS socket.
"""

from __future__ import annotations

import ssl

import trio

from qbackend.block.exports import Export
from qbackend.protocol import nbd
from qbackend.servers.nbd.connection import HANDSHAKE_RECV, Closed, NbdConnection, log
from qbackend.servers.nbd_fast import NativeRequests


async def negotiate(conn: NbdConnection) -> Export | None:
    """The export the client chose, or None when it ended (or broke the protocol)
    without choosing one."""
    try:
        await _send(conn, conn.protocol.greeting())
        return await _options(conn)
    except nbd.NbdProtocolError as exc:
        log.info("nbd %s: dropping the connection: %s", conn.peer, exc)
        conn.server.stats["protocol_errors"] += 1
        if exc.reply:
            try:
                await _send(conn, exc.reply)
            except Closed:
                pass
    except Closed:
        pass
    return None


async def _options(conn: NbdConnection) -> Export | None:
    protocol = conn.protocol
    while protocol.phase is not nbd.Phase.TRANSMISSION:
        event = protocol.next_event()
        if event is nbd.NEED_DATA:
            protocol.receive_data(await _receive(conn))
            continue
        assert isinstance(event, nbd.OptionHandled)
        await _send(conn, event.reply)
        if event.done:
            return None
        if event.start_tls:
            await _start_tls(conn)
    negotiated = protocol.negotiated()
    log.info("nbd %s: export %r (structured replies: %s, extended headers: %s, contexts: %s)", conn.peer,
             negotiated.export.name, negotiated.structured, protocol.extended,
             ", ".join(negotiated.meta_contexts) or "none")
    export = conn.server.exports.get(negotiated.export.name)
    if export is None:  # removed while this client negotiated
        raise Closed(f"export {negotiated.export.name!r} was removed")
    conn.export_name = negotiated.export.name
    mode = "extended" if protocol.extended else "structured" if negotiated.structured else "simple"
    conn.start_receiving()  # the receive buffer only now: a client still in its handshake costs little
    conn.native = NativeRequests.start(export, mode, conn.buffer)
    return export


async def _receive(conn: NbdConnection) -> bytes:
    while True:
        try:
            return conn.sock.recv(HANDSHAKE_RECV)
        except (BlockingIOError, ssl.SSLWantReadError):
            await trio.lowlevel.wait_readable(conn.sock)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(conn.sock)
        except OSError as exc:
            raise Closed(str(exc)) from None


async def _send(conn: NbdConnection, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[conn.sock.send(view):]
        except (BlockingIOError, ssl.SSLWantWriteError):
            await trio.lowlevel.wait_writable(conn.sock)
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(conn.sock)
        except OSError as exc:
            raise Closed(str(exc)) from None


async def _start_tls(conn: NbdConnection) -> None:
    """After STARTTLS's ACK: the TLS handshake, then everything goes through TLS."""
    context = conn.server.tls_context
    assert context is not None
    tls = context.wrap_socket(conn.sock, server_side=True, do_handshake_on_connect=False)
    conn.sock = tls
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            await trio.lowlevel.wait_readable(tls)
        except ssl.SSLWantWriteError:
            await trio.lowlevel.wait_writable(tls)
        except (ssl.SSLError, OSError) as exc:
            log.info("nbd %s: TLS handshake failed: %s", conn.peer, exc)
            conn.server.stats["tls_failures"] += 1
            raise Closed(f"TLS handshake failed: {exc}") from None
    conn.protocol.tls_started()
    log.info("nbd %s: TLS on (%s)", conn.peer, tls.version())
