"""A `Backend` served by trio in a background thread, for synchronous code
(pytest, scripts, the harness): `call` and `run` hop into the trio thread."""

from __future__ import annotations

import logging
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from qbackend.app.service import Backend

log = logging.getLogger(__name__)
T = TypeVar("T")


class BackendThread:
    """A Backend served by trio in a background thread.

    For synchronous callers: `call(fn, *args)` runs a plain function in the
    trio thread, `run(afn, *args)` an async one; both return its result.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._stop: trio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="qbackend-trio", daemon=True)

    def _main(self) -> None:
        async def main() -> None:
            self._token = trio.lowlevel.current_trio_token()
            self._stop = trio.Event()
            async with trio.open_nursery() as nursery:
                await nursery.start(self.backend.run)
                self._ready.set()
                await self._stop.wait()
                nursery.cancel_scope.cancel()

        try:
            trio.run(main)
        except BaseException as exc:  # reported to the caller of start()/stop()
            self._error = exc
            log.exception("backend thread failed")
        finally:
            self._ready.set()

    def start(self) -> BackendThread:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"backend failed to start: {self._error}") from self._error
        return self

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        return trio.from_thread.run_sync(fn, *args, trio_token=self._token)

    def run(self, afn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(afn, *args, trio_token=self._token)

    def stop(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            self.call(self._stop.set)
            self._thread.join(10)
        if self._error is not None:
            raise RuntimeError(f"backend failed: {self._error}") from self._error

    def __enter__(self) -> BackendThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
