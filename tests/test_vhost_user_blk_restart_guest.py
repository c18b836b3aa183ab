"""A vhost-user-blk back end SIGKILLed under a writing 2-vCPU guest loses nothing.

A booted guest (`-smp 2`) has a vhost-user-blk-pci disk with two queues on a
chardev that reconnects (`reconnect-ms=500`), a QED image served by a separate
`qbackend serve --vhost-user-blk` process.  Writers in the guest write
numbered 4 KiB records to areas of their own with dd conv=fsync (the guest's
flush reaches qbackend before dd returns): on the native path two, each dd
pinned to its own vCPU, so each queue carries one writer's requests alone (as
scripts/bench_restart.py's writer does) and an interrupt the back end owes is
never made up for by another writer's completion on the same queue; with the
test knob eight, unpinned (several requests in flight per queue to reorder).
The test SIGKILLs qbackend at seeded random moments (the seed is printed;
QBACKEND_RESTART_SEED repeats a run) and starts it again on the same socket;
QEMU reconnects and hands back the inflight region, and the new process
carries out again what the guest still waited for.  What it checks:
- every writer's I/O resumes by itself after each kill (each writer, not
  their sum: one queue left waiting for an interrupt stalls only its own
  writers), within RESUME_DEADLINE, and no dd ever fails (a writer that does
  not is reported with the seed, the guest's in-flight count and the end of
  qbackend's -v log, which gives each queue's start indices);
- every record whose dd returned is in the image afterwards, byte for byte,
  read by qbackend's QED reader and by qemu-img convert;
- qemu-img check is clean once qbackend has stopped.
Once with the native path (the default) and once with
QBACKEND_VHOST_TEST_REORDER=1 (completions out of order, every request in
Python), where a back end that assumed in-order completion would lose or
repeat requests.  Each kill's stall is printed (run with -s): how long
qbackend was down, and from its "serving" to the guest's next record.
"""

from __future__ import annotations

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
WRITERS = {"native": 2, "reorder": 8}
PINNED = {"native": True, "reorder": False}  # writer w's dd on vCPU w (2 vCPUs, 2 queues)
AREAS = {"native": 7000, "reorder": 1500}  # records of one writer's area (all of them fit in SIZE)
KILLS = 8
RESUME_DEADLINE = 60.0  # seconds from the new process's "serving" to every writer's next record
# Writer w writes record i at block 1 + w * area + i: "record w i" then zeros (conv=sync
# pads the block); /tmp/done.w holds the last i whose dd (write + fsync) returned, a failed
# dd goes to /tmp/failed.
WRITER = (
    "(i=0; while [ ! -e /tmp/stop ] && [ $i -lt {limit} ]; do "
    "printf 'record {w} %08d\\n' $i | {pin}dd of=/dev/vda bs=4096 seek=$((1 + {w} * {area} + i)) conv=sync,fsync "
    "2>/tmp/dd.err.{w} || {{ echo {w} $i >> /tmp/failed; cat /tmp/dd.err.{w} >> /tmp/failed; break; }}; "
    "echo $i > /tmp/done.{w}; i=$((i+1)); done; echo finished > /tmp/finished.{w})"
)


def restart_timeline(log: str) -> list[tuple[float, float]]:
    """Per restart (after the first start): seconds from listening to the front end's
    connect, and from there to the last queue's start (qbackend -v logs carry the time)."""
    out = []
    for part in log.split("---- SIGKILL ----")[1:]:
        times: dict[str, float] = {}
        for line in part.splitlines():
            stamp = _stamp(line)
            if stamp is None:
                continue
            if ": listening" in line and "listening" not in times:
                times["listening"] = stamp
            elif "front end connected" in line and "connected" not in times:
                times["connected"] = stamp
            elif "started (" in line:
                times["started"] = stamp
        if len(times) == 3:
            out.append((times["connected"] - times["listening"], times["started"] - times["connected"]))
    return out


def _stamp(line: str) -> float | None:
    """The time of a log line ("2026-12-06 23:59:01,123 name: ..."), or None."""
    try:
        clock = time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")
        return time.mktime(clock) + int(line[20:23]) / 1000
    except ValueError:
        return None


def record(w: int, i: int) -> bytes:
    return f"record {w} {i:08d}\n".encode().ljust(RECORD, b"\0")


