"""Block nodes and their exports, as qemu-storage-daemon has them.

A *node* is an image opened by ``blockdev-add`` (driver ``qed`` or ``raw``
over a ``file``); an *export* serves a node (``block-export-add``): type
``nbd`` under a name, once the NBD server runs (``nbd-server-start``), or
type ``vhost-user-blk`` on a socket of its own, to QEMU's
``vhost-user-blk-pci``.  Both kinds serve the same `Export` objects
(qbackend.block.exports); a node has at most one writable export at a time,
since each export opens the image for itself.
Exports given on the command line (``--export``, ``serve --nbd``) are nodes
and exports too, their id and node name both the export's name, so that
``query-block-exports`` shows them and ``block-export-del`` removes them.

Removing an export (``block-export-del``, or ``nbd-server-stop`` for all):
``mode=safe`` refuses while clients use it (for vhost-user-blk: while a
front end is connected), ``mode=hard`` disconnects them; either way the
image is flushed and closed, then ``BLOCK_EXPORT_DELETED``.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import trio

from qbackend.block.exports import Export, open_export
from qbackend.options import NbdExportOptions
from qbackend.protocol.qmp import QmpCommandError
from qbackend.servers.nbd import HANDSHAKE_TIMEOUT, ExportInUse, NbdServer
from qbackend.servers.vhost_user_blk import VhostUserBlkServer

Emit = Callable[[str, Mapping[str, object]], None]


@dataclass(frozen=True)
class BlockNode:
    node_name: str
    driver: str  # qed or raw
    filename: Path
    read_only: bool


@dataclass(frozen=True)
class BlockExport:
    id: str
    node_name: str
    name: str  # the NBD export name; for vhost-user-blk, the socket path
    writable: bool
    type: str = "nbd"  # or vhost-user-blk


@dataclass
class VhostUserBlkExport:
    """A vhost-user-blk export's server, and the scope that stops it."""

    server: VhostUserBlkServer
    export: Export
    scope: trio.CancelScope | None = None
    done: trio.Event | None = None


