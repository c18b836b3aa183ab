"""Traces of a served device: every access, interrupt, DMA and lifecycle event.

A trace is JSON lines, one event per line, in the order they happened
(``n`` counts them; ``t`` is seconds since the trace began, from a
monotonic clock).  Format version 1:

- ``{"n": 0, "t": 0, "ev": "trace", "version": 1, "device": ID, "class":
  SPEC, "args": {KEY: VALUE}, "started": ISO-8601}``: the first line
  (``class`` and ``args`` for a user device: what replay constructs).
- Inputs, what the guest (through QEMU) did:
  ``{"ev": "read", "region": R, "offset": O, "size": S, "value": V}``
  (R is ``"bar0"``..``"bar5"``, ``"rom"``, ``"config"``; ``value`` the
  little-endian integer read, or ``"data"``, hex bytes, for an access of
  more than 8 bytes); ``{"ev": "write", ...}`` likewise with what was
  written; ``{"ev": "reset"}``; ``{"ev": "connect"}``;
  ``{"ev": "disconnect"}``; ``{"ev": "set-irqs", "index": I, "flags": F,
  "start": S, "count": C, "fds": K, "bools": HEX}`` (SET_IRQS: which
  interrupts QEMU gave eventfds, so what `irq_mode` says).
- Outputs, what the device did (a `qbackend.devices.Device`):
  ``{"ev": "irq", "vector": V, "mode": M, "sent": B}`` (`raise_irq`; M the
  mode it went by, B what `raise_irq` returned); ``{"ev": "irq-lower"}``;
  ``{"ev": "dma-read", "address": A, "size": S, "data": HEX}`` (the data is
  what guest memory gave: an input of replay); ``{"ev": "dma-write",
  "address": A, "data": HEX}``; ``{"ev": "job", "fn": NAME}``: a job given
  to `defer` ended.
- ``{"ev": "reload", "class": SPEC}``: the device was reloaded
  (qbackend.devices.reload); ``{"ev": "end", "events": N, "dropped": D}``:
  the last line, written when the trace stops.

Where an output came from: an output made while the device handled an
input (inside `bar_write`, `reset`, ...) has no tag: it belongs to the
input before it.  One made by a deferred job carries ``"job": K`` (the
K-th job deferred since the trace began); one made by a thread of the
device's own carries ``"thread": NAME``.  Replay (qbackend.devices.replay)
relies on these tags.

Bounds: a trace file grows only while the trace runs (`device-trace-stop`,
or the end of qbackend, closes it); a trace kept in memory (the pytest
plugin's ``vm.trace``) keeps the latest ``keep`` events (default
`MEMORY_EVENTS_KEPT`) and counts the ones it dropped.

Accesses the native access loop would serve (config space reads, plain
memory windows: qbackend.servers.vfio_user_fast) are traced too: while a
device is traced its native loop stands aside and every access takes the
Python path; untraced, nothing is checked on the hot path.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from qbackend.errors import UsageError

if TYPE_CHECKING:
    from qbackend.vfio.function import PciFunction

FORMAT_VERSION = 1
MEMORY_EVENTS_KEPT = 100_000  # events a trace in memory keeps (the latest)

REGION_NAMES = {0: "bar0", 1: "bar1", 2: "bar2", 3: "bar3", 4: "bar4", 5: "bar5", 6: "rom", 7: "config", 8: "vga"}
REGION_NUMBERS = {name: number for number, name in REGION_NAMES.items()}
INPUTS = frozenset({"read", "write", "reset", "connect", "disconnect", "set-irqs"})
OUTPUTS = frozenset({"irq", "irq-lower", "dma-read", "dma-write", "job"})
NOTES = frozenset({"trace", "reload", "end"})  # neither: replay skips them

Event = dict[str, Any]

_local = threading.local()  # .job: the deferred job this thread runs; .inputs: depth of inputs handled


def current_job() -> int | None:
    """The number of the traced deferred job the calling thread runs, if any."""
    job: int | None = getattr(_local, "job", None)
    return job


@contextlib.contextmanager
def running_job(job: int | None) -> Iterator[None]:
    """Mark the calling thread as running deferred job `job` (None: untraced)."""
    before = getattr(_local, "job", None)
    _local.job = job
    try:
        yield
    finally:
        _local.job = before


def access_fields(region: int, offset: int, data: bytes) -> Event:
    fields: Event = {"region": REGION_NAMES.get(region, str(region)), "offset": offset, "size": len(data)}
    if len(data) <= 8:
        fields["value"] = int.from_bytes(data, "little")
    else:
        fields["data"] = data.hex()
    return fields


def access_data(event: Event) -> bytes:
    """The bytes of a read or write event."""
    if "data" in event:
        return bytes.fromhex(event["data"])
    return int(event["value"]).to_bytes(int(event["size"]), "little")


def region_number(event: Event) -> int:
    region = event["region"]
    if region in REGION_NUMBERS:
        return REGION_NUMBERS[region]
    return int(region)


class Hooks:
    """What a traced `PciFunction` calls (a `Tracer` records, replay checks)."""

    def read(self, region: int, offset: int, count: int, read: Callable[[int, int, int], bytes]) -> bytes:
        return read(region, offset, count)

    def write(self, region: int, offset: int, data: bytes, write: Callable[[int, int, bytes], None]) -> None:
        write(region, offset, data)

    def lifecycle(self, ev: str, call: Callable[[], Any], **fields: Any) -> Any:
        return call()

    def irq(self, vector: int, mode: str, sent: bool) -> bool:
        return sent

    def irq_lower(self) -> None:
        pass

    def dma_read(self, address: int, count: int, read: Callable[[], bytes]) -> bytes:
        return read()

    def dma_write(self, address: int, data: bytes, write: Callable[[], None]) -> None:
        write()

    def next_job(self) -> int | None:
        return None

    def job_ended(self, job: int | None, fn: str) -> None:
        pass

    def note(self, ev: str, **fields: Any) -> None:
        pass


class Tracer(Hooks):
    """One device's trace: to a file (JSON lines), in memory (a ring of `keep`), or both."""

    def __init__(self, device: str, *, path: str | Path | None = None, keep: int | None = None,
                 header: Event | None = None) -> None:
        self.device = device
        self.path = Path(path) if path is not None else None
        self._file: IO[str] | None = None
        if self.path is not None:
            try:
                self._file = open(self.path, "w", encoding="utf-8")
            except OSError as exc:
                raise UsageError(f"trace file {self.path}: {exc.strerror}") from None
        self.memory: deque[Event] | None = deque(maxlen=keep or MEMORY_EVENTS_KEPT) if keep is not None or \
            self.path is None else None
        self.count = 0
        self.dropped = 0  # events the memory ring let go of
        self._lock = threading.Lock()
        self._pending: deque[Event] = deque()  # events not yet written: a read's value comes after its outputs
        self._start = time.monotonic()
        self._jobs = itertools.count(1)
        self.closed = False
        self._emit("trace", {"version": FORMAT_VERSION, "device": device, **(header or {}),
                             "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")},
                   complete=True, tag=False)

    # -- recording ---------------------------------------------------------------

    def _emit(self, ev: str, fields: Event, *, complete: bool = True, tag: bool = True) -> Event:
        with self._lock:
            event: Event = {"n": self.count, "t": round(time.monotonic() - self._start, 6), "ev": ev, **fields}
            if tag and not getattr(_local, "inputs", 0):
                job = getattr(_local, "job", None)
                if job is not None:
                    event["job"] = job
                else:
                    event["thread"] = threading.current_thread().name
            if self.closed:
                return event
            self.count += 1
            if self.memory is not None:
                if len(self.memory) == self.memory.maxlen:
                    self.dropped += 1
                self.memory.append(event)
            if self._file is not None:
                if not complete:
                    event["_open"] = True
                self._pending.append(event)
                self._write_ready()
        return event

    def _complete(self, event: Event, fields: Event) -> None:
        with self._lock:
            event.update(fields)
            if event.pop("_open", None) and self._pending and self._pending[0] is event:
                self._write_ready()

    def _write_ready(self) -> None:
        """Under the lock: write the pending events up to the first still open."""
        pending, file = self._pending, self._file
        while pending and "_open" not in pending[0]:
            if file is not None:
                file.write(json.dumps(pending.popleft(), separators=(",", ":")) + "\n")
            else:
                pending.popleft()

    @contextlib.contextmanager
    def _input(self) -> Iterator[None]:
        _local.inputs = getattr(_local, "inputs", 0) + 1
        try:
            yield
        finally:
            _local.inputs -= 1

    # -- hooks ---------------------------------------------------------------------

    def read(self, region: int, offset: int, count: int, read: Callable[[int, int, int], bytes]) -> bytes:
        event = self._emit("read", {}, complete=False, tag=False)
        data = b""
        try:
            with self._input():
                data = read(region, offset, count)
        finally:
            self._complete(event, access_fields(region, offset, data) if data else
                           {"region": REGION_NAMES.get(region, str(region)), "offset": offset, "size": count,
                            "refused": True})
        return data

    def write(self, region: int, offset: int, data: bytes, write: Callable[[int, int, bytes], None]) -> None:
        event = self._emit("write", {}, complete=False, tag=False)
        fields = access_fields(region, offset, data)
        try:
            with self._input():
                write(region, offset, data)
        except Exception:
            fields["refused"] = True
            raise
        finally:
            self._complete(event, fields)

    def lifecycle(self, ev: str, call: Callable[[], Any], **fields: Any) -> Any:
        self._emit(ev, fields, tag=False)
        with self._input():
            return call()

    def irq(self, vector: int, mode: str, sent: bool) -> bool:
        self._emit("irq", {"vector": vector, "mode": mode, "sent": sent})
        return sent

    def irq_lower(self) -> None:
        self._emit("irq-lower", {})

    def dma_read(self, address: int, count: int, read: Callable[[], bytes]) -> bytes:
        data = read()
        self._emit("dma-read", {"address": address, "size": count, "data": data.hex()})
        return data

    def dma_write(self, address: int, data: bytes, write: Callable[[], None]) -> None:
        self._emit("dma-write", {"address": address, "size": len(data), "data": data.hex()})
        write()

    def next_job(self) -> int | None:
        return next(self._jobs)

    def job_ended(self, job: int | None, fn: str) -> None:
        self._emit("job", {"fn": fn})

    def note(self, ev: str, **fields: Any) -> None:
        self._emit(ev, fields, tag=False)

    # -- reading and ending ---------------------------------------------------------

    def events(self) -> list[Event]:
        """The events kept in memory (the latest `keep`), oldest first."""
        with self._lock:
            return [dict(e) for e in self.memory or () if "_open" not in e]

    def close(self) -> dict[str, Any]:
        """End the trace (its last line says how many events it has); what it recorded."""
        with self._lock:
            if self.closed:
                return self.summary()
        self._emit("end", {"events": self.count + 1, "dropped": self.dropped}, tag=False)
        with self._lock:
            self.closed = True
            for event in self._pending:
                event.pop("_open", None)
            self._write_ready()
            if self._file is not None:
                self._file.close()
        return self.summary()

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"device": self.device, "events": self.count, "dropped": self.dropped}
        if self.path is not None:
            out["file"] = str(self.path)
        return out


