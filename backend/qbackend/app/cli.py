"""qbackend's command line.

    qbackend serve --ivshmem socket=/tmp/iv0.sock,size=4M
    qbackend run                      # QEMU + a booted guest + the devices
    qbackend console PATH             # talk to a guest's serial console

Each command imports what it needs when it runs (trio, the device service,
QEMU helpers), so that light commands such as `qbackend qed info` start fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

from qbackend.errors import ControlError, QbackendError, UsageError
from qbackend.options import (
    DeviceOptions,
    DimmOptions,
    DiskOptions,
    IvshmemOptions,
    NbdExportOptions,
    OptionError,
    VhostUserBlkOptions,
    parse_int,
    parse_keyval,
    parse_tcp,
)
from qbackend.sizes import parse_size

if TYPE_CHECKING:

    from qbackend.app.service import Backend

EPILOG_SERVE = """\
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
for example:
  qbackend serve --vhost-user-blk socket=/tmp/vub.sock,image=disk.qed,format=qed
  qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=512M,share=on \\
    -machine pc,memory-backend=mem -chardev socket,id=vub0,path=/tmp/vub.sock \\
    -device vhost-user-blk-pci,chardev=vub0,num-queues=1
"""

EPILOG_RUN = """\
Starts the devices, then QEMU with a booted busybox guest and the devices
attached; prints where the guest console and the QMP socket are.  Ctrl-C
stops everything.  QEMU comes from $QEMU or from 'make setup'; the
accelerator from --accel or $QBACKEND_ACCEL (default tcg).
"""


T = TypeVar("T")


def _argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse `type=` from an option parser: its UsageError becomes argparse's one-line error."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


_ivshmem_option = _argument(IvshmemOptions.parse)
_device_option = _argument(DeviceOptions.parse)
_disk_option = _argument(DiskOptions.parse)
_export_option = _argument(NbdExportOptions.parse)
_tcp_option = _argument(parse_tcp)
_dimm_option = _argument(DimmOptions.parse)
_vhost_user_blk_option = _argument(VhostUserBlkOptions.parse)


EPILOG_NBD = """\
examples:
  qbackend nbd --export name=disk,image=disk.qed,format=qed --socket /tmp/nbd.sock
  qemu-img info nbd+unix:///disk?socket=/tmp/nbd.sock
  nbdinfo --list nbd+unix:///?socket=/tmp/nbd.sock

--export keys:
  name=NAME      export name (default: the image file's stem); the first export
                 also answers the empty name
  image=PATH     a QED image or a raw file
  format=raw|qed its format: required for a writable export (qbackend never probes
                 a writable image); a read-only one without it is told apart by the
                 QED magic, and a QED one naming a backing file then needs format=qed
  readonly=on    refuse writes (EPERM)
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


EPILOG_PCI = """\
examples (against 'make run'):
  qbackend pci list
  qbackend pci add ivshmem socket=/tmp/iv9.sock,size=1M,vectors=0,id=iv9
  qbackend pci del iv9
  qbackend pci add-json '{"driver":"virtio-rng-pci","id":"rng0"}'
A qbackend device with MSI-X (vectors>=1) cannot be unplugged on QEMU 11.1.3
(it aborts; docs/qemu-issues.md): hot-plug ivshmem with vectors=0.
"""

EPILOG_DIMM = """\
examples (against 'make run' / 'qbackend run --dimm ...'):
  qbackend dimm list
  qbackend dimm add hot1
  qbackend dimm del hot1        # waits for the guest: removed, or failed (OST 0x82, busy)
  qbackend dimm total           # base + plugged, beside QEMU's query-memory-size-summary
"""


EPILOG_SETUP = """\
examples:
  qbackend setup                          # into ~/.local/share/qbackend (or a checkout's build/)
  qbackend --data-dir /srv/qb setup       # elsewhere; then pass the same --data-dir to 'run'
Needs a Debian host with apt; missing packages are installed with apt-get
(through sudo when not root).  A second run only checks and returns.
"""


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error as one line that says where help is (exit 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see '{self.prog} --help')\n")


def _one_line(exc: BaseException) -> str:
    """The message of a user error as one line (the first line of a long one)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return text.splitlines()[0]


def _user_error(exc: BaseException) -> BaseException | None:
    """The error to report if ``exc`` is a user error (possibly inside trio's
    exception groups), else None: then it is a bug and keeps its traceback."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_user_error(e) for e in exc.exceptions]
        return leaves[0] if leaves and all(leaf is not None for leaf in leaves) else None
    if isinstance(exc, (QbackendError, OSError)):
        return exc
    return None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: between 0 and 3600 seconds")
    return value


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0: no limit)")
    return int(text)


