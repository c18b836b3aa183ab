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
from qbackend.block.qed import QedBackingError, QedImage
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
