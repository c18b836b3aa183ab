"""The NBD server's part of a hand-over to a new process (qbackend.app.upgrade):
what save() writes and adopt() reads.

The state, JSON (fds as indexes, qbackend.plumbing.handover):

    {"listeners": [{"kind": "unix", "fd": i, "path": "...", "inode": [dev, ino] | null}
                   | {"kind": "tcp", "fd": i, "address": [host, port]}],
     "connections": [CONNECTION, ...]}

and each parked connection (servers.nbd.server: in transmission, between
requests, no request of it half-served):

    {"fd": i, "peer": "unix" | "host:port",
     "export": name, "size": bytes, "flags": transmission flags, "max_block": bytes,
     "client_flags": n, "structured": bool, "extended": bool,
     "meta_contexts": [[name, id], ...],
     "received": base64,   bytes received and not handled yet (the front of the next requests)
     "skip": n,            payload bytes still to come of a WRITE refused on its header
     "refused": null | {"cookie", "command", "error", "reason", "reply": base64},
     "unsent": base64}     replies the client had not taken (sent first)

The new server checks the export against what the client negotiated (its
size, transmission flags and largest block, which the client holds to): a
difference is a HandoverError, and the old process serves on.
"""

from __future__ import annotations

import base64
import dataclasses
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbackend.plumbing.handover import HandoverError, Loader, Saver, State, adopt_socket
from qbackend.plumbing.unix import adopt_owned, owned_inode
from qbackend.protocol import nbd
from qbackend.servers.nbd.connection import NbdConnection
from qbackend.servers.nbd_fast import NativeRequests

if TYPE_CHECKING:
    from qbackend.servers.nbd.server import NbdServer


def save_server(server: NbdServer, listeners: list[socket.socket], conns: list[NbdConnection],
                saver: Saver) -> State:
    saved_listeners: list[dict[str, Any]] = []
    for sock in listeners:
        if sock.family == socket.AF_UNIX:
            assert server.socket_path is not None
            inode = owned_inode(server.socket_path)
            saved_listeners.append({"kind": "unix", "fd": saver.fd(sock.fileno()), "path": str(server.socket_path),
                                    "inode": None if inode is None else list(inode)})
        else:
            host, port = sock.getsockname()[:2]
            saved_listeners.append({"kind": "tcp", "fd": saver.fd(sock.fileno()), "address": [host, port]})
    return {"listeners": saved_listeners, "connections": [save_connection(conn, saver) for conn in conns]}


def save_connection(conn: NbdConnection, saver: Saver) -> State:
    """A parked connection: its socket, its negotiation, what it holds unhandled."""
    protocol = conn.protocol
    export = protocol.export
    if not conn.parked or export is None or protocol.phase is not nbd.Phase.TRANSMISSION \
            or protocol._payload_for is not None:
        raise HandoverError(f"nbd {conn.peer}: not parked between requests")
    refused = protocol._refused
    return {
        "fd": saver.fd(conn.sock.fileno()),
        "peer": conn.peer,
        "export": export.name,
        "size": export.size,
        "flags": int(export.flags()),
        "max_block": export.max_block,
        "client_flags": int(protocol.client_flags),
        "structured": protocol.structured,
        "extended": protocol.extended,
        "meta_contexts": [[name, nbd.CONTEXT_IDS[name]] for name in protocol.meta_contexts],
        "received": _b64(protocol._buffer),
        "skip": protocol._skip,
        "refused": None if refused is None else {
            "cookie": refused.cookie, "command": refused.command, "error": int(refused.error),
            "reason": refused.reason, "reply": _b64(refused.reply)},
        "unsent": _b64(conn.out),
    }


