"""A corruption generator: each damaged image is refused on open or reported by our
check with what and where, `qemu-img check` agrees, metadata is never returned as
guest data, and our repair leaves what `qemu-img check` also finds."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from qed_tools import (
    l1_entry_offset,
    l2_entry_offset,
    peek_u64,
    poke_u64,
    qemu_check,
    qemu_img,
    qemu_io,
    read_header,
    write_header,
)

from qbackend.block.qed import Feature, QedCorruptError, QedError, QedFormatError, QedImage, QedUnsupportedError
from qbackend.block.qed_check import ProblemKind

CS = 4096
SPAN = 2 * CS // 8 * CS  # guest bytes per L2 table at table_size=2: 4 MiB


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 MiB, 4K clusters, two L2 tables: clusters 0-3 and 1024-1025 allocated."""
    path = tmp_path_factory.mktemp("qed") / "pristine.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", f"cluster_size={CS},table_size=2", path, "16M")
    qemu_io(path, f"write -P 0x11 0 {4 * CS}", f"write -P 0x22 {SPAN} {2 * CS}")
    return path


def l2e(p: Path, guest: int) -> int:
    return l2_entry_offset(p, read_header(p), guest)


def l1e(p: Path, i: int) -> int:
    return l1_entry_offset(read_header(p), i)


@dataclass(frozen=True)
class Damage:
    name: str
    apply: Callable[[Path], None]
    kind: ProblemKind | None  # None: refused on open
    fixable: bool = True
    guest: int | None = None  # a guest offset whose read must fail (never metadata as data)
    where: str = ""  # text our report must contain


def _set(entry: Callable[[Path], int], value: Callable[[Path, int], int]) -> Callable[[Path], None]:
    def apply(p: Path) -> None:
        off = entry(p)
        poke_u64(p, off, value(p, peek_u64(p, off)))
    return apply


def _header(**changes: int) -> Callable[[Path], None]:
    def apply(p: Path) -> None:
        h = read_header(p)
        fields = {k: (v(h) if callable(v) else v) for k, v in changes.items()}
        write_header(p, replace(h, **fields))
    return apply


def _truncate(size: Callable[[Path], int]) -> Callable[[Path], None]:
    def apply(p: Path) -> None:
        os.truncate(p, size(p))
    return apply


DAMAGES = [
    Damage("duplicate-data", _set(lambda p: l2e(p, CS), lambda p, v: peek_u64(p, l2e(p, 0))),
           ProblemKind.DUPLICATE, fixable=False, where="entry 1"),
    Damage("l2-past-eof", _set(lambda p: l2e(p, 2 * CS), lambda p, v: 100 << 20), ProblemKind.BAD_L2_ENTRY,
           guest=2 * CS, where="entry 2"),
    Damage("l2-unaligned", _set(lambda p: l2e(p, 3 * CS), lambda p, v: v + 512), ProblemKind.BAD_L2_ENTRY,
           guest=3 * CS, where="not a multiple"),
    Damage("l2-into-l1", _set(lambda p: l2e(p, 0), lambda p, v: read_header(p).l1_table_offset),
           ProblemKind.L2_INTO_METADATA, guest=0, where="L1 table"),
    Damage("l2-into-l2", _set(lambda p: l2e(p, CS), lambda p, v: peek_u64(p, l1e(p, 1))),
           ProblemKind.DUPLICATE, fixable=False, guest=CS, where="entry 1"),
    Damage("l1-unaligned", _set(lambda p: l1e(p, 1), lambda p, v: v + 512), ProblemKind.BAD_L1_ENTRY,
           guest=SPAN, where="L1 entry 1"),
    Damage("l1-past-eof", _set(lambda p: l1e(p, 1), lambda p, v: 1 << 30), ProblemKind.BAD_L1_ENTRY,
           guest=SPAN, where="L1 entry 1"),
    Damage("l1-into-l1", _set(lambda p: l1e(p, 1), lambda p, v: read_header(p).l1_table_offset),
           ProblemKind.L1_INTO_METADATA, guest=SPAN, where="L1 entry 1"),
    Damage("l1-half-over-l1", _set(lambda p: l1e(p, 1), lambda p, v: read_header(p).l1_table_offset + CS),
           ProblemKind.L1_INTO_METADATA, guest=SPAN, where="L1 entry 1"),
    Damage("l1-duplicate", _set(lambda p: l1e(p, 1), lambda p, v: peek_u64(p, l1e(p, 0))),
           ProblemKind.DUPLICATE, fixable=False, guest=SPAN, where="L1 entry 1"),
    Damage("truncated-through-l2", _truncate(lambda p: peek_u64(p, l1e(p, 1)) + CS), ProblemKind.BAD_L1_ENTRY,
           guest=SPAN, where="past the end"),
    Damage("truncated-header", _truncate(lambda p: 512), None),
    Damage("unknown-feature", _header(features=0x10), None),
    Damage("bad-backing-offset", _header(features=Feature.BACKING_FILE, backing_filename_offset=5000,
                                         backing_filename_size=10), None),
    Damage("bad-magic", lambda p: p.write_bytes(b"QEF\0" + p.read_bytes()[4:]), None),
    Damage("bad-cluster-size", _header(cluster_size=1000), None),
    Damage("bad-table-size", _header(table_size=3), None),
    Damage("bad-image-size", _header(image_size=1000), None),
    Damage("l1-offset-unaligned", _header(l1_table_offset=CS + 512), None),
]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.name)
def test_damage_is_found_and_qemu_agrees(pristine: Path, tmp_path: Path, damage: Damage) -> None:
    p = tmp_path / "img.qed"
    shutil.copy(pristine, p)
    damage.apply(p)
    rc, report, err = qemu_check(p)
    if damage.kind is None:
        with pytest.raises(QedFormatError) as info:
            QedImage.open_path(p, read_only=True)
        assert rc == 1, (rc, report, err)  # qemu-img could not open it either
        if damage.name == "unknown-feature":
            assert isinstance(info.value, QedUnsupportedError) and "Unsupported" in err
        return
    with QedImage.open_path(p, read_only=True) as img:
        ours = img.check()
        kinds = {pr.kind for pr in ours.corruptions}
        assert damage.kind in kinds, ours.corruptions
        assert any(damage.where in str(pr) for pr in ours.corruptions), [str(pr) for pr in ours.corruptions]
        assert ours.exit_code == rc == 2, (ours, report, err)
        if damage.guest is not None:
            with pytest.raises(QedCorruptError):
                img.read(damage.guest, 512)
        # whatever else reads succeeds with guest data only: every cluster we return was written as 0x11/0x22
        for guest in range(0, 2 * SPAN, CS):
            try:
                got = img.read(guest, CS)
            except QedError:
                continue
            assert got in (bytes(CS), b"\x11" * CS, b"\x22" * CS), f"guest {guest:#x} reads metadata"

    # repair: ours, then qemu-img check on the result
    with QedImage.open_path(p, check_on_open=False) as img:
        if damage.guest is not None:  # never written through a bad entry
            with pytest.raises(QedCorruptError):
                img.write(damage.guest, b"x")
        fixed = img.check(repair=True)
        assert fixed.changes or not damage.fixable
        after = img.check()
    rc_after, report_after, err_after = qemu_check(p)
    assert after.exit_code == rc_after, (after, report_after, err_after)
    assert (after.exit_code == 2) == (not damage.fixable)


