"""`qbackend run`: the devices, QEMU and a booted guest together."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from qbackend.app.cli.commands import SUMMARIES
from qbackend.app.cli.common import (
    data_dir_option,
    device_option,
    dimm_option,
    disk_option,
    ivshmem_backend,
    ivshmem_option,
    print_exports,
)
from qbackend.options import DiskOptions, IvshmemOptions, NbdExportOptions, VhostUserBlkOptions
from qbackend.sizes import parse_size

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers

EPILOG = """\
Starts the devices, then QEMU with a booted busybox guest and the devices
attached; prints where the guest console and the QMP sockets are.  Ctrl-C
stops everything.  While it runs, 'qbackend console', 'qbackend pci',
'qbackend dimm' and 'qbackend ivshmem' find it from any folder (with
several instances running, by --instance NAME).  When QEMU ends by itself,
qbackend stops too: with status 0 if QEMU did (the guest powered off),
else 1, saying how QEMU ended.  QEMU comes from $QEMU or from 'qbackend
setup' ('make setup' in a checkout); the accelerator from --accel or
$QBACKEND_ACCEL (default tcg).

The run directory (sockets, qemu.log) is $XDG_RUNTIME_DIR/qbackend/NAME, or
DATA_DIR/run/NAME when XDG_RUNTIME_DIR is not set (see 'qbackend --help'
for DATA_DIR); --workdir puts it elsewhere.
"""

# Added to the guest's kernel command line: hot-added DIMMs come online, movable
# (so that they can be removed again).
RUN_APPEND = "memhp_default_state=online_movable"


def _name(text: str) -> str:
    from qbackend.errors import UsageError
    from qbackend.machine.instances import check_name

    try:
        return check_name(text)
    except UsageError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def register(sub: Subparsers) -> None:
    parser = sub.add_parser("run", help=SUMMARIES["run"],
                            description="Start qbackend's devices and a QEMU guest that uses them.",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--ivshmem", type=ivshmem_option, action="append", default=[], metavar="KEY=VALUE,...",
                        help="an ivshmem device (repeatable); default: one of 4M; see 'serve --help'")
    parser.add_argument("--device", type=device_option, action="append", default=[],
                        metavar="socket=PATH,class=MODULE:CLASS[,...]", help="a device of your own; see 'serve --help'")
    parser.add_argument("--disk", type=disk_option, action="append", default=[],
                        metavar="image=PATH[,format=qed|raw][,readonly=on][,via=nbd|vhost-user]",
                        help="a disk (repeatable), seen by the guest as /dev/vda, vdb, ...: served by qbackend over "
                             "NBD (default) or vhost-user (vhost-user-blk-pci); format= is required unless readonly=on")
    parser.add_argument("--name", type=_name, default="default",
                        help="the instance's name, for --instance NAME of console, pci, dimm and ivshmem; one "
                             "instance of a name runs at a time (default: default)")
    parser.add_argument("--workdir", type=Path, default=None, metavar="DIR",
                        help="where sockets and the QEMU log go (default: the run directory of --name, "
                             "$XDG_RUNTIME_DIR/qbackend/NAME or DATA_DIR/run/NAME)")
    parser.add_argument("--machine", default="pc",
                        help="machine profile from qemu-configs/: pc (default) or q35")
    parser.add_argument("--accel", default=None, help="QEMU accelerator (default: $QBACKEND_ACCEL or tcg)")
    parser.add_argument("--memory", default="512M", help="guest RAM; a bare number is MiB, as for QEMU -m (default: 512M)")
    parser.add_argument("--dimm", type=dimm_option, action="append", default=[],
                        metavar="id=ID,size=SIZE[,node=N][,populated=on|off]",
                        help="a DIMM slot (repeatable; size a multiple of 128M, a bare number in MiB); then use 'qbackend dimm'")
    parser.add_argument("--numa", type=int, default=1, help="NUMA nodes of the guest (default 1)")
    data_dir_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import trio

    from qbackend.app.lifecycle import start_until_done, stop_on_signal
    from qbackend.errors import QemuError, SocketPathError
    from qbackend.machine.instances import CONTROL_SOCKET, DEFAULT_NAME, make_run_dir, run_dir, serving_pid
    from qbackend.machine.launch import QemuMachine, describe_exit, load_machine_config, vfio_user_device_arg

    workdir: Path = (args.workdir or run_dir(args.name)).absolute()
    owner = serving_pid(workdir / CONTROL_SOCKET)
    if owner is not None:  # its sockets are live: refused before anything is made or replaced
        who = f"PID {owner}" if owner else "another process"
        if args.workdir is None:
            raise SocketPathError(f"an instance named {args.name!r} is already running ({who}, {workdir}); stop "
                                  "it, or give this one another --name")
        raise SocketPathError(f"{workdir} is the run directory of a running qbackend ({who}); stop it, or give "
                              "another --workdir")
    make_run_dir(workdir)  # the sockets go there, and listening makes no folders
    options = args.ivshmem or ([] if args.device else [IvshmemOptions(socket=workdir / "ivshmem0.sock")])
    backend = ivshmem_backend(options)
    for opts in args.device:
        backend.add_device(opts)
    extra: list[str] = []
    disks: list[DiskOptions] = args.disk
    over_nbd = [(n, d) for n, d in enumerate(disks) if d.via == "nbd"]
    if over_nbd:
        nbd_sock = workdir / "nbd.sock"
        backend.add_nbd([NbdExportOptions(name=f"disk{n}", image=d.image.resolve(), readonly=d.readonly,
                                          format=d.format) for n, d in over_nbd], nbd_sock)
    for n, disk in enumerate(disks):
        if disk.via == "nbd":
            ro = ",read-only=on" if disk.readonly else ""
            extra += ["-blockdev", f"driver=nbd,node-name=disk{n},server.type=unix,server.path={nbd_sock},"
                                   f"export=disk{n}{ro}",
                      "-device", f"virtio-blk-pci,drive=disk{n},id=disk{n}"]
        else:
            # vhost-user: QEMU maps nothing of the disk; qbackend reads the rings in guest RAM
            # (QemuMachine's RAM is a shared memfd).  One queue: the guest has one vCPU.
            sock = workdir / f"disk{n}-vhost-user.sock"
            backend.add_vhost_user_blk(VhostUserBlkOptions(socket=sock, image=disk.image.resolve(), format=disk.format,
                                                           readonly=disk.readonly, num_queues=1, id=f"disk{n}"))
            extra += ["-chardev", f"socket,id=disk{n}-chr,path={sock}",
                      "-device", f"vhost-user-blk-pci,chardev=disk{n}-chr,id=disk{n},num-queues=1"]
    # The hotplug controller always comes along: DIMM slots and the PCI hotplug bus.
    slots = max(4, len(args.dimm))
    bus = load_machine_config(args.machine).hotplug_bus
    backend.add_hotplug_controller(workdir / "hotplug.sock", args.dimm, machine=args.machine,
                                   ram_size=parse_size(args.memory, "--memory", default_unit="M"), slots=slots)
    backend.add_pci_slots(bus)
    assert backend.dimms is not None
    extra += backend.dimms.cold_plug_args()
    # Devices given at start sit on the root bus; the hotplug bus stays free
    # for 'qbackend pci add' (a q35 root port has a single slot).
    for served in backend.devices.values():
        extra += ["-device", vfio_user_device_arg(served.id, served.server.socket_path)]
    vm = QemuMachine(workdir, machine=args.machine, memory=args.memory, accel=args.accel, extra_args=extra,
                     numa_nodes=args.numa, slots=slots, maxmem="4G", append=RUN_APPEND)
    backend.attach_qmp(vm.qmp_path)
    control = backend.enable_control(workdir / CONTROL_SOCKET)
    # How the commands that talk to this instance find it: by itself, by name, or by path.
    if args.workdir is not None:
        console_cmd, control_opt = f"qbackend console {vm.serial_path}", f" --control {control.path}"
    elif args.name != DEFAULT_NAME:
        console_cmd, control_opt = f"qbackend console --instance {args.name}", f" --instance {args.name}"
    else:
        console_cmd, control_opt = "qbackend console", ""
    qemu_status: list[int] = []  # QEMU's exit status, when it ended by itself

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signal, nursery.cancel_scope)
            await start_until_done(nursery, backend.run)
            try:
                await trio.to_thread.run_sync(vm.start)
                print(f"QEMU pid {vm.pid}, log {vm.log_path}")
                print(f"guest console: {vm.serial_path}   (attach: {console_cmd})")
                print(f"QMP socket:    {vm.qmp_path}   (yours, a second monitor: {vm.user_qmp_path})")
                print(f"qbackend QMP:  {control.path}   (qmp-shell {control.path}; qbackend pci{control_opt} "
                      "list)")
                for served in backend.devices.values():
                    print(f"{served.id}: vfio-user socket {served.server.socket_path}")
                print_exports(backend)
                print("Ctrl-C stops QEMU and qbackend", flush=True)
                assert vm.proc is not None
                qemu_status.append(await trio.to_thread.run_sync(vm.proc.wait, abandon_on_cancel=True))
            finally:
                vm.stop()
                nursery.cancel_scope.cancel()
        for path in (vm.qmp_path, vm.serial_path):
            path.unlink(missing_ok=True)

    trio.run(run)
    print("stopped; no QEMU or socket left behind", flush=True)
    if qemu_status and qemu_status[0] != 0:
        raise QemuError(f"{describe_exit(qemu_status[0])} (see {vm.log_path})")
    if qemu_status:
        print("QEMU exited with status 0 (the guest powered off)")
    return 0
