"""`qbackend qemu`: the provisioned QEMU by hand.

    qbackend qemu -- ARGS...          # qemu-system-x86_64 ARGS, as provisioned (exec: its status is ours)
    qbackend qemu --print             # the pieces of a command line of your own, one per line
    qbackend qemu --print kernel      # one piece, raw, for "$(...)"
"""

from __future__ import annotations

import argparse
import os
import shlex
from typing import TYPE_CHECKING

from qbackend.app.cli.commands import SUMMARIES
from qbackend.errors import UsageError

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers
    from qbackend.machine.launch import QemuInstall

PIECES = ("command", "kernel", "initrd", "append", "memory")

EPILOG = """\
--print PIECE prints one piece raw, one word per line, for the shell's $(...):
  command   the argv prefix that runs QEMU as provisioned (its environment, its
            own loader, -L firmware folders); read it with
            mapfile -t qemu < <(qbackend qemu --print command); "${qemu[@]}" ...
  kernel    the test guest's kernel           -kernel "$(qbackend qemu --print kernel)"
  initrd    the test guest's initramfs        -initrd "$(qbackend qemu --print initrd)"
  append    the kernel command line 'qbackend run' uses (console on ttyS0)
                                              -append "$(qbackend qemu --print append)"
  memory    guest RAM as a shared memfd, which vfio-user and vhost-user devices
            need (QEMU hands qbackend its fds)   $(qbackend qemu --print memory)
--print alone prints every piece, one per line: its name, then its words
shell-quoted.

example: the test guest with an ivshmem device served by 'qbackend serve'
  qbackend serve --ivshmem socket=/tmp/iv0.sock,size=4M &
  qbackend qemu -- $(qbackend qemu --print memory) -display none -serial stdio \\
    -kernel "$(qbackend qemu --print kernel)" -initrd "$(qbackend qemu --print initrd)" \\
    -append "$(qbackend qemu --print append)" \\
    -device '{"driver":"vfio-user-pci","id":"iv0","socket":{"type":"unix","path":"/tmp/iv0.sock"}}'

QEMU is $QEMU if set, else the data directory's qemu/ ('qbackend setup').
"""


def register(sub: Subparsers) -> None:
    parser = sub.add_parser("qemu", help=SUMMARIES["qemu"],
                            description="Run qemu-system-x86_64 as qbackend runs it (the provisioned folder's "
                                        "loader, libraries and firmware, or $QEMU), with ARGS after '--'; or print "
                                        "what a command line of your own needs.",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    parser.add_argument("--print", dest="piece", nargs="?", const="all", choices=(*PIECES, "all"), metavar="PIECE",
                        help=f"print the pieces (or one of: {', '.join(PIECES)}) and exit")
    parser.add_argument("--memory", default="512M", metavar="SIZE",
                        help="guest RAM of --print memory (default 512M; a bare number is MiB)")
    parser.add_argument("--machine", default="pc", help="machine type of --print memory (default pc)")
    parser.add_argument("qemu_args", nargs=argparse.REMAINDER, metavar="-- ARGS",
                        help="qemu-system-x86_64's arguments")
    parser.set_defaults(func=run)


def pieces(memory: str = "512M", machine: str = "pc") -> dict[str, list[str]]:
    """Every piece's words (see EPILOG)."""
    from qbackend.app.cli.run import RUN_APPEND
    from qbackend.machine.launch import find_guest, find_qemu, guest_append, shared_memory_args
    from qbackend.sizes import parse_size

    if memory.isdigit():
        memory += "M"
    parse_size(memory, "--memory", default_unit="M")  # refused here, not by QEMU
    guest = find_guest()
    return {"command": _command(find_qemu()), "kernel": [str(guest.kernel)], "initrd": [str(guest.initrd)],
            "append": [guest_append(RUN_APPEND)], "memory": shared_memory_args(machine, memory)}


def _command(qemu: QemuInstall) -> list[str]:
    """The argv prefix, with what QEMU needs of the environment put in front with env(1)."""
    changed = [f"{k}={v}" for k, v in sorted(qemu.env().items()) if os.environ.get(k) != v]
    return (["env", *changed] if changed else []) + qemu.system_cmd()


def run(args: argparse.Namespace) -> int:
    from qbackend.machine.launch import find_qemu

    rest: list[str] = args.qemu_args
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if args.piece is not None:
        if rest:
            raise UsageError("--print takes no QEMU arguments")
        every = pieces(args.memory, args.machine)
        if args.piece == "all":
            for name, words in every.items():
                print(f"{name:<8} {shlex.join(words)}")
        else:
            print("\n".join(every[args.piece]))
        return 0
    if not rest:
        raise UsageError("give QEMU's arguments after '--' (qbackend qemu -- -version), or --print")
    qemu = find_qemu()
    argv = [*qemu.system_cmd(), *rest]
    # Python ignores SIGPIPE and SIGXFSZ, and an exec keeps what is ignored: QEMU gets the defaults,
    # as from a shell.
    import signal

    for signum in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)
    os.execve(argv[0], argv, qemu.env())  # QEMU takes this process: its exit status, its signals
