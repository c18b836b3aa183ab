"""Property tests: random operation sequences on an in-memory QED image against a
plain bytearray model, with and without a backing file, and under simulated power
loss (every write acknowledged by a completed flush must survive)."""

from __future__ import annotations

import random
from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qbackend.block.blockfile import Crashed, FaultyBlock, MemoryBlock
from qbackend.block.qed import MapKind, QedImage, RawBacking

KiB = 1024


@dataclass(frozen=True)
class Geometry:
    cluster_size: int
    table_size: int
    size: int
    backing: int | None  # backing file length, or None


geometries = st.builds(
    Geometry,
    cluster_size=st.sampled_from([4096, 8192]),
    table_size=st.sampled_from([1, 2]),
    size=st.integers(1, 12).map(lambda k: k * 512 * 1024),  # up to 6 MiB: several L2 tables at ts=1
    backing=st.one_of(st.none(), st.integers(0, 3 << 20)),
)


def _op(size_hint: int = 6 << 20) -> st.SearchStrategy[tuple[object, ...]]:
    span = st.tuples(st.floats(0, 1), st.integers(0, 3 * 8192 + 100))
    return st.one_of(
        st.tuples(st.just("write"), span, st.integers(0, 2**32)),
        st.tuples(st.just("write"), span, st.integers(0, 2**32)),
        st.tuples(st.just("write"), span, st.integers(0, 2**32)),
        st.tuples(st.just("zero"), span),
        st.tuples(st.just("discard"), span),
        st.tuples(st.just("flush"),),
        st.tuples(st.just("reopen"),),
        st.tuples(st.just("grow"), st.integers(1, 64)),
    )


def _range(img_size: int, span: tuple[float, int]) -> tuple[int, int]:
    frac, n = span
    off = min(int(frac * img_size), img_size)
    return off, min(n, img_size - off)


class Harness:
    """An image on a block file, a model of its contents, and the op vocabulary."""

    def __init__(self, g: Geometry, block: MemoryBlock | FaultyBlock, seed: int) -> None:
        self.g = g
        self.block = block
        rng = random.Random(seed)
        self.base = MemoryBlock(rng.randbytes(g.backing)) if g.backing is not None else None
        self.model = bytearray(g.size)
        if self.base is not None:
            n = min(g.size, g.backing or 0)
            self.model[:n] = self.base.data[:n]
        self.img = self.open()

    def open(self, read_only: bool = False) -> QedImage:
        return QedImage.open(self.block, read_only=read_only,
                             backing=RawBacking(self.base) if self.base is not None else None)

    def apply(self, op: tuple[object, ...], touched: bytearray | None = None) -> None:
        img, model = self.img, self.model
        kind = op[0]
        if kind in ("write", "zero", "discard"):
            off, n = _range(img.image_size, op[1])  # type: ignore[arg-type]
            if touched is not None:
                touched[off:off + n] = b"\x01" * n
            if kind == "write":
                data = random.Random(op[2]).randbytes(n)  # type: ignore[arg-type]
                img.write(off, data)
                model[off:off + n] = data
            elif kind == "zero":
                img.write_zeroes(off, n)
                model[off:off + n] = bytes(n)
            else:
                cs = self.g.cluster_size
                a, b = -(-off // cs) * cs, (off + n) // cs * cs
                data_here = [e for e in img.map(a, b - a) if e.kind is MapKind.DATA] if a < b else []
                img.discard(off, n)
                for e in data_here:  # whole allocated clusters read zeros afterwards; the rest is unchanged
                    model[e.start:e.start + e.length] = bytes(e.length)
            if n:
                assert img.read(off, n) == model[off:off + n]
        elif kind == "flush":
            img.flush()
        elif kind == "reopen":
            img.close()
            self.img = self.open()
            assert not self.img.dirty
        elif kind == "grow":
            new = img.image_size + op[1] * 512  # type: ignore[operator]
            img.grow(new)
            old = len(model)
            if touched is not None:
                touched.extend(b"\x01" * (new - old))
            model.extend(bytes(new - old))
            if self.base is not None:  # the new area shows the backing file, as in QEMU
                tail = self.base.data[old:new]
                model[old:old + len(tail)] = tail


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=geometries, ops=st.lists(_op(), max_size=40), seed=st.integers(0, 2**32))
def test_random_operations_match_a_bytearray_model(g: Geometry, ops: list[tuple[object, ...]], seed: int) -> None:
    block = MemoryBlock()
    QedImage.create(block, g.size, cluster_size=g.cluster_size, table_size=g.table_size,
                    backing_file="base" if g.backing is not None else None, backing_raw=g.backing is not None)
    h = Harness(g, block, seed)
    for op in ops:
        h.apply(op)
    assert h.img.read(0, h.img.image_size) == h.model
    report = h.img.check()
    assert report.corruptions == [] and report.leaked_clusters == 0, report
    h.img.close()
    ro = h.open(read_only=True)
    assert not ro.dirty
    assert ro.read(0, ro.image_size) == h.model
    assert ro.check().exit_code == 0


def _untouched_runs(touched: bytearray, n: int) -> list[tuple[int, int]]:
    runs = []
    pos = 0
    while pos < n:
        start = touched.find(0, pos, n)
        if start < 0:
            break
        stop = touched.find(1, start, n)
        stop = n if stop < 0 else stop
        runs.append((start, stop))
        pos = stop
    return runs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(g=geometries, ops=st.lists(_op(), min_size=1, max_size=30), seed=st.integers(0, 2**32),
       crash_at=st.integers(0, 120), keep=st.sampled_from([0.0, 0.5, 1.0]))
def test_power_loss_keeps_every_flushed_write(g: Geometry, ops: list[tuple[object, ...]], seed: int,
                                              crash_at: int, keep: float) -> None:
    mem = MemoryBlock()
    QedImage.create(mem, g.size, cluster_size=g.cluster_size, table_size=g.table_size,
                    backing_file="base" if g.backing is not None else None, backing_raw=g.backing is not None)
    faulty = FaultyBlock(mem, crash_after=crash_at)
    durable_model = bytearray()
    touched = bytearray()
    try:
        h = Harness(g, faulty, seed)
        durable_model = bytearray(h.model)
        touched = bytearray(len(h.model))
        for op in ops:
            h.apply(op, touched)
            if op[0] in ("flush", "grow"):  # both end in a completed flush
                durable_model = bytearray(h.model)
                touched = bytearray(len(h.model))
    except Crashed:
        pass
    if not durable_model:
        return  # crashed before the image was open
    after = MemoryBlock(faulty.after_power_loss(random.Random(seed), keep=keep))
    img = QedImage.open(after, backing=RawBacking(h.base) if h.base is not None else None)
    assert img.open_check is None or img.open_check.corruptions_remaining == 0, img.open_check
    assert not img.dirty
    got = img.read(0, img.image_size)
    n = min(len(got), len(durable_model))
    for start, stop in _untouched_runs(touched, n):
        assert got[start:stop] == durable_model[start:stop], f"flushed bytes changed in [{start:#x}, {stop:#x})"
    report = img.check()
    assert report.corruptions == [], report.corruptions
    # the repaired image is usable
    img.write(0, b"after")
    img.close()
    again = QedImage.open(after, read_only=True, backing=RawBacking(h.base) if h.base is not None else None)
    assert again.read(0, 5) == b"after"[: min(5, again.image_size)] or again.image_size < 5
