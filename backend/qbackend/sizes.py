"""The one size parser: ``4096``, ``64K``, ``4M``, ``1G``, ``1536MiB``.

Suffixes are binary (K = 1024) as in QEMU.  What a bare number means is
the caller's explicit choice, because QEMU itself has two conventions:
object and device sizes are bytes (``size=4096``), while guest memory
(``-m 512``) is MiB.  qbackend follows QEMU on each option and says so in
``--help``.
"""

from __future__ import annotations

import re
from typing import Literal

from qbackend.errors import UsageError

Unit = Literal["B", "K", "M", "G", "T"]

_SIZE = re.compile(r"^(\d+)\s*([KMGT]?)(?:(?<=[KMGT])i?B|B)?$", re.IGNORECASE)
_SHIFT = {"B": 0, "K": 10, "M": 20, "G": 30, "T": 40}


class SizeError(UsageError):
    """A size that does not parse."""


def parse_size(text: str, what: str, *, default_unit: Unit) -> int:
    """Bytes for ``text``; a bare number is in ``default_unit``.

    ``what`` names the option in the error (``--memory``, ``--ivshmem size``).
    """
    m = _SIZE.match(text.strip())
    if not m:
        raise SizeError(f"{what}: {text!r} is not a size (examples: 4096, 64K, 4M, 1G; "
                        f"a bare number is in {'bytes' if default_unit == 'B' else default_unit + 'iB'})")
    unit = m.group(2).upper() or default_unit
    try:
        number = int(m.group(1))
    except ValueError:  # more digits than Python converts (sys.get_int_max_str_digits())
        raise SizeError(f"{what}: {text!r} is far too large") from None
    return number << _SHIFT[unit]
