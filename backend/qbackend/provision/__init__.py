"""Provisioning: QEMU 11.1 and the test guest, into the data directory.

The work is done by the shell scripts beside this file (shipped as package
data, so that an installed qbackend needs no checkout): Debian's packages,
unpacked with mmdebstrap, and an initramfs from the Debian kernel and
busybox-static.  `make setup` and `qbackend setup` both end here.

Each step builds in a temporary folder beside its target (``qemu.tmp``,
``guest.tmp``) that the script renames into place when complete.  A step's
script runs in a process group of its own; when the step is interrupted
(an exception such as KeyboardInterrupt reaches `_run`), the whole group is
killed and the temporary folder removed, so nothing half-made stays behind.
"""

from __future__ import annotations

import importlib.resources
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from qbackend.errors import QbackendError

QEMU_X86_PACKAGES = "qemu-system-x86,qemu-utils,qemu-block-extra"
QEMU_PPC_PACKAGES = "qemu-system-ppc"


class ProvisionError(QbackendError):
    """A provisioning step failed; its own output says why."""

    exit_code = 1


@contextmanager
def _scripts() -> Iterator[Path]:
    with importlib.resources.as_file(importlib.resources.files("qbackend.provision")) as folder:
        yield Path(folder)


def _run(script: str, *args: str) -> None:
    with _scripts() as folder:
        # A session of its own: the terminal's Ctrl-C reaches only us, and
        # the script with everything it started (apt, dpkg, mmdebstrap, make)
        # is one process group that _kill_group ends.
        proc = subprocess.Popen(["bash", str(folder / script), *args], start_new_session=True)
        try:
            returncode = proc.wait()
        except BaseException:
            _kill_group(proc)
            raise
    if returncode != 0:
        raise ProvisionError(f"{script} {' '.join(args)} failed (exit {returncode}); "
                             "its output above says why")


def _kill_group(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """SIGKILL `proc`'s process group and wait until no member is left.

    SIGKILL rather than SIGTERM: the step's temporary folder is thrown away,
    so no child needs to finish anything, and a killed child prints nothing.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            break
        if proc.poll() is None:
            proc.wait()
        # Grandchildren are reaped by init; until then they still count as members.
        if time.monotonic() > deadline:
            break
        time.sleep(0.02)


def _step(dest: Path, script: str, *args: str) -> None:
    """Run `script` to build `dest`; whatever its temporary folder holds
    afterwards (nothing once the script has renamed it into place) is removed."""
    try:
        _run(script, str(dest), *args)
    finally:
        shutil.rmtree(dest.with_name(dest.name + ".tmp"), ignore_errors=True)


def install_host_packages() -> None:
    """The Debian packages provisioning needs (only the missing ones; sudo when not root)."""
    _run("install-host-packages.sh")


def provision(data_dir: Path, *, qemu: bool = True, qemu_ppc: bool = False, guest: bool = True,
              ppc_guest: bool = False) -> None:
    """Unpack QEMU (x86, and ppc when asked) and build the guest (and the
    ppc64le guest when asked) under ``data_dir``; each step is skipped when
    its folder is already complete."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if qemu:
        _step(data_dir / "qemu", "provision-qemu.sh", QEMU_X86_PACKAGES, "qemu-system-x86_64")
    if qemu_ppc:
        _step(data_dir / "qemu-ppc", "provision-qemu.sh", QEMU_PPC_PACKAGES, "qemu-system-ppc64")
    if guest:
        _step(data_dir / "guest", "build-guest.sh")
    if ppc_guest:
        _step(data_dir / "ppc-guest", "build-ppc-guest.sh")


