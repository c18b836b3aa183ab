"""How a qbackend process runs and stops: until Ctrl-C, SIGTERM or QMP quit,
and whichever it is, every `finally` runs (devices stopped, exports flushed,
sockets removed)."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from typing import Any

import trio


async def stop_on_signal(scope: trio.CancelScope) -> None:
    """Ctrl-C or SIGTERM: cancel everything."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            print(f"\n{signal.Signals(signum).name}: stopping", flush=True)
            scope.cancel()
            return


async def start_until_done(nursery: trio.Nursery, run: Callable[..., Awaitable[Any]]) -> None:
    """Start ``run`` (a task that calls task_status.started()) in ``nursery``;
    when it returns by itself (QMP quit), the whole nursery stops."""

    async def then_stop(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await run(task_status=task_status)
        nursery.cancel_scope.cancel()

    await nursery.start(then_stop)
