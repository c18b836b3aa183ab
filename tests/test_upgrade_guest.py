"""`qbackend upgrade` ten times under a running guest that notices nothing.

A `qbackend serve` process (its own process: only that hands over) serves
two ivshmem devices of one peer group (MSI-X, 2 vectors each, on a
/dev/shm name, with an ivshmem-server socket a host program joins as a
peer), the edu example and a QED disk over vhost-user-blk; the
guest uses all four.  Then, ten times, while the guest runs edu_check in a
loop (identification, factorial, interrupts, DMA to and from guest RAM) and
writes numbered records to the disk (each dd with fsync): doorbells from the
host peer to the guest, from the guest to the host peer and from one guest
device to the other, the QMP upgrade, and more doorbells.  What it checks:
- every upgrade answers with a new PID, the old process exits 0;
- no interrupt is lost: the guest's per-vector counts equal the doorbells rung,
  and the host peer gets every doorbell the guest rings it;
- every access is answered: every edu_check run prints what the first one
  printed, and none fails; no record write fails, and every record is in
  the image afterwards (qemu-img check clean); the IVPositions and the shared memory written
  before are unchanged, and memory the guest writes after is seen by the host;
- QEMU's log has no vfio-user error;
- the new process holds as many fds as the one before it;
and prints the hand-over time of each upgrade (p50 and max), the time
during which no device answers.
"""

from __future__ import annotations

import base64
import functools
import os
import re
import signal
import statistics
from pathlib import Path

import pytest
from qed_tools import qemu_check, qemu_img

from qbackend.app.monitor_client import call, monitor
from qbackend.block.qed import QedImage
from qbackend.ivshmem.peer import IvshmemPeer
from qbackend.machine.launch import vfio_user_device_arg
from qbackend.testing.harness import Guest, Harness, start_qbackend, sysfs_pci, wait_until

pytestmark = pytest.mark.guest

UPGRADES = 10
SIZE = 1 << 20
EDU = f"{Path(__file__).resolve().parent.parent}/examples/edu.py:Edu"
IV0, IV1, EDU_SLOT = "00:02.0", "00:03.0", "00:05.0"
RECORD = 4096
# The guest's disk workload: record i at block i, each dd with fsync; /tmp/rec.done holds the
# last i whose dd returned, a failed dd goes to /tmp/rec.failed.
WRITER = ("(i=1; while [ ! -e /tmp/stop ]; do printf 'record %08d\\n' $i | dd of=/dev/vda bs=4096 seek=$i "
          "conv=sync,fsync 2>/tmp/dd.err || { echo $i >> /tmp/rec.failed; cat /tmp/dd.err >> /tmp/rec.failed; "
          "break; }; echo $i > /tmp/rec.done; i=$((i+1)); done; echo end > /tmp/rec.end)")
# The guest's edu workload: edu_check in a loop; each run's output in /tmp/edu.N, a failed run
# (exit status other than 0) named in /tmp/edu.failed.
EDU_LOOP = (f"(n=0; while [ ! -e /tmp/stop ]; do n=$((n+1)); edu_check {sysfs_pci(EDU_SLOT)} check > /tmp/edu.$n "
            "2>&1 || echo $n >> /tmp/edu.failed; echo $n > /tmp/edu.done; done; echo end > /tmp/edu.end)")


def fds_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie nobody has reaped yet counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def counts(guest: Guest, slot: str) -> list[int]:
    return [int(x) for x in guest.sh(f"cat {sysfs_pci(slot)}/counts").split()]


def record(i: int) -> bytes:
    return f"record {i:08d}\n".encode().ljust(RECORD, b"\0")


