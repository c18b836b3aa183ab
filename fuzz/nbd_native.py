"""Native NBD READs (qbackend.servers.nbd_fast, C), differentially: hostile request bytes in.

The first byte picks the reply mode, the read map (a raw file mapped whole,
or clusters scattered over the file with holes) and the limits; the rest is
the request stream.  Whatever the C code consumed must be whole, valid,
mapped READs within the limits, and what it produced must be exactly the
replies the Python protocol builds, with the bytes the map points at.  Where
it stopped, the request must be one it may leave to Python.  Nothing is
documented to fail: any assertion or crash is a finding.
"""

from __future__ import annotations

import os
import random
import struct
import tempfile

from qbackend.block.read_map import ReadMap
from qbackend.protocol import nbd
from qbackend.servers import nbd_fast

SIZE = 256 << 10
CLUSTER = 4096
MODES = ("simple", "structured", "extended")
REPLY_HEADER_SIZE = {"simple": 16, "structured": 28, "extended": 40}

_dir = tempfile.mkdtemp(prefix="qbackend-fuzz-nbd-native-")
_path = os.path.join(_dir, "image")
_content = random.Random(7).randbytes(2 * SIZE)
with open(_path, "wb") as _f:
    _f.write(_content)
_fd = os.open(_path, os.O_RDONLY)
# Guest cluster i of the scattered map is at file cluster _where[i]; None: not mapped.
_rng = random.Random(11)
_where = [None if _rng.random() < 0.2 else _rng.randrange(2 * SIZE // CLUSTER) for _ in range(SIZE // CLUSTER)]
for _i in range(0, 16):  # some runs contiguous in the file
    _where[_i] = 40 + _i


class _Export:
    def __init__(self, read_map: ReadMap | None) -> None:
        self.read_map = read_map


_identity = ReadMap.create(_fd, SIZE, CLUSTER, identity=True)
_scattered = ReadMap.create(_fd, SIZE, CLUSTER)
if _scattered is not None:
    for _i, _w in enumerate(_where):
        if _w is not None:
            _scattered.set(_i, _w * CLUSTER)
_readers: dict[tuple[bool, str], nbd_fast.NativeRequests | None] = {
    (scattered, mode): nbd_fast.NativeRequests.start(_Export(_scattered if scattered else _identity), mode)  # type: ignore[arg-type]
    for scattered in (False, True) for mode in MODES}


def _expected(scattered: bool, offset: int, length: int) -> bytes | None:
    if not scattered:
        return _content[offset:offset + length]
    out = bytearray()
    pos = offset
    while pos < offset + length:
        where = _where[pos // CLUSTER]
        if where is None:
            return None
        n = min(offset + length, (pos // CLUSTER + 1) * CLUSTER) - pos
        start = where * CLUSTER + pos % CLUSTER
        out += _content[start:start + n]
        pos += n
    return bytes(out)


def _reply_header(mode: str, cookie: int, offset: int, length: int) -> bytes:
    if mode == "extended":
        return nbd.EXTENDED_HEADER.pack(nbd.EXTENDED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE, nbd.ChunkType.OFFSET_DATA,
                                        cookie, offset, 8 + length) + struct.pack(">Q", offset)
    if mode == "structured":
        return nbd.structured_read_header(cookie, offset, length)
    return nbd.simple_reply(cookie)


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, scattered = MODES[data[0] % 3], bool(data[0] & 4)
    reads = _readers[scattered, mode]
    if reads is None:  # no native helpers here
        return
    max_length = (1, 512, 4096, 65535, 1 << 20, nbd_fast.MAX_LENGTH)[data[1] % 6]
    limit = (nbd_fast.OUT_SIZE, 100, 4096 + 40, 65536)[(data[1] >> 3) % 4]
    stream = memoryview(data[2:])
    consumed, produced = reads.serve(stream, max_length, limit)
    first = REPLY_HEADER_SIZE[mode] + max_length  # the first reply may be longer than the limit
    assert 0 <= consumed <= len(stream) and 0 <= produced <= max(limit, min(first, nbd_fast.OUT_SIZE))
    header = nbd.EXTENDED_REQUEST if mode == "extended" else nbd.REQUEST
    magic = nbd.EXTENDED_REQUEST_MAGIC if mode == "extended" else nbd.REQUEST_MAGIC
    assert consumed % header.size == 0
    want = bytearray()
    for pos in range(0, consumed, header.size):
        got_magic, flags, command, cookie, offset, length = header.unpack_from(stream, pos)
        assert got_magic == magic and command == nbd.Cmd.READ, (hex(got_magic), command)
        assert flags in ((0, nbd.CmdFlags.DF) if mode != "simple" else (0,)), flags
        assert 0 < length <= max_length and offset + length <= SIZE, (offset, length)
        expected = _expected(scattered, offset, length)
        assert expected is not None, "served an unmapped cluster"
        want += _reply_header(mode, cookie, offset, length) + expected
    assert bytes(reads.out[:produced]) == bytes(want)
    if consumed < len(stream) and len(stream) - consumed >= header.size:
        # It stopped at a whole request: one it may leave (anything but a plain, mapped,
        # fitting READ within the limits).
        got_magic, flags, command, cookie, offset, length = header.unpack_from(stream, consumed)
        size = REPLY_HEADER_SIZE[mode] + length
        fits = size <= nbd_fast.OUT_SIZE - produced and (not produced or size <= limit - produced)
        plain = (got_magic == magic and command == nbd.Cmd.READ and flags in ((0, nbd.CmdFlags.DF) if mode != "simple"
                                                                            else (0,))
                 and 0 < length <= max_length and offset + length <= SIZE and fits)
        assert not plain or _expected(scattered, offset, length) is None, "left a request it should serve"
