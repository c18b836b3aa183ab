"""QED check and repair: every invariant of the spec, leaks counted, what can
be fixed fixed (`QedImage.check` is the entry point).

The scan is span-wise: runs of L2 entries are checked as whole integers of
64-bit lanes, and only a span with a problem is narrowed down entry by entry
(a 16 GiB fully fragmented image checks in about 0.05 s).
"""

from __future__ import annotations

from array import array
from collections import deque
from itertools import compress, repeat
from operator import itemgetter

from qbackend.block.qed import _NEED_CHECK, L2_ZERO, _table_from_bytes, _table_to_bytes

# `qbackend qed check` imports this module: no dataclasses, re or typing at import (they cost
# more than checking a small image); the records below are plain classes, and `ProblemKind`
# (qbackend.block.qed_kinds) is imported where a problem is found.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import mmap
    import re
    from collections.abc import Iterable, Iterator

    from qbackend.block.qed import ProgressFn, QedImage
    from qbackend.block.qed_kinds import ProblemKind as ProblemKind


def __getattr__(name: str) -> object:
    """`ProblemKind`, from qbackend.block.qed_kinds."""
    if name != "ProblemKind":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from qbackend.block.qed_kinds import ProblemKind

    return ProblemKind


class _Record:
    """What a dataclass would give: equality and a repr over FIELDS."""

    FIELDS: tuple[str, ...] = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self.FIELDS)

    __hash__ = None  # type: ignore[assignment]  # mutable, as a dataclass with eq

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in self.FIELDS)})"

class Problem(_Record):
    FIELDS = ("kind", "message", "table_offset", "index", "value", "fixable", "fixed")

    def __init__(self, kind: ProblemKind, message: str, table_offset: int | None = None, index: int | None = None,
                 value: int | None = None, fixable: bool = True, fixed: bool = False) -> None:
        self.kind = kind
        self.message = message
        self.table_offset = table_offset  # the table holding the bad entry (the L1 table for L1 entries)
        self.index = index
        self.value = value
        self.fixable = fixable
        self.fixed = fixed

    def __str__(self) -> str:
        state = " (repaired)" if self.fixed else "" if self.fixable else " (cannot be repaired)"
        return f"{self.message}{state}"


class CheckReport(_Record):
    FIELDS = ("cluster_size", "total_clusters", "allocated_clusters", "fragmented_clusters", "corruptions",
              "leaked_clusters", "leak_ranges", "leaks_fixed", "image_end_offset", "changes", "need_check_was_set",
              "need_check_cleared")

    def __init__(self, cluster_size: int, total_clusters: int, allocated_clusters: int = 0,
                 fragmented_clusters: int = 0, corruptions: list[Problem] | None = None, leaked_clusters: int = 0,
                 leak_ranges: list[tuple[int, int]] | None = None, leaks_fixed: int = 0, image_end_offset: int = 0,
                 changes: list[str] | None = None, need_check_was_set: bool = False,
                 need_check_cleared: bool = False) -> None:
        self.cluster_size = cluster_size
        self.total_clusters = total_clusters  # guest clusters
        self.allocated_clusters = allocated_clusters
        self.fragmented_clusters = fragmented_clusters
        self.corruptions: list[Problem] = [] if corruptions is None else corruptions
        self.leaked_clusters = leaked_clusters
        # (file offset, bytes) of the leaked runs, the first 100
        self.leak_ranges: list[tuple[int, int]] = [] if leak_ranges is None else leak_ranges
        self.leaks_fixed = leaks_fixed
        self.image_end_offset = image_end_offset
        self.changes: list[str] = [] if changes is None else changes
        self.need_check_was_set = need_check_was_set
        self.need_check_cleared = need_check_cleared

    @property
    def corruptions_fixed(self) -> int:
        if not self.corruptions:
            return 0
        from qbackend.block.qed_kinds import ProblemKind

        return sum(1 for p in self.corruptions if p.fixed and p.kind is not ProblemKind.PARTIAL_CLUSTER)

    @property
    def corruptions_remaining(self) -> int:
        if not self.corruptions:
            return 0
        from qbackend.block.qed_kinds import ProblemKind

        return sum(1 for p in self.corruptions if not p.fixed and p.kind is not ProblemKind.PARTIAL_CLUSTER)

    @property
    def leaks_remaining(self) -> int:
        return self.leaked_clusters - self.leaks_fixed

    @property
    def exit_code(self) -> int:
        """qemu-img check's: 0 clean, 2 corruptions remain, 3 only leaks remain."""
        if self.corruptions_remaining:
            return 2
        if self.leaks_remaining:
            return 3
        return 0

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "total-clusters": self.total_clusters,
            "check-errors": 0,
            "allocated-clusters": self.allocated_clusters,
            "fragmented-clusters": self.fragmented_clusters,
            "image-end-offset": self.image_end_offset,
        }
        if self.corruptions_remaining:
            out["corruptions"] = self.corruptions_remaining
        if self.leaks_remaining:
            out["leaks"] = self.leaks_remaining
        if self.corruptions_fixed:
            out["corruptions-fixed"] = self.corruptions_fixed
        if self.leaks_fixed:
            out["leaks-fixed"] = self.leaks_fixed
        out["problems"] = [{"kind": p.kind.value, "message": p.message, "table-offset": p.table_offset,
                            "index": p.index, "value": p.value, "fixed": p.fixed} for p in self.corruptions]
        out["leak-ranges"] = [{"offset": o, "length": n} for o, n in self.leak_ranges]
        out["changes"] = list(self.changes)
        return out



