"""`qbackend takeover --fd N`: the new process of an upgrade (qbackend.app.upgrade
starts it; not for users, so `qbackend --help` does not list it)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers


def register(sub: Subparsers) -> None:
    p = sub.add_parser("takeover", description="The new process of 'qbackend upgrade' (started by it).")
    p.add_argument("--fd", type=int, required=True, help="the hand-over socket, inherited")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    import trio

    from qbackend.app.cli.serve import print_served
    from qbackend.app.lifecycle import start_until_done, stop_on_signal
    from qbackend.app.upgrade import take_over

    backend, loader = take_over(args.fd)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signal, nursery.cancel_scope)
            await start_until_done(nursery, backend.run)
            loader.close_rest()
            print(f"upgrade: PID {os.getpid()} took over; serving; Ctrl-C stops", flush=True)

    trio.run(serve)
    print_served(backend)
    return 0
