"""make bench: fio in a guest on three disks of the same QED image, in one run.

- vda: qbackend's vhost-user-blk (qbackend serve --vhost-user-blk), a vhost-user-blk-pci;
- vdb: qemu-storage-daemon 11.1's own vhost-user-blk export, the reference;
- vdc: qbackend's NBD export under QEMU's NBD client and a virtio-blk-pci;
- vdd: qbackend's vhost-user-blk again, from a second qbackend process with
  QBACKEND_NATIVE=off: the Python path's figures, printed beside.
Each disk has its own copy of one image (a 256 MiB QED image, every cluster
written), so the four read the same bytes.  The guest has 2 vCPUs and each
vhost-user disk 2 queues (qemu-storage-daemon's export too, num-queues=2):
the single-job rows use one queue, the "2 jobs" row (fio --numjobs=2, one
job per vCPU) both.  fio (the host's fio-3.33 and
its libraries, appended to the test guest's initramfs as a second archive)
runs sequential 1 MiB reads and writes (QD4) and 4 KiB random reads at QD1
and QD16, direct I/O with libaio, each for a few seconds; the disks are
interleaved within each round and the median of the rounds is printed, as
MB/s or IOPS and as ratios: qbackend vhost-user / qemu-storage-daemon, and
qbackend vhost-user / qbackend NBD.  Nothing is pinned (a throughput
benchmark; the guest, qemu-storage-daemon and qbackend share the 2 CPUs).

--variant NAME=VALUE (repeatable) adds a disk served by one more qbackend
process with that environment variable set (for example
QBACKEND_VHOST_HOLD_NS=30000), its figures and its ratio to
qemu-storage-daemon printed beside: a tuning knob measured in the same run.

    python scripts/bench_vhost_user_blk.py [--rounds N] [--seconds S] [--variant NAME=VALUE]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_common import wait_for_socket  # noqa: E402

from qbackend.machine.guest_tools import with_host_programs  # noqa: E402
from qbackend.machine.launch import QemuInstall, find_guest, find_qemu  # noqa: E402

SIZE = 256 << 20
DISKS = {"qbackend vhost-user": "0x10", "qemu-storage-daemon vhost-user": "0x11", "qbackend NBD": "0x12",
         "qbackend vhost-user, Python path": "0x13"}
QUEUES = 2
JOBS = {  # name: (fio arguments, what is printed)
    "seq read 1M QD4": ("--rw=read --bs=1M --iodepth=4", "MB/s"),
    "seq write 1M QD4": ("--rw=write --bs=1M --iodepth=4", "MB/s"),
    "rand read 4K QD1": ("--rw=randread --bs=4k --iodepth=1", "IOPS"),
    "rand read 4K QD16": ("--rw=randread --bs=4k --iodepth=16", "IOPS"),
    "2 jobs rand 4K QD16": ("--rw=randread --bs=4k --iodepth=16 --numjobs=2 --group_reporting", "IOPS"),
}


def make_images(qemu: QemuInstall, work: Path, count: int) -> list[Path]:
    raw = work / "data.raw"
    with open(raw, "wb") as f:
        for _ in range(SIZE >> 20):
            f.write(os.urandom(1 << 20))
    images = []
    for n in range(count):
        image = work / f"disk{n}.qed"
        subprocess.run([*qemu.tool_cmd("qemu-img"), "convert", "-f", "raw", "-O", "qed", str(raw), str(image)],
                       check=True, env=qemu.env(), capture_output=True)
        images.append(image)
    raw.unlink()
    return images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=4, help="fio runtime per job and disk")
    parser.add_argument("--only", action="append", default=[], metavar="TEXT",
                        help="run only the jobs whose name contains TEXT (repeatable)")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=VALUE",
                        help="one more qbackend vhost-user disk, served with this environment variable")
    args = parser.parse_args()
    variants = [tuple(v.split("=", 1)) for v in args.variant]
    if any(len(v) != 2 for v in variants):
        parser.error("--variant takes NAME=VALUE")
    disks = dict(DISKS)
    for n, (name, value) in enumerate(variants):
        disks[f"qbackend vhost-user, {name}={value}"] = f"{0x14 + n:#x}"
    jobs = {name: job for name, job in JOBS.items() if not args.only or any(t in name for t in args.only)}

    from qbackend.machine.console import GuestConsole
    from qbackend.machine.launch import QemuMachine

    qemu, guest = find_qemu(), find_guest()
    load_before = f"{os.getloadavg()[0]:.2f}"
    with tempfile.TemporaryDirectory(prefix="bench-vub-") as tmp:
        work = Path(tmp)
        images = make_images(qemu, work, len(disks))
        bench_guest = with_host_programs(guest, ["fio"], work)
        ours_sock, ref_sock, nbd_sock = work / "qb-vub.sock", work / "qsd-vub.sock", work / "qb-nbd.sock"
        py_sock = work / "qb-vub-python.sock"
        qb = subprocess.Popen([sys.executable, "-m", "qbackend", "serve",
                               "--vhost-user-blk",
                               f"socket={ours_sock},image={images[0]},format=qed,id=vub0,num-queues={QUEUES}",
                               "--nbd", f"name=disk,image={images[2]},format=qed", "--nbd-socket", str(nbd_sock)],
                              cwd=ROOT, stdout=subprocess.DEVNULL)
        qb_python = subprocess.Popen([sys.executable, "-m", "qbackend", "-v", "serve", "--vhost-user-blk",
                                      f"socket={py_sock},image={images[3]},format=qed,id=vub1,num-queues={QUEUES}"],
                                     cwd=ROOT, stdout=subprocess.DEVNULL,
                                     env={**os.environ, "QBACKEND_NATIVE": "off"})
        qsd = subprocess.Popen([*qemu.tool_cmd("qemu-storage-daemon"),
                                "--blockdev", f"driver=file,node-name=f0,filename={images[1]}",
                                "--blockdev", "driver=qed,node-name=q0,file=f0",
                                "--export", f"type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,"
                                            f"addr.path={ref_sock},writable=on,num-queues={QUEUES}"],
                               env=qemu.env(), stdout=subprocess.DEVNULL)
        variant_procs, variant_args = [], []
        for n, (name, value) in enumerate(variants):
            sock = work / f"qb-vub-variant{n}.sock"
            variant_procs.append((sock, subprocess.Popen(
                [sys.executable, "-m", "qbackend", "-v", "serve", "--vhost-user-blk",
                 f"socket={sock},image={images[len(DISKS) + n]},format=qed,id=vv{n},num-queues={QUEUES}"],
                cwd=ROOT, stdout=subprocess.DEVNULL, env={**os.environ, name: value})))
            variant_args += ["-chardev", f"socket,id=vv{n},path={sock}", "-device",
                             f"vhost-user-blk-pci,chardev=vv{n},num-queues={QUEUES},addr={0x14 + n:#x}"]
        vm: QemuMachine | None = None
        try:
            for sock, proc in variant_procs:
                wait_for_socket(sock, proc, "qbackend (variant)")
            wait_for_socket(ours_sock, qb, "qbackend")
            wait_for_socket(nbd_sock, qb, "qbackend's NBD server")
            wait_for_socket(ref_sock, qsd, "qemu-storage-daemon")
            wait_for_socket(py_sock, qb_python, "qbackend (Python path)")
            addrs = list(DISKS.values())
            vm = QemuMachine(work, name="bench", guest=bench_guest, memory="1G", smp=QUEUES, extra_args=[
                "-chardev", f"socket,id=vub0,path={ours_sock}",
                "-device", f"vhost-user-blk-pci,chardev=vub0,num-queues={QUEUES},addr={addrs[0]}",
                "-chardev", f"socket,id=vub1,path={ref_sock}",
                "-device", f"vhost-user-blk-pci,chardev=vub1,num-queues={QUEUES},addr={addrs[1]}",
                "-blockdev", f"driver=nbd,node-name=nbd0,server.type=unix,server.path={nbd_sock},export=disk",
                "-device", f"virtio-blk-pci,drive=nbd0,num-queues=1,addr={addrs[2]}",
                "-chardev", f"socket,id=vub2,path={py_sock}",
                "-device", f"vhost-user-blk-pci,chardev=vub2,num-queues={QUEUES},addr={addrs[3]}",
                *variant_args])
            console = GuestConsole(vm.serial_path)
            vm.start()
            console.connect()
            console.wait_ready(timeout=180)

            def sh(cmd: str, timeout: float = 120) -> str:
                return console.run_checked(cmd, timeout).strip()

            devices: dict[str, str] = {}
            deadline = time.monotonic() + 30
            while len(devices) < len(disks) and time.monotonic() < deadline:
                for name, addr in disks.items():
                    slot = f"0000:00:{int(addr, 16):02x}.0"
                    found = sh(f"for b in /sys/block/vd*; do readlink $b | grep -q {slot}/ "
                               f"&& basename $b; done; true")
                    if found:
                        devices[name] = "/dev/" + found.split()[0]
                time.sleep(0.2)
            if len(devices) < len(disks):
                listing = sh("ls -l /sys/block/; true")
                raise SystemExit(f"bench_vhost_user_blk: the guest shows only {devices}:\n{listing}")
            results: dict[str, dict[str, list[float]]] = {job: {d: [] for d in disks} for job in jobs}
            for fio_args, _ in jobs.values():  # warm-up: one short pass of each
                for dev in devices.values():
                    sh(f"fio --name=w --filename={dev} --direct=1 --ioengine=libaio --thread {fio_args} "
                       f"--runtime=1 --time_based --output-format=terse >/dev/null")
            for _ in range(args.rounds):
                for job, (fio_args, unit) in jobs.items():
                    for name, dev in devices.items():
                        out = sh(f"fio --name=b --filename={dev} --direct=1 --ioengine=libaio --thread {fio_args} "
                                 f"--runtime={args.seconds} --time_based --output-format=terse",
                                 timeout=args.seconds * 10 + 60)
                        fields = out.splitlines()[-1].split(";")
                        write = "write" in fio_args
                        bw_kib, iops = (float(fields[47]), float(fields[48])) if write else \
                            (float(fields[6]), float(fields[7]))
                        results[job][name].append(bw_kib / 1024 if unit == "MB/s" else iops)
        finally:
            if vm is not None:
                vm.stop()
            for proc in (qb, qsd, qb_python, *(p for _, p in variant_procs)):
                proc.terminate()
                proc.wait(30)

    names = list(disks)
    print(f"\nvhost-user-blk in a TCG guest with {QUEUES} vCPUs (fio, direct I/O, libaio; medians of "
          f"{args.rounds} interleaved rounds of {args.seconds} s; unpinned; load before: {load_before}, "
          f"after: {os.getloadavg()[0]:.2f})")
    print(f"{'job':<20}" + "".join(f"{n:>34}" for n in names) + f"{'vu/qsd':>9}{'vu/nbd':>9}{'py/qsd':>9}"
          + "".join(f"{f'v{n}/qsd':>9}" for n in range(len(variants))))
    for job, (_, unit) in jobs.items():
        med = [statistics.median(results[job][n]) for n in names]
        print(f"{job:<20}" + "".join(f"{m:>28.1f} {unit:<5}" for m in med)
              + f"{med[0] / med[1]:>8.2f}x{med[0] / med[2]:>8.2f}x{med[3] / med[1]:>8.2f}x"
              + "".join(f"{m / med[1]:>8.2f}x" for m in med[len(DISKS):]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
