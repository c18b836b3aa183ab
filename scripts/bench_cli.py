"""How long the command line takes to start, beside qemu-img: a process each time.

    python scripts/bench_cli.py [--runs N]

Rows, each a whole process run N times in turn with its qemu-img twin
(qbackend's first, then qemu-img's, alternating), the CPU time of each
process (user + system, from the kernel's accounting of the finished child)
and its wall time; medians and the ratio qbackend/qemu-img:

    version        qbackend --version          qemu-img --version
    qed info       qbackend qed info SMALL     qemu-img info SMALL
    qed check      qbackend qed check SMALL    qemu-img check SMALL

SMALL is a fresh 64 MiB QED image.  qbackend is the console script beside
this Python (the installed package, whatever it is).  For a command that does
almost nothing, nearly all of qbackend's time is the interpreter starting and
the modules it imports: the figure a user feels.

A last row, floor, is what no change to qbackend can take off: this Python
running the console script's own lines before its `from qbackend...` (the
installer writes them: pip before 25.0 has them `import re`, which alone
costs about half of a bare interpreter's start), beside qemu-img --version.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qbackend.machine.launch import find_qemu


def child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(cpu seconds, wall seconds) of one run of `cmd`, which must succeed."""
    cpu, wall = child_cpu(), time.perf_counter()
    result = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall, cpu = time.perf_counter() - wall, child_cpu() - cpu
    if result.returncode != 0:
        raise SystemExit(f"bench_cli: {' '.join(cmd)} failed: {result.stderr.strip()}")
    return cpu, wall


def wrapper_head(script: str) -> str:
    """The console script's lines before it imports qbackend (its shebang and comments aside)."""
    lines = Path(script).read_text().splitlines()
    head = [line for line in lines[:next((i for i, line in enumerate(lines) if "qbackend" in line
                                         and line.startswith(("from ", "import "))), len(lines))]
            if line.strip() and not line.startswith("#")]
    return "\n".join(head) or "pass"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=20, help="runs of each command (20)")
    args = parser.parse_args()
    qemu = find_qemu()
    img = qemu.tool_cmd("qemu-img")
    qbackend = str(Path(sys.executable).parent / "qbackend")
    env = {**qemu.env(), "QBACKEND_NATIVE": os.environ.get("QBACKEND_NATIVE", "auto")}
    with tempfile.TemporaryDirectory(prefix="bench-cli-") as work:
        small = str(Path(work) / "small.qed")
        subprocess.run([*img, "create", "-q", "-f", "qed", small, "64M"], env=env, check=True)
        rows = [
            ("version", [qbackend, "--version"], [*img, "--version"]),
            ("qed info", [qbackend, "qed", "info", small], [*img, "info", "-f", "qed", small]),
            ("qed check", [qbackend, "qed", "check", small], [*img, "check", "-q", "-f", "qed", small]),
            ("floor", [sys.executable, "-c", wrapper_head(qbackend)], [*img, "--version"]),
        ]
        print(f"command start-up: qbackend ({sys.executable}) vs qemu-img {'.'.join(map(str, qemu.version))}, "
              f"median of {args.runs} alternating runs\n")
        print(f"{'row':<12}{'qbackend cpu ms':>17}{'qemu-img cpu ms':>17}{'ratio':>8}"
              f"{'qbackend wall ms':>18}{'qemu-img wall ms':>18}{'ratio':>8}")
        for name, ours_cmd, theirs_cmd in rows:
            timed(ours_cmd, env)  # warm the page cache for both
            timed(theirs_cmd, env)
            ours, theirs = [], []
            for _ in range(args.runs):
                ours.append(timed(ours_cmd, env))
                theirs.append(timed(theirs_cmd, env))
            oc, tc = (statistics.median(c for c, _ in side) * 1000 for side in (ours, theirs))
            ow, tw = (statistics.median(w for _, w in side) * 1000 for side in (ours, theirs))
            print(f"{name:<12}{oc:>17.1f}{tc:>17.1f}{oc / tc:>7.1f}x{ow:>18.1f}{tw:>18.1f}{ow / tw:>7.1f}x")
        print("\nratio: qbackend's time over qemu-img's (lower is better; the issue's target is 3x or less)")
        print(f"floor: {sys.executable} -c {wrapper_head(qbackend)!r}")


if __name__ == "__main__":
    main()
