"""Provisioning: QEMU 11.1 and the test guest, into the data directory.

The work is done by the shell scripts beside this file (shipped as package
data, so that an installed qbackend needs no checkout): Debian's packages,
unpacked with mmdebstrap, and an initramfs from the Debian kernel and
busybox-static.  `make setup` and `qbackend setup` both end here.
"""

from __future__ import annotations

import importlib.resources
import subprocess
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
        result = subprocess.run(["bash", str(folder / script), *args])
    if result.returncode != 0:
        raise ProvisionError(f"{script} {' '.join(args)} failed (exit {result.returncode}); "
                             "its output above says why")


def install_host_packages() -> None:
    """The Debian packages provisioning needs (only the missing ones; sudo when not root)."""
    _run("install-host-packages.sh")


def provision(data_dir: Path, *, qemu: bool = True, qemu_ppc: bool = True, guest: bool = True) -> None:
    """Unpack QEMU (x86 and ppc) and build the guest under ``data_dir``;
    each step is skipped when its folder is already complete."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if qemu:
        _run("provision-qemu.sh", str(data_dir / "qemu"), QEMU_X86_PACKAGES, "qemu-system-x86_64")
    if qemu_ppc:
        _run("provision-qemu.sh", str(data_dir / "qemu-ppc"), QEMU_PPC_PACKAGES, "qemu-system-ppc64")
    if guest:
        _run("build-guest.sh", str(data_dir / "guest"))


