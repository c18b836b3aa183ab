"""TLS server credentials, laid out as QEMU's `tls-creds-x509` reads them.

A directory holding ``ca-cert.pem``, ``server-cert.pem`` and
``server-key.pem`` (the same files qemu-nbd, qemu-storage-daemon and
nbdkit take), read with Python's `ssl`.  With `verify_peer`, a client must
present a certificate signed by ``ca-cert.pem``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from qbackend.errors import UsageError

FILES = ("ca-cert.pem", "server-cert.pem", "server-key.pem")


def server_context(creds: Path, *, verify_peer: bool = False) -> ssl.SSLContext:
    """An SSL context for the server side; UsageError naming a missing or unusable file."""
    missing = [name for name in FILES if not (creds / name).is_file()]
    if missing and not (missing == ["ca-cert.pem"] and not verify_peer):
        raise UsageError(f"--tls-creds {creds}: missing {', '.join(missing)} (the layout of QEMU's tls-creds-x509)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(creds / "server-cert.pem", creds / "server-key.pem")
        if verify_peer:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(creds / "ca-cert.pem")
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"--tls-creds {creds}: cannot use the certificates: {exc}") from None
    return context
