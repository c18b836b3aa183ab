"""A user's device that misbehaves is reported, never fatal.

A `qbackend.devices.Device`'s callbacks are the user's code, and what goes
wrong in them is the device's, not the server's:

- a callback that raises (`bar_read`, `bar_write`, `reset`, `connected`,
  `disconnected`, a job given to `defer`), or a `bar_read` whose value
  does not fit its access (not an int, negative, wider than its size), is
  a *fault*: the access is answered as if nothing were there (a read gets
  all ones of its size, a write is dropped), the device stays connected,
  and the fault is counted and logged with the device's id, the access and
  the user's traceback (qbackend's frames above it left out), once per
  place (the file and line that raised; later faults there are counted);
- a callback still running after `DeviceFaults.stall_after` seconds
  (default `STALL_AFTER`, a second, well under the 5 s QEMU waits for a
  reply) is a *stall*: its current stack is logged, once per stuck call,
  by a watcher thread that looks at the stacks of the threads in
  callbacks (`sys._current_frames`), so a callback costs nothing to watch.

Each `UserFunction` has a `DeviceFaults` (``function_of(device).faults``):
the counts (`faults`, `stalls`), the latest events (`events`, each a
`Fault` whose `report` is what the log said) and, when asked for with
`record_accesses`, a ring of the device's latest BAR accesses.  The pytest
plugin reads them to fail the test during which a device faulted.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, FrameType, TracebackType
from typing import NamedTuple

log = logging.getLogger(__name__)

STALL_AFTER = 1.0  # seconds a callback may run before its stack is logged
EVENTS_KEPT = 32  # faults and stalls kept per device for the pytest plugin
PLACES_KEPT = 256  # distinct places whose traceback is remembered per device
ACCESSES_KEPT = 32  # the ring of recent accesses, when recorded

_OURS = frozenset({__file__, str(Path(__file__).with_name("api.py"))})  # frames left out of tracebacks

# The code objects of qbackend's frames that call a device's callbacks
# (api.py registers them): the watcher finds a call in progress by finding
# one of them on a thread's stack; the frames inside it are the user's.
CALLERS: set[CodeType] = set()


@dataclass(frozen=True)
class Fault:
    """One fault or stall of a device, as logged."""

    seq: int  # the device's count of events so far, this one included
    device: str
    kind: str  # "raised", "bad value" or "stalled"
    call: str  # "bar_read(bar=0, offset=0x10, size=4)", "reset()", ...
    place: str  # "path/to/file.py:12", where it raised (or the innermost frame of a stall)
    report: str  # the headline and the traceback (or stack)

    def __str__(self) -> str:
        return self.report


class Access(NamedTuple):
    """A BAR access in the ring of recent accesses (`DeviceFaults.accesses`)."""

    op: str  # "read" or "write"
    bar: int
    offset: int
    size: int
    value: int | None  # what was read or written; None: the callback faulted

    def __str__(self) -> str:
        value = "fault" if self.value is None else f"{self.value:#0{2 + 2 * self.size}x}"
        return f"{self.op:<5} bar{self.bar} {self.offset:#07x} size {self.size}: {value}"


class _Call:
    """A callback in progress as the watcher saw it: the frame of its caller."""

    __slots__ = ("callback", "caller", "reported", "since")

    def __init__(self, caller: FrameType, callback: str, since: float) -> None:
        self.caller = caller
        self.callback = callback
        self.since = since
        self.reported = False


class DeviceFaults:
    """One device's faults, stalls and (when recorded) recent accesses."""

    def __init__(self, name: Callable[[], str]) -> None:
        self._name = name
        self.faults = 0
        self.stalls = 0
        self.seq = 0  # faults + stalls
        self.events: deque[Fault] = deque(maxlen=EVENTS_KEPT)
        self.stall_after = STALL_AFTER
        self.accesses: deque[Access] | None = None  # see record_accesses
        self._places: dict[tuple[str, str, int], str] = {}  # (kind, file, line) -> traceback text
        self._lock = threading.Lock()
        self._threads: dict[int, int] = {}  # thread ident -> nesting: threads that may run callbacks
        self._calls: dict[int, _Call] = {}  # the watcher's view, by thread ident

    @property
    def name(self) -> str:
        return self._name()

    # -- what the adapter reports ----------------------------------------------------

    def read_raised(self, exc: Exception, bar: int, offset: int, size: int) -> bytes:
        """bar_read raised: report it; the bytes to answer (all ones)."""
        self.raised(exc, f"bar_read(bar={bar}, offset={offset:#x}, size={size})", "the read answered all ones")
        return b"\xff" * size

    def write_raised(self, exc: Exception, bar: int, offset: int, size: int, value: int) -> None:
        self.raised(exc, f"bar_write(bar={bar}, offset={offset:#x}, size={size}, value={value:#x})",
                    "the write was dropped")

    def bad_value(self, bar_read: Callable[..., object], value: object, bar: int, offset: int, size: int) -> bytes:
        """bar_read returned `value`, which does not fit the access: report it; all ones."""
        call = f"bar_read(bar={bar}, offset={offset:#x}, size={size})"
        shown = f"{value:#x}" if isinstance(value, int) else repr(value)[:80]
        code: CodeType | None = getattr(getattr(bar_read, "__func__", bar_read), "__code__", None)
        place = (code.co_filename, code.co_firstlineno) if code is not None else ("<bar_read>", 0)
        headline = (f"{self.name}: {call} returned {shown}, which is not a {size}-byte value (an int from 0 to "
                    f"{(1 << 8 * size) - 1:#x}), at {place[0]}:{place[1]}; the read answered all ones")
        self._record("bad value", call, place, headline, lambda: "")
        return b"\xff" * size

    def raised(self, exc: BaseException, call: str, outcome: str) -> None:
        """A callback raised `exc` (caught by qbackend's frame that called it)."""
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename in _OURS:
            tb = tb.tb_next
        place = _raising_place(tb)
        headline = (f"{self.name}: {call} raised {type(exc).__name__}: {exc} at {place[0]}:{place[1]}; "
                    f"{outcome}")
        self._record("raised", call, place, headline, lambda: _user_traceback(exc, tb))

    def _record(self, kind: str, call: str, place: tuple[str, int], headline: str,
                detail: Callable[[], str]) -> None:
        key = (kind, *place)
        with self._lock:
            self.faults += 1
            self.seq += 1
            text = self._places.get(key)
            first = text is None
            if text is None:
                text = detail()
                if len(self._places) < PLACES_KEPT:
                    self._places[key] = text
            fault = Fault(self.seq, self.name, kind, call, f"{place[0]}:{place[1]}",
                          f"{headline}\n{text}" if text else headline)
            self.events.append(fault)
        if first:
            log.error("%s\n(fault %d of this device; later faults at %s:%d are counted, not logged)",
                      fault.report.rstrip("\n"), fault.seq, *place)

    # -- stalls --------------------------------------------------------------------

    def watch(self) -> None:
        """The calling thread may run this device's callbacks from now on (until unwatch)."""
        ident = threading.get_ident()
        with self._lock:
            self._threads[ident] = self._threads.get(ident, 0) + 1
        _Watcher.add(self)

    def unwatch(self, ident: int | None = None) -> None:
        """The end of one watch() of the calling thread (or of thread `ident`)."""
        ident = threading.get_ident() if ident is None else ident
        with self._lock:
            n = self._threads.get(ident, 0) - 1
            if n > 0:
                self._threads[ident] = n
            else:
                self._threads.pop(ident, None)

    def _check(self, frames: dict[int, FrameType], now: float) -> None:
        """The watcher's look at this device's threads: report calls running too long."""
        with self._lock:
            threads = list(self._threads)
        for ident in threads:
            found = _in_callback(frames.get(ident))
            seen = self._calls.get(ident)
            if seen is not None and (found is None or found[0] is not seen.caller):  # that call has ended
                del self._calls[ident]
                if seen.reported:
                    log.warning("%s: the stuck callback has returned (after about %.1f s)", self.name, now - seen.since)
                seen = None
            if found is None:
                continue
            if seen is None:
                self._calls[ident] = _Call(found[0], found[1][0].f_code.co_name if found[1] else "?", now)
                continue
            if not seen.reported and now - seen.since >= self.stall_after:
                seen.reported = True
                self._stalled(found[1], now - seen.since)
        for ident in [i for i in self._calls if i not in threads]:  # no longer serving this device
            if self._calls.pop(ident).reported:
                log.warning("%s: the stuck callback has returned", self.name)

    def _stalled(self, frames: list[FrameType], seconds: float) -> None:
        callback = frames[0].f_code.co_name if frames else "a callback"
        inner = frames[-1] if frames else None
        place = f"{inner.f_code.co_filename}:{inner.f_lineno}" if inner is not None else "?"
        stack = "".join(traceback.StackSummary.extract((f, f.f_lineno) for f in frames).format())
        report = (f"{self.name}: {callback} has been running for {seconds:.1f} s (more than {self.stall_after:g} s: "
                  f"stuck?); QEMU gives up on the access after 5 s and the guest reads all ones.  Its stack, most "
                  f"recent call last:\n{stack}")
        with self._lock:
            self.stalls += 1
            self.seq += 1
            fault = Fault(self.seq, self.name, "stalled", f"{callback}()", place, report)
            self.events.append(fault)
        log.error("%s", report)

    # -- for tests and reports ---------------------------------------------------------

    def record_accesses(self, keep: int = ACCESSES_KEPT) -> None:
        """Keep the latest `keep` BAR accesses in `accesses` (off by default: it costs a
        little on every access); the device's UserFunction switches its regions over."""
        self.accesses = deque(maxlen=keep)

    def since(self, seq: int) -> list[Fault]:
        """The events kept whose seq is above `seq` (oldest first)."""
        with self._lock:
            return [f for f in self.events if f.seq > seq]

    def counts(self) -> dict[str, int]:
        return {"faults": self.faults, "stalls": self.stalls}


