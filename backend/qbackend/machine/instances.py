"""Where a running `qbackend run` keeps its sockets, and how the commands that
talk to one (`console`, `dimm`, `pci`, `ivshmem`) find it.

Each instance has a name (``qbackend run --name NAME``, default ``default``)
and a run directory of its own, whatever the current directory:

- ``$XDG_RUNTIME_DIR/qbackend/NAME`` when ``XDG_RUNTIME_DIR`` is set and
  usable (an absolute path to a folder of this user that it can write);
- else ``DATA_DIR/run/NAME`` (`qbackend.machine.data_dir`).

The run directory holds qbackend's QMP monitor (``qbackend.sock``), QEMU's
sockets (``qemu-serial.sock``, ``qemu-qmp.sock``, ``qemu-qmp-user.sock``),
the devices' sockets and ``qemu.log``.  An instance is running while its
monitor socket accepts connections; a folder left behind by one that has
stopped is not an instance.
"""

from __future__ import annotations

import os
import re
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from qbackend.errors import ControlError, UsageError

from .data_dir import data_dir

DEFAULT_NAME = "default"
CONTROL_SOCKET = "qbackend.sock"
SERIAL_SOCKET = "qemu-serial.sock"
QEMU_LOG = "qemu.log"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str) -> str:
    """An instance name: letters, digits, '_', '.', '-' (a folder name, never a path)."""
    if not _NAME.fullmatch(name):
        raise UsageError(f"instance name {name!r}: use letters, digits, '_', '.' and '-' (at most 64, "
                         "not starting with '.' or '-')")
    return name


def _runtime_dir() -> Path | None:
    """``$XDG_RUNTIME_DIR`` if it is set and usable: absolute, a folder of this user, writable."""
    value = os.environ.get("XDG_RUNTIME_DIR")
    if not value or not os.path.isabs(value):
        return None
    try:
        st = os.stat(value)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or not os.access(value, os.W_OK | os.X_OK):
        return None
    return Path(value)


def runs_root() -> Path:
    """The folder whose subfolders are the run directories (see the module doc)."""
    runtime = _runtime_dir()
    return runtime / "qbackend" if runtime is not None else data_dir() / "run"


def run_dir(name: str = DEFAULT_NAME) -> Path:
    """The run directory of the instance ``name``."""
    return runs_root() / check_name(name)


def make_run_dir(path: Path) -> Path:
    """Make a run directory (and its parents), mode 0700: sockets and logs of one user."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def serving_pid(path: Path) -> int | None:
    """The PID that accepts on the UNIX socket at ``path`` (0 when the kernel does not
    say), or None when nothing does (no socket, or a stale one)."""
    if not path.is_socket():
        return None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return None
        try:
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            return max(int.from_bytes(creds[:4], "little"), 0)
        except OSError:
            return 0
    finally:
        probe.close()


@dataclass(frozen=True)
class Instance:
    """A running `qbackend run`: its name and run directory."""

    name: str
    path: Path
    pid: int

    @property
    def control(self) -> Path:
        return self.path / CONTROL_SOCKET

    @property
    def serial(self) -> Path:
        return self.path / SERIAL_SOCKET

    @property
    def log(self) -> Path:
        return self.path / QEMU_LOG


def _roots() -> list[Path]:
    """Where run directories may be: the runtime folder and the data directory's run/
    (an instance started without XDG_RUNTIME_DIR, from a service or over ssh, is there)."""
    roots = [runs_root(), data_dir() / "run"]
    return [r for n, r in enumerate(roots) if r not in roots[:n]]


def running() -> list[Instance]:
    """The instances whose monitor socket is live, by name."""
    found: dict[str, Instance] = {}
    for root in _roots():
        try:
            folders = sorted(p for p in root.iterdir() if p.is_dir() and _NAME.fullmatch(p.name))
        except OSError:
            continue
        for folder in folders:
            pid = serving_pid(folder / CONTROL_SOCKET)
            if pid is not None and folder.name not in found:
                found[folder.name] = Instance(folder.name, folder, pid)
    return sorted(found.values(), key=lambda i: i.name)


def find(name: str | None = None,
         otherwise: str = "give --control PATH of a 'qbackend serve --control PATH'") -> Instance:
    """The running instance ``name``, or the only one running: one-line errors otherwise
    (``otherwise`` says what else the command takes)."""
    instances = running()
    names = ", ".join(i.name for i in instances)
    if name is not None:
        check_name(name)
        for instance in instances:
            if instance.name == name:
                return instance
        raise ControlError(f"no instance named {name!r} is running "
                           f"({'running: ' + names if names else 'none is'}; looked in {runs_root()})")
    if not instances:
        raise ControlError(f"no qbackend instance is running (looked in {runs_root()}); start one with "
                           f"'qbackend run', or {otherwise}")
    if len(instances) > 1:
        raise UsageError(f"{len(instances)} qbackend instances are running ({names}); choose one with "
                         "--instance NAME")
    return instances[0]
