"""What the benchmark scripts share: waiting for a server's socket, and where
libvfio-user's sample server is looked for."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

# Built outside this repository (README, Benchmark); LIBVFIO_USER_SERVER or --libvfio-user override it.
DEFAULT_LIBVFIO_USER = "/opt/libvfio-user-build/samples/gpio-pci-idio-16"


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes] | None, what: str, timeout: float = 30.0) -> None:
    """Return once `path` exists; exit with a message if `proc` ends first or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise SystemExit(f"bench: {what} did not start")
        time.sleep(0.02)
