"""The accept loop the socket servers share."""

from __future__ import annotations

import errno as E
import logging
import socket
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger(__name__)

# Out of fds or memory: a passing overload, not a reason to stop listening.
_TRANSIENT = (E.EMFILE, E.ENFILE, E.ENOBUFS, E.ENOMEM)


async def accept_forever(listener: socket.socket, name: str, nursery: trio.Nursery,
                         serve_client: Callable[[socket.socket], Awaitable[object]]) -> None:
    """Accept on a non-blocking listener and start serve_client(sock) in the nursery for each client."""
    while True:
        await trio.lowlevel.wait_readable(listener)
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                log.error("%s: accept failed (%s); retrying shortly", name, exc)
                await trio.sleep(0.1)
                continue
            raise
        nursery.start_soon(serve_client, sock)
