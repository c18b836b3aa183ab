"""The inflight region of a split virtqueue read back after a restart (qbackend.models.inflight,
through SplitVirtqueue.track_inflight), against a hostile front end: the region is its memory.

Input layout (little-endian), a 6-byte header, then the region's bytes:

    0   u8   log2 of the queue size (mod 6: 1..32)
    1   u16  the guest's used idx, 3 u16 the guest's avail idx
    5   u8   bits 0-6: bytes cut off the region's end (a region too small when nonzero
             and it reaches the entries); bit 7: the region is made fresh first (version 0)
    6   ...  the region (zero-padded or cut to its size)

A small ring lives in a bytearray of guest memory: every descriptor a one-byte
device-writable buffer, every available entry a valid head.  Documented
outcomes: `InflightRefused` (nothing changes: the queue is untracked and its
indices are those it had), or a recovery after which

- every head to carry out again is below the ring size, none twice, and at most
  as many as the driver made available past the used idx;
- the available position is the used idx plus their number, the region's used
  idx is the ring's, and reading the region back once more gives the same heads
  (a back end killed again before doing anything loses nothing);
- pop() gives exactly those heads first, in that order, and returning them in
  reverse (one batch) leaves nothing in flight and the region's used idx at the
  ring's, which a third read back agrees with.
"""

from __future__ import annotations

import struct

from qbackend.models.inflight import InflightRefused, InflightRegion, region_size
from qbackend.models.virtqueue import VIRTQ_DESC_F_WRITE, GuestMemory, SplitVirtqueue

GPA = 0x1000
DESC, AVAIL, USED, BUFFERS = 0x0, 0x400, 0x800, 0xC00
MEMORY = 0x1000
_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")


def _ring(num: int, used_idx: int, avail_idx: int) -> tuple[GuestMemory, SplitVirtqueue, bytearray]:
    ram = bytearray(MEMORY)
    for i in range(num):
        _DESC.pack_into(ram, DESC + 16 * i, GPA + BUFFERS + i, 1, VIRTQ_DESC_F_WRITE, 0)
        _U16.pack_into(ram, AVAIL + 4 + 2 * i, (i * 7 + 3) % num)
    _U16.pack_into(ram, AVAIL + 2, avail_idx)
    _U16.pack_into(ram, USED + 2, used_idx)
    memory = GuestMemory()
    memory.add_region(GPA, MEMORY, GPA, ram)
    vq = SplitVirtqueue(memory)
    vq.set_num(num)
    vq.set_base(used_idx)  # QEMU after a failed GET_VRING_BASE: the used idx
    vq.set_addresses(GPA + DESC, GPA + AVAIL, GPA + USED, userspace=False)
    vq.resolve()
    return memory, vq, ram


def test_one_input(data: bytes) -> None:
    if len(data) < 6:
        return
    num = 1 << (data[0] % 6)
    used_idx, avail_idx = struct.unpack_from("<HH", data, 1)
    cut, fresh = data[5] & 0x7F, bool(data[5] & 0x80)
    size = max(0, region_size(num) - cut)
    buffer = bytearray(data[6:6 + size].ljust(size, b"\0"))
    if fresh and size >= 10:
        _U16.pack_into(buffer, 8, 0)  # version 0
    region = InflightRegion(memoryview(buffer))
    _memory, vq, ram = _ring(num, used_idx, avail_idx)
    before = bytes(buffer)
    try:
        recovery = vq.track_inflight(region)
    except InflightRefused:
        assert bytes(buffer) == before, "a refused region was changed"
        assert vq.inflight is None and not vq.resubmit and vq.last_avail_idx == used_idx
        if size >= region_size(num):
            vq.start_fresh_inflight(region)
            assert region.version == 1 and region.desc_num == num and region.used_idx == used_idx
        return
    assert vq.inflight is region
    if recovery is None:  # a fresh region: made one for this ring
        assert region.version == 1 and region.desc_num == num and region.used_idx == used_idx
        assert all(region.entry(h)[0] == 0 for h in range(num)) and vq.last_avail_idx == used_idx
        return
    heads = list(recovery.resubmit)
    assert all(0 <= h < num for h in heads) and len(set(heads)) == len(heads)
    assert len(heads) <= min(num, (avail_idx - used_idx) & 0xFFFF)
    assert vq.last_avail_idx == recovery.last_avail_idx == (used_idx + len(heads)) & 0xFFFF
    assert region.used_idx == used_idx
    assert {h for h in range(num) if region.entry(h)[0]} == set(heads)
    # Killed again at once: the same heads.
    again = InflightRegion(memoryview(bytearray(buffer))).recover(num, used_idx, avail_idx)
    assert again is not None and list(again.resubmit) == heads
    # Carried out again first, in order, then returned in one batch (in reverse).
    taken = []
    for _ in heads:
        chain = vq.pop()
        assert chain is not None
        taken.append(chain.head)
        chain.release()
    assert taken == heads
    vq.push_many((h, 1) for h in reversed(taken))
    assert vq.in_flight == 0
    new_used = (used_idx + len(heads)) & 0xFFFF
    assert _U16.unpack_from(ram, USED + 2)[0] == new_used == region.used_idx
    assert not any(region.entry(h)[0] for h in range(num))
    third = InflightRegion(memoryview(bytearray(buffer))).recover(num, new_used, avail_idx)
    assert third is not None and not third.resubmit
