"""Block nodes and their NBD exports, as qemu-storage-daemon has them.

A *node* is an image opened by ``blockdev-add`` (driver ``qed`` or ``raw``
over a ``file``); an *export* serves a node over NBD under a name
(``block-export-add``), once the NBD server runs (``nbd-server-start``).
Exports given on the command line (``--export``, ``serve --nbd``) are nodes
and exports too, their id and node name both the export's name, so that
``query-block-exports`` shows them and ``block-export-del`` removes them.

Removing an export (``block-export-del``, or ``nbd-server-stop`` for all):
``mode=safe`` refuses while clients use it, ``mode=hard`` disconnects them;
either way the image is flushed and closed, then ``BLOCK_EXPORT_DELETED``.
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
    name: str  # the NBD export name
    writable: bool


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
        for export_id in list(self.exports):
            await self.del_export(export_id, hard=True)
        if self._scope is not None:
            self._scope.cancel()
        self.server = None

    # -- exports --

    def _open(self, export_id: str, node_name: str, name: str | None, writable: bool) -> tuple[BlockExport, Export]:
        if export_id in self.exports:
            raise QmpCommandError(f"Block export id '{export_id}' is already in use")
        node = self.nodes.get(node_name)
        if node is None:
            raise QmpCommandError(f"Cannot find device='{node_name}' nor node-name='{node_name}'")
        name = node_name if name is None else name
        if any(e.name == name for e in self.exports.values()):
            raise QmpCommandError(f"Block export name '{name}' is already in use")
        if writable and node.read_only:
            raise QmpCommandError(f"Cannot export node '{node_name}' writable: it was added read-only")
        export = open_export(NbdExportOptions(name, node.filename, readonly=not writable, format=node.driver))
        record = BlockExport(export_id, node_name, name, writable)
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

    async def del_export(self, export_id: str, *, hard: bool) -> None:
        record = self.exports.get(export_id)
        if record is None:
            raise QmpCommandError(f"Export '{export_id}' is not found")
        if self.server is not None and record.name in self.server.exports:
            try:
                await self.server.remove_export(record.name, hard=hard)
            except ExportInUse:
                raise QmpCommandError(f"export '{export_id}' still in use") from None
        del self.exports[export_id]
        self.emit("BLOCK_EXPORT_DELETED", {"id": export_id})

    def query(self) -> list[dict[str, object]]:
        return [{"type": "nbd", "id": e.id, "node-name": e.node_name, "shutting-down": False}
                for e in self.exports.values()]

    def close_pending(self) -> None:
        for _record, export in self._pending:
            export.close()
        self._pending.clear()

