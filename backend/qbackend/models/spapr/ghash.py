"""The iteration order of a GLib string-keyed hash table (GHashTable as in
GLib 2.60 and later: open addressing with quadratic probing, bucket = ``hash
* 11 % prime``, in-place resizing).

QEMU lists DRCs in the order it finds them in the ``/dr-connector``
container, a GHashTable keyed by the index in lowercase hex and filled in
creation order.  Replaying the insertions here reproduces that order, so the
model's ``ibm,drc-*`` arrays can match QEMU's byte for byte, order included.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

PRIME_MOD = (1, 2, 3, 7, 13, 31, 61, 127, 251, 509, 1021, 2039, 4093, 8191, 16381, 32749, 65521,
             131071, 262139, 524287, 1048573, 2097143, 4194301, 8388593, 16777213, 33554393,
             67108859, 134217689, 268435399, 536870909, 1073741789, 2147483647)
MIN_SHIFT = 3
UNUSED, TOMBSTONE = 0, 1


def str_hash(key: str) -> int:
    """g_str_hash (djb2), mapped away from the two reserved hash values."""
    h = 5381
    for c in key.encode():
        h = (h * 33 + (c if c < 128 else c - 256)) & 0xFFFFFFFF
    return h if h >= 2 else 2


class StrHashTable:
    """Keys only (a set); insertion and removal as GHashTable does them."""

    def __init__(self) -> None:
        self._set_shift(MIN_SHIFT)
        self.hashes = [UNUSED] * self.size
        self.keys: list[str | None] = [None] * self.size
        self.nnodes = self.noccupied = 0

    def _set_shift(self, shift: int) -> None:
        self.size, self.mod, self.mask = 1 << shift, PRIME_MOD[shift], (1 << shift) - 1

    def _bucket(self, h: int) -> int:
        return ((h * 11) & 0xFFFFFFFF) % self.mod

    def _lookup(self, key: str) -> tuple[int, int, bool]:
        h = str_hash(key)
        i, step, tomb = self._bucket(h), 0, -1
        while self.hashes[i] != UNUSED:
            if self.hashes[i] == h and self.keys[i] == key:
                return i, h, True
            if self.hashes[i] == TOMBSTONE and tomb < 0:
                tomb = i
            step += 1
            i = (i + step) & self.mask
        return (tomb if tomb >= 0 else i), h, False

    def insert(self, key: str) -> None:
        i, h, found = self._lookup(key)
        if found:
            return
        old = self.hashes[i]
        self.hashes[i], self.keys[i] = h, key
        self.nnodes += 1
        if old == UNUSED:
            self.noccupied += 1
            self._maybe_resize()

    def remove(self, key: str) -> None:
        i, _, found = self._lookup(key)
        if found:
            self.hashes[i], self.keys[i] = TOMBSTONE, None
            self.nnodes -= 1
            self._maybe_resize()

    def _maybe_resize(self) -> None:
        if (self.size > self.nnodes * 4 and self.size > 1 << MIN_SHIFT) \
                or self.size <= self.noccupied + self.noccupied // 16:
            self._resize()

    def _resize(self) -> None:
        old = self.size
        n, shift = int(self.nnodes * 1.333), 0
        while n:
            n >>= 1
            shift += 1
        self._set_shift(max(shift, MIN_SHIFT))
        if self.size > old:
            self.hashes += [UNUSED] * (self.size - old)
            self.keys += [None] * (self.size - old)
        moved = [False] * max(self.size, old)
        for i in range(old):
            h = self.hashes[i]
            if h < 2:
                self.hashes[i] = UNUSED
                continue
            if moved[i]:
                continue
            self.hashes[i], key, self.keys[i] = UNUSED, self.keys[i], None
            while True:
                j, step = self._bucket(h), 0
                while moved[j]:
                    step += 1
                    j = (j + step) & self.mask
                moved[j] = True
                displaced = self.hashes[j]
                self.hashes[j] = h
                if displaced < 2:
                    self.keys[j] = key
                    break
                h = displaced
                key, self.keys[j] = self.keys[j], key
        del self.hashes[self.size:], self.keys[self.size:]
        self.noccupied = self.nnodes

    def __iter__(self) -> Iterator[str]:
        return (k for h, k in zip(self.hashes, self.keys) if h >= 2 and k is not None)


def iteration_order(keys: Iterable[str]) -> list[str]:
    table = StrHashTable()
    for k in keys:
        table.insert(k)
    return list(table)
