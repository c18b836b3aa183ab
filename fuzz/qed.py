"""QED: open arbitrary image bytes (read-write, so NEED_CHECK runs the repair), read,
map (whole, and bounded as block status does), check, repair, zero and trim the whole
image (in bounded steps), reopen.

Documented outcome: `QedError` (an `ImageError`) or a clean result.  Checked
besides: reads return what was asked for, and after ``check(repair=True)`` the
image opens again and a fresh check finds no corruption it could have repaired.
"""

from __future__ import annotations

from qbackend.block.blockfile import MemoryBlock
from qbackend.block.qed import QedError, QedImage

MAX_READ = 64 << 10


def _reads(img: QedImage) -> None:
    size, cs = img.image_size, img.cluster_size
    span = cs * (cs // 8)  # guest bytes under one L2 table with table_size 1
    for offset, n in ((0, 3 * cs), (cs - 512, 1024), (span - cs, 2 * cs), (size - 2 * cs, 2 * cs), (size - 512, 512)):
        offset, n = max(0, offset), min(n, MAX_READ)
        n = min(n, size - offset)
        if n < 0:
            continue
        try:
            assert len(img.read(offset, n)) == n
        except QedError:
            pass
    try:
        img.map()
    except QedError:
        pass
    try:  # what one block status request walks: a prefix, of the same extents
        bounded = img.map(0, size, bounded=True)
        assert 0 < sum(e.length for e in bounded) <= size or size == 0
    except QedError:
        pass


def _zeroing(img: QedImage) -> None:
    """WRITE_ZEROES and TRIM over the whole image, in bounded steps; then it reads zeros."""
    size = img.image_size
    try:
        img.discard(0, size)
        img.write_zeroes(0, size)
        n = min(size, MAX_READ)
        assert img.read(size - n, n) == bytes(n)
    except QedError:
        pass


def test_one_input(data: bytes) -> None:
    block = MemoryBlock(data)
    try:
        img = QedImage.open(block, open_backing=False)
    except QedError:
        return
    try:
        _reads(img)
        img.check()
        report = img.check(repair=True)
        assert report.exit_code in (0, 2, 3)
        _reads(img)
        if not report.corruptions_remaining:
            _zeroing(img)
        img.close()
    except QedError:
        return
    again = QedImage.open(MemoryBlock(block.data), read_only=True, open_backing=False)
    after = again.check()
    fixable = [str(p) for p in after.corruptions if p.fixable]
    assert not fixable, fixable
    _reads(again)
