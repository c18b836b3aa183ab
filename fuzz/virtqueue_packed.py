"""The packed virtqueue and virtio-blk requests, the device side, against a hostile
guest driver (as fuzz/virtqueue.py for split rings): the input is the queue's
configuration and the raw guest memory (descriptor ring, event suppression areas,
indirect tables, request headers, data).

Input layout (little-endian), a 32-byte header, then guest memory:

    0   u8   queue size - 1 (1..256; a packed ring need not be a power of two)
    1   u8   flags: 1 VIRTIO_F_INDIRECT_DESC, 2 VIRTIO_F_EVENT_IDX, 8 a second region,
             16 the second region adjoins the first in GPA, 32 a read-only disk,
             64 DISCARD and WRITE_ZEROES offered, 128 writethrough
    2   u16  size0, 4 u16 size1: region sizes, 1 + value % MAX_REGION bytes
    6   u16  unused
    8   u32  gpa0, 12 u32 gpa1
    16  u32  desc, 20 u32 driver area, 24 u32 device area: GPA offsets from region 0
             (bit 31: from region 1)
    28  u32  ring base (SET_VRING_BASE, QEMU's packed encoding)
    32  ...  region 0's bytes, then region 1's

The device then runs as the server's Python path does (serve_one: pop, parse,
execute against a bytearray disk, push; should_notify), at most 2 * num
chains.  Documented outcomes: `ChainError` answered and pushed; `QueueBroken`
stops the queue, which stays broken until configured anew.  Checked besides:
every view the queue hands out lies inside one region; the guard bytes around
each region never change; the disk is asked only for ranges inside it and
never to write when read-only; a push writes the used descriptor (id, len,
flags with the used wrap counter) where the used position was; a broken
queue lets nothing through and writes nothing.
"""

from __future__ import annotations

import struct

from fuzz.virtqueue import GUARD, SERIAL, Disk, World
from qbackend.models import virtio_blk as blk
from qbackend.models.virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTQ_DESC_F_AVAIL,
    VIRTQ_DESC_F_USED,
    ChainError,
    GuestMemory,
    GuestMemoryError,
    PackedVirtqueue,
    QueueBroken,
    VirtqueueError,
)

HEADER = struct.Struct("<BBHHHIIIIII")
MAX_REGION = 24 << 10
F_INDIRECT, F_EVENT_IDX, _, F_TWO, F_ADJOIN, F_RO, F_DZ, F_WT = (1 << i for i in range(8))


def test_one_input(data: bytes) -> None:
    if len(data) < HEADER.size:
        return
    (size_m1, flags, size0, size1, _, gpa0, gpa1, desc_off, driver_off, device_off, base) = HEADER.unpack_from(data)
    num = 1 + size_m1
    sizes = [1 + size0 % MAX_REGION, 1 + size1 % MAX_REGION]
    content = data[HEADER.size:]
    world, mem = World(), GuestMemory()
    mem.add_region(gpa0, sizes[0], gpa0, world.add(gpa0, sizes[0], gpa0, content[:sizes[0]]))
    if flags & F_TWO:
        if flags & F_ADJOIN:
            gpa1 = gpa0 + sizes[0]
        view = world.add(gpa1, sizes[1], gpa1, content[sizes[0]:sizes[0] + sizes[1]])
        try:
            mem.add_region(gpa1, sizes[1], gpa1, view)
        except GuestMemoryError:
            return  # overlapping: the memory table is refused up front

    def ring_addr(offset: int) -> int:
        i = 1 if offset >> 31 and len(world.gpas) > 1 else 0
        return world.gpas[i] + (offset & 0x7FFFFFFF)

    q = PackedVirtqueue(mem)
    try:
        q.set_num(num)
        q.set_features(bool(flags & F_INDIRECT) << VIRTIO_F_INDIRECT_DESC | bool(flags & F_EVENT_IDX) << VIRTIO_F_EVENT_IDX)
        q.set_base(base)
        q.set_addresses(ring_addr(desc_off), ring_addr(driver_off), ring_addr(device_off), userspace=False)
    except VirtqueueError as exc:
        raise AssertionError(f"a valid configuration refused: {exc}") from exc
    sectors = 8
    dz = 8 if flags & F_DZ else 0
    config = blk.BlkConfig(capacity=sectors, readonly=bool(flags & F_RO), max_discard_sectors=dz,
                           max_discard_seg=1 if dz else 0, max_write_zeroes_sectors=dz,
                           max_write_zeroes_seg=1 if dz else 0)
    disk = Disk(sectors, bool(flags & F_RO), 0)
    guards = [(bytes(b[:GUARD]), bytes(b[-GUARD:])) for b in world.bufs]
    try:
        q.resolve()
    except QueueBroken:
        _check_sticky(q, world)
        return
    for _ in range(2 * num):
        if not _step(q, world, disk, config, bool(flags & F_WT)):
            break
    assert [(bytes(b[:GUARD]), bytes(b[-GUARD:])) for b in world.bufs] == guards, "a guard byte changed"
    if q.broken is not None:
        _check_sticky(q, world)


def _step(q: PackedVirtqueue, world: World, disk: Disk, config: blk.BlkConfig, writethrough: bool) -> bool:
    slot, wrap = q.used_idx, q.used_wrap
    try:
        chain = q.pop()
    except ChainError as exc:
        if exc.tail is not None:
            world.locate(exc.tail)
            exc.tail[0] = blk.Status.IOERR
        _push(q, world, exc.head, 1 if exc.tail is not None else 0, slot, wrap)
        return True
    except QueueBroken:
        assert q.broken is not None
        return False
    if chain is None:
        return False
    for view in (*chain.readable, *chain.writable):
        world.locate(view)
    try:
        request = blk.parse_request(chain, config)
    except blk.MissingStatus as exc:
        q.mark_broken(str(exc))
        return False
    status, used = blk.execute(request, disk, writethrough=writethrough, serial=SERIAL)
    assert request.status_byte[0] == status
    assert 1 <= used <= chain.writable_len
    del request
    chain.release()
    _push(q, world, chain.head, used, slot, wrap)
    return True


def _push(q: PackedVirtqueue, world: World, head: int, written: int, slot: int, wrap: bool) -> None:
    q.push(head, written)
    assert q.ring_gpas is not None
    at = world.one(q.ring_gpas[0] + 16 * slot, 16)
    assert at is not None
    raw = world.get((at[0], at[1], 16))
    _, length, buffer_id, flags = struct.unpack("<QIHH", raw)
    assert (buffer_id, length) == (head, written)
    want = VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED if wrap else 0
    assert flags & (VIRTQ_DESC_F_AVAIL | VIRTQ_DESC_F_USED) == want
    q.should_notify()


def _check_sticky(q: PackedVirtqueue, world: World) -> None:
    assert q.broken is not None
    before = world.snapshot()
    for k, call in enumerate((q.pop, q.has_pending, lambda: q.push(0, 0), q.should_notify)):
        try:
            call()
        except QueueBroken:
            continue
        raise AssertionError(f"a broken queue ({q.broken}) let call {k} through")
    assert world.snapshot() == before, "a broken queue wrote guest memory"
    q.set_base(q.get_base())
    assert q.broken is None
