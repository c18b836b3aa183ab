"""The native vhost-user-blk path judged against the Python model, on one ring.

A `Setup` is a whole guest as the device sees it: memory regions (bytes at
GPAs), one split queue (size, features, ring addresses, base) and a disk
(raw bytes, or a QED image file).  `run(setup, work, native=...)` serves
the ring once, as the server's queue worker does, on a fresh copy of
everything:

- Python (`native=False`): `serve_one` until the ring is empty or broken,
  then the notification decision (the QBACKEND_NATIVE=off path);
- native: the C drain, handing each chain it does not serve to
  `serve_one` with the indices given and taken back, then the C
  notification decision.

Both give an `Outcome`: every byte of guest memory (used ring, statuses,
data), the disk's bytes as the guest reads them, whether the queue broke,
the indices, and whether the driver was to be interrupted.  The two must be
equal, whatever the ring holds (tests/test_vhost_user_blk_native.py,
fuzz/virtqueue.py).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from qbackend.block.exports import Export, RawExport
from qbackend.models import virtio_blk as blk
from qbackend.models.virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    GuestMemory,
    QueueBroken,
    SplitVirtqueue,
)
from qbackend.servers import vhost_user_blk_fast as fast
from qbackend.servers.vhost_user_blk import serve_one

SERIAL = b"differential-serial!!"  # longer than ID_BYTES: GET_ID truncates


@dataclass
class Setup:
    regions: list[tuple[int, bytes]]  # (gpa, content)
    num: int
    desc: int  # GPAs
    avail: int
    used: int
    disk: bytes = b""  # a raw disk's bytes; or
    qed: Path | None = None  # a QED image to copy
    base: int = 0
    indirect: bool = True
    event_idx: bool = True
    readonly: bool = False
    writethrough: bool = False
    capacity_extra: int = 0  # sectors the config claims past the disk's end
    max_chains: int = 1 << 16  # served at most, either way (a ring the device's own writes refill never ends)
    pool_min: int | None = None  # None: no I/O pool; else a pool of 2 threads from this size


@dataclass
class Outcome:
    memory: list[bytes]
    disk: bytes
    broken: bool
    last_avail_idx: int
    used_idx: int
    notify: bool
    native_requests: int = field(default=0, compare=False)


def _export(setup: Setup, work: Path, tag: str) -> Export:
    if setup.qed is not None:
        from qbackend.block.qed_export import QedExport

        path = work / f"{tag}.qed"
        shutil.copyfile(setup.qed, path)
        return QedExport(tag, path, readonly=setup.readonly)
    path = work / f"{tag}.raw"
    path.write_bytes(setup.disk)
    return RawExport(tag, path, readonly=setup.readonly)


def run(setup: Setup, work: Path, *, native: bool) -> Outcome:
    buffers = [bytearray(content) for _, content in setup.regions]
    memory = GuestMemory()
    for (gpa, _), buf in zip(setup.regions, buffers, strict=True):
        memory.add_region(gpa, len(buf), gpa, buf)
    export = _export(setup, work, "native" if native else "python")
    size = export.info.size
    config = blk.BlkConfig(capacity=size // blk.SECTOR_SIZE + setup.capacity_extra, seg_max=126,
                           readonly=setup.readonly, max_discard_sectors=64, max_discard_seg=1,
                           max_write_zeroes_sectors=64, max_write_zeroes_seg=1, write_zeroes_may_unmap=True)
    vq = SplitVirtqueue(memory)
    vq.set_num(setup.num)
    vq.set_base(setup.base)
    vq.set_features((setup.indirect << VIRTIO_F_INDIRECT_DESC) | (setup.event_idx << VIRTIO_F_EVENT_IDX))
    vq.set_addresses(setup.desc, setup.avail, setup.used, userspace=False)
    nmem: fast.NativeMemory | None = None
    broken, notify, served, native_requests = False, False, 0, 0
    try:
        try:
            vq.ready()
        except QueueBroken:
            broken = True
        if native and not broken:
            helper = fast.load()
            if helper is None:
                raise RuntimeError("the native helper is not loaded")
            nmem = fast.NativeMemory(helper)
            nmem.rebuild(memory)
            nq = fast.NativeQueue(helper, nmem, export, None, -1, SERIAL,
                                  pool_threads=0 if setup.pool_min is None else 2)
            if setup.pool_min is not None:
                nq.c.pool_min = setup.pool_min
            nq.load(vq, serving=True, capacity=config.capacity, readonly=config.readonly,
                    writethrough=setup.writethrough, kick=None, call=None)
            while served < setup.max_chains:
                nq.c.max_batch = setup.max_chains - served
                before = int(nq.c.requests)
                rc = nq.drain()
                served += int(nq.c.requests) - before
                if rc == nq.MORE:
                    continue
                if rc == nq.EMPTY:
                    break
                nq.give(vq)
                try:
                    pushed = serve_one(vq, export, config, writethrough=setup.writethrough, serial=SERIAL)
                except QueueBroken:
                    broken = True
                    nq.take(vq, False)
                    break
                nq.take(vq, pushed)
                if not pushed:
                    break
                served += 1
            nq.give(vq)
            native_requests = int(nq.c.requests)
            # Whether the driver was interrupted for what it got (C may decide more than once
            # in a drain: the first decision after a start is yes, as the model's one is).
            if not broken:
                nq.notify()
                notify = bool(nq.c.notifications)
            else:  # as the server: a break interrupts for what was pushed before it
                notify = bool(nq.c.pushed)
        elif not broken:
            try:
                while served < setup.max_chains and serve_one(vq, export, config,
                                                              writethrough=setup.writethrough, serial=SERIAL):
                    served += 1
            except QueueBroken:
                broken = True
            notify = bool(served) and (broken or vq.should_notify())
        disk = export.read(0, size)
        return Outcome([bytes(b) for b in buffers], disk, broken, vq.last_avail_idx, vq.used_idx, notify,
                       native_requests)
    finally:
        if nmem is not None:
            nmem.clear()
        vq.detach()
        memory.clear()
        export.close()
        for suffix in (".raw", ".qed"):
            try:
                os.unlink(work / f"{'native' if native else 'python'}{suffix}")
            except FileNotFoundError:
                pass
