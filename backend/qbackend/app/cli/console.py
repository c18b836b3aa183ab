"""`qbackend console [PATH]`: relay this terminal to a guest's serial console socket
(by default, the guest of the running `qbackend run`)."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qbackend.app.cli.commands import SUMMARIES

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers


def register(sub: Subparsers) -> None:
    console = sub.add_parser("console", help=SUMMARIES["console"],
                             description="Relay this terminal to the guest console of the running 'qbackend run', "
                                         "or to the UNIX socket PATH (a QEMU serial chardev). Leave with Ctrl-].")
    console.add_argument("path", type=Path, nargs="?",
                         help="a serial console socket (default: that of the running 'qbackend run')")
    console.add_argument("--instance", metavar="NAME",
                         help="the 'qbackend run --name NAME' whose guest to attach to (default: the only one running)")
    console.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """A minimal terminal relay; Ctrl-] leaves."""
    import select
    import socket
    import termios
    import tty

    if args.path is not None and args.instance is not None:
        from qbackend.errors import UsageError

        raise UsageError("give PATH or --instance NAME, not both")
    if args.path is not None:
        path: Path = args.path
    else:
        from qbackend.machine.instances import find

        path = find(args.instance, "give the PATH of a serial console socket").serial
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(os.fspath(path))
    except OSError as exc:  # connect() names no path; the one-line error should
        sock.close()
        raise OSError(exc.errno, f"cannot connect: {exc.strerror}", str(path)) from None
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    print(f"connected to {path}; Ctrl-] leaves", file=sys.stderr)
    try:
        if saved is not None:
            tty.setraw(stdin)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while True:
            ready, _, _ = select.select([stdin, sock], [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data or b"\x1d" in data:
                    break
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        sock.close()
    return 0
