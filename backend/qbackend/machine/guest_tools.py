"""Host programs in the test guest: the busybox guest lacks fio and mkfs.ext4,
and Debian's are dynamically linked.  `with_host_programs` copies programs and
every library `ldd` names into a second cpio archive appended to the guest's
initramfs (the kernel unpacks concatenated archives in order), so the guest
runs the host's own binaries at their own paths."""

from __future__ import annotations

import gzip
import shutil
import subprocess
from pathlib import Path

from qbackend.errors import QemuError
from qbackend.machine.launch import GuestImage


def _closure(program: Path) -> list[Path]:
    """The program and the shared libraries (and loader) it needs."""
    out = [program]
    listing = subprocess.run(["ldd", str(program)], capture_output=True, text=True).stdout
    for line in listing.splitlines():
        parts = line.split()
        path = parts[2] if "=>" in parts and len(parts) > 2 else (parts[0] if parts else "")
        if path.startswith("/"):
            out.append(Path(path))
    return out


def with_host_programs(guest: GuestImage, programs: list[str], workdir: Path) -> GuestImage:
    """`guest` with the host's `programs` (names on PATH, or paths) added; the new
    initramfs is written in `workdir`."""
    staging = workdir / "host-programs"
    shutil.rmtree(staging, ignore_errors=True)
    for name in programs:
        found = shutil.which(name)
        if found is None:
            raise QemuError(f"{name} is not installed on this host (make setup installs it)")
        for f in _closure(Path(found)):
            target = staging / str(f).lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f.resolve(), target)
    archive = subprocess.run("find . | cpio -o -H newc --quiet", shell=True, cwd=staging, capture_output=True,
                             check=True).stdout
    initrd = workdir / "initrd-with-host-programs.img"
    initrd.write_bytes(guest.initrd.read_bytes() + gzip.compress(archive, compresslevel=1))
    shutil.rmtree(staging)
    return GuestImage(guest.kernel, initrd, guest.kernel_version)
