"""`qbackend run`: the devices, QEMU and a booted guest together."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

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
attached; prints where the guest console and the QMP socket are.  Ctrl-C
stops everything.  QEMU comes from $QEMU or from 'make setup'; the
accelerator from --accel or $QBACKEND_ACCEL (default tcg).
"""


def register(sub: Subparsers) -> None:
    parser = sub.add_parser("run", help="start the devices, QEMU and a booted guest together",
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
    parser.add_argument("--workdir", type=Path, default=Path("build/run"),
                        help="where sockets and the QEMU log go (default: build/run)")
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
    from qbackend.machine.launch import QemuMachine, load_machine_config, vfio_user_device_arg

    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)  # the sockets go there, and listening makes no folders
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
                     numa_nodes=args.numa, slots=slots, maxmem="4G", append="memhp_default_state=online_movable")
    backend.attach_qmp(vm.qmp_path)
    control = backend.enable_control(workdir / "qbackend.sock")

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signal, nursery.cancel_scope)
            await start_until_done(nursery, backend.run)
            try:
                await trio.to_thread.run_sync(vm.start)
                print(f"QEMU pid {vm.pid}, log {vm.log_path}")
                print(f"guest console: {vm.serial_path}   (attach: qbackend console {vm.serial_path})")
                print(f"QMP socket:    {vm.qmp_path}   (yours, a second monitor: {vm.user_qmp_path})")
                print(f"qbackend QMP:  {control.path}   (qmp-shell {control.path}; qbackend dimm --control "
                      f"{control.path} list)")
                for served in backend.devices.values():
                    print(f"{served.id}: vfio-user socket {served.server.socket_path}")
                print_exports(backend)
                print("Ctrl-C stops QEMU and qbackend", flush=True)
                assert vm.proc is not None
                status = await trio.to_thread.run_sync(vm.proc.wait, abandon_on_cancel=True)
                print(f"QEMU exited with status {status}")
            finally:
                vm.stop()
                nursery.cancel_scope.cancel()
        for path in (vm.qmp_path, vm.serial_path):
            path.unlink(missing_ok=True)

    trio.run(run)
    print("stopped; no QEMU or socket left behind")
    return 0
