#!/usr/bin/env python3
"""make bench: what a guest driver feels, trapped-register round trips of three devices in one guest.

- QEMU's own ivshmem-plain: BAR0 emulated inside QEMU, no socket at all (the physical limit);
- qbackend's ivshmem over vfio-user (`qbackend serve --ivshmem`): BAR0, IVPosition (read) and IntrMask (write);
- libvfio-user's C sample gpio-pci-idio-16 over vfio-user: BAR2 offset 0 (built outside this repository;
  --libvfio-user PATH or $LIBVFIO_USER_SERVER; skipped with a message when absent).
A static guest program (provision/guest/mmio_bench.c) does COUNT 4-byte reads, then writes, of each
register; the devices are interleaved within each round, and the median of the rounds is printed as
accesses/s and as ratios to libvfio-user and to QEMU's own device.  Then the guest sits idle for 10 s
and the CPU time qbackend used meanwhile is printed (it must stay near zero).  Nothing is pinned.

    python scripts/bench_mmio.py [--rounds N] [--count N] [--libvfio-user PATH]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench_common import DEFAULT_LIBVFIO_USER, wait_for_socket  # noqa: E402

from qbackend.machine.launch import find_qemu, vfio_user_device_arg  # noqa: E402


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=20000, help="accesses per device and round")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--libvfio-user", default=os.environ.get("LIBVFIO_USER_SERVER")
                        or (DEFAULT_LIBVFIO_USER if os.path.exists(DEFAULT_LIBVFIO_USER) else None))
    args = parser.parse_args()

    from qbackend.machine.console import GuestConsole
    from qbackend.machine.launch import QemuMachine

    find_qemu()  # fails early, with its advice, when QEMU is missing
    # name: (PCI slot, BAR, offset read, offset written); ivshmem: IVPosition, IntrMask
    devices = {"QEMU ivshmem-plain": ("0x10", 0, 8, 0), "qbackend ivshmem": ("0x11", 0, 8, 0)}
    if args.libvfio_user:
        devices["libvfio-user gpio"] = ("0x12", 2, 0, 0)
    else:
        print("bench_mmio: libvfio-user's gpio-pci-idio-16 not found (set LIBVFIO_USER_SERVER); "
              "measuring without it")
    with tempfile.TemporaryDirectory(prefix="bench-mmio-") as tmp:
        work = Path(tmp)
        qb_sock, lvu_sock = work / "qb.sock", work / "gpio.sock"
        qb = subprocess.Popen([sys.executable, "-m", "qbackend", "serve", "--ivshmem", f"socket={qb_sock},size=4K"],
                              cwd=REPO, stdout=subprocess.DEVNULL)
        procs = [qb]
        vm: QemuMachine | None = None
        try:
            wait_for_socket(qb_sock, qb, "qbackend")
            extra = ["-object", "memory-backend-memfd,id=ivmem,size=4K,share=on",
                     "-device", f"ivshmem-plain,memdev=ivmem,addr={devices['QEMU ivshmem-plain'][0]}",
                     "-device", vfio_user_device_arg("qbiv", qb_sock, addr=devices["qbackend ivshmem"][0])]
            if args.libvfio_user:
                lvu = subprocess.Popen([args.libvfio_user, str(lvu_sock)], stdout=subprocess.DEVNULL,
                                       stderr=subprocess.DEVNULL)
                procs.append(lvu)
                wait_for_socket(lvu_sock, lvu, "libvfio-user's sample")
                extra += ["-device", vfio_user_device_arg("gpio", lvu_sock, addr=devices["libvfio-user gpio"][0])]
            vm = QemuMachine(work, name="mmio", extra_args=extra)
            console = GuestConsole(vm.serial_path)
            vm.start()
            console.connect()
            console.wait_ready(timeout=120)

            def sh(cmd: str) -> str:
                return console.run_checked(cmd, 300).strip()

            target: dict[tuple[str, str], str] = {}
            for name, (slot, bar, read_at, write_at) in devices.items():
                bdf = f"/sys/bus/pci/devices/0000:00:{int(slot, 16):02x}.0"
                sh(f"echo 1 > {bdf}/enable")
                target[name, "read"] = f"{bdf} {bar} {read_at}"
                target[name, "write"] = f"{bdf} {bar} {write_at}"
            rates: dict[str, dict[str, list[float]]] = {op: {n: [] for n in devices} for op in ("read", "write")}
            for name in devices:  # warm-up
                sh(f"mmio_bench {target[name, 'read']} 1000 read")
            for _ in range(args.rounds):
                for op in ("read", "write"):
                    for name in devices:
                        out = sh(f"mmio_bench {target[name, op]} {args.count} {op}").split()
                        rates[op][name].append(int(out[0]) / (int(out[3]) / 1e9))
            time.sleep(1.0)
            before = cpu_seconds(qb.pid)
            time.sleep(args.idle_seconds)
            idle = (cpu_seconds(qb.pid) - before) / args.idle_seconds
        finally:
            if vm is not None:
                vm.stop()
            for proc in procs:
                proc.terminate()
                proc.wait(10)

    names = list(devices)
    print(f"\ntrapped 4-byte register accesses from one TCG guest ({args.count} per round, medians of "
          f"{args.rounds} interleaved rounds; unpinned)")
    print(f"{'':<8}" + "".join(f"{n:>22}" for n in names) + "   qbackend/libvfio-user   qbackend/QEMU")
    for op in ("read", "write"):
        med = {n: statistics.median(rates[op][n]) for n in names}
        vs_lvu = f"{med['qbackend ivshmem'] / med['libvfio-user gpio']:.2f}x" if args.libvfio_user else "-"
        print(f"{op + 's/s':<8}" + "".join(f"{med[n]:>22,.0f}" for n in names)
              + f"{vs_lvu:>24}{med['qbackend ivshmem'] / med['QEMU ivshmem-plain']:>16.4f}x")
    print(f"qbackend CPU while the guest is idle for {args.idle_seconds:g} s: {idle * 100:.2f}% of one CPU "
          "(target < 2%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
