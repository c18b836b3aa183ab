"""make bench: how long a writing guest stalls when its vhost-user-blk back end goes away and comes back.

One TCG guest (2 vCPUs, like scripts/bench_vhost_user_blk.py) has three
vhost-user-blk-pci disks (2 queues each), each its own copy of one QED image
(64 MiB, every cluster written):
- vda: `qbackend serve --vhost-user-blk`, SIGKILLed and started again on the
  same socket; QEMU's chardev reconnects (`reconnect-ms=500`);
- vdb: qemu-storage-daemon 11.1's own vhost-user-blk export, SIGKILLed and
  started again the same way, on the same kind of chardev;
- vdc: `qbackend serve --control ... --vhost-user-blk ...` handed over to a new
  process with the QMP `upgrade` command (what `qbackend upgrade` sends; sent
  from this process so that no CLI start-up sits in the timing); the chardev
  does not reconnect: QEMU never sees a close.
Every back end is started before QEMU (QEMU 11.0+ aborts when the first connect
of a reconnecting chardev fails).  The events are interleaved (vda, vdb, vdc,
vda, ...), N of each (--runs).  For each, one writer in the guest writes
numbered 4 KiB records to that disk, each a dd with conv=fsync (as the restart
and upgrade tests do), and after each dd prints "disk index ok" (or FAIL) on the
guest's second serial port, whose socket a host thread reads and timestamps:
the host's clock times both the event and every completed record, and the
console shell stays idle meanwhile.  About a second of records before the event
gives the normal per-record time (their median gap); the stall of one event is
the longest gap between two completed records from the event (SIGKILL sent, or
upgrade command sent) to the first record after the back end is back (new
process started, or upgrade answered), minus that normal time: the delay the
guest's I/O took on.  "event -> next" is the brief's other reading: from the
event to the record that ended that gap, minus the normal time (it misses the
part of the gap before the event, so it is lower).  Errors: any failed dd.
A disk whose writer has not gone on 15 s after the event is looked at (the
guest's in-flight count, and each ring's avail and used index read from guest
memory through QEMU's monitor), sent one more request (a direct read), and
looked at again; such an event is reported apart, left out of the stalls, and
the script exits 1.  Afterwards every back end is stopped cleanly and each image is checked with
qemu-img check and read back with qemu-img convert: every record whose dd
returned must be in it.  Nothing is pinned.

    python scripts/bench_restart.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_common import wait_for_socket  # noqa: E402

from qbackend.machine.launch import QemuInstall, find_guest, find_qemu  # noqa: E402

SIZE = 64 << 20
RECORD = 4096
QUEUES = 2
RECONNECT_MS = 500
WARM_SECONDS = 1.0  # of records before each event (the normal per-record time)
WARM_RECORDS = 8
AFTER_RECORDS = 4  # records after the resumption before the writer stops
RESUME_TIMEOUT = 15.0  # seconds; a disk whose I/O has not resumed by then is looked at (see hang_report)
PROBE_TIMEOUT = 10.0  # then one more request to the disk from the guest: does the writer go on?


@dataclass
class System:
    name: str
    short: str
    addr: str
    kind: str  # "kill" or "upgrade"
    sock: Path
    image: Path
    dev: str = ""
    proc: subprocess.Popen[bytes] | None = None
    pid: int = 0  # the process serving now (an upgrade's new process is not our child)
    next_record: int = 1
    stalls: list[float] = field(default_factory=list)
    to_next: list[float] = field(default_factory=list)
    normal: list[float] = field(default_factory=list)
    down: list[float] = field(default_factory=list)  # kill -> listening again, or the upgrade's hand-over
    ok: set[int] = field(default_factory=set)
    failed: list[int] = field(default_factory=list)
    gave_up: str = ""
    hung: list[str] = field(default_factory=list)  # events after which the I/O did not resume by itself


class SerialLines:
    """Lines from the guest's second serial port, each with the host's monotonic time of arrival."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.sock.connect(str(path))
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.lines: list[tuple[float, str]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            now = time.monotonic()
            if not data:
                return
            pending += data
            *complete, pending = pending.split(b"\n")
            with self.lock:
                self.lines.extend((now, line.decode(errors="replace").strip()) for line in complete)

    def since(self, start: int) -> list[tuple[float, str]]:
        with self.lock:
            return self.lines[start:]

    def __len__(self) -> int:
        with self.lock:
            return len(self.lines)

    def close(self) -> None:
        self.sock.close()


def writer(disk: int, dev: str, start: int) -> str:
    """Records start, start+1, ... to `dev` (record i at block i) until /tmp/stop.DISK exists;
    after each dd a line on ttyS1; a failed dd is noted in /tmp/failed.DISK and the writer goes on."""
    return (f"exec 3>/dev/ttyS1; i={start}; while [ ! -e /tmp/stop.{disk} ]; do "
            f"if printf 'record %08d\\n' $i | dd of={dev} bs=4096 seek=$i conv=sync,fsync 2>/tmp/dd.err.{disk}; "
            f"then echo $i > /tmp/done.{disk}; echo '{disk} '$i' ok' >&3; "
            f"else echo '{disk} '$i' FAIL' >&3; cat /tmp/dd.err.{disk} >> /tmp/failed.{disk}; fi; "
            f"i=$((i+1)); done; echo '{disk} end' >&3")


def record(i: int) -> bytes:
    return f"record {i:08d}\n".encode().ljust(RECORD, b"\0")


def socket_id(path: Path) -> tuple[int, int]:
    """What tells a socket file from the one bound before at the same path: an inode number
    freed by the unlink may come back at once, the change time does not."""
    st = path.stat()
    return st.st_ino, st.st_ctime_ns


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie nobody has reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def stop_process(s: System) -> None:
    """Stop the process serving `s` now (SIGINT, as Ctrl-C) and wait until it has exited."""
    if s.proc is not None and s.proc.pid != s.pid:
        s.proc.wait(30)  # the first process of an upgrade chain, long gone: reap it
    try:
        os.kill(s.pid, signal.SIGINT)
    except ProcessLookupError:
        return
    if s.proc is not None and s.proc.pid == s.pid:
        s.proc.wait(30)
        return
    deadline = time.monotonic() + 30
    while not gone(s.pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def make_images(qemu: QemuInstall, work: Path, n: int) -> list[Path]:
    raw = work / "data.raw"
    with open(raw, "wb") as f:
        for _ in range(SIZE >> 20):
            f.write(os.urandom(1 << 20))
    images = []
    for k in range(n):
        image = work / f"disk{k}.qed"
        subprocess.run([*qemu.tool_cmd("qemu-img"), "convert", "-f", "raw", "-O", "qed", str(raw), str(image)],
                       check=True, env=qemu.env(), capture_output=True)
        images.append(image)
    raw.unlink()
    return images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5, help="events per system (default 5)")
    parser.add_argument("-v", "--verbose", action="store_true", help="qbackend -v (its logs, printed if it fails)")
    args = parser.parse_args()

    from qbackend.app.monitor_client import call, monitor
    from qbackend.machine.console import GuestConsole
    from qbackend.machine.launch import QemuMachine
    from qbackend.machine.qmp import QmpError, SyncQmp

    qemu, guest = find_qemu(), find_guest()
    load_before = f"{os.getloadavg()[0]:.2f}"
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-restart-") as tmp:
        work = Path(tmp)
        images = make_images(qemu, work, 3)
        systems = [
            System("qbackend SIGKILL+restart", "qbackend", "0x10", "kill", work / "qb.sock", images[0]),
            System("qemu-storage-daemon SIGKILL+restart", "qsd", "0x11", "kill", work / "qsd.sock", images[1]),
            System("qbackend upgrade", "upgrade", "0x12", "upgrade", work / "qb-up.sock", images[2]),
        ]
        qb, qsd, up = systems
        control = work / "qb-up-control.sock"
        logs = {s.short: open(work / f"{s.short}.log", "ab") for s in systems}
        verbose = ["-v"] if args.verbose else []
        commands = {
            "qbackend": [sys.executable, "-m", "qbackend", *verbose, "serve", "--vhost-user-blk",
                         f"socket={qb.sock},image={qb.image},format=qed,id=vub0,num-queues={QUEUES}"],
            "qsd": [*qemu.tool_cmd("qemu-storage-daemon"),
                    "--blockdev", f"driver=file,node-name=f0,filename={qsd.image}",
                    "--blockdev", "driver=qed,node-name=q0,file=f0",
                    "--export", f"type=vhost-user-blk,id=e0,node-name=q0,addr.type=unix,"
                                f"addr.path={qsd.sock},writable=on,num-queues={QUEUES}"],
            "upgrade": [sys.executable, "-m", "qbackend", *verbose, "serve", "--control", str(control), "--vhost-user-blk",
                        f"socket={up.sock},image={up.image},format=qed,id=vub2,num-queues={QUEUES}"],
        }

        def launch(s: System) -> None:
            s.proc = subprocess.Popen(commands[s.short], cwd=ROOT, stdout=logs[s.short], stderr=subprocess.STDOUT,
                                      env=qemu.env() if s.short == "qsd" else None)
            s.pid = s.proc.pid

        for s in systems:
            launch(s)
        vm: QemuMachine | None = None
        serial2: SerialLines | None = None
        checks: dict[str, str] = {}
        try:
            for s in systems:
                wait_for_socket(s.sock, s.proc, s.name)
            wait_for_socket(control, up.proc, "qbackend's control socket")
            serial2_path = work / "records.sock"
            extra = ["-chardev", f"socket,id=records,path={serial2_path},server=on,wait=off",
                     "-serial", "chardev:records"]
            for n, s in enumerate(systems):
                reconnect = f",reconnect-ms={RECONNECT_MS}" if s.kind == "kill" else ""
                extra += ["-chardev", f"socket,id=vub{n},path={s.sock}{reconnect}",
                          "-device", f"vhost-user-blk-pci,chardev=vub{n},num-queues={QUEUES},addr={s.addr},id=disk{n}"]
            vm = QemuMachine(work, name="bench", guest=guest, memory="1G", smp=2, extra_args=extra)
            console = GuestConsole(vm.serial_path)
            vm.start()
            console.connect()
            serial2 = SerialLines(serial2_path)
            console.wait_ready(timeout=180)

            def sh(cmd: str, timeout: float = 60) -> str:
                return console.run_checked(cmd, timeout).strip()

            deadline = time.monotonic() + 30
            while not all(s.dev for s in systems) and time.monotonic() < deadline:
                for s in systems:
                    slot = f"0000:00:{int(s.addr, 16):02x}.0"
                    found = sh(f"for b in /sys/block/vd*; do readlink $b | grep -q {slot}/ && basename $b; done; true")
                    if found:
                        s.dev = "/dev/" + found.split()[0]
                time.sleep(0.2)
            if not all(s.dev for s in systems):
                raise SystemExit(f"bench_restart: the guest shows only {[s.dev for s in systems]}:\n"
                                 + sh("ls -l /sys/block/; true"))
            sh("stty -F /dev/ttyS1 115200 raw -echo")

            def hang_report(disk: int, s: System) -> str:
                """Where the disk's I/O stands: the guest's in-flight count, and per queue the
                indices in the rings themselves (avail written by the guest, used by the back end),
                read from guest memory through QEMU's monitor."""
                parts = [f"guest inflight (reads writes): {sh(f'cat /sys/block/{s.dev[5:]}/inflight')}"]
                try:
                    qmp = SyncQmp(vm.qmp_path, timeout=10)
                except QmpError as exc:
                    return parts[0] + f"; QEMU's monitor: {exc}"
                try:
                    for queue in range(QUEUES):
                        st = qmp.execute("x-query-virtio-queue-status",
                                         {"path": f"/machine/peripheral/disk{disk}/virtio-backend", "queue": queue})

                        def u16(addr: int) -> int:
                            out = qmp.execute("human-monitor-command", {"command-line": f"xp /1hx {addr}"})
                            return int(out.split(":")[1].split()[0], 16)

                        parts.append(f"queue {queue}: avail idx {u16(st['vring-avail'] + 2)}, used idx "
                                     f"{u16(st['vring-used'] + 2)}, QEMU's last-avail {st.get('last-avail-idx')}")
                except (QmpError, ValueError, IndexError, KeyError) as exc:
                    parts.append(f"QEMU's monitor: {exc}")
                finally:
                    qmp.close()
                return "; ".join(parts)

            def event(disk: int, s: System) -> None:
                assert serial2 is not None
                mark = len(serial2)
                sh(f"rm -f /tmp/stop.{disk}")
                console.start_background(writer(disk, s.dev, s.next_record))

                def records() -> list[tuple[float, int, bool]]:
                    out = []
                    for t, line in serial2.since(mark):
                        parts = line.split()
                        if len(parts) == 3 and parts[0] == str(disk) and parts[2] in ("ok", "FAIL"):
                            out.append((t, int(parts[1]), parts[2] == "ok"))
                    return out

                begun = time.monotonic()
                while len(records()) < WARM_RECORDS or time.monotonic() - begun < WARM_SECONDS:
                    if time.monotonic() - begun > RESUME_TIMEOUT:
                        s.gave_up = f"the writer did not start ({len(records())} records)"
                        return
                    time.sleep(0.01)
                t0 = time.monotonic()
                inode: tuple[int, int] = (0, 0)
                listening = None
                probed, state = 0.0, ""
                if s.kind == "kill":
                    assert s.proc is not None
                    inode = socket_id(s.sock)
                    s.proc.send_signal(signal.SIGKILL)
                    s.proc.wait(10)
                    launch(s)
                    t1 = time.monotonic()
                else:
                    with monitor(control) as qmp:
                        t0 = time.monotonic()
                        reply = call(qmp, "upgrade", {"timeout": 60}, timeout=70)
                    t1 = time.monotonic()
                    s.pid = int(reply["pid"])
                    s.down.append(float(reply.get("paused", reply["seconds"])))  # "paused": when it says
                # Wait for the first record after t1, then a few more.
                while True:
                    now = time.monotonic()
                    if s.kind == "kill" and listening is None:
                        try:
                            if socket_id(s.sock) != inode:
                                listening = now
                                s.down.append(now - t0)
                        except FileNotFoundError:
                            pass
                    after = [r for r in records() if r[0] > t1]
                    if len(after) >= AFTER_RECORDS:
                        break
                    if now - t1 > RESUME_TIMEOUT and not probed:
                        probed = now
                        state = hang_report(disk, s)
                        console.start_background(f"dd if={s.dev} of=/dev/null bs=4096 count=1 skip=12345 "
                                                 "iflag=direct")
                    if probed and now - probed > PROBE_TIMEOUT:
                        s.gave_up = (f"no record within {RESUME_TIMEOUT:.0f} s after the event, nor "
                                     f"{PROBE_TIMEOUT:.0f} s after one more request; before it: {state}; "
                                     f"after it: {hang_report(disk, s)}")
                        break
                    time.sleep(0.005)
                if probed and not s.gave_up:
                    resumed = min(t for t, _, _ in records() if t > probed)
                    s.hung.append(f"resumed {resumed - probed:.1f} s after one more request; {state}")
                seen = records()
                times = [t for t, _, _ in seen]
                before = [b - a for a, b in zip(times, times[1:], strict=False) if b <= t0][1:]
                normal = statistics.median(before) if before else 0.0
                s.normal.append(normal)
                if not s.gave_up and not probed:
                    first_after = next(t for t in times if t > t1)
                    gaps = [(b - a, b) for a, b in zip(times, times[1:], strict=False) if b > t0 and a < first_after]
                    gap, end = max(gaps)
                    s.stalls.append(gap - normal)
                    s.to_next.append(end - t0 - normal)
                sh(f"touch /tmp/stop.{disk}")
                wait_end = time.monotonic()
                while not s.gave_up and not any(line == f"{disk} end" for _, line in serial2.since(mark)):
                    if time.monotonic() - wait_end > RESUME_TIMEOUT:
                        s.gave_up = "the writer did not stop"
                    time.sleep(0.02)
                seen = records()
                s.ok.update(i for _, i, good in seen if good)
                s.failed.extend(i for _, i, good in seen if not good)
                s.next_record = max((i for _, i, _ in seen), default=s.next_record - 1) + 1

            for _ in range(args.runs):
                for disk, s in enumerate(systems):
                    if not s.gave_up:
                        event(disk, s)
            for disk, s in enumerate(systems):
                done = sh(f"cat /tmp/done.{disk} 2>/dev/null || echo 0")
                if not s.gave_up and int(done) != max(s.ok, default=0):
                    s.gave_up = f"the guest's last record {done}, the serial port's {max(s.ok, default=0)}"
                if sh(f"cat /tmp/failed.{disk} 2>/dev/null; true"):
                    s.failed.append(-1)
        finally:
            if vm is not None:
                vm.stop()
            if serial2 is not None:
                serial2.close()
            for s in systems:  # stopped cleanly: each flushes its image
                stop_process(s)
            for f in logs.values():
                f.close()

        for s in systems:
            proc = subprocess.run([*qemu.tool_cmd("qemu-img"), "check", "-f", "qed", "--output=json", str(s.image)],
                                  env=qemu.env(), capture_output=True, text=True)
            report = json.loads(proc.stdout) if proc.stdout.strip() else {}
            clean = proc.returncode == 0 and not report.get("corruptions") and not report.get("leaks")
            raw = work / f"{s.short}.raw"
            subprocess.run([*qemu.tool_cmd("qemu-img"), "convert", "-f", "qed", "-O", "raw", str(s.image), str(raw)],
                           check=True, env=qemu.env(), capture_output=True)
            data = raw.read_bytes()
            raw.unlink()
            missing = [i for i in sorted(s.ok) if data[i * RECORD:(i + 1) * RECORD] != record(i)]
            checks[s.short] = (f"qemu-img check {'clean' if clean else 'NOT clean: ' + proc.stdout.strip()}, "
                               f"{len(s.ok) - len(missing)} of {len(s.ok)} fsynced records in the image"
                               + (f" (missing or wrong: {missing[:10]})" if missing else ""))
            if not clean or missing:
                s.gave_up = s.gave_up or "records lost or image not clean"
            if s.gave_up:
                checks[s.short] += "\n    its log ends:\n" + (work / f"{s.short}.log").read_text(errors="replace")[-3000:]

    def ms(values: list[float], how: str) -> str:
        if not values:
            return "-"
        return f"{(statistics.median(values) if how == 'p50' else max(values)) * 1000:.0f} ms"

    print(f"\nguest-visible stall of a vhost-user-blk back end going away and coming back (TCG guest, 2 vCPUs, "
          f"{args.runs} events each, interleaved; a writer of 4 KiB records, dd conv=fsync; QEMU reconnect-ms="
          f"{RECONNECT_MS} for the SIGKILLed ones; unpinned; {time.monotonic() - started:.0f} s; load before: "
          f"{load_before}, after: {os.getloadavg()[0]:.2f})")
    print(f"{'system':<37}{'events':>7}{'record':>9}{'stall p50':>11}{'stall max':>11}{'event->next p50':>17}"
          f"{'back end back p50':>19}{'errors':>8}")
    for s in systems:
        print(f"{s.name:<37}{len(s.stalls):>7}{ms(s.normal, 'p50'):>9}{ms(s.stalls, 'p50'):>11}"
              f"{ms(s.stalls, 'max'):>11}{ms(s.to_next, 'p50'):>17}{ms(s.down, 'p50'):>19}"
              f"{'yes' if s.failed else 'no':>8}" + (f"  ({s.gave_up})" if s.gave_up else ""))
        for n, hang in enumerate(s.hung):
            print(f"  {s.name}: {'one event' if n == 0 else 'another'} did not resume by itself within "
                  f"{RESUME_TIMEOUT:.0f} s (left out of the stalls): {hang}")
    print("  record: the normal time of one record (median gap before the event); stall: the longest gap between "
          "records from the event on, minus that; event->next: from SIGKILL or the upgrade command to the record "
          "that ended that gap, minus the normal time (for an upgrade it holds the new process's start-up, during "
          "which the guest still writes); back end back: SIGKILL to the new process's socket, or the time the "
          "upgrade reports nothing was served (its hand-over time if it reports no pause)")
    for s in systems:
        print(f"  {s.name}: {checks.get(s.short, 'not checked')}")
    if qb.stalls and qsd.stalls:
        print(f"qbackend restart / qemu-storage-daemon restart (lower is better): stall p50 "
              f"{statistics.median(qb.stalls) / statistics.median(qsd.stalls):.2f}x, max "
              f"{max(qb.stalls) / max(qsd.stalls):.2f}x")
    if up.stalls and qsd.stalls:
        print(f"qbackend upgrade / qemu-storage-daemon restart (lower is better): stall p50 "
              f"{statistics.median(up.stalls) / statistics.median(qsd.stalls):.2f}x, max "
              f"{max(up.stalls) / max(qsd.stalls):.2f}x")
    return 1 if any(s.gave_up or s.failed or s.hung for s in systems) else 0


if __name__ == "__main__":
    sys.exit(main())
