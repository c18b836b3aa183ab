"""Format probing cannot be turned against the host (the attack QEMU closed
with its sector-0 rule): a client writes a QED header naming a host file as
backing into the first sector of a raw export; whatever way the file is
opened next, the host file's bytes never reach a client."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
from qed_tools import qemu, run_tool

from qbackend.testing.harness import wait_until

SIZE = 1 << 20
SECRET_BYTES = b"host-secret:" + bytes(range(256)) * 8  # what a host file holds that no client may read


def qed_header_naming(backing: Path) -> bytes:
    """A QED header (cluster 4 KiB, tables of 1 cluster) whose backing file is `backing`."""
    name = str(backing).encode()
    features = 0x1 | 0x4  # backing file, raw (no probing)
    header = struct.pack("<4sIIIQQQQQII", b"QED\0", 4096, 1, 1, features, 0, 0, 4096, SIZE, 64, len(name))
    return header + name


def serve(image: Path, keys: str, sock: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "qbackend", "nbd", "--export", f"name=x,image={image}{keys}",
                             "--socket", str(sock)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    out, _ = proc.communicate(timeout=20)
    return out


@pytest.fixture
def poisoned(tmp_path: Path) -> Path:
    """A raw image whose first sector a client overwrote through a (format=raw) export,
    with a QED header naming a host file (as /etc/hostname was in the report)."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET_BYTES.ljust(SIZE, b"s"))
    image = tmp_path / "raw.img"
    image.write_bytes(bytes(SIZE))
    sock = tmp_path / "w.sock"
    proc = serve(image, ",format=raw", sock)
    try:
        wait_until(sock.exists, 30, "the export's socket")
        header = tmp_path / "header.bin"
        header.write_bytes(qed_header_naming(secret).ljust(512, b"\0"))
        run_tool("qemu-io", "-f", "raw", "-c", f"write -s {header} 0 512", f"nbd+unix:///x?socket={sock}")
    finally:
        stop(proc)
    assert image.read_bytes()[:4] == b"QED\0"  # the write went through: raw is raw
    return image


def read_export(sock: Path) -> bytes:
    """The whole export, as libnbd's nbdcopy reads it."""
    out = subprocess.run(["nbdcopy", f"nbd+unix:///x?socket={sock}", "-"], capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_reopened_as_raw_serves_the_clients_own_bytes(poisoned: Path, tmp_path: Path) -> None:
    sock = tmp_path / "r.sock"
    proc = serve(poisoned, ",format=raw", sock)
    try:
        wait_until(sock.exists, 30, "the export's socket")
        data = read_export(sock)
    finally:
        stop(proc)
    assert len(data) == SIZE and data.startswith(b"QED\0") and SECRET_BYTES not in data


def test_a_writable_export_without_format_is_refused(poisoned: Path, tmp_path: Path) -> None:
    proc = serve(poisoned, "", tmp_path / "p.sock")
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 1 and "give format=qed or format=raw" in out and "Traceback" not in out


def test_a_probed_read_only_export_does_not_follow_the_backing_file(poisoned: Path, tmp_path: Path) -> None:
    proc = serve(poisoned, ",readonly=on", tmp_path / "p.sock")
    out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 1 and "probing does not follow backing files" in out


def test_a_probed_read_only_qed_without_backing_is_served(tmp_path: Path) -> None:
    image = tmp_path / "plain.qed"
    run_tool("qemu-img", "create", "-f", "qed", str(image), "1M")
    sock = tmp_path / "q.sock"
    proc = serve(image, ",readonly=on", sock)
    try:
        wait_until(sock.exists, 30, "the export's socket")
        info = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///x?socket={sock}"], capture_output=True,
                              text=True, timeout=30)
        assert info.stdout.strip() == str(1 << 20)
    finally:
        stop(proc)
    assert qemu().version[:2] >= (10, 1)
