"""QMP access for trio code and plain (sync) test code.

This is the only module that imports ``qemu.qmp``, which is asyncio-only.
All QMP clients run on one asyncio event loop in a dedicated daemon thread;
callers reach it through ``asyncio.run_coroutine_threadsafe``:

* `QmpConnection` is trio-native: its awaits park the trio task (no worker
  thread) until the asyncio side is done, woken through a trio token.
  Cancelling the trio task cancels the QMP call.
* `SyncQmp` has the same methods, blocking; use it from plain pytest code,
  never from inside trio.

Every event QEMU sends after the connection is made is kept in a queue until
it is taken with ``next_event`` (or ``drain_events``), so a test can issue
``device_del`` and then wait for the matching ``DEVICE_DELETED``, even if
the event arrived before it started waiting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import math
import threading
import time
from collections.abc import AsyncGenerator, Callable, Mapping
from pathlib import Path
from typing import Any

import trio
from qemu.qmp import ExecuteError, QMPClient, QMPError, Runstate

from qbackend.errors import QemuError
from qbackend.plumbing.threads import run_locked

Event = dict[str, Any]
"""A QMP event: ``{"event": NAME, "data": {...}, "timestamp": {...}}``."""


class QmpError(QemuError, RuntimeError):
    """A QMP failure.  For a command's error reply, ``error_class`` and
    ``desc`` are QEMU's (e.g. ``"GenericError"``, ``"Duplicate device ID"``)."""

    def __init__(
        self,
        message: str,
        *,
        cmd: str | None = None,
        error_class: str | None = None,
        desc: str | None = None,
    ) -> None:
        super().__init__(message)
        self.cmd = cmd
        self.error_class = error_class
        self.desc = desc


class QmpTimeout(QmpError, TimeoutError):
    """No matching event (or reply) arrived in time."""


# -- qemu.qmp's log -----------------------------------------------------------

CLIENT_NAME = "qbackend"
"""The name of every QMPClient made here; qemu.qmp logs under
``qemu.qmp.protocol.qbackend`` for them."""
_NOT_UP_YET = ("FileNotFoundError", "ConnectionRefusedError")