class QedCheck:
    """One check (and repair) run over an open image, under its lock."""

    def __init__(self, img: QedImage) -> None:
        self.img = img

    def run(self, *, repair: bool, leaks_only: bool, progress: ProgressFn | None) -> CheckReport:
        return self._check(repair=repair, leaks_only=leaks_only, progress=progress)

    def _check(self, *, repair: bool, leaks_only: bool, progress: ProgressFn | None) -> CheckReport:
        img = self.img
        h = img.header
        cs, tb, ne = img._cs, img._tb, img._ne
        raw_size = img.f.size()
        file_size = raw_size - raw_size % cs
        nclusters = file_size // cs
        rep = CheckReport(cluster_size=cs, total_clusters=-(-h.image_size // cs),
                          need_check_was_set=img.dirty)
        # One byte per cluster of the file.  A large file's map is anonymous memory that is
        # resident only where written: where something is referenced (a sparse file of 1 TiB
        # with 4 KiB clusters costs what its referenced clusters' pages are, not 256 MiB); a
        # small one's a bytearray, which spares a small check the import of mmap.
        used = _cluster_map(max(nclusters, 1))
        _size_pin = memoryview(used)  # held while checking: no slice assignment may resize the map
        hc = min(h.header_size, nclusters)
        used[0:hc] = b"\x01" * hc
        l1c = h.l1_table_offset // cs
        used[l1c:l1c + h.table_size] = b"\x01" * h.table_size
        meta = range(l1c, l1c + h.table_size)  # the L1 table's clusters (the header's: below header_size)
        if raw_size != file_size:
            from qbackend.block.qed_kinds import ProblemKind

            rep.corruptions.append(Problem(ProblemKind.PARTIAL_CLUSTER,
                                           f"{raw_size - file_size} bytes after the last whole cluster "
                                           f"(file size {raw_size:#x})"))
        l1_fixes: list[tuple[int, Problem]] = []
        tables: list[tuple[int, int]] = []
        for first, l1 in _l1_chunks(img):  # the L1 table a piece at a time (it may be 1 GiB)
            for i, e in compress(enumerate(l1, first), l1):  # the nonzero entries
                where = f"L1 entry {i} (guest offset {i * ne * cs:#x}): L2 table"
                why = None
                into_metadata = False
                if e % cs:
                    why = f"offset {e:#x} is not a multiple of the cluster size"
                elif e < h.header_bytes:
                    why, into_metadata = f"offset {e:#x} lies in the header", True
                elif e + tb > file_size:
                    why = f"at {e:#x} ({tb} bytes) runs past the end of the file ({file_size:#x})"
                elif e // cs < meta.stop and meta.start < e // cs + h.table_size:
                    why = f"at {e:#x} overlaps the L1 table at {h.l1_table_offset:#x}"
                    into_metadata = True
                if why is not None:
                    from qbackend.block.qed_kinds import ProblemKind

                    kind = ProblemKind.L1_INTO_METADATA if into_metadata else ProblemKind.BAD_L1_ENTRY
                    p = Problem(kind, f"{where} {why}", h.l1_table_offset, i, e)
                    rep.corruptions.append(p)
                    l1_fixes.append((i, p))
                    continue
                c = e // cs
                if any(used[c:c + h.table_size]):
                    from qbackend.block.qed_kinds import ProblemKind

                    rep.corruptions.append(Problem(ProblemKind.DUPLICATE,
                                                   f"{where} at {e:#x} overlaps clusters already referenced",
                                                   h.l1_table_offset, i, e, fixable=False))
                    # Its clusters are referenced all the same (QEMU marks them too): not leaks for
                    # a repair to cut off the end of the file, leaving the entry past its end.
                    used[c:c + h.table_size] = b"\x01" * h.table_size
                    continue
                used[c:c + h.table_size] = b"\x01" * h.table_size
                tables.append((i, e))
        st = _ScanState(rep, used, meta, file_size, nclusters)
        for done, (i, toff) in enumerate(tables):
            if progress is not None:
                progress(done, len(tables))
            self._check_table(i, toff, st)
        if progress is not None:
            progress(len(tables), len(tables))
        # leaks
        last_used = used.rfind(b"\x01", 0, nclusters)
        rep.leaked_clusters = sum(used[c:min(c + _COUNT_CHUNK, nclusters)].count(0)
                                  for c in range(0, nclusters, _COUNT_CHUNK))
        c = 0
        while c < nclusters and len(rep.leak_ranges) < 100:
            c = used.find(b"\x00", c, nclusters)
            if c < 0:
                break
            stop = used.find(b"\x01", c, nclusters)
            stop = nclusters if stop < 0 else stop
            rep.leak_ranges.append((c * cs, (stop - c) * cs))
            c = stop
        rep.image_end_offset = (last_used + 1) * cs
        if repair:
            self._repair(rep, l1_fixes if not leaks_only else [], st.l2_fixes if not leaks_only else [],
                         raw_size, nclusters, last_used)
        return rep

    def _check_table(self, l1i: int, toff: int, st: _ScanState) -> None:
        """Check one L2 table's entries, marking the clusters they use."""
        img = self.img
        table = _table_from_bytes(img.f.pread(toff, img._tb))
        for lo in range(0, len(table), _MAX_SPAN):  # bounds the size of the integers _scan_span works on
            self._check_span(l1i, toff, table, lo, min(lo + _MAX_SPAN, len(table)), st)

    def _check_span(self, l1i: int, toff: int, table: array[int], lo: int, hi: int, st: _ScanState) -> None:
        """Check entries ``lo:hi`` of an L2 table: all at once if none has a problem (`_scan_span`),
        else halve the span until the bad entries are found, which go one by one through `_check_entry`.

        The result is exactly that of checking every entry in order with `_check_entry`: a span
        `_scan_span` accepts would have passed entry by entry, with the same marks and counts.
        """
        n = hi - lo
        if n > _SMALL_SPAN and self._scan_span(table[lo:hi] if n < len(table) else table, st):
            return
        if n > max(_SMALL_SPAN, 1):
            mid = (lo + hi) // 2
            self._check_span(l1i, toff, table, lo, mid, st)
            self._check_span(l1i, toff, table, mid, hi, st)
            return
        for j in range(lo, hi):
            e = table[j]
            if e > L2_ZERO:
                self._check_entry(l1i, toff, j, e, st)

    def _scan_span(self, span: array[int], st: _ScanState) -> bool:
        """Check and mark a span of L2 entries with whole-span operations, if none of them has a problem:
        True.  False, having changed nothing, if some entry is unaligned, outside the data area, or points
        at a cluster already used (metadata, an earlier entry, an entry of this span).
        """
        le = _table_to_bytes(span)
        maybe_zeros = _ZERO_ENTRY in le  # an entry of 0, or eight zero bytes across two entries
        if not maybe_zeros:
            ok = self._scan_data(span, int.from_bytes(le, "little"), st)
            if ok is not None:
                return ok
        # 0s or 1s (unallocated, zero clusters) to leave out, or an entry unaligned or out of range
        n = len(span)
        bits = int.from_bytes(le[0::8].translate(_CLEAR_BIT0), "little")  # per entry: any bit but bit 0?
        for i in range(1, 8):
            bits |= int.from_bytes(le[i::8], "little")
        if not bits:
            return True
        is_data = bits.to_bytes(n, "little")
        if 0 not in is_data:  # nothing to leave out
            return maybe_zeros and self._scan_data(span, int.from_bytes(le, "little"), st) is True
        pieces = []
        if not _NONZERO_RUN:
            import re

            _NONZERO_RUN.append(re.compile(b"[^\\x00]+"))
        for k, m in enumerate(_NONZERO_RUN[0].finditer(is_data)):
            if k > n >> 6:  # many pieces: pick the entries one by one (at C speed)
                data = array("Q", compress(span, is_data))
                break
            pieces.append(le[m.start() * 8:m.end() * 8])
        else:
            data = _table_from_bytes(b"".join(pieces))
        return self._scan_data(data, int.from_bytes(_table_to_bytes(data), "little"), st) is True

    def _scan_data(self, span: array[int], x: int, st: _ScanState) -> bool | None:
        """`_scan_span` for entries that all point at data (no 0 or 1); ``x``: the entries as one integer,
        entry j in bits 64j..64j+63.  None (nothing changed) if some entry is unaligned or out of range.

        Alignment, range and "next entry = this one + 1 cluster" are tested on all 64-bit lanes of ``x``
        at once, with big-integer arithmetic.  Clusters used twice: a run of consecutive clusters is
        looked up with one `find`; otherwise the clusters are marked one by one (a C-level loop), and
        the marks that changed counted over the window of clusters they fall in; when that window is
        much wider than the span, a set finds duplicates and a gather finds clusters already used.
        """
        img = self.img
        cs, shift = img._cs, img._cs.bit_length() - 1
        n = len(span)
        lane = st.lanes(n)
        used = st.used
        first = span[0]
        lo_c, hi_c = img.header.header_size, st.nclusters
        c0 = first >> shift
        if x == lane.ones * first + lane.iota(cs):  # one run of clusters (the common case)
            if first % cs or c0 < lo_c or c0 + n > hi_c:
                return None
            if used.find(b"\x01", c0, c0 + n) >= 0:
                return False
            used[c0:c0 + n] = b"\x01" * n
            consecutive = n - 1
        else:
            if x & lane[cs - 1]:
                return None  # unaligned
            y = x >> shift  # cluster numbers: the low bits shifted in from the lane above are zeros
            # every lane is below 2**52, so adding 2**63 - limit sets bit 63 exactly where the lane >= limit
            top = lane[1 << 63]
            if (y + lane[(1 << 63) - hi_c]) & top or (y + lane[(1 << 63) - lo_c]) & top != top:
                return None  # past the end of the file, or in the header
            # next - this + 2**62 - 1 (lanes stay in (0, 2**63): no borrows) reaches bit 62 where
            # next >= this + 1, one less where next >= this + 2: bit 62 differs exactly where
            # next == this + 1; the top lane (0 - last) reaches it in neither
            t = (y >> 64) + lane[(1 << 62) - 1] - y
            consecutive = ((t ^ (t - lane[1])) & lane[1 << 62]).bit_count()
            clusters = _table_from_bytes(y.to_bytes(8 * n, "little"))
            if hi_c - lo_c > _WINDOW * n:
                lo_c, hi_c = min(clusters), max(clusters) + 1
            if hi_c - lo_c <= _WINDOW * n:  # mark, then count the changed marks; undo unless there are n
                saved = used[lo_c:hi_c]
                _mark(used, clusters)
                if (int.from_bytes(used[lo_c:hi_c], "little") ^ int.from_bytes(saved, "little")).bit_count() != n:
                    used[lo_c:hi_c] = saved
                    return False
            else:
                cl = clusters.tolist()
                if len(set(cl)) != n or 1 in itemgetter(*cl)(used):
                    return False
                _mark(used, cl)
        rep = st.rep
        rep.allocated_clusters += n
        rep.fragmented_clusters += n - 1 - consecutive + (st.prev_host >= 0 and first != st.prev_host + cs)
        st.prev_host = span[-1]
        return True

    def _check_entry(self, l1i: int, toff: int, j: int, e: int, st: _ScanState) -> None:
        from qbackend.block.qed_kinds import ProblemKind  # (entries that may have a problem only)

        img = self.img
        cs = img._cs
        used, rep = st.used, st.rep
        why = None
        kind = ProblemKind.BAD_L2_ENTRY
        fixable = True
        c = e // cs
        if e % cs:
            why = f"offset {e:#x} is not a multiple of the cluster size"
        elif e < img.header.header_bytes:
            why, kind = f"offset {e:#x} lies in the header", ProblemKind.L2_INTO_METADATA
        elif e >= st.file_size:
            why = f"offset {e:#x} is past the end of the file ({st.file_size:#x})"
        elif c in st.meta:
            why, kind = f"offset {e:#x} lies in the L1 table", ProblemKind.L2_INTO_METADATA
        elif used[c]:
            why, kind, fixable = f"offset {e:#x} is referenced more than once", ProblemKind.DUPLICATE, False
        if why is not None:
            guest = (l1i * img._ne + j) * cs
            p = Problem(kind, f"L2 table at {toff:#x} entry {j} (guest offset {guest:#x}): data cluster {why}",
                        toff, j, e, fixable=fixable)
            rep.corruptions.append(p)
            if fixable:
                st.l2_fixes.append((toff, j, p))
            return
        used[c] = 1
        rep.allocated_clusters += 1
        if st.prev_host >= 0 and e != st.prev_host + cs:
            rep.fragmented_clusters += 1
        st.prev_host = e

    def _repair(self, rep: CheckReport, l1_fixes: list[tuple[int, Problem]],
                l2_fixes: list[tuple[int, int, Problem]], raw_size: int, nclusters: int, last_used: int) -> None:
        img = self.img
        h = img.header
        cs = img._cs
        for i, p in l1_fixes:
            img.f.pwrite(h.l1_table_offset + i * 8, bytes(8))
            p.fixed = True
            rep.changes.append(f"L1 entry {i}: {p.value:#x} -> 0")
        for toff, j, p in l2_fixes:
            img.f.pwrite(toff + j * 8, bytes(8))
            p.fixed = True
            rep.changes.append(f"L2 table at {toff:#x} entry {j}: {p.value:#x} -> 0")
        if l1_fixes or l2_fixes:
            img.f.flush()
        new_end = (last_used + 1) * cs
        if new_end < raw_size:
            img.f.truncate(new_end)
            img.f.flush()
            tail = nclusters - (last_used + 1)
            rep.leaks_fixed = tail
            from qbackend.block.qed_kinds import ProblemKind

            for p in rep.corruptions:
                if p.kind is ProblemKind.PARTIAL_CLUSTER:
                    p.fixed = True
            rep.changes.append(f"file truncated from {raw_size:#x} to {new_end:#x} bytes"
                               + (f" ({tail} leaked clusters at the end)" if tail else ""))
        if rep.corruptions_remaining == 0 and img.dirty:
            img.header = img.header.replace(features=img.header.features & ~_NEED_CHECK)
            img._write_header()
            img.f.flush()
            rep.need_check_cleared = True
            rep.changes.append("NEED_CHECK cleared")
        img._load_metadata()


_L1_CHUNK = 1 << 20  # bytes of the L1 table read at once
_L1_PIECE = 1 << 12  # bytes of it skipped at once when all zeros
_COUNT_CHUNK = 1 << 22  # clusters counted at once (a copy of that many bytes)
_MAX_SPAN = 1 << 15  # L2 entries scanned at once at most (a whole table of the default size)
_SMALL_SPAN = 32  # L2 entries checked one by one once a span with a problem is narrowed down to this
_WINDOW = 64  # _scan_span counts marks over a window of up to this many clusters per entry, else uses a set
_CLEAR_BIT0 = bytes(b & 0xFE for b in range(256))
_NONZERO_RUN: list[re.Pattern[bytes]] = []  # compiled on first use (re is not imported before)
_LANE_ONE = (1).to_bytes(8, "little")
_ZERO_ENTRY = bytes(8)


def _l1_chunks(img: QedImage) -> Iterator[tuple[int, array[int]]]:
    """(first index, entries) of the L1 table's pieces of _L1_PIECE bytes that hold a nonzero
    entry (the others have nothing to check), read _L1_CHUNK bytes at a time."""
    h = img.header
    for pos in range(0, h.table_bytes, _L1_CHUNK):
        raw = img.f.pread(h.l1_table_offset + pos, min(_L1_CHUNK, h.table_bytes - pos))
        for at in range(0, len(raw), _L1_PIECE):
            end = min(at + _L1_PIECE, len(raw))
            if raw.count(0, at, end) != end - at:
                yield (pos + at) // 8, _table_from_bytes(raw[at:end])


SMALL_MAP = 1 << 20  # clusters: a map this small is a plain bytearray


def _cluster_map(size: int) -> bytearray | mmap.mmap:
    if size <= SMALL_MAP:
        return bytearray(size)
    import mmap

    return mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _mark(used: bytearray | mmap.mmap, clusters: Iterable[int]) -> None:
    deque(map(used.__setitem__, clusters, repeat(1)), maxlen=0)


class _ScanState:
    """What the L2 scan of a check carries from entry to entry and table to table."""

    def __init__(self, rep: CheckReport, used: bytearray | mmap.mmap, meta: range, file_size: int, nclusters: int) -> None:
        self.rep = rep
        self.used = used  # a byte per cluster of the file: referenced by something already
        self.meta = meta  # the L1 table's clusters
        self.file_size = file_size  # whole clusters only
        self.nclusters = nclusters
        self.l2_fixes: list[tuple[int, int, Problem]] = []
        self.prev_host = -1  # the last data cluster seen, for counting fragmentation
        self._lanes: dict[int, _Lanes] = {}

    def lanes(self, n: int) -> _Lanes:
        """The lane constants for spans of n entries (kept for the check's few span lengths)."""
        lanes = self._lanes.get(n)
        if lanes is None:
            if len(self._lanes) >= 8:
                self._lanes.clear()
            lanes = self._lanes[n] = _Lanes(int.from_bytes(_LANE_ONE * n, "little"))
        return lanes


class _Lanes(dict[int, int]):
    """``lanes[v]``: the integer of n 64-bit lanes that all hold v; made on first use."""

    def __init__(self, ones: int) -> None:
        super().__init__()
        self.ones = ones

    def __missing__(self, v: int) -> int:
        self[v] = r = self.ones * v
        return r

    def iota(self, step: int) -> int:
        """Lanes 0, step, 2 * step, ..."""
        key = -step  # beside the constant lanes, under a key they never use
        r = self.get(key)
        if r is None:
            n = self.ones.bit_length() // 64 + 1
            self[key] = r = int.from_bytes(_table_to_bytes(array("Q", range(0, n * step, step))), "little")
        return r


