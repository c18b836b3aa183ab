"""QED format unit tests: block files, header validation, create, I/O semantics,
NEED_CHECK lifecycle, the allocation map.  All in memory or in tmp files."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from qed_tools import qemu_img

from qbackend.block.blockfile import Crashed, FaultyBlock, FileBlock, InjectedFault, MemoryBlock
from qbackend.block.qed import (
    HEADER,
    Feature,
    MapKind,
    QedError,
    QedFormatError,
    QedHeader,
    QedImage,
    QedRangeError,
    QedReadOnlyError,
    QedUnsupportedError,
    RawBacking,
)
from qbackend.block.qed_check import CheckReport

KiB = 1024
MiB = 1 << 20


def new_image(size: int = 4 * MiB, cs: int = 4096, ts: int = 2, **kw: object) -> tuple[MemoryBlock, QedImage]:
    m = MemoryBlock()
    QedImage.create(m, size, cluster_size=cs, table_size=ts, **kw)  # type: ignore[arg-type]
    return m, QedImage.open(m)


# -- block files ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "memory"])
def test_block_files_behave_alike(kind: str, tmp_path: Path) -> None:
    b = FileBlock.open(tmp_path / "f", create=True) if kind == "file" else MemoryBlock()
    try:
        assert b.size() == 0
        b.pwrite(10, b"hello")
        assert b.size() == 15
        assert b.pread(0, 15) == bytes(10) + b"hello"
        assert b.pread(12, 100) == b"llo"  # short at EOF
        assert b.pread(100, 4) == b""
        b.pwrite(0, b"\xff" * 8192)
        b.discard(0, 4096)
        assert b.pread(0, 8192) == bytes(4096) + b"\xff" * 4096
        b.truncate(3)
        assert b.size() == 3
        b.truncate(6)
        assert b.pread(0, 6) == bytes(6)
        b.flush()
    finally:
        b.close()


def test_faulty_block_fails_and_crashes() -> None:
    f = FaultyBlock(MemoryBlock(), fail_write_after=1)
    f.pwrite(0, b"a")
    with pytest.raises(InjectedFault):
        f.pwrite(1, b"b")
    f.pwrite(2, b"c")  # only once
    c = FaultyBlock(MemoryBlock(), crash_after=2)
    c.pwrite(0, b"x")
    c.flush()
    with pytest.raises(Crashed):
        c.pwrite(1, b"y")
    with pytest.raises(Crashed):
        c.pread(0, 1)


def test_faulty_block_power_loss_keeps_flushed_writes() -> None:
    f = FaultyBlock(MemoryBlock())
    f.pwrite(0, b"durable")
    f.flush()
    f.pwrite(0, b"XXXXXXX")
    f.pwrite(100, b"later")
    assert f.durable() == b"durable"
    states = {f.after_power_loss(random.Random(seed)) for seed in range(40)}
    assert f.durable() in states
    assert all(s[:7] in (b"durable", b"XXXXXXX") for s in states)
    assert len(states) == 4


# -- header ----------------------------------------------------------------------


def valid_header(**changes: int) -> QedHeader:
    h = QedHeader(cluster_size=65536, table_size=4, header_size=1, features=0, compat_features=0,
                  autoclear_features=0, l1_table_offset=65536, image_size=1 << 30)
    return replace(h, **changes)


def test_header_round_trip_and_layout() -> None:
    h = valid_header(features=1, backing_filename_offset=64, backing_filename_size=8)
    data = h.pack()
    assert len(data) == 64 and data[:4] == b"QED\0"
    assert QedHeader.unpack(data) == h
    assert QedHeader.unpack(data + b"trailing") == h


@pytest.mark.parametrize(("changes", "exc", "words"), [
    ({"features": 0x08}, QedUnsupportedError, ["features", "0x8"]),
    ({"cluster_size": 2048}, QedFormatError, ["cluster_size", "2048"]),
    ({"cluster_size": 1 << 27}, QedFormatError, ["cluster_size", str(1 << 27)]),
    ({"cluster_size": 65536 + 4096}, QedFormatError, ["cluster_size"]),
    ({"table_size": 3}, QedFormatError, ["table_size", "3"]),
    ({"table_size": 32}, QedFormatError, ["table_size", "32"]),
    ({"table_size": 0}, QedFormatError, ["table_size", "0"]),
    ({"header_size": 0}, QedFormatError, ["header_size", "0"]),
    ({"header_size": 1 << 20}, QedFormatError, ["header_size"]),
    ({"image_size": 1000}, QedFormatError, ["image_size", "1000"]),
    ({"image_size": 1 << 60}, QedFormatError, ["image_size", "maximum"]),
    ({"l1_table_offset": 65536 + 512}, QedFormatError, ["l1_table_offset", "0x10200"]),
    ({"l1_table_offset": 0}, QedFormatError, ["l1_table_offset", "header"]),
    ({"l1_table_offset": 65536 * 8}, QedFormatError, ["l1_table_offset", "fit"]),
    ({"features": 1, "backing_filename_offset": 65530, "backing_filename_size": 10}, QedFormatError,
     ["backing_filename_offset", "65530"]),
    ({"features": 1, "backing_filename_offset": 64, "backing_filename_size": 0}, QedFormatError,
     ["backing_filename_size", "0"]),
])
def test_header_validation_names_field_and_value(changes: dict[str, int], exc: type[Exception],
                                                 words: list[str]) -> None:
    with pytest.raises(exc) as info:
        valid_header(**changes).validate(5 * 65536)
    for w in words:
        assert w in str(info.value)


def test_header_accepts_edge_values() -> None:
    valid_header(image_size=0).validate(5 * 65536)  # QEMU opens size 0 too
    valid_header(cluster_size=4096, table_size=1, l1_table_offset=4096, image_size=512).validate(8192)
    valid_header(compat_features=0xFF, autoclear_features=0xF0).validate(5 * 65536)
    # no BACKING_FILE: the name fields are not checked
    valid_header(backing_filename_offset=1 << 31, backing_filename_size=5).validate(5 * 65536)


def test_bad_magic_and_short_file() -> None:
    with pytest.raises(QedFormatError, match="magic"):
        QedHeader.unpack(b"QFI\xfb" + bytes(60))
    with pytest.raises(QedFormatError, match="too short"):
        QedImage.open(MemoryBlock(b"QED\0" + bytes(10)))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=80), st.integers(0, 1 << 24))
def test_header_garbage_either_parses_or_raises_format_error(data: bytes, file_size: int) -> None:
    try:
        h = QedHeader.unpack(b"QED\0" + data)
        h.validate(file_size)
    except QedFormatError:
        pass


# -- create ------------------------------------------------------------------------


def test_create_matches_qemu_layout() -> None:
    m = MemoryBlock()
    h = QedImage.create(m, 1 << 30)
    assert len(m.data) == 5 * 65536  # header cluster + 4-cluster L1, as qemu-img makes
    assert h.l1_table_offset == 65536 and h.header_size == 1
    m2 = MemoryBlock()
    QedImage.create(m2, 1000, cluster_size=4096, table_size=2, backing_file="base.raw", backing_raw=True)
    h2 = QedHeader.unpack(bytes(m2.data[:HEADER.size]))
    assert h2.image_size == 1024  # rounded up to 512
    assert h2.features == Feature.BACKING_FILE | Feature.BACKING_FORMAT_NO_PROBE
    assert m2.data[64:72] == b"base.raw" and h2.backing_filename_offset == 64


@pytest.mark.parametrize("kw", [{"cluster_size": 2048}, {"cluster_size": 3 << 12}, {"table_size": 5},
                                {"table_size": 32}, {"image_size": 1 << 60}])
def test_create_refuses_bad_parameters(kw: dict[str, int]) -> None:
    args = {"image_size": MiB, "cluster_size": 4096, "table_size": 2, **kw}
    with pytest.raises(QedRangeError):
        QedImage.create(MemoryBlock(), args.pop("image_size"), **args)


def test_long_backing_name_gets_more_header_clusters() -> None:
    m = MemoryBlock()
    h = QedImage.create(m, MiB, cluster_size=4096, table_size=1, backing_file="x" * 1000)
    assert h.header_size == 1
    img = QedImage.open(m, open_backing=False)
    assert img.backing_name == "x" * 1000


# -- I/O -----------------------------------------------------------------------------


def test_read_write_round_trip_across_clusters_and_tables() -> None:
    m, img = new_image(size=64 * MiB, cs=4096, ts=1)  # 512 entries: an L2 table covers 2 MiB
    rng = random.Random(1)
    model = bytearray(64 * MiB)
    for _ in range(60):
        off = rng.randrange(0, 64 * MiB - 20000)
        data = rng.randbytes(rng.randrange(1, 20000))
        img.write(off, data)
        model[off:off + len(data)] = data
    off = 2 * MiB - 5000
    img.write(off, b"\x5a" * 10000)  # across two L2 tables
    model[off:off + 10000] = b"\x5a" * 10000
    assert img.read(0, 64 * MiB) == model
    assert not img.check().corruptions and img.check().leaked_clusters == 0
    img.close()
    img = QedImage.open(m, read_only=True)
    assert img.read(0, 64 * MiB) == model


def test_range_and_read_only_errors() -> None:
    m, img = new_image(size=MiB)
    with pytest.raises(QedRangeError):
        img.read(MiB - 10, 20)
    with pytest.raises(QedRangeError):
        img.write(-1, b"x")
    assert img.read(MiB, 0) == b""
    img.close()
    ro = QedImage.open(m, read_only=True)
    with pytest.raises(QedReadOnlyError) as info:
        ro.write(0, b"x")
    assert info.value.errno == 1
    ro.close()
    with pytest.raises(QedError):
        ro.read(0, 1)


def test_zero_clusters_and_write_zeroes() -> None:
    m, img = new_image(size=MiB)
    img.write(0, b"\xff" * 20000)
    img.write_zeroes(4096, 8192)  # two whole allocated clusters: zeroed in place, space freed
    img.write_zeroes(100, 50)  # partial: written
    img.write_zeroes(12288 + 10, 100)
    expect = bytearray(b"\xff" * 20000)
    expect[4096:12288] = bytes(8192)
    expect[100:150] = bytes(50)
    expect[12298:12398] = bytes(100)
    assert img.read(0, 20000) == expect
    size_before = len(m.data)
    img.write_zeroes(65536, 65536)  # unallocated, no backing: nothing to do
    assert len(m.data) == size_before
    kinds = [(e.start, e.kind) for e in img.map(0, 24576)]
    assert kinds == [(0, MapKind.DATA), (20480, MapKind.UNALLOCATED)]


def test_backing_file_reads_cow_and_zero_clusters_follow_the_spec() -> None:
    base = MemoryBlock(b"\xaa" * (3 * 4096 + 100))  # shorter than the image
    m = MemoryBlock()
    QedImage.create(m, MiB, cluster_size=4096, table_size=2, backing_file="base", backing_raw=True)
    img = QedImage.open(m, backing=RawBacking(base))
    assert img.read(0, 4096 * 4) == b"\xaa" * (3 * 4096 + 100) + bytes(4096 - 100)
    # partial write into an unallocated cluster: the rest comes from the backing file
    img.write(10, b"hi")
    assert img.read(0, 4096) == b"\xaa" * 10 + b"hi" + b"\xaa" * (4096 - 12)
    # zero clusters hide the backing file
    img.write_zeroes(4096, 8192)
    assert img.read(4096, 8192) == bytes(8192)
    assert [(e.kind, e.length) for e in img.map(0, 16384)] == [
        (MapKind.DATA, 4096), (MapKind.ZERO, 8192), (MapKind.BACKING, 512), (MapKind.UNALLOCATED, 3584)]
    # a partial write into a zero cluster: zeros around it (QEMU copies backing data here)
    img.write(4096 + 100, b"x")
    assert img.read(4096, 4096) == bytes(100) + b"x" + bytes(4095 - 100)
    # the tail cluster straddling the backing file's end
    img.write(3 * 4096, b"y")
    assert img.read(3 * 4096, 4096) == b"y" + b"\xaa" * 99 + bytes(4096 - 100)
    assert [(e.kind, e.length) for e in img.map(4 * 4096, 4096)] == [(MapKind.UNALLOCATED, 4096)]


def test_discard_frees_whole_allocated_clusters_only() -> None:
    m, img = new_image(size=MiB)
    img.write(0, b"\x11" * 16384)
    img.discard(1000, 12000)  # covers clusters 1 and 2 whole
    assert img.read(0, 16384) == b"\x11" * 4096 + bytes(8192) + b"\x11" * 4096
    img.discard(0, 10)
    assert img.read(0, 10) == b"\x11" * 10


def test_grow() -> None:
    m, img = new_image(size=MiB)
    img.write(MiB - 1, b"z")
    img.grow(2 * MiB)
    assert img.read(MiB - 1, 2) == b"z\0"
    img.write(2 * MiB - 1, b"q")
    with pytest.raises(QedUnsupportedError):
        img.grow(MiB)
    with pytest.raises(QedRangeError):
        img.grow(3 * MiB + 1)
    img.close()
    img = QedImage.open(m)
    assert img.image_size == 2 * MiB and img.read(2 * MiB - 1, 1) == b"q"


# -- NEED_CHECK and features ---------------------------------------------------------------


def test_need_check_set_durably_before_allocation_and_cleared_on_close() -> None:
    mem = MemoryBlock()
    QedImage.create(mem, MiB, cluster_size=4096, table_size=2)
    f = FaultyBlock(mem)
    img = QedImage.open(f)
    img.read(0, 10)
    assert not img.dirty
    img.write(0, b"a")
    hdr = QedHeader.unpack(f.durable()[:64])
    assert hdr.features & Feature.NEED_CHECK
    img.close()
    assert not QedHeader.unpack(f.durable()[:64]).features & Feature.NEED_CHECK


def test_new_l2_table_flushed_before_its_l1_entry() -> None:
    mem = MemoryBlock()
    h = QedImage.create(mem, MiB, cluster_size=4096, table_size=2)
    f = FaultyBlock(mem)
    img = QedImage.open(f)
    log: list[tuple[str, int]] = []
    orig_write, orig_flush = f.pwrite, f.flush
    f.pwrite = lambda off, data: (log.append(("w", off)), orig_write(off, data))[1]  # type: ignore[method-assign]
    f.flush = lambda: (log.append(("f", 0)), orig_flush())[1]  # type: ignore[method-assign]
    img.write(0, b"a")
    l1_write = log.index(("w", h.l1_table_offset))
    table_write = max(i for i, (k, off) in enumerate(log) if k == "w" and off >= 3 * 4096)
    assert table_write < l1_write and ("f", 0) in log[table_write:l1_write]


def test_data_flushed_before_l2_when_backing_data_was_copied() -> None:
    base = MemoryBlock(b"\xaa" * 65536)
    mem = MemoryBlock()
    QedImage.create(mem, MiB, cluster_size=4096, table_size=2, backing_file="b", backing_raw=True)
    f = FaultyBlock(mem)
    img = QedImage.open(f, backing=RawBacking(base))
    img.write(0, b"first")  # allocates the L2 table too
    f.flush()
    img.write(8192 + 10, b"x")  # existing L2 table; COW from the backing file
    # power loss now: whatever survives, the backing bytes of cluster 2 must read back
    for seed in range(20):
        state = MemoryBlock(f.after_power_loss(random.Random(seed)))
        back = QedImage.open(state, backing=RawBacking(base))
        got = back.read(8192, 4096)
        assert got in (b"\xaa" * 4096, b"\xaa" * 10 + b"x" + b"\xaa" * 4085)


def test_read_write_open_repairs_need_check_read_only_does_not() -> None:
    m, img = new_image(size=MiB)
    img.write(0, b"data")
    h = img.header
    l2 = int.from_bytes(m.data[h.l1_table_offset:h.l1_table_offset + 8], "little")
    m.data[l2 + 8:l2 + 16] = (10 * MiB).to_bytes(8, "little")  # cluster 1 -> past EOF
    # leave NEED_CHECK set, as after a crash
    dirty = bytes(m.data)
    ro = QedImage.open(MemoryBlock(dirty), read_only=True)
    assert ro.dirty and ro.open_check is None
    with pytest.raises(QedError, match="past the end"):
        ro.read(4096, 10)
    rw = QedImage.open(MemoryBlock(dirty))
    assert rw.open_check is not None and rw.open_check.corruptions_fixed == 1
    assert not rw.dirty
    assert rw.read(0, 8192) == b"data" + bytes(8188)


def test_unknown_compat_ignored_autoclear_cleared_on_rw_only() -> None:
    m, img = new_image(size=MiB)
    img.close()
    h = QedHeader.unpack(bytes(m.data[:64]))
    m.data[:64] = replace(h, compat_features=0x10, autoclear_features=0x30).pack()
    ro = QedImage.open(MemoryBlock(bytes(m.data)), read_only=True)
    assert ro.header.autoclear_features == 0x30
    rw = QedImage.open(m)
    assert rw.header.autoclear_features == 0 and rw.header.compat_features == 0x10
    assert QedHeader.unpack(bytes(m.data[:64])).autoclear_features == 0
    rw.write(0, b"x")
    rw.close()
    assert QedHeader.unpack(bytes(m.data[:64])).compat_features == 0x10


def test_map_merges_and_reports_backing() -> None:
    base = MemoryBlock(b"\x01" * 8192)
    m = MemoryBlock()
    QedImage.create(m, 64 * 4096, cluster_size=4096, table_size=2, backing_file="b", backing_raw=True)
    img = QedImage.open(m, backing=RawBacking(base))
    img.write(4 * 4096, b"\x02" * 2 * 4096)
    img.write_zeroes(4096, 4096)
    img.write_zeroes(8 * 4096, 4096)  # past the backing file: already reads zeros, left alone
    ext = img.map()
    assert [(e.start // 4096, e.length // 4096, e.kind) for e in ext] == [
        (0, 1, MapKind.BACKING), (1, 1, MapKind.ZERO), (2, 2, MapKind.UNALLOCATED), (4, 2, MapKind.DATA),
        (6, 58, MapKind.UNALLOCATED)]
    assert ext[3].host_offset is not None
    assert sum(e.length for e in ext) == 64 * 4096


def test_backing_missing_refuses_reads_of_unallocated_data() -> None:
    m = MemoryBlock()
    QedImage.create(m, MiB, cluster_size=4096, table_size=2, backing_file="nowhere", backing_raw=True)
    with pytest.raises(QedError, match="relative"):
        QedImage.open(MemoryBlock(bytes(m.data)))
    img = QedImage.open(m, open_backing=False)
    with pytest.raises(QedError, match="not open"):
        img.read(0, 10)
    assert img.map()[0].kind is MapKind.BACKING


def test_qed_over_qed_chain_in_files(tmp_path: Path) -> None:
    (tmp_path / "base.raw").write_bytes(b"\x07" * 10000)
    mid = FileBlock.open(tmp_path / "mid.qed", create=True)
    QedImage.create(mid, MiB, cluster_size=4096, table_size=2, backing_file="base.raw", backing_raw=True)
    mid.close()
    with QedImage.open_path(tmp_path / "mid.qed") as img:
        img.write(5000, b"mid")
    top = FileBlock.open(tmp_path / "top.qed", create=True)
    QedImage.create(top, MiB, cluster_size=65536, table_size=4, backing_file=str(tmp_path / "mid.qed"))
    top.close()
    with QedImage.open_path(tmp_path / "top.qed") as img:
        assert img.backing_format == "qed"
        want = bytearray(b"\x07" * 10000 + bytes(MiB - 10000))
        want[5000:5003] = b"mid"
        assert img.read(0, MiB) == want
        img.write(9999, b"TT")
        want[9999:10001] = b"TT"
        assert img.read(0, MiB) == want


def test_failed_write_leaves_a_consistent_image() -> None:
    mem = MemoryBlock()
    QedImage.create(mem, MiB, cluster_size=4096, table_size=2)
    img = QedImage.open(mem)
    img.write(0, b"ok")
    for n in range(1, 4):
        f = FaultyBlock(MemoryBlock(bytes(mem.data)), fail_write_after=n)
        j = QedImage.open(f)
        with pytest.raises(InjectedFault):
            for k in range(10):
                j.write(4096 * (10 + 20 * k), b"x" * 5000)
        rep = QedImage.open(MemoryBlock(bytes(f.inner.pread(0, f.size())))).check()  # type: ignore[attr-defined]
        assert rep.corruptions_remaining == 0


# -- check: the whole-span scan agrees with the entry-by-entry one -------------------------

entry_runs = st.lists(st.one_of(
    st.tuples(st.just("run"), st.integers(0, 80), st.integers(1, 300)),  # (first cluster, length)
    st.tuples(st.just("zero"), st.integers(1, 100), st.just(0)),
    st.tuples(st.just("one"), st.integers(1, 5), st.just(0)),
    st.tuples(st.just("raw"), st.integers(0, 1 << 22), st.integers(1, 3)),  # arbitrary values
    st.tuples(st.just("shuffled"), st.integers(0, 80), st.integers(1, 300)),  # a run, shuffled
    st.tuples(st.just("picks"), st.integers(0, 300), st.integers(1, 100)),  # (seed, count): with repeats
), max_size=12)


@settings(max_examples=200, deadline=None)
@given(tables=st.lists(entry_runs, min_size=1, max_size=3), extra_clusters=st.integers(0, 400))
def test_check_fast_scan_matches_entry_by_entry(tables: list[list[tuple[str, int, int]]],
                                                extra_clusters: int) -> None:

    cs = 4096
    m = MemoryBlock()
    h = QedImage.create(m, 3 * 512 * cs, cluster_size=cs, table_size=1)  # 512 entries per table
    first_table = h.l1_table_offset + cs
    m.truncate(first_table + len(tables) * cs + extra_clusters * cs)
    for t, runs in enumerate(tables):
        entries: list[int] = []
        for kind, a, b in runs:
            if kind == "run":
                entries += [(a + 2) * cs + i * cs for i in range(b)]
            elif kind == "zero":
                entries += [0] * a
            elif kind == "one":
                entries += [1] * a
            elif kind == "raw":
                entries += [a * 512 + i for i in range(b)]
            elif kind == "shuffled":
                run = [(a + 2) * cs + i * cs for i in range(b)]
                random.Random(a * 1000 + b).shuffle(run)
                entries += run
            else:
                rng = random.Random(a)
                entries += [rng.randrange(0, 120) * cs for _ in range(b)]
        entries = (entries + [0] * 512)[:512]
        m.pwrite(first_table + t * cs, b"".join(e.to_bytes(8, "little") for e in entries))
        m.pwrite(h.l1_table_offset + 8 * t, (first_table + t * cs).to_bytes(8, "little"))
    reference, *others = check_all_ways(m)
    assert all(other == reference for other in others)


def check_all_ways(m: MemoryBlock, repair: bool = False) -> list[tuple[CheckReport, bytes]]:
    """Check (and repair) copies of an image entry by entry, then with each setting of the span scan."""
    import qbackend.block.qed_check as qed

    out = []
    for small_span, window in ((1 << 30, qed._WINDOW),  # every entry through _check_entry
                               (qed._SMALL_SPAN, qed._WINDOW),  # as shipped
                               (0, qed._WINDOW),  # span scans narrowed down to single entries
                               (qed._SMALL_SPAN, 0), (0, 0)):  # the set-based test for clusters used twice
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(qed, "_SMALL_SPAN", small_span)
            mp.setattr(qed, "_WINDOW", window)
            copy = MemoryBlock(bytes(m.data))
            rep = QedImage.open(copy, read_only=not repair).check(repair=repair)
            out.append((rep, bytes(copy.data)))
    return out


@pytest.mark.parametrize("seed", range(24))
def test_check_fast_scan_matches_entry_by_entry_on_full_images(seed: int) -> None:
    """Fully or partly allocated images, data in order, shuffled, or in shuffled runs, with a few
    bad entries of every kind: the same report and the same repairs as entry by entry."""
    rng = random.Random(seed)
    cs, ts, ntables = 4096, 4, 3
    ne = ts * cs // 8
    m = MemoryBlock()
    h = QedImage.create(m, ntables * ne * cs, cluster_size=cs, table_size=ts)
    first_table = h.l1_table_offset + h.table_bytes
    data_start = first_table + ntables * h.table_bytes
    nguest = ntables * ne - rng.choice([0, 1, 100, ne])
    hosts = [data_start + i * cs for i in range(nguest)]
    layout = seed % 3
    if layout == 1:
        rng.shuffle(hosts)
    elif layout == 2:
        cuts = sorted(rng.sample(range(1, nguest), 40))
        runs = [hosts[a:b] for a, b in zip([0, *cuts], [*cuts, nguest], strict=True)]
        rng.shuffle(runs)
        hosts = [e for run in runs for e in run]
    entries = hosts + [0] * (ntables * ne - nguest)
    for _ in range(rng.choice([0, 5, 200])):  # holes, zero clusters
        entries[rng.randrange(len(entries))] = rng.choice([0, 1])
    file_end = data_start + nguest * cs + rng.choice([0, 0, 3 * cs])  # maybe leaked clusters at the end
    bad = [cs * 3 + 8, 512, h.l1_table_offset, h.l1_table_offset + cs, first_table + cs, file_end,
           file_end + 7 * cs, (1 << 64) - cs, data_start + rng.randrange(nguest) * cs]
    for _ in range(rng.choice([0, 1, 3, 12])):
        entries[rng.randrange(len(entries))] = rng.choice([*bad, rng.choice(hosts)])
    if seed % 4 == 3:  # a stretch of duplicates of the previous table
        j = rng.randrange(ne, 2 * ne - 50)
        entries[j:j + 50] = entries[j - ne:j - ne + 50]
    for t in range(ntables):
        m.pwrite(first_table + t * h.table_bytes,
                 b"".join(e.to_bytes(8, "little") for e in entries[t * ne:(t + 1) * ne]))
        m.pwrite(h.l1_table_offset + 8 * t, (first_table + t * h.table_bytes).to_bytes(8, "little"))
    m.truncate(file_end + rng.choice([0, 0, 100]))
    for repair in (False, True):
        (reference, after), *others = check_all_ways(m, repair)
        assert all(other == (reference, after) for other in others)
        assert reference.allocated_clusters > 0


def test_check_fast_scan_eight_zero_bytes_across_two_entries() -> None:
    """An entry below 16 MiB followed by one at 16 MiB: eight zero bytes in a row, yet no entry is 0."""
    cs = 4096
    m = MemoryBlock()
    h = QedImage.create(m, 2 * 512 * cs, cluster_size=cs, table_size=1)
    first_table = h.l1_table_offset + cs
    entries = [first_table + cs + i * cs for i in range(512)]
    random.Random(1).shuffle(entries)
    entries[201] = 16 * MiB
    m.truncate(16 * MiB + cs)
    raw = b"".join(e.to_bytes(8, "little") for e in entries)
    assert raw.find(bytes(8)) == 201 * 8 - 5
    m.pwrite(first_table, raw)
    m.pwrite(h.l1_table_offset, first_table.to_bytes(8, "little"))
    (reference, _), *others = check_all_ways(m)
    assert all(other[0] == reference for other in others)
    assert reference.allocated_clusters == 512 and not reference.corruptions


@settings(max_examples=300, deadline=None)
@given(ts=st.sampled_from([1, 2]), clusters=st.integers(0, 12), seed=st.integers(0, 2**32),
       size_k=st.integers(0, 64), entry_bias=st.sampled_from([0, 1, 2]))
def test_garbage_metadata_only_ever_raises_qed_errors(ts: int, clusters: int, seed: int, size_k: int,
                                                      entry_bias: int) -> None:
    """Random L1/L2 contents behind a valid header: open, read, map, check and repair
    either work or raise a QedError; nothing else escapes."""
    cs = 4096
    rng = random.Random(seed)
    m = MemoryBlock()
    h = QedImage.create(m, size_k * 64 * 1024, cluster_size=cs, table_size=ts)

    def entry() -> int:
        r = rng.random()
        if r < 0.3:
            return 0
        if r < 0.4:
            return 1
        if entry_bias == 0 or r < 0.5:
            return rng.getrandbits(64) if rng.random() < 0.3 else rng.randrange(0, (clusters + 8) * cs)
        return rng.randrange(0, clusters + 4 + ts) * cs  # aligned, around the file

    body = bytearray()
    for _ in range(clusters * cs // 8):
        body += entry().to_bytes(8, "little")
    m.pwrite(h.l1_table_offset + h.table_bytes, bytes(body))
    l1 = b"".join(entry().to_bytes(8, "little") for _ in range(8))
    m.pwrite(h.l1_table_offset, l1)
    for read_only in (True, False):
        try:
            img = QedImage.open(MemoryBlock(bytes(m.data)), read_only=read_only)
        except QedError:
            continue
        actions: list[tuple[Callable[..., object], tuple[object, ...]]] = [
            (img.read, (0, img.image_size)), (img.map, ()), (img.check, ()), (img.write, (0, b"x" * 5000)),
            (img.write_zeroes, (0, img.image_size)), (img.check, (True,))]
        for action, args in actions:
            try:
                action(*args)
            except QedError:
                pass
        if not read_only:
            after = img.check()
            assert all(not p.fixable for p in after.corruptions), after.corruptions
        img.close()


def test_readinto_equals_read_across_allocated_unallocated_and_split_buffers(tmp_path: Path) -> None:
    """QedImage.readinto (vhost-user reads straight into guest buffers) gives the
    bytes read() gives: a run in one stretch of the file goes by preadv, anything
    else (unallocated clusters, several stretches) through read()."""
    image = tmp_path / "ri.qed"
    qemu_img("create", "-f", "qed", "-o", "cluster_size=4096", str(image), str(1 << 20))
    with QedImage.open_path(image) as img:
        img.write(8192, os.urandom(3 * 4096))
        img.write(40960, os.urandom(4096))
        for offset, sizes in ((8192, [4096]), (8192, [100, 5000, 7188]), (4096, [16384]), (12288, [512] * 72)):
            buffers = [memoryview(bytearray(n)) for n in sizes]
            img.readinto(offset, buffers)
            assert b"".join(bytes(b) for b in buffers) == img.read(offset, sum(sizes)), (offset, sizes)
