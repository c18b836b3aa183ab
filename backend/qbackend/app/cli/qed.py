"""`qbackend qed ...`: QED image tools that read like qemu-img.

    qbackend qed create [-o cluster_size=64K,table_size=4] [-b BACKING [-F raw|qed]] FILE [SIZE]
    qbackend qed info [--output=json] FILE
    qbackend qed check [-r | --repair=leaks|all] [--output=json] FILE   # exit 0 clean, 2 corrupt, 3 leaks
    qbackend qed map [--output=json] FILE
    qbackend qed convert [-O qed|raw] [-o ...] [-p] SRC DST
    qbackend qed resize FILE [+]SIZE

`register` adds the group to qbackend's parser; `run` dispatches to its subcommand.
"""

from __future__ import annotations

import os
import sys
import time

from qbackend.app.cli.commands import SUMMARIES
from qbackend.errors import UsageError

# `qed info` and `qed check` are commands a script runs often: this module imports only
# what they use, when they use it (argparse, json, pathlib and the image code's helpers
# stay out of a start that does not need them).
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Callable
    from typing import Any, TextIO

    from qbackend.app.cli.common import Subparsers
    from qbackend.block.qed import Extent, QedImage, RawBacking
    from qbackend.block.qed_check import CheckReport

EPILOG = """\
examples:
  qbackend qed create -o cluster_size=4K,table_size=2 disk.qed 10G
  qbackend qed create -b base.raw -F raw overlay.qed
  qbackend qed check -r disk.qed
  qbackend qed map --output=json disk.qed
  qbackend qed convert -p -O qed disk.raw disk.qed

check exits like qemu-img check: 0 no problems, 1 the check could not run,
2 corruptions remain, 3 only leaked clusters remain.
"""

CHUNK = 4 << 20


class CliError(UsageError):
    """A qed command that cannot run as written."""


# -- the subcommands and their options ---------------------------------------------------
#
# Declared once, here: `register` hands each row to argparse as it stands (so --help and
# every error are argparse's), and `fast_args` parses the plain spellings of the rows of the
# FAST subcommands without argparse.  A row is (flags or name, add_argument's keywords);
# "type": PATH is pathlib.Path, imported only when argparse is.

PATH = "path"
Row = tuple[tuple[str, ...], dict[str, object]]
_OUTPUT: Row = (("--output",), {"choices": ["human", "json"], "default": "human"})
_FILENAME: Row = (("filename",), {"type": PATH})
SUBCOMMANDS: dict[str, tuple[str, list[Row]]] = {
    "create": ("create an empty image", [
        (("-f",), {"dest": "fmt", "default": "qed", "choices": ["qed"], "help": "format (only qed)"}),
        (("-o",), {"dest": "options", "action": "append", "default": [], "metavar": "OPTIONS",
                   "help": "cluster_size=SIZE (4K..64M, default 64K), table_size=N (1..16, default 4), "
                           "backing_file=, backing_fmt="}),
        (("-b",), {"dest": "backing", "help": "backing file (a path relative to the image's folder)"}),
        (("-F",), {"dest": "backing_fmt", "choices": ["raw", "qed"],
                   "help": "backing file format; raw sets the no-probe bit (default: probe)"}),
        (("-u",), {"dest": "unsafe", "action": "store_true", "help": "do not open the backing file"}),
        (("-q",), {"dest": "quiet", "action": "store_true", "help": "quiet"}),
        _FILENAME,
        (("size",), {"nargs": "?", "help": "e.g. 10G; a bare number is bytes, as for qemu-img (default: the "
                                           "backing file's size)"}),
    ]),
    "info": ("show the header and sizes", [_OUTPUT, _FILENAME]),
    "check": ("check (and repair) the metadata", [
        (("-r",), {"dest": "repair", "action": "store_const", "const": "all",
                   "help": "repair everything repairable"}),
        (("--repair",), {"dest": "repair", "choices": ["leaks", "all"], "help": "what to repair"}),
        _OUTPUT,
        (("-q",), {"dest": "quiet", "action": "store_true", "help": "quiet"}),
        (("-p",), {"dest": "progress", "action": "store_true", "help": "show progress"}),
        _FILENAME,
    ]),
    "map": ("show the allocation: data, zero, backing, unallocated", [_OUTPUT, _FILENAME]),
    "convert": ("copy an image (raw or qed) to a new raw or qed image", [
        (("-f",), {"dest": "src_fmt", "choices": ["raw", "qed"], "help": "source format (default: probe)"}),
        (("-O",), {"dest": "out_fmt", "choices": ["raw", "qed"], "default": "raw"}),
        (("-o",), {"dest": "options", "action": "append", "default": [], "metavar": "OPTIONS",
                   "help": "cluster_size=, table_size= for qed output"}),
        (("-p",), {"dest": "progress", "action": "store_true", "help": "show progress"}),
        (("src",), {"type": PATH}),
        (("dst",), {"type": PATH}),
    ]),
    "resize": ("grow an image (shrinking is not supported, as in QEMU)", [
        (("-f",), {"dest": "fmt", "default": "qed", "choices": ["qed"]}),
        _FILENAME,
        (("size",), {"help": "new size, or +SIZE"}),
    ]),
}
FAST = ("info", "check")  # the subcommands `fast_args` parses


