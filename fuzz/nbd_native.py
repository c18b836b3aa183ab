"""Native NBD READs and WRITEs (qbackend.servers.nbd_fast, C), differentially: hostile request bytes in.

The first byte picks the reply mode, the map (a raw file mapped whole, or
clusters scattered over the file with holes, read-only or writable) and the
limits; the rest is the request stream.  Whatever the C code consumed must
be whole, valid, mapped READs (and WRITEs, to the writable map) within the
limits, what it produced must be exactly the replies the Python protocol
builds, with the bytes the map points at, and the writable file must hold
exactly what the writes put where the map says.  Where
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
# A writable copy of the file under the same scattered map: writes must land exactly where
# the map puts them (_written is what the file must hold).
_wpath = os.path.join(_dir, "writable")
_written = bytearray(_content)
with open(_wpath, "wb") as _f:
    _f.write(_content)
_wfd = os.open(_wpath, os.O_RDWR)
_writable = ReadMap.create(_wfd, SIZE, CLUSTER, writable=True)
if _writable is not None:
    for _i, _w in enumerate(_where):
        if _w is not None:
            _writable.set(_i, _w * CLUSTER)
_writer: dict[str, nbd_fast.NativeRequests | None] = {
    mode: nbd_fast.NativeRequests.start(_Export(_writable), mode) for mode in MODES}  # type: ignore[arg-type]
_readers: dict[tuple[bool, str], nbd_fast.NativeRequests | None] = {
    (scattered, mode): nbd_fast.NativeRequests.start(_Export(_scattered if scattered else _identity), mode)  # type: ignore[arg-type]
    for scattered in (False, True) for mode in MODES}


def _reply_header(mode: str, cookie: int, offset: int, length: int) -> bytes:
    if mode == "extended":
        return nbd.EXTENDED_HEADER.pack(nbd.EXTENDED_REPLY_MAGIC, nbd.REPLY_FLAG_DONE, nbd.ChunkType.OFFSET_DATA,
                                        cookie, offset, 8 + length) + struct.pack(">Q", offset)
    if mode == "structured":
        return nbd.structured_read_header(cookie, offset, length)
    return nbd.simple_reply(cookie)


def _mapped_file_ranges(offset: int, length: int) -> list[tuple[int, int, int]] | None:
    """(file offset, data offset, length) pieces of a guest range in the scattered map; None if unmapped."""
    out = []
    pos = offset
    while pos < offset + length:
        where = _where[pos // CLUSTER]
        if where is None:
            return None
        n = min(offset + length, (pos // CLUSTER + 1) * CLUSTER) - pos
        out.append((where * CLUSTER + pos % CLUSTER, pos - offset, n))
        pos += n
    return out


def test_one_input(data: bytes) -> None:
    if len(data) < 2:
        return
    mode, scattered, writable = MODES[data[0] % 3], bool(data[0] & 4), bool(data[0] & 8)
    requests = _writer[mode] if writable else _readers[scattered, mode]
    if requests is None:  # no native helpers here
        return
    scattered = scattered or writable
    max_length = (1, 512, 4096, 65535, 1 << 20, nbd_fast.MAX_LENGTH)[data[1] % 6]
    limit = (nbd_fast.OUT_SIZE, 100, 4096 + 40, 65536)[(data[1] >> 3) % 4]
    stream = memoryview(data[2:])
    content = _written if writable else _content
    consumed, produced = requests.serve(stream, max_length, limit)
    first = REPLY_HEADER_SIZE[mode] + max_length  # the first reply may be longer than the limit
    assert 0 <= consumed <= len(stream) and 0 <= produced <= max(limit, min(first, nbd_fast.OUT_SIZE))
    header = nbd.EXTENDED_REQUEST if mode == "extended" else nbd.REQUEST
    magic = nbd.EXTENDED_REQUEST_MAGIC if mode == "extended" else nbd.REQUEST_MAGIC
    want = bytearray()
    pos = 0
    while pos < consumed:
        got_magic, flags, command, cookie, offset, length = header.unpack_from(stream, pos)
        assert got_magic == magic and command in (nbd.Cmd.READ, nbd.Cmd.WRITE), (hex(got_magic), command)
        assert 0 < length <= max_length and offset + length <= SIZE, (offset, length)
        pieces = _mapped_file_ranges(offset, length) if scattered else [(offset, 0, length)]
        assert pieces is not None, "served an unmapped cluster"
        pos += header.size
        if command == nbd.Cmd.WRITE:
            assert writable and flags == 0, (writable, flags)
            payload = stream[pos:pos + length]
            pos += length
            for host, start, n in pieces:  # what the file must now hold
                content[host:host + n] = payload[start:start + n]
            want += _done_reply(mode, cookie, offset)
        else:
            assert flags in ((0, nbd.CmdFlags.DF) if mode != "simple" else (0,)), flags
            want += _reply_header(mode, cookie, offset, length)
            want += b"".join(bytes(content[host:host + n]) for host, _, n in pieces)
    assert pos == consumed, "consumed part of a request"
    assert bytes(requests.out[:produced]) == bytes(want)
    if writable:
        assert os.pread(_wfd, len(_written), 0) == _written, "a write went where it was not sent"
    if consumed < len(stream) and len(stream) - consumed >= header.size:
        # It stopped at a whole request header: one it may leave (anything but a plain, mapped,
        # fitting READ, or WRITE to a writable map with all of its payload, within the limits).
        got_magic, flags, command, cookie, offset, length = header.unpack_from(stream, consumed)
        is_read = command == nbd.Cmd.READ
        size = REPLY_HEADER_SIZE[mode] + length if is_read else len(_done_reply(mode, 0, 0))
        fits = size <= nbd_fast.OUT_SIZE - produced and (not produced or size <= limit - produced)
        flags_ok = flags in ((0, nbd.CmdFlags.DF) if mode != "simple" else (0,)) if is_read else flags == 0
        whole = is_read or len(stream) - consumed - header.size >= length
        plain = (got_magic == magic and (is_read or (command == nbd.Cmd.WRITE and writable)) and flags_ok
                 and 0 < length <= max_length and offset + length <= SIZE and fits and whole)
        assert not plain or (scattered and _mapped_file_ranges(offset, length) is None), \
            "left a request it should serve"


def _done_reply(mode: str, cookie: int, offset: int) -> bytes:
    if mode == "extended":
        return nbd.extended_chunk(cookie, nbd.ChunkType.NONE, offset, b"")
    return nbd.structured_done(cookie) if mode == "structured" else nbd.simple_reply(cookie)
