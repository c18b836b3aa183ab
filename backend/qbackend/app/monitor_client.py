"""The client side of qbackend's QMP monitor, for `qbackend dimm | pci |
ivshmem`: qemu.qmp through the one bridge (`qbackend.machine.qmp`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from qbackend.errors import ControlError
from qbackend.machine.qmp import QmpError, QmpTimeout, SyncQmp


class MonitorClosed(ControlError):
    """qbackend closed its monitor while a command waited for an event: it stopped
    (a 'qbackend run' stops when its QEMU ends)."""


@contextmanager
def monitor(path: Path, timeout: float = 10.0) -> Iterator[SyncQmp]:
    """A negotiated QMP connection to a running qbackend; ControlError if there is none."""
    hint = "is 'qbackend run' or 'qbackend serve --control PATH' running?"
    if not path.is_socket():
        raise ControlError(f"cannot reach qbackend at {path}: {'not a socket' if path.exists() else 'no such socket'}"
                           f" ({hint})")
    try:
        qmp = SyncQmp(path, timeout=timeout)
    except QmpError as exc:
        raise ControlError(f"cannot reach qbackend at {path}: {exc} ({hint})") from None
    try:
        yield qmp
    except MonitorClosed as exc:
        log = path.parent / "qemu.log"  # beside the monitor in a run directory
        if log.exists():
            raise MonitorClosed(f"{exc}; see {log}") from None
        raise
    finally:
        try:
            qmp.close()
        except QmpError:
            pass


def call(qmp: SyncQmp, cmd: str, args: dict[str, Any] | None = None, timeout: float = 60.0) -> Any:
    """Run a command; its error reply becomes a ControlError with QEMU's words."""
    try:
        return qmp.execute(cmd, args or {}, timeout=timeout)
    except QmpError as exc:
        raise ControlError(exc.desc or str(exc)) from None


def wait_outcome(qmp: SyncQmp, names: tuple[str, ...], data: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The first event of one of ``names`` whose data holds ``data``; ControlError after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        try:
            event = qmp.next_event(None, data=data, timeout=max(left, 0.001))
        except QmpTimeout:
            raise ControlError(f"no {' or '.join(names)} within {timeout:g} s") from None
        except QmpError:
            raise MonitorClosed(f"qbackend closed its monitor while waiting for {' or '.join(names)}: it "
                                "stopped, or its QEMU ended (a 'qbackend run' says how)") from None
        if event.get("event") in names:
            return event
