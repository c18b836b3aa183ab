"""Block nodes and their exports, as qemu-storage-daemon has them.

A *node* is an image opened by ``blockdev-add``: driver ``qed`` or ``raw``
over a ``file``, given inline (``{driver: file, filename}``) or as the name
of a node of driver ``file`` added before (which is then busy while a node
uses it); a ``file`` node exported itself serves the file's bytes, as raw.
An *export* serves a node (``block-export-add``): type
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
from qbackend.plumbing.tls import X509Credentials
from qbackend.protocol.qmp import QmpCommandError
from qbackend.servers.nbd import HANDSHAKE_TIMEOUT, ExportInUse, NbdServer
from qbackend.servers.vhost_user_blk import VhostUserBlkServer

Emit = Callable[[str, Mapping[str, object]], None]
# Images that blockdev-add opens at once, each in a worker thread.
OPEN_THREADS = 4


def _probe(node: BlockNode) -> None:
    """Open the node's image once, read-only, so that a corrupt image is refused at
    blockdev-add and not at export time."""
    open_export(NbdExportOptions(node.node_name, node.filename, readonly=True, format=node.format)).close()


@dataclass(frozen=True)
class BlockNode:
    node_name: str
    driver: str  # qed, raw, or file
    filename: Path
    read_only: bool
    file_node: str | None = None  # the file node it was opened over, when named (QEMU's reference)

    @property
    def format(self) -> str:
        """How an export reads the file: a file node's bytes are raw."""
        return "raw" if self.driver == "file" else self.driver


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
        self.credentials: dict[str, X509Credentials] = {}  # object-add qom-type=tls-creds-x509, by id
        self._scope: trio.CancelScope | None = None
        self._pending: list[tuple[BlockExport, Export]] = []  # opened before the server runs
        self.vhost: dict[str, VhostUserBlkExport] = {}  # by export id
        self._nursery: trio.Nursery | None = None  # where vhost-user-blk servers run (set by run())
        self._adding: set[str] = set()  # node names whose image is being opened (add_node_async)
        self._open_limiter = trio.CapacityLimiter(OPEN_THREADS)
        # Set in a process that takes over from another (qbackend.app.upgrade): the NBD server
        # takes the old one's listeners and connections as it is made.
        self.adopt_server: Callable[[NbdServer], None] | None = None

    # -- nodes --

    def add_node(self, node_name: str, driver: str, file: Path | str, read_only: bool) -> BlockNode:
        """A qed, raw or file node over `file`: a path, or (for qed and raw) the name of a file
        node, whose file it then is (QEMU's reference)."""
        node = self._new_node(node_name, driver, file, read_only)
        _probe(node)
        self.nodes[node_name] = node
        return node

    async def add_node_async(self, node_name: str, driver: str, file: Path | str, read_only: bool) -> BlockNode:
        """add_node, the image opened in a worker thread: an open that takes long (a slow
        disk, a large check) holds up no other QMP command meanwhile.  The same replies."""
        node = self._new_node(node_name, driver, file, read_only)
        self._adding.add(node_name)  # taken while it opens: a second add of it is a duplicate
        try:
            await trio.to_thread.run_sync(_probe, node, limiter=self._open_limiter)
        finally:
            self._adding.discard(node_name)
        self.nodes[node_name] = node
        return node

    def _new_node(self, node_name: str, driver: str, file: Path | str, read_only: bool) -> BlockNode:
        if node_name in self.nodes or node_name in self._adding:
            raise QmpCommandError(f"Duplicate nodes with node-name='{node_name}'")
        if driver not in ("qed", "raw", "file"):
            raise QmpCommandError(f"Unknown driver '{driver}' (qbackend serves qed, raw and file)")
        file_node, filename = (file, Path()) if isinstance(file, str) else (None, file)
        if file_node is not None:
            base = self.nodes.get(file_node)
            if base is None or base.driver != "file":
                raise QmpCommandError(f"Cannot find device='{file_node}' nor node-name='{file_node}'"
                                      if base is None else f"'file' names node '{file_node}', which is not "
                                      "of driver file")
            if base.read_only and not read_only:
                raise QmpCommandError("Block node is read-only")
            filename = base.filename
        if not filename.exists():
            raise QmpCommandError(f"Could not open '{filename}': No such file or directory")
        if filename.is_dir():
            raise QmpCommandError(f"Could not open '{filename}': Is a directory")
        return BlockNode(node_name, driver, filename, read_only, file_node)

    def del_node(self, node_name: str) -> None:
        if node_name not in self.nodes:
            raise QmpCommandError(f"Failed to find node with node-name='{node_name}'")
        users = [e.id for e in self.exports.values() if e.node_name == node_name]
        if users:
            raise QmpCommandError(f"Node '{node_name}' is busy: block device is in use by block export "
                                  f"'{users[0]}'")
        if any(n.file_node == node_name for n in self.nodes.values()):
            raise QmpCommandError(f"Block device {node_name} is in use")
        del self.nodes[node_name]

    def query_nodes(self) -> list[dict[str, object]]:
        """query-named-block-nodes: QEMU's fields for what qbackend knows of a node (an inline
        file child is not a node of its own here)."""
        from qbackend.block.qed import HEADER, QedFormatError, QedHeader  # loaded when used, as open_export does

        def image(node: BlockNode) -> dict[str, object]:
            info: dict[str, object] = {"filename": str(node.filename), "format": node.driver}
            try:  # read from the file, not opened: an export may be writing it
                stat = node.filename.stat()
                info["actual-size"] = stat.st_blocks * 512
                if node.format == "raw":
                    info["virtual-size"] = stat.st_size
                else:
                    with open(node.filename, "rb") as f:
                        header = QedHeader.unpack(f.read(HEADER.size))
                    info["virtual-size"], info["cluster-size"] = header.image_size, header.cluster_size
            except (OSError, QedFormatError):
                pass  # the file changed under the node since it was added: what can still be said
            return info

        return [{"node-name": n.node_name, "drv": n.driver, "file": str(n.filename), "ro": n.read_only,
                 "encrypted": False, "detect_zeroes": "off", "image": image(n),
                 "children": [{"node-name": n.file_node, "child": "file"}] if n.file_node else []}
                for n in reversed(self.nodes.values())]  # newest first, as QEMU lists them

    # -- the NBD server --

    async def start_server(self, nursery: trio.Nursery, socket_path: Path | None,
                           tcp: tuple[str, int] | None, *, max_connections: int | None = None,
                           tls_creds: str | None = None, handshake_timeout: float | None = None) -> NbdServer:
        """The NBD server; `max_connections`, `tls_creds` (a tls-creds-x509 object's id: TLS
        required, as QEMU) and `handshake_timeout` as nbd-server-start gives them, else the
        command line's."""
        if self.server is not None:
            raise QmpCommandError("NBD server already running")
        tls_mode, tls_context = self.tls_mode, self.tls_context
        if tls_creds is not None:
            creds = self.credentials.get(tls_creds)
            if creds is None:
                raise QmpCommandError(f"No TLS credentials with id '{tls_creds}'")
            if creds.context is None:
                raise QmpCommandError("Expected TLS credentials for a server endpoint")
            tls_mode, tls_context = "require", creds.context
        server = NbdServer({}, socket_path, tcp,
                           handshake_timeout=self.handshake_timeout if handshake_timeout is None else handshake_timeout,
                           max_connections=self.max_connections if max_connections is None else max_connections,
                           tls_mode=tls_mode, tls_context=tls_context)
        for record, export in self._pending:
            server.add_export(record.name, export)
        self._pending.clear()
        if self.adopt_server is not None:
            adopt, self.adopt_server = self.adopt_server, None
            adopt(server)
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
        export = open_export(NbdExportOptions(label, node.filename, readonly=not writable, format=node.format))
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
                           num_queues: int = 1, *, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                           logical_block_size: int = 512) -> BlockExport:
        """A vhost-user-blk export: its server listens from now (or from run())."""
        if not 1 <= num_queues <= 64:
            raise QmpCommandError(f"num-queues {num_queues}: 1..64")
        if any(e.type == "vhost-user-blk" and e.name == str(socket_path) for e in self.exports.values()):
            raise QmpCommandError(f"a vhost-user-blk export listens on {socket_path} already")
        record, export = self._open(export_id, node_name, str(socket_path), writable, "vhost-user-blk")
        server = VhostUserBlkServer(export, socket_path, name=export_id, num_queues=num_queues,
                                    serial=export_id, handshake_timeout=handshake_timeout,
                                    logical_block_size=logical_block_size)
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

    def open_exports(self) -> list[Export]:
        """Every export open now, whichever server serves it."""
        out = [export for _record, export in self._pending]
        out += [entry.export for entry in self.vhost.values()]
        if self.server is not None:
            out += list(self.server.exports.values())
        return out

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