class BlockExports:
    """The nodes, exports and NBD server of one qbackend process (trio side)."""

    def __init__(self, emit: Emit = lambda name, data: None) -> None:
        self.emit = emit
        self.nodes: dict[str, BlockNode] = {}
        self.exports: dict[str, BlockExport] = {}
        self.server: NbdServer | None = None
        self.handshake_timeout = HANDSHAKE_TIMEOUT  # for the server start_server makes
        self.max_connections = 0
        self.tls_mode = "off"
        self.tls_context: ssl.SSLContext | None = None
        self._scope: trio.CancelScope | None = None
        self._pending: list[tuple[BlockExport, Export]] = []  # opened before the server runs
        self.vhost: dict[str, VhostUserBlkExport] = {}  # by export id
        self._nursery: trio.Nursery | None = None  # where vhost-user-blk servers run (set by run())

    # -- nodes --

    def add_node(self, node_name: str, driver: str, filename: Path, read_only: bool) -> BlockNode:
        if node_name in self.nodes:
            raise QmpCommandError(f"Duplicate nodes with node-name='{node_name}'")
        if driver not in ("qed", "raw"):
            raise QmpCommandError(f"Unknown driver '{driver}' (qbackend serves qed and raw)")
        if not filename.exists():
            raise QmpCommandError(f"Could not open '{filename}': No such file or directory")
        # Open it once now, read-only, so that a corrupt image is refused here and not at export time.
        open_export(NbdExportOptions(node_name, filename, readonly=True, format=driver)).close()
        node = self.nodes[node_name] = BlockNode(node_name, driver, filename, read_only)
        return node

    def del_node(self, node_name: str) -> None:
        if node_name not in self.nodes:
            raise QmpCommandError(f"Failed to find node with node-name='{node_name}'")
        users = [e.id for e in self.exports.values() if e.node_name == node_name]
        if users:
            raise QmpCommandError(f"Node '{node_name}' is busy: block device is in use by block export "
                                  f"'{users[0]}'")
        del self.nodes[node_name]

    # -- the NBD server --

    async def start_server(self, nursery: trio.Nursery, socket_path: Path | None,
                           tcp: tuple[str, int] | None) -> NbdServer:
        if self.server is not None:
            raise QmpCommandError("NBD server already running")
        server = NbdServer({}, socket_path, tcp, handshake_timeout=self.handshake_timeout,
                           max_connections=self.max_connections, tls_mode=self.tls_mode,
                           tls_context=self.tls_context)
        for record, export in self._pending:
            server.add_export(record.name, export)
        self._pending.clear()
        self.server = server
        await nursery.start(self._serve, server)
        return server

    async def _serve(self, server: NbdServer, *, task_status: trio.TaskStatus[None]) -> None:
        with trio.CancelScope() as scope:
            self._scope = scope  # nbd-server-stop cancels it
            try:
                await server.serve(task_status=task_status)
            finally:
                if self.server is server:
                    self.server = None

    async def stop_server(self) -> None:
        """nbd-server-stop: every export goes (clients disconnected), then the sockets."""
        if self.server is None:
            raise QmpCommandError("NBD server not running")
        for export_id, record in list(self.exports.items()):
            if record.type == "nbd":
                await self.del_export(export_id, hard=True)
        if self._scope is not None:
            self._scope.cancel()
        self.server = None

    # -- exports --

    def _open(self, export_id: str, node_name: str, name: str | None, writable: bool,
              kind: str = "nbd") -> tuple[BlockExport, Export]:
        if export_id in self.exports:
            raise QmpCommandError(f"Block export id '{export_id}' is already in use")
        node = self.nodes.get(node_name)
        if node is None:
            raise QmpCommandError(f"Cannot find device='{node_name}' nor node-name='{node_name}'")
        name = node_name if name is None else name
        if any(e.name == name and e.type == kind for e in self.exports.values()):
            raise QmpCommandError(f"Block export name '{name}' is already in use")
        if writable and node.read_only:
            raise QmpCommandError(f"Cannot export node '{node_name}' writable: it was added read-only")
        writer = next((e.id for e in self.exports.values() if e.node_name == node_name and e.writable), None)
        if writer is not None:
            raise QmpCommandError(f"Node '{node_name}' is busy: block export '{writer}' writes it, and each "
                                  "export opens the image for itself")
        label = name if kind == "nbd" else export_id  # what errors call it
        export = open_export(NbdExportOptions(label, node.filename, readonly=not writable, format=node.driver))
        record = BlockExport(export_id, node_name, name, writable, kind)
        self.exports[export_id] = record
        return record, export

    def add_at_start(self, export_id: str, node_name: str, name: str, writable: bool) -> None:
        """An export given on the command line: served once the server starts."""
        self._pending.append(self._open(export_id, node_name, name, writable))

    def add_export(self, export_id: str, node_name: str, name: str | None, writable: bool) -> BlockExport:
        if self.server is None:
            raise QmpCommandError("NBD server not running")
        record, export = self._open(export_id, node_name, name, writable)
        self.server.add_export(record.name, export)
        return record

    # -- vhost-user-blk exports --

    def add_vhost_user_blk(self, export_id: str, node_name: str, socket_path: Path, writable: bool,
                           num_queues: int = 1, *, handshake_timeout: float = HANDSHAKE_TIMEOUT) -> BlockExport:
        """A vhost-user-blk export: its server listens from now (or from run())."""
        if not 1 <= num_queues <= 64:
            raise QmpCommandError(f"num-queues {num_queues}: 1..64")
        if any(e.type == "vhost-user-blk" and e.name == str(socket_path) for e in self.exports.values()):
            raise QmpCommandError(f"a vhost-user-blk export listens on {socket_path} already")
        record, export = self._open(export_id, node_name, str(socket_path), writable, "vhost-user-blk")
        server = VhostUserBlkServer(export, socket_path, name=export_id, num_queues=num_queues,
                                    serial=export_id, handshake_timeout=handshake_timeout)
        entry = self.vhost[export_id] = VhostUserBlkExport(server, export)
        if self._nursery is not None:
            self._nursery.start_soon(self._serve_vhost, entry)
        return record

    async def start_vhost(self, nursery: trio.Nursery) -> None:
        """Start the vhost-user-blk exports added before, and any added later."""
        self._nursery = nursery
        for entry in self.vhost.values():
            await nursery.start(self._serve_vhost, entry)

    async def _serve_vhost(self, entry: VhostUserBlkExport, *,
                           task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        entry.done = trio.Event()
        try:
            with trio.CancelScope() as entry.scope:
                await entry.server.serve(task_status=task_status)
        finally:
            await trio.to_thread.run_sync(entry.export.close)  # flushes
            entry.done.set()

    async def del_export(self, export_id: str, *, hard: bool) -> None:
        record = self.exports.get(export_id)
        if record is None:
            raise QmpCommandError(f"Export '{export_id}' is not found")
        if record.type == "vhost-user-blk":
            entry = self.vhost[export_id]
            if entry.server.connection is not None and not hard:
                raise QmpCommandError(f"export '{export_id}' still in use (a front end is connected)")
            if entry.scope is not None and entry.done is not None:
                entry.scope.cancel()
                await entry.done.wait()
            else:
                entry.export.close()
            del self.vhost[export_id]
        if self.server is not None and record.name in self.server.exports:
            try:
                await self.server.remove_export(record.name, hard=hard)
            except ExportInUse:
                raise QmpCommandError(f"export '{export_id}' still in use") from None
        del self.exports[export_id]
        self.emit("BLOCK_EXPORT_DELETED", {"id": export_id})

    def query(self) -> list[dict[str, object]]:
        return [{"type": e.type, "id": e.id, "node-name": e.node_name, "shutting-down": False}
                for e in self.exports.values()]

    def close_pending(self) -> None:
        """Close what never started serving (after run() ended, or when it never ran)."""
        for _record, export in self._pending:
            export.close()
        self._pending.clear()
        for entry in self.vhost.values():
            if entry.done is None:
                entry.export.close()
        self.vhost.clear()
        self._nursery = None

