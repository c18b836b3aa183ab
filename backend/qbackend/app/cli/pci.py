"""`qbackend pci`: hot-add, hot-remove and list PCI devices of a running qbackend."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

from qbackend.app.cli.commands import SUMMARIES
from qbackend.app.cli.common import control_path, instance_options, instance_options_after
from qbackend.errors import ControlError, UsageError

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers

EPILOG = """\
examples (against the running 'qbackend run'; several: add --instance NAME):
  qbackend pci list
  qbackend pci add ivshmem socket=/tmp/iv9.sock,size=1M,id=iv9
  qbackend pci del iv9
  qbackend pci add-json '{"driver":"virtio-rng-pci","id":"rng0"}'
Hot-plugged ivshmem has no MSI-X unless given vectors=N (default 0, INTx only):
QEMU 11.1 aborts when a vfio-user device with MSI-X is unplugged (see
docs/qemu-issues.md), so 'pci del' refuses such a device there unless --force.
"""


def register(sub: Subparsers) -> None:
    pci = sub.add_parser("pci", help=SUMMARIES["pci"],
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                         description="Drive PCI hotplug through a running 'qbackend run' or 'qbackend serve'.")
    instance_options(pci)
    pci_sub = pci.add_subparsers(dest="pci_command", metavar="ACTION", required=True)
    pci_sub.add_parser("list", help="the hotplug bus: slots, devices, UP/DOWN/RMV")
    p = pci_sub.add_parser("add", help="a new qbackend device (its socket first, then device_add)")
    p.add_argument("kind", choices=("ivshmem",))
    p.add_argument("options", help="the device's keys, as for 'serve --ivshmem', but vectors= defaults to 0")
    p.add_argument("--id", help="QEMU device id (default: the options' id=)")
    p = pci_sub.add_parser("add-json", help="device_add any QEMU device on the hotplug bus")
    p.add_argument("device", help='QMP device_add arguments, e.g. \'{"driver":"e1000","id":"n1"}\'')
    p = pci_sub.add_parser("del", help="device_del, and wait until the guest has ejected it")
    p.add_argument("id")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--force", action="store_true",
                   help="unplug even a device that the QEMU running is known to abort on (docs/qemu-issues.md)")
    instance_options_after(pci_sub)
    pci.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qbackend.app.monitor_client import MonitorClosed, call, monitor, wait_outcome
    from qbackend.options import IvshmemOptions, parse_keyval

    with monitor(control_path(args)) as qmp:
        if args.pci_command == "list":
            rows = call(qmp, "query-pci-hotplug")
            print(f"{'slot':>4}  {'id':<14}{'vendor:device':<15}{'class':<7}flags")
            for r in rows:
                flags = [f for f in ("removable", "up", "down") if r[f]]
                print(f"{r['slot']:>4}  {r['id'] or '-':<14}{r['vendor']}:{r['device']:<10}{r['class']:<7}"
                      f"{' '.join(flags)}")
        elif args.pci_command == "add":
            opts = IvshmemOptions.parse(args.options)  # the same keys and errors as 'serve --ivshmem'
            device: dict[str, object] = {"driver": "ivshmem", "id": args.id or opts.id or opts.socket.stem,
                                         "socket": str(opts.socket), "size": str(opts.size)}
            if "vectors" in parse_keyval(args.options, "--ivshmem"):  # else the monitor's default, 0
                device["vectors"] = opts.vectors
            if opts.shm:
                device["shm"] = opts.shm
            if opts.peer is not None:
                device["peer"] = opts.peer
            if opts.server is not None:
                device["server"] = str(opts.server)
            r = call(qmp, "pci-device-add", device)
            print(f"{r['id']}: slot {r['slot']}, socket {r['socket']}, IVPosition {r['position']}, "
                  f"{r['vectors']} MSI-X vectors")
        elif args.pci_command == "add-json":
            try:
                spec = json.loads(args.device)
            except ValueError as exc:
                raise UsageError(f"add-json: not JSON: {exc}") from None
            r = call(qmp, "pci-device-add-qemu", {"device": spec})
            print(f"{r['id']}: slot {r['slot']}")
        else:
            call(qmp, "pci-device-del", {"id": args.id, **({"force": True} if args.force else {})})
            try:
                wait_outcome(qmp, ("PCI_DEVICE_UNPLUGGED",), {"id": args.id}, args.timeout)
            except MonitorClosed:
                raise
            except ControlError:
                print(f"{args.id}: still there (the guest did not eject it)")
                return 1
            print(f"{args.id}: removed")
    return 0