def register(sub: Subparsers) -> None:
    """Register `qed` and its subcommands on the top-level subparsers."""
    import argparse
    from pathlib import Path

    qed = sub.add_parser("qed", help=SUMMARIES["qed"],
                         description="QED image tools with qemu-img's vocabulary.",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    cmds = qed.add_subparsers(dest="qed_command", metavar="SUBCOMMAND", required=True)
    for name, (summary, rows) in SUBCOMMANDS.items():
        cmd = cmds.add_parser(name, help=summary)
        for flags, keywords in rows:
            keywords = {**keywords, "type": Path} if keywords.get("type") == PATH else keywords
            cmd.add_argument(*flags, **keywords)  # type: ignore[arg-type]
    qed.set_defaults(func=run)


class _Args:
    """The namespace argparse makes, for a command line `fast_args` takes."""

    def __init__(self, **values: object) -> None:
        self.__dict__.update(values)


def fast_args(argv: list[str]) -> argparse.Namespace | None:
    """What `qbackend qed ARGV` parses to, without argparse, for the plain spellings of a
    FAST subcommand: its options as declared (`--output json`, `--output=json`, `-r`, each
    on its own), values among their choices, and one file name in the form pathlib gives it
    back (what the command prints).  None for anything else (abbreviations, `-rq`, `--`,
    --help, an error of any kind): argparse parses those, and says what is wrong."""
    if not argv or argv[0] not in FAST:
        return None
    rows = SUBCOMMANDS[argv[0]][1]
    options = {flag: keywords for flags, keywords in rows if flags[0].startswith("-") for flag in flags}
    names = [flags[0] for flags, keywords in rows if not flags[0].startswith("-")]
    values: dict[str, object] = {"verbose": 0, "data_dir": None, "command": "qed", "qed_command": argv[0]}
    for flags, keywords in rows:
        dest = str(keywords.get("dest", flags[0].lstrip("-")))
        values[dest] = keywords.get("default", False if keywords.get("action") == "store_true" else None)
    given: list[str] = []
    words = iter(argv[1:])
    for word in words:
        if not word.startswith("-"):
            given.append(word)
            continue
        flag, eq, value = word.partition("=")
        option = options.get(flag)
        if option is None:
            return None
        dest = str(option.get("dest", flag.lstrip("-")))
        action = option.get("action")
        if action is None:  # a value: `--flag VALUE` or `--flag=VALUE` (not `-fVALUE`)
            if not eq:
                value = next(words, "-")
            choices = option.get("choices")
            if value.startswith("-") or (eq and not flag.startswith("--")) or (
                    isinstance(choices, list) and value not in choices):
                return None
            values[dest] = value
        elif eq or action not in ("store_true", "store_const"):
            return None
        else:
            values[dest] = True if action == "store_true" else option["const"]
    if len(given) != len(names):
        return None
    for name, word in zip(names, given, strict=True):
        if not _plain_path(word):
            return None
        values[name] = word
    values["func"] = run
    return _Args(**values)  # type: ignore[return-value]


def _plain_path(word: str) -> bool:
    """Whether `word` is a path as str(pathlib.Path(word)) gives it back: not empty, no
    empty or `.` component (`a//b`, `./a`, `a/`), and no leading `//`."""
    parts = word.split("/")
    return bool(word) and all(part not in ("", ".") for part in parts[1 if word.startswith("/") else 0:])


def run(args: argparse.Namespace) -> int:
    try:
        handler: Callable[[argparse.Namespace], int] = {
            "create": _create, "info": _info, "check": _check, "map": _map, "convert": _convert,
            "resize": _resize,
        }[args.qed_command]
        return handler(args)
    except BaseException as exc:  # reported as main() does, with the subcommand's name
        from qbackend.app.cli.common import report

        failed = report(f"qbackend qed {args.qed_command}", exc)
        if failed is None:
            raise
        return failed


# -- helpers ---------------------------------------------------------------------------


def _size(text: str, what: str) -> int:
    from qbackend.sizes import parse_size

    return parse_size(text, what, default_unit="B")  # qemu-img: a bare size is bytes


def _format_options(options: list[str]) -> dict[str, str]:
    from qbackend.options import OptionError, parse_keyval  # only -o needs them

    merged: dict[str, str] = {}
    for text in options:
        for key, value in parse_keyval(text, "-o").items():
            if key not in ("cluster_size", "table_size", "backing_file", "backing_fmt"):
                raise OptionError(f"-o: unknown option '{key}' (cluster_size, table_size, backing_file, "
                                  "backing_fmt)")
            merged[key] = value
    return merged


def _human(n: int) -> str:
    for unit, scale in (("EiB", 1 << 60), ("PiB", 1 << 50), ("TiB", 1 << 40), ("GiB", 1 << 30),
                        ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"


class Progress:
    """qemu-img style: '    (42.00/100%)' rewritten in place on stderr."""

    def __init__(self, enabled: bool, out: TextIO | None = None) -> None:
        self.enabled = enabled
        self.out = out if out is not None else sys.stderr
        self.last = -1.0
        self.last_time = 0.0

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        pct = 100.0 * done / total if total else 100.0
        now = time.monotonic()
        if pct < 100.0 and (pct - self.last < 1.0 or now - self.last_time < 0.1):
            return
        self.last, self.last_time = pct, now
        self.out.write(f"    ({pct:.2f}/100%)\r")
        self.out.flush()

    def done(self) -> None:
        if self.enabled:
            if self.last < 100.0:
                self(1, 1)
            self.out.write("\n")


def _open(path: str | os.PathLike[str], *, read_only: bool = True, open_backing: bool = True,
          check_on_open: bool = True) -> QedImage:
    from qbackend.block.qed import QedImage

    return QedImage.open_path(path, read_only=read_only, open_backing=open_backing, check_on_open=check_on_open)


# -- create ------------------------------------------------------------------------------


def _create(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qbackend.block.blockfile import FileBlock
    from qbackend.block.qed import DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE, QedImage, open_backing_file

    opts = _format_options(args.options)
    cluster_size = _size(opts["cluster_size"], "cluster_size") if "cluster_size" in opts else DEFAULT_CLUSTER_SIZE
    table_size = int(opts.get("table_size", DEFAULT_TABLE_SIZE))
    backing = args.backing or opts.get("backing_file")
    backing_fmt = args.backing_fmt or opts.get("backing_fmt")
    if backing_fmt not in (None, "raw", "qed"):
        raise CliError(f"backing format '{backing_fmt}' is not raw or qed")
    if backing_fmt and not backing:
        raise CliError("-F needs a backing file (-b)")
    size: int | None = _size(args.size, "size") if args.size is not None else None
    if backing and (size is None or not args.unsafe):
        target = Path(backing) if Path(backing).is_absolute() else args.filename.parent / backing
        opened = open_backing_file(target, raw=backing_fmt == "raw")
        try:
            if backing_fmt == "qed" and not isinstance(opened, QedImage):
                raise CliError(f"backing file {backing} is not a QED image")
            if size is None:
                size = opened.size()
        finally:
            opened.close()
    if size is None:
        raise CliError("give a size (or a backing file to take it from)")
    f = FileBlock.open(args.filename, create=True)
    try:
        header = QedImage.create(f, size, cluster_size=cluster_size, table_size=table_size, backing_file=backing,
                                 backing_raw=backing_fmt == "raw")
    finally:
        f.close()
    if not args.quiet:
        extra = f" backing_file={backing}" + (f" backing_fmt={backing_fmt}" if backing_fmt else "") if backing else ""
        print(f"Formatting '{args.filename}', fmt=qed size={header.image_size}{extra} "
              f"cluster_size={cluster_size} table_size={table_size}")
    return 0


# -- info -----------------------------------------------------------------------------------


def _info(args: argparse.Namespace) -> int:
    with _open(args.filename, open_backing=False, check_on_open=False) as img:
        info = img.info()
    st = os.stat(args.filename)
    info = {"filename": str(args.filename), **info, "actual-size": st.st_blocks * 512}
    if args.output == "json":
        import json

        print(json.dumps(info, indent=4))
        return 0
    print(f"image: {args.filename}")
    print("file format: qed")
    print(f"virtual size: {_human(int(info['virtual-size']))} ({info['virtual-size']} bytes)")  # type: ignore[call-overload]
    print(f"disk size: {_human(int(info['actual-size']))}")  # type: ignore[call-overload]
    print(f"cluster_size: {info['cluster-size']}")
    print(f"table_size: {info['table-size']}")
    if info["backing-filename"] is not None:
        print(f"backing file: {info['backing-filename']}")
        if info["backing-filename-format"]:
            print(f"backing file format: {info['backing-filename-format']}")
    print(f"dirty (needs check): {'yes' if info['dirty-flag'] else 'no'}")
    for key in ("compat-features", "autoclear-features"):
        if info[key]:
            print(f"{key}: {info[key]:#x}")
    return 0


# -- check --------------------------------------------------------------------------------------


def _check(args: argparse.Namespace) -> int:
    from qbackend.block.qed import QedError

    repair = args.repair is not None
    progress = Progress(args.progress and args.output == "human")
    try:
        img = _open(args.filename, read_only=not repair, open_backing=False, check_on_open=False)
    except (QedError, OSError) as exc:
        print(f"qbackend qed check: {args.filename}: {exc}", file=sys.stderr)
        return 1
    with img:
        try:
            report = img.check(repair=repair, leaks_only=args.repair == "leaks", progress=progress)
        except KeyboardInterrupt:
            # One line; the image is as it was (a check), or consistent with what was repaired
            # so far, NEED_CHECK left as it was (a repair: QedImage.check says why).
            print(f"qbackend qed check: {args.filename}: interrupted", file=sys.stderr)
            return 130
        progress.done()
    if args.output == "json":
        import json

        print(json.dumps({"filename": str(args.filename), "format": "qed", **report.to_json()}, indent=4))
    elif not args.quiet:
        _print_check(report)
    return report.exit_code


def _print_check(r: CheckReport) -> None:
    for p in r.corruptions:
        tag = "Repaired" if p.fixed else "ERROR"
        print(f"{tag}: {p}")
    for line in r.changes:
        print(f"Changed: {line}")
    if r.leaks_remaining:
        for off, n in r.leak_ranges:
            print(f"Leaked cluster(s) at file offset {off:#x}, {n // r.cluster_size} cluster(s)")
    if r.corruptions_fixed or r.leaks_fixed:
        print(f"The following inconsistencies were found and repaired:\n\n"
              f"    {r.leaks_fixed} leaked clusters\n    {r.corruptions_fixed} corruptions\n")
    if r.corruptions_remaining == 0 and r.leaks_remaining == 0:
        print("No errors were found on the image.")
    if r.corruptions_remaining:
        print(f"\n{r.corruptions_remaining} errors were found on the image.\n"
              "Data may be corrupted, or further writes to the image may corrupt it.")
    if r.leaks_remaining:
        print(f"\n{r.leaks_remaining} leaked clusters were found on the image.\n"
              "This means waste of disk space, but no harm to data.")
    if r.total_clusters:
        print(f"{r.allocated_clusters}/{r.total_clusters} = {100 * r.allocated_clusters / r.total_clusters:.2f}% "
              f"allocated, {100 * r.fragmented_clusters / max(1, r.allocated_clusters):.2f}% fragmented, "
              "0.00% compressed clusters")
    print(f"Image end offset: {r.image_end_offset}")


# -- map ----------------------------------------------------------------------------------------------


def _chain_map(img: QedImage, offset: int, length: int, depth: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for e in img.map(offset, length):
        out.extend(_extent_entries(img, e, depth))
    return out


def _extent_entries(img: QedImage, e: Extent, depth: int) -> list[dict[str, Any]]:
    from qbackend.block.qed import MapKind, QedImage, RawBacking

    if e.kind is MapKind.DATA:
        return [{"start": e.start, "length": e.length, "depth": depth, "present": True, "zero": False,
                 "data": True, "offset": e.host_offset}]
    if e.kind is MapKind.ZERO:
        return [{"start": e.start, "length": e.length, "depth": depth, "present": True, "zero": True,
                 "data": False}]
    if e.kind is MapKind.UNALLOCATED:
        return [{"start": e.start, "length": e.length, "depth": depth, "present": False, "zero": True,
                 "data": False}]
    below = img.backing
    if isinstance(below, QedImage):
        inside = max(0, min(e.length, below.image_size - e.start))
        out = _chain_map(below, e.start, inside, depth + 1) if inside else []
        if inside < e.length:
            out.append({"start": e.start + inside, "length": e.length - inside, "depth": depth + 1,
                        "present": False, "zero": True, "data": False})
        return out
    if isinstance(below, RawBacking):
        return [{"start": e.start, "length": e.length, "depth": depth + 1, "present": True, "zero": False,
                 "data": True, "offset": e.start}]
    return [{"start": e.start, "length": e.length, "depth": depth + 1, "present": True, "zero": False,
             "data": True}]


def _map(args: argparse.Namespace) -> int:
    with _open(args.filename) as img:
        entries = _chain_map(img, 0, img.image_size, 0)
    if args.output == "json":
        import json

        print("[" + ",\n".join(json.dumps(e) for e in entries) + "]")
        return 0
    print(f"{'Offset':<20}{'Length':<20}{'Mapped to':<20}File")
    for e in entries:
        if e["data"] and "offset" in e:
            file = args.filename if e["depth"] == 0 else f"(backing depth {e['depth']})"
            print(f"{hex(e['start']):<20}{hex(e['length']):<20}{hex(e['offset']):<20}{file}")
    return 0


# -- convert ------------------------------------------------------------------------------------------


def _convert(args: argparse.Namespace) -> int:
    from qbackend.block.blockfile import FileBlock
    from qbackend.block.qed import DEFAULT_CLUSTER_SIZE, DEFAULT_TABLE_SIZE, SECTOR, QedImage, RawBacking

    src_fmt = args.src_fmt
    if src_fmt is None:
        with open(args.src, "rb") as probe:
            src_fmt = "qed" if probe.read(4) == b"QED\0" else "raw"
    progress = Progress(args.progress)
    src: QedImage | RawBacking
    src = _open(args.src) if src_fmt == "qed" else RawBacking(FileBlock.open(args.src, writable=False))
    try:
        size = src.size()
        extents: list[tuple[int, int, bool]]  # (offset, length, may hold data)
        if isinstance(src, QedImage):
            extents = [(e.start, e.length, not e.reads_zero) for e in src.map()]
        else:
            extents = [(0, size, True)]
        cs = DEFAULT_CLUSTER_SIZE
        if args.out_fmt == "qed":
            opts = _format_options(args.options)
            cs = _size(opts["cluster_size"], "cluster_size") if "cluster_size" in opts else DEFAULT_CLUSTER_SIZE
            ts = int(opts.get("table_size", DEFAULT_TABLE_SIZE))
            f = FileBlock.open(args.dst, create=True)
            QedImage.create(f, size, cluster_size=cs, table_size=ts)
            dst = QedImage.open(f)
            qsize = dst.image_size

            def write(off: int, data: bytes) -> None:
                end = min(off + len(data), qsize)
                if end > off:
                    dst.write(off, data[:end - off])
        else:
            if args.options:
                raise CliError("-o applies to -O qed only")
            rawf = FileBlock.open(args.dst, create=True)
            rawf.truncate(0)
            rawf.truncate(size)

            def write(off: int, data: bytes) -> None:
                rawf.pwrite(off, data)

        done = 0
        grain = cs if args.out_fmt == "qed" else 1 << 16
        try:
            for start, length, has_data in extents:
                pos = start
                while pos < start + length:
                    n = min(CHUNK, start + length - pos)
                    if has_data:
                        data = src.read(pos, n)
                        for off, piece in _nonzero_runs(data, grain):  # keep the copy sparse
                            write(pos + off, piece)
                    pos += n
                    done += n
                    progress(done, size)
        finally:
            if args.out_fmt == "qed":
                dst.close()
            else:
                rawf.flush()
                rawf.close()
        progress.done()
    finally:
        src.close()
    if args.out_fmt == "qed" and size % SECTOR:
        print(f"note: size rounded up to {-(-size // SECTOR) * SECTOR} bytes", file=sys.stderr)
    return 0


def _nonzero_runs(data: bytes, grain: int) -> list[tuple[int, bytes]]:
    """(offset, bytes) runs of ``data`` left after dropping all-zero ``grain``-sized pieces."""
    zero = bytes(grain)
    view = memoryview(data)
    runs: list[tuple[int, bytes]] = []
    start = -1
    for off in range(0, len(data), grain):
        is_zero = view[off:off + grain] == zero[:min(grain, len(data) - off)]
        if not is_zero and start < 0:
            start = off
        elif is_zero and start >= 0:
            runs.append((start, bytes(view[start:off])))
            start = -1
    if start >= 0:
        runs.append((start, bytes(view[start:])))
    return runs


# -- resize -------------------------------------------------------------------------------------------


def _resize(args: argparse.Namespace) -> int:
    with _open(args.filename, read_only=False, open_backing=False) as img:
        text = args.size
        new = img.image_size + _size(text[1:], "size") if text.startswith("+") else _size(text, "size")
        img.grow(new)
    print("Image resized.")
    return 0
