"""Run the fuzz targets under libFuzzer (atheris).

    python -m fuzz.run [--seconds N] [TARGET ...]   each target (default: all) for N seconds,
                                                    one after the other; a summary; exit 1 on a finding
    python -m fuzz.run --one TARGET [LIBFUZZER ARG ...]   one target in this process (what the above runs)

Seeds are read from fuzz/corpus/<target>/; what libFuzzer adds goes to
build/fuzz/corpus/<target>/ and findings (crash-*, timeout-*, oom-*) with
their logs to build/fuzz/<target>/.  A finding worth keeping goes to
fuzz/regressions/<target>/ (tests/test_fuzz_regressions.py replays it).
"""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys
from pathlib import Path

from fuzz import TARGETS

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT / "fuzz" / "corpus"
WORK = ROOT / "build" / "fuzz"

# libFuzzer options per target: inputs large enough for the format, and limits that make a
# hang (-timeout, seconds per input) or runaway memory (-rss_limit_mb) a finding.
MAX_LEN = {"qed": 40960, "vfio_user": 8192, "vhost_user": 8192, "nbd": 8192, "qmp": 8192, "options": 8192,
           "virtqueue": 16384, "virtqueue_packed": 16384, "vhost_inflight": 1024}
COMMON = ["-timeout=10", "-rss_limit_mb=1536", "-print_final_stats=1"]


def run_one(target: str, args: list[str]) -> None:
    """Fuzz `target` in this process (atheris instruments qbackend as the target imports it)."""
    import atheris

    with atheris.instrument_imports(include=["qbackend"]):
        module = importlib.import_module(f"fuzz.{target}")
    atheris.Setup([sys.argv[0], *args], module.test_one_input)
    atheris.Fuzz()


def _stats(log: str) -> dict[str, str]:
    out = {"runs": "?", "seconds": "?", "cov": "?", "ft": "?", "corpus": "?", "exec/s": "?"}
    if m := re.search(r"Done (\d+) runs in (\d+) second", log):
        out["runs"], out["seconds"] = m.groups()
    lines = re.findall(r"cov: (\d+) ft: (\d+) corp: (\d+)", log)
    if lines:
        out["cov"], out["ft"], out["corpus"] = lines[-1]
    if m := re.search(r"stat::average_exec_per_sec:\s*(\d+)", log):
        out["exec/s"] = m.group(1)
    return out


def run_all(targets: list[str], seconds: int, seed: int = 0) -> int:
    failed = []
    rows = []
    for target in targets:
        work = WORK / target
        corpus = WORK / "corpus" / target
        work.mkdir(parents=True, exist_ok=True)
        corpus.mkdir(parents=True, exist_ok=True)
        for old in work.glob("*-*"):
            if old.name.split("-")[0] in ("crash", "timeout", "oom", "leak", "slow"):
                old.unlink()
        cmd = [sys.executable, "-m", "fuzz.run", "--one", target, f"-max_total_time={seconds}",
               f"-max_len={MAX_LEN.get(target, 4096)}", *COMMON, f"-artifact_prefix={work}/",
               *([f"-seed={seed}"] if seed else []),
               str(corpus), str(SEEDS / target)]
        print(f"fuzz {target}: {seconds} s", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, errors="replace")
        log = proc.stdout + proc.stderr
        (work / "log.txt").write_text(log)
        findings = sorted(p.name for p in work.iterdir() if p.name.split("-")[0] in ("crash", "timeout", "oom", "leak"))
        stats = _stats(log)
        rows.append((target, stats, proc.returncode, findings))
        if proc.returncode or findings:
            failed.append(target)
            tail = "\n".join(log.splitlines()[-40:])
            print(f"fuzz {target}: FINDING (exit {proc.returncode}) {' '.join(findings)}\n{tail}\n"
                  f"full log: {work / 'log.txt'}", flush=True)
    print(f"\n{'target':<16}{'runs':>10}{'exec/s':>9}{'cov':>7}{'ft':>8}{'corpus':>8}  result")
    for target, s, rc, findings in rows:
        result = "ok" if not (rc or findings) else f"FINDING {' '.join(findings) or f'exit {rc}'}"
        print(f"{target:<16}{s['runs']:>10}{s['exec/s']:>9}{s['cov']:>7}{s['ft']:>8}{s['corpus']:>8}  {result}")
    return 1 if failed else 0


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        run_one(sys.argv[2], sys.argv[3:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m fuzz.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=30, help="per target (default 30)")
    parser.add_argument("--seed", type=int, default=0,
                        help="libFuzzer's random seed (default 0: a new one each run; CI fixes one)")
    parser.add_argument("targets", nargs="*", metavar="TARGET", help=f"one of {', '.join(TARGETS)} (default: all)")
    args = parser.parse_args()
    unknown = sorted(set(args.targets) - set(TARGETS))
    if unknown:
        parser.error(f"unknown target(s) {', '.join(unknown)}")
    return run_all(list(args.targets) or list(TARGETS), args.seconds, args.seed)


if __name__ == "__main__":
    sys.exit(main())