def _limit_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--handshake-timeout", type=_seconds, default=10.0, metavar="SECONDS",
                        help="drop a client that has not finished its NBD handshake (or sent its first vfio-user "
                             "message) within this time (default 10, as qemu-nbd)")
    parser.add_argument("--max-connections", type=_count, default=0, metavar="N",
                        help="NBD clients at once at most; more are refused (default 0: no limit; "
                             "with 1, multi-conn is not offered)")
    parser.add_argument("--tls-creds", type=Path, metavar="DIR",
                        help="NBD over TLS (NBD_OPT_STARTTLS) with the X.509 files of DIR: ca-cert.pem, "
                             "server-cert.pem, server-key.pem (QEMU's tls-creds-x509 layout)")
    parser.add_argument("--tls", choices=("on", "require"), default=None,
                        help="with --tls-creds: require TLS before anything else (default) or only offer it")
    parser.add_argument("--tls-verify-peer", action="store_true",
                        help="with --tls-creds: clients must present a certificate signed by ca-cert.pem")


def _apply_limits(args: argparse.Namespace, backend: Backend) -> None:
    """--handshake-timeout, --max-connections and the TLS options, onto the backend's NBD server."""
    backend.blocks.handshake_timeout = args.handshake_timeout
    backend.blocks.max_connections = args.max_connections
    if args.tls_creds is None:
        if args.tls or args.tls_verify_peer:
            raise UsageError("--tls and --tls-verify-peer need --tls-creds DIR")
        return
    from qbackend.plumbing.tls import server_context

    backend.blocks.tls_context = server_context(args.tls_creds, verify_peer=args.tls_verify_peer)
    backend.blocks.tls_mode = args.tls or "require"


