"""User errors at the command line: one line on stderr saying what is wrong
and what to do, no traceback, qemu-img-like exit codes (1: the operation
failed, 2: the command line is wrong)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


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