def test_ten_upgrades_under_a_running_guest(harness: Harness, tmp_path: Path) -> None:
    shm = harness.shm_name("upgrade")
    control = tmp_path / "qb.sock"
    image = tmp_path / "disk.qed"
    qemu_img("create", "-f", "qed", str(image), "64M")
    proc, _ = start_qbackend(
        ["serve", "--control", str(control),
         "--ivshmem", f"socket={tmp_path / 'iv0.sock'},size=1M,shm={shm},vectors=2,id=iv0,server={tmp_path / 'ivs.sock'}",
         "--ivshmem", f"socket={tmp_path / 'iv1.sock'},size=1M,shm={shm},vectors=2,id=iv1",
         "--device", f"socket={tmp_path / 'edu.sock'},class={EDU},id=edu1",
         "--vhost-user-blk", f"socket={tmp_path / 'vub.sock'},image={image},format=qed,id=vub0"], tmp_path)
    pids = [proc.pid]

    def stop_last() -> None:
        try:
            os.kill(pids[-1], signal.SIGINT)
        except ProcessLookupError:
            pass
        if proc.stdout is not None and not proc.stdout.closed:
            proc.communicate(timeout=30)

    harness.callback(stop_last)
    guest = harness.guest("upgrade", extra_args=[
        "-device", vfio_user_device_arg("iv0", tmp_path / "iv0.sock", addr="0x2"),
        "-device", vfio_user_device_arg("iv1", tmp_path / "iv1.sock", addr="0x3"),
        "-device", vfio_user_device_arg("edu1", tmp_path / "edu.sock", addr="0x5"),
        "-chardev", f"socket,id=vub0,path={tmp_path / 'vub.sock'}",
        "-device", "vhost-user-blk-pci,chardev=vub0,num-queues=1,addr=0x6",
    ])
    guest.wait_guest("[ -b /dev/vda ]", 30)
    iv0_bar0, iv1_bar0 = guest.bar(sysfs_pci(IV0), 0)[0], guest.bar(sysfs_pci(IV1), 0)[0]
    iv0_bar2 = guest.bar(sysfs_pci(IV0), 2)[0]
    positions = (guest.devmem(iv0_bar0 + 8), guest.devmem(iv1_bar0 + 8))
    assert positions[0] != positions[1]
    with monitor(control) as qmp:
        call(qmp, "ivshmem-write", {"group": shm, "offset": 0x100, "data": base64.b64encode(b"before!!").decode()})
    assert guest.devmem(iv0_bar2 + 0x100, 64) == int.from_bytes(b"before!!", "little")
    reference = guest.sh(f"edu_check {sysfs_pci(EDU_SLOT)} check", 180).splitlines()
    assert reference, "edu_check printed nothing"
    guest.console.start_background(EDU_LOOP)
    guest.console.start_background(WRITER)

    host_rung: list[int] = []
    host = IvshmemPeer(tmp_path / "ivs.sock", vectors=2, on_doorbell=host_rung.append)
    harness.callback(host.close)
    rung = {IV0: [0, 0], IV1: [0, 0]}
    base = {IV0: counts(guest, IV0), IV1: counts(guest, IV1)}
    guest_to_host: list[int] = []

    def ring_both_ways(k: int) -> None:
        assert host.ring(positions[0], k % 2)  # the host peer rings iv0's vector k % 2
        rung[IV0][k % 2] += 1
        guest.sh(f"echo '{host.id} {k % 2} 1' > {sysfs_pci(IV1)}/doorbell")  # iv1 rings the host peer
        guest_to_host.append(k % 2)
        # iv0 rings iv1 (one doorbell: two at once may arrive as one interrupt, an eventfd's count)
        guest.sh(f"echo '{positions[1]} {(k + 1) % 2} 1' > {sysfs_pci(IV0)}/doorbell")
        rung[IV1][(k + 1) % 2] += 1

    def expected(slot: str) -> list[int]:
        return [b + r for b, r in zip(base[slot], rung[slot], strict=True)]

    fds_before = fds_of(pids[-1])
    handovers = []
    for k in range(UPGRADES):
        ring_both_ways(2 * k)
        with monitor(control) as qmp:
            reply = call(qmp, "upgrade", timeout=120)
        new_pid = int(reply["pid"])
        handovers.append(float(reply["paused"]))
        old_pid = pids[-1]
        pids.append(new_pid)
        if old_pid == proc.pid:
            assert proc.wait(30) == 0
        else:
            wait_until(functools.partial(gone, old_pid), 30, "the old process to exit")
        ring_both_ways(2 * k + 1)
        wait_until(lambda: counts(guest, IV0) == expected(IV0) and counts(guest, IV1) == expected(IV1)
                   and sorted(host_rung) == sorted(guest_to_host), 30,
                   f"every doorbell's interrupt after upgrade {k + 1}",
                   seen=lambda: {"iv0": (counts(guest, IV0), expected(IV0)), "iv1": (counts(guest, IV1), expected(IV1)),
                                 "host": (sorted(host_rung), sorted(guest_to_host))})
        assert fds_of(new_pid) == fds_before, f"upgrade {k + 1}: fds {fds_before} -> {fds_of(new_pid)}"

    done_before_stop = int(guest.sh("cat /tmp/edu.done"))
    wait_until(lambda: int(guest.sh("cat /tmp/edu.done")) > done_before_stop, 300, "one more edu_check run")
    guest.sh("touch /tmp/stop")
    guest.wait_guest("[ -e /tmp/edu.end ] && [ -e /tmp/rec.end ]", 300)
    assert guest.sh("cat /tmp/edu.failed 2>/dev/null; true") == ""
    assert guest.sh("cat /tmp/rec.failed 2>/dev/null; true") == ""
    assert guest.sh("dmesg | grep -i -E 'I/O error|timed out|hung task|ivshmem_msix.*error'; true") == ""
    records = int(guest.sh("cat /tmp/rec.done"))
    runs = int(guest.sh("cat /tmp/edu.done"))
    for n in range(1, runs + 1):
        assert guest.sh(f"cat /tmp/edu.{n}").splitlines() == reference, f"edu_check run {n} of {runs}"
    # What the guest saw of the group stays, and what it writes now the host sees.
    assert (guest.devmem(iv0_bar0 + 8), guest.devmem(iv1_bar0 + 8)) == positions
    assert guest.devmem(iv0_bar2 + 0x100, 64) == int.from_bytes(b"before!!", "little")
    guest.devmem(iv0_bar2 + 0x200, 32, 0x600DF00D)
    with monitor(control) as qmp:
        def host_sees() -> bool:
            data = call(qmp, "ivshmem-read", {"group": shm, "offset": 0x200, "length": 4})["data"]
            return base64.b64decode(data) == (0x600DF00D).to_bytes(4, "little")
        wait_until(host_sees, 10, "the host to see the guest's write")
    said = [line for line in guest.vm.log_path.read_text(errors="replace").splitlines()
            if not line.startswith("$ ")]  # the command line itself names vfio-user-pci
    assert not [line for line in said if re.search(r"vfio|Broken pipe|Unable|error", line, re.I)], said
    guest.stop()
    os.kill(pids[-1], signal.SIGINT)
    proc.communicate(timeout=30)  # every process wrote here; the last one flushed the image as it stopped
    assert qemu_check(image)[0] == 0, qemu_check(image)
    with QedImage.open_path(image, read_only=True) as img:
        written = img.read(0, (records + 1) * RECORD)
    missing = [i for i in range(1, records + 1) if written[i * RECORD:(i + 1) * RECORD] != record(i)]
    assert missing == [], f"records lost or wrong: {missing[:20]}"
    print(f"\n{UPGRADES} upgrades under a running guest: {runs} edu_check runs all equal, {records} records fsynced, "
          f"{sum(map(sum, rung.values())) + len(host_rung)} doorbells all delivered; paused (no device answers meanwhile) "
          f"p50 {statistics.median(handovers) * 1000:.0f} ms, max {max(handovers) * 1000:.0f} ms")
