"""TLS server credentials, laid out as QEMU's `tls-creds-x509` reads them.

A directory holding ``ca-cert.pem``, ``server-cert.pem`` and
``server-key.pem`` (the same files qemu-nbd, qemu-storage-daemon and
nbdkit take), read with Python's `ssl`.  With `verify_peer`, a client must
present a certificate signed by ``ca-cert.pem``.

Two ways in: `server_context` for the command line (``--tls-creds DIR``),
and `X509Credentials.load` for QMP's ``object-add qom-type=tls-creds-x509``,
which checks the files as QEMU does (``ca-cert.pem`` always; QEMU's
defaults: endpoint ``client``, verify-peer on).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from qbackend.errors import UsageError

FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def server_context(creds: Path, *, verify_peer: bool = False, label: str = "") -> ssl.SSLContext:
    """An SSL context for the server side; UsageError naming a missing or unusable file
    (`label` says whose: by default, the option --tls-creds)."""
    label = label or f"--tls-creds {creds}"
    missing = [name for name in FILES if not (creds / name).is_file()]
    if missing and not (missing == ["ca-cert.pem"] and not verify_peer):
        raise UsageError(f"{label}: missing {', '.join(missing)} (the layout of QEMU's tls-creds-x509)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(creds / "server-cert.pem", creds / "server-key.pem")
        if verify_peer:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(creds / "ca-cert.pem")
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"{label}: cannot use the certificates: {exc}") from None
    return context


@dataclass(frozen=True)
class X509Credentials:
    """A tls-creds-x509 object: its files' folder, which end it is for, and (for a
    server) the context made from them when it was added."""

    id: str
    dir: Path
    endpoint: str  # "server" or "client"
    verify_peer: bool
    context: ssl.SSLContext | None  # None for a client endpoint: qbackend only serves

    @classmethod
    def load(cls, obj_id: str, folder: Path, endpoint: str = "client", verify_peer: bool = True) -> X509Credentials:
        """Read the files now, as QEMU does when the object is created; UsageError with
        QEMU's words for a file that cannot be read."""
        needed = ["ca-cert.pem"] + (["server-cert.pem", "server-key.pem"] if endpoint == "server" else [])
        for name in needed:
            try:
                with open(folder / name, "rb"):
                    pass
            except OSError as exc:
                raise UsageError(f"Unable to access credentials {folder / name}: {exc.strerror}") from None
        context = (server_context(folder, verify_peer=verify_peer, label=f"tls-creds-x509 '{obj_id}'")
                   if endpoint == "server" else None)
        return cls(obj_id, folder, endpoint, verify_peer, context)
