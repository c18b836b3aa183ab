"""Replay a recorded trace (qbackend.vfio.trace) against a device class,
without QEMU or a guest: a booted-guest run becomes a test of milliseconds.

    from qbackend.devices.replay import replay
    result = replay("edu.trace", Edu)          # the trace's own constructor keys
    assert result.same, result.divergence      # "event 212 (read): expected ..., came ..."

The guest's side is fed in the recorded order: accesses to BARs and config
space, resets, connects and disconnects, SET_IRQS (fresh eventfds in place
of QEMU's, so that `irq_mode` says what it said), and to each `dma_read`
the bytes guest memory gave it then.  The device's side is compared with
the recording: each read's value, each interrupt raised (its vector) or
lowered, each DMA's address, length and (written) data, each deferred job's
end.  The first difference is the result: its event number `n` in the
trace, what was expected and what came.

What replay promises about time, for devices that do work of their own:

- An output made while the device handled an input (in `bar_write`,
  `reset`, ...) must come during that input, in the recorded order; one
  missing is reported when the replay reaches it, without waiting.
- A job given to `defer` runs in a thread of its own, as when served, but
  in step with the trace: each time it takes the device's lock (and at
  each of its DMAs and interrupts) it waits until the replay has reached
  its next recorded event.  So the guest's reads that the recording had
  before a job's step see the state before that step, and the ones after
  see it after: a job that changes state under the lock and then raises
  its interrupt (edu's DMA) replays exactly.  Work a job does outside the
  lock is not ordered against the guest's reads; keep state the guest
  reads under the lock.
- Before feeding the next input, replay waits (up to `timeout` seconds,
  default 5) for the outputs the recording had before it; one that does
  not come by then is the divergence ("came: nothing").
- Outputs from threads a device starts itself (timers, pollers) are waited
  for the same way, each thread's in its recorded order, but their timing
  against the guest's inputs is not reproduced: a read racing with such a
  thread may diverge.  Give such work to `defer` to replay it in step.

`qbackend replay TRACE [class=MODULE:CLASS[,KEY=VALUE...]]` exits 0 when the
device did the same, 1 at a divergence, 2 on a usage error (as qemu-img
compare does).
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from qbackend.devices.api import Device, UserFunction, function_of
from qbackend.errors import UsageError
from qbackend.protocol.vfio_user import IrqSetFlags, RequestError, SetIrqs
from qbackend.vfio.trace import (
    INPUTS,
    OUTPUTS,
    Event,
    Hooks,
    access_data,
    access_fields,
    current_job,
    load,
    region_number,
)

DEFAULT_TIMEOUT = 5.0  # seconds to wait for an output a job or thread of the device's owes
SYNC = "input"  # the source of outputs made while an input is handled


@dataclass(frozen=True)
class Divergence:
    """Where the device did otherwise than the recording."""

    event: int  # the recorded event's number `n`
    kind: str  # its "ev"
    expected: str
    got: str

    def __str__(self) -> str:
        return f"event {self.event} ({self.kind}): expected {self.expected}; came {self.got}"


@dataclass(frozen=True)
class ReplayResult:
    events: int  # events of the trace replayed (all of them when the same)
    seconds: float
    divergence: Divergence | None

    @property
    def same(self) -> bool:
        return self.divergence is None

    def __str__(self) -> str:
        if self.divergence is None:
            return f"same: {self.events} events in {self.seconds * 1000:.1f} ms"
        return f"diverged at {self.divergence}"


def describe(event: Event | None) -> str:
    """An event as a divergence report shows it."""
    if event is None:
        return "nothing"
    ev = event["ev"]
    if ev in ("read", "write"):
        value = f"{event['value']:#x}" if "value" in event else f"{event.get('data', '')[:32]}..."
        if event.get("refused"):
            value = "refused"
        return f"{ev} {event['region']}+{event['offset']:#x} size {event['size']}: {value}"
    if ev == "irq":
        return f"irq vector {event['vector']}"
    if ev in ("dma-read", "dma-write"):
        data = f" data {event['data'][:32]}{'...' if len(event.get('data', '')) > 32 else ''}" \
            if ev == "dma-write" else ""
        return f"{ev} {event['size']} bytes at {event['address']:#x}{data}"
    if ev == "job":
        return f"end of job {event.get('fn', '?')}"
    return str(ev)


def source_of(event: Event) -> str:
    if "job" in event:
        return f"job {event['job']}"
    if "thread" in event:
        return f"thread {event['thread']}"
    return SYNC


def _same_output(expected: Event, got: Event) -> bool:
    if expected["ev"] != got["ev"]:
        return False
    keys = {"irq": ("vector",), "irq-lower": (), "dma-read": ("address", "size"),
            "dma-write": ("address", "size", "data"), "job": ("fn",)}[expected["ev"]]
    return all(expected.get(k) == got.get(k) for k in keys)


class _Diverged(Exception):
    pass


class _Replayer(Hooks):
    """The hooks a replayed device calls, and the checks of what it does."""

    def __init__(self, events: list[Event], timeout: float) -> None:
        self.events = events
        self.timeout = timeout
        self.cond = threading.Condition()
        self.position = 0  # the trace event replay is at
        self.divergence: Divergence | None = None
        self.done = False
        self.produced: set[int] = set()  # recorded outputs the device has made
        self.expected: dict[str, deque[Event]] = defaultdict(deque)  # recorded outputs by source, in order
        self.owner: dict[int, int] = {}  # an input's output -> that input's n
        self.current_input = 0
        self.main = threading.get_ident()
        self._jobs = 0
        owner = 0
        for event in events:
            if event["ev"] in INPUTS:
                owner = event["n"]
            elif event["ev"] in OUTPUTS:
                self.expected[source_of(event)].append(event)
                self.owner[event["n"]] = owner

    # -- the device's side -------------------------------------------------------------

    def _source(self) -> str:
        job = current_job()
        if job is not None:
            return f"job {job}"
        if threading.get_ident() == self.main:
            return SYNC
        return f"thread {threading.current_thread().name}"

    def diverge(self, divergence: Divergence) -> None:
        with self.cond:
            if self.divergence is None:
                self.divergence = divergence
            self.done = True
            self.cond.notify_all()

    def gate(self, source: str) -> None:
        """A job waits until the replay reaches its next recorded event."""
        if not source.startswith("job "):
            return
        with self.cond:
            while not self.done:
                queue = self.expected.get(source)
                if not queue or self.position >= queue[0]["n"]:
                    return
                self.cond.wait()

    def _output(self, got: Event) -> Event | None:
        """Check one output against the recording; the recorded event it matched."""
        source = self._source()
        self.gate(source)
        with self.cond:
            if self.done:
                return None
            queue = self.expected.get(source)
            expected = queue[0] if queue else None
            if source == SYNC and expected is not None and self.owner[expected["n"]] != self.current_input:
                expected = None  # the recording's next one belongs to a later input
            if expected is None:
                where = self.current_input if source == SYNC else self.position
                self.divergence = Divergence(where, self.events[where]["ev"] if where < len(self.events) else "",
                                             f"no further output from {source}", describe(got))
            elif not _same_output(expected, got):
                self.divergence = Divergence(expected["n"], expected["ev"], describe(expected), describe(got))
            else:
                assert queue is not None
                queue.popleft()
                self.produced.add(expected["n"])
                self.cond.notify_all()
                return expected
            self.done = True
            self.cond.notify_all()
            return None

    def irq(self, vector: int, mode: str, sent: bool) -> bool:
        matched = self._output({"ev": "irq", "vector": vector})
        return bool(matched["sent"]) if matched is not None and "sent" in matched else sent

    def irq_lower(self) -> None:
        self._output({"ev": "irq-lower"})

    def dma_read(self, address: int, count: int, read: Callable[[], bytes]) -> bytes:
        matched = self._output({"ev": "dma-read", "address": address, "size": count})
        if matched is None:
            return bytes(count)  # diverged: the replay ends; the job goes on with zeros
        return bytes.fromhex(matched["data"])

    def dma_write(self, address: int, data: bytes, write: Callable[[], None]) -> None:
        self._output({"ev": "dma-write", "address": address, "size": len(data), "data": data.hex()})

    def next_job(self) -> int | None:
        self._jobs += 1
        return self._jobs

    def job_ended(self, job: int | None, fn: str) -> None:
        self._output({"ev": "job", "fn": fn})

    # -- the guest's side ---------------------------------------------------------------

    def wait_produced(self, event: Event, deadline: float) -> bool:
        with self.cond:
            while event["n"] not in self.produced and not self.done:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
            return event["n"] in self.produced

    def advance(self, n: int) -> None:
        with self.cond:
            self.position = n
            self.cond.notify_all()


class _GatedLock:
    """The device's lock in replay: a deferred job waits at its outermost acquire
    until the replay has reached the job's next recorded event."""

    def __init__(self, replayer: _Replayer) -> None:
        self._lock = threading.RLock()
        self._replayer = replayer
        self._depth = threading.local()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if not getattr(self._depth, "n", 0):
            self._replayer.gate(self._replayer._source())
        held = self._lock.acquire(blocking, timeout)
        if held:
            self._depth.n = getattr(self._depth, "n", 0) + 1
        return held

    def release(self) -> None:
        self._depth.n -= 1
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def replay(trace: str | Path | list[Event], device_class: type[Device], *, timeout: float = DEFAULT_TIMEOUT,
           **kwargs: str) -> ReplayResult:
    """Replay `trace` (a file, or the events `vm.trace` gave) against a new
    `device_class(**kwargs)` (no keys given: the ones the trace recorded).
    Raises UsageError for a file that is no trace."""
    events = load(trace)
    header = events[0]
    args = kwargs or {str(k): str(v) for k, v in (header.get("args") or {}).items()}
    started = time.monotonic()
    device = device_class(**args)
    function = function_of(device)
    replayer = _Replayer(events, timeout)
    function.lock = _GatedLock(replayer)
    function.tracer = replayer
    replayed = 0
    try:
        for event in events[1:]:
            if replayer.done:
                break
            ev, n = event["ev"], event["n"]
            if ev in INPUTS:
                _outputs_before(replayer, events, n)
                if replayer.done:
                    break
                replayer.advance(n)
                with replayer.cond:
                    replayer.current_input = n
                _feed(replayer, function, event)
            elif ev in OUTPUTS:
                replayer.advance(n)
                if source_of(event) == SYNC:
                    if n not in replayer.produced and not replayer.done:
                        replayer.diverge(Divergence(n, ev, describe(event), "nothing"))
                elif not replayer.wait_produced(event, time.monotonic() + timeout) and not replayer.done:
                    replayer.diverge(Divergence(n, ev, describe(event), f"nothing within {timeout:g} s"))
            replayed += 1
        if not replayer.done:
            _outputs_before(replayer, events, events[-1]["n"] + 1)
    finally:
        with replayer.cond:
            replayer.done = True
            replayer.cond.notify_all()
        function.irqs.close()
        function.close()
    return ReplayResult(replayed, time.monotonic() - started, replayer.divergence)