def _data_dir_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: an absent subcommand option must not hide the top-level one.
    parser.add_argument("--data-dir", type=Path, metavar="DIR", default=argparse.SUPPRESS,
                        help="where provisioned QEMU and the guest live (as 'qbackend --data-dir')")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qbackend",
        description="External devices for QEMU from one Python process: ivshmem, a hotplug controller and "
                    "devices of your own (qbackend.devices.Device) over vfio-user; DIMM and PCI hotplug over "
                    "QMP; QED/raw disks over NBD (TLS, extended headers); a QMP monitor of its own "
                    "(serve --control); a sPAPR DRC model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run 'qbackend COMMAND --help' for the options of each command.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    parser.add_argument("--data-dir", type=Path, metavar="DIR",
                        help="where provisioned QEMU and the test guest live (default: $QBACKEND_DATA_DIR, "
                             "else a checkout's build/, else ~/.local/share/qbackend)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    setup = sub.add_parser("setup", help="provision QEMU 11.1 and the test guest into the data directory",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_SETUP,
                           description="Unpack QEMU 11.1 (x86 and ppc) from Debian trixie-backports and build "
                                       "the busybox test guest, as 'make setup' does for a checkout.")
    _data_dir_option(setup)
    setup.add_argument("--only", choices=("qemu", "qemu-ppc", "guest"), action="append",
                       help="just this part (repeatable); default: all three")
    setup.add_argument("--no-host-packages", action="store_true",
                       help="do not install missing Debian packages (mmdebstrap, busybox-static, gcc, ...)")

    serve = sub.add_parser("serve", help="serve devices (and NBD exports, a QMP monitor) until Ctrl-C or quit",
                           description="Serve devices to QEMU until interrupted.",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_SERVE)
    serve.add_argument("--ivshmem", type=_ivshmem_option, action="append", default=[], metavar="KEY=VALUE,...",
                       help="an ivshmem device (repeatable); keys below")
    serve.add_argument("--device", type=_device_option, action="append", default=[],
                       metavar="socket=PATH,class=MODULE:CLASS[,id=ID][,KEY=VALUE...]",
                       help="a PCI device of your own (a qbackend.devices.Device subclass); "
                            "class=path/to/file.py:CLASS loads a file; other keys reach its constructor")
    serve.add_argument("--hotplug", type=_hotplug_option, metavar="socket=PATH[,machine=pc][,ram=512M][,slots=4]",
                       help="the hotplug-controller device (ACPI memory-hotplug block in BAR0); "
                            "ram= is the guest's base RAM, a bare number in MiB")
    serve.add_argument("--dimm", type=_dimm_option, action="append", default=[],
                       metavar="id=ID,size=SIZE[,node=N][,populated=on|off]",
                       help="a DIMM slot of the hotplug controller (repeatable); size a multiple of 128M, a bare number in MiB")
    serve.add_argument("--qmp", type=Path, help="QEMU's QMP socket: follow and drive its hotplug")
    serve.add_argument("--control", "--monitor", type=Path, dest="control", metavar="PATH",
                       help="serve a QMP monitor on this UNIX socket (qmp-shell, qemu.qmp, 'qbackend dimm|pci|ivshmem')")
    serve.add_argument("--nbd", type=_export_option, action="append", default=[], metavar="KEY=VALUE,...",
                       help="an NBD export served beside the devices (repeatable); keys: see 'qbackend nbd --help'")
    serve.add_argument("--nbd-socket", type=Path, help="UNIX socket for the --nbd exports")
    serve.add_argument("--vhost-user-blk", type=_vhost_user_blk_option, action="append", default=[],
                       metavar="socket=PATH,image=PATH,format=raw|qed[,readonly=on][,num-queues=N][,id=ID]",
                       help="a disk for QEMU's vhost-user-blk-pci (repeatable): -chardev socket,id=vub0,path=PATH "
                            "-device vhost-user-blk-pci,chardev=vub0 (guest RAM must be shared)")
    serve.add_argument("--nbd-tcp", type=_tcp_option, metavar="HOST:PORT", help="also serve NBD over TCP")
    _limit_options(serve)

    nbd_cmd = sub.add_parser("nbd", help="serve disk images (QED or raw) over NBD until Ctrl-C",
                             description="Serve QED and raw images as NBD exports.",
                             formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_NBD)
    nbd_cmd.add_argument("--export", type=_export_option, action="append", required=True,
                         metavar="KEY=VALUE,...", help="an export (repeatable); keys below")
    nbd_cmd.add_argument("--socket", type=Path, help="UNIX socket to listen on")
    nbd_cmd.add_argument("--tcp", type=_tcp_option, metavar="HOST:PORT",
                         help="also (or only) listen on TCP, e.g. 127.0.0.1:10809")
    _limit_options(nbd_cmd)

    run = sub.add_parser("run", help="start the devices, QEMU and a booted guest together",
                         description="Start qbackend's devices and a QEMU guest that uses them.",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_RUN)
    run.add_argument("--ivshmem", type=_ivshmem_option, action="append", default=[], metavar="KEY=VALUE,...",
                     help="an ivshmem device (repeatable); default: one of 4M; see 'serve --help'")
    run.add_argument("--device", type=_device_option, action="append", default=[],
                     metavar="socket=PATH,class=MODULE:CLASS[,...]", help="a device of your own; see 'serve --help'")
    run.add_argument("--disk", type=_disk_option, action="append", default=[],
                     metavar="image=PATH[,format=qed|raw][,readonly=on][,via=nbd|vhost-user]",
                     help="a disk (repeatable), seen by the guest as /dev/vda, vdb, ...: served by qbackend over "
                          "NBD (default) or vhost-user (vhost-user-blk-pci); format= is required unless readonly=on")
    run.add_argument("--workdir", type=Path, default=Path("build/run"),
                     help="where sockets and the QEMU log go (default: build/run)")
    run.add_argument("--machine", default="pc",
                     help="machine profile from qemu-configs/: pc (default) or q35")
    run.add_argument("--accel", default=None, help="QEMU accelerator (default: $QBACKEND_ACCEL or tcg)")
    run.add_argument("--memory", default="512M", help="guest RAM; a bare number is MiB, as for QEMU -m (default: 512M)")
    run.add_argument("--dimm", type=_dimm_option, action="append", default=[],
                     metavar="id=ID,size=SIZE[,node=N][,populated=on|off]",
                     help="a DIMM slot (repeatable; size a multiple of 128M, a bare number in MiB); then use 'qbackend dimm'")
    run.add_argument("--numa", type=int, default=1, help="NUMA nodes of the guest (default 1)")
    _data_dir_option(run)

    pci = sub.add_parser("pci", help="hot-add, hot-remove and list PCI devices of a running qbackend",
                         formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_PCI,
                         description="Drive PCI hotplug through a running 'qbackend run' or 'qbackend serve'.")
    pci.add_argument("--control", type=Path, default=Path("build/run/qbackend.sock"),
                     help="its QMP monitor (default: build/run/qbackend.sock, where 'make run' puts it)")
    pci_sub = pci.add_subparsers(dest="pci_command", metavar="ACTION", required=True)
    pci_sub.add_parser("list", help="the hotplug bus: slots, devices, UP/DOWN/RMV")
    p = pci_sub.add_parser("add", help="a new qbackend device (its socket first, then device_add)")
    p.add_argument("kind", choices=("ivshmem",))
    p.add_argument("options", help="the device's keys, as for 'serve --ivshmem'")
    p.add_argument("--id", help="QEMU device id (default: the options' id=)")
    p = pci_sub.add_parser("add-json", help="device_add any QEMU device on the hotplug bus")
    p.add_argument("device", help='QMP device_add arguments, e.g. \'{"driver":"e1000","id":"n1"}\'')
    p = pci_sub.add_parser("del", help="device_del, and wait until the guest has ejected it")
    p.add_argument("id")
    p.add_argument("--timeout", type=float, default=30.0)

    dimm = sub.add_parser("dimm", help="hot-add, hot-remove and list DIMMs of a running qbackend",
                          formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG_DIMM,
                          description="Drive the DIMM slots of a running 'qbackend run' or 'qbackend serve'.")
    dimm.add_argument("--control", type=Path, default=Path("build/run/qbackend.sock"),
                      help="its QMP monitor (default: build/run/qbackend.sock, where 'make run' puts it)")
    dimm_sub = dimm.add_subparsers(dest="dimm_command", metavar="ACTION", required=True)
    dimm_sub.add_parser("list", help="slots, addresses, nodes, what is plugged")
    dimm_sub.add_parser("total", help="memory total: base plus plugged")
    for name, what in (("add", "hot-add"), ("del", "hot-remove")):
        p = dimm_sub.add_parser(name, help=f"{what} the DIMM of a declared slot")
        p.add_argument("id")
        if name == "del":
            p.add_argument("--timeout", type=float, default=30.0, help="how long to wait for the guest (s)")

    console = sub.add_parser("console", help="attach the terminal to a guest's serial console socket",
                             description="Relay this terminal to a UNIX socket (a QEMU serial chardev). "
                                         "Leave with Ctrl-].")
    console.add_argument("path", type=Path)

    from qbackend.app.drc_cli import register as register_drc
    register_drc(sub)
    from qbackend.app.qed_cli import add_parser as register_qed
    register_qed(sub)
    from qbackend.app.ivshmem_cli import register as register_ivshmem
    register_ivshmem(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s")
    # qemu.qmp logs each failed connect while it retries (QEMU still starting): noise unless -vv.
    logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if args.verbose >= 2 else logging.CRITICAL)
    if args.data_dir is not None:
        from qbackend.machine.data_dir import set_data_dir

        set_data_dir(args.data_dir)
    try:
        if args.command == "setup":
            return _setup(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "run":
            return _run(args)
        if args.command == "nbd":
            return _nbd(args)
        if args.command == "console":
            return _console(args.path)
        if args.command == "dimm":
            return _dimm(args)
        if args.command == "pci":
            return _pci(args)
        if args.command == "qed":
            from qbackend.app.qed_cli import run as qed_main
            return qed_main(args)
        if args.command == "drc":
            from qbackend.app.drc_cli import main as drc_main
            return drc_main(args)
        if args.command == "ivshmem":
            from qbackend.app.ivshmem_cli import main as ivshmem_main
            return ivshmem_main(args)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        error = _user_error(exc)
        if error is None:
            raise
        print(f"qbackend {args.command}: {_one_line(error)}", file=sys.stderr)
        return error.exit_code if isinstance(error, QbackendError) else 1
    return 2


def _setup(args: argparse.Namespace) -> int:
    from qbackend.machine.data_dir import data_dir
    from qbackend.provision import install_host_packages, provision

    parts = set(args.only or ("qemu", "qemu-ppc", "guest"))
    where = data_dir()
    if not args.no_host_packages:
        install_host_packages()
    provision(where, qemu="qemu" in parts, qemu_ppc="qemu-ppc" in parts, guest="guest" in parts)
    print(f"qbackend setup: ready in {where}")
    return 0


def _backend(options: list[IvshmemOptions], handshake_timeout: float = 10.0) -> Backend:
    from qbackend.app.service import Backend

    backend = Backend(handshake_timeout=handshake_timeout)
    for opt in options:
        backend.add_ivshmem(opt)
    return backend


def _serve(args: argparse.Namespace) -> int:
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
    backend = _backend(args.ivshmem, args.handshake_timeout)
    _apply_limits(args, backend)
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

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signal, nursery.cancel_scope)
            await start_until_done(nursery, backend.run)
            for served in backend.devices.values():
                dev = served.device
                print(f"{served.id}: {served.server.socket_path} (IVPosition {getattr(dev, 'position', '-')})",
                      flush=True)
            _print_nbd(backend)
            print("serving; Ctrl-C stops", flush=True)

    trio.run(serve)
    return 0


