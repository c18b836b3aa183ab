"""The command line's fast path (qbackend.app.cli.main): `--version` and the plain spellings
of `qed info` and `qed check` run without argparse, and must come out byte for byte as the
argparse path does; everything else must go to argparse.  Each case runs both ways."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from qed_tools import l2_entry_offset, poke_u64, qemu_img, qemu_io, read_header

import qbackend.app.cli.qed as qed_cli
from qbackend.app.cli import build_parser, main
from qbackend.block.qed import Feature, QedHeader, QedImage

MiB = 1 << 20


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """Images of every kind the commands report differently, in tmp_path (the cwd)."""
    qemu_img("create", "-q", "-f", "qed", tmp_path / "clean.qed", "64M")
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=2", tmp_path / "leaky.qed", "8M")
    qemu_io(tmp_path / "leaky.qed", "write -P 1 0 16384")
    with open(tmp_path / "leaky.qed", "ab") as f:
        f.write(bytes(8192 + 100))  # two leaked clusters and a partial one
    qemu_img("create", "-q", "-f", "qed", "-o", "cluster_size=4096,table_size=2", tmp_path / "corrupt.qed", "8M")
    qemu_io(tmp_path / "corrupt.qed", "write -P 1 0 16384")
    poke_u64(tmp_path / "corrupt.qed", l2_entry_offset(tmp_path / "corrupt.qed",
                                                       read_header(tmp_path / "corrupt.qed"), 4096), 1 << 40)
    (tmp_path / "base.raw").write_bytes(b"\x42" * MiB)
    qemu_img("create", "-q", "-f", "qed", "-b", "base.raw", "-F", "raw", tmp_path / "over.qed")
    qemu_img("create", "-q", "-f", "qed", tmp_path / "dirty.qed", "1M")
    with QedImage.open_path(tmp_path / "dirty.qed") as img:
        img.write(0, b"x" * 4096)
        img._keep_need_check = True  # closed as if the writer had died: NEED_CHECK stays
    assert read_header(tmp_path / "dirty.qed").features & Feature.NEED_CHECK
    (tmp_path / "bad.qed").write_bytes(b"QED\0" + bytes(100))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.qed").write_bytes((tmp_path / "clean.qed").read_bytes())
    return tmp_path


IMAGES = ["clean.qed", "leaky.qed", "corrupt.qed", "over.qed", "dirty.qed", "bad.qed", "missing.qed", "sub",
          "sub/a.qed", "ABS/clean.qed"]
FAST = [
    ["info", "{}"], ["info", "--output=json", "{}"], ["info", "--output", "json", "{}"],
    ["info", "{}", "--output=human"], ["check", "{}"], ["check", "--output=json", "{}"], ["check", "-q", "{}"],
    ["check", "-p", "{}"], ["check", "{}", "-q", "--output", "json"], ["check", "-r", "{}"],
    ["check", "--repair=leaks", "{}"], ["check", "--repair", "all", "-q", "{}"],
    ["check", "-r", "--repair=leaks", "--output=json", "{}"],
]
SLOW = [  # what argparse must parse (and mostly refuses)
    ["info", "--out=json", "{}"], ["info", "--output=xml", "{}"], ["info", "--output", "{}"], ["info"],
    ["info", "{}", "{}"], ["info", "--", "{}"], ["info", "-x", "{}"], ["info", "-"], ["info", ""],
    ["info", "./{}"], ["info", "sub//a.qed"], ["info", "sub/"], ["info", "."], ["info", "--help"],
    ["check", "-qp", "{}"], ["check", "-rq", "{}"], ["check", "--repair", "{}"], ["check", "--repair=xx", "{}"],
    ["check", "-r=all", "{}"], ["check", "-q=1", "{}"], ["check", "--rep", "all", "{}"], ["check", "--help"],
    ["map", "{}"], ["inf", "{}"], ["-v", "info", "{}"],
]


def run_both(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
             folder: Path) -> tuple[tuple[int | str, str, str], tuple[int | str, str, str], bool]:
    """(exit code, stdout, stderr) of `qbackend qed ARGV` as main runs it (the fast path where
    it can) and with argparse (on fresh copies of the images: check -r changes them); and
    whether the first took the fast path."""
    monkeypatch.delenv("QBACKEND_NATIVE", raising=False)  # the fast path's condition
    took: list[bool] = []
    fast_args = qed_cli.fast_args

    def spy(argv: list[str]) -> object:
        parsed = fast_args(argv)
        took.append(parsed is not None)
        return parsed

    out = []
    for fast in (True, False):
        work = folder / ("fast" if fast else "slow")
        if work.exists():
            subprocess.run(["rm", "-rf", str(work)], check=True)
        subprocess.run(["cp", "-a", str(folder / "orig"), str(work)], check=True)
        monkeypatch.chdir(work)
        with monkeypatch.context() as m:
            m.setattr(qed_cli, "fast_args", spy if fast else lambda argv: None)
            try:
                code: int | str = main(["qed", *(a.replace("ABS", str(work)) for a in argv)])
            except SystemExit as exc:
                code = f"exit {exc.code}"
        o, e = capsys.readouterr()
        for text in (str(work), str(work).lstrip("/")):  # (./ABS/... names it without its first /)
            o, e = o.replace(text, "ABS"), e.replace(text, "ABS")
        out.append((code, o, e))
    return out[0], out[1], took == [True]


@pytest.fixture
def folder(images: Path) -> Path:
    orig = images / "orig"
    orig.mkdir()
    for p in list(images.iterdir()):
        if p != orig:
            p.rename(orig / p.name)
    return images


@pytest.mark.parametrize("argv", FAST + SLOW, ids=" ".join)
def test_fast_path_prints_what_argparse_does(argv: list[str], folder: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for image in IMAGES if "{}" in " ".join(argv) else [""]:
        words = [a.replace("{}", image) for a in argv]
        fast, slow, took_fast_path = run_both(words, capsys, monkeypatch, folder)
        assert fast == slow, words
        assert took_fast_path == (argv in FAST), words


@pytest.mark.parametrize("argv", FAST, ids=" ".join)
def test_the_plain_spellings_take_the_fast_path(argv: list[str]) -> None:
    """And parse to what argparse parses them to (the file name as str(Path) gives it)."""
    words = [a.replace("{}", "disk.qed") for a in argv]
    fast = qed_cli.fast_args(words)
    assert fast is not None
    parsed = vars(build_parser(["qed", *words]).parse_args(["qed", *words]))
    parsed["filename"] = str(parsed["filename"])
    assert vars(fast) == parsed


@pytest.mark.parametrize("argv", SLOW, ids=" ".join)
def test_everything_else_goes_to_argparse(argv: list[str]) -> None:
    assert qed_cli.fast_args([a.replace("{}", "disk.qed") for a in argv]) is None


def test_the_fast_path_reads_the_one_option_table() -> None:
    """--help lists every option of the table, and the fast parser knows no other."""
    parser = build_parser(["qed"])
    for name in qed_cli.FAST:
        rows = qed_cli.SUBCOMMANDS[name][1]
        sub = parser._subparsers._group_actions[0].choices["qed"]  # type: ignore[union-attr]
        actions = sub._subparsers._group_actions[0].choices[name]._actions  # type: ignore[union-attr]
        declared = {flag for flags, _ in rows for flag in flags if flag.startswith("-")}
        assert {s for a in actions for s in a.option_strings} - {"-h", "--help"} == declared


def test_version_is_argparse_s(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as fast:
        main(["--version"])
    fast_out = capsys.readouterr()
    with pytest.raises(SystemExit) as slow:
        build_parser(["--version"]).parse_args(["--version"])
    assert (fast.value.code, fast_out) == (slow.value.code, capsys.readouterr())


@pytest.mark.parametrize("argv", [["--version"], ["qed", "info", "IMG"], ["qed", "check", "IMG"],
                                  ["qed", "info", "--output=json", "IMG"], ["qed", "check", "-r", "IMG"]],
                         ids=" ".join)
def test_light_commands_import_nothing_heavy(argv: list[str], tmp_path: Path) -> None:
    """What makes a start slow stays out of --version, qed info and qed check (json, and the
    re and enum it imports, for --output=json only)."""
    img = tmp_path / "a.qed"
    qemu_img("create", "-q", "-f", "qed", img, "16M")
    code = ("import sys\nfrom qbackend.app.cli import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print(' '.join(sorted(sys.modules)), file=sys.stderr)\n")
    env = {k: v for k, v in os.environ.items() if k != "QBACKEND_NATIVE"}
    result = subprocess.run([sys.executable, "-c", code, *(str(img) if a == "IMG" else a for a in argv)],
                            capture_output=True, text=True, env=env, check=True)
    loaded = set(result.stderr.split())
    heavy = {"argparse", "logging", "dataclasses", "inspect", "pathlib", "typing", "ctypes", "random", "cffi",
             "threading", "qbackend.plumbing.native", "qbackend.app.cli.common", "qbackend.sizes",
             "qbackend.options"}
    if "--output=json" not in argv:
        heavy |= {"json", "re", "enum"}  # (json imports re, and re enum)
    assert loaded & heavy == set()


def test_check_reads_every_piece_of_the_l1_table() -> None:
    """The check skips the all-zero pieces of the L1 table: entries in any piece, first and
    last included, are still checked and counted."""
    from qbackend.block.blockfile import MemoryBlock

    m = MemoryBlock()
    QedImage.create(m, 16 << 30, cluster_size=4096, table_size=4)  # 2048 L1 entries of 8 MiB
    img = QedImage.open(m)
    for index in (0, 511, 512, 1500, 2047):
        img.write(index * (8 << 20), b"x" * 4096)
    img.close()
    report = QedImage.open(MemoryBlock(bytes(m.data)), read_only=True).check()
    assert (report.allocated_clusters, report.corruptions) == (5, [])
    h = read_header_of(m)
    m.data[h.l1_table_offset + 8 * 1600:h.l1_table_offset + 8 * 1601] = (12345).to_bytes(8, "little")
    report = QedImage.open(MemoryBlock(bytes(m.data)), read_only=True, check_on_open=False).check()
    assert [p.index for p in report.corruptions] == [1600] and report.allocated_clusters == 5


def read_header_of(m: object) -> QedHeader:
    from qbackend.block.qed import HEADER

    return QedHeader.unpack(bytes(m.data[:HEADER.size]))  # type: ignore[attr-defined]


@pytest.mark.parametrize("argv", [["--version"], ["qed", "info", "{}"], ["qed", "check", "{}"],
                                  ["qed", "check", "--output=json", "{}"], ["qed", "check", "-r", "{}"]],
                         ids=" ".join)
def test_a_light_process_ends_as_the_full_one_does(argv: list[str], folder: Path) -> None:
    """`python -m qbackend` ends a light command with os._exit (no finalization): its output
    through a pipe, its exit code and what a repair wrote are those of the same command run
    the usual way (QBACKEND_NATIVE=off sends it through argparse and a normal exit)."""
    for image in ("clean.qed", "leaky.qed", "corrupt.qed", "dirty.qed", "bad.qed", "missing.qed"):
        results = []
        for native in ("auto", "off"):
            work = folder / native
            subprocess.run(["rm", "-rf", str(work)], check=True)
            subprocess.run(["cp", "-a", str(folder / "orig"), str(work)], check=True)
            env = {**os.environ, "QBACKEND_NATIVE": native}
            done = subprocess.run([sys.executable, "-m", "qbackend", *(a.replace("{}", image) for a in argv)],
                                  cwd=work, env=env, capture_output=True, text=True)
            after = (work / image).read_bytes() if (work / image).is_file() else b""
            results.append((done.returncode, done.stdout, done.stderr, after))
        assert results[0] == results[1], (argv, image)
        assert results[0][1] or results[0][2], (argv, image)  # it said something
