#!/usr/bin/env python3
"""64 NBD clients at once: qbackend beside qemu-nbd -e 70, same run, same client.

Each client (libnbd's Python binding, one thread and one connection each,
run by the system Python that has Debian's python3-libnbd) writes random
4 KiB blocks into its own slice of a 256 MiB QED image and reads each back
to verify it, for --seconds.  Printed: operations per second per client
(min, median, max) and in all, errors (must be 0), the server's RSS before
and at the end, and `qemu-img check` of the image afterwards; then the
ratio qbackend / qemu-nbd.  Target (issue 15): 0.8x or better.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_common import wait_for_socket  # noqa: E402

from qbackend.machine.launch import QemuInstall, find_qemu  # noqa: E402

IMAGE_SIZE = 256 << 20

# Run by /usr/bin/python3 (libnbd's binding): one thread per client.
CLIENTS = r'''
import json, os, sys, threading, time, nbd
uri, clients, seconds, size = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
slice_size = size // clients
results = [None] * clients
start = threading.Barrier(clients + 1)
def client(n):
    h = nbd.NBD()
    h.connect_uri(uri)
    ops = errors = 0
    base = n * slice_size
    start.wait()
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        block = os.urandom(4096)
        offset = base + (int.from_bytes(os.urandom(4), "little") % (slice_size // 4096)) * 4096
        try:
            h.pwrite(block, offset)
            if h.pread(4096, offset) != block:
                errors += 1
            ops += 2
        except nbd.Error:
            errors += 1
    h.flush()
    h.shutdown()
    results[n] = (ops / seconds, errors)
threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
for t in threads: t.start()
start.wait()
for t in threads: t.join()
print(json.dumps(results))
'''


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure(kind: str, qemu: QemuInstall, clients: int, seconds: float, work: Path) -> dict[str, object]:
    image = work / f"{kind}.qed"
    subprocess.run([*qemu.tool_cmd("qemu-img"), "create", "-f", "qed", str(image), str(IMAGE_SIZE)], env=qemu.env(),
                   check=True, capture_output=True)
    sock = work / f"{kind}.sock"
    if kind == "qbackend":
        cmd = [sys.executable, "-m", "qbackend", "nbd", "--export", f"name=disk,image={image},format=qed",
               "--socket", str(sock)]
    else:
        cmd = [*qemu.tool_cmd("qemu-nbd"), "-f", "qed", "-x", "disk", "-k", str(sock), "-t", "-e", "70",
               "--cache=writeback", str(image)]
    server = subprocess.Popen(cmd, cwd=REPO, env=qemu.env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_socket(sock, None, kind)
        before = rss_kib(server.pid)
        out = subprocess.run(["/usr/bin/python3", "-c", CLIENTS, f"nbd+unix:///disk?socket={sock}", str(clients),
                              str(seconds), str(IMAGE_SIZE)], capture_output=True, text=True, timeout=seconds + 300)
        if out.returncode != 0:
            raise SystemExit(f"bench: the clients failed against {kind}:\n{out.stderr[-2000:]}")
        after = rss_kib(server.pid)
    finally:
        server.send_signal(2)
        server.wait(30)
    rates, errors = zip(*json.loads(out.stdout))
    check = subprocess.run([*qemu.tool_cmd("qemu-img"), "check", "-f", "qed", str(image)], env=qemu.env(),
                           capture_output=True, text=True)
    return {"rates": rates, "errors": sum(errors), "rss": (before, after), "check": check.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    qemu = find_qemu()
    with tempfile.TemporaryDirectory(prefix="qb-bench-clients-") as tmp:
        results = {kind: measure(kind, qemu, args.clients, args.seconds, Path(tmp)) for kind in ("qbackend", "qemu-nbd")}
    print(f"\n{args.clients} NBD clients, random 4 KiB write + verified read, {args.seconds:g} s each server")
    print(f"{'server':<10}{'ops/s all':>11}{'min':>8}{'median':>8}{'max':>8}{'errors':>8}{'RSS MiB before/after':>22}"
          f"{'check':>7}")
    for kind, r in results.items():
        rates = r["rates"]
        assert isinstance(rates, tuple)
        before, after = r["rss"]  # type: ignore[misc]
        print(f"{kind:<10}{sum(rates):>11,.0f}{min(rates):>8.0f}{statistics.median(rates):>8.0f}{max(rates):>8.0f}"
              f"{r['errors']:>8}{before / 1024:>13.0f} / {after / 1024:<6.0f}{'clean' if r['check'] == 0 else 'BAD':>7}")
    ours, theirs = (sum(results[k]["rates"]) for k in ("qbackend", "qemu-nbd"))  # type: ignore[arg-type]
    print(f"ratio qbackend / qemu-nbd: {ours / theirs:.2f}x (target 0.8x)")


if __name__ == "__main__":
    main()
