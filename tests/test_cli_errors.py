"""User errors at the command line: one line on stderr saying what is wrong
and what to do, no traceback, qemu-img-like exit codes (1: the operation
failed, 2: the command line is wrong); --version; and what the servers say
they served when they stop."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from qbackend.protocol.vfio_user import PciRegion
from qbackend.testing.harness import wait_until
from qbackend.testing.vfio_user_client import VfioUserClient


def qbackend(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qbackend", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)


def one_line_error(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert result.returncode == code, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_nbd_on_a_corrupt_qed_image(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qed"
    bad.write_bytes(b"QED\0" + bytes(60))  # the magic, then a header of zeros: cluster size 0
    one_line_error(qbackend("nbd", "--export", f"name=d,image={bad},format=qed", "--socket",
                            str(tmp_path / "n.sock"), cwd=tmp_path), 1, "cluster")
    assert not (tmp_path / "n.sock").exists()


def test_nbd_on_a_truncated_qed_image(tmp_path: Path) -> None:
    bad = tmp_path / "short.qed"
    bad.write_bytes(b"QED\0garbage")
    one_line_error(qbackend("nbd", "--export", f"name=d,image={bad},format=qed", "--socket", str(tmp_path / "n.sock"),
                            cwd=tmp_path), 1, "too short")


def test_nbd_on_a_missing_image(tmp_path: Path) -> None:
    one_line_error(qbackend("nbd", "--export", f"name=d,image={tmp_path / 'nope.qed'},format=qed", "--socket",
                            str(tmp_path / "n.sock"), cwd=tmp_path), 1, "nope.qed", "does not exist")


@pytest.mark.parametrize("export, words", [
    ("name=d,imag=x.qed", ("unknown key", "imag", "--help")),
    ("name=d", ("image=PATH is required",)),
    ("name=d,image=x.qed,format=vmdk", ("raw or qed",)),
    ("name=d,image=x.qed,readonly=maybe", ("on/off",)),
    ("justtext", ("not key=value",)),
])
def test_nbd_with_a_malformed_option(tmp_path: Path, export: str, words: tuple[str, ...]) -> None:
    one_line_error(qbackend("nbd", "--export", export, "--socket", str(tmp_path / "n.sock"), cwd=tmp_path), 2,
                   *words)


def test_nbd_where_it_cannot_listen(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(4096))
    (tmp_path / "file").write_text("not a folder")
    one_line_error(qbackend("nbd", "--export", f"image={img},format=raw", "--socket",
                            str(tmp_path / "file" / "x.sock"), cwd=tmp_path), 1, "file")


@pytest.mark.parametrize("args, words", [
    (("serve", "--ivshmem", "socket=S,size=lots"), ("--ivshmem size", "'lots' is not a size", "bytes")),
    (("serve", "--ivshmem", "socket=S,size=3000"), ("power of two",)),
    (("serve", "--hotplug", "socket=S,ram=huge"), ("--hotplug ram", "MiB")),
    (("serve", "--hotplug", "socket=S,slots=x"), ("slots", "not a number")),
    (("serve", "--dimm", "id=a,size=100M"), ("multiple of 128M",)),
    (("run", "--memory", "512Q"), ("--memory", "not a size")),
    (("drc", "dt", "--memory", "1X"), ("--memory", "not a size")),
    (("qed", "create", "x.qed", "1Q"), ("not a size",)),
    (("ivshmem", "server", "--socket", "s.sock", "--size", "big"), ("--size",)),
    (("serve", "--bogus"), ("unrecognized arguments",)),
])
def test_bad_sizes_and_options(tmp_path: Path, args: tuple[str, ...], words: tuple[str, ...]) -> None:
    one_line_error(qbackend(*args, cwd=tmp_path), 2, *words)


def test_unreachable_control_socket(tmp_path: Path) -> None:
    result = qbackend("dimm", "--control", str(tmp_path / "none.sock"), "list", cwd=tmp_path)
    one_line_error(result, 1, "cannot reach", "none.sock")
    assert result.stdout == ""


@pytest.mark.parametrize("command", [("dimm", "list"), ("pci", "list"), ("ivshmem", "peers"),
                                     ("device", "trace-stop", "x")], ids=" ".join)
def test_control_after_the_action_is_the_same_as_before_it(tmp_path: Path, command: tuple[str, ...]) -> None:
    """`qbackend dimm list --control PATH` as people type it, and `--instance` there too."""
    group, *rest = command
    sock = str(tmp_path / "none.sock")
    before = qbackend(group, "--control", sock, *rest, cwd=tmp_path)
    after = qbackend(group, *rest, "--control", sock, cwd=tmp_path)
    one_line_error(after, 1, "cannot reach", "none.sock")
    assert (after.returncode, after.stdout, after.stderr) == (before.returncode, before.stdout, before.stderr)
    both = qbackend(group, "--instance", "x", *rest, "--control", sock, cwd=tmp_path)
    one_line_error(both, 2, "--instance NAME or --control PATH")


@pytest.mark.parametrize("args", [("--version",), ("qed", "info", "a.qed"), ("qed", "check", "a.qed"),
                                  ("qed", "map", "a.qed"), ("qed", "info", "--output=json", "a.qed")], ids=" ".join)
@pytest.mark.parametrize("native", ["auto", "off"])  # the light path and argparse's
def test_a_reader_that_goes_ends_the_command_quietly(tmp_path: Path, args: tuple[str, ...], native: str) -> None:
    """`qbackend qed info X | head -0`: as qemu-img, no message; the shell's 128 + SIGPIPE."""
    assert qbackend("qed", "create", "a.qed", "1M", cwd=tmp_path).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", *args], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "QBACKEND_NATIVE": native})
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # gone before anything is written
    assert (proc.wait(60), proc.stderr.read()) == (141, b"")
    proc.stderr.close()


