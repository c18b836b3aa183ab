"""A qbackend command run as a process of its own that a test kills with SIGKILL and
starts again on the same sockets (tests of surviving a crash)."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from qbackend.testing.harness import wait_until

REPO = Path(__file__).resolve().parent.parent


class RestartableQbackend:
    """`python -m qbackend ARGS`, its output appended to `log`; each start waits for its own
    "serving" line."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.args = [sys.executable, "-m", "qbackend", *args]
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        started = self.serving_lines()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, env=self.env)
        wait_until(lambda: self.serving_lines() > started, 30, "qbackend to listen")

    def kill(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        with open(self.log, "a") as out:
            out.write("---- SIGKILL ----\n")

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(30)
        return self.proc.returncode

    def serving_lines(self) -> int:
        """How many starts have reached "serving" (each start waits for its own)."""
        return self.log.read_text().count("serving") if self.log.exists() else 0
