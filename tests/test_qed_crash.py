"""Crash safety with real processes: a forked child does allocating writes and
flushes on an image file and is killed with SIGKILL at a random moment.  After
reopening (which repairs a NEED_CHECK image), every write acknowledged by a
completed flush reads back and `qemu-img check` is clean.  The same image goes
through every round, with and without a raw backing file."""

from __future__ import annotations

import os
import random
import select
import signal
import time
from pathlib import Path

import pytest
from qed_tools import qemu_check

from qbackend.block.blockfile import FileBlock
from qbackend.block.qed import QedImage

KiB = 1024
MiB = 1 << 20
SIZE = 8 * MiB
ROUNDS = 200
OPS = 80


def script(seed: int) -> list[tuple[str, int, int]]:
    """The child's operations: (kind, offset, length); the parent replays them."""
    rng = random.Random(seed)
    out = []
    for _ in range(OPS):
        r = rng.random()
        off = rng.randrange(0, SIZE - 1)
        n = min(rng.choice([1, 512, 3000, 4096, 9000, 70000]), SIZE - off)
        out.append(("flush", 0, 0) if r < 0.2 else ("zero", off, n) if r < 0.3 else ("write", off, n))
    return out


def data_for(seed: int, i: int, n: int) -> bytes:
    return random.Random(seed * 1000 + i).randbytes(n)


def child(path: Path, seed: int, wfd: int) -> None:
    """Runs in the forked child; reports b'F<i>\\n' after a flush covering ops < i completes."""
    img = QedImage.open_path(path)
    os.write(wfd, b"O\n")
    for i, (kind, off, n) in enumerate(script(seed)):
        if kind == "write":
            img.write(off, data_for(seed, i, n))
        elif kind == "zero":
            img.write_zeroes(off, n)
        else:
            img.flush()
            os.write(wfd, f"F{i}\n".encode())
    img.flush()
    os.write(wfd, f"F{OPS}\n".encode())
    time.sleep(10)  # wait to be killed


def apply(model: bytearray, touched: bytearray | None, seed: int, ops: list[tuple[str, int, int]],
          start: int, stop: int) -> None:
    for i in range(start, stop):
        kind, off, n = ops[i]
        if kind == "write":
            model[off:off + n] = data_for(seed, i, n)
        elif kind == "zero":
            model[off:off + n] = bytes(n)
        if touched is not None and kind != "flush":
            touched[off:off + n] = b"\x01" * n


def run_and_kill(path: Path, seed: int, delay: float) -> int:
    """Fork a writer, kill it after ``delay`` s of writing; returns how many ops a flush acknowledged."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(rfd)
        try:
            child(path, seed, wfd)
        finally:
            os._exit(0)
    os.close(wfd)
    acked = 0
    buf = b""
    deadline = None
    try:
        while True:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([rfd], [], [], timeout)
            if not ready:
                break
            chunk = os.read(rfd, 4096)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line == b"O" and deadline is None:
                    deadline = time.monotonic() + delay
                elif line.startswith(b"F"):
                    acked = int(line[1:])
            if acked == OPS:
                break
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        # lines written before the kill still count: the flush had completed
        while True:
            ready, _, _ = select.select([rfd], [], [], 0)
            if not ready:
                break
            chunk = os.read(rfd, 4096)
            if not chunk:
                break
            buf += chunk
        for line in buf.split(b"\n"):
            if line.startswith(b"F"):
                acked = max(acked, int(line[1:]))
        os.close(rfd)
    return acked


@pytest.mark.parametrize("backing", [False, True], ids=["plain", "raw-backing"])
def test_sigkill_during_allocating_writes_loses_no_flushed_write(tmp_path: Path, backing: bool) -> None:
    rng = random.Random(4 if backing else 3)
    path = tmp_path / "crash.qed"
    model = bytearray(SIZE)
    if backing:
        base = random.Random(9).randbytes(SIZE // 2 + 777)
        (tmp_path / "base.raw").write_bytes(base)
        model[:len(base)] = base
    f = FileBlock.open(path, create=True)
    QedImage.create(f, SIZE, cluster_size=4096, table_size=2, backing_file="base.raw" if backing else None,
                    backing_raw=backing)
    f.close()
    repaired = 0
    started = time.monotonic()
    for rnd in range(ROUNDS // 2):
        seed = rng.randrange(1 << 30)
        ops = script(seed)
        acked = run_and_kill(path, seed, delay=rng.choice([0.0, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.015]))
        durable = bytearray(model)
        apply(durable, None, seed, ops, 0, acked)
        touched = bytearray(SIZE)
        apply(bytearray(SIZE), touched, seed, ops, acked, OPS)
        with QedImage.open_path(path) as img:
            if img.open_check is not None:
                repaired += 1
                assert img.open_check.corruptions_remaining == 0, img.open_check
            got = img.read(0, SIZE)
            pos = 0
            while pos < SIZE:
                a = touched.find(0, pos)
                if a < 0:
                    break
                b = touched.find(1, a)
                b = SIZE if b < 0 else b
                assert got[a:b] == durable[a:b], f"round {rnd}: flushed data lost in [{a:#x}, {b:#x})"
                pos = b
            model = bytearray(got)
        rc, report, err = qemu_check(path)
        assert rc == 0, (rnd, report, err)
    assert repaired > 0, "no round left the image dirty: the kills came too late"
    assert time.monotonic() - started < 60