def test_qemu_repair_and_ours_agree_on_a_zeroed_entry(pristine: Path, tmp_path: Path) -> None:
    ours, theirs = tmp_path / "ours.qed", tmp_path / "theirs.qed"
    for p in (ours, theirs):
        shutil.copy(pristine, p)
        poke_u64(p, l2e(p, 2 * CS), 100 << 20)
    with QedImage.open_path(ours, check_on_open=False) as img:
        img.check(repair=True)
    qemu_img("check", "-q", "-f", "qed", "-r", "all", theirs, check=False)
    assert peek_u64(ours, l2e(ours, 2 * CS)) == peek_u64(theirs, l2e(theirs, 2 * CS)) == 0
    with QedImage.open_path(ours, read_only=True) as a, QedImage.open_path(theirs, read_only=True) as b:
        assert a.read(0, 4 * CS) == b.read(0, 4 * CS)


def test_need_check_with_bad_entry_is_repaired_on_read_write_open_only(pristine: Path, tmp_path: Path) -> None:
    p = tmp_path / "dirty.qed"
    shutil.copy(pristine, p)
    poke_u64(p, l2e(p, 3 * CS), 1 << 40)
    write_header(p, replace(read_header(p), features=Feature.NEED_CHECK))
    with QedImage.open_path(p, read_only=True) as ro:
        assert ro.dirty
        with pytest.raises(QedCorruptError):
            ro.read(3 * CS, 1)
    with QedImage.open_path(p) as rw:
        assert rw.open_check is not None and rw.open_check.corruptions_fixed == 1
        assert not rw.dirty
        assert rw.read(3 * CS, CS) == bytes(CS)  # zeroed like QEMU: the data is gone
    assert qemu_check(p)[0] == 3  # the data cluster is now leaked, QEMU and we agree
    with QedImage.open_path(p, read_only=True) as again:
        assert again.check().exit_code == 3


def test_unknown_compat_bit_opens_in_both(pristine: Path, tmp_path: Path) -> None:
    p = tmp_path / "compat.qed"
    shutil.copy(pristine, p)
    write_header(p, replace(read_header(p), compat_features=0x40, autoclear_features=0x80))
    assert qemu_check(p)[0] == 0
    with QedImage.open_path(p, read_only=True) as img:
        assert img.check().exit_code == 0
        assert img.read(0, 4) == b"\x11" * 4
    with QedImage.open_path(p) as img:
        assert img.header.autoclear_features == 0
    assert read_header(p).compat_features == 0x40 and read_header(p).autoclear_features == 0


def test_leaks_reported_like_qemu_and_tail_leaks_reclaimed(pristine: Path, tmp_path: Path) -> None:
    p = tmp_path / "leak.qed"
    shutil.copy(pristine, p)
    with open(p, "ab") as f:
        f.write(b"\x99" * 3 * CS)  # three unreferenced clusters at the end
    rc, report, _ = qemu_check(p)
    with QedImage.open_path(p, read_only=True) as img:
        ours = img.check()
    assert rc == ours.exit_code == 3 and report["leaks"] == ours.leaked_clusters == 3
    with QedImage.open_path(p) as img:
        fixed = img.check(repair=True)
        assert fixed.leaks_fixed == 3
    assert qemu_check(p)[0] == 0
