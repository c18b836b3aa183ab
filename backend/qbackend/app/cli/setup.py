"""`qbackend setup`: provision QEMU and the test guest into the data directory."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from qbackend.app.cli.commands import SUMMARIES
from qbackend.app.cli.common import data_dir_option

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers

EPILOG = """\
examples:
  qbackend setup                          # into ~/.local/share/qbackend (or a checkout's build/)
  qbackend --data-dir /srv/qb setup       # elsewhere; then pass the same --data-dir to 'run'
  qbackend setup --only qemu-ppc          # QEMU for pseries (140 MB; 'run' does not need it)
  qbackend setup --only ppc-guest         # the ppc64le guest of the pseries differential
Needs a Debian host with apt; missing packages are installed with apt-get
(through sudo when not root).  A second run only checks and returns.
Downloaded packages are deleted once unpacked.  Ctrl-C stops every step
started and leaves no half-made folder (exit 130).
"""

PARTS = ("qemu", "qemu-ppc", "guest", "ppc-guest")
DEFAULT_PARTS = ("qemu", "guest")


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived; a BaseException, as KeyboardInterrupt, so
    that no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def register(sub: Subparsers) -> None:
    setup = sub.add_parser("setup", help=SUMMARIES["setup"],
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                           description="Unpack QEMU 11.1 for x86 from Debian trixie-backports and build "
                                       "the busybox test guest: what 'qbackend run' needs, as 'make setup' "
                                       "does for a checkout.")
    data_dir_option(setup)
    setup.add_argument("--only", choices=PARTS, action="append",
                       help="just this part (repeatable); default: qemu and guest.  qemu-ppc "
                            "(qemu-system-ppc64, for pseries) and ppc-guest (a ppc64le kernel and "
                            "initramfs) are provisioned only when named")
    setup.add_argument("--no-host-packages", action="store_true",
                       help="do not install missing Debian packages (mmdebstrap, busybox-static, gcc, ...)")
    setup.set_defaults(func=run)


def _interrupted(signum: int, frame: FrameType | None) -> None:
    # Once: the cleanup that follows (killing the step's process group,
    # removing its temporary folder) is bounded and must not be cut short.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Interrupted(signum)


def run(args: argparse.Namespace) -> int:
    from qbackend.machine.data_dir import data_dir
    from qbackend.provision import install_host_packages, provision

    parts = set(args.only or DEFAULT_PARTS)
    where = data_dir()
    previous: dict[signal.Signals, Callable[[int, FrameType | None], Any] | int | None] = {}
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _interrupted)
        if not args.no_host_packages:
            install_host_packages()
        provision(where, qemu="qemu" in parts, qemu_ppc="qemu-ppc" in parts, guest="guest" in parts,
                  ppc_guest="ppc-guest" in parts)
    except Interrupted as stop:
        print(f"qbackend setup: stopped by {stop}; the step's processes were killed and its temporary folder removed",
              file=sys.stderr)
        return 128 + stop.signum
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    print(f"qbackend setup: ready in {where}")
    return 0