@pytest.mark.parametrize("path", ["native", "reorder"])
def test_sigkill_under_a_writing_guest_loses_no_fsynced_record(harness: Harness, tmp_path: Path, path: str) -> None:
    seed = int(os.environ.get("QBACKEND_RESTART_SEED", time.time_ns() % 100000))
    rng = random.Random(seed)
    print(f"\nvhost-user-blk restart ({path}): seed {seed}")
    image, sock, log = tmp_path / "disk.qed", tmp_path / "vub.sock", tmp_path / "qbackend-serve.log"
    qemu_img("create", "-f", "qed", str(image), str(SIZE))
    env = dict(os.environ)
    env.pop("QBACKEND_VHOST_TEST_REORDER", None)
    if path == "reorder":
        env["QBACKEND_VHOST_TEST_REORDER"] = "1"
    server = RestartableQbackend(["-v", "serve", "--vhost-user-blk",
                                  f"socket={sock},image={image},format=qed,num-queues=2,id=vub0"], log, env)
    server.start()  # before QEMU: QEMU 11.0+ aborts when the first connect of a reconnecting chardev fails
    harness.callback(server.stop)
    guest = harness.guest(f"vub-restart-{path}", smp=2, extra_args=[
        "-chardev", f"socket,id=vub0,path={sock},reconnect-ms=500",
        "-device", "vhost-user-blk-pci,chardev=vub0,id=vblk0,num-queues=2"])
    guest.wait_guest("[ -b /dev/vda ]", 20)

    writers, area = WRITERS[path], AREAS[path]

    def done() -> list[int]:
        text = guest.sh(" ; ".join(f"cat /tmp/done.{w} 2>/dev/null || echo -1" for w in range(writers)))
        return [int(line) for line in text.split()]

    for w in range(writers):
        pin = f"taskset {1 << w} " if PINNED[path] else ""
        guest.console.start_background(WRITER.format(w=w, area=area, limit=area - 1, pin=pin))
    wait_until(lambda: min(done()) >= 3, 120, "every writer's first records")
    stalls = []
    for kill in range(KILLS):
        time.sleep(rng.uniform(0.2, 2.0))
        server.kill()
        killed_at = time.monotonic()
        time.sleep(rng.uniform(0.0, 1.5))  # the guest's requests wait in the rings meanwhile
        before = done()  # nothing completes while qbackend is down
        server.start()
        serving_at = time.monotonic()
        assert server.serving_lines() == kill + 2
        # Every writer, not their sum: a queue whose interrupt never comes stalls its own.
        waiting = [w for w in range(writers) if before[w] < area - 2]
        try:
            wait_until(lambda before=before: all(now > then for now, then in zip(done(), before, strict=True)
                                                 if then < area - 2),
                       RESUME_DEADLINE, "every writer's I/O to resume")
        except AssertionError:
            stuck = [w for w, (now, then) in enumerate(zip(done(), before, strict=True)) if w in waiting and now <= then]
            raise AssertionError(
                f"seed {seed}: after kill {kill + 1} writers {stuck} made no progress within {RESUME_DEADLINE:g} s "
                f"(records done before the kill {before}, now {done()}); guest in flight (reads writes): "
                f"{guest.sh('cat /sys/block/vda/inflight')}\n" + log.read_text()[-6000:]) from None
        stalls.append((serving_at - killed_at, time.monotonic() - serving_at))
        assert guest.sh("cat /tmp/failed 2>/dev/null; true") == "", f"seed {seed}"
    guest.sh("touch /tmp/stop")
    guest.wait_guest(" && ".join(f"[ -e /tmp/finished.{w} ]" for w in range(writers)), 120)
    assert guest.sh("cat /tmp/failed 2>/dev/null; true") == "", f"seed {seed}"
    last = done()
    guest.stop()
    assert server.stop() == 0, log.read_text()
    text = log.read_text()
    resubmitted = sum(int(line.split(": queue ")[1].split()[1]) for line in text.splitlines()
                      if "were in flight when the last back end stopped" in line)
    print(f"vhost-user-blk restart ({path}, seed {seed}): {KILLS} SIGKILLs, {writers} writers, "
          f"{sum(last) + writers} records fsynced, "
          f"{resubmitted} requests carried out again from the inflight region, "
          f"{text.count('inflight region refused')} regions refused; per kill, qbackend down / serving to the "
          "guest's next record: " + ", ".join(f"{down:.2f}s/{resume:.2f}s" for down, resume in stalls))
    print("per restart, from qbackend's log: listening -> QEMU connected -> every queue started: "
          + ", ".join(f"{a:.2f}s/{b:.2f}s" for a, b in restart_timeline(text)))
    assert "inflight region refused" not in text, text

    assert qemu_check(image)[0] == 0, qemu_check(image)
    end = (1 + writers * area) * RECORD
    with QedImage.open_path(image, read_only=True) as img:
        ours = img.read(0, end)
    raw = tmp_path / "disk.raw"
    qemu_img("convert", "-f", "qed", "-O", "raw", str(image), str(raw))
    assert ours == raw.read_bytes()[:end]
    missing = [(w, i) for w in range(writers) for i in range(last[w] + 1)
               if ours[(1 + w * area + i) * RECORD:(2 + w * area + i) * RECORD] != record(w, i)]
    assert missing == [], f"seed {seed}: records lost or wrong: {missing[:20]}"
