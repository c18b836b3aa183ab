"""What the benchmark scripts share: waiting for a server's socket, warming free memory
before a timed write, and where libvfio-user's sample server is looked for."""

from __future__ import annotations

import mmap
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


# This machine is a VM whose kernel hands free memory back to the host (free page
# reporting: page_reporting.page_reporting_order on its command line).  A page the
# page cache then takes back costs the host's fault, more than the server's own work
# on it: an allocating write of 512 MiB took a server 0.33 s of CPU or 2.35 s, by
# where its pages came from, and qemu-nbd alike.
PAGE_REPORTING = Path("/sys/module/page_reporting/parameters/page_reporting_order")
MADV_POPULATE_WRITE = 23  # Linux 5.14; Python 3.11's mmap module does not name it


def warm_memory(nbytes: int) -> None:
    """Make `nbytes` of free memory resident again just before a timed write fills the page
    cache, so that the write measures the server, not the host's faults (see PAGE_REPORTING):
    the pages are touched and freed at once, and the next allocations take them back."""
    if not PAGE_REPORTING.exists():
        return
    memory = mmap.mmap(-1, nbytes)
    try:
        memory.madvise(MADV_POPULATE_WRITE)
    except OSError:  # an older kernel: touch every page
        for offset in range(0, nbytes, mmap.PAGESIZE):
            memory[offset] = 1
    memory.close()
