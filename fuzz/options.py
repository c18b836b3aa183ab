"""The command-line option parsers: `key=value,...` device options and sizes.

Documented outcome: the parsed value, or a `UsageError` (`OptionError`,
`SizeError`).  The text is what a command line gives Python: UTF-8 with
undecodable bytes as surrogate escapes.
"""

from __future__ import annotations

from collections.abc import Callable

from qbackend.errors import UsageError
from qbackend.options import DeviceOptions, DimmOptions, DiskOptions, IvshmemOptions, NbdExportOptions, parse_keyval
from qbackend.sizes import parse_size

PARSERS: tuple[Callable[[str], object], ...] = (
    IvshmemOptions.parse,
    NbdExportOptions.parse,
    DimmOptions.parse,
    DeviceOptions.parse,
    DiskOptions.parse,
    lambda text: parse_keyval(text, "--fuzz"),
    lambda text: parse_size(text, "--size", default_unit="B"),
    lambda text: parse_size(text, "--memory", default_unit="M"),
)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    parse = PARSERS[data[0] % len(PARSERS)]
    text = data[1:].decode("utf-8", "surrogateescape")
    try:
        result = parse(text)
    except UsageError:
        return
    if isinstance(result, int):
        assert result >= 0, result
