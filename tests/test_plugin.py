"""The pytest plugin as users get it, without booting a guest: what loading
it costs (it loads in every pytest run where qbackend is installed), that
it leaves the environment alone, where it looks for QEMU and the guest and
how it says that they are missing, its fixtures' documentation, the
``pytest`` extra, and qemu.qmp's log while QEMU is still coming up.
(tests/test_plugin_guest.py boots guests with it.)"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import tomllib
from pathlib import Path

import pytest

from qbackend.machine.qmp import QmpError, SyncQmp

REPO = Path(__file__).resolve().parent.parent
MACHINERY = ("trio", "qemu.qmp", "qbackend.testing.harness", "qbackend.app.service")

# Written into the folder a pytest subprocess runs in: what that session
# imported and its environment, recorded when it ends.
RECORDER = """
import json, os, sys

def pytest_unconfigure(config):
    with open("record.json", "w") as f:
        json.dump({"modules": sorted(sys.modules), "environ": dict(os.environ)}, f)
"""


def run_pytest(folder: Path, *args: str, env: dict[str, str] | None = None,
               autoload: bool = False) -> subprocess.CompletedProcess[str]:
    """pytest in `folder` with the plugin loaded: by name alone (no other
    plugin) unless `autoload`, when the entry points load it as they load
    every installed plugin."""
    env = dict(os.environ if env is None else env)
    for name in ("PYTHONPATH", "PYTEST_CURRENT_TEST"):  # this session's, not the one started here
        env.pop(name, None)
    options = ["-p", "no:cacheprovider"]
    if not autoload:
        env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
        options += ["-p", "qbackend.testing.plugin"]
    return subprocess.run([sys.executable, "-m", "pytest", "-q", *options, *args], cwd=folder,
                          capture_output=True, text=True, timeout=300, env=env)


def recorded(folder: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads((folder / "record.json").read_text())
    return data


def trivial(folder: Path, body: str = "def test_nothing():\n    pass\n") -> Path:
    (folder / "conftest.py").write_text(RECORDER)
    (folder / "test_trivial.py").write_text(body)
    return folder


# -- loading ------------------------------------------------------------------------------------


def test_loading_the_plugin_imports_none_of_the_machinery(tmp_path: Path) -> None:
    result = run_pytest(trivial(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    modules = set(recorded(tmp_path)["modules"])  # type: ignore[arg-type]
    assert "qbackend.testing.plugin" in modules
    assert not {m for m in modules if m.startswith(MACHINERY)}


def test_the_entry_point_loads_it_and_it_stays_lazy(tmp_path: Path) -> None:
    (ep,) = [ep for ep in importlib.metadata.entry_points(group="pytest11") if ep.name == "qbackend"]
    assert ep.value == "qbackend.testing.plugin"
    result = run_pytest(trivial(tmp_path), autoload=True)
    assert result.returncode == 0, result.stdout + result.stderr
    modules = set(recorded(tmp_path)["modules"])  # type: ignore[arg-type]
    assert "qbackend.testing.plugin" in modules
    # Other installed plugins may bring trio (hypothesis does): only qbackend's own machinery is checked.
    assert not {m for m in modules if m.startswith(("qemu.qmp", "qbackend.testing.harness", "qbackend.app"))}


def test_a_session_using_the_fixtures_and_every_option_changes_no_environment_variable(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "guest").mkdir(parents=True)
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd.img"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    trivial(tmp_path, "def test_uses_the_harness(qbackend_harness):\n"
                      "    assert qbackend_harness.guest_image().kernel.name == 'vmlinuz'\n")
    env = {k: v for k, v in os.environ.items() if k not in ("QEMU", "QBACKEND_DATA_DIR")}
    result = run_pytest(tmp_path, "--qbackend-qemu", "/usr/bin/true", "--qbackend-data-dir", str(data),
                        "--qbackend-kernel", str(kernel), "--qbackend-initrd", str(initrd), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    after: dict[str, str] = recorded(tmp_path)["environ"]  # type: ignore[assignment]
    expected = dict(env, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    for name in ("PYTHONPATH", "PYTEST_CURRENT_TEST"):
        expected.pop(name, None)
    assert after == expected


# -- where QEMU and the guest come from ---------------------------------------------------------

USES_THE_GUEST_IMAGE = """
import json

def test_where(qbackend_harness):
    image = qbackend_harness.guest_image()
    with open("where.json", "w") as f:
        json.dump([str(image.kernel), str(image.initrd)], f)
