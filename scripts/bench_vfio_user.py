#!/usr/bin/env python3
"""vfio-user round-trip benchmark: 4-byte config-space REGION_READs from a
raw-socket client, synchronous (one in flight) and pipelined (64 in flight).

Servers measured in the same run, interleaved, medians of several rounds:
  qbackend      `qbackend serve --ivshmem ...` (this project), with its native
                access loop (servers/vfio_user_fast.c)
  qbackend-py   the same with QBACKEND_NATIVE=off: every access in Python
  user-device   `qbackend serve --device ...examples/edu.py:Edu`: a 4-byte read
                of BAR0 (not config space), answered by the Python device's
                bar_read: the path of every user device's register access
  python-floor  a minimal blocking Python loop answering the same reads
                without any parsing: what a Python server cannot beat
  libvfio-user  libvfio-user's C sample `gpio-pci-idio-16`, when given with
                --libvfio-user PATH or $LIBVFIO_USER_SERVER (built outside
                this repository; see README)

Placement changes round trips tenfold on this machine (shared/notes/
benchmarking-here.md): each figure is taken with client and server pinned
to CPU 0, and again unpinned.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_common import DEFAULT_LIBVFIO_USER, wait_for_socket  # noqa: E402

from qbackend.protocol import vfio_user as vu  # noqa: E402

READ_CONFIG = vu.build_message(1, vu.Command.REGION_READ, vu.REGION_ACCESS.pack(0, vu.PciRegion.CONFIG, 4))
READ_BAR0 = vu.build_message(1, vu.Command.REGION_READ, vu.REGION_ACCESS.pack(0, vu.PciRegion.BAR0, 4))
REPLY_SIZE = vu.HEADER_SIZE + vu.REGION_ACCESS.size + 4
VERSION = vu.build_message(0, vu.Command.VERSION, vu.VERSION_PREFIX.pack(0, 0) + json.dumps(
    {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1048576}}).encode() + b"\0")

FLOOR_SERVER = r"""
import os, socket, struct, sys
path = sys.argv[1]
listener = socket.socket(socket.AF_UNIX)
listener.bind(path)
listener.listen()
conn, _ = listener.accept()
fd = conn.fileno()
H = struct.Struct("=HHIII")
while True:
    data = os.read(fd, 65536)
    if not data:
        break
    pos = 0
    out = []
    while pos + 16 <= len(data):
        i, cmd, size, flags, err = H.unpack_from(data, pos)
        if cmd == 1:
            out.append(H.pack(i, cmd, 20, 1, 0) + bytes(4))
        else:
            out.append(H.pack(i, cmd, size + 4, 1, 0) + data[pos + 16:pos + 32] + bytes(4))
        pos += size
    os.write(fd, b"".join(out))