class _NotUpYet(logging.Filter):
    """Drops qemu.qmp's "Failed to establish connection" records when the
    socket is not there or not listening yet: `_Core._connect` retries
    then, and says so itself (QmpError) if QEMU never comes up.  Other
    connection failures are logged as qemu.qmp logs them."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not (isinstance(args, tuple) and len(args) == 2 and args[0] == "Failed to establish connection"):
            return True
        detail = str(args[1])
        # the error record holds "FileNotFoundError: ..."; the debug one a traceback ending in it
        last = detail.rstrip().rsplit("\n", 1)[-1].lstrip(" |")
        return not (detail.startswith(_NOT_UP_YET) or last.startswith(_NOT_UP_YET))


logging.getLogger(f"qemu.qmp.protocol.{CLIENT_NAME}").addFilter(_NotUpYet())


# -- the asyncio loop thread -------------------------------------------------

_loop: asyncio.AbstractEventLoop | None = None
_loop_lock = threading.Lock()


def _get_loop() -> asyncio.AbstractEventLoop:
    """The shared asyncio loop, started in a daemon thread on first use."""
    global _loop
    with _loop_lock:
        if _loop is None:
            loop = asyncio.new_event_loop()
            ready = threading.Event()

            def run() -> None:
                asyncio.set_event_loop(loop)
                loop.call_soon(ready.set)
                loop.run_forever()

            threading.Thread(target=run, name="qmp-asyncio", daemon=True).start()
            ready.wait()
            _loop = loop
        return _loop


def _submit(coro: Any) -> concurrent.futures.Future[Any]:
    return asyncio.run_coroutine_threadsafe(coro, _get_loop())


def _event_matches(ev: Event, name: str | None, data: Mapping[str, Any] | None) -> bool:
    if name is not None and ev.get("event") != name:
        return False
    if data:
        evdata = ev.get("data") or {}
        return all(k in evdata and evdata[k] == v for k, v in data.items())
    return True


def _describe(name: str | None, data: Mapping[str, Any] | None) -> str:
    s = name or "any event"
    return s + (f" with data {dict(data)}" if data else "")


_live: set[_Core] = set()
"""Open connections, so their asyncio tasks are never garbage collected."""


class _Core:
    """The QMPClient plus the event queue; shared by both front ends."""

    def __init__(self) -> None:
        self.client: QMPClient | None = None
        self.path: str | None = None
        self.lost = False
        """True once QEMU hung up (the queue still holds what came before)."""
        self._pump: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        self._events: list[Event] = []
        self._cond = threading.Condition()
        self._wakers: set[Callable[[], None]] = set()

    # --- run on the asyncio thread ---

    async def _connect(self, path: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            client = QMPClient(CLIENT_NAME)
            try:
                await client.connect(path)
                break
            except QMPError as e:
                if time.monotonic() >= deadline:
                    raise QmpError(f"cannot connect to QMP socket {path}: {e}") from e
            except OSError as e:  # pragma: no cover - depends on qemu.qmp version
                if time.monotonic() >= deadline:
                    raise QmpError(f"cannot connect to QMP socket {path}: {e}") from e
            await asyncio.sleep(0.05)
        self.client = client
        self.path = path
        self.lost = False
        loop = asyncio.get_running_loop()
        self._pump = loop.create_task(self._pump_events(client))
        self._watch = loop.create_task(self._watch_disconnect(client))
        _live.add(self)

    async def _pump_events(self, client: QMPClient) -> None:
        async for msg in client.events:
            self._push(msg)

    def _push(self, msg: Any) -> None:
        ev: Event = {k: msg[k] for k in msg}
        with self._cond:
            self._events.append(ev)
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()

    async def _watch_disconnect(self, client: QMPClient) -> None:
        """When QEMU hangs up, finish the client's disconnect (which also
        collects the EOFError qemu.qmp would otherwise log as never
        retrieved) and wake every waiter so it fails fast."""
        while client.runstate == Runstate.RUNNING:
            await client.runstate_changed()
        try:
            await client.disconnect()
        except Exception:  # EOFError, OSError, ...: QEMU went away
            pass
        if self._pump is not None:
            self._pump.cancel()
        for msg in client.events.clear():  # events the pump had not taken yet
            self._push(msg)
        with self._cond:
            self.lost = True
            self._cond.notify_all()
            wakers = list(self._wakers)
        for wake in wakers:
            wake()
        _live.discard(self)

    async def _execute(self, cmd: str, args: Mapping[str, object] | None) -> Any:
        if self.client is None:
            raise QmpError("QMP is not connected", cmd=cmd)
        try:
            return await self.client.execute(cmd, args)
        except ExecuteError as e:
            raise QmpError(
                f"QMP {cmd} failed: {e.error_class}: {e}",
                cmd=cmd,
                error_class=e.error_class,
                desc=str(e),
            ) from None
        except QMPError as e:
            raise QmpError(f"QMP {cmd} failed: {type(e).__name__}: {e}", cmd=cmd) from e

    async def _close(self) -> None:
        for task in (self._watch, self._pump):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        self._watch = self._pump = None
        if self.client is not None:
            try:
                await self.client.disconnect()
            except Exception:  # EOFError etc.: QEMU may already be gone
                pass
            self.client = None
        with self._cond:
            self.lost = True
            self._cond.notify_all()
        _live.discard(self)

    # --- callable from any thread ---

    def take_event(self, name: str | None, data: Mapping[str, Any] | None) -> Event | None:
        """Remove and return the first queued matching event (caller holds _cond)."""
        for i, ev in enumerate(self._events):
            if _event_matches(ev, name, data):
                return self._events.pop(i)
        return None

    def lost_error(self, name: str | None, data: Mapping[str, Any] | None) -> QmpError:
        return QmpError(
            f"QMP connection to {self.path} is closed (QEMU exited?) while waiting "
            f"for {_describe(name, data)}"
        )

    def drain(self, name: str | None = None) -> list[Event]:
        with self._cond:
            taken = [ev for ev in self._events if _event_matches(ev, name, None)]
            self._events = [ev for ev in self._events if not _event_matches(ev, name, None)]
            return taken

    def pending(self) -> list[Event]:
        with self._cond:
            return list(self._events)


# -- trio front end ----------------------------------------------------------


async def _await_future(fut: concurrent.futures.Future[Any]) -> Any:
    """Park the current trio task until ``fut`` (from the asyncio thread) is done."""
    token = trio.lowlevel.current_trio_token()
    done = trio.Event()

    def wake(_: object) -> None:
        try:
            token.run_sync_soon(done.set)
        except trio.RunFinishedError:
            pass

    fut.add_done_callback(wake)
    try:
        await done.wait()
    except BaseException:
        fut.cancel()
        raise
    return fut.result()


class QmpConnection:
    """A trio-native QMP connection.

    ::

        qmp = await QmpConnection.open(vm.qmp_path)
        await qmp.execute("device_add", {"driver": "...", "id": "dev0"})
        ev = await qmp.next_event("DEVICE_DELETED", data={"device": "dev0"})
        await qmp.close()
    """

    def __init__(self) -> None:
        self._core = _Core()

    @classmethod
    async def open(cls, path: Path | str, timeout: float = 10.0) -> QmpConnection:
        conn = cls()
        await conn.connect(path, timeout)
        return conn

    async def connect(self, path: Path | str, timeout: float = 10.0) -> None:
        """Connect (retrying until ``timeout``) and negotiate capabilities."""
        await _await_future(_submit(self._core._connect(str(path), timeout)))

    async def execute(self, cmd: str, args: Mapping[str, object] | None = None) -> Any:
        """Run a QMP command and return its ``return`` value; raise QmpError."""
        return await _await_future(_submit(self._core._execute(cmd, args)))

    async def next_event(
        self,
        name: str | None = None,
        *,
        data: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> Event:
        """Take the first queued event named ``name`` whose ``data`` contains the
        given items, waiting up to ``timeout`` seconds for one; QmpTimeout if none."""
        core = self._core
        token = trio.lowlevel.current_trio_token()
        with trio.move_on_after(timeout):
            while True:
                arrived = trio.Event()

                def wake(arrived: trio.Event = arrived) -> None:
                    try:
                        token.run_sync_soon(arrived.set)
                    except trio.RunFinishedError:
                        pass

                def take_or_wait(wake: Callable[[], None] = wake) -> Event | None:
                    ev = core.take_event(name, data)
                    if ev is None:
                        if core.lost:
                            raise core.lost_error(name, data)
                        core._wakers.add(wake)
                    return ev

                # The queue's lock is shared with the asyncio thread: taken in a worker.
                ev = await run_locked(core._cond, take_or_wait)
                if ev is not None:
                    return ev
                try:
                    await arrived.wait()
                finally:
                    with trio.CancelScope(shield=True):
                        await run_locked(core._cond, core._wakers.discard, wake)
        raise QmpTimeout(
            f"no QMP {_describe(name, data)} within {timeout} s; "
            f"queued events: {[e.get('event') for e in core.pending()]}"
        )

    async def events(self) -> AsyncGenerator[Event, None]:
        """Every event, in order, as it arrives (consuming the queue)."""
        while True:
            yield await self.next_event(timeout=math.inf)

    def drain_events(self, name: str | None = None) -> list[Event]:
        """Take all queued events (only those named ``name``, if given)."""
        return self._core.drain(name)

    def pending_events(self) -> list[Event]:
        """A copy of the queued events, without taking them."""
        return self._core.pending()

    async def close(self) -> None:
        await _await_future(_submit(self._core._close()))

    async def __aenter__(self) -> QmpConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# -- sync front end ----------------------------------------------------------


class SyncQmp:
    """A blocking QMP connection for plain (non-trio) code.

    ::

        with SyncQmp(vm.qmp_path) as qmp:
            assert qmp.execute("query-status")["status"] == "running"
    """

    def __init__(self, path: Path | str | None = None, timeout: float = 10.0) -> None:
        self._core = _Core()
        if path is not None:
            self.connect(path, timeout)

    @staticmethod
    def _wait(fut: concurrent.futures.Future[Any], timeout: float | None) -> Any:
        try:
            return fut.result(timeout)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise QmpTimeout(f"QMP call did not finish within {timeout} s") from None

    def connect(self, path: Path | str, timeout: float = 10.0) -> None:
        self._wait(_submit(self._core._connect(str(path), timeout)), timeout + 10)

    def execute(
        self, cmd: str, args: Mapping[str, object] | None = None, timeout: float = 60.0
    ) -> Any:
        """Run a QMP command and return its ``return`` value; raise QmpError."""
        return self._wait(_submit(self._core._execute(cmd, args)), timeout)

    def next_event(
        self,
        name: str | None = None,
        *,
        data: Mapping[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> Event:
        """Take the first queued matching event, waiting up to ``timeout`` s."""
        core = self._core
        deadline = time.monotonic() + timeout
        with core._cond:
            while True:
                ev = core.take_event(name, data)
                if ev is not None:
                    return ev
                if core.lost:
                    raise core.lost_error(name, data)
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                core._cond.wait(left)
        raise QmpTimeout(
            f"no QMP {_describe(name, data)} within {timeout} s; "
            f"queued events: {[e.get('event') for e in core.pending()]}"
        )

    def drain_events(self, name: str | None = None) -> list[Event]:
        return self._core.drain(name)

    def pending_events(self) -> list[Event]:
        return self._core.pending()

    def close(self, timeout: float = 10.0) -> None:
        self._wait(_submit(self._core._close()), timeout)

    def __enter__(self) -> SyncQmp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
