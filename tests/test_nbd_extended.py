"""NBD_OPT_EXTENDED_HEADERS, as QEMU 11.1's own NBD client negotiates it
(qemu-io, qemu-img): 32-byte requests with 64-bit lengths, extended reply
chunks, 64-bit block status descriptors; READ and BLOCK_STATUS above 4 GiB
answered correctly; and a client that does not ask keeps the old headers."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

from nbd_raw_client import RawNbd
from qed_tools import qemu_img, run_tool

from qbackend.protocol import nbd
from qbackend.testing.harness import wait_until

GiB = 1 << 30


def test_qemu_negotiates_extended_headers_and_reaches_past_4_gib(tmp_path: Path) -> None:
    image = tmp_path / "big.raw"
    with open(image, "wb") as f:
        f.truncate(8 * GiB)  # sparse
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "-v", "nbd", "--export", f"name=x,image={image},"
                             "format=raw", "--socket", str(sock)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    uri = f"nbd+unix:///x?socket={sock}"
    try:
        wait_until(sock.exists, 30, "the NBD socket")
        run_tool("qemu-io", "-f", "raw", "-c", "write -P 0x5e 5G 1M", "-c", "write -P 0x6f 4294966784 1024", uri)
        out = run_tool("qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5e 5G 1M",
                       "-c", "read -P 0x6f 4294966784 1024", "-c", "read -P 0 6G 64k", uri)
        assert "Pattern verification failed" not in out.stdout, out.stdout
        extents = json.loads(qemu_img("map", "--output=json", "-f", "raw", uri).stdout)
        data = [(e["start"], e["length"]) for e in extents if e["data"]]
        assert (5 * GiB, 1 << 20) in data, extents  # the data extent above 4 GiB, found by BLOCK_STATUS
        assert any(start <= 4294966784 < start + length for start, length in data), extents
        assert extents[-1]["start"] + extents[-1]["length"] == 8 * GiB
    finally:
        proc.terminate()
        log, _ = proc.communicate(timeout=30)
    assert "extended headers: True" in log, log  # QEMU's client asked and got them
    with open(image, "rb") as f:
        f.seek(5 * GiB)
        assert f.read(1 << 20) == b"\x5e" * (1 << 20)


def test_a_raw_client_with_and_without_extended_headers(tmp_path: Path) -> None:
    image = tmp_path / "small.raw"
    image.write_bytes(bytes(range(256)) * 16)
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "nbd", "--export", f"name=x,image={image},format=raw",
                             "--socket", str(sock)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, 30, "the NBD socket")
        c = RawNbd(str(sock))
        c.client_flags()
        c.option(nbd.Option.EXTENDED_HEADERS)
        assert c.opt_reply().type == nbd.OptionReply.ACK
        c.go("x", structured=False, meta=False)
        c.sock.sendall(nbd.EXTENDED_REQUEST.pack(nbd.EXTENDED_REQUEST_MAGIC, 0, nbd.Cmd.READ, 7, 16, 8))
        magic, flags, rtype, cookie, offset, length = nbd.EXTENDED_HEADER.unpack(c.recv_exact(32))
        assert (magic, rtype, cookie, offset, length) == (nbd.EXTENDED_REPLY_MAGIC, nbd.ChunkType.OFFSET_DATA, 7, 16,
                                                          16)
        assert flags & nbd.REPLY_FLAG_DONE
        payload = c.recv_exact(length)
        assert struct.unpack(">Q", payload[:8])[0] == 16 and payload[8:] == bytes(range(16, 24))
        # An old-style request (read as the 32 bytes an extended one has) is a protocol error now.
        c.sock.sendall(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.Cmd.READ, 8, 0, 8) + bytes(4))
        assert c.closed_by_server()
        c.close()
        old = RawNbd(str(sock))  # and a client that never asks keeps the compact headers
        old.client_flags()
        old.go("x", structured=False, meta=False)
        old.sock.sendall(nbd.REQUEST.pack(nbd.REQUEST_MAGIC, 0, nbd.Cmd.READ, 9, 0, 4))
        magic, error, cookie = nbd.SIMPLE_REPLY.unpack(old.recv_exact(16))
        assert (magic, error, cookie) == (nbd.SIMPLE_REPLY_MAGIC, 0, 9) and old.recv_exact(4) == bytes(range(4))
        old.close()
    finally:
        proc.terminate()
        proc.wait(30)
