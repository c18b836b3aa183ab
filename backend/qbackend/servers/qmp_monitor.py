"""qbackend's QMP monitor: the control socket, spoken as QEMU speaks QMP.

`QmpMonitor` listens on a UNIX socket (mode 0600), greets each client,
runs the sans-IO `QmpSession` of `qbackend.protocol.qmp` for it, and runs
the commands the parts of the backend register (`register(spec, handler)`),
one at a time per client, as QEMU's monitor does.  Events (`emit`, or
`emit_threadsafe` from a worker thread) go to every client that has
negotiated capabilities.

A client that sends garbage gets QEMU's error and stays; one that vanishes
mid-command is forgotten; one that does not read its events is dropped once
`MAX_QUEUED` bytes wait for it, so it cannot make the process grow.  A
handler that fails with anything else than `QmpCommandError` or a
`QbackendError` is a bug: logged with its traceback, answered with a
GenericError, and the monitor goes on.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from qbackend.errors import QbackendError
from qbackend.plumbing.handover import Loader, Saver, State, adopt_socket
from qbackend.plumbing.unix import AcceptGate, accept_forever, adopt_owned, listen_unix, owned_inode, remove_socket
from qbackend.protocol import qmp
from qbackend.protocol.qmp import CommandSpec, ErrorClass, Execute, QmpCommandError, QmpSession, Reply
from qbackend.version import __version__

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[object]]
MAX_QUEUED = 8 << 20  # bytes of replies and events waiting for one client at most
MAX_CLIENTS = 64
RECEIVE_SIZE = 1 << 16


def _version() -> tuple[int, int, int]:
    parts = [int(p) for p in __version__.split(".")[:3] if p.isdigit()]
    major, minor, micro = (parts + [0, 0, 0])[:3]
    return major, minor, micro


@dataclass
class _Command:
    spec: CommandSpec
    handler: Handler


class _Client:
    def __init__(self, stream: trio.SocketStream, session: QmpSession) -> None:
        self.stream = stream
        self.session = session
        self.send, self.outbox = trio.open_memory_channel[bytes](1 << 14)
        self.queued = 0
        self.dropped = False
        self.emptied = trio.Event()  # set (and renewed) whenever the writer has sent everything queued

    def push(self, data: bytes) -> None:
        """Queue bytes for the writer; a client that lets too much pile up is dropped."""
        if self.dropped:
            return
        if self.queued + len(data) > MAX_QUEUED:
            log.warning("QMP client does not read (%d bytes waiting): dropping it", self.queued)
            self.dropped = True
            self.send.close()
            return
        try:
            self.send.send_nowait(data)
        except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
            self.dropped = True
            self.send.close()
            return
        self.queued += len(data)


class QmpMonitor:
    """The QMP monitor of one qbackend process."""

    def __init__(self, path: Path, *, on_quit: Callable[[], None] | None = None) -> None:
        self.path = Path(path)
        self.on_quit = on_quit
        self.commands: dict[str, _Command] = {}
        self.clients: set[_Client] = set()
        self.connections_served = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._quitting = False
        # Run once the reply of the command being handled has been sent (a handler sets it:
        # `upgrade` ends the process then).
        self.after_reply: Callable[[], None] | None = None
        self._gate = AcceptGate()
        self._adopted: socket.socket | None = None
        self._unpaused = trio.Event()  # commands wait on it while a hand-over is under way
        self._unpaused.set()
        self.register(CommandSpec("query-commands", doc="the commands this monitor runs",
                                  returns="[{name}]"), self._query_commands)
        self.register(CommandSpec("query-version", doc="qbackend's version, in QEMU's VersionInfo shape",
                                  returns="{qemu: {major, minor, micro}, package}"), self._query_version)
        self.register(CommandSpec("quit", doc="stop qbackend cleanly: exports flushed, sockets removed"),
                      self._quit)

    # -- what the backend adds --

    def register(self, spec: CommandSpec, handler: Handler) -> None:
        if spec.name in self.commands or spec.name == QmpSession.NEGOTIATE:
            raise ValueError(f"QMP command {spec.name} registered twice")
        self.commands[spec.name] = _Command(spec, handler)

    def emit(self, name: str, data: Mapping[str, object] | None = None) -> None:
        """Send an event to every negotiated client (call from the trio thread)."""
        now = time.time()
        message = qmp.event_message(name, data, int(now), int((now % 1) * 1_000_000))
        for client in list(self.clients):
            if client.session.negotiated:
                client.push(message)

    def emit_threadsafe(self, name: str, data: Mapping[str, object] | None = None) -> None:
        """`emit` from any thread (a vfio-user worker, the doorbell watcher)."""
        token = self._token
        if token is None:
            return
        try:
            token.run_sync_soon(self.emit, name, data)
        except trio.RunFinishedError:
            pass

    # -- built-in commands --

    async def _query_commands(self, args: dict[str, Any]) -> object:
        return [{"name": name} for name in [QmpSession.NEGOTIATE, *sorted(self.commands)]]

    async def _query_version(self, args: dict[str, Any]) -> object:
        major, minor, micro = _version()
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"qbackend {__version__}"}

    async def _quit(self, args: dict[str, Any]) -> object:
        self._quitting = True  # the reply goes out first; then SHUTDOWN and the stop (_read)
        return {}

    async def _stop(self, client: _Client) -> None:
        """After quit's reply: SHUTDOWN to everyone, a moment for the quitter to receive both, then stop."""
        self.emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        with trio.move_on_after(2):
            while client.queued and not client.dropped:
                await client.emptied.wait()
        if self.on_quit is not None:
            self.on_quit()

    # -- serving --

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listener = self._adopted if self._adopted is not None else listen_unix(self.path)
        self._adopted = None
        self._gate.listener = listener
        self._token = trio.lowlevel.current_trio_token()
        log.info("QMP monitor on %s", self.path)
        try:
            async with trio.open_nursery() as nursery:
                task_status.started()
                await accept_forever(listener, "QMP monitor", nursery, self._serve_client, self._gate)
        finally:
            self._gate.listener = None
            listener.close()
            remove_socket(self.path)
            self._token = None

    # -- hand-over to a new process (qbackend.app.upgrade) --
    # Only the listener travels: clients connected now stay with this process until it
    # exits (they see the connection end, and connect again to the new one); their
    # commands wait meanwhile.

    async def pause(self) -> None:
        self._gate.close()
        self._unpaused = trio.Event()

    async def resume(self) -> None:
        self._unpaused.set()
        self._gate.open()

    def save(self, saver: Saver) -> State:
        listener = self._gate.listener
        if listener is None:
            raise ValueError("the QMP monitor is not listening")
        return {"listener": saver.fd(listener.fileno()), "inode": owned_inode(self.path)}

    def adopt(self, state: State, loader: Loader) -> None:
        self._adopted = adopt_socket(loader.take(state["listener"]))
        self._adopted.setblocking(False)
        adopt_owned(self.path, state["inode"])

    async def _serve_client(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        if len(self.clients) >= MAX_CLIENTS:
            log.warning("QMP monitor: %d clients already; refusing another", len(self.clients))
            await trio.aclose_forcefully(stream)
            return
        client = _Client(stream, QmpSession(self._lookup))
        self.clients.add(client)
        self.connections_served += 1
        client.push(qmp.greeting(_version(), f"qbackend {__version__}"))
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, client, nursery.cancel_scope)
                await self._read(client)
                client.send.close()  # the writer sends what is queued, then ends
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("QMP client gone: %s", exc)
        finally:
            self.clients.discard(client)
            client.send.close()
            await trio.aclose_forcefully(stream)

    async def _read(self, client: _Client) -> None:
        try:
            await self._read_commands(client)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            log.info("QMP client gone: %s", exc)  # it vanished (mid-command, or with unread replies)

    async def _read_commands(self, client: _Client) -> None:
        while not client.dropped:
            data = await client.stream.receive_some(RECEIVE_SIZE)
            for action in client.session.receive_data(data):
                if isinstance(action, Reply):
                    client.push(action.data)
                else:
                    client.push(await self._run(action))
                    if self._quitting:
                        await self._stop(client)
                        return
                    if self.after_reply is not None:
                        then, self.after_reply = self.after_reply, None
                        with trio.move_on_after(2):
                            while client.queued and not client.dropped:
                                await client.emptied.wait()
                        then()
            if not data:
                return

    async def _write(self, client: _Client, scope: trio.CancelScope) -> None:
        try:
            async for data in client.outbox:
                await client.stream.send_all(data)
                client.queued -= len(data)
                if not client.queued:
                    client.emptied.set()
                    client.emptied = trio.Event()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if client.dropped:
            scope.cancel()

    async def _run(self, cmd: Execute) -> bytes:
        # A command that comes during a hand-over waits: after it, it is this process's to
        # run (it failed) or nobody's here (the client sees the connection end, and asks the
        # new process).  What it would change must not be left out of the state handed over.
        await self._unpaused.wait()
        handler = self.commands[cmd.spec.name].handler
        try:
            value = await handler(cmd.arguments)
        except QmpCommandError as exc:
            return QmpSession.failed(cmd, exc)
        except QbackendError as exc:
            return QmpSession.failed(cmd, QmpCommandError(str(exc) or type(exc).__name__))
        except Exception as exc:  # a bug in a handler: say so, keep serving
            log.exception("QMP %s failed", cmd.spec.name)
            return QmpSession.failed(cmd, QmpCommandError(f"internal error in {cmd.spec.name}: {exc}"))
        return QmpSession.returned(cmd, value)

    def _lookup(self, name: str) -> CommandSpec | None:
        command = self.commands.get(name)
        return command.spec if command is not None else None


def device_not_found(what: str) -> QmpCommandError:
    """QEMU's DeviceNotFound, for an id that names nothing."""
    return QmpCommandError(what, ErrorClass.DEVICE_NOT_FOUND)