def test_unknown_machine_profile(tmp_path: Path) -> None:
    one_line_error(qbackend("run", "--machine", "nope", "--workdir", str(tmp_path / "w"), cwd=tmp_path), 1,
                   "no machine profile", "pc, q35")


@pytest.mark.parametrize(("option", "code", "words"), [
    ("socket={sock}", 2, ("image=PATH", "required")),
    ("socket={sock},image={tmp}/missing.qed,format=qed", 1, ("vub0", "does not exist")),
    ("socket={sock},image={tmp}/raw.img", 1, ("format=qed or format=raw",)),
    ("socket={sock},image={tmp}/raw.img,format=raw,num-queues=0", 2, ("num-queues=0", "1..64")),
    ("socket={sock},image={tmp}/raw.img,format=vmdk", 2, ("raw or qed",)),
    ("socket={sock},image={tmp}/raw.img,format=raw,queues=2", 2, ("unknown key", "queues")),
])
def test_serve_vhost_user_blk_errors(tmp_path: Path, option: str, code: int, words: tuple[str, ...]) -> None:
    (tmp_path / "raw.img").write_bytes(bytes(1 << 20))
    sock = tmp_path / "vub.sock"
    one_line_error(qbackend("serve", "--vhost-user-blk", option.format(sock=sock, tmp=tmp_path), cwd=tmp_path),
                   code, *words)
    assert not sock.exists()


USER_DEVICE = '''\
from qbackend.devices import Device


class Counter(Device):
    def __init__(self, start: str = "0") -> None:
        super().__init__()
        self.start = int(start)
'''


