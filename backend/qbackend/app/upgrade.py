"""`qbackend upgrade`: a running `qbackend serve` hands everything it serves
to a new qbackend process (the code installed now), and exits; QEMU never
sees a socket close.

The old process (QMP ``upgrade``, from `qbackend upgrade` or any client):
1. checks that every part can be handed over (a user device without the
   state hooks cannot: refused with one line naming it, nothing changes);
2. starts the new process (`python -m qbackend takeover --fd N`, the same
   Python, working directory, stdout and stderr), with one end of a socket
   pair;
3. pauses every part (`Part.pause`): listeners stop accepting (clients that
   connect meanwhile wait in the backlog), each connection stops at a
   message boundary with no request half-served, exports are flushed;
4. writes the state (`Part.save`: JSON, fds by index, SCM_RIGHTS; see
   qbackend.plumbing.handover) and waits for the new process to say it
   serves;
5. on "ready", answers the QMP command and exits at once (os._exit: no
   clean-up, which would remove sockets or write images the new process
   owns now).  On anything else (an error, the new process dying, no
   answer within TIMEOUT) it stops the new process, resumes every part and
   serves on as before: the upgrade failed, nothing was lost.

The new process rebuilds the backend from the state's description (the
options each device and export was made with, by the same `Backend.add_*`
methods as the command line or QMP used), lets each part adopt its
listener and connections (`Part.adopt`), starts serving, and says "ready".

A part (a server) hands over with four methods:

    async pause() -> None
        accept nothing more and stop every connection where no request is
        half-served; after it returns, the part touches no socket, ring,
        image or guest memory until resume()
    async resume() -> None
        the hand-over failed: serve on as before pause()
    save(saver: Saver) -> State
        after pause(): a JSON-able description of the listener and every
        connection (fds through saver.fd), enough for a part made from the
        same options in a new process to carry on
    adopt(state: State, loader: Loader) -> None
        in the new process, on a part made from the same options, before it
        serves: take the listener and connections; serving then goes on
        from where the old process stopped
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, NoReturn, Protocol

import trio

from qbackend.plumbing.handover import (
    HandoverError,
    Loader,
    Saver,
    State,
    recv_json,
    send_json,
    send_state,
    socket_pair,
)

if TYPE_CHECKING:
    from qbackend.app.service import Backend

log = logging.getLogger(__name__)

TIMEOUT = 60.0  # seconds for the new process to take over before the old one resumes
EXIT_AFTER = 0.5  # seconds the old process waits for its last QMP reply to leave


class Part(Protocol):
    """A server that hands over (see the module doc)."""

    async def pause(self) -> None: ...

    async def resume(self) -> None: ...

    def save(self, saver: Saver) -> State: ...

    def adopt(self, state: State, loader: Loader) -> None: ...


class UpgradeRefused(HandoverError):
    """Something served here cannot be handed over: nothing was changed."""


def start_new_process(theirs_fd: int) -> subprocess.Popen[bytes]:
    """The new qbackend, with the same Python and working directory; its output goes where ours does."""
    cmd = [sys.executable, "-m", "qbackend", "takeover", "--fd", str(theirs_fd)]
    return subprocess.Popen(cmd, pass_fds=[theirs_fd], stdin=subprocess.DEVNULL)


async def hand_over(parts: dict[str, Part], describe: Callable[[], State], *,
                    timeout: float = TIMEOUT) -> tuple[int, float]:
    """Hand `parts` (with the backend's description, `describe()` once they are paused, so
    that nothing changes it meanwhile) to a new process; its PID once it serves, and how
    long the parts were paused.  Raises HandoverError, with every part
    serving again, when it fails."""
    mine, theirs = socket_pair()
    started = time.monotonic()
    try:
        proc = start_new_process(theirs.fileno())
    except OSError as exc:
        mine.close()
        theirs.close()
        raise HandoverError(f"cannot start the new process: {exc}") from None
    theirs.close()
    paused: list[Part] = []
    paused_at = time.monotonic()
    try:
        with trio.fail_after(timeout):
            # Nothing pauses before the new process has started and imported what it needs:
            # the guest's stall is the hand-over itself, not Python's start-up.
            hello = await trio.to_thread.run_sync(recv_json, mine, abandon_on_cancel=True)
            if not isinstance(hello, dict) or hello.get("hello") != proc.pid:
                raise HandoverError(f"the new process did not start: {hello!r}")
            paused_at = time.monotonic()
            for part in parts.values():
                paused.append(part)
                await part.pause()
            saver = Saver()
            state = {"backend": describe(), "parts": {name: part.save(saver) for name, part in parts.items()}}
            await trio.to_thread.run_sync(send_state, mine, state, saver.fds)
            answer = await trio.to_thread.run_sync(recv_json, mine, abandon_on_cancel=True)
        if not isinstance(answer, dict) or answer.get("ready") != proc.pid:
            error = answer.get("error") if isinstance(answer, dict) else None
            raise HandoverError(f"the new process could not take over: {error or answer!r}")
        # From here on the new process serves: this one never resumes.
        send_json(mine, {"go": True})
    except BaseException as exc:
        proc.kill()
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(proc.wait)
            for part in reversed(paused):
                try:
                    await part.resume()
                except Exception:
                    log.exception("upgrade: resuming after the failed hand-over")
        mine.close()
        if isinstance(exc, trio.TooSlowError):
            raise HandoverError(f"the new process did not take over within {timeout:g} s") from None
        if isinstance(exc, OSError):
            raise HandoverError(f"the hand-over failed: {exc}") from None
        raise
    paused_for = time.monotonic() - paused_at
    log.info("upgrade: PID %d serves now (%.3f s in all, paused %.3f s)", proc.pid, time.monotonic() - started,
             paused_for)
    mine.close()
    return proc.pid, paused_for


def take_over(fd: int) -> tuple[Backend, Loader]:
    """The new process: take the state from the hand-over socket `fd`, make the backend
    again, adopt every part, say "ready", and once the old process says "go", return
    the backend for the caller to run (the loader's unclaimed fds are closed once it
    runs).  Before "go" nothing has been read from any socket, so a failure here
    leaves the old process serving: this process then exits at once."""
    from qbackend.app.backend_state import adopt_parts, rebuild
    from qbackend.plumbing.handover import adopt_socket, recv_state

    sock = adopt_socket(fd)
    sock.setblocking(True)
    send_json(sock, {"hello": os.getpid()})  # imported: the old process may pause now
    try:
        state, fds = recv_state(sock)
        loader = Loader(fds)
        backend = rebuild(state["backend"])
        adopt_parts(backend, state["parts"], loader)
    except Exception as exc:
        from qbackend.errors import QbackendError

        if isinstance(exc, (OSError, QbackendError, HandoverError)):  # what the old process's state asks cannot be
            log.error("upgrade: cannot take over: %s", exc)
        else:
            log.exception("upgrade: cannot take over")
        try:
            send_json(sock, {"error": str(exc) or type(exc).__name__})
        except OSError:
            pass
        exit_now(1)  # nothing of what was adopted may be closed or removed by a clean-up
    send_json(sock, {"ready": os.getpid()})
    try:
        answer = recv_json(sock)
    except HandoverError:
        answer = None
    if answer != {"go": True}:
        exit_now(1)  # the old process serves on
    sock.close()
    return backend, loader


def exit_now(code: int = 0) -> NoReturn:
    """The old process's end after a hand-over: nothing of it may run any more."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
