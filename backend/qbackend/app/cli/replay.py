"""`qbackend replay`: a recorded device trace against a device class, without QEMU."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from qbackend.app.cli.commands import SUMMARIES

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers

EPILOG = """\
examples:
  qbackend replay /tmp/edu.trace                             # the class and keys the trace recorded
  qbackend replay /tmp/edu.trace class=examples/edu.py:Edu   # another class (keys: the trace's unless given)
  qbackend replay /tmp/edu.trace class=mydev:Dev,size=4096
Exit status as qemu-img compare's: 0 the device did the same, 1 it diverged
(the first divergent event is printed: its number in the trace, what was
expected, what came), 2 a usage error (no trace, no such class...).
What replay promises for deferred jobs and threads: qbackend.devices.replay.
"""


def register(sub: Subparsers) -> None:
    p = sub.add_parser("replay", help=SUMMARIES["replay"], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog=EPILOG, description="Replay a device trace (device-trace-start, --device trace=FILE) "
                                                  "against a device class and compare what it does.")
    p.add_argument("trace", help="the trace file (JSON lines)")
    p.add_argument("device", nargs="?", help="class=MODULE:CLASS[,KEY=VALUE...] (default: the trace's)")
    p.add_argument("--timeout", type=float, default=5.0,
                   help="seconds to wait for an output a deferred job or thread owes (default 5)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qbackend.app.device_loader import load_class
    from qbackend.devices.replay import main_args, replay
    from qbackend.errors import UsageError

    events, spec, keys = main_args(args.trace, args.device)
    cls = load_class(spec)
    try:
        result = replay(events, cls, timeout=args.timeout, **keys)
    except TypeError as exc:  # the constructor does not take these keys
        raise UsageError(f"replay: {cls.__name__}() does not take these keys: {exc}") from None
    print(f"{args.trace}: {result}")
    return 0 if result.same else 1
