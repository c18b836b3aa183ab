"""The control socket of a running qbackend: JSON lines over a UNIX socket
(mode 0600).  One request per line, one reply per line:

    {"cmd": "dimm-list"}                 -> {"ok": true, "result": [...]}
    {"cmd": "dimm-add", "id": "hot1"}    -> {"ok": false, "error": "..."}

Commands are registered by the parts of the backend that own them; the
`qbackend dimm ...` commands are the client side.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from qbackend.errors import ControlError

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
MAX_LINE = 1 << 20


class ControlServer:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.commands: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler) -> None:
        self.commands[name] = handler

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.path.is_socket():
            self.path.unlink()
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(self.path))
        os.chmod(self.path, stat.S_IRUSR | stat.S_IWUSR)
        sock.listen(16)
        listener = trio.SocketListener(sock)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await trio.serve_listeners(self._client, [listener], handler_nursery=nursery)
        finally:
            self.path.unlink(missing_ok=True)
            with trio.CancelScope(shield=True):
                await listener.aclose()

    async def _client(self, stream: trio.SocketStream) -> None:
        buf = b""
        try:
            async for chunk in stream:
                buf += chunk
                if len(buf) > MAX_LINE:
                    await stream.send_all(self._encode({"ok": False, "error": "request line too long"}))
                    return
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        await stream.send_all(self._encode(await self._dispatch(line)))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("cmd"), str):
                raise ControlError('a request is a JSON object with a "cmd" string')
            handler = self.commands.get(request["cmd"])
            if handler is None:
                raise ControlError(f"unknown command {request['cmd']!r}; known: {', '.join(sorted(self.commands))}")
            return {"ok": True, "result": await handler(request)}
        except (ControlError, ValueError, KeyError) as exc:
            return {"ok": False, "error": str(exc)}
        except Exception as exc:  # a failing command must not take the control socket down
            log.exception("control command failed")
            return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

    @staticmethod
    def _encode(reply: dict[str, Any]) -> bytes:
        return json.dumps(reply).encode() + b"\n"


def call(path: Path, cmd: str, timeout: float = 60.0, **args: Any) -> Any:
    """Client side: one command to a running qbackend; raises ControlError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise ControlError(f"cannot reach qbackend at {path}: {exc.strerror} (is 'qbackend run' or "
                           "'qbackend serve --control' running?)") from None
    with sock:
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                raise ControlError("qbackend closed the control connection")
            buf += chunk
    reply = json.loads(buf)
    if not reply.get("ok"):
        raise ControlError(reply.get("error", "failed"))
    return reply.get("result")
