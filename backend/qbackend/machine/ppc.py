"""The provisioned qemu-system-ppc64 (``make setup`` / ``qbackend setup``
unpack it into the data directory's ``qemu-ppc/``, or set ``QEMU_PPC``) and a device-tree dump of a pseries
machine stopped before it runs (``-S``, then QMP ``dumpdtb``; the spapr FDT
exists only from the first reset on, so ``-M pseries,dumpdtb=`` fails)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from qbackend.machine.data_dir import data_dir
from qbackend.machine.launch import QemuInstall, QemuNotFound
from qbackend.machine.qmp import SyncQmp


def find_qemu_ppc() -> QemuInstall:
    env = os.environ.get("QEMU_PPC")
    if env:
        path = Path(env)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise QemuNotFound(f"QEMU_PPC={env!r} is not an executable qemu-system-ppc64")
        return QemuInstall(binary=path)
    root = data_dir() / "qemu-ppc"
    binary = root / "usr/bin/qemu-system-ppc64"
    if not (binary.exists() and (root / ".complete").exists()):
        raise QemuNotFound(f"no qemu-system-ppc64 in {root}: run `qbackend setup` "
                           "(or `make setup` in a checkout), or set QEMU_PPC")
    return QemuInstall(binary=binary, root=root)


def dump_pseries_dtb(args: list[str], workdir: Path, qemu: QemuInstall | None = None,
                     timeout: float = 30.0) -> bytes:
    """Start ``-M pseries`` with ``args`` stopped, dump its device tree over
    QMP, quit, and return the blob."""
    qemu = qemu or find_qemu_ppc()
    workdir.mkdir(parents=True, exist_ok=True)
    sock, out, log = workdir / "qmp.sock", workdir / "pseries.dtb", workdir / "qemu.log"
    for p in (sock, out):
        p.unlink(missing_ok=True)
    cmd = [*qemu.system_cmd(), "-M", "pseries", "-accel", "tcg", "-vga", "none", "-nodefaults",
           "-S", "-display", "none", "-qmp", f"unix:{sock},server=on,wait=off", *args]
    with open(log, "wb") as logf:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                env=qemu.env(), start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not sock.exists():
                if proc.poll() is not None:
                    raise QemuNotFound(f"qemu-system-ppc64 exited ({proc.returncode}): "
                                       + log.read_text(errors="replace")[-2000:])
                if time.monotonic() > deadline:
                    raise TimeoutError("QMP socket did not appear")
                time.sleep(0.005)
            qmp = SyncQmp(sock, timeout=timeout)
            try:
                qmp.execute("dumpdtb", {"filename": str(out)})
            finally:
                qmp.close()
        finally:
            proc.terminate()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            sock.unlink(missing_ok=True)
    return out.read_bytes()