@pytest.mark.parametrize("args, words", [
    (("--ivshmem", "socket=a.sock,id=x", "--ivshmem", "socket=b.sock,id=x"), ("device id 'x'", "used twice")),
    (("--ivshmem", "socket=a.sock,shm={shm},size=4M", "--ivshmem", "socket=b.sock,shm={shm},size=8M"),
     ("shm={shm}", "4194304", "8388608")),
    (("--ivshmem", "socket=a.sock,shm={shm},peer=1", "--ivshmem", "socket=b.sock,shm={shm},peer=1"),
     ("group {shm}", "peer id 1 is taken")),
    (("--nbd", "name=d,image=d.raw,format=raw", "--nbd", "name=d,image=d.raw,format=raw", "--nbd-socket", "n.sock"),
     ("export name 'd'", "used twice")),
    (("--nbd", "name=d,image=d.raw,format=raw", "--nbd-socket", "n.sock",
      "--vhost-user-blk", "socket=v.sock,image=d.raw,format=raw,id=d"), ("block node 'd'", "used twice")),
    (("--hotplug", "socket=h.sock,slots=1", "--dimm", "id=a,size=128M", "--dimm", "id=b,size=128M"),
     ("2 DIMMs", "1 slots")),
    (("--device", "socket=a.sock,class=dev.py:Counter,start=abc"), ("class=dev.py:Counter", "start=abc")),
])
def test_serve_with_devices_that_do_not_fit_together(tmp_path: Path, args: tuple[str, ...],
                                                     words: tuple[str, ...]) -> None:
    (tmp_path / "d.raw").write_bytes(bytes(1 << 20))
    (tmp_path / "dev.py").write_text(USER_DEVICE)
    shm = f"qbackend-test-{tmp_path.name}"
    try:
        one_line_error(qbackend("serve", *(a.format(shm=shm) for a in args), cwd=tmp_path), 2,
                       *(w.format(shm=shm) for w in words))
    finally:
        (Path("/dev/shm") / shm).unlink(missing_ok=True)
    assert not list(tmp_path.glob("*.sock"))


def test_nbd_on_a_busy_tcp_port_names_the_address(tmp_path: Path) -> None:
    (tmp_path / "d.raw").write_bytes(bytes(4096))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        address = f"127.0.0.1:{busy.getsockname()[1]}"
        one_line_error(qbackend("nbd", "--export", "image=d.raw,format=raw", "--tcp", address, cwd=tmp_path), 1,
                       address, "in use")


def test_console_on_a_missing_socket_names_it(tmp_path: Path) -> None:
    one_line_error(qbackend("console", "nothere.sock", cwd=tmp_path), 1, "nothere.sock", "No such file")


def test_version() -> None:
    from qbackend.version import __version__

    result = qbackend("--version", cwd=Path.cwd())
    assert result.returncode == 0 and result.stderr == "", result
    assert result.stdout == f"qbackend {__version__}\n"


def served(args: list[str], cwd: Path, sock: Path, client: Callable[[], None]) -> str:
    """Run `qbackend ARGS` natively, let `client` use it, stop it with SIGTERM: its stdout."""
    env = {**os.environ, "QBACKEND_NATIVE": "require"}
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(sock.exists, 30, "the socket")
        client()
    finally:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "Traceback" not in err, err
    return out


def test_nbd_says_what_it_served_at_stop(tmp_path: Path) -> None:
    image, back, sock = tmp_path / "d.raw", tmp_path / "back.raw", tmp_path / "nbd.sock"
    image.write_bytes(os.urandom(1 << 20))

    def read_it() -> None:  # requests below BULK (64 KiB): the native loop's, not a thread's
        subprocess.run(["nbdcopy", "--request-size=16384", f"nbd+unix:///d?socket={sock}", str(back)], check=True,
                       timeout=60)

    out = served(["nbd", "--export", f"name=d,image={image},format=raw", "--socket", str(sock)], tmp_path, sock,
                 read_it)
    assert back.read_bytes() == image.read_bytes()
    lines = [line for line in out.splitlines() if line.startswith("served: ")]
    assert len(lines) == 1 and out.endswith(lines[0] + "\n"), out
    counts = {key: int(n) for key, n in (pair.split(" ") for pair in lines[0][len("served: "):].split(", "))}
    assert list(counts) == sorted(counts) and all(counts.values()), lines[0]
    assert counts["native_reads"] > 0 and counts["READ"] >= counts["native_reads"], lines[0]


def test_serve_says_what_each_device_served_at_stop(tmp_path: Path) -> None:
    sock = tmp_path / "iv.sock"

    def read_config() -> None:
        with VfioUserClient(str(sock)) as client:
            client.negotiate()
            for _ in range(100):
                client.read32(PciRegion.CONFIG, 0)

    out = served(["serve", "--ivshmem", f"socket={sock},size=1M,id=iv0"], tmp_path, sock, read_config)
    line = next(line for line in out.splitlines() if line.startswith("iv0: served native_accesses "))
    assert int(line.rsplit(" ", 1)[1]) >= 100, out
