"""One split virtqueue's inflight region (vhost-user "Inflight I/O tracking"). Pure: no I/O.

The front end keeps a shared buffer (GET_INFLIGHT_FD / SET_INFLIGHT_FD) that
outlives the back end: for each descriptor head, whether the back end took
it from the available ring and has not yet returned it, and in which order
it was taken (a counter).  A back end that is killed and started again reads
it back, returns nothing twice, and carries out again exactly the requests
the guest is still waiting for.  The layout (qbackend.protocol.vhost_user's
INFLIGHT_HEADER and INFLIGHT_DESC, little endian):

    u64 features, u16 version (1), u16 desc_num, u16 last_batch_head, u16 used_idx,
    then desc_num entries of {u8 inflight, u8 pad[5], u16 next, u64 counter}

Stores, each one at a time and in this order, so that a back end that stops
after any of them leaves a region the next one can read:

- taking a chain: desc[head].counter = the next counter, then desc[head].inflight = 1,
  before the request is carried out;
- returning chains (a batch of one or more): last_batch_head = the first, each one's
  `next` naming the one after it; the used elements and used idx (the ring's own
  stores); then every desc[head].inflight = 0; then used_idx = the new used idx.

`recover()` reads a region back as the spec says: when its used_idx is not the
ring's, the back end stopped between the used idx store and the bookkeeping,
so the last batch (as many entries as the two indices differ, linked from
last_batch_head) is returned already; every entry still inflight is taken
again, oldest counter first, and the available position is used idx plus
their number.  The region comes from the front end, so it is hostile input:
anything that does not fit the ring (another desc_num, a head or link past
it, an inflight byte other than 0 and 1, more entries in flight than the
driver made available, a counter near the top of its range, a region too
small for the ring) raises `InflightRefused`, and the caller starts the
region afresh instead.  Nothing here trusts a value it has not checked.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from qbackend.errors import ModelError
from qbackend.protocol import vhost_user as vu

# A counter at or past this is refused: the counters of a region that is kept must not wrap.
COUNTER_LIMIT = 1 << 63
_U16_MASK = 0xFFFF
_U16 = struct.Struct("<H")  # one 2-byte store (see qbackend.models.virtqueue on ordering)
_U64 = struct.Struct("<Q")


class InflightRefused(ModelError):
    """A region that does not describe this ring: not used (the caller starts it afresh)."""


@dataclass(frozen=True)
class Recovery:
    """What a region read back says: chains to carry out again, oldest first, the
    available position to go on from, and the next counter."""

    resubmit: tuple[int, ...]
    last_avail_idx: int
    next_counter: int
    batch_cleared: int  # entries of the last batch found returned already


def region_size(num: int) -> int:
    """The bytes a region for a ring of `num` descriptors needs (header and entries)."""
    return vu.INFLIGHT_HEADER_SIZE + vu.INFLIGHT_DESC_SIZE * num


class InflightRegion:
    """A queue's region over a writable buffer (a slice of the front end's mapping)."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer = buffer

    @property
    def size(self) -> int:
        return self.buffer.nbytes

    def release(self) -> None:
        self.buffer.release()

    def _u16(self, offset: int) -> int:
        value: int = _U16.unpack_from(self.buffer, offset)[0]
        return value

    def _put16(self, offset: int, value: int) -> None:
        _U16.pack_into(self.buffer, offset, value & _U16_MASK)

    def _entry(self, head: int) -> int:
        return vu.INFLIGHT_HEADER_SIZE + vu.INFLIGHT_DESC_SIZE * head

    @property
    def version(self) -> int:
        return self._u16(vu.INFLIGHT_VERSION_OFFSET)

    @property
    def desc_num(self) -> int:
        return self._u16(vu.INFLIGHT_DESC_NUM_OFFSET)

    @property
    def used_idx(self) -> int:
        return self._u16(vu.INFLIGHT_USED_IDX_OFFSET)

    @property
    def last_batch_head(self) -> int:
        return self._u16(vu.INFLIGHT_LAST_BATCH_HEAD_OFFSET)

    def entry(self, head: int) -> tuple[int, int, int]:
        """(inflight, next, counter) of one descriptor head."""
        inflight, nxt, counter = vu.INFLIGHT_DESC.unpack_from(self.buffer, self._entry(head))
        return inflight, nxt, counter

    def initialize(self, num: int, used_idx: int) -> None:
        """A fresh region for a ring of `num` whose used idx is `used_idx`: nothing in flight.
        The version goes last, so a region left half-made reads as a fresh one (version 0)."""
        if region_size(num) > self.size:
            raise InflightRefused(f"the inflight region ({self.size} bytes) is too small for a ring of {num}")
        self._put16(vu.INFLIGHT_VERSION_OFFSET, 0)
        end = region_size(num)
        self.buffer[vu.INFLIGHT_HEADER_SIZE:end] = bytes(end - vu.INFLIGHT_HEADER_SIZE)
        vu.INFLIGHT_HEADER.pack_into(self.buffer, 0, 0, 0, num, 0, used_idx & _U16_MASK)
        self._put16(vu.INFLIGHT_VERSION_OFFSET, vu.INFLIGHT_VERSION)

    def recover(self, num: int, used_idx: int, avail_idx: int) -> Recovery | None:
        """Read the region back for a ring of `num` whose used and available idx the
        driver shows; None for a fresh region (version 0, which this initializes).
        InflightRefused if it does not fit the ring (nothing is changed then)."""
        if region_size(num) > self.size:
            raise InflightRefused(f"the inflight region ({self.size} bytes) is too small for a ring of {num}")
        version = self.version
        if version == 0:
            self.initialize(num, used_idx)
            return None
        if version != vu.INFLIGHT_VERSION:
            raise InflightRefused(f"inflight region version {version}, not {vu.INFLIGHT_VERSION}")
        desc_num = self.desc_num
        if desc_num != num:
            raise InflightRefused(f"the inflight region is for {desc_num} descriptors, the ring has {num}")
        last_batch_head = self.last_batch_head
        if last_batch_head >= num:
            raise InflightRefused(f"the inflight region's last batch head {last_batch_head} is past the ring ({num})")
        entries = [self.entry(head) for head in range(num)]
        bad = [head for head, (inflight, _, _) in enumerate(entries) if inflight > 1]
        if bad:
            raise InflightRefused(f"descriptor {bad[0]} has inflight byte {entries[bad[0]][0]} (0 or 1)")
        high = [head for head, (inflight, _, counter) in enumerate(entries) if inflight and counter >= COUNTER_LIMIT]
        if high:
            raise InflightRefused(f"descriptor {high[0]} has counter {entries[high[0]][2]:#x}, past {COUNTER_LIMIT:#x}")
        # The last batch: as many entries as the used idx moved past the region's.
        batch: list[int] = []
        moved = (used_idx - self.used_idx) & _U16_MASK
        if moved > num:
            raise InflightRefused(f"the ring's used idx {used_idx} is {moved} past the inflight region's "
                                  f"{self.used_idx}, more than the ring ({num})")
        head = last_batch_head
        for k in range(moved):
            batch.append(head)
            nxt = entries[head][1]
            if k + 1 < moved:
                if nxt >= num:
                    raise InflightRefused(f"the last batch links descriptor {head} to {nxt}, past the ring ({num})")
                head = nxt
        inflight = {h for h, (flag, _, _) in enumerate(entries) if flag} - set(batch)
        pending = (avail_idx - used_idx) & _U16_MASK
        if len(inflight) > min(num, pending):
            raise InflightRefused(f"{len(inflight)} descriptors in flight, but the driver has made only {pending} "
                                  f"available past used idx {used_idx}")
        # Checked: now finish what the stopped back end was doing.
        for h in batch:
            self.buffer[self._entry(h)] = 0
        if moved:
            self._put16(vu.INFLIGHT_USED_IDX_OFFSET, used_idx)
        order = tuple(sorted(inflight, key=lambda h: (entries[h][2], h)))
        top = max((entries[h][2] for h in inflight), default=0)
        return Recovery(order, (used_idx + len(order)) & _U16_MASK, top + 1, len(batch))

    # -- the stores of a running queue --

    def start(self, head: int, counter: int) -> None:
        """A chain taken from the available ring (before it is carried out)."""
        at = self._entry(head)
        _U64.pack_into(self.buffer, at + vu.INFLIGHT_DESC_COUNTER_OFFSET, counter)
        self.buffer[at] = 1

    def begin_batch(self, heads: Sequence[int]) -> None:
        """Before the used elements of `heads` are written: the batch, linked from its first."""
        for a, b in zip(heads, heads[1:]):
            self._put16(self._entry(a) + vu.INFLIGHT_DESC_NEXT_OFFSET, b)
        self._put16(vu.INFLIGHT_LAST_BATCH_HEAD_OFFSET, heads[0])

    def end_batch(self, heads: Sequence[int], used_idx: int) -> None:
        """After the used idx store that published `heads`."""
        for head in heads:
            self.buffer[self._entry(head)] = 0
        self._put16(vu.INFLIGHT_USED_IDX_OFFSET, used_idx)