def calls_in_progress(longer_than: float) -> list[str]:
    """The devices' callbacks that the stall watcher has seen running for more than
    `longer_than` seconds: "dev0: bar_read, 3.2 s"."""
    now = time.monotonic()
    out = []
    for faults in list(_Watcher._devices):
        for call in list(faults._calls.values()):
            if now - call.since > longer_than:
                out.append(f"{faults.name}: {call.callback}, {now - call.since:.1f} s")
    return out


def _raising_place(tb: TracebackType | None) -> tuple[str, int]:
    if tb is None:
        return ("<qbackend>", 0)
    while tb.tb_next is not None:
        tb = tb.tb_next
    return (tb.tb_frame.f_code.co_filename, tb.tb_lineno)


def _user_traceback(exc: BaseException, tb: TracebackType | None) -> str:
    return "".join(traceback.format_exception(type(exc), exc, tb))


def _in_callback(frame: FrameType | None) -> tuple[FrameType, list[FrameType]] | None:
    """Whether `frame`'s stack is inside a device callback: (the caller's frame, the
    frames below it, outermost first), else None."""
    inner: list[FrameType] = []
    while frame is not None:
        if frame.f_code in CALLERS:
            inner.reverse()
            return frame, inner
        inner.append(frame)
        frame = frame.f_back
    return None


class _Watcher:
    """The one thread that looks for stuck callbacks, started with the first watched device."""

    _devices: weakref.WeakSet[DeviceFaults] = weakref.WeakSet()
    _thread: threading.Thread | None = None
    _start = threading.Lock()

    @classmethod
    def add(cls, faults: DeviceFaults) -> None:
        if faults in cls._devices and cls._thread is not None:
            return
        with cls._start:
            cls._devices.add(faults)
            if cls._thread is None:
                cls._thread = threading.Thread(target=cls._run, name="qbackend-stall-watch", daemon=True)
                cls._thread.start()

    @classmethod
    def _run(cls) -> None:
        while True:
            devices = list(cls._devices)
            period = min([0.25, *(d.stall_after / 4 for d in devices)])
            time.sleep(max(period, 0.01))
            frames = sys._current_frames()
            now = time.monotonic()
            for faults in devices:
                try:
                    faults._check(frames, now)
                except Exception:  # the watcher must outlive any surprise
                    log.exception("%s: looking for a stuck callback failed", faults.name)
            del frames

