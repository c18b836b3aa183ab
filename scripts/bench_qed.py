#!/usr/bin/env python3
"""QED block-layer benchmark: backend.qed.QedImage against QEMU's own QED
driver (`qemu-img bench`, `qemu-img check` of the provisioned QEMU) on the
same kinds of image, in the same run, interleaved; medians of N rounds.

  allocating writes    1 MiB and 4 KiB sequential writes into an empty image
                       (qemu-img create -f qed: 64 KiB clusters), pattern 0xa5,
                       the final flush (fsync) inside the timed window on both
                       sides (theirs: --flush-interval=COUNT)
  reads                4 KiB and 64 KiB sequential, and 4 KiB scattered reads
                       of a fully allocated image (qemu-img convert of random
                       data), page-cached.  "Random" is qemu-img bench's stride
                       walk: offset += STEP, offset %= size - 4 KiB, with STEP
                       about 0.618 of the image and coprime to its block count,
                       so every block is visited once, scattered; ours walks
                       the identical offsets (qemu-io could do truly random
                       offsets, but its per-command overhead is ~3x qemu-img
                       bench's and would flatter us).
  check                a sparse, fully allocated image of 16 GiB (every L2
                       entry points at a data cluster; the data are holes),
                       once with data clusters in guest order and once
                       shuffled (100% fragmented: no runs of consecutive
                       entries)

Ours runs in this process, one request at a time (QedImage.read/.write in a
loop).  Theirs is qemu-img bench with -d 1 (one request in flight), cache
writeback (page cache, like ours), timed by qemu-img itself (excluding its
open and close, as ours excludes open and close), once with -i threads (the
default) and once with -i io_uring.  Check: ours is open+check+close in this
process, and `qbackend qed check` as a whole process; theirs is the whole
`qemu-img check` process.  Nothing is pinned: both sides float over the
machine's CPUs (throughput, not round trips; see
shared/notes/benchmarking-here.md).

Every ratio is a speed ratio, >1 means qbackend is faster: ours/theirs for
MiB/s, theirs/ours for seconds.

QEMU bug: `qemu-img check` reports a few spurious leaks on clean QED files of
at least (cluster_size - 1) clusters (about 4 GiB at 64 KiB; qed_bytes_to_clusters
divides by cluster_size - 1).  The check image is validated accordingly: ours
must say clean, theirs clean or exactly that many leaks.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qbackend.block.blockfile import FileBlock  # noqa: E402
from qbackend.block.qed import QedImage  # noqa: E402
from qbackend.machine.launch import QemuInstall, find_qemu  # noqa: E402

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
PATTERN = 0xA5
OURS = "qbackend"


def run(cmd: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    if result.returncode not in ok:
        raise SystemExit(f"bench: {' '.join(cmd)} failed (exit {result.returncode}):\n"
                         f"{result.stdout}{result.stderr}")
    return result


def parse_size(text: str) -> int:
    m = re.fullmatch(r"(\d+)([KMG]?)", text.strip().upper())
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (e.g. 64K, 1M)")
    return int(m.group(1)) * {"": 1, "K": KIB, "M": MIB, "G": GIB}[m.group(2)]


class Qemu:
    def __init__(self, inst: QemuInstall) -> None:
        self.img = inst.tool_cmd("qemu-img")
        self.env = inst.env()
        self.version = ".".join(map(str, inst.version))

    def create(self, path: Path, size: int) -> None:
        path.unlink(missing_ok=True)
        run([*self.img, "create", "-q", "-f", "qed", str(path), str(size)], self.env)

    def bench(self, path: Path, aio: str, *, count: int, size: int, step: int | None = None,
              write: bool = False) -> float:
        """Seconds, as qemu-img bench measures them."""
        cmd = [*self.img, "bench", "-f", "qed", "-t", "writeback", "-i", aio, "-d", "1", "-c", str(count),
               "-s", str(size)]
        if step is not None:
            cmd += ["-S", str(step)]
        if write:
            cmd += ["-w", "--pattern", str(PATTERN), "--flush-interval", str(count)]
        out = run([*cmd, str(path)], self.env).stdout
        m = re.search(r"Run completed in ([\d.]+) seconds", out)
        if not m:
            raise SystemExit(f"bench: cannot parse qemu-img bench output:\n{out}")
        return float(m.group(1))

    def aio_works(self, path: Path, aio: str) -> bool:
        cmd = [*self.img, "bench", "-f", "qed", "-i", aio, "-c", "1", str(path)]
        return subprocess.run(cmd, capture_output=True, env=self.env).returncode == 0


# -- ours ----------------------------------------------------------------------------------------


def ours_write(path: Path, count: int, size: int) -> float:
    data = bytes([PATTERN]) * size
    img = QedImage.open_path(path)
    try:
        start = time.perf_counter()
        for k in range(count):
            img.write(k * size, data)
        img.flush()
        return time.perf_counter() - start
    finally:
        img.close()


def ours_read(path: Path, offsets: Callable[[], range | list[int]], size: int) -> float:
    img = QedImage.open_path(path, read_only=True)
    try:
        offs = offsets()
        read = img.read
        start = time.perf_counter()
        for off in offs:
            read(off, size)
        return time.perf_counter() - start
    finally:
        img.close()


def stride_offsets(image_size: int, bufsize: int, step: int, count: int) -> list[int]:
    """qemu-img bench's offsets (QEMU >= 10.1: wrap modulo image_size - bufsize)."""
    out, off, mod = [], 0, image_size - bufsize
    for _ in range(count):
        out.append(off)
        off = (off + step) % mod
    return out


