"""`qbackend run` as a user runs it, from a folder of their own: the run
directory of its name ($XDG_RUNTIME_DIR/qbackend/NAME), `console`, `pci`
and `ivshmem` finding it by themselves, a second run of the name refused,
hot-plugged ivshmem without MSI-X unless asked, `pci del` refusing a device
with MSI-X under QEMU 11.1 (docs/qemu-issues.md) unless --force; and QEMU's
death is an error: `run` ends with status 1 saying how QEMU ended, and a
qbackend still following that QEMU says it is gone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qbackend.machine.console import GuestConsole
from qbackend.machine.launch import find_qemu
from qbackend.machine.qemu_issues import MSIX_UNPLUG_ABORT
from qbackend.machine.qmp import SyncQmp
from qbackend.testing.harness import GuestShell, wait_until

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"


@dataclass
class User:
    """A user's shell: a folder of their own, XDG_RUNTIME_DIR and a data directory of
    the test's own (the provisioned QEMU and guest linked in), so that only this
    test's instances are found."""

    home: Path
    env: dict[str, str]

    @property
    def runtime(self) -> Path:
        return Path(self.env["XDG_RUNTIME_DIR"]) / "qbackend"

    def qbackend(self, *args: str, stdin: str | None = None, timeout: float = 90) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "qbackend", *args], cwd=self.home, env=self.env,
                              capture_output=True, text=True, timeout=timeout, input=stdin)

    def start(self, *args: str) -> tuple[subprocess.Popen[str], str]:
        """`qbackend ARGS` in the background, and what it printed up to "Ctrl-C stops"."""
        proc = subprocess.Popen([sys.executable, "-m", "qbackend", *args], cwd=self.home, env=self.env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops" in line:
                break
        return proc, "".join(lines)


@pytest.fixture
def user(tmp_path: Path) -> User:
    if not (BUILD / "qemu" / ".complete").exists():
        pytest.skip("needs `make setup` (build/qemu)")
    data, runtime, home = tmp_path / "data", tmp_path / "xdg", tmp_path / "home"
    data.mkdir()
    runtime.mkdir(mode=0o700)
    home.mkdir()
    for part in ("qemu", "guest"):
        (data / part).symlink_to(BUILD / part)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QEMU")}
    env.update(QBACKEND_DATA_DIR=str(data), XDG_RUNTIME_DIR=str(runtime))
    return User(home, env)


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def qemu_pid(text: str) -> int:
    line = next(line for line in text.splitlines() if line.startswith("QEMU pid "))
    return int(line.split()[2].rstrip(","))


def test_run_found_by_name_hotplug_without_msix_and_del_refused_unless_forced(
        user: User, procs: list[subprocess.Popen[str]]) -> None:
    proc, text = user.start("run", "--name", "t1")
    procs.append(proc)
    rundir = user.runtime / "t1"
    assert f"guest console: {rundir}/qemu-serial.sock   (attach: qbackend console --instance t1)" in text, text
    with GuestConsole(rundir / "qemu-serial.sock") as console:
        console.wait_ready(timeout=120)
        shell = GuestShell(console)
        assert shell.find_pci(0x1AF4, 0x1110), "the guest has no ivshmem device"
    # the only instance: found from the user's folder, with no path
    attached = user.qbackend("console", stdin="")
    assert attached.returncode == 0 and f"connected to {rundir}/qemu-serial.sock" in attached.stderr, attached
    # the same name again: refused, and the first goes on
    one_line(user.qbackend("run", "--name", "t1"), 1, "an instance named 't1' is already running", "--name")
    assert proc.poll() is None

    # ivshmem hot-plugged without vectors= has no MSI-X, from the CLI and over QMP
    added = user.qbackend("pci", "add", "ivshmem", f"socket={rundir}/hp0.sock,size=1M,id=hp0")
    assert added.returncode == 0 and "hp0: slot" in added.stdout and "0 MSI-X vectors" in added.stdout, added
    with SyncQmp(rundir / "qbackend.sock") as qmp:
        reply = qmp.execute("pci-device-add", {"driver": "ivshmem", "id": "hq", "socket": str(rundir / "hq.sock"),
                                               "size": "1M"})
        assert reply["vectors"] == 0, reply
    assert "hq: removed" in user.qbackend("pci", "del", "hq").stdout
    assert "hp0: removed" in user.qbackend("pci", "del", "hp0").stdout

    added = user.qbackend("pci", "--instance", "t1", "add", "ivshmem", f"socket={rundir}/hp1.sock,size=1M,vectors=1,id=hp1")
    assert added.returncode == 0 and "1 MSI-X vectors" in added.stdout, added
    version = find_qemu().version
    if not MSIX_UNPLUG_ABORT.affects(version):
        pytest.skip(f"QEMU {version} is not known to abort on the unplug of a device with MSI-X")
    one_line(user.qbackend("pci", "del", "hp1"), 1, "hp1 has MSI-X", "QEMU 11.1", "docs/qemu-issues.md",
             MSIX_UNPLUG_ABORT.title, "--force")
    assert proc.poll() is None
    assert "hp1" in user.qbackend("pci", "list").stdout
    # --force: the unplug happens, and QEMU 11.1 aborts as docs/qemu-issues.md says; run says so
    forced = user.qbackend("pci", "del", "--force", "hp1")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, text + out + err
    assert err.strip().splitlines()[-1] == f"qbackend run: QEMU was killed by SIGABRT (see {rundir}/qemu.log)", err
    assert "memory_region_del_subregion" in (rundir / "qemu.log").read_text()
    one_line(forced, 1, "qbackend closed its monitor while waiting", f"{rundir}/qemu.log")
    one_line(user.qbackend("pci", "list"), 1, "no qbackend instance is running", "qbackend run")


def test_run_ends_with_status_1_when_qemu_is_killed_and_a_follower_says_qemu_is_gone(
        user: User, procs: list[subprocess.Popen[str]]) -> None:
    proc, text = user.start("run")
    procs.append(proc)
    rundir = user.runtime / "default"
    assert "(attach: qbackend console)" in text, text
    # a second qbackend follows the same QEMU through its second monitor
    control = user.home / "follower.sock"
    follower, _ = user.start("serve", "--control", str(control), "--hotplug", f"socket={user.home}/hp.sock",
                             "--qmp", str(rundir / "qemu-qmp-user.sock"))
    procs.append(follower)
    with GuestConsole(rundir / "qemu-serial.sock") as console:
        console.wait_ready(timeout=120)
    assert "slot" in user.qbackend("pci", "--control", str(control), "list").stdout

    os.kill(qemu_pid(text), signal.SIGABRT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, text + out + err
    assert err.strip().splitlines()[-1] == f"qbackend run: QEMU was killed by SIGABRT (see {rundir}/qemu.log)", err
    assert "stopped; no QEMU or socket left behind" in out
    assert sorted(p.name for p in rundir.iterdir() if p.is_socket()) == []

    def gone(*command: str) -> subprocess.CompletedProcess[str]:
        return user.qbackend(*command[:1], "--control", str(control), *command[1:])

    wait_until(lambda: gone("pci", "list").returncode == 1, 10, "the follower to see QEMU gone")
    one_line(gone("pci", "list"), 1, "QEMU is gone", "qemu-qmp-user.sock")
    one_line(gone("pci", "add", "ivshmem", f"socket={user.home}/x.sock"), 1, "QEMU is gone")
    one_line(gone("dimm", "list"), 1, "QEMU is gone")
    assert follower.poll() is None
