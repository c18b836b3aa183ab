"""`qemu:allocation-depth` of a QED-over-QED chain (and of QED over raw),
equal to what qemu-nbd 11.1 -A reports for the same chain in the same run,
as libnbd's nbdinfo --map shows both."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from qed_tools import qemu, qemu_img, qemu_io

from qbackend.testing.harness import wait_until

MiB = 1 << 20


def chain(tmp: Path, base_format: str) -> Path:
    base = tmp / f"base.{base_format}"
    qemu_img("create", "-f", base_format, str(base), str(32 * MiB))
    if base_format == "qed":
        qemu_io(base, "write -P 0x11 0 1M", "write -P 0x12 8M 1M", "write -P 0x13 20M 64k")
    else:
        qemu_io(base, "write -P 0x11 0 1M", fmt="raw")
    mid = tmp / "mid.qed"
    qemu_img("create", "-f", "qed", "-F", base_format, "-b", str(base), str(mid), str(32 * MiB))
    qemu_io(mid, "write -P 0x21 1M 1M", "write -z 8M 512k")
    top = tmp / "top.qed"
    qemu_img("create", "-f", "qed", "-F", "qed", "-b", str(mid), str(top), str(40 * MiB))  # longer than its backing
    qemu_io(top, "write -P 0x31 2M 1M", "write -P 0x32 30M 4M")
    return top


def depth_map(uri: str) -> str:
    out = subprocess.run(["nbdinfo", "--map=qemu:allocation-depth", uri], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def serve_both(image: Path, tmp: Path) -> tuple[str, str, list[subprocess.Popen[str]]]:
    ours, theirs = tmp / "ours.sock", tmp / "theirs.sock"
    q = qemu()
    procs = [
        subprocess.Popen([sys.executable, "-m", "qbackend", "nbd", "--export", f"name=x,image={image},format=qed,"
                          "readonly=on", "--socket", str(ours)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         text=True),
        subprocess.Popen([*q.tool_cmd("qemu-nbd"), "-A", "-r", "-f", "qed", "-x", "x", "-k", str(theirs), "-t",
                          str(image)], env=q.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True),
    ]
    wait_until(lambda: ours.exists() and theirs.exists(), 30, "both NBD sockets")
    return f"nbd+unix:///x?socket={ours}", f"nbd+unix:///x?socket={theirs}", procs


@pytest.mark.parametrize("base_format", ["qed", "raw"])
def test_allocation_depth_equals_qemu_nbds(tmp_path: Path, base_format: str) -> None:
    top = chain(tmp_path, base_format)
    ours, theirs, procs = serve_both(top, tmp_path)
    try:
        mine, reference = depth_map(ours), depth_map(theirs)
        # QEMU's own client asks for both contexts at once (two chunks per BLOCK_STATUS reply).
        maps = [qemu_img("map", "--output=json", "-f", "raw", uri).stdout for uri in (ours, theirs)]
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(20)
    assert mine == reference, f"qbackend:\n{mine}\nqemu-nbd -A:\n{reference}"
    assert "backing depth 3" in reference or base_format == "raw"  # the chain is three deep
    assert maps[0] == maps[1], f"qemu-img map over qbackend:\n{maps[0]}\nover qemu-nbd -A:\n{maps[1]}"
