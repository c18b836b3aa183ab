"""The README walked as a new user walks it: `pip install 'qbackend[pytest]'` of the
checkout (not editable) into a fresh virtual environment, a working folder and a HOME
of the user's own outside the repository, and the README's commands as written (taken
from its text, not retyped here).

- `qbackend qed create`, then `qbackend run` with the README's DIMM and disk options,
  once per disk path (`via=` NBD and vhost-user);
- `qbackend console` with no path reaches the guest's shell, where /dev/vda is a block
  device that takes a filesystem;
- `qbackend dimm ...` and `qbackend pci add/list/del` with no --control;
- the "Write your own device" and "Test in a booted guest" examples, with the pytest
  the `pytest` extra brought;
- Ctrl-C stops `run`, which leaves nothing in the working folder.

Provisioned QEMU and the guest come from the checkout's build/ through
QBACKEND_DATA_DIR, as the README's data-directory paragraph says.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_readme_examples import README, REPO, block, served_and_booted, shell_command

pytestmark = pytest.mark.guest


@dataclass
class User:
    venv: Path
    cwd: Path
    env: dict[str, str]

    def run(self, command: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """A README command line, through a shell, as the user types it."""
        return subprocess.run(["bash", "-c", command], cwd=self.cwd, env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def ok(self, command: str, timeout: float = 120) -> str:
        result = self.run(command, timeout)
        assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
        assert "Traceback" not in result.stderr, result.stderr
        return result.stdout


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> Iterator[User]:
    if not (REPO / "build" / "qemu" / ".complete").exists():
        pytest.skip("needs `make setup` (build/qemu)")
    root = tmp_path_factory.mktemp("walk")
    venv, cwd, home, runtime = root / "venv", root / "work", root / "home", root / "run"
    for folder in (cwd, home, runtime):
        folder.mkdir()
    runtime.chmod(0o700)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"{REPO}[pytest]"],
                             cwd=cwd, capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stdout + install.stderr
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "QEMU", "QBACKEND_DATA_DIR", "XDG_DATA_HOME")}
    env.update(HOME=str(home), XDG_RUNTIME_DIR=str(runtime), QBACKEND_DATA_DIR=str(REPO / "build"),
               PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}")
    yield User(venv, cwd, env)


def readme_run_command(via: str) -> str:
    """The README's `run` with DIMM slots, and its disk option, in one command."""
    (dimms,) = re.findall(r"'(qbackend run --dimm [^']*)'", README)
    (disk,) = re.findall(r"`qbackend run (--disk [^`]*)`", README)
    assert "via=vhost-user" in README
    return f"{dimms} {disk}" + (",via=vhost-user" if via == "vhost-user" else "")


