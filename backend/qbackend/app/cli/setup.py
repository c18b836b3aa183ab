"""`qbackend setup`: provision QEMU and the test guest into the data directory."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from qbackend.app.cli.common import data_dir_option

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers

EPILOG = """\
examples:
  qbackend setup                          # into ~/.local/share/qbackend (or a checkout's build/)
  qbackend --data-dir /srv/qb setup       # elsewhere; then pass the same --data-dir to 'run'
Needs a Debian host with apt; missing packages are installed with apt-get
(through sudo when not root).  A second run only checks and returns.
"""


def register(sub: Subparsers) -> None:
    setup = sub.add_parser("setup", help="provision QEMU 11.1 and the test guest into the data directory",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                           description="Unpack QEMU 11.1 (x86 and ppc) from Debian trixie-backports and build "
                                       "the busybox test guest, as 'make setup' does for a checkout.")
    data_dir_option(setup)
    setup.add_argument("--only", choices=("qemu", "qemu-ppc", "guest"), action="append",
                       help="just this part (repeatable); default: all three")
    setup.add_argument("--no-host-packages", action="store_true",
                       help="do not install missing Debian packages (mmdebstrap, busybox-static, gcc, ...)")
    setup.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from qbackend.machine.data_dir import data_dir
    from qbackend.provision import install_host_packages, provision

    parts = set(args.only or ("qemu", "qemu-ppc", "guest"))
    where = data_dir()
    if not args.no_host_packages:
        install_host_packages()
    provision(where, qemu="qemu" in parts, qemu_ppc="qemu-ppc" in parts, guest="guest" in parts)
    print(f"qbackend setup: ready in {where}")
    return 0