def load_server(server: NbdServer, state: State, loader: Loader) -> tuple[list[socket.socket], list[NbdConnection]]:
    """The listeners and connections of `state` (save_server's), for `server`; on an error,
    every fd taken so far is closed and HandoverError raised."""
    listeners: list[socket.socket] = []
    conns: list[NbdConnection] = []
    try:
        for saved in _list(state, "listeners"):
            listeners.append(_load_listener(server, saved, loader))
        for saved in _list(state, "connections"):
            sock = adopt_socket(loader.take(_get(saved, "fd", int)))
            try:
                conns.append(load_connection(server, saved, sock))
            except BaseException:
                sock.close()
                raise
    except BaseException as exc:
        for sock in listeners:
            sock.close()
        for conn in conns:
            conn.sock.close()
            conn.release_buffers()
        if isinstance(exc, (KeyError, TypeError, ValueError)):
            raise HandoverError(f"nbd: the saved state does not fit: {exc!r}") from None
        raise
    return listeners, conns


def _load_listener(server: NbdServer, saved: State, loader: Loader) -> socket.socket:
    kind = _get(saved, "kind", str)
    if kind == "unix":
        path = Path(_get(saved, "path", str))
        if server.socket_path is None or path != server.socket_path:
            raise HandoverError(f"nbd: the state's listener is {path}, this server's {server.socket_path}")
        sock = adopt_socket(loader.take(_get(saved, "fd", int)))
        inode = saved.get("inode")
        adopt_owned(path, None if inode is None else (int(inode[0]), int(inode[1])))
    elif kind == "tcp":
        if server.tcp is None:
            raise HandoverError("nbd: the state has a TCP listener, this server none")
        sock = adopt_socket(loader.take(_get(saved, "fd", int)))
    else:
        raise HandoverError(f"nbd: a listener of kind {kind!r}")
    sock.setblocking(False)
    return sock


def load_connection(server: NbdServer, saved: State, sock: socket.socket) -> NbdConnection:
    """A connection in transmission as the old process left it, served by `server` now."""
    name = _get(saved, "export", str)
    export = server.exports.get(name)
    conn = NbdConnection(server, sock, _get(saved, "peer", str))
    info = conn.protocol.exports.get(name)
    if export is None or info is None:
        raise HandoverError(f"nbd {conn.peer}: export {name!r} is not served here")
    negotiated = (_get(saved, "size", int), _get(saved, "flags", int), _get(saved, "max_block", int))
    if negotiated != (info.size, int(info.flags()), info.max_block):
        raise HandoverError(f"nbd {conn.peer}: export {name!r} is not what the client negotiated "
                            f"(size, flags, largest block: {negotiated}, here {(info.size, int(info.flags()), info.max_block)})")
    contexts: list[str] = []
    for context, number in _list(saved, "meta_contexts"):
        if nbd.CONTEXT_IDS.get(context) != number:
            raise HandoverError(f"nbd {conn.peer}: meta context {context!r} with id {number} is not served here")
        contexts.append(context)
    refused = saved.get("refused")
    extended = _get(saved, "extended", bool)
    structured = _get(saved, "structured", bool) or extended
    conn.protocol = dataclasses.replace(
        conn.protocol, phase=nbd.Phase.TRANSMISSION, client_flags=nbd.ClientFlags(_get(saved, "client_flags", int)),
        structured=structured, extended=extended, export=info, meta_contexts=tuple(contexts), _meta_export=name,
        _skip=_get(saved, "skip", int),
        _refused=None if refused is None else nbd.Rejected(
            _get(refused, "cookie", int), _get(refused, "command", int), nbd.Errno(_get(refused, "error", int)),
            _get(refused, "reason", str), _unb64(_get(refused, "reply", str))))
    received = _unb64(_get(saved, "received", str))
    if received:
        conn.protocol.receive_data(received)
    conn.out += _unb64(_get(saved, "unsent", str))
    conn.export_name = name
    conn.start_receiving()
    mode = "extended" if extended else "structured" if structured else "simple"
    conn.native = NativeRequests.start(export, mode, conn.buffer)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setblocking(False)
    return conn


def _b64(data: bytes | bytearray) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _get(state: State, key: str, kind: type[Any]) -> Any:
    value = state[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise HandoverError(f"nbd: {key!r} in the saved state is {value!r}, not {kind.__name__}")
    return value


def _list(state: State, key: str) -> list[Any]:
    value = _get(state, key, list)
    assert isinstance(value, list)
    return value