class Console:
    """`qbackend console` with no path, on pipes: lines in, the guest's output out."""

    def __init__(self, user: User) -> None:
        self.proc = subprocess.Popen(["bash", "-c", "qbackend console"], cwd=user.cwd, env=user.env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.seen = b""
        self.n = 0

    def _read(self, until: float) -> None:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, min(0.5, until - time.monotonic())))
        if ready:
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            assert chunk, f"console ended: {self.seen[-2000:]!r}"
            self.seen += chunk

    def wait_ready(self, timeout: float = 120) -> None:
        """Until the guest's shell answers: its /init says when it starts the shell, and an
        interactive ash may drop what was typed before it was up, so ask until it answers."""
        deadline = time.monotonic() + timeout
        while b"qbackend-guest: ready" not in self.seen:
            assert time.monotonic() < deadline, f"the guest never came up: {self.seen[-2000:]!r}"
            self._read(deadline)
        for attempt in range(1, 1000):
            assert self.proc.stdin is not None
            self.proc.stdin.write(f'echo "__UP""_{attempt}__"\n'.encode())
            self.proc.stdin.flush()
            step = time.monotonic() + 3
            while f"__UP_{attempt}__".encode() not in self.seen and time.monotonic() < min(step, deadline):
                self._read(step)
            if f"__UP_{attempt}__".encode() in self.seen:
                self.seen = b""
                return
            assert time.monotonic() < deadline, f"the guest's shell never answered: {self.seen[-2000:]!r}"

    def sh(self, command: str, timeout: float = 60) -> str:
        """Run `command` in the guest's shell; its output (a marker tells where it ends)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.n += 1
        marker = f"__WALK_{self.n}__"
        self.proc.stdin.write(f'{command}; echo "__WALK""_{self.n}__ $?"\n'.encode())
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while (m := re.search(rf"{marker} (\d+)".encode(), self.seen)) is None:
            assert time.monotonic() < deadline, f"no reply to {command!r}; console said {self.seen[-2000:]!r}"
            self._read(deadline)
        out = self.seen[:m.start()].decode(errors="replace")
        self.seen = self.seen[m.end():]
        assert m.group(1) == b"0", f"{command!r} failed in the guest: {out}"
        return out

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()  # end of input: console leaves
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.mark.parametrize("via", ["nbd", "vhost-user"])
def test_run_with_dimms_and_a_disk_then_console_dimm_and_pci(user: User, via: str) -> None:
    user.ok(shell_command("qbackend qed create disk.qed 1G").split("#")[0])
    run = subprocess.Popen(["bash", "-c", f"exec {readme_run_command(via)}"], cwd=user.cwd, env=user.env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert run.stdout is not None
    lines: list[str] = []
    console = None
    try:
        deadline = time.monotonic() + 180
        for line in run.stdout:
            lines.append(line)
            if "Ctrl-C stops" in line or time.monotonic() > deadline:
                break
        assert any("Ctrl-C stops" in line for line in lines), "".join(lines)
        console = Console(user)
        console.wait_ready()
        assert console.sh("[ -b /dev/vda ] && echo block").strip().endswith("block")
        (make_and_mount,) = re.findall(r"`(mke2fs /dev/vda && mount -t ext4 /dev/vda /mnt)`", README)
        console.sh(f"{make_and_mount} >/dev/null", timeout=300)  # the README's line: /mnt is there
        console.sh("echo walked > /mnt/f && sync && umount /mnt")
        assert "walked" in console.sh("mount -t ext4 /dev/vda /mnt && cat /mnt/f && umount /mnt")
        # DIMMs and PCI devices, with the README's lines (its /tmp/ the test's own folder).
        assert "hot1" in user.ok(shell_command("qbackend dimm list").split("#")[0])
        user.ok(shell_command("qbackend dimm add hot1").split("#")[0])
        add = shell_command("qbackend pci add ivshmem").replace("/tmp/", f"{user.cwd}/").split("#")[0]
        assert "iv9" in user.ok(add)
        assert "iv9" in user.ok(shell_command("qbackend pci list").split("#")[0])
        console.sh("i=0; until grep -q 0x1110 /sys/bus/pci/devices/*/device; do i=$((i+1)); "
                   "[ $i -gt 100 ] && exit 1; sleep 0.1; done")
        user.ok(shell_command("qbackend pci del iv9").split("#")[0])
        assert "iv9" not in user.ok(shell_command("qbackend pci list").split("#")[0])
    finally:
        if console is not None:
            console.close()
        run.send_signal(signal.SIGINT)
        out, _ = run.communicate(timeout=60)
        lines.append(out)
    assert run.returncode == 0, "".join(lines)
    assert sorted(p.name for p in user.cwd.iterdir()) == ["disk.qed"], "run left files in the working folder"
    (user.cwd / "disk.qed").unlink()


def test_your_own_device_to_a_qemu_you_start_yourself(user: User) -> None:
    """'Write your own device': the README's mydevice.py served by the README's `qbackend
    serve --device` line, and the README's `qbackend qemu -- ...` line booting a guest
    that sees it (the guest's console on that command's terminal, here a socket)."""
    folder = user.cwd / "mydevice"
    folder.mkdir()
    (folder / "mydevice.py").write_text(block("# mydevice.py"))
    serve = shell_command("qbackend serve --device").replace("/tmp/", f"{folder}/")
    qemu = shell_command("qbackend qemu -- $(qbackend qemu --print memory)", "counter.sock").replace(
        "/tmp/", f"{folder}/")
    with served_and_booted(serve, qemu, folder, user.env, folder / "counter.sock") as shell:
        assert "1234:0c0c" in shell.sh("lspci"), "the guest does not list the Counter"
        (path,) = shell.find_pci(0x1234, 0x0C0C)
        shell.sh(f"echo 1 > {path}/enable")
        assert shell.devmem(shell.bar(path, 0)[0]) == 5  # start=5 from the README's line


def test_the_guest_test_example_with_the_pytest_extra(user: User) -> None:
    """'Test in a booted guest', run by the pytest the `pytest` extra installed, in the
    user's own folder, as the README's command says."""
    folder = user.cwd / "mytests"
    folder.mkdir()
    (folder / "test_hello.py").write_text(block("import pytest"))
    assert (user.venv / "bin" / "pytest").exists(), "the pytest extra brought no pytest"
    command = shell_command("pytest test_hello.py").split("#")[0]
    result = subprocess.run(["bash", "-c", command], cwd=folder, env=user.env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr
