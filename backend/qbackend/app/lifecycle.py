"""How a qbackend process runs and stops: until Ctrl-C, SIGTERM or QMP quit,
and whichever it is, every `finally` runs (devices stopped, exports flushed,
sockets removed).

A stop is bounded: a device's callback that never returns (user code, see
qbackend.devices.faults) cannot hold the process.  The server abandons
its connection's thread after a moment (servers.vfio_user); and if the
process is still there `FORCE_AFTER` seconds after the signal while a
device callback has been running for more than a second, or at a second signal,
it says what is still running, removes the sockets it made and exits with
128 + the signal's number (130 for Ctrl-C).  A clean-up that merely takes
long (an export's flush) is left to finish.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from qbackend.devices.faults import calls_in_progress
from qbackend.plumbing.unix import remove_sockets

FORCE_AFTER = 4.0  # seconds from Ctrl-C or SIGTERM to a forced exit, if a device callback holds the stop


async def stop_on_signal(scope: trio.CancelScope) -> None:
    """Ctrl-C or SIGTERM: cancel everything (see the module's documentation for a stop that hangs)."""
    got: int | None = None
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                got = signum
                print(f"\n{signal.Signals(signum).name}: stopping", flush=True)
                scope.cancel()
                return
    finally:
        if got is not None:  # after the receiver has given the signals back
            force_exit_if_stuck(got, FORCE_AFTER)


def force_exit_if_stuck(signum: int, seconds: float) -> None:
    """From now on a second SIGINT or SIGTERM exits at once; and from `seconds` on,
    the process exits as soon as a device callback has been running for a second."""
    started = time.monotonic()

    def watch() -> None:
        time.sleep(seconds)
        while True:
            stuck = calls_in_progress(longer_than=1.0)
            if stuck:
                force_exit(signum, f"still stopping after {time.monotonic() - started:.0f} s, held by "
                                   + "; ".join(stuck))
            time.sleep(0.5)

    threading.Thread(target=watch, name="qbackend-stop-watch", daemon=True).start()

    def again(received: int, _frame: object) -> None:
        force_exit(received, "a second signal")

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, again)


def force_exit(signum: int, why: str) -> None:
    """Say what is still running, remove this process's sockets, exit 128 + signum."""
    lines = [f"{signal.Signals(signum).name}: {why}; exiting now.  Threads still running:"]
    frames = sys._current_frames()
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or -1)
        if frame is None or thread is threading.current_thread():
            continue
        where = traceback.extract_stack(frame, limit=1)[-1]
        lines.append(f"  {thread.name}: {where.filename}:{where.lineno} in {where.name}")
    try:
        print("\n".join(lines), file=sys.stderr, flush=True)
        remove_sockets()
    finally:
        os._exit(128 + signum)


async def start_until_done(nursery: trio.Nursery, run: Callable[..., Awaitable[Any]]) -> None:
    """Start ``run`` (a task that calls task_status.started()) in ``nursery``;
    when it returns by itself (QMP quit), the whole nursery stops."""

    async def then_stop(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await run(task_status=task_status)
        nursery.cancel_scope.cancel()

    await nursery.start(then_stop)
