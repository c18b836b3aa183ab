"""`qbackend serve`: serve devices, disks and a QMP monitor until Ctrl-C or quit."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from qbackend.app.cli.commands import SUMMARIES
from qbackend.app.cli.common import (
    apply_limits,
    device_option,
    dimm_option,
    export_option,
    ivshmem_backend,
    ivshmem_option,
    limit_options,
    print_exports,
    tcp_option,
    vhost_user_blk_option,
)
from qbackend.errors import UsageError
from qbackend.options import OptionError, parse_int, parse_keyval
from qbackend.sizes import parse_size

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers
    from qbackend.app.service import Backend

EPILOG = """\
examples:
  qbackend serve --ivshmem socket=/tmp/iv0.sock,size=4M
  qbackend serve --ivshmem socket=/tmp/a.sock,shm=group1 --ivshmem socket=/tmp/b.sock,shm=group1
  qbackend serve --device socket=/tmp/edu.sock,class=examples/edu.py:Edu     # your own device

then attach a device to QEMU (10.1 or later), for example:
  qemu-system-x86_64 ... \\
    -object memory-backend-memfd,id=mem,size=512M,share=on -machine pc,memory-backend=mem \\
    -device '{"driver":"vfio-user-pci","id":"iv0","socket":{"type":"unix","path":"/tmp/iv0.sock"}}'
(shared guest RAM lets the device reach guest memory through fds)

--ivshmem keys:
  socket=PATH    UNIX socket QEMU's vfio-user-pci connects to (required; created mode 0600)
  size=SIZE      shared memory (BAR2), a power of two: 4K .. ; default 4M;
                 a bare number is bytes
  shm=NAME       back the memory with /dev/shm/NAME so host programs can map it;
                 devices with the same shm= share one memory (a peer group)
  vectors=N      MSI-X vectors, 1..64; default 1
  peer=N         IVPosition (peer id); default: the lowest free id in the group
  id=NAME        a name for logs; default ivshmemN
  server=PATH    also listen as an ivshmem server there, so a stock QEMU
                 -device ivshmem-doorbell (and host programs) join the group

--vhost-user-blk keys (a disk for QEMU's vhost-user-blk-pci, as qemu-storage-daemon's
--export type=vhost-user-blk):
  socket=PATH    UNIX socket QEMU's -chardev socket,path=PATH connects to (required)
  image=PATH     a QED image or a raw file (required)
  format=raw|qed required for a writable disk (qbackend never probes a writable image)
  readonly=on    the guest sees a read-only disk (VIRTIO_BLK_F_RO)
  num-queues=N   queues offered, 1..64; default 1.  QEMU's device asks for one per
                 vCPU unless given num-queues=, and refuses a back end that offers fewer
  id=NAME        the export's id (query-block-exports) and the disk's serial; default vub0
  logical-block-size=512|4096
                 the guest's logical block size (virtio-blk blk_size); default 512
for example:
  qbackend serve --vhost-user-blk socket=/tmp/vub.sock,image=disk.qed,format=qed
  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
    -machine pc,memory-backend=mem -chardev socket,id=vub0,path=/tmp/vub.sock \\
    -device vhost-user-blk-pci,chardev=vub0,num-queues=1
