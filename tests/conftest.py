"""Fixtures shared by the guest test modules.

qbackend's own guest tests use its pytest plugin (qbackend.testing.plugin,
registered by installing qbackend), the same one users get: `harness` is
the plugin's module-scoped `qbackend_harness` under the short name these
modules use.  A guest boots in about half a minute under TCG, so a
module's tests share what it starts.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from qbackend.testing.harness import Harness


@pytest.fixture(scope="module")
def harness(qbackend_harness: Harness) -> Harness:
    """The plugin's Harness for this module (stopped after its last test)."""
    return qbackend_harness


@pytest.fixture(scope="module", params=["native", "python"])
def access_path(request: pytest.FixtureRequest) -> Iterator[str]:
    """Which vfio-user access path devices made meanwhile are served by: the
    native loop (qbackend.servers.vfio_user_fast) or Python alone
    (QBACKEND_NATIVE=off).  Module tests that take it run once per path."""
    mode: str = request.param
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QBACKEND_NATIVE", "require" if mode == "native" else "off")
        yield mode
