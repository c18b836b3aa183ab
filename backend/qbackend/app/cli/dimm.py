"""`qbackend dimm`: the DIMM slots of a running qbackend, through its QMP monitor."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from qbackend.app.cli.commands import SUMMARIES
from qbackend.app.cli.common import control_path, instance_options, instance_options_after

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers

EPILOG = """\
examples (against the running 'qbackend run --dimm id=hot1,size=256M'; several: add --instance NAME):
  qbackend dimm list
  qbackend dimm add hot1
  qbackend dimm del hot1        # waits for the guest: removed, or failed (OST 0x82, busy)
  qbackend dimm total           # base + plugged, beside QEMU's query-memory-size-summary
"""


def register(sub: Subparsers) -> None:
    dimm = sub.add_parser("dimm", help=SUMMARIES["dimm"],
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                          description="Drive the DIMM slots of a running 'qbackend run' or 'qbackend serve'.")
    instance_options(dimm)
    dimm_sub = dimm.add_subparsers(dest="dimm_command", metavar="ACTION", required=True)
    dimm_sub.add_parser("list", help="slots, addresses, nodes, what is plugged (DIMMs plugged on QEMU's "
                                     "own monitor too, marked 'not declared')")
    dimm_sub.add_parser("total", help="memory total: base plus plugged")
    for name, what in (("add", "hot-add"), ("del", "hot-remove")):
        p = dimm_sub.add_parser(name, help=f"{what} the DIMM of a declared slot")
        p.add_argument("id")
        if name == "del":
            p.add_argument("--timeout", type=float, default=30.0, help="how long to wait for the guest (s)")
    instance_options_after(dimm_sub)
    dimm.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qbackend.app.monitor_client import call, monitor, wait_outcome

    with monitor(control_path(args)) as qmp:
        if args.dimm_command == "list":
            rows = call(qmp, "query-memory-hotplug")
            print(f"{'id':<12}{'slot':>5}  {'address':<20}{'size':>8}{'node':>5}  state")
            for r in rows:  # after the declared slots, DIMMs plugged on QEMU's own monitor
                print(f"{r['id'] or '-':<12}{r['slot']:>5}  {r['address']:#018x}  {r['size'] >> 20:>6}M{r['node']:>5}  "
                      f"{r['state']}{'' if r.get('declared', True) else ' (not declared)'}")
        elif args.dimm_command == "total":
            t = call(qmp, "query-memory-total")
            print(f"base {t['base'] >> 20} MiB + plugged {t['plugged'] >> 20} MiB = {t['total'] >> 20} MiB "
                  f"(QEMU says base {t['qemu-base'] >> 20} MiB + plugged {t['qemu-plugged'] >> 20} MiB)")
        elif args.dimm_command == "add":
            r = call(qmp, "dimm-add", {"id": args.id})
            print(f"{r['id']}: plugged in slot {r['slot']} at {r['address']:#x} on node {r['node']}")
        else:
            call(qmp, "dimm-del", {"id": args.id})
            event = wait_outcome(qmp, ("DIMM_REMOVED", "DIMM_REMOVE_FAILED"), {"id": args.id}, args.timeout)
            if event["event"] == "DIMM_REMOVED":
                print(f"{args.id}: removed")
                return 0
            print(f"{args.id}: failed: the guest reported OST status {event['data']['ost-status']:#x}"
                  f"{' (busy)' if event['data']['ost-status'] == 0x82 else ''}")
            return 1
    return 0
