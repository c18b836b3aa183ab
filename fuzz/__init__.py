"""Coverage-guided fuzzing (atheris) of every parser that reads outside input.

One module per target, each with ``test_one_input(data: bytes) -> None``: it
feeds ``data`` to the code under test and returns when the outcome is one the
code documents (a clean result, or the module's own protocol/parse error); any
other exception, a failed assertion, a hang or runaway memory is a finding.
`fuzz.run` drives the targets under libFuzzer (``make fuzz``);
tests/test_fuzz_regressions.py replays fuzz/regressions/<target>/ through the
same functions.

Streams are cut into chunks as a socket would deliver them, so that framing is
exercised across read boundaries: a chunk is two control bytes, ``nfds << 14 |
length`` big-endian (length 0: the rest of the input), then ``length`` bytes.
``nfds`` (0..3) is how many file descriptors arrive with the chunk, for the
protocols that pass them.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

TARGETS = ("vfio_user", "vfio_user_native", "vhost_user", "nbd", "nbd_native", "ivshmem_server", "qmp", "qed",
           "spapr_script", "options", "virtqueue", "virtqueue_packed", "vhost_inflight")


def chunks(data: bytes) -> Iterator[tuple[bytes, int]]:
    """(bytes, nfds) per chunk of ``data``; never an empty chunk (b"" is EOF to the codecs)."""
    pos = 0
    while pos < len(data):
        control = int.from_bytes(data[pos:pos + 2].ljust(2, b"\0"), "big")
        pos += 2
        nfds, length = control >> 14, control & 0x3FFF
        chunk = data[pos:] if length == 0 else data[pos:pos + length]
        pos += len(chunk) if length else len(data)
        if chunk:
            yield chunk, nfds


def encode_chunks(parts: Iterable[bytes | tuple[bytes, int]]) -> bytes:
    """The inverse of `chunks`, for seeds: each part is bytes, or (bytes, nfds)."""
    out = bytearray()
    for part in parts:
        chunk, nfds = part if isinstance(part, tuple) else (part, 0)
        assert 0 < len(chunk) < 0x4000 and 0 <= nfds <= 3
        out += (nfds << 14 | len(chunk)).to_bytes(2, "big") + chunk
    return bytes(out)


class FdCounter:
    """Hands out fake fd numbers and checks that each comes back exactly once."""

    def __init__(self) -> None:
        self.given: list[int] = []
        self.returned: list[int] = []

    def new(self, n: int) -> list[int]:
        start = 1000 + len(self.given)
        fds = list(range(start, start + n))
        self.given += fds
        return fds

    def back(self, fds: Iterable[int]) -> None:
        self.returned += fds

    def check(self) -> None:
        assert sorted(self.returned) == self.given, f"fds in {self.given}, handed back {sorted(self.returned)}"
