"""A restart under a writing guest loses nothing.

A booted guest writes numbered 4 KiB records to /dev/vda, a QED image that a
separate `qbackend nbd` process serves, each with dd conv=fsync (so the
guest's flush reaches qbackend's NBD FLUSH before dd returns).  QEMU's NBD
client is told to reconnect (`reconnect-delay` on `-blockdev driver=nbd`).
The test SIGKILLs qbackend at random moments, some in the middle of cluster
allocations, and starts it again on the same socket: a new process that
finds NEED_CHECK set and repairs the image on open (it logs that it did).  What it checks:
- the guest's I/O resumes by itself each time, and no dd ever fails;
- every record whose dd returned is in the image afterwards, byte for byte,
  read by qbackend's QED reader and by qemu-img convert (QEMU's reader);
- qemu-img check is clean once qbackend has stopped.
Each kill's stall is printed (run with -s): how long qbackend was down, and
how long from its "serving" to the guest's next completed record.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest
from qed_tools import qemu_check, qemu_img
from restartable import RestartableQbackend

from qbackend.block.qed import QedImage
from qbackend.testing.harness import Harness, wait_until

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
SIZE = 64 << 20
RECORD = 4096
KILLS = 6
# The guest's writer: record i at block i, "record %08d" then zeros (conv=sync pads the
# block); /tmp/done holds the last i whose dd (write + fsync) returned, a failed dd goes
# to /tmp/failed.  Blocks 1.. spread over many 64 KiB QED clusters, so kills land in
# allocating writes as well as in rewrites of allocated clusters.
WRITER = (
    "(i=1; while [ ! -e /tmp/stop ] && [ $i -lt 16000 ]; do "
    "printf 'record %08d\\n' $i | dd of=/dev/vda bs=4096 seek=$i conv=sync,fsync 2>/tmp/dd.err "
    "|| { echo $i >> /tmp/failed; cat /tmp/dd.err >> /tmp/failed; break; }; "
    "echo $i > /tmp/done; i=$((i+1)); done; echo finished > /tmp/finished)"
)


def record(i: int) -> bytes:
    return f"record {i:08d}\n".encode().ljust(RECORD, b"\0")


def test_sigkill_under_a_writing_guest_loses_no_fsynced_record(harness: Harness, tmp_path: Path) -> None:
    seed = int(os.environ.get("QBACKEND_RESTART_SEED", time.time_ns() % 100000))
    rng = random.Random(seed)
    image, sock, log = tmp_path / "disk.qed", tmp_path / "nbd.sock", tmp_path / "qbackend-nbd.log"
    qemu_img("create", "-f", "qed", str(image), str(SIZE))
    server = RestartableQbackend(["nbd", "--socket", str(sock), "--export", f"name=disk,image={image},format=qed"],
                                 log)
    server.start()
    harness.callback(server.stop)
    blockdev = {"driver": "nbd", "node-name": "nbd0", "export": "disk", "reconnect-delay": 30,
                "server": {"type": "unix", "path": str(sock)}}
    guest = harness.guest("restart", extra_args=["-blockdev", json.dumps(blockdev),
                                                 "-device", "virtio-blk-pci,drive=nbd0,id=vblk0"])
    guest.wait_guest("[ -b /dev/vda ]", 10)

    def done() -> int:
        text = guest.sh("cat /tmp/done 2>/dev/null || echo 0")
        return int(text.strip().splitlines()[-1])

    guest.console.start_background(WRITER)
    wait_until(lambda: done() >= 5, 60, "the guest's first records")
    stalls = []
    for kill in range(KILLS):
        time.sleep(rng.uniform(0.2, 2.0))
        before = done()
        server.kill()
        killed_at = time.monotonic()
        time.sleep(rng.uniform(0.0, 1.5))  # the guest's requests queue in QEMU meanwhile
        server.start()
        serving_at = time.monotonic()
        assert server.serving_lines() == kill + 2
        wait_until(lambda before=before: done() > before, 60, f"the guest's I/O to resume after kill {kill + 1}")
        stalls.append((serving_at - killed_at, time.monotonic() - serving_at))
        assert guest.sh("cat /tmp/failed 2>/dev/null; true") == "", f"seed {seed}"
    guest.sh("touch /tmp/stop")
    guest.wait_guest("[ -e /tmp/finished ]", 60)
    assert guest.sh("cat /tmp/failed 2>/dev/null; true") == "", f"seed {seed}"
    last = done()
    guest.stop()
    assert server.stop() == 0, log.read_text()
    repairs = [int(line.split("checked on open: ")[1].split()[0]) for line in log.read_text().splitlines()
               if "NEED_CHECK was set" in line]
    assert repairs, log.read_text()  # the kills did land while allocations were in flight
    print(f"\nrestart under load (seed {seed}): {KILLS} SIGKILLs, {last} records fsynced; "
          f"{len(repairs)} restarts found NEED_CHECK set and checked the image (leaked clusters freed: "
          f"{', '.join(map(str, repairs))}); "
          "per kill, qbackend down / serving to the guest's next record: "
          + ", ".join(f"{down:.2f}s/{resume:.2f}s" for down, resume in stalls))

    assert qemu_check(image)[0] == 0, qemu_check(image)
    with QedImage.open_path(image, read_only=True) as img:
        ours = img.read(0, (last + 1) * RECORD)
    raw = tmp_path / "disk.raw"
    qemu_img("convert", "-f", "qed", "-O", "raw", str(image), str(raw))
    theirs = raw.read_bytes()[: (last + 1) * RECORD]
    assert ours == theirs
    missing = [i for i in range(1, last + 1) if ours[i * RECORD:(i + 1) * RECORD] != record(i)]
    assert missing == [], f"seed {seed}: records lost or wrong: {missing[:20]}"
