#!/usr/bin/env python3
"""Soak: one qbackend process with 64 vfio-user devices and 64 NBD clients at once.

- 64 ivshmem devices (each its own socket), each driven by a raw vfio-user
  client thread in this process: config-space reads and BAR0 IntrMask
  writes read back and verified;
- 64 NBD clients (libnbd's binding, run by the system Python) writing and
  verifying random 4 KiB blocks in their own slices of one QED export;

for --seconds (default 60).  Printed: per-client operations per second
(min, median, max) for each kind, errors (must be 0), and the server's fds
and RSS before, during and after; then a booted guest is attached to one
of the same process's devices, to show it still serves.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qbackend.machine.launch import find_qemu, vfio_user_device_arg  # noqa: E402
from qbackend.protocol import vfio_user as vu  # noqa: E402
from qbackend.testing.harness import Harness, wait_until  # noqa: E402
from qbackend.testing.vfio_user_client import VfioUserClient  # noqa: E402
from scripts.bench_nbd_clients import CLIENTS  # noqa: E402

DEVICES = 64
NBD_CLIENTS = 64
IMAGE_SIZE = 256 << 20


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def vfio_client(sock: Path, seconds: float, start: threading.Barrier, out: list[tuple[float, int]], n: int) -> None:
    ops = errors = 0
    with VfioUserClient(sock, timeout=30) as c:
        c.negotiate()
        start.wait()
        end = time.monotonic() + seconds
        value = n
        while time.monotonic() < end:
            try:
                if c.read32(vu.PciRegion.CONFIG, 0) != 0x11101AF4:
                    errors += 1
                value = (value * 1103515245 + 12345) & 0xFFFFFFFF
                c.write32(vu.PciRegion.BAR0, 0, value)  # IntrMask: read back as written
                if c.read32(vu.PciRegion.BAR0, 0) != value:
                    errors += 1
                ops += 3
            except Exception:  # counted, not raised: a soak reports every failure
                errors += 1
    out[n] = (ops / seconds, errors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--no-guest", action="store_true", help="skip the booted guest at the end")
    args = parser.parse_args()
    qemu = find_qemu()
    with tempfile.TemporaryDirectory(prefix="qb-soak-") as tmp:
        work = Path(tmp)
        image = work / "soak.qed"
        subprocess.run([*qemu.tool_cmd("qemu-img"), "create", "-f", "qed", str(image), str(IMAGE_SIZE)],
                       env=qemu.env(), check=True, capture_output=True)
        socks = [work / f"d{n}.sock" for n in range(DEVICES)]
        cmd = [sys.executable, "-m", "qbackend", "serve", "--nbd", f"name=disk,image={image},format=qed",
               "--nbd-socket", str(work / "nbd.sock")]
        for n, sock in enumerate(socks):
            cmd += ["--ivshmem", f"socket={sock},size=64K,vectors=0,id=d{n}"]
        server = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until(lambda: all(s.exists() for s in socks) and (work / "nbd.sock").exists(), 60,
                       "qbackend's sockets")
            before = (fds(server.pid), rss_mib(server.pid))
            vfio_results: list[tuple[float, int]] = [(0.0, 0)] * DEVICES
            start = threading.Barrier(DEVICES + 1)
            threads = [threading.Thread(target=vfio_client, args=(s, args.seconds, start, vfio_results, n))
                       for n, s in enumerate(socks)]
            for t in threads:
                t.start()
            nbd = subprocess.Popen(["/usr/bin/python3", "-c", CLIENTS, f"nbd+unix:///disk?socket={work}/nbd.sock",
                                    str(NBD_CLIENTS), str(args.seconds), str(IMAGE_SIZE)], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
            start.wait()
            time.sleep(args.seconds / 2)
            during = (fds(server.pid), rss_mib(server.pid))
            for t in threads:
                t.join()
            out, err = nbd.communicate(timeout=args.seconds + 300)
            if nbd.returncode != 0:
                raise SystemExit(f"soak: the NBD clients failed:\n{err[-2000:]}")
            import json

            nbd_results = [tuple(r) for r in json.loads(out)]
            time.sleep(1)
            after = (fds(server.pid), rss_mib(server.pid))
            print(f"\nsoak: {DEVICES} vfio-user devices with a client each, {NBD_CLIENTS} NBD clients, "
                  f"{args.seconds:g} s, one qbackend process")
            print(f"{'clients':<18}{'ops/s min':>10}{'median':>9}{'max':>9}{'all':>10}{'errors':>8}")
            for name, results in (("vfio-user", vfio_results), ("NBD", nbd_results)):
                rates = [r[0] for r in results]
                print(f"{name:<18}{min(rates):>10.0f}{statistics.median(rates):>9.0f}{max(rates):>9.0f}"
                      f"{sum(rates):>10.0f}{sum(r[1] for r in results):>8}")
            print(f"server fds   before {before[0]}, during {during[0]}, after {after[0]}")
            print(f"server RSS   before {before[1]:.0f} MiB, during {during[1]:.0f} MiB, after {after[1]:.0f} MiB")
            check = subprocess.run([*qemu.tool_cmd("qemu-img"), "check", "-f", "qed", str(image)], env=qemu.env(),
                                   capture_output=True, text=True)
            print(f"qemu-img check of the NBD image: {'clean' if check.returncode == 0 else check.stdout}")
            if not args.no_guest:
                with Harness(work / "guest") as harness:
                    guest = harness.guest("soak", extra_args=["-device", vfio_user_device_arg("d0", socks[0])])
                    seen = guest.find_pci(0x1AF4, 0x1110)
                    print(f"afterwards a booted guest sees the process's device d0: {'yes' if seen else 'NO'}")
        finally:
            server.terminate()
            server.wait(30)


if __name__ == "__main__":
    main()
