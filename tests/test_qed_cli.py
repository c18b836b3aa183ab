"""`qbackend qed create|info|check|map|convert|resize`, checked against qemu-img."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from qed_tools import l2_entry_offset, poke_u64, qemu_check, qemu_img, qemu_io, read_header

from qbackend.app.cli import main
from qbackend.block.qed import Feature

MiB = 1 << 20


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    rc = main(["qed", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def test_create_info_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "a.qed"
    rc, out, _ = run(capsys, "create", "-o", "cluster_size=4K,table_size=2", img, "16M")
    assert rc == 0 and "fmt=qed size=16777216" in out
    theirs = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert theirs["virtual-size"] == 16 * MiB and theirs["cluster-size"] == 4096
    rc, out, _ = run(capsys, "info", "--output=json", img)
    info = json.loads(out)
    assert rc == 0 and info["table-size"] == 2 and info["dirty-flag"] is False
    rc, out, _ = run(capsys, "info", img)
    assert "virtual size: 16 MiB (16777216 bytes)" in out
    rc, out, _ = run(capsys, "check", img)
    assert rc == 0 and "No errors were found on the image." in out
    assert qemu_check(img)[0] == 0


def test_create_over_raw_backing_takes_its_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "base.raw").write_bytes(b"\x42" * (3 * MiB))
    img = tmp_path / "o.qed"
    rc, out, err = run(capsys, "create", "-b", "base.raw", "-F", "raw", img)
    assert rc == 0, err
    h = read_header(img)
    assert h.image_size == 3 * MiB and h.features == Feature.BACKING_FILE | Feature.BACKING_FORMAT_NO_PROBE
    info = json.loads(qemu_img("info", "--output=json", img).stdout)
    assert info["backing-filename"] == "base.raw" and info["backing-filename-format"] == "raw"
    qemu_io(img, "read -P 0x42 0 3M")
    rc, _, err = run(capsys, "create", "-b", "missing.raw", "-F", "raw", tmp_path / "x.qed", "1M")
    assert rc == 1 and "missing.raw" in err
    rc, _, _ = run(capsys, "create", "-u", "-b", "missing.raw", "-F", "raw", tmp_path / "x.qed", "1M")
    assert rc == 0


def test_check_exit_codes_match_qemu_img(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "c.qed"
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=2", img, "8M")
    qemu_io(img, "write -P 1 0 16384")
    with open(img, "ab") as f:
        f.write(bytes(8192))  # two leaked clusters
    rc, out, _ = run(capsys, "check", img)
    assert rc == qemu_check(img)[0] == 3 and "2 leaked clusters were found" in out
    poke_u64(img, l2_entry_offset(img, read_header(img), 4096), 1 << 40)  # past EOF
    rc, out, _ = run(capsys, "check", "--output=json", img)
    report = json.loads(out)
    assert rc == qemu_check(img)[0] == 2 and report["corruptions"] == 1 and report["leaks"] >= 2
    assert "past the end" in report["problems"][0]["message"]
    rc, out, _ = run(capsys, "check", "-r", img)
    assert "Repaired:" in out and "truncated" in out
    assert rc == qemu_check(img)[0] == 3  # the zeroed entry's old cluster stays leaked (mid-file)
    rc, _, err = run(capsys, "check", tmp_path / "nothing.qed")
    assert rc == 1 and err
    (tmp_path / "bad.qed").write_bytes(b"QED\0" + bytes(100))
    rc, _, err = run(capsys, "check", tmp_path / "bad.qed")
    assert rc == 1 and "cluster_size" in err


@pytest.mark.parametrize("backing", ["none", "qed"])
def test_map_json_equals_qemu_img_map(tmp_path: Path, capsys: pytest.CaptureFixture[str], backing: str) -> None:
    img = tmp_path / "m.qed"
    if backing == "qed":
        base = tmp_path / "base.qed"
        qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4096", base, "2M")
        qemu_io(base, "write -P 3 0 8192", "write -z 65536 65536", "write -P 4 1044480 8192")
        qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=2", "-b", "base.qed", "-F", "qed",
                 img, "4M")
    else:
        qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=2", img, "4M")
    qemu_io(img, "write -P 1 4096 8192", "write -z 20480 8192", "write -P 2 1048576 4096")
    theirs = json.loads(qemu_img("map", "--output=json", "-f", "qed", img).stdout)
    rc, out, _ = run(capsys, "map", "--output=json", img)
    mine = json.loads(out)
    strip = [{k: v for k, v in e.items() if k != "compressed"} for e in theirs]
    assert mine == strip


def test_convert_round_trip_and_resize(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = bytearray(random.Random(2).randbytes(3 * MiB))
    data[MiB:2 * MiB] = bytes(MiB)  # a hole to keep sparse
    (tmp_path / "in.raw").write_bytes(data)
    rc, _, err = run(capsys, "convert", "-p", "-O", "qed", "-o", "cluster_size=4K", tmp_path / "in.raw",
                     tmp_path / "out.qed")
    assert rc == 0 and "(100.00/100%)" in err
    assert qemu_check(tmp_path / "out.qed")[0] == 0, qemu_check(tmp_path / "out.qed")
    assert qemu_img("compare", "-f", "qed", "-F", "raw", tmp_path / "out.qed", tmp_path / "in.raw",
                    check=False).returncode == 0
    assert os.path.getsize(tmp_path / "out.qed") < 2.2 * MiB  # the zero MiB was not allocated
    rc, _, _ = run(capsys, "convert", tmp_path / "out.qed", tmp_path / "back.raw")
    assert rc == 0 and (tmp_path / "back.raw").read_bytes() == data
    rc, out, _ = run(capsys, "resize", tmp_path / "out.qed", "+1M")
    assert rc == 0 and json.loads(qemu_img("info", "--output=json", tmp_path / "out.qed").stdout)[
        "virtual-size"] == 4 * MiB
    rc, _, err = run(capsys, "resize", tmp_path / "out.qed", "1M")
    assert rc == 1 and "shrinking" in err
