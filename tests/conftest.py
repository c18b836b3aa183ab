"""Fixtures shared by the guest test modules (qbackend.testing.harness).

A guest boots in about half a minute under TCG, so a module's tests share
one: `harness` is module-scoped and stops what the module started (guests,
then the backend thread, then shared memory) when its last test is done.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qbackend.testing.harness import Harness


@pytest.fixture(scope="module")
def harness(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    """One Harness per module, with a work directory named after the module."""
    with Harness(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])) as h:
        yield h
