"""``upgrade`` over QMP: hand everything this process serves to a new qbackend
process and exit (qbackend.app.upgrade).  The reply comes from the old process
just before it goes; the monitor's socket is the new process's from then on.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from qbackend.plumbing.handover import HandoverError
from qbackend.protocol.qmp import Arg, CommandSpec, QmpCommandError

if TYPE_CHECKING:
    from qbackend.app.service import Backend
    from qbackend.servers.qmp_monitor import QmpMonitor

UPGRADE = CommandSpec("upgrade", {
    "timeout": Arg("number", True, "seconds the new process has to take over (default 60)"),
}, doc="hand every device, disk, export and socket to a new qbackend process (the code installed now), which "
       "serves on without QEMU seeing a socket close; this process then exits.  When it fails, this process "
       "serves on as before", returns="{pid, seconds (in all), paused (seconds nothing was served)}")


def register(monitor: QmpMonitor, backend: Backend) -> None:
    busy = trio.Lock()

    async def upgrade(args: dict[str, Any]) -> object:
        from qbackend.app.backend_state import describe, parts_of, refusals
        from qbackend.app.upgrade import TIMEOUT, exit_now, hand_over

        if busy.locked():
            raise QmpCommandError("an upgrade is under way already")
        async with busy:
            why = refusals(backend)
            if why:
                raise QmpCommandError("cannot upgrade: " + "; ".join(why))
            timeout = float(args.get("timeout", TIMEOUT))
            if not 0 < timeout <= 3600:
                raise QmpCommandError(f"timeout {timeout:g}: seconds, more than 0 and at most 3600")
            started = time.monotonic()
            try:
                pid, paused = await hand_over(parts_of(backend), lambda: describe(backend), timeout=timeout)  # type: ignore[arg-type]
            except HandoverError as exc:
                raise QmpCommandError(f"upgrade failed, this process serves on: {exc}") from None
            seconds = time.monotonic() - started
            print(f"upgrade: PID {pid} serves now; this process exits", flush=True)
            monitor.after_reply = exit_now
            return {"pid": pid, "seconds": round(seconds, 3), "paused": round(paused, 3)}

    monitor.register(UPGRADE, upgrade)
