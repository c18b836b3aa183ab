"""`qbackend nbd`: serve QED and raw images over NBD until Ctrl-C."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qbackend.app.cli.commands import SUMMARIES
from qbackend.app.cli.common import (
    apply_limits,
    export_option,
    limit_options,
    print_exports,
    served_line,
    tcp_option,
)
from qbackend.options import NbdExportOptions

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers
    from qbackend.servers.nbd import NbdServer

EPILOG = """\
examples:
  qbackend nbd --export name=disk,image=disk.qed,format=qed --socket /tmp/nbd.sock
  qemu-img info nbd+unix:///disk?socket=/tmp/nbd.sock
  nbdinfo --list nbd+unix:///?socket=/tmp/nbd.sock

--export keys:
  name=NAME      export name (default: the image file's stem); the first export
                 also answers the empty name
  image=PATH     a QED image or a raw file
  format=raw|qed its format: required for a writable export (qbackend never probes
                 a writable image); a read-only one without it is told apart by the
                 QED magic, and a QED one naming a backing file then needs format=qed
  readonly=on    refuse writes (EPERM)
"""


def register(sub: Subparsers) -> None:
    nbd = sub.add_parser("nbd", help=SUMMARIES["nbd"],
                         description="Serve QED and raw images as NBD exports.",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    nbd.add_argument("--export", type=export_option, action="append", required=True,
                     metavar="KEY=VALUE,...", help="an export (repeatable); keys below")
    nbd.add_argument("--socket", type=Path, help="UNIX socket to listen on")
    nbd.add_argument("--tcp", type=tcp_option, metavar="HOST:PORT",
                     help="also (or only) listen on TCP, e.g. 127.0.0.1:10809")
    limit_options(nbd)
    nbd.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    exports: list[NbdExportOptions] = args.export
    socket_path: Path | None = args.socket
    tcp: tuple[str, int] | None = args.tcp
    if socket_path is None and tcp is None:
        print("qbackend nbd: say where to listen: --socket PATH and/or --tcp HOST:PORT", file=sys.stderr)
        return 2
    import trio

    from qbackend.app.lifecycle import start_until_done, stop_on_signal
    from qbackend.app.service import Backend

    backend = Backend(handshake_timeout=args.handshake_timeout)
    apply_limits(args, backend)
    backend.add_nbd(exports, socket_path, tcp)
    server: NbdServer | None = None  # kept: the backend lets go of its server when it stops

    async def serve() -> None:
        nonlocal server
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signal, nursery.cancel_scope)
            await start_until_done(nursery, backend.run)
            server = backend.nbd
            print_exports(backend)
            print("serving; Ctrl-C stops (in-flight requests finish, images are flushed)", flush=True)

    trio.run(serve)
    if server is not None:
        print(served_line(server.counts()), flush=True)
    return 0
