"""NBD over TLS (NBD_OPT_STARTTLS) with X.509 credentials in QEMU's
tls-creds-x509 layout, against real clients: libnbd's nbdinfo and nbdcopy
(nbds+unix:// with tls-certificates=) and QEMU's own NBD client (qemu-io
with --object tls-creds-x509,endpoint=client).  Certificates are made for
the test with trustme."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from nbd_raw_client import RawNbd
from qed_tools import qemu, qemu_img, run_tool

from qbackend.protocol import nbd
from qbackend.testing.harness import wait_until

SIZE = 16 << 20


@dataclass
class Creds:
    server: Path  # ca-cert.pem, server-cert.pem, server-key.pem
    client: Path  # ca-cert.pem, client-cert.pem, client-key.pem (signed by the same CA)
    stranger: Path  # a client certificate from another CA


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Creds:
    root = tmp_path_factory.mktemp("tls")
    ca, other_ca = trustme.CA(), trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    client = ca.issue_cert("client.example")
    stranger = other_ca.issue_cert("client.example")
    ca_pem = ca.cert_pem.bytes()
    return Creds(
        _write(root / "server", {"ca-cert.pem": ca_pem, "server-cert.pem": server.cert_chain_pems[0].bytes(),
                                 "server-key.pem": server.private_key_pem.bytes()}),
        _write(root / "client", {"ca-cert.pem": ca_pem, "client-cert.pem": client.cert_chain_pems[0].bytes(),
                                 "client-key.pem": client.private_key_pem.bytes()}),
        _write(root / "stranger", {"ca-cert.pem": ca_pem, "client-cert.pem": stranger.cert_chain_pems[0].bytes(),
                                   "client-key.pem": stranger.private_key_pem.bytes()}))


@dataclass
class Server:
    sock: Path
    image: Path
    proc: subprocess.Popen[str]

    def uri(self, certs: Path) -> str:
        return f"nbds+unix:///x?socket={self.sock}&tls-certificates={certs}"


def _start(tmp: Path, creds: Creds, *extra: str) -> Iterator[Server]:
    image = tmp / "tls.qed"
    qemu_img("create", "-f", "qed", str(image), str(SIZE))
    sock = tmp / "nbd.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "nbd", "--export", f"name=x,image={image},format=qed",
                             "--socket", str(sock), "--tls-creds", str(creds.server), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(sock.exists, 30, "the NBD socket")
        yield Server(sock, image, proc)
    finally:
        proc.terminate()
        proc.communicate(timeout=30)


@pytest.fixture
def required(tmp_path: Path, creds: Creds) -> Iterator[Server]:
    yield from _start(tmp_path, creds)


@pytest.fixture
def verifying(tmp_path: Path, creds: Creds) -> Iterator[Server]:
    yield from _start(tmp_path, creds, "--tls-verify-peer")


def test_libnbd_reads_and_writes_over_tls(required: Server, creds: Creds, tmp_path: Path) -> None:
    info = subprocess.run(["nbdinfo", "--size", required.uri(creds.client)], capture_output=True, text=True,
                          timeout=30)
    assert info.returncode == 0 and info.stdout.strip() == str(SIZE), info.stderr
    pattern = tmp_path / "pattern"
    pattern.write_bytes(bytes(range(256)) * (SIZE // 256))
    copy_in = subprocess.run(["nbdcopy", str(pattern), required.uri(creds.client)], capture_output=True,
                             timeout=120)
    assert copy_in.returncode == 0, copy_in.stderr
    back = tmp_path / "back"
    copy_out = subprocess.run(["nbdcopy", required.uri(creds.client), str(back)], capture_output=True, timeout=120)
    assert copy_out.returncode == 0, copy_out.stderr
    assert back.read_bytes() == pattern.read_bytes()


def test_qemu_reads_and_writes_over_tls(required: Server, creds: Creds) -> None:
    # Over a UNIX socket QEMU has no host name to check the certificate against: it is told one.
    opts = f"driver=nbd,server.type=unix,server.path={required.sock},export=x,tls-creds=tls0,tls-hostname=localhost"
    tls = f"tls-creds-x509,id=tls0,dir={creds.client},endpoint=client"
    run_tool("qemu-io", "--object", tls, "--image-opts", "-c", "write -P 0x3c 1M 64k", opts)
    out = run_tool("qemu-io", "--object", tls, "--image-opts", "-c", "read -P 0x3c 1M 64k", opts)
    assert "Pattern verification failed" not in out.stdout
    assert qemu().version[:2] >= (10, 1)


def test_a_client_without_tls_gets_tls_reqd(required: Server) -> None:
    raw = RawNbd(str(required.sock))
    try:
        raw.client_flags()
        raw.option(nbd.Option.LIST)
        assert raw.opt_reply().type == nbd.OptionReply.ERR_TLS_REQD
        name = b"x"
        raw.option(nbd.Option.GO, struct_go(name))
        assert raw.opt_reply().type == nbd.OptionReply.ERR_TLS_REQD
        raw.option(nbd.Option.STARTTLS, b"junk")
        assert raw.opt_reply().type == nbd.OptionReply.ERR_INVALID  # STARTTLS takes no data
    finally:
        raw.close()
    plain = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///x?socket={required.sock}"], capture_output=True,
                           text=True, timeout=30)
    assert plain.returncode != 0


def struct_go(name: bytes) -> bytes:
    return len(name).to_bytes(4, "big") + name + (0).to_bytes(2, "big")


def test_an_untrusted_client_certificate_is_refused(verifying: Server, creds: Creds) -> None:
    trusted = subprocess.run(["nbdinfo", "--size", verifying.uri(creds.client)], capture_output=True, text=True,
                             timeout=30)
    assert trusted.returncode == 0, trusted.stderr
    stranger = subprocess.run(["nbdinfo", "--size", verifying.uri(creds.stranger)], capture_output=True,
                              text=True, timeout=30)
    assert stranger.returncode != 0


def test_tls_on_offers_without_requiring(tmp_path: Path, creds: Creds) -> None:
    for server in _start(tmp_path, creds, "--tls", "on"):
        plain = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///x?socket={server.sock}"], capture_output=True,
                               text=True, timeout=30)
        assert plain.returncode == 0 and plain.stdout.strip() == str(SIZE)
        secure = subprocess.run(["nbdinfo", "--size", server.uri(creds.client)], capture_output=True, text=True,
                                timeout=30)
        assert secure.returncode == 0 and secure.stdout.strip() == str(SIZE)


def test_bad_credentials_are_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "qbackend", "nbd", "--export", "image=x,format=raw",
                             "--socket", str(tmp_path / "s"), "--tls-creds", str(tmp_path)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "missing" in result.stderr and "Traceback" not in result.stderr