def _outputs_before(replayer: _Replayer, events: list[Event], n: int) -> None:
    """Wait for the outputs recorded before event `n` that jobs and threads owe."""
    deadline = time.monotonic() + replayer.timeout
    for event in events:
        if event["n"] >= n or replayer.done:
            return
        if event["ev"] in OUTPUTS and event["n"] not in replayer.produced:
            replayer.advance(max(replayer.position, event["n"]))
            if not replayer.wait_produced(event, deadline) and not replayer.done:
                replayer.diverge(Divergence(event["n"], event["ev"], describe(event),
                                            f"nothing within {replayer.timeout:g} s"))
                return


def _feed(replayer: _Replayer, function: UserFunction, event: Event) -> None:
    """One input, as the server gives it (under the device's lock)."""
    ev, n = event["ev"], event["n"]
    with function.lock:
        if ev == "read":
            region, offset, size = region_number(event), int(event["offset"]), int(event["size"])
            try:
                data = function.read(region, offset, size)
            except RequestError:
                if not event.get("refused"):
                    replayer.diverge(Divergence(n, ev, describe(event), "the read refused"))
                return
            got = {"ev": "read", **access_fields(region, offset, data)}
            if event.get("refused") or access_data(event) != data:
                replayer.diverge(Divergence(n, ev, describe(event), describe(got)))
        elif ev == "write":
            try:
                function.write(region_number(event), int(event["offset"]), access_data(event))
            except RequestError:
                pass  # refused when recorded too: an access outside the region
        elif ev == "reset":
            function.reset()
        elif ev == "connect":
            function.client_connected()
        elif ev == "disconnect":
            function.client_disconnected()
        elif ev == "set-irqs":
            flags = IrqSetFlags(int(event["flags"]))
            fds = tuple(os.eventfd(0, os.EFD_CLOEXEC) for _ in range(int(event.get("fds", 0))))
            request = SetIrqs(flags, int(event["index"]), int(event["start"]), int(event["count"]),
                              bytes.fromhex(event.get("bools", "")))
            try:
                unused = function.irqs.set_irqs(request, fds)
            except RequestError:
                unused = list(fds)
            for fd in unused:
                os.close(fd)


def main_args(trace: str, spec: str | None) -> tuple[list[Event], str, dict[str, str]]:
    """What `qbackend replay TRACE [class=...,KEY=VALUE]` replays: the events, the class's
    spec (MODULE:CLASS, for the command line to load), the keys."""
    from qbackend.options import parse_keyval

    events = load(trace)
    kv: dict[str, str] = parse_keyval(spec, "replay") if spec else {}
    cls_spec = kv.pop("class", None) or events[0].get("class")
    if not cls_spec:
        raise UsageError("replay: the trace names no class: give class=MODULE:CLASS")
    kv.pop("trace", None)
    kv.pop("stall", None)
    return events, str(cls_spec), kv


__all__ = ["DEFAULT_TIMEOUT", "Divergence", "ReplayResult", "replay"]
