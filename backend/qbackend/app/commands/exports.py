"""Block exports at run time, with qemu-storage-daemon's commands and
arguments: ``nbd-server-start`` (``tls-creds`` naming an ``object-add``
tls-creds-x509, ``max-connections``, ``handshake-max-seconds``), ``nbd-server-stop``, ``blockdev-add``
(drivers ``qed`` and ``raw`` over a ``file``, inline or a ``file`` node's
name), ``blockdev-del``, ``query-named-block-nodes``, ``block-export-add``
(type ``nbd``, or ``vhost-user-blk`` with ``addr`` and ``num-queues``),
``block-export-del`` (mode ``safe`` or ``hard``) and
``query-block-exports``; the ``BLOCK_EXPORT_DELETED`` event.
Anything those commands take that qbackend does not do (tls-authz, bitmaps,
other drivers) is refused, not ignored.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbackend.app.block_exports import BlockExports
from qbackend.protocol.qmp import Arg, CommandSpec, QmpCommandError

if TYPE_CHECKING:
    from qbackend.app.service import Backend
    from qbackend.servers.qmp_monitor import QmpMonitor

SERVER_START = CommandSpec("nbd-server-start", {
    "addr": Arg("object", doc="SocketAddressLegacy: {type: unix, data: {path}} or {type: inet, data: {host, port}}"),
    "tls-creds": Arg("str", True, "the id of tls-creds-x509 credentials (endpoint=server): TLS required"),
    "tls-authz": Arg("str", True, "not supported: refused"),
    "max-connections": Arg("int", True, "clients at once at most (default 0: no limit; with 1, no multi-conn)"),
    "handshake-max-seconds": Arg("int", True, "seconds a client has to finish the handshake (default 10; 0: no limit)"),
}, doc="start the NBD server (as qemu-storage-daemon)")
SERVER_STOP = CommandSpec("nbd-server-stop", doc="stop the NBD server; its exports are removed")
BLOCKDEV_ADD = CommandSpec("blockdev-add", {
    "driver": Arg(("qed", "raw", "file")), "node-name": Arg("str"),
    "file": Arg("any", True, "qed and raw: {driver: file, filename: PATH}, or the name of a file node"),
    "filename": Arg("str", True, "file: the file's path"),
    "read-only": Arg("bool", True),
}, doc="open an image as a block node")
QUERY_NODES = CommandSpec("query-named-block-nodes", {"flat": Arg("bool", True, "accepted: the list is flat")},
                          doc="the block nodes", returns="[{node-name, drv, file, ro, image: {...}, ...}]")
BLOCKDEV_DEL = CommandSpec("blockdev-del", {"node-name": Arg("str")}, doc="close a block node no export uses")
EXPORT_ADD = CommandSpec("block-export-add", {
    "type": Arg(("nbd", "vhost-user-blk")), "id": Arg("str"), "node-name": Arg("str"),
    "name": Arg("str", True, "nbd: the export name (default: the node name)"),
    "writable": Arg("bool", True, "default false, as QEMU"),
    "description": Arg("str", True, "nbd: accepted; qbackend does not send descriptions"),
    "allocation-depth": Arg("bool", True, "nbd: accepted; qbackend always offers qemu:allocation-depth"),
    "addr": Arg("object", True, "vhost-user-blk: SocketAddress {type: unix, path: PATH}"),
    "num-queues": Arg("int", True, "vhost-user-blk: queues at most (default 1)"),
    "logical-block-size": Arg("int", True, "vhost-user-blk: 512 only"),
}, doc="export a block node over NBD, or to QEMU's vhost-user-blk-pci")
EXPORT_DEL = CommandSpec("block-export-del", {"id": Arg("str"), "mode": Arg(("safe", "hard"), True)},
                         doc="remove an export: safe (default) refuses while clients use it, hard drops them")
QUERY = CommandSpec("query-block-exports", doc="the exports", returns="[{type, id, node-name, shutting-down}]")


def _address(addr: dict[str, Any]) -> tuple[Path | None, tuple[str, int] | None]:
    kind, data = addr.get("type"), addr.get("data")
    if not isinstance(data, dict) or set(addr) != {"type", "data"}:
        raise QmpCommandError("'addr' is {'type': 'unix'|'inet', 'data': {...}}")
    if kind == "unix" and isinstance(data.get("path"), str) and set(data) <= {"path", "abstract", "tight"}:
        return Path(data["path"]), None
    if kind == "inet" and isinstance(data.get("host"), str) and isinstance(data.get("port"), str):
        if not data["port"].isdigit() or int(data["port"]) > 65535:
            raise QmpCommandError(f"invalid port '{data['port']}'")
        return None, (data["host"], int(data["port"]))
    raise QmpCommandError("'addr' is {'type': 'unix', 'data': {'path': ...}} or "
                          "{'type': 'inet', 'data': {'host': ..., 'port': '...'}}")


def _unix_path(addr: object) -> Path:
    """A vhost-user-blk export's SocketAddress (flat, as qemu-storage-daemon's)."""
    if isinstance(addr, dict) and addr.get("type") == "unix" and isinstance(addr.get("path"), str) \
            and set(addr) <= {"type", "path", "abstract", "tight"} and not addr.get("abstract"):
        return Path(addr["path"])
    raise QmpCommandError("vhost-user-blk needs 'addr': {'type': 'unix', 'path': PATH}")


def _file(args: dict[str, Any]) -> Path | str:
    """A node's file: its path, or the name of the file node it names."""
    driver, file, filename = args["driver"], args.get("file"), args.get("filename")
    if driver == "file":
        if filename is None:
            raise QmpCommandError("Parameter 'filename' is missing")
        if file is not None:
            raise QmpCommandError("Parameter 'file' is unexpected")
        return Path(filename)
    if file is None:
        raise QmpCommandError("Parameter 'file' is missing")
    if filename is not None:
        raise QmpCommandError("Parameter 'filename' is unexpected")
    if isinstance(file, str):  # a reference to a node, as in QEMU
        return file
    if isinstance(file, dict) and file.get("driver") == "file" and isinstance(file.get("filename"), str) \
            and set(file) <= {"driver", "filename", "node-name"}:
        return Path(file["filename"])
    raise QmpCommandError("'file' is {'driver': 'file', 'filename': PATH} or the name of a file node")