"""


def fake_data_dir(path: Path) -> Path:
    """A data directory with a guest (empty files: nothing boots it) and no QEMU."""
    (path / "guest").mkdir(parents=True)
    for name in ("vmlinuz", "initrd.img"):
        (path / "guest" / name).write_bytes(b"")
    return path


@pytest.mark.parametrize("how", ["option", "environment"])
def test_the_data_directory_is_honoured(tmp_path: Path, how: str) -> None:
    data = fake_data_dir(tmp_path / "data")
    trivial(tmp_path, USES_THE_GUEST_IMAGE)
    env = {k: v for k, v in os.environ.items() if k != "QBACKEND_DATA_DIR"}
    if how == "option":
        result = run_pytest(tmp_path, "--qbackend-data-dir", str(data), env=env)
    else:
        result = run_pytest(tmp_path, env=dict(env, QBACKEND_DATA_DIR=str(data)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "where.json").read_text()) == [str(data / "guest/vmlinuz"),
                                                                 str(data / "guest/initrd.img")]


def test_a_data_dir_option_naming_no_folder_is_a_one_line_usage_error(tmp_path: Path) -> None:
    result = run_pytest(trivial(tmp_path), "--qbackend-data-dir", str(tmp_path / "nowhere"))
    assert result.returncode == pytest.ExitCode.USAGE_ERROR
    assert result.stderr.strip() == f"ERROR: --qbackend-data-dir {tmp_path / 'nowhere'}: no such folder"


BOOTS = """
import pytest

@pytest.fixture(scope="module")
def vm(qbackend_vm):
    return qbackend_vm()

def test_boots(vm):
    pass
"""


@pytest.mark.parametrize("how", ["option", "environment"])
def test_a_data_directory_without_qemu_fails_the_test_with_one_line(tmp_path: Path, how: str) -> None:
    data = fake_data_dir(tmp_path / "data")
    trivial(tmp_path, BOOTS)
    env = {k: v for k, v in os.environ.items() if k not in ("QEMU", "QBACKEND_DATA_DIR")}
    if how == "option":
        result = run_pytest(tmp_path, "--qbackend-data-dir", str(data), env=env)
    else:
        result = run_pytest(tmp_path, env=dict(env, QBACKEND_DATA_DIR=str(data)))
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "1 error" in result.stdout
    said = [line for line in result.stdout.splitlines() if line.startswith("qbackend: ")]
    assert len(said) == 1 and f"no QEMU found: {data / 'qemu'} is missing" in said[0], result.stdout
    assert "--qbackend-data-dir" in said[0]
    assert "Traceback" not in result.stdout and "\nE " not in result.stdout, result.stdout


# -- documentation and packaging ----------------------------------------------------------------


def test_fixtures_show_their_own_documentation(tmp_path: Path) -> None:
    short = run_pytest(tmp_path, "--fixtures").stdout
    assert "see the plugin's documentation" not in short
    assert "A factory of booted guests with qbackend's devices (module-scoped):" in short
    assert "qbackend_vm(devices=[...], dimms=[...], disks=[...]" in short
    assert "qbackend's test harness (module-scoped)" in short
    full = run_pytest(tmp_path, "--fixtures", "-vv").stdout  # -q -vv: verbose
    assert "``disks``: image paths" in full and "``serve(backend)``" in full


def test_the_pytest_extra_brings_pytest_and_nothing_else() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert [req.split(">")[0] for req in extras["pytest"]] == ["pytest"]
    assert set(extras["pytest"]) <= set(extras["test"])


# -- qemu.qmp's log while QEMU comes up ---------------------------------------------------------


def test_retrying_until_the_socket_appears_logs_nothing_but_giving_up_says_why(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="qemu.qmp")
    missing = tmp_path / "qmp.sock"
    with pytest.raises(QmpError, match=f"cannot connect to QMP socket {re.escape(str(missing))}: .*No such file"):
        SyncQmp(missing, timeout=0.3)
    refused = tmp_path / "refused.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(refused))  # bound, not listening: refused
        with pytest.raises(QmpError, match=r"cannot connect to QMP socket .*Connection refused"):
            SyncQmp(refused, timeout=0.3)
    assert not [r for r in caplog.records if "Failed to establish connection" in r.getMessage()]


def test_a_peer_that_is_no_qmp_server_is_still_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "not-qmp.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(8)
    stop = threading.Event()

    def answer_nonsense() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b'{"hello": "not a QMP greeting"}\n')

    thread = threading.Thread(target=answer_nonsense, daemon=True)
    thread.start()
    # Whatever an earlier test left on qemu.qmp's logger (the command line, run in-process,
    # turns it down to CRITICAL): this test's records must reach caplog.
    caplog.set_level(logging.ERROR, logger="qemu.qmp")
    try:
        with pytest.raises(QmpError):
            SyncQmp(path, timeout=2)  # it retries until then: room for a few tries on a loaded machine
    finally:
        stop.set()
        thread.join()
        server.close()
    assert [r for r in caplog.records if r.name.startswith("qemu.qmp") and r.levelno >= logging.ERROR
            and "Failed to establish session" in r.getMessage()]
