"""Finding and launching the QEMU the project tests against.

QEMU comes either from ``$QEMU`` (a qemu-system-x86_64 executable, version
10.1 or later) or from the folder ``make setup`` / ``qbackend setup``
provisions in the data directory (`qbackend.machine.data_dir`), ``qemu/``.  The provisioned folder is an unpacked Debian tree, not
a chroot: its binaries run through the folder's own dynamic loader with
``--library-path`` pointing at the folder's libraries.

`QemuMachine` starts one qemu-system-x86_64 with a QMP socket and a serial
console socket in a work directory, and stops it again.  It is plain
subprocess code, usable from sync and trio code alike.
"""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from qbackend.errors import QemuError
from qbackend.sizes import parse_size

from .data_dir import data_dir

MIN_VERSION = (10, 1)


def guest_append(extra: str = "", *, reboot: bool = False) -> str:
    """The test guest's kernel command line: its console on the first serial port, and
    on a panic a halt (QEMU ends: -no-reboot) or, with ``reboot``, a reboot."""
    append = "console=ttyS0 loglevel=1 " + ("panic=0" if reboot else "panic=-1")
    return f"{append} {extra}" if extra else append


class QemuNotFound(QemuError):
    """No usable QEMU (or guest image); the message says what to do."""


def _parse_version(text: str) -> tuple[int, ...]:
    m = re.search(r"version (\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        raise QemuNotFound(f"cannot read a QEMU version from: {text.strip()[:200]!r}")
    return tuple(int(g) for g in m.groups(default="0"))


@dataclass(frozen=True)
class QemuInstall:
    """A QEMU installation: either a provisioned folder or a bare binary."""

    binary: Path
    """The qemu-system-x86_64 executable."""
    root: Path | None = None
    """The provisioned folder (None when the binary came from ``$QEMU``)."""
    version: tuple[int, ...] = field(default=(0, 0, 0))

    @property
    def provisioned(self) -> bool:
        return self.root is not None

    def _loader_prefix(self) -> list[str]:
        assert self.root is not None
        return [
            str(self.root / "usr/lib64/ld-linux-x86-64.so.2"),
            "--library-path",
            str(self.root / "usr/lib/x86_64-linux-gnu"),
        ]

    def system_cmd(self) -> list[str]:
        """The argv prefix that runs qemu-system-x86_64."""
        if self.root is None:
            return [str(self.binary)]
        return [
            *self._loader_prefix(),
            str(self.binary),
            "-L", str(self.root / "usr/share/qemu"),
            "-L", str(self.root / "usr/share/seabios"),
        ]

    def tool_path(self, name: str) -> Path:
        """Where the tool ``name`` (qemu-img, qemu-io, qemu-nbd, ...) lives."""
        if self.root is not None:
            return self.root / "usr/bin" / name
        return self.binary.parent / name

    def tool_cmd(self, name: str) -> list[str]:
        """The argv prefix that runs a QEMU tool beside qemu-system-x86_64."""
        path = self.tool_path(name)
        if not path.exists():
            raise QemuNotFound(f"{name} not found at {path}")
        if self.root is None:
            return [str(path)]
        return [*self._loader_prefix(), str(path)]

    def env(self) -> dict[str, str]:
        """Environment for running QEMU binaries (module dir for the folder)."""
        env = dict(os.environ)
        if self.root is not None:
            env["QEMU_MODULE_DIR"] = str(self.root / "usr/lib/x86_64-linux-gnu/qemu")
        return env


def _query_version(cmd: list[str], env: dict[str, str]) -> tuple[int, ...]:
    try:
        out = subprocess.run(
            [*cmd, "--version"], env=env, capture_output=True, text=True, timeout=30
        )
    except OSError as e:
        raise QemuNotFound(f"cannot run {cmd[-1]!s}: {e}") from e
    if out.returncode != 0:
        raise QemuNotFound(
            f"{' '.join(cmd)} --version failed (exit {out.returncode}): {out.stderr.strip()}"
        )
    return _parse_version(out.stdout)


def find_qemu(qemu: str | os.PathLike[str] | None = None, *, data: Path | None = None) -> QemuInstall:
    """The QEMU to use: ``qemu`` (a path or a command name) if given, else
    ``$QEMU`` if set, else the data directory's ``qemu/`` (``data``, else
    `data_dir()`)."""
    env_qemu = os.fspath(qemu) if qemu is not None else os.environ.get("QEMU")
    what = repr(env_qemu) if qemu is not None else f"QEMU={env_qemu!r}"
    if env_qemu:
        path = Path(env_qemu)
        if not path.is_absolute():
            found = shutil.which(env_qemu)
            path = Path(found) if found else path
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise QemuNotFound(
                f"{what} is not an executable file. Set QEMU to the path of a "
                f"qemu-system-x86_64 (>= {MIN_VERSION[0]}.{MIN_VERSION[1]}), or unset it "
                "and run `make setup` to provision QEMU into build/qemu."
            )
        inst = QemuInstall(binary=path.absolute())
        try:
            version = _query_version(inst.system_cmd(), inst.env())
        except QemuNotFound as e:
            raise QemuNotFound(
                f"{what} does not look like qemu-system-x86_64: {e}. Point QEMU at "
                "a qemu-system-x86_64 (>= 10.1), or unset it and run `make setup`."
            ) from e
        if version[:2] < MIN_VERSION:
            raise QemuNotFound(
                f"{what} is version {'.'.join(map(str, version))}; qbackend needs "
                f">= {MIN_VERSION[0]}.{MIN_VERSION[1]} (vfio-user-pci). Point QEMU at a newer "
                "qemu-system-x86_64, or unset it and run `make setup`."
            )
        return QemuInstall(binary=inst.binary, version=version)

    root = (data or data_dir()) / "qemu"
    binary = root / "usr/bin/qemu-system-x86_64"
    if not (binary.exists() and (root / ".complete").exists()):
        raise QemuNotFound(
            f"no QEMU found: {root} is missing or incomplete. Run `qbackend setup` (or `make setup` "
            "in a checkout), point --data-dir / $QBACKEND_DATA_DIR at a provisioned folder, "
            "or set QEMU=/path/to/qemu-system-x86_64 (version >= 10.1)."
        )
    inst = QemuInstall(binary=binary, root=root)
    version = _query_version(inst.system_cmd(), inst.env())
    return QemuInstall(binary=binary, root=root, version=version)


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path
    kernel_version: str = ""


def find_guest(guest_dir: Path | None = None) -> GuestImage:
    """The test guest ``qbackend setup`` builds in the data directory's ``guest/``."""
    d = guest_dir or data_dir() / "guest"
    kernel, initrd = d / "vmlinuz", d / "initrd.img"
    if not (kernel.is_file() and initrd.is_file()):
        raise QemuNotFound(
            f"no test guest in {d} (need vmlinuz and initrd.img). Run `qbackend setup` "
            "(or `make setup` in a checkout), or point --data-dir / $QBACKEND_DATA_DIR at it."
        )
    kv = d / "kernel-version"
    return GuestImage(kernel, initrd, kv.read_text().strip() if kv.exists() else "")


@dataclass(frozen=True)
class MachineConfig:
    """A machine profile from qemu-configs/NAME.json."""

    name: str
    machine: str
    args: tuple[str, ...] = ()
    hotplug_bus: str | None = None
    description: str = ""


def _profiles() -> importlib.resources.abc.Traversable:
    return importlib.resources.files("qbackend.profiles")


def machine_configs() -> list[str]:
    """The machine profiles shipped with qbackend (qemu-configs/*.json)."""
    return sorted(p.name[:-5] for p in _profiles().iterdir() if p.name.endswith(".json"))


def load_machine_config(name: str) -> MachineConfig:
    path = _profiles() / f"{name}.json"
    if not path.is_file():
        raise QemuNotFound(f"no machine profile {name!r}; known: {', '.join(machine_configs())}")
    doc = json.loads(path.read_text())
    return MachineConfig(name=name, machine=doc["machine"], args=tuple(doc.get("args", ())),
                         hotplug_bus=doc.get("hotplug_bus"), description=doc.get("description", ""))


class QemuMachine:
    """One qemu-system-x86_64 process with QMP and serial console sockets.

    The sockets and ``qemu.log`` live in ``workdir``::

        with QemuMachine(workdir) as vm:
            vm.qmp_path, vm.serial_path   # unix sockets, server side is QEMU
    """

    def __init__(
        self,
        workdir: Path | str,
        *,
        machine: str = "pc",
        memory: str = "512M",
        smp: int = 1,
        append: str = "",
        extra_args: list[str] | None = None,
        qemu: QemuInstall | None = None,
        guest: GuestImage | None = None,
        accel: str | None = None,
        name: str = "qemu",
        numa_nodes: int = 1,
        slots: int = 0,
        maxmem: str | None = None,
        reboot: bool = False,
    ) -> None:
        self.workdir = Path(workdir)
        # False: a guest reboot (or a kernel panic, with panic=-1) ends QEMU, which tests
        # notice at once; True: the machine resets and boots again, and a panic halts.
        self.reboot = reboot
        self.config = load_machine_config(machine)
        self.machine = self.config.machine
        self.memory = memory
        self.smp = smp
        self.append = append
        self.extra_args = list(extra_args or [])
        self.qemu = qemu or find_qemu()
        self.guest = guest or find_guest()
        self.accel = accel or os.environ.get("QBACKEND_ACCEL", "tcg")
        self.numa_nodes = numa_nodes
        self.slots = slots
        self.maxmem = maxmem
        self.qmp_path = self.workdir / f"{name}-qmp.sock"
        # A second monitor for people (or tests acting as them): QEMU's
        # monitor serves one client at a time, and qbackend holds the first.
        self.user_qmp_path = self.workdir / f"{name}-qmp-user.sock"
        self.serial_path = self.workdir / f"{name}-serial.sock"
        self.log_path = self.workdir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_file: BinaryIO | None = None

    def args(self) -> list[str]:
        """The full argv QEMU is started with."""
        append = guest_append(self.append, reboot=self.reboot)
        return [
            *self.qemu.system_cmd(),
            "-accel", self.accel,
            *self._memory_args(),
            "-smp", str(self.smp),
            "-nodefaults", "-display", "none", "-vga", "none", *([] if self.reboot else ["-no-reboot"]),
            "-kernel", str(self.guest.kernel),
            "-initrd", str(self.guest.initrd),
            "-append", append,
            "-chardev", f"socket,id=qmp,path={self.qmp_path},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
            "-chardev", f"socket,id=qmp-user,path={self.user_qmp_path},server=on,wait=off",
            "-mon", "chardev=qmp-user,mode=control",
            "-chardev", f"socket,id=ser,path={self.serial_path},server=on,wait=off",
            "-serial", "chardev:ser",
            *self.config.args,
            *self.extra_args,
        ]

    def _memory_args(self) -> list[str]:
        """Guest RAM: shared memfd backends (vfio-user DMA maps then carry
        fds), split evenly over the NUMA nodes; DIMM slots if asked for."""
        size = self.memory
        if self.slots:
            size += f",slots={self.slots},maxmem={self.maxmem or '4G'}"
        if self.numa_nodes <= 1:
            return [*shared_memory_args(self.machine, self.memory), "-m", size]
        total = parse_size(self.memory, "memory", default_unit="M")  # as QEMU's -m
        if total % (self.numa_nodes << 20):
            raise QemuError(f"memory {self.memory} does not split into {self.numa_nodes} nodes of whole MiB")
        args = ["-machine", self.machine, "-m", size]
        for node in range(self.numa_nodes):
            args += ["-object", f"memory-backend-memfd,id=mem{node},size={total // self.numa_nodes},share=on",
                     "-numa", f"node,nodeid={node},memdev=mem{node}"]
        return args

    def start(self, timeout: float = 30.0) -> None:
        """Launch QEMU and wait until both sockets exist."""
        if self.proc is not None:
            raise QemuError("QemuMachine already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        for p in (self.qmp_path, self.user_qmp_path, self.serial_path):
            p.unlink(missing_ok=True)
        self._log_file = open(self.log_path, "wb")
        self._log_file.write(("$ " + " ".join(self.args()) + "\n").encode())
        self._log_file.flush()
        self.proc = subprocess.Popen(
            self.args(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env=self.qemu.env(),
            start_new_session=True,
        )
        try:
            self.wait_for_sockets(timeout)
        except BaseException:
            self.stop()
            raise

    def wait_for_sockets(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not (self.qmp_path.exists() and self.serial_path.exists()):
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise QemuError(
                    f"QEMU exited with status {self.proc.returncode} during startup:\n"
                    + self.log_text()
                )
            if time.monotonic() > deadline:
                raise QemuError(
                    f"QEMU sockets did not appear within {timeout} s:\n" + self.log_text()
                )
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_text(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        """SIGTERM QEMU, wait, SIGKILL after ``timeout``; remove the sockets.

        Returns QEMU's exit status (None if it was never started).
        """
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            rc = self.proc.returncode
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        for p in (self.qmp_path, self.user_qmp_path, self.serial_path):
            p.unlink(missing_ok=True)
        return rc

    def __enter__(self) -> QemuMachine:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def shared_memory_args(machine: str = "pc", size: str = "512M") -> list[str]:
    """Guest RAM as one shared memfd, which vfio-user and vhost-user back ends need (QEMU
    sends them its fds): ``-object memory-backend-memfd,... -machine MACHINE,memory-backend=mem``."""
    return ["-object", f"memory-backend-memfd,id=mem,size={size},share=on",
            "-machine", f"{machine},memory-backend=mem"]


def describe_exit(status: int) -> str:
    """How a QEMU process ended, from its Popen returncode: "QEMU was killed by SIGABRT",
    "QEMU exited with status 1"."""
    if status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        return f"QEMU was killed by {name}"
    return f"QEMU exited with status {status}"


def vfio_user_device_arg(dev_id: str, socket_path: Path, **props: object) -> str:
    """A QEMU -device argument for vfio-user-pci (JSON: the socket is a struct)."""
    spec = {"driver": "vfio-user-pci", "id": dev_id, "socket": {"type": "unix", "path": str(socket_path)},
            **props}
    return json.dumps(spec)
