"""QED writes from many threads at once (as NBD connections make them).

Allocating writes put their new clusters' data in the file outside the
image lock (block.qed, QedImage.write); a second write to a cluster that
is being allocated waits for it and then writes in place.  Were it to
allocate the cluster again, one of the two writes would be lost and a
cluster leaked: the checks below see both.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import pytest

from qbackend.block.qed import QedImage
from qbackend.machine.launch import find_qemu

CLUSTER = 64 << 10
PIECE = 4096


@pytest.mark.parametrize("with_backing", [False, True])
def test_writers_racing_for_the_same_clusters_all_land(tmp_path: Path, with_backing: bool) -> None:
    qemu = find_qemu()
    size = 32 * CLUSTER
    path = tmp_path / "race.qed"
    base = tmp_path / "base.raw"
    create = [*qemu.tool_cmd("qemu-img"), "create", "-f", "qed", "-o", f"cluster_size={CLUSTER}"]
    if with_backing:
        base.write_bytes(os.urandom(size))
        create += ["-b", str(base), "-F", "raw"]
    subprocess.run([*create, str(path), str(size)], check=True, capture_output=True, env=qemu.env())
    image = QedImage.open_path(path)
    pieces = [(c * CLUSTER + p * PIECE) for c in range(32) for p in range(CLUSTER // PIECE)]
    data = {offset: os.urandom(PIECE) for offset in pieces}
    threads = 8
    start = threading.Barrier(threads)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            start.wait()
            # Each thread takes every 8th piece: each cluster is written by all threads at once.
            for offset in pieces[n::threads]:
                image.write(offset, data[offset])
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    for offset in pieces:
        assert image.read(offset, PIECE) == data[offset], f"the write at {offset:#x} was lost"
    image.close()
    check = subprocess.run([*qemu.tool_cmd("qemu-img"), "check", "-f", "qed", str(path)], capture_output=True,
                           text=True, env=qemu.env())
    assert check.returncode == 0, check.stdout + check.stderr  # no leaked cluster, no corruption
    again = QedImage.open_path(path, read_only=True)
    try:
        assert all(again.read(offset, PIECE) == data[offset] for offset in pieces)
    finally:
        again.close()