"""

HOTPLUG_KEYS = ("socket", "machine", "ram", "slots", "profile")


def _hotplug_option(text: str) -> dict[str, object]:
    try:
        kv = parse_keyval(text, "--hotplug")
        unknown = sorted(set(kv) - set(HOTPLUG_KEYS))
        if unknown:
            raise OptionError(f"--hotplug: unknown key(s) {', '.join(unknown)}; known: {', '.join(HOTPLUG_KEYS)}")
        if "socket" not in kv:
            raise OptionError("--hotplug: socket=PATH is required")
        if kv.get("profile", "qemu") not in ("qemu", "spec-2.4"):
            raise OptionError("--hotplug profile=qemu|spec-2.4")
        return {"socket": Path(kv["socket"]), "machine": kv.get("machine", "pc"),
                "ram": parse_size(kv.get("ram", "512M"), "--hotplug ram", default_unit="M"), "slots": parse_int(kv.get("slots", "4"), "--hotplug slots"),
                "profile": kv.get("profile", "qemu")}
    except (UsageError, ValueError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: Subparsers) -> None:
    serve = sub.add_parser("serve", help=SUMMARIES["serve"],
                           description="Serve devices to QEMU until interrupted.",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    serve.add_argument("--ivshmem", type=ivshmem_option, action="append", default=[], metavar="KEY=VALUE,...",
                       help="an ivshmem device (repeatable); keys below")
    serve.add_argument("--device", type=device_option, action="append", default=[],
                       metavar="socket=PATH,class=MODULE:CLASS[,id=ID][,stall=SECONDS][,KEY=VALUE...]",
                       help="a PCI device of your own (a qbackend.devices.Device subclass); "
                            "class=path/to/file.py:CLASS loads a file; stall=SECONDS (default 1): log the stack "
                            "of a callback running longer; other keys reach its constructor")
    serve.add_argument("--hotplug", type=_hotplug_option, metavar="socket=PATH[,machine=pc][,ram=512M][,slots=4]",
                       help="the hotplug-controller device (ACPI memory-hotplug block in BAR0); "
                            "ram= is the guest's base RAM, a bare number in MiB")
    serve.add_argument("--dimm", type=dimm_option, action="append", default=[],
                       metavar="id=ID,size=SIZE[,node=N][,populated=on|off]",
                       help="a DIMM slot of the hotplug controller (repeatable); size a multiple of 128M, a bare number in MiB")
    serve.add_argument("--qmp", type=Path, help="QEMU's QMP socket: follow and drive its hotplug")
    serve.add_argument("--control", "--monitor", type=Path, dest="control", metavar="PATH",
                       help="serve a QMP monitor on this UNIX socket (qmp-shell, qemu.qmp, 'qbackend dimm|pci|ivshmem')")
    serve.add_argument("--nbd", type=export_option, action="append", default=[], metavar="KEY=VALUE,...",
                       help="an NBD export served beside the devices (repeatable); keys: see 'qbackend nbd --help'")
    serve.add_argument("--nbd-socket", type=Path, help="UNIX socket for the --nbd exports")
    serve.add_argument("--vhost-user-blk", type=vhost_user_blk_option, action="append", default=[],
                       metavar="socket=PATH,image=PATH,format=raw|qed[,readonly=on][,num-queues=N][,id=ID]"
                               "[,logical-block-size=512|4096]",
                       help="a disk for QEMU's vhost-user-blk-pci (repeatable): -chardev socket,id=vub0,path=PATH "
                            "-device vhost-user-blk-pci,chardev=vub0 (guest RAM must be shared)")
    serve.add_argument("--nbd-tcp", type=tcp_option, metavar="HOST:PORT", help="also serve NBD over TCP")
    limit_options(serve)
    serve.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import trio

    from qbackend.app.lifecycle import start_until_done, stop_on_signal
    from qbackend.machine.launch import load_machine_config

    if not (args.ivshmem or args.device or args.nbd or args.hotplug or args.control or args.vhost_user_blk):
        print("qbackend serve: nothing to serve; add a device, e.g. --ivshmem socket=/tmp/iv0.sock,size=4M, "
              "or --control PATH to add exports over QMP", file=sys.stderr)
        return 2
    if args.nbd and args.nbd_socket is None and args.nbd_tcp is None:
        print("qbackend serve: --nbd needs --nbd-socket PATH and/or --nbd-tcp HOST:PORT", file=sys.stderr)
        return 2
    backend = ivshmem_backend(args.ivshmem, args.handshake_timeout)
    apply_limits(args, backend)
    for opts in args.device:
        backend.add_device(opts)
    if args.nbd:
        backend.add_nbd(args.nbd, args.nbd_socket, args.nbd_tcp)
    ids = [opts.id for opts in args.vhost_user_blk]
    if len(set(ids)) != len(ids):
        print("qbackend serve: give each --vhost-user-blk its own id=", file=sys.stderr)
        return 2
    for opts in args.vhost_user_blk:
        backend.add_vhost_user_blk(opts)
    if args.dimm and not args.hotplug:
        print("qbackend serve: --dimm needs --hotplug socket=PATH (the controller that shows the slots)",
              file=sys.stderr)
        return 2
    if args.hotplug:
        from qbackend.models.memhp import Profile

        hp = args.hotplug
        backend.add_hotplug_controller(hp["socket"], args.dimm, machine=hp["machine"], ram_size=hp["ram"],
                                       slots=hp["slots"], profile=Profile(hp["profile"]))
        backend.add_pci_slots(load_machine_config(str(hp["machine"])).hotplug_bus)
    if args.qmp:
        backend.attach_qmp(args.qmp)
    if args.control:
        backend.enable_control(args.control)
    backend.upgradable = True  # a process of its own: `qbackend upgrade` may hand it over

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signal, nursery.cancel_scope)
            await start_until_done(nursery, backend.run)
            for served in backend.devices.values():
                position = getattr(served.device, "position", None)  # ivshmem's peer id
                where = f" (IVPosition {position})" if position is not None else ""
                print(f"{served.id}: {served.server.socket_path}{where}", flush=True)
            print_exports(backend)
            print("serving; Ctrl-C stops", flush=True)

    trio.run(serve)
    print_served(backend)
    return 0


def print_served(backend: Backend) -> None:
    """What each device served, once the process stops."""
    for served in backend.devices.values():
        counts = served.server.counts()
        faults = "".join(f" {key} {counts[key]}" for key in ("faults", "stalls") if counts[key])
        print(f"{served.id}: served native_accesses {counts['native_accesses']}{faults}", flush=True)