def _nbd(args: argparse.Namespace) -> int:
    exports: list[NbdExportOptions] = args.export
    socket_path: Path | None = args.socket
    tcp: tuple[str, int] | None = args.tcp
    if socket_path is None and tcp is None:
        print("qbackend nbd: say where to listen: --socket PATH and/or --tcp HOST:PORT", file=sys.stderr)
        return 2
    import trio

    from qbackend.app.lifecycle import start_until_done, stop_on_signal
    from qbackend.app.service import Backend

    backend = Backend(handshake_timeout=args.handshake_timeout)
    _apply_limits(args, backend)
    backend.add_nbd(exports, socket_path, tcp)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signal, nursery.cancel_scope)
            await start_until_done(nursery, backend.run)
            _print_nbd(backend)
            print("serving; Ctrl-C stops (in-flight requests finish, images are flushed)", flush=True)

    trio.run(serve)
    return 0


def _print_nbd(backend: Backend) -> None:
    for export_id, entry in backend.blocks.vhost.items():
        ro = " (read-only)" if entry.export.info.read_only else ""
        print(f"vhost-user-blk {export_id}: {entry.export.info.size} bytes{ro}, {entry.server.num_queues} "
              f"queue(s): {entry.server.socket_path}", flush=True)
    server = backend.nbd
    if server is None:
        return
    for name, export in server.exports.items():
        where = []
        scheme = "nbd" if server.tls_mode == "off" else "nbds"
        if server.socket_path is not None:
            where.append(f"{scheme}+unix:///{name}?socket={server.socket_path}")
        if server.tcp is not None:
            where.append(f"{scheme}://{server.tcp[0]}:{server.tcp_port}/{name}")
        ro = " (read-only)" if export.info.read_only else ""
        print(f"export {name}: {export.info.size} bytes{ro}: {'  '.join(where)}", flush=True)


