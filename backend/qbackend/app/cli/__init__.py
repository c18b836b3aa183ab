"""qbackend's command line.

    qbackend serve --ivshmem socket=/tmp/iv0.sock,size=4M
    qbackend run                      # QEMU + a booted guest + the devices
    qbackend console                  # talk to its guest's serial console
    qbackend qemu -- ARGS             # the provisioned QEMU by hand

One module per command: its `register` adds the command's parser, and the
function it leaves in `func` runs the command.  Only the module of the command
given is imported (qbackend.app.cli.commands), and each imports what it needs
when it runs (trio, the device service, QEMU helpers), so that light commands
such as `qbackend qed info` start fast.
"""

from __future__ import annotations

import os
import sys

from qbackend.app.cli.commands import HIDDEN, SUMMARIES
from qbackend.version import __version__

# Start-up is the figure a user feels on light commands (`qbackend --version`, `qbackend qed
# info`): this module imports nothing it can do without (argparse, pathlib and typing cost
# more than the rest of those commands together), and `main` answers `--version` and the
# plain spellings of `qed info` and `qed check` without argparse (qbackend.app.cli.qed).
VERSION = f"qbackend {__version__}"  # what --version prints, with or without argparse
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Sequence
    from typing import NoReturn


def command_named(argv: Sequence[str]) -> str | None:
    """The command `argv` runs (its first word that is not a global option), if any."""
    words = iter(argv)
    for word in words:
        if word == "--data-dir":
            next(words, None)
        elif not word.startswith("-"):
            return word
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser; with `argv`, only the command it names is registered whole (the others
    stand by their summaries, which is all `qbackend --help` shows of them)."""
    import argparse
    import importlib
    from pathlib import Path

    class Parser(argparse.ArgumentParser):
        """argparse, with a usage error as one line that says where help is (exit 2)."""

        def error(self, message: str) -> NoReturn:
            self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")

    parser = Parser(
        prog="qbackend",
        description="External devices for QEMU from one Python process: ivshmem, a hotplug controller and "
                    "devices of your own (qbackend.devices.Device) over vfio-user; DIMM and PCI hotplug over "
                    "QMP; QED/raw disks over NBD (TLS, extended headers); a QMP monitor of its own "
                    "(serve --control); a sPAPR DRC model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'qbackend COMMAND --help' for the options of each command.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--version", action="version", version=VERSION,
                        help="print qbackend's version and exit")
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="where provisioned QEMU and the test guest live (default: $QBACKEND_DATA_DIR, "
                             "else a checkout's build/, else ~/.local/share/qbackend)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = None if argv is None else command_named(argv)
    for name, summary in SUMMARIES.items():
        if argv is None or name == wanted:
            importlib.import_module(f"qbackend.app.cli.{name}").register(sub)
        else:
            sub.add_parser(name, help=summary)
    if wanted in HIDDEN:
        importlib.import_module(f"qbackend.app.cli.{wanted}").register(sub)
    return parser


def _light(argv: list[str]) -> argparse.Namespace | None:
    """The parsed command line of a light command run without argparse (the plain spellings
    of `qed info` and `qed check`), else None."""
    if argv[:1] == ["qed"] and os.environ.get("QBACKEND_NATIVE", "auto") == "auto":
        from qbackend.app.cli.qed import fast_args

        return fast_args(argv[1:])
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--version"]:  # what argparse's version action prints, and its exit
        sys.stdout.write(f"{VERSION}\n")
        sys.exit(0)
    light = _light(argv)
    if light is not None:
        return _run(light, check_native=False)
    args = build_parser(argv).parse_args(argv)
    import logging  # after parsing: --help and --version do without it

    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    # qemu.qmp logs each failed connect while it retries (QEMU still starting): noise unless -vv.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if args.verbose >= 2 else logging.CRITICAL)
    if args.data_dir is not None:
        from qbackend.machine.data_dir import set_data_dir

        set_data_dir(args.data_dir)
    return _run(args)


def _run(args: argparse.Namespace, *, check_native: bool = True) -> int:
    """Run the command `args` holds; a user error ends it as one line and its exit code."""
    try:
        if check_native:
            # QBACKEND_NATIVE=require: a C helper missing from this install is said now, not
            # when the first client comes.  (The fast path runs only where the switch is
            # unset or `auto`, under which this checks nothing.)
            from qbackend.plumbing.native import check_required

            check_required()
        code: int = args.func(args)
        return code
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        from qbackend.app.cli.common import report

        failed = report(f"qbackend {args.command}", exc)
        if failed is None:
            raise
        return failed


def process_main() -> NoReturn:
    """The `qbackend` command as a process (its script, `python -m qbackend`).

    A light command (`--version`, the plain `qed info` and `qed check`) ends the process
    with os._exit once its output is flushed: the interpreter's finalization (tearing down
    every module) costs more than the command's own work, and such a command leaves nothing
    to finalize (no thread, no atexit handler, its image closed before it returns).  Anything
    else, and a light command whose output cannot be flushed or that raised, ends the usual
    way."""
    argv = sys.argv[1:]
    light = _light(argv)
    if argv != ["--version"] and light is None:
        sys.exit(main(argv))
    code = 0
    try:
        if light is not None:
            code = _run(light, check_native=False)
        else:
            sys.stdout.write(f"{VERSION}\n")
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError as exc:
        from qbackend.app.cli.common import report

        failed = report("qbackend", exc)  # (a reader of stdout that went away: no message)
        sys.exit(code if failed is None else failed)
    os._exit(code)


if __name__ == "__main__":
    process_main()
