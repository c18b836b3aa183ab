"""Driving the test guest's busybox shell over QEMU's serial-console socket.

The guest's /init (scripts/guest-init) prints ``qbackend-guest: ready`` and
then runs ``sh`` on ttyS0.  `GuestConsole` connects to the unix socket QEMU
serves for that serial port, waits for the ready line, turns off echo and the
prompt, and then runs one command at a time, reading up to a per-call marker
that carries the command's exit status.

QEMU drops serial output while no client is connected, so connect before the
guest reaches /init (right after QEMU starts; booting takes several seconds).
"""

from __future__ import annotations

import itertools
import re
import socket
import time
from pathlib import Path

from qbackend.errors import QbackendError

READY_LINE = "qbackend-guest: ready"


class GuestError(QbackendError, RuntimeError):
    """The guest console did not behave; the message ends with recent output."""


class GuestCommandFailed(GuestError):
    """A command run with `GuestConsole.run_checked` exited non-zero."""

    def __init__(self, cmd: str, status: int, output: str) -> None:
        super().__init__(f"guest command exited {status}: {cmd!r}\n--- output ---\n{output}")
        self.cmd = cmd
        self.status = status
        self.output = output


class GuestConsole:
    """A synchronous driver for the guest shell on a serial unix socket."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._sock: socket.socket | None = None
        self._raw = bytearray()  # everything received, ever
        self._pos = 0  # start of the not-yet-consumed part of _raw
        self._ids = itertools.count(1)
        self._token = f"{time.monotonic_ns() & 0xFFFFFF:06x}"
        self.last_status: int | None = None

    @classmethod
    def over(cls, sock: socket.socket, name: str = "stdio") -> GuestConsole:
        """A console on a socket already connected: one end of a socketpair whose other
        end is a QEMU's stdin and stdout (``-serial stdio``)."""
        console = cls(name)
        console._sock = sock
        return console

    # -- connection ---------------------------------------------------------

    def connect(self, timeout: float = 10.0) -> None:
        """Connect to the serial socket (retrying until it accepts)."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                break
            except OSError as e:
                s.close()
                if time.monotonic() > deadline:
                    raise GuestError(f"cannot connect to serial console {self.path}: {e}") from e
                time.sleep(0.05)
        self._sock = s

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> GuestConsole:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw I/O ------------------------------------------------------------

    @property
    def transcript(self) -> str:
        """Everything the console has sent so far."""
        return self._raw.decode(errors="replace")

    def tail(self, n: int = 2000) -> str:
        return self._raw[-n:].decode(errors="replace")

    def _recv(self, until: float) -> bool:
        """Receive once, waiting at most until the monotonic time ``until``.

        Returns False on timeout.  Raises GuestError on EOF.
        """
        if self._sock is None:
            raise GuestError("guest console is not connected")
        left = until - time.monotonic()
        if left <= 0:
            return False
        self._sock.settimeout(left)
        try:
            data = self._sock.recv(65536)
        except TimeoutError:
            return False
        if not data:
            raise GuestError(
                "guest console closed (QEMU exited?)\n--- last console output ---\n" + self.tail()
            )
        self._raw += data
        return True

    def _drain(self) -> None:
        """Consume whatever is already buffered (kernel messages etc.)."""
        while self._recv(time.monotonic() + 0.01):
            pass
        self._pos = len(self._raw)

    def send(self, text: str) -> None:
        if self._sock is None:
            raise GuestError("guest console is not connected")
        self._sock.sendall(text.encode())

    def expect(self, pattern: str | bytes, timeout: float) -> re.Match[bytes]:
        """Wait until the unconsumed output matches the regex ``pattern``
        (matched against raw bytes); consume the output up to the match end."""
        rx = re.compile(pattern.encode() if isinstance(pattern, str) else pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self._raw, self._pos)
            if m:
                self._pos = m.end()
                return m
            if not self._recv(deadline) and time.monotonic() >= deadline:
                raise GuestError(
                    f"timed out after {timeout} s waiting for {rx.pattern!r} on the guest "
                    f"console\n--- last console output ---\n{self.tail()}"
                )

    # -- shell --------------------------------------------------------------

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Wait for /init's ready line, then set the shell up for `run`."""
        if self._sock is None:
            self.connect()
        deadline = time.monotonic() + timeout
        self.expect(re.escape(READY_LINE), timeout)
        # Echo off (so our input does not come back), no CR added to output,
        # no prompts.  /init prints the ready line just before it starts sh,
        # and an interactive ash may drop what was typed before it started
        # (seen on a loaded machine), so send it until a marker comes back.
        for attempt in itertools.count(1):
            tag = f"__UP_{self._token}_{attempt}__"
            self.send(f'stty -echo -onlcr; PS1=; PS2=\necho "{tag[:4]}""{tag[4:]}"\n')
            try:
                self.expect(re.escape(tag), max(0.1, min(3.0, deadline - time.monotonic())))
                break
            except GuestError:
                if time.monotonic() >= deadline:
                    raise
        self.run("true", timeout=30)
        self._drain()

    def run(self, cmd: str, timeout: float = 30.0) -> str:
        """Run ``cmd`` in the guest shell; return its output (stdout+stderr).

        The exit status is stored in `last_status`.
        """
        n = next(self._ids)
        tag = f"__DONE_{self._token}_{n}_"
        # The marker is printed with a quoted split so that, should the tty
        # echo our input, the echoed text does not match the pattern.
        self._drain()
        self.send(f'{cmd}\necho "{tag[:4]}""{tag[4:]}$?__"\n')
        start = self._pos
        m = self.expect(re.escape(tag) + r"(\d+)__\r?\n", timeout)
        self.last_status = int(m.group(1))
        return self._raw[start:m.start()].decode(errors="replace")

    def run_status(self, cmd: str, timeout: float = 30.0) -> tuple[int, str]:
        out = self.run(cmd, timeout)
        assert self.last_status is not None
        return self.last_status, out

    def run_checked(self, cmd: str, timeout: float = 30.0) -> str:
        """Like `run`, but raise `GuestCommandFailed` on a non-zero status."""
        status, out = self.run_status(cmd, timeout)
        if status != 0:
            raise GuestCommandFailed(cmd, status, out)
        return out

    def start_background(self, cmd: str) -> None:
        """Start ``cmd`` in the guest without waiting for it.

        busybox ash's line editor treats the SIGCHLD of a finished background
        job as end of input and the shell exits, so the job is started from a
        subshell that exits at once: the job's own end then signals init,
        not the console shell.
        """
        self.run_checked(f"( ( {cmd} ) </dev/null >/dev/null 2>&1 & )")