def _run(args: argparse.Namespace) -> int:
    import trio

    from qbackend.app.lifecycle import start_until_done, stop_on_signal
    from qbackend.machine.launch import QemuMachine, load_machine_config, vfio_user_device_arg

    workdir: Path = args.workdir.resolve()
    options = args.ivshmem or ([] if args.device else [IvshmemOptions(socket=workdir / "ivshmem0.sock")])
    backend = _backend(options)
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
                _print_nbd(backend)
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


def _dimm(args: argparse.Namespace) -> int:
    from qbackend.app.monitor_client import call, monitor, wait_outcome

    with monitor(args.control) as qmp:
        if args.dimm_command == "list":
            rows = call(qmp, "query-memory-hotplug")
            print(f"{'id':<12}{'slot':>5}  {'address':<20}{'size':>8}{'node':>5}  state")
            for r in rows:
                print(f"{r['id']:<12}{r['slot']:>5}  {r['address']:#018x}  {r['size'] >> 20:>6}M{r['node']:>5}  "
                      f"{r['state']}")
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


def _pci(args: argparse.Namespace) -> int:
    from qbackend.app.monitor_client import call, monitor, wait_outcome
    from qbackend.options import IvshmemOptions

    with monitor(args.control) as qmp:
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
                                         "socket": str(opts.socket), "size": str(opts.size),
                                         "vectors": opts.vectors}
            if opts.shm:
                device["shm"] = opts.shm
            if opts.peer is not None:
                device["peer"] = opts.peer
            if opts.server is not None:
                device["server"] = str(opts.server)
            r = call(qmp, "pci-device-add", device)
            print(f"{r['id']}: slot {r['slot']}, socket {r['socket']}, IVPosition {r['position']}")
        elif args.pci_command == "add-json":
            try:
                spec = json.loads(args.device)
            except ValueError as exc:
                raise UsageError(f"add-json: not JSON: {exc}") from None
            r = call(qmp, "pci-device-add-qemu", {"device": spec})
            print(f"{r['id']}: slot {r['slot']}")
        else:
            call(qmp, "pci-device-del", {"id": args.id})
            try:
                wait_outcome(qmp, ("PCI_DEVICE_UNPLUGGED",), {"id": args.id}, args.timeout)
            except ControlError:
                print(f"{args.id}: still there (the guest did not eject it)")
                return 1
            print(f"{args.id}: removed")
    return 0


def _console(path: Path) -> int:
    """A minimal terminal relay; Ctrl-] leaves."""
    import select
    import socket
    import termios
    import tty

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(os.fspath(path))
    stdin = sys.stdin.fileno()
    saved = termios.tcgetattr(stdin) if os.isatty(stdin) else None
    print(f"connected to {path}; Ctrl-] leaves", file=sys.stderr)
    try:
        if saved is not None:
            tty.setraw(stdin)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while True:
            ready, _, _ = select.select([stdin, sock], [], [])
            if sock in ready:
                data = sock.recv(65536)
                if not data:
                    break
                os.write(sys.stdout.fileno(), data)
            if stdin in ready:
                data = os.read(stdin, 1024)
                if not data or b"\x1d" in data:
                    break
                sock.sendall(data)
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
        sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