def start(function: PciFunction, tracer: Tracer) -> None:
    """Trace `function` from now on (one trace at a time): its accesses go through
    `tracer`, and its native access loop stands aside while it does."""
    with function.lock:
        if function.tracer is not None:
            raise UsageError(f"{function.name}: a trace is already running (stop it first)")
        read, write = type(function).read.__get__(function), type(function).write.__get__(function)
        function.accessors[:] = [lambda r, o, c: tracer.read(r, o, c, read),
                                 lambda r, o, d: tracer.write(r, o, d, write)]
        function.tracer = tracer
        function.pause_native(True)


def stop(function: PciFunction) -> dict[str, Any]:
    """Stop `function`'s trace; its summary (events, dropped, file)."""
    with function.lock:
        tracer = function.tracer
        if not isinstance(tracer, Tracer):
            raise UsageError(f"{function.name}: no trace is running")
        function.tracer = None
        function.accessors[:] = [function.read, function.write]
        function.pause_native(False)
    return tracer.close()


def load(source: str | Path | list[Event]) -> list[Event]:
    """A trace's events: from a file of JSON lines, or a list as `Tracer.events` gives.
    Raises UsageError on a file that is no trace (saying which line)."""
    if isinstance(source, list):
        events = source
    else:
        path = Path(source)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror}") from None
        events = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except ValueError as exc:
                raise UsageError(f"{path}:{number}: not JSON: {exc}") from None
            if not isinstance(event, dict) or not isinstance(event.get("ev"), str):
                raise UsageError(f"{path}:{number}: not a trace event (an object with 'ev')")
            events.append(event)
    if not events or events[0].get("ev") != "trace":
        raise UsageError("not a qbackend trace: its first event is not 'trace'")
    if events[0].get("version") != FORMAT_VERSION:
        raise UsageError(f"trace format version {events[0].get('version')}: this qbackend reads {FORMAT_VERSION}")
    return events
