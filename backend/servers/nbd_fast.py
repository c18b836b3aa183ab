"""NBD READs served natively (nbd_fast.c), as a connection uses them.

Why: a 4 KiB READ cost the Python path about 30 us of parsing, QED lookup
and reply building (stop 12's profile), against a few for the pread and
the send themselves; with one connection that is what caps a client at
0.7-0.9x qemu-nbd.  The C function takes the requests at the front of
what a connection received and turns every plain READ of mapped bytes
(qbackend.block.read_map) into its reply, data included, in one buffer
the connection then sends; it stops at the first request that needs
Python and says how far it got.  Receiving and sending stay the
connection's (plain or TLS, the transmission loop or its own thread), and
so does everything else the protocol does.

`NativeReads.start()` returns None, and the connection stays in Python,
when native helpers are off or cannot be built, or when the export has no
read map.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Any

from qbackend.block.exports import Export
from qbackend.plumbing import native

SOURCE = Path(__file__).with_name("nbd_fast.c")
OUT_SIZE = (4 << 20) + 4096  # replies to one batch: up to a 4 MiB read and its header
MAX_LENGTH = 4 << 20  # larger READs go to Python
# Replies per batch, by default: pread then send of about 1 MiB at a time kept sequential
# reads level with qemu-nbd here, where 4 MiB batches (out of the CPU caches) did not.
BATCH = 1 << 20
MODES = {"simple": 0, "structured": 1, "extended": 2}


class NativeReads:
    """One connection's native READ server: `serve(data)` answers what it can at the front of `data`."""

    def __init__(self, helper: native.Native, export: Export, mode: int) -> None:
        assert export.read_map is not None
        self._ffi = helper.ffi
        self._map = export.read_map  # kept alive (its C memory too) while this connection may read
        self._handle = export.read_map.handle
        # Anonymous memory: pages are only resident once a batch has used them.
        self._memory = mmap.mmap(-1, OUT_SIZE)
        self.out = memoryview(self._memory)
        self._out_pointer = self._ffi.from_buffer(self.out)
        batch = self._ffi.new("struct qb_nbd_batch *")
        batch.out = self._ffi.cast("uint8_t *", self._out_pointer)
        batch.out_size = OUT_SIZE
        batch.mode = mode
        self._batch = batch
        self._serve = helper.lib.qb_nbd_serve_reads
        self.served = 0  # READs served natively so far
        self.bytes_read = 0

    @classmethod
    def start(cls, export: Export, mode: str) -> NativeReads | None:
        """For a connection to `export` whose replies are `mode` ("simple", "structured" or "extended")."""
        if getattr(export, "read_map", None) is None:
            return None
        helper = native.load(SOURCE)
        if helper is None:
            return None
        return cls(helper, export, MODES[mode])

    def serve(self, data: memoryview, max_length: int = MAX_LENGTH, limit: int = BATCH) -> tuple[int, int]:
        """Serve the READs at the front of `data` (none longer than `max_length`; replies of
        at most `limit` bytes in all, unless the first alone is longer), without the GIL:
        (bytes of `data` consumed, bytes of `out` to send).  (0, 0): the first request is
        Python's."""
        batch = self._batch
        source: Any = self._ffi.from_buffer(data)
        batch.input = self._ffi.cast("uint8_t *", source)
        batch.in_len = len(data)
        batch.max_length = min(max_length, MAX_LENGTH)
        batch.soft_limit = min(limit, OUT_SIZE)
        served: int = self._serve(self._handle, batch)
        self._ffi.release(source)
        if served:
            self.served += served
            self.bytes_read += batch.bytes_read
        consumed: int = batch.consumed
        produced: int = batch.produced
        return consumed, produced

    def close(self) -> None:
        """Give back the reply buffer (once no send uses it)."""
        self._ffi.release(self._out_pointer)
        self.out.release()
        self._memory.close()
