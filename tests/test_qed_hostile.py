"""Hostile QED images are refused quickly with one line: a backing chain that
loops (by name or through another name of the same file), a backing file or
image that is a FIFO (it would block the opener for good)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qbackend.block.blockfile import FileBlock
from qbackend.block.qed import QedBackingError, QedHeader, QedImage
from qbackend.errors import ImageError


def _create(path: Path, size: int, backing: str | None = None) -> None:
    f = FileBlock.open(path, create=True)
    try:
        QedImage.create(f, size, backing_file=backing)
    finally:
        f.close()


@pytest.mark.parametrize("shape", ["itself", "another-name", "two-files"])
def test_a_backing_chain_that_loops_is_refused(tmp_path: Path, shape: str) -> None:
    top = tmp_path / "top.qed"
    if shape == "itself":
        _create(top, 1 << 20, backing="top.qed")
    elif shape == "another-name":
        (tmp_path / "alias.qed").symlink_to(top)
        _create(top, 1 << 20, backing="alias.qed")
    else:
        _create(tmp_path / "base.qed", 1 << 20, backing="top.qed")
        _create(top, 1 << 20, backing="base.qed")
    started = time.monotonic()
    with pytest.raises(QedBackingError, match="already in the chain"):
        QedImage.open_path(top, read_only=True)
    assert time.monotonic() - started < 2


def test_a_fifo_backing_file_is_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "base.raw")
    _create(tmp_path / "top.qed", 1 << 20, backing="base.raw")
    with pytest.raises(QedBackingError, match="FIFO"):
        QedImage.open_path(tmp_path / "top.qed", read_only=True)


def test_a_fifo_image_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "disk.qed")
    with pytest.raises(ImageError, match="FIFO"):
        FileBlock.open(tmp_path / "disk.qed", writable=False)


def test_qed_map_answers_a_looping_chain_in_one_line(tmp_path: Path) -> None:
    """(qed info and check, as qemu-img's, do not open the backing file: they succeed.)"""
    _create(tmp_path / "top.qed", 1 << 20, backing="top.qed")
    proc = subprocess.run([sys.executable, "-m", "qbackend", "qed", "map", str(tmp_path / "top.qed")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "chain" in proc.stderr, proc.stderr


def test_nbd_refuses_a_fifo_backing_file_in_one_line(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "base.raw")
    _create(tmp_path / "top.qed", 1 << 20, backing="base.raw")
    proc = subprocess.run([sys.executable, "-m", "qbackend", "nbd", "--export",
                           f"image={tmp_path / 'top.qed'},format=qed", "--socket", str(tmp_path / "n.sock")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "FIFO" in proc.stderr, proc.stderr


# -- sizes a header claims, against the file's real size ------------------------------------


def _huge_l1_image(path: Path) -> None:
    """64 MiB clusters, table_size 16: a 1 GiB L1 table, in a sparse file just big enough
    for it; a 1 GiB guest."""
    cs = 64 << 20
    header = QedHeader(cluster_size=cs, table_size=16, header_size=1, features=0, compat_features=0,
                       autoclear_features=0, l1_table_offset=cs, image_size=1 << 30)
    with open(path, "wb") as f:
        f.write(header.pack())
        f.truncate(cs + 16 * cs)


def test_a_1_gib_l1_table_in_a_sparse_file_opens_in_bounded_memory(tmp_path: Path) -> None:
    """Only the L1 entries the guest size reaches are read (here one): QEMU reads the whole
    table (1 GiB of memory); before this qbackend read it too, and kept it twice over."""
    _huge_l1_image(tmp_path / "big-l1.qed")
    script = ("import resource, time\n"
              "from qbackend.block.qed import QedImage\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "t = time.monotonic()\n"
              f"img = QedImage.open_path({str(tmp_path / 'big-l1.qed')!r}, read_only=True)\n"
              "assert img.read(0, 4096) == bytes(4096)\n"
              "img.close()\n"
              "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, time.monotonic() - t)\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    grown_kib, seconds = proc.stdout.split()
    assert int(grown_kib) < 64 << 10 and float(seconds) < 2, proc.stdout


def test_a_1_gib_l1_table_in_a_small_file_is_refused_in_one_line(tmp_path: Path) -> None:
    _huge_l1_image(tmp_path / "big-l1.qed")
    os.truncate(tmp_path / "big-l1.qed", 1 << 20)
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "qbackend", "qed", "info", str(tmp_path / "big-l1.qed")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "l1_table_offset" in proc.stderr, proc.stderr
    assert time.monotonic() - started < 10


def _sparse_tib_image(path: Path) -> None:
    """A QED file of 1 TiB apparent size (4 KiB clusters) with a few clusters allocated at
    its end: everything before them is leaked, and takes no disk space."""
    _create_cs(path, 16 << 30, 4096)
    os.truncate(path, 1 << 40)
    img = QedImage.open_path(path)
    img.write(0, b"\x11" * 8192)
    img.write(8 << 30, b"\x22" * 4096)
    img.close()


def _head(path: Path, n: int) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _create_cs(path: Path, size: int, cs: int) -> None:
    f = FileBlock.open(path, create=True)
    try:
        QedImage.create(f, size, cluster_size=cs, table_size=4)
    finally:
        f.close()


def _peak_rss_of(cmd: list[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run cmd in a child of a fresh child, so RUSAGE_CHILDREN is that command's own peak."""
    script = ("import resource, subprocess, sys, json\n"
              f"p = subprocess.run({cmd!r}, capture_output=True, text=True)\n"
              "print(json.dumps([p.returncode, p.stdout, p.stderr, "
              "resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss]))\n")
    import json

    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    rc, stdout, stderr, kib = json.loads(out.stdout)
    return subprocess.CompletedProcess(cmd, rc, stdout, stderr), kib << 10


def test_qed_check_of_a_sparse_1_tib_file_in_bounded_memory(tmp_path: Path) -> None:
    """2 bytes per cluster of the file's apparent size before (512 MiB here); now one byte
    per cluster in memory that is resident only where something is referenced."""
    _sparse_tib_image(tmp_path / "sparse.qed")
    proc, peak = _peak_rss_of([sys.executable, "-m", "qbackend", "qed", "check", str(tmp_path / "sparse.qed")])
    assert proc.returncode == 3, proc.stdout + proc.stderr  # leaks only
    assert "268435451 leaked clusters" in proc.stdout, proc.stdout
    assert peak < 128 << 20, peak


def test_a_read_write_open_with_need_check_of_a_sparse_1_tib_file_in_bounded_memory(tmp_path: Path) -> None:
    from dataclasses import replace

    from qed_tools import write_header

    from qbackend.block.qed import Feature

    _sparse_tib_image(tmp_path / "sparse.qed")
    h = QedHeader.unpack(_head(tmp_path / "sparse.qed", 64))
    write_header(tmp_path / "sparse.qed", replace(h, features=h.features | Feature.NEED_CHECK))
    script = ("from qbackend.block.qed import QedImage\n"
              f"img = QedImage.open_path({str(tmp_path / 'sparse.qed')!r})\n"
              "assert img.open_check is not None and img.read(0, 4) == b'\\x11' * 4\n"
              "img.close()\n")
    proc, peak = _peak_rss_of([sys.executable, "-c", script])
    assert proc.returncode == 0, proc.stderr
    assert peak < 128 << 20, peak


def test_qed_check_interrupted_says_one_line_and_exits_130(tmp_path: Path) -> None:
    """Ctrl-C during a check: one line, exit 130, the image untouched (a repair too, when the
    interrupt comes during its scan: it had written nothing yet, and close does not clear
    NEED_CHECK after an interrupted check)."""
    _sparse_tib_image(tmp_path / "sparse.qed")
    before = _head(tmp_path / "sparse.qed", 1 << 16), os.path.getsize(tmp_path / "sparse.qed")
    # SIGINT sent from inside the scan, the way a Ctrl-C arriving mid-scan comes.
    script = ("import os, signal, sys\n"
              "import qbackend.block.qed_check as c\n"
              "orig = c.QedCheck._check_table\n"
              "def interrupted(self, *a):\n"
              "    os.kill(os.getpid(), signal.SIGINT)\n"
              "    return orig(self, *a)\n"
              "c.QedCheck._check_table = interrupted\n"
              "from qbackend.app.cli import main\n"
              "sys.exit(main(sys.argv[1:]))\n")
    for extra in ([], ["--repair", "all"]):
        proc = subprocess.run([sys.executable, "-c", script, "qed", "check", *extra, str(tmp_path / "sparse.qed")],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 130, proc.stdout + proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "interrupted" in proc.stderr, proc.stderr
        after = _head(tmp_path / "sparse.qed", 1 << 16), os.path.getsize(tmp_path / "sparse.qed")
        assert after == before, extra  # (a finished repair would have truncated the leaked 1 TiB)


def test_an_interrupted_repair_leaves_need_check_set() -> None:
    from qbackend.block.blockfile import MemoryBlock
    from qbackend.block.qed import Feature

    m = MemoryBlock()
    QedImage.create(m, 1 << 20, cluster_size=4096, table_size=2)
    img = QedImage.open(m)
    img.write(0, b"x" * 4096)  # sets NEED_CHECK
    import qbackend.block.qed_check as qc

    orig = qc.QedCheck._check_table

    def interrupted(self: qc.QedCheck, *args: object) -> None:
        raise KeyboardInterrupt

    qc.QedCheck._check_table = interrupted  # type: ignore[method-assign]
    try:
        with pytest.raises(KeyboardInterrupt):
            img.check(repair=True)
    finally:
        qc.QedCheck._check_table = orig  # type: ignore[method-assign]
    img.close()
    assert QedHeader.unpack(bytes(m.data[:64])).features & Feature.NEED_CHECK
