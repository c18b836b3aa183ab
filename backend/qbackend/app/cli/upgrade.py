"""`qbackend upgrade`: a running qbackend hands everything it serves to a new
process (the qbackend installed now) and exits; QEMU and the guest go on."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from qbackend.app.cli.commands import SUMMARIES

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers

EPILOG = """\
examples:
  pip install --upgrade qbackend               # the new code, installed beside the running one
  qbackend upgrade --control /tmp/qb.sock      # a 'qbackend serve --control /tmp/qb.sock'

The new process takes the listening sockets, QEMU's connections (vfio-user
devices, vhost-user-blk disks, NBD clients), guest memory, interrupts and
each device's state over a socket pair, at a point where no request is
half-served; QEMU never sees a socket close.  It prints its own lines to the
same output as the old one.  Refused with one line, nothing changed, when
something cannot be handed over (a device class of your own without
save_state/restore_state, for example); if the new process fails to take
over, the old one serves on and the command says why (exit 1).
What survives an upgrade, a crash of qbackend and a restart of QEMU: the
README's "Upgrades and crashes" (docs/staying-up.md in the source).
"""


def register(sub: Subparsers) -> None:
    p = sub.add_parser("upgrade", help=SUMMARIES["upgrade"], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EPILOG, description="Hand a running qbackend over to a new process (the qbackend "
                                                  "installed now) without stopping what it serves.")
    p.add_argument("--control", type=Path, required=True, metavar="PATH",
                   help="the QMP monitor of the 'qbackend serve --control PATH' to upgrade (a 'qbackend run' "
                        "does not hand over: QEMU is its child)")
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long the new process has to take over (default 60)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qbackend.app.monitor_client import call, monitor

    path = args.control
    with monitor(path) as qmp:
        before = call(qmp, "query-version")
        reply = call(qmp, "upgrade", {"timeout": args.timeout}, timeout=args.timeout + 10)
    with monitor(path) as qmp:  # the new process's monitor, on the same socket
        after = call(qmp, "query-version")
    print(f"upgraded: PID {reply['pid']} serves now ({before['package']} -> {after['package']}), "
          f"hand-over {reply['seconds']:.3f} s, paused {reply['paused']:.3f} s")
    return 0