def register(monitor: QmpMonitor, backend: Backend) -> None:
    def blocks() -> BlockExports:
        return backend.blocks

    async def server_start(args: dict[str, Any]) -> object:
        if "tls-authz" in args:
            raise QmpCommandError("tls-authz is not supported by qbackend (object-add tls-creds-x509 "
                                  "verify-peer=true checks clients against the CA)")
        for name in ("max-connections", "handshake-max-seconds"):
            if not 0 <= args.get(name, 0) <= 0xFFFFFFFF:
                raise QmpCommandError(f"Parameter '{name}' expects uint32_t")
        seconds = args.get("handshake-max-seconds")
        socket_path, tcp = _address(args["addr"])
        await backend.start_nbd(socket_path, tcp, max_connections=args.get("max-connections"),
                                tls_creds=args.get("tls-creds"),
                                handshake_timeout=None if seconds is None else seconds or math.inf)
        return {}

    async def server_stop(args: dict[str, Any]) -> object:
        await blocks().stop_server()
        return {}

    async def blockdev_add(args: dict[str, Any]) -> object:
        await blocks().add_node_async(args["node-name"], args["driver"], _file(args), args.get("read-only", False))
        return {}

    async def blockdev_del(args: dict[str, Any]) -> object:
        blocks().del_node(args["node-name"])
        return {}

    async def export_add(args: dict[str, Any]) -> object:
        if args["type"] == "vhost-user-blk":
            if "name" in args or "description" in args:
                raise QmpCommandError("'name' and 'description' are for type nbd")
            if args.get("logical-block-size", 512) != 512:
                raise QmpCommandError("logical-block-size: qbackend serves 512-byte sectors only")
            blocks().add_vhost_user_blk(args["id"], args["node-name"], _unix_path(args.get("addr")),
                                        args.get("writable", False), args.get("num-queues", 1),
                                        handshake_timeout=backend.handshake_timeout)
            return {}
        if {"addr", "num-queues", "logical-block-size"} & set(args):
            raise QmpCommandError("'addr', 'num-queues' and 'logical-block-size' are for type vhost-user-blk")
        blocks().add_export(args["id"], args["node-name"], args.get("name"), args.get("writable", False))
        return {}

    async def export_del(args: dict[str, Any]) -> object:
        await blocks().del_export(args["id"], hard=args.get("mode", "safe") == "hard")
        return {}

    async def query(args: dict[str, Any]) -> object:
        return blocks().query()

    async def query_nodes(args: dict[str, Any]) -> object:
        return blocks().query_nodes()

    for spec, handler in ((SERVER_START, server_start), (SERVER_STOP, server_stop), (BLOCKDEV_ADD, blockdev_add),
                          (BLOCKDEV_DEL, blockdev_del), (EXPORT_ADD, export_add), (EXPORT_DEL, export_del),
                          (QUERY, query), (QUERY_NODES, query_nodes)):
        monitor.register(spec, handler)
