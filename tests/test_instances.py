"""Run directories and finding a running instance, without booting anything:
where `qbackend run` puts its sockets ($XDG_RUNTIME_DIR/qbackend/NAME, else
DATA_DIR/run/NAME), how `console`, `pci`, `dimm` and `ivshmem` find the one
running (none, one, several: one line each), a second `run` of a name
refused; `qbackend qemu --print` and `qbackend qemu -- ARGS`; the known QEMU
issues are named as docs/qemu-issues.md names them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from qbackend.machine import instances
from qbackend.machine.qemu_issues import KNOWN_ISSUES, MSIX_UNPLUG_ABORT

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A runtime folder and a data directory of the test's own (XDG_RUNTIME_DIR unset)."""
    runtime, data = tmp_path / "xdg", tmp_path / "data"
    runtime.mkdir(mode=0o700)
    data.mkdir()
    monkeypatch.setenv("QBACKEND_DATA_DIR", str(data))
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    return runtime, data


def test_the_run_directory_is_the_runtime_folder_when_usable_else_the_data_directory(
        dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    runtime, data = dirs
    assert instances.run_dir() == data / "run" / "default"
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    assert instances.run_dir("vm2") == runtime / "qbackend" / "vm2"
    for unusable in ("relative/dir", str(tmp_path / "missing"), str(tmp_path / "afile")):
        (tmp_path / "afile").write_text("")
        monkeypatch.setenv("XDG_RUNTIME_DIR", unusable)
        assert instances.run_dir("vm2") == data / "run" / "vm2", unusable
    for bad in ("", "a/b", "..", ".hidden", "-x", "x" * 65):
        with pytest.raises(instances.UsageError):
            instances.run_dir(bad)


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    socks: list[socket.socket] = []
    yield socks
    for s in socks:
        s.close()


def live(path: Path, socks: list[socket.socket]) -> None:
    """A socket something accepts on, as a running instance's monitor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen()
    socks.append(s)


def stale(path: Path) -> None:
    """A socket left behind by an instance that has stopped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()


def qbackend(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qbackend", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def one_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> str:
    assert result.returncode == code, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_commands_find_the_one_running_instance_or_say_why_not(
        dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, listeners: list[socket.socket],
        tmp_path: Path) -> None:
    runtime, data = dirs
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root = runtime / "qbackend"
    stale(root / "old" / "qbackend.sock")
    for command in (["pci", "list"], ["dimm", "list"], ["ivshmem", "peers"], ["console"]):
        one_line(qbackend(*command, cwd=elsewhere), 1, "no qbackend instance is running", "qbackend run")
    live(root / "vm1" / "qbackend.sock", listeners)
    (found,) = instances.running()
    assert (found.name, found.control, found.serial) == ("vm1", root / "vm1" / "qbackend.sock",
                                                         root / "vm1" / "qemu-serial.sock")
    assert found.pid == os.getpid()
    assert instances.find() == found == instances.find("vm1")
    live(data / "run" / "vm0" / "qbackend.sock", listeners)  # one started without XDG_RUNTIME_DIR
    assert [i.name for i in instances.running()] == ["vm0", "vm1"]
    for command in (["pci", "list"], ["dimm", "list"], ["ivshmem", "peers"], ["console"]):
        one_line(qbackend(*command, cwd=elsewhere), 2, "2 qbackend instances are running (vm0, vm1)",
                 "--instance NAME")
    one_line(qbackend("pci", "--instance", "old", "list", cwd=elsewhere), 1, "no instance named 'old'",
             "running: vm0, vm1")
    one_line(qbackend("pci", "--instance", "vm1", "--control", "x.sock", "list", cwd=elsewhere), 2, "not both")
    # --control still names a monitor by its path
    one_line(qbackend("dimm", "--control", str(tmp_path / "none.sock"), "list", cwd=elsewhere), 1, "none.sock")


def test_a_second_run_of_a_running_name_is_refused(dirs: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                   listeners: list[socket.socket], tmp_path: Path) -> None:
    runtime, _data = dirs
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    rundir = runtime / "qbackend" / "vm1"
    live(rundir / "qbackend.sock", listeners)
    stale(rundir / "ivshmem0.sock")
    line = one_line(qbackend("run", "--name", "vm1", cwd=tmp_path), 1, "an instance named 'vm1' is already running",
                    f"PID {os.getpid()}", str(rundir), "--name")
    assert "qbackend run: " in line
    assert sorted(p.name for p in rundir.iterdir()) == ["ivshmem0.sock", "qbackend.sock"]  # nothing touched
    one_line(qbackend("run", "--workdir", str(rundir), cwd=tmp_path), 1, f"{rundir} is the run directory of a running")


def test_known_issues_are_named_as_docs_qemu_issues_names_them() -> None:
    headings = [line[3:].strip() for line in (REPO / "docs" / "qemu-issues.md").read_text().splitlines()
                if line.startswith("## ")]
    for issue in KNOWN_ISSUES:
        assert issue.title in headings, issue.title
    assert MSIX_UNPLUG_ABORT.affects((11, 1, 3)) and MSIX_UNPLUG_ABORT.affects((11, 1, 0))
    assert not MSIX_UNPLUG_ABORT.affects((11, 2, 0)) and not MSIX_UNPLUG_ABORT.affects((10, 1, 2))


provisioned = pytest.mark.skipif(not (BUILD / "qemu" / ".complete").exists() or "QEMU" in os.environ,
                                 reason="needs `make setup` (build/qemu) and no $QEMU")


@provisioned
def test_qemu_print_gives_the_pieces_of_a_command_line(tmp_path: Path) -> None:
    result = qbackend("--data-dir", str(BUILD), "qemu", "--print", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert list(rows) == ["command", "kernel", "initrd", "append", "memory"]
    assert rows["kernel"] == str(BUILD / "guest" / "vmlinuz")
    assert rows["append"] == "'console=ttyS0 loglevel=1 panic=-1 memhp_default_state=online_movable'"
    assert rows["memory"] == "-object memory-backend-memfd,id=mem,size=512M,share=on -machine pc,memory-backend=mem"
    assert rows["command"].startswith(f"env QEMU_MODULE_DIR={BUILD}/qemu/") and " -L " in rows["command"]

    def piece(name: str, *more: str) -> list[str]:
        out = qbackend("--data-dir", str(BUILD), "qemu", "--print", name, *more, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    assert piece("initrd") == [str(BUILD / "guest" / "initrd.img")]
    assert piece("append") == ["console=ttyS0 loglevel=1 panic=-1 memhp_default_state=online_movable"]
    assert piece("memory", "--memory", "1G", "--machine", "q35") == [
        "-object", "memory-backend-memfd,id=mem,size=1G,share=on", "-machine", "q35,memory-backend=mem"]
    command = piece("command")
    version = subprocess.run([*command, "-version"], capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "QEMU emulator version" in version.stdout, version


@provisioned
def test_qemu_runs_the_provisioned_qemu_and_ends_with_its_status(tmp_path: Path) -> None:
    ok = qbackend("--data-dir", str(BUILD), "qemu", "--", "-version", cwd=tmp_path)
    assert ok.returncode == 0 and ok.stdout.startswith("QEMU emulator version"), ok
    bad = qbackend("--data-dir", str(BUILD), "qemu", "--", "-machine", "nonesuch", cwd=tmp_path)
    assert bad.returncode == 1 and "nonesuch" in bad.stderr and "qbackend" not in bad.stderr, bad
    one_line(qbackend("--data-dir", str(BUILD), "qemu", cwd=tmp_path), 2, "after '--'")
