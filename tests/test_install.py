"""qbackend installed as a user installs it: `pip install /path/to/checkout`
(not editable) into a fresh virtual environment, used from a folder that is
not the checkout.  Checks that it needs nothing from the checkout: the
machine profiles come as package data, provisioned files from --data-dir,
and the only top-level package it installs is `qbackend`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qbackend.testing.harness import wait_until

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "build"


@dataclass
class Installed:
    venv: Path
    cwd: Path

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def qbackend(self) -> Path:
        return self.venv / "bin" / "qbackend"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QBACKEND_DATA_DIR", "VIRTUAL_ENV")}
        env["HOME"] = str(self.cwd)  # a per-user data directory of its own: nothing provisioned there
        env.pop("XDG_DATA_HOME", None)
        return env

    def run(self, *args: str, timeout: float = 120, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.qbackend), *args], cwd=self.cwd, env=env or self.env(), capture_output=True,
                              text=True, timeout=timeout)

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen([str(self.qbackend), *args], cwd=self.cwd, env=env or self.env(), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def without_a_compiler(self) -> dict[str, str]:
        """The environment with nothing on PATH but the virtual environment's own
        programs: no cc, gcc or ld is there to build anything at run time."""
        return {**self.env(), "PATH": str(self.venv / "bin"), "CC": "/nonexistent/cc",
                "QBACKEND_NATIVE": "require"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    root = tmp_path_factory.mktemp("installed")
    venv, cwd = root / "venv", root / "elsewhere"
    cwd.mkdir()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(REPO)],
                            cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    yield Installed(venv, cwd)


def stop(proc: subprocess.Popen[str]) -> str:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return out


def test_the_only_top_level_package_is_qbackend(installed: Installed) -> None:
    result = subprocess.run([str(installed.python), "-m", "pip", "show", "-f", "qbackend"], cwd=installed.cwd,
                            capture_output=True, text=True, check=True)
    files = [line.strip() for line in result.stdout.split("Files:", 1)[1].splitlines() if line.strip()]
    tops = {f.split("/")[0] for f in files if f.endswith(".py")}
    assert tops == {"qbackend"}, tops
    assert "qbackend/profiles/q35.json" in files and "qbackend/provision/build-guest.sh" in files
    location = next(line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
                    if line.startswith("Location:"))
    assert not Path(location).is_relative_to(REPO), "installed as an editable checkout"


def test_every_c_helper_loads_from_the_installed_copy(installed: Installed) -> None:
    """The wheel carries the compiled helpers: each loads from site-packages, none from the checkout."""
    code = ("import json, qbackend.plumbing.native as n\n"
            "print(json.dumps({'file': n.__file__, 'loaded': n.loaded(), 'helpers': list(n.HELPERS)}))")
    result = subprocess.run([str(installed.python), "-c", code], cwd=installed.cwd,
                            env=installed.without_a_compiler(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert not Path(report["file"]).is_relative_to(REPO)
    assert report["helpers"] and sorted(report["loaded"]) == sorted(report["helpers"]), report
    assert all(why is None for why in report["loaded"].values()), report


def _served_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("served:")]
    assert len(lines) == 1, output
    return lines[0]


def test_nbd_is_served_natively_without_a_compiler(installed: Installed) -> None:
    """QBACKEND_NATIVE=require, no compiler on PATH: `qbackend nbd` starts, nbdcopy writes
    and reads a QED image through it, and the server says its reads were served in C."""
    image, data, back = (installed.cwd / name for name in ("native.qed", "data.bin", "back.bin"))
    data.write_bytes(os.urandom(8 << 20))
    env = installed.without_a_compiler()
    assert installed.run("qed", "create", str(image), "8M", env=env).returncode == 0
    sock = installed.cwd / "native-nbd.sock"
    proc = installed.popen("nbd", "--export", f"name=d,image={image},format=qed", "--socket", str(sock), env=env)
    try:
        wait_until(sock.exists, 30, "the NBD socket")
        url = f"nbd+unix:///d?socket={sock}"
        subprocess.run(["nbdcopy", str(data), url], check=True, timeout=60)
        subprocess.run(["nbdcopy", url, str(back)], check=True, timeout=60)
        assert back.read_bytes() == data.read_bytes()
    finally:
        out = stop(proc)
    assert "Traceback" not in out and "not loaded" not in out, out
    counts = dict(item.rsplit(" ", 1) for item in _served_line(out)[len("served: "):].split(", "))
    assert int(counts["native_reads"]) > 0, out


def test_vfio_user_is_served_natively_without_a_compiler(installed: Installed) -> None:
    """QBACKEND_NATIVE=require, no compiler on PATH: `qbackend serve --ivshmem` answers a raw
    vfio-user client's register reads in C, and says how many at its stop."""
    sock = installed.cwd / "native-iv.sock"
    proc = installed.popen("serve", "--ivshmem", f"socket={sock},size=1M,id=iv0", env=installed.without_a_compiler())
    client = (
        "import sys\n"
        "from qbackend.testing.vfio_user_client import VfioUserClient\n"
        "from qbackend.protocol.vfio_user import PciRegion\n"
        "with VfioUserClient(sys.argv[1]) as c:\n"
        "    c.negotiate()\n"
        "    ids = {c.read32(PciRegion.CONFIG, 0) for _ in range(100)}\n"
        "    print(hex(ids.pop()))\n")
    try:
        wait_until(sock.exists, 30, "the vfio-user socket")
        result = subprocess.run([str(installed.python), "-c", client, str(sock)], cwd=installed.cwd,
                                env=installed.env(), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and result.stdout.strip() == "0x11101af4", result.stdout + result.stderr
    finally:
        out = stop(proc)
    assert "Traceback" not in out and "not loaded" not in out, out
    line = next((line for line in out.splitlines() if line.startswith("iv0: served native_accesses ")), None)
    assert line is not None and int(line.rsplit(" ", 1)[1]) >= 100, out


def test_an_editable_install_is_a_plain_path_that_jedi_follows(tmp_path: Path) -> None:
    """`pip install -e` writes a .pth naming the source roots (no import hook), so an editor's
    go-to-definition (jedi here) lands on the checkout's own file."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    for args in (["--no-deps", "-e", str(REPO)], ["jedi"]):
        result = subprocess.run([python, "-m", "pip", "install", "-q", *args], cwd=tmp_path, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not list(site.glob("__editable__*finder*.py")), "an import hook, which editors cannot follow"
    code = ("import jedi\n"
            "source = 'from qbackend.block import qed\\nfrom qbackend.protocol import nbd\\n'\n"
            "script = jedi.Script(source)\n"
            "for line, column in ((1, 27), (2, 30)):\n"
            "    (name,) = script.goto(line, column, follow_imports=True)\n"
            "    print(name.module_path)\n")
    result = subprocess.run([python, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(REPO / "backend" / "qbackend" / "block" / "qed.py"),
                                     str(REPO / "protocol" / "qbackend" / "protocol" / "nbd.py")]


def test_help_and_qed_tools(installed: Installed) -> None:
    help_text = installed.run("--help")
    assert help_text.returncode == 0 and "setup" in help_text.stdout and "serve" in help_text.stdout
    assert installed.run("qed", "create", "disk.qed", "64M").returncode == 0
    info = installed.run("qed", "info", "disk.qed")
    assert info.returncode == 0 and "67108864" in info.stdout.replace(",", ""), info.stdout
    check = installed.run("qed", "check", "disk.qed")
    assert check.returncode == 0, check.stdout + check.stderr
    dts = installed.run("drc", "dt", "--cpus", "2", "--maxcpus", "4", "--memory", "1G", "--maxmem", "4G",
                        "--slots", "4")
    assert dts.returncode == 0 and dts.stdout.startswith("/dts-v1/;") and "ibm,drc-indexes = <0x2f " in dts.stdout


def test_nbd_serves_an_image_that_nbdinfo_reads(installed: Installed) -> None:
    image = installed.cwd / "served.qed"
    assert installed.run("qed", "create", str(image), "32M").returncode == 0
    sock = installed.cwd / "nbd.sock"
    proc = installed.popen("nbd", "--export", f"name=d,image={image},format=qed", "--socket", str(sock))
    try:
        wait_until(sock.exists, 30, "the NBD socket")
        info = subprocess.run(["nbdinfo", "--size", f"nbd+unix:///d?socket={sock}"], capture_output=True,
                              text=True, timeout=30)
        assert info.stdout.strip() == str(32 << 20), info
    finally:
        stop(proc)


def test_serve_answers_a_vfio_user_version_handshake(installed: Installed) -> None:
    iv, hp = installed.cwd / "iv.sock", installed.cwd / "hp.sock"
    proc = installed.popen("serve", "--ivshmem", f"socket={iv},size=1M", "--hotplug", f"socket={hp}")
    client = (
        "import sys\n"
        "from qbackend.testing.vfio_user_client import VfioUserClient\n"
        "for path in sys.argv[1:]:\n"
        "    with VfioUserClient(path) as c:\n"
        "        caps = c.negotiate()\n"
        "        print(path, sorted(caps['capabilities']), c.device_info()[1])\n")
    try:
        wait_until(lambda: iv.exists() and hp.exists(), 30, "both vfio-user sockets")
        result = subprocess.run([str(installed.python), "-c", client, str(iv), str(hp)], cwd=installed.cwd,
                                env=installed.env(), capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert len(lines) == 2 and all("max_msg_fds" in line for line in lines), lines
    finally:
        stop(proc)


def test_run_without_data_says_what_to_do(installed: Installed) -> None:
    result = installed.run("run", "--workdir", str(installed.cwd / "run"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "qbackend setup" in result.stderr and "--data-dir" in result.stderr, result.stderr


@pytest.mark.guest
def test_run_boots_when_told_where_qemu_and_the_guest_are(installed: Installed) -> None:
    if not (BUILD / "qemu" / ".complete").exists():
        pytest.skip("needs `make setup` (build/qemu)")
    workdir = installed.cwd / "run"
    proc = installed.popen("--data-dir", str(BUILD), "run", "--workdir", str(workdir),
                           "--ivshmem", f"socket={workdir}/iv.sock,size=1M")
    assert proc.stdout is not None
    from qbackend.machine.console import GuestConsole
    from qbackend.testing.harness import GuestShell

    lines = []
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops" in line or time.monotonic() > deadline:
                break
        assert any("guest console:" in line for line in lines), "".join(lines)
        with GuestConsole(workdir / "qemu-serial.sock") as console:
            console.wait_ready(timeout=90)
            assert GuestShell(console).find_pci(0x1AF4, 0x1110), "the guest has no ivshmem device"
    finally:
        out = stop(proc)
    assert "stopped" in out, "".join(lines) + out


def test_a_build_without_a_compiler_is_pure_python_and_says_so(tmp_path: Path) -> None:
    """No C compiler at build time: the wheel build says so once and makes a pure-Python
    wheel; installed, it serves in Python (auto), and QBACKEND_NATIVE=require refuses to
    start with one line naming the helper."""
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "-w", str(dist), str(REPO)],
                           cwd=tmp_path, env={**os.environ, "CC": "/nonexistent/cc"}, capture_output=True, text=True,
                           timeout=600)
    assert build.returncode == 0, build.stdout + build.stderr
    assert (build.stdout + build.stderr).count("C helpers not built") == 1, build.stdout + build.stderr
    (wheel,) = dist.glob("qbackend-*.whl")
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stdout + install.stderr
    qbackend = str(venv / "bin" / "qbackend")
    env = {k: v for k, v in os.environ.items() if k not in ("QBACKEND_NATIVE", "PYTHONPATH")}
    image = tmp_path / "pure.qed"
    assert subprocess.run([qbackend, "qed", "create", str(image), "1M"], env=env, timeout=60).returncode == 0
    refused = subprocess.run([qbackend, "nbd", "--export", f"image={image},format=qed", "--socket",
                              str(tmp_path / "n.sock")], env={**env, "QBACKEND_NATIVE": "require"},
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    (line,) = refused.stderr.strip().splitlines()
    assert "QBACKEND_NATIVE=require" in line and ".c" in line, line
    assert not (tmp_path / "n.sock").exists()
