"""``qbackend drc``: the pseries DRC model from the command line.

    qbackend drc dt --cpus 1 --maxcpus 4 --memory 1G --maxmem 4G --slots 4 [--phb 3] --format dts
    qbackend drc run --memory 1G --maxmem 2G script.txt     # or - for stdin; JSON lines out
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qbackend.app.cli.commands import SUMMARIES

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers
    from qbackend.models.spapr.drc import MachineConfig

# The model (drc, fdt, state, script) is imported when a drc command runs or shows its help:
# registering the command with qbackend's parser stays cheap for the other commands.

EPILOG = """\
examples:
  qbackend drc dt --cpus 1 --maxcpus 4 --memory 1G --maxmem 4G --slots 4
  qbackend drc dt --memory 2G --maxmem 8G --phb 1 --phb 2 --format dtb -o drc.dtb
  printf 'plug-dimm 0x40000000 256M\\nset-indicator allocation 0x80000004 1\\n' |
      qbackend drc run --memory 1G --maxmem 2G -
"""


def _machine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("machine (as -smp / -m / -device describe it)")
    g.add_argument("--cpus", type=int, default=1)
    g.add_argument("--maxcpus", type=int, default=None)
    g.add_argument("--threads", type=int, default=1)
    g.add_argument("--memory", default="512M", help="RAM, e.g. 1G; a bare number is MiB (default 512M)")
    g.add_argument("--maxmem", default=None, help="maximum memory, as --memory (default: --memory)")
    g.add_argument("--slots", type=int, default=0)
    g.add_argument("--phb", type=int, action="append", default=[], metavar="INDEX",
                   help="an extra spapr-pci-host-bridge (repeatable)")
    g.add_argument("--bridge", action="append", default=[], metavar="PHB:CHASSIS:DEVFN",
                   help="a pci-bridge on a PHB's root bus (repeatable)")
    g.add_argument("--dimm", action="append", default=[], metavar="ADDR:SIZE",
                   help="a cold-plugged DIMM (shows in ibm,dynamic-memory-v2)")
    g.add_argument("--cpu-model", default="POWER11", metavar="MODEL",
                   help="-cpu: POWER9, POWER10 or POWER11 (default, QEMU 11.1's)")


class _DrcParser(argparse.ArgumentParser):
    """The drc subcommands' parser; `run`'s epilog (the script commands, from `backend.spapr.script`)
    is filled in when its help is shown."""

    script_help = False

    def format_help(self) -> str:
        if self.script_help and self.epilog is None:
            from qbackend.models.spapr import script

            parts = (script.__doc__ or "").split("\n\n")
            self.epilog = ("script lines:\n" + parts[1] + "\n\n" + parts[2]
                           + "\n\nexample:\n  printf 'plug-dimm 0x40000000 256M mem1\\nstate 0x80000004\\n' | "
                           "qbackend drc run --memory 1G --maxmem 4G --slots 4 -")
        return super().format_help()


def register(sub: Subparsers) -> None:
    """Add the ``drc`` command group to qbackend's subparsers."""
    drc = sub.add_parser("drc", help=SUMMARIES["drc"],
                         description="sPAPR dynamic-reconfiguration connectors as QEMU 11.1's "
                                     "pseries machine has them.",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    dsub = drc.add_subparsers(dest="drc_command", metavar="SUBCOMMAND", required=True, parser_class=_DrcParser)
    dt = dsub.add_parser("dt", help="the ibm,drc-* properties and dynamic-reconfiguration-memory")
    _machine_args(dt)
    dt.add_argument("--format", choices=("dts", "dtb"), default="dts")
    dt.add_argument("-o", "--output", type=Path, default=None, help="file (default: stdout)")
    dt.add_argument("--numa-form", type=int, choices=(1, 2), default=2)
    dt.add_argument("--order", choices=("index", "qemu"), default="qemu",
                    help="entry order: QEMU's own (default, byte-identical) or sorted by index")
    dt.add_argument("--no-drmem", action="store_true",
                    help="leave out ibm,dynamic-reconfiguration-memory (QEMU adds it at CAS)")
    script = dsub.add_parser("run", help="drive the state machine and RTAS calls from a script",
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    script.script_help = True
    _machine_args(script)
    script.add_argument("script", help="script file, or - for stdin (one command per line, below)")
    cas = script.add_argument_group(
        "what the guest negotiated at CAS (the script's cas command changes it; reset forgets it)")
    cas.add_argument("--legacy-events", action="store_true",
                     help="the guest did not negotiate the hot-plug event source (EPOW, by count)")
    cas.add_argument("--mmu", choices=("radix", "hash"), default="radix",
                     help="MMU mode: radix (default, a current Linux) gives hot-added cores "
                          "ibm,pft-size <0 0>; hash the hash table's order")
    cas.add_argument("--compat-pvr", default=None, metavar="PVR|none",
                     help="compatibility PVR, a hot-added core's cpu-version (default: the CPU "
                          "model's own logical PVR, e.g. 0x0f000007 for POWER11; none: the raw PVR)")
    cas.add_argument("--htab-shift", type=int, default=None, metavar="N",
                     help="hash MMU: the hash table order (default QEMU's for the RAM present)")
    script.add_argument("--clock", default=None, metavar="YYYY-MM-DDTHH:MM:SS",
                        help="the guest's clock, which event logs carry (default 2000-01-01T00:00:00; "
                             "the script's clock command sets it)")
    script.add_argument("--keep-going", action="store_true", help="do not stop at the first error")
    drc.set_defaults(func=run)


def machine_from_args(args: argparse.Namespace) -> MachineConfig:
    from qbackend.errors import UsageError
    from qbackend.models.spapr.drc import Dimm, MachineConfig, PciBridge
    from qbackend.sizes import parse_size

    bridges = []
    for text in args.bridge:
        try:
            phb, chassis, devfn = (int(x, 0) for x in text.split(":"))
        except ValueError:
            raise UsageError(f"--bridge {text}: PHB:CHASSIS:DEVFN expected, three numbers") from None
        bridges.append(PciBridge(phb, chassis, devfn))
    dimms = []
    for text in args.dimm:
        try:
            addr, size = text.split(":")
            start = int(addr, 0)
        except ValueError:
            raise UsageError(f"--dimm {text}: ADDR:SIZE expected, e.g. 0x40000000:256M") from None
        dimms.append(Dimm(start, parse_size(size, "--dimm size", default_unit="M")))
    return MachineConfig(cpus=args.cpus, maxcpus=args.maxcpus, threads=args.threads,
                         memory=parse_size(args.memory, "--memory", default_unit="M"),
                         maxmem=parse_size(args.maxmem, "--maxmem", default_unit="M") if args.maxmem else None,
                         slots=args.slots, phbs=tuple(args.phb), bridges=tuple(bridges),
                         dimms=tuple(dimms), cpu_model=args.cpu_model)


def run(args: argparse.Namespace) -> int:
    from qbackend.models.spapr.drc import DrcError
    from qbackend.models.spapr.fdt import encode, to_dts
    from qbackend.models.spapr.script import Script

    try:
        config = machine_from_args(args)
    except (DrcError, ValueError) as e:
        print(f"qbackend drc: {e}", file=sys.stderr)
        return 2
    if args.drc_command == "dt":
        tree = config.device_tree(args.numa_form, args.order)
        if args.no_drmem:
            tree.children = [c for c in tree.children if c.name != "ibm,dynamic-reconfiguration-memory"]
        data = encode(tree) if args.format == "dtb" else to_dts(tree).encode()
        if args.output:
            args.output.write_bytes(data)
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.flush()
        return 0
    from datetime import datetime

    try:
        compat = None if args.compat_pvr is None else 0 if args.compat_pvr == "none" \
            else int(args.compat_pvr, 0)
        script = Script(config, hp_event_source=not args.legacy_events, mmu=args.mmu,
                        compat_pvr=compat, htab_shift=args.htab_shift,
                        clock=datetime.fromisoformat(args.clock) if args.clock else None)
    except (DrcError, ValueError) as e:
        print(f"qbackend drc: {e}", file=sys.stderr)
        return 2
    stream = sys.stdin if args.script == "-" else open(args.script)
    failed = False
    with stream:
        for line in stream:
            out = script.run_line(line)
            if out is None:
                continue
            print(json.dumps(out), flush=True)
            if out.get("ok") is False:
                failed = True
                if not args.keep_going:
                    return 1
    return 1 if failed else 0