def random_step(image_size: int, bufsize: int) -> int:
    """A stride of about 0.618 of the image, in whole blocks, coprime to the wrap length in blocks."""
    blocks = (image_size - bufsize) // bufsize
    p = int(blocks * 0.6180339887)
    while math.gcd(p, blocks) != 1:
        p += 1
    return p * bufsize


# -- the check image -------------------------------------------------------------------------


def make_full_image(path: Path, size: int, cluster_size: int, shuffle: bool) -> tuple[int, int]:
    """A QED image with every guest cluster allocated; data clusters are holes.

    Header, L1, the L2 tables, then the data clusters (in guest order, or
    shuffled).  Returns (data clusters, file size).
    """
    f = FileBlock.open(path, create=True)
    try:
        h = QedImage.create(f, size, cluster_size=cluster_size)
        cs, tb, ne = h.cluster_size, h.table_bytes, h.table_entries
        nclusters = -(-h.image_size // cs)
        ntables = -(-nclusters // ne)
        l2_start = h.l1_table_offset + tb
        data_start = l2_start + ntables * tb
        hosts = array("Q", range(data_start, data_start + nclusters * cs, cs))
        if shuffle:
            random.Random(0).shuffle(hosts)
        l1 = array("Q", bytes(tb))
        for t in range(ntables):
            l1[t] = l2_start + t * tb
            l2 = array("Q", bytes(tb))
            chunk = hosts[t * ne:(t + 1) * ne]
            l2[:len(chunk)] = chunk
            f.pwrite(l1[t], l2.tobytes())  # little-endian host assumed (x86-64)
        f.pwrite(h.l1_table_offset, l1.tobytes())
        file_size = data_start + nclusters * cs
        f.truncate(file_size)
        f.flush()
        return nclusters, file_size
    finally:
        f.close()


def qemu_spurious_leaks(file_size: int, cs: int) -> int:
    """Leaks qemu-img check reports on a clean file (qed_bytes_to_clusters divides by cs - 1)."""
    qemu_clusters = ((file_size + cs - 1) & ~(cs - 1)) // (cs - 1)
    return max(0, qemu_clusters - file_size // cs)


def ours_check(path: Path, nclusters: int) -> float:
    start = time.perf_counter()
    with QedImage.open_path(path, read_only=True) as img:
        rep = img.check()
    elapsed = time.perf_counter() - start
    if rep.exit_code != 0 or rep.allocated_clusters != nclusters or rep.leaked_clusters:
        raise SystemExit(f"bench: our check of {path} is not clean: exit {rep.exit_code}, "
                         f"{rep.allocated_clusters}/{nclusters} allocated, {rep.leaked_clusters} leaks")
    return elapsed


def timed_process(cmd: list[str], env: dict[str, str], ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    start = time.perf_counter()
    out = run(cmd, env, ok).stdout
    return time.perf_counter() - start, out


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds; medians are printed (5)")
    parser.add_argument("--size-mib", type=int, default=256,
                        help="the read image, and the 1 MiB sequential write total (256)")
    parser.add_argument("--write-4k-mib", type=int, default=64, help="4 KiB sequential write total (64)")
    parser.add_argument("--check-gib", type=int, default=16, help="size of the check images (16)")
    parser.add_argument("--check-cluster-size", type=parse_size, default=64 * KIB,
                        help="cluster size of the check images (64K; at 1M qemu-img reports no spurious leaks)")
    parser.add_argument("--aio", default="threads,io_uring", help="qemu-img bench -i modes (threads,io_uring)")
    parser.add_argument("--tmpdir", type=Path, default=None, help="where the images go (default: $TMPDIR)")
    args = parser.parse_args()

    qemu = Qemu(find_qemu())
    size = args.size_mib * MIB
    with tempfile.TemporaryDirectory(prefix="bench-qed-", dir=args.tmpdir) as tmp:
        work = Path(tmp)
        print(f"setting up in {work}: {args.size_mib} MiB of random data, {args.check_gib} GiB check images",
              file=sys.stderr, flush=True)
        raw = work / "random.raw"
        with open(raw, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        full = work / "full.qed"
        run([*qemu.img, "convert", "-f", "raw", "-O", "qed", str(raw), str(full)], qemu.env)
        with QedImage.open_path(full, read_only=True) as img, open(raw, "rb") as f:
            if img.read(size - MIB, MIB) != (f.seek(size - MIB), f.read(MIB))[1]:
                raise SystemExit("bench: QedImage reads differ from the raw data")
        raw.unlink()
        aios = [a for a in args.aio.split(",") if a]
        for a in list(aios):
            if not qemu.aio_works(full, a):
                print(f"note: qemu-img bench -i {a} does not work here; skipped", file=sys.stderr)
                aios.remove(a)
        sides = [OURS, *aios]

        check_images: dict[str, tuple[Path, int, int]] = {}
        for layout in ("in order", "shuffled"):
            p = work / f"check-{layout.split()[0]}.qed"
            nclusters, file_size = make_full_image(p, args.check_gib * GIB, args.check_cluster_size,
                                                   layout == "shuffled")
            check_images[layout] = (p, nclusters, file_size)
        spurious = qemu_spurious_leaks(check_images["in order"][2], args.check_cluster_size)

        n4k = size // (4 * KIB)
        n64k = size // (64 * KIB)
        rstep = random_step(size, 4 * KIB)
        w4k = args.write_4k_mib * MIB // (4 * KIB)
        w1m = args.size_mib
        rows: list[tuple[str, str]] = [
            ("seq write 1 MiB (alloc)", "MiB/s"),
            ("seq write 4 KiB (alloc)", "MiB/s"),
            ("seq read 4 KiB", "MiB/s"),
            ("random read 4 KiB", "MiB/s"),
            ("seq read 64 KiB", "MiB/s"),
            ("check, in order", "s"),
            ("check, shuffled", "s"),
            ("check CLI, in order", "s"),
        ]
        results: dict[str, dict[str, list[float]]] = {s: {name: [] for name, _ in rows} for s in sides}

        def add(side: str, name: str, value: float) -> None:
            results[side][name].append(value)

        # one request more than the writes: qemu-img bench wraps at image size - request size
        empty_size = max(w1m * MIB, w4k * 4 * KIB) + MIB
        for r in range(args.rounds):
            # allocating writes: a fresh empty image per side and size
            for name, count, bs in (("seq write 1 MiB (alloc)", w1m, MIB), ("seq write 4 KiB (alloc)", w4k, 4 * KIB)):
                images = {}
                for side in sides:
                    p = work / f"empty-{side}.qed"
                    qemu.create(p, empty_size)
                    if side == OURS:
                        t = ours_write(p, count, bs)
                    else:
                        t = qemu.bench(p, side, count=count, size=bs, write=True)
                    add(side, name, count * bs / t / MIB)
                    images[side] = p
                if r == 0:  # sanity: same contents, our image clean
                    run([*qemu.img, "check", "-q", "-f", "qed", str(images[OURS])], qemu.env)
                    for side in aios:
                        run([*qemu.img, "compare", "-q", "-f", "qed", "-F", "qed", str(images[OURS]),
                             str(images[side])], qemu.env)
                for p in images.values():
                    p.unlink()
            # reads of the fully allocated image
            reads = (("seq read 4 KiB", 4 * KIB, n4k, None, lambda: range(0, n4k * 4 * KIB, 4 * KIB)),
                     ("random read 4 KiB", 4 * KIB, n4k, rstep, lambda: stride_offsets(size, 4 * KIB, rstep, n4k)),
                     ("seq read 64 KiB", 64 * KIB, n64k, None, lambda: range(0, n64k * 64 * KIB, 64 * KIB)))
            for name, bs, count, step, offsets in reads:
                for side in sides:
                    if side == OURS:
                        t = ours_read(full, offsets, bs)
                    else:
                        t = qemu.bench(full, side, count=count, size=bs, step=step)
                    add(side, name, count * bs / t / MIB)
            # check
            for layout, (p, nclusters, _file_size) in check_images.items():
                add(OURS, f"check, {layout}", ours_check(p, nclusters))
                t, out = timed_process([*qemu.img, "check", "-f", "qed", "--output=json", str(p)], qemu.env,
                                       ok=(0, 3))
                rep = json.loads(out)
                if rep.get("corruptions") or rep.get("check-errors") or rep.get("leaks", 0) != spurious:
                    raise SystemExit(f"bench: qemu-img check of {p} is not clean (expected {spurious} spurious "
                                     f"leaks): {out}")
                for side in aios:
                    add(side, f"check, {layout}", t)
            p = check_images["in order"][0]
            t, _ = timed_process([sys.executable, "-m", "qbackend", "qed", "check", "-q", str(p)], qemu.env)
            add(OURS, "check CLI, in order", t)
            t, _ = timed_process([*qemu.img, "check", "-q", "-f", "qed", str(p)], qemu.env, ok=(0, 3))
            for side in aios:
                add(side, "check CLI, in order", t)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    cs_k = args.check_cluster_size // KIB
    print(f"\nQED, qbackend (Python, in-process, one request at a time) vs qemu-img {qemu.version} "
          f"(bench -d 1, cache=writeback); median of {args.rounds} interleaved rounds")
    print(f"read image {args.size_mib} MiB fully allocated; writes {args.size_mib} MiB in 1 MiB and "
          f"{args.write_4k_mib} MiB in 4 KiB requests into empty images, final flush timed;\n"
          f"check images {args.check_gib} GiB, {cs_k} KiB clusters, "
          f"{check_images['in order'][1]} data clusters (qemu-img check: whole process)")
    print("ratio = speed ratio, >1 means qbackend is faster (MiB/s ours/theirs; seconds theirs/ours)\n")
    theirs = [f"qemu {a}" for a in aios]
    head = f"{'measurement':<26}{'unit':>6}{OURS:>11}" + "".join(f"{t:>15}" for t in theirs)
    head += "".join(f"{'ratio ' + a:>16}" for a in aios)
    print(head)
    for name, unit in rows:
        ours = statistics.median(results[OURS][name])
        meds = [statistics.median(results[a][name]) for a in aios]
        line = f"{name:<26}{unit:>6}"
        if unit == "s":
            line += f"{ours:>11.3f}" + "".join(f"{m:>15.3f}" for m in meds)
            ratios = [m / ours for m in meds]
        else:
            line += f"{ours:>11.0f}" + "".join(f"{m:>15.0f}" for m in meds)
            ratios = [ours / m for m in meds]
        print(line + "".join(f"{x:>15.2f}x" for x in ratios))
    print("\ncheck rows: ours = open+check+close in this process; 'check CLI' = `qbackend qed check` as a "
          "process.\nqemu-img check is the same process in every qemu column (no aio choice).")
    if spurious:
        print(f"qemu-img check reported {spurious} leaks on each clean check image: QEMU's spurious-leak bug "
              "(see --help); ours reported none.")


if __name__ == "__main__":
    main()
