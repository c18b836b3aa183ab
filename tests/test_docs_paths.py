"""Every repository path the README and docs/ name exists.

A name counts as a path when it has a slash and ends in a file suffix the
repository uses (or in a slash, for a folder).  It must exist from the
repository's root, or from the package's folder (backend/qbackend/), which
the docs use for files inside the package (`servers/nbd_fast.c`).  Absolute
paths, URLs, paths under build/ or a user's folders, and placeholders are
not the repository's and are skipped.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PATH = re.compile(r"(?<![\w./$~-])((?:[\w.-]+/)+(?:[\w.-]+\.(?:py|c|h|md|sh|json|toml|txt)|))(?![\w/-])")
FOREIGN = {"system/memory.c"}  # QEMU's own source, quoted in one of its messages
NOT_OURS = ("build/", "tmp/", "dev/", "etc/", "usr/", "proc/", "sys/", "run/", "home/", "DATA/", "/")


def named_paths(text: str) -> list[str]:
    out = []
    for match in PATH.finditer(text):
        name = match.group(1)
        before = text[max(0, match.start() - 8):match.start()]
        if "://" in before or name.startswith(NOT_OURS) or name.count("/") == 0:
            continue
        if any(ch in name for ch in "<>*{}") or name.startswith(("..", ".venv")) or name in FOREIGN:
            continue
        out.append(name)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_named_path_exists(doc: Path) -> None:
    missing = sorted({name for name in named_paths(doc.read_text())
                      if not (REPO / name).exists() and not (REPO / "backend" / "qbackend" / name).exists()})
    assert missing == [], f"{doc.name} names paths that do not exist"


def test_the_scan_finds_paths_and_misses() -> None:
    names = named_paths("see `qbackend/devices/api.py`, (tests/test_layers.py) and https://x.org/a/b.py or /tmp/x.py")
    assert names == ["qbackend/devices/api.py", "tests/test_layers.py"]
