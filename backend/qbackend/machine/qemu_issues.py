"""QEMU bugs qbackend knows of and steers users around, each named by its
heading in docs/qemu-issues.md (a test checks that the heading is there)."""

from __future__ import annotations

from dataclasses import dataclass

DOC = "docs/qemu-issues.md"


@dataclass(frozen=True)
class KnownIssue:
    title: str
    """The issue's heading in docs/qemu-issues.md."""
    versions: tuple[tuple[int, int], ...]
    """The (major, minor) releases known to have it."""

    def affects(self, version: tuple[int, ...]) -> bool:
        return tuple(version[:2]) in self.versions

    def cite(self) -> str:
        return f"{DOC}, '{self.title}'"


MSIX_UNPLUG_ABORT = KnownIssue("QEMU 11.1.3 aborts when a vfio-user device with MSI-X is unplugged", ((11, 1),))
"""device_del of a vfio-user-pci device with an MSI-X capability ends QEMU 11.1 with an
assertion in memory_region_del_subregion (seen with 11.1.3; the fix is not in an 11.1 release)."""

KNOWN_ISSUES = (MSIX_UNPLUG_ABORT,)
