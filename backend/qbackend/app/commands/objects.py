"""QOM objects a qbackend process can hold, as qemu-storage-daemon's
``object-add`` / ``object-del`` make them: ``tls-creds-x509`` only, the
server credentials that ``nbd-server-start tls-creds=ID`` serves TLS with.

As in QEMU, the files are read when the object is added (endpoint
``client`` and verify-peer on by default), and ``object-del`` succeeds even
while a running NBD server uses the credentials: the server keeps what it
was started with.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbackend.errors import UsageError
from qbackend.plumbing.tls import X509Credentials
from qbackend.protocol.qmp import Arg, CommandSpec, QmpCommandError

if TYPE_CHECKING:
    from qbackend.app.service import Backend
    from qbackend.servers.qmp_monitor import QmpMonitor

OBJECT_ADD = CommandSpec("object-add", {
    "qom-type": Arg(("tls-creds-x509",)), "id": Arg("str"),
    "dir": Arg("str", doc="ca-cert.pem, and server-cert.pem and server-key.pem for endpoint=server"),
    "endpoint": Arg(("server", "client"), True, "default client, as QEMU; qbackend serves with server ones"),
    "verify-peer": Arg("bool", True, "default true, as QEMU: clients must present a certificate the CA signed"),
}, doc="add TLS credentials (tls-creds-x509), for nbd-server-start tls-creds")
OBJECT_DEL = CommandSpec("object-del", {"id": Arg("str")}, doc="remove an object")


def register(monitor: QmpMonitor, backend: Backend) -> None:
    credentials = backend.blocks.credentials

    async def object_add(args: dict[str, Any]) -> object:
        obj_id = args["id"]
        if obj_id in credentials:
            raise QmpCommandError(f"attempt to add duplicate property '{obj_id}' to object (type 'container')")
        try:
            credentials[obj_id] = X509Credentials.load(obj_id, Path(args["dir"]), args.get("endpoint", "client"),
                                                       args.get("verify-peer", True))
        except UsageError as exc:
            raise QmpCommandError(str(exc)) from None
        return {}

    async def object_del(args: dict[str, Any]) -> object:
        if credentials.pop(args["id"], None) is None:
            raise QmpCommandError(f"object '{args['id']}' not found")
        return {}

    monitor.register(OBJECT_ADD, object_add)
    monitor.register(OBJECT_DEL, object_del)
