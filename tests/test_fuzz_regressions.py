"""Every input the fuzzers found a bug with (fuzz/regressions/<target>/<name>), replayed
through the same target function `make fuzz` runs: the outcome must be one the code
documents (the target function asserts it), and quickly."""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
REGRESSIONS = ROOT / "fuzz" / "regressions"
SEEDS = ROOT / "fuzz" / "corpus"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fuzz import TARGETS  # noqa: E402  (fuzz/ is a top-level folder, not an installed package)


def _inputs(folder: Path) -> list[tuple[str, Path]]:
    return [(target, path) for target in TARGETS if (folder / target).is_dir()
            for path in sorted((folder / target).iterdir()) if path.is_file()]


def test_every_folder_is_a_target() -> None:
    for folder in (REGRESSIONS, SEEDS):
        assert {p.name for p in folder.iterdir() if p.is_dir()} <= set(TARGETS)


@pytest.mark.parametrize(("target", "path"), _inputs(REGRESSIONS), ids=lambda v: v if isinstance(v, str) else v.name)
def test_regression(target: str, path: Path) -> None:
    module = importlib.import_module(f"fuzz.{target}")
    start = time.monotonic()
    module.test_one_input(path.read_bytes())
    assert time.monotonic() - start < 10, "no hang: libFuzzer's -timeout is 10 s"


@pytest.mark.parametrize(("target", "path"), _inputs(SEEDS), ids=lambda v: v if isinstance(v, str) else v.name)
def test_seed(target: str, path: Path) -> None:
    """The seeds are valid inputs; the targets pass on them (a broken target fails here, not in CI's fuzz run)."""
    importlib.import_module(f"fuzz.{target}").test_one_input(path.read_bytes())