"""


def start_server(kind: str, path: str, pinned: bool, libvfio_user: str | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if kind in ("qbackend", "qbackend-py"):
        cmd = [sys.executable, "-m", "qbackend", "serve", "--ivshmem", f"socket={path},size=4K"]
        env["QBACKEND_NATIVE"] = "require" if kind == "qbackend" else "off"
    elif kind == "user-device":
        cmd = [sys.executable, "-m", "qbackend", "serve", "--device", f"socket={path},class=examples/edu.py:Edu"]
    elif kind == "python-floor":
        cmd = [sys.executable, "-c", FLOOR_SERVER, path]
    else:
        assert libvfio_user
        cmd = [libvfio_user, path]
    if pinned:
        cmd = ["taskset", "-c", "0", *cmd]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for_socket(Path(path), proc, f"the {kind} server ({' '.join(cmd)})")
    return proc


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    for _ in range(200):
        try:
            sock.connect(path)
            break
        except (ConnectionRefusedError, FileNotFoundError):
            time.sleep(0.01)
    sock.sendall(VERSION)
    header = sock.recv(16, socket.MSG_WAITALL)
    size = vu.HEADER.unpack(header)[2]
    if size > 16:
        sock.recv(size - 16, socket.MSG_WAITALL)
    return sock


def sync_rate(sock: socket.socket, n: int, request: bytes = READ_CONFIG) -> float:
    fd = sock.fileno()
    write, read = os.write, os.read
    start = time.perf_counter()
    for _ in range(n):
        write(fd, request)
        got = read(fd, 4096)
        while len(got) < REPLY_SIZE:  # a reply split in two reads
            got += read(fd, 4096)
    return n / (time.perf_counter() - start)


def pipelined_rate(sock: socket.socket, n: int, request: bytes = READ_CONFIG, depth: int = 64) -> float:
    fd = sock.fileno()
    start = time.perf_counter()
    os.write(fd, request * depth)
    sent, received, pending = depth, 0, 0
    while received < n:
        data = os.read(fd, 65536)
        pending += len(data)
        done, pending = divmod(pending, REPLY_SIZE)
        received += done
        more = min(done, n - sent)
        if more > 0:
            os.write(fd, request * more)
            sent += more
    return n / (time.perf_counter() - start)


def measure(kind: str, pinned: bool, args: argparse.Namespace) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.sock")
        proc = start_server(kind, path, pinned, args.libvfio_user)
        try:
            if pinned:
                os.sched_setaffinity(0, {0})
            sock = connect(path)
            request = READ_BAR0 if kind == "user-device" else READ_CONFIG
            sync_rate(sock, 2000, request)  # warm up
            sync = sync_rate(sock, args.requests, request)
            piped = pipelined_rate(sock, args.requests * 2, request)
            sock.close()
        finally:
            os.sched_setaffinity(0, range(os.cpu_count() or 1))
            proc.terminate()
            proc.wait(5)
    return sync, piped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=30000, help="requests per measurement (default 30000)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are printed")
    parser.add_argument("--libvfio-user", default=os.environ.get("LIBVFIO_USER_SERVER")
                        or (DEFAULT_LIBVFIO_USER if os.path.exists(DEFAULT_LIBVFIO_USER) else None),
                        help="path to libvfio-user's samples/gpio-pci-idio-16, for comparison")
    args = parser.parse_args()
    kinds = ["qbackend", "qbackend-py", "user-device", "python-floor"] + (["libvfio-user"] if args.libvfio_user else [])
    results: dict[tuple[str, bool], list[tuple[float, float]]] = {}
    for r in range(args.rounds):
        for pinned in (True, False):
            for kind in kinds:
                results.setdefault((kind, pinned), []).append(measure(kind, pinned, args))
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)

    def med(kind: str, pinned: bool, i: int) -> float:
        return statistics.median(x[i] for x in results[(kind, pinned)])

    print(f"\n4-byte config-space REGION_READ (user-device: BAR0), {args.requests} requests, "
          f"median of {args.rounds} rounds")
    print(f"{'server':<14}{'placement':<11}{'sync req/s':>12}{'pipelined x64':>15}"
          f"{'sync vs qbackend':>18}")
    for pinned in (True, False):
        base = med("qbackend", pinned, 0)
        for kind in kinds:
            s, p = med(kind, pinned, 0), med(kind, pinned, 1)
            print(f"{kind:<14}{'cpu0' if pinned else 'unpinned':<11}{s:>12,.0f}{p:>15,.0f}{s / base:>17.2f}x")
    target = 60000
    got = med("qbackend", True, 0)
    print(f"\nqbackend synchronous, pinned: {got:,.0f}/s; target {target:,}/s ({got / target:.2f} of target)")
    if args.libvfio_user:
        for pinned in (True, False):
            ratio = med("qbackend", pinned, 0) / med("libvfio-user", pinned, 0)
            print(f"qbackend / libvfio-user, synchronous, {'pinned to cpu0' if pinned else 'unpinned'}: "
                  f"{ratio:.2f}x" + (" (target 0.8x)" if pinned else ""))
    if not args.libvfio_user:
        print("libvfio-user not measured (give --libvfio-user PATH); the notes measured ~124,000/s sync "
              "and ~285,000/s pipelined here")


if __name__ == "__main__":
    main()
