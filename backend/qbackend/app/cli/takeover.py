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
    from qbackend.app.upgrade import take_over

    return take_over(args.fd)
