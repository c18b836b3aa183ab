"""`qbackend device`: trace or reload a served device of a running qbackend, through its QMP monitor."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from qbackend.app.cli.commands import SUMMARIES
from qbackend.app.cli.common import control_path, instance_options, instance_options_after

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers

EPILOG = """\
examples (against the running 'qbackend run' or 'serve --control'; several: add --instance NAME):
  qbackend device trace edu1 /tmp/edu.trace    # every access, interrupt, DMA, reset from now on
  qbackend device trace-stop edu1              # the file closed: replay it with 'qbackend replay'
  qbackend device reload edu1                  # edu.py loaded again, the guest and QEMU going on
A reload that fails (a syntax error, a constructor that raises, another PCI
layout) leaves the running device serving and says why in one line (exit 1).
The new instance takes the old one's state: Device.reloaded(old), by default
a copy of every attribute of the old one.
"""


def register(sub: Subparsers) -> None:
    device = sub.add_parser("device", help=SUMMARIES["device"],
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                            description="Trace or reload a device a running qbackend serves.")
    instance_options(device)
    device_sub = device.add_subparsers(dest="device_command", metavar="ACTION", required=True)
    p = device_sub.add_parser("trace", help="trace the device into FILE (JSON lines) until trace-stop")
    p.add_argument("id")
    p.add_argument("file")
    p = device_sub.add_parser("trace-stop", help="end the device's trace")
    p.add_argument("id")
    p = device_sub.add_parser("reload", help="load a device's module again and replace it in place")
    p.add_argument("id")
    instance_options_after(device_sub)
    device.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from qbackend.app.monitor_client import call, monitor

    with monitor(control_path(args)) as qmp:
        if args.device_command == "trace":
            path = Path(args.file).absolute()  # the monitor's process may run elsewhere
            call(qmp, "device-trace-start", {"id": args.id, "file": str(path)})
            print(f"{args.id}: tracing into {path}")
        elif args.device_command == "trace-stop":
            r = call(qmp, "device-trace-stop", {"id": args.id})
            print(f"{args.id}: {r['events']} events in {r.get('file', '(memory)')}")
        else:
            r = call(qmp, "device-reload", {"id": args.id})
            print(f"{args.id}: reloaded ({r['class']})")
    return 0
