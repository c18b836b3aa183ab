"""One request over a whole 1 TiB QED overlay (extended headers: 64-bit lengths), from a
hostile or merely ambitious client: WRITE_ZEROES, BLOCK_STATUS and TRIM are walked in
bounded steps, so the server's memory stays flat, the request is answered (BLOCK_STATUS
possibly shorter than asked, as NBD allows) and another client's 4 KiB reads keep their
latency meanwhile.

Measured here (2 vCPUs, shared), for the record: before this, one WRITE_ZEROES took 8.9 s
and 3.3 GiB of RSS, a BLOCK_STATUS after it 17 s and a TRIM 13 s, each stalling the other
client's reads for as long; now 0.2-0.6 s, +35 MiB (the L2 cache, 32 MiB at most), 8-25 ms
(one reply: 32 GiB of zero clusters) and 0.4 s, the other client's p99 under 3 ms.
qemu-nbd 11.1 on the same image: WRITE_ZEROES 5.1 s and +2 GiB RSS, its other client
waiting 4.3 s; it also marks the clusters past the backing file's end (we leave them: they
read zeros anyway)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from nbd_raw_client import RawNbd

from qbackend.block.blockfile import FileBlock
from qbackend.block.qed import QedImage
from qbackend.protocol import nbd
from qbackend.testing.harness import wait_until

TiB = 1 << 40
# RSS growth allowed over one request: the image's L2 cache (DEFAULT_L2_CACHE_BYTES, 32 MiB)
# plus slack for the interpreter.
RSS_BOUND = 96 << 20


def _connect(sock: Path, meta: tuple[str, ...] = ()) -> RawNbd:
    c = RawNbd(str(sock), timeout=120)
    c.client_flags()
    c.option(nbd.Option.EXTENDED_HEADERS)
    assert c.opt_reply().type == nbd.OptionReply.ACK
    if meta:
        payload = struct.pack(">I", 0) + struct.pack(">I", len(meta))
        for q in meta:
            payload += struct.pack(">I", len(q)) + q.encode()
        c.option(nbd.Option.SET_META_CONTEXT, payload)
        c.replies_until_final()
    c.option(nbd.Option.GO, struct.pack(">IH", 0, 0))
    c.replies_until_final()
    return c


def _request(c: RawNbd, cmd: int, offset: int, length: int, data: bytes = b"") -> None:
    c.cookie += 1
    c.sock.sendall(nbd.EXTENDED_REQUEST.pack(nbd.EXTENDED_REQUEST_MAGIC, 0, cmd, c.cookie, offset, length) + data)


def _replies(c: RawNbd) -> list[tuple[int, bytes]]:
    out = []
    while True:
        _magic, flags, rtype, _cookie, _offset, length = nbd.EXTENDED_HEADER.unpack(c.recv_exact(32))
        out.append((rtype, c.recv_exact(length)))
        if flags & nbd.REPLY_FLAG_DONE:
            return out


def _extents(payload: bytes) -> list[tuple[int, int]]:
    _cid, n = struct.unpack_from(">II", payload)
    return [struct.unpack_from(">QQ", payload, 8 + 16 * i) for i in range(n)]


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError("no VmRSS")


@pytest.fixture
def served(tmp_path: Path):  # type: ignore[no-untyped-def]
    with open(tmp_path / "base.raw", "wb") as f:
        f.truncate(TiB)  # sparse: every cluster of the overlay shows it
    fb = FileBlock.open(tmp_path / "ov.qed", create=True)
    try:
        QedImage.create(fb, TiB, backing_file="base.raw", backing_raw=True)
    finally:
        fb.close()
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "nbd", "--export",
                             f"name=,image={tmp_path / 'ov.qed'},format=qed", "--socket", str(sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(sock.exists, 30, "the NBD socket")
        c = _connect(sock)
        _request(c, nbd.Cmd.WRITE, 0, 1 << 20, b"\x5a" * (1 << 20))  # what the bystander reads
        assert _replies(c)[0][0] == nbd.ChunkType.NONE
        c.close()
        yield proc, sock, tmp_path / "ov.qed"
    finally:
        proc.terminate()
        proc.wait(60)


def _one_huge_request(proc: subprocess.Popen[bytes], sock: Path, cmd: int) -> tuple[list[tuple[int, bytes]], dict[str, float]]:
    """Send cmd over the whole export while another client reads 4 KiB again and again;
    (replies, figures)."""
    latencies: list[float] = []
    stop = threading.Event()

    def bystander() -> None:
        b = _connect(sock)
        while not stop.is_set():
            t = time.perf_counter()
            _request(b, nbd.Cmd.READ, 4096, 4096)
            rtype, payload = _replies(b)[0]
            latencies.append(time.perf_counter() - t)
            assert rtype == nbd.ChunkType.OFFSET_DATA and len(payload) == 8 + 4096  # (zeroed by then, or not)
            time.sleep(0.001)
        b.close()

    thread = threading.Thread(target=bystander)
    thread.start()
    c = _connect(sock, (nbd.BASE_ALLOCATION, nbd.ALLOCATION_DEPTH))
    time.sleep(0.2)
    rss0 = peak = _rss(proc.pid)
    started = time.monotonic()
    _request(c, cmd, 0, TiB)
    got: list[list[tuple[int, bytes]]] = []
    reader = threading.Thread(target=lambda: got.append(_replies(c)))
    reader.start()
    while reader.is_alive():
        peak = max(peak, _rss(proc.pid))
        reader.join(0.01)
    seconds = time.monotonic() - started
    time.sleep(0.1)
    stop.set()
    thread.join()
    c.close()
    during = sorted(latencies)
    figures = {"seconds": seconds, "rss_growth": peak - rss0, "reads": len(during),
               "p99": during[min(len(during) - 1, int(0.99 * len(during)))], "max": during[-1]}
    print(nbd.Cmd(cmd).name, {k: round(v, 4) for k, v in figures.items()})
    return got[0], figures


def _assert_bounded(figures: dict[str, float]) -> None:
    assert figures["rss_growth"] < RSS_BOUND, figures
    # Generous: the machine is shared.  Before, one read waited as long as the whole request.
    assert figures["max"] < 2.0 and figures["p99"] < 0.05, figures


def test_write_zeroes_then_block_status_then_trim_over_1_tib(served) -> None:  # type: ignore[no-untyped-def]
    proc, sock, image = served
    replies, figures = _one_huge_request(proc, sock, nbd.Cmd.WRITE_ZEROES)
    assert [rtype for rtype, _ in replies] == [nbd.ChunkType.NONE], replies
    assert figures["seconds"] < 30, figures
    _assert_bounded(figures)
    # 1 TiB of zero clusters: 512 L2 tables of 256 KiB (as QEMU writes them), nothing more
    assert os.path.getsize(image) <= (1 << 20) + 512 * (256 << 10) + (1 << 20)

    replies, figures = _one_huge_request(proc, sock, nbd.Cmd.BLOCK_STATUS)
    assert figures["seconds"] < 1, figures
    _assert_bounded(figures)
    assert len(replies) == 2
    for rtype, payload in replies:
        assert rtype == nbd.ChunkType.BLOCK_STATUS_EXT
        extents = _extents(payload)
        total = sum(n for n, _ in extents)
        assert 1 << 20 < total <= TiB  # a prefix: shorter than asked is allowed
    base = _extents(replies[0][1])
    assert base[0] == (1 << 20, 0) and base[1][1] == 3  # data, then zero clusters (hole|zero)

    replies, figures = _one_huge_request(proc, sock, nbd.Cmd.TRIM)
    assert [rtype for rtype, _ in replies] == [nbd.ChunkType.NONE], replies
    assert figures["seconds"] < 30, figures
    _assert_bounded(figures)


def test_block_status_walks_1_tib_in_short_replies(served) -> None:  # type: ignore[no-untyped-def]
    """A client asking again from where each reply ended (as QEMU's does) gets the whole
    map, in bounded requests, however the image is laid out."""
    _proc, sock, _image = served
    c = _connect(sock, (nbd.BASE_ALLOCATION,))
    _request(c, nbd.Cmd.WRITE_ZEROES, 0, TiB)
    assert _replies(c)[0][0] == nbd.ChunkType.NONE
    pos = 0
    requests = 0
    while pos < TiB:
        started = time.monotonic()
        _request(c, nbd.Cmd.BLOCK_STATUS, pos, TiB - pos)
        (rtype, payload), = _replies(c)
        assert time.monotonic() - started < 1
        step = sum(n for n, _ in _extents(payload))
        assert 0 < step <= TiB - pos
        pos += step
        requests += 1
    assert requests <= 64
    c.close()
