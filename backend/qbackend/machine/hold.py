"""Changes to the hotplug slots, held off while `qbackend upgrade` pauses the
backend (qbackend.app.upgrade): what the slot managers know of QEMU must not
change between the pause and the end of the hand-over, or the new process
would carry on from a state the old one has left behind.

Every change goes through `ChangeHold.change()`: a QMP event handled, a
reconcile, a hot-add or hot-remove asked for over qbackend's monitor, an
eject the guest wrote.  `pause()` lets the changes under way end and holds
off new ones: a request from outside (a QMP command) is refused with one
line, the backend's own work (events, reconciling, the guest's ejects) waits
for `resume()`; in the old process after a hand-over nothing resumes, and
the new process does that work.  A change made inside another (a hot-add
that reconciles) goes on: it is part of the one under way.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar

import trio

from qbackend.errors import QbackendError

_inside: ContextVar[bool] = ContextVar("qbackend_hotplug_change", default=False)


class UpgradeUnderWay(QbackendError):
    """A hotplug request while the backend is paused for an upgrade."""


class ChangeHold:
    def __init__(self) -> None:
        self.paused = False
        self.busy = 0  # changes under way
        self._resumed = trio.Event()
        self._resumed.set()
        self._idle = trio.Event()

    def claim(self) -> None:
        """One more change under way (call from trio); `release` ends it."""
        self.busy += 1

    def release(self) -> None:
        self.busy -= 1
        if self.busy == 0:
            self._idle.set()

    @asynccontextmanager
    async def change(self, *, refuse: bool = False) -> AsyncIterator[None]:
        """A change of the slots; while paused, refused (`refuse`: UpgradeUnderWay) or
        held until resume()."""
        if _inside.get():
            yield
            return
        while self.paused:
            if refuse:
                raise UpgradeUnderWay("qbackend is handing over to a new process (upgrade): try again in a moment")
            await self._resumed.wait()
        self.claim()
        token = _inside.set(True)
        try:
            yield
        finally:
            _inside.reset(token)
            self.release()

    async def pause(self) -> None:
        """Hold off new changes and wait until those under way have ended."""
        if not self.paused:
            self.paused = True
            self._resumed = trio.Event()
        while self.busy:
            self._idle = trio.Event()
            await self._idle.wait()

    def resume(self) -> None:
        self.paused = False
        self._resumed.set()
