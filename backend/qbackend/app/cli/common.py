"""What several subcommands share: how a user error is reported, option
types, the NBD limit options, and the lines that say where exports are served."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from qbackend.errors import QbackendError, UsageError

if TYPE_CHECKING:
    from qbackend.app.service import Backend
    from qbackend.options import IvshmemOptions

    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

T = TypeVar("T")


def report(prefix: str, exc: BaseException) -> int | None:
    """If ``exc`` is a user error (a QbackendError or an OSError, possibly inside trio's
    exception groups), print it as one line after ``prefix`` and return the exit code:
    the error's own (2 for the command line, 1 for an operation), 1 for an OSError.
    Else None: it is a bug, and keeps its traceback."""
    error = _user_error(exc)
    if error is None:
        return None
    if isinstance(error, BrokenPipeError) and _stdout_gone():  # `qbackend qed info X | head -1`
        return _quiet_after_broken_pipe()
    print(f"{prefix}: {_one_line(error)}", file=sys.stderr)
    return error.exit_code if isinstance(error, QbackendError) else 1


def _stdout_gone() -> bool:
    """Whether whoever read stdout has gone (a pipe whose reading end is closed: POLLERR)."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), 0)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError):
        return False


def _quiet_after_broken_pipe() -> int:
    """The reader of stdout went away: end as a C tool killed by SIGPIPE ends (no message,
    128 + SIGPIPE as a shell shows it), stdout pointed at /dev/null so that what is still
    buffered for it does not fail again at exit."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
    return 141


def _user_error(exc: BaseException) -> BaseException | None:
    if isinstance(exc, BaseExceptionGroup):
        leaves = [_user_error(e) for e in exc.exceptions]
        return leaves[0] if leaves and all(leaf is not None for leaf in leaves) else None
    if isinstance(exc, (QbackendError, OSError)):
        return exc
    return None


def _one_line(exc: BaseException) -> str:
    """The message of a user error as one line (the first line of a long one)."""
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    return text.splitlines()[0]


def argument(parse: Callable[[str], T]) -> Callable[[str], T]:
    """An argparse `type=` from an option parser: its UsageError becomes argparse's one-line error."""

    def convert(text: str) -> T:
        try:
            return parse(text)
        except UsageError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return convert


def option_parser(name: str) -> Callable[[str], Any]:
    """`qbackend.options`' parser `name` ("IvshmemOptions.parse"), as an argparse `type=`;
    the module is imported when an option is parsed, not when the parsers are built."""

    def parse(text: str) -> Any:
        import qbackend.options

        target: Any = qbackend.options
        for part in name.split("."):
            target = getattr(target, part)
        return target(text)

    return argument(parse)


ivshmem_option = option_parser("IvshmemOptions.parse")
device_option = option_parser("DeviceOptions.parse")
disk_option = option_parser("DiskOptions.parse")
export_option = option_parser("NbdExportOptions.parse")
tcp_option = option_parser("parse_tcp")
dimm_option = option_parser("DimmOptions.parse")
vhost_user_blk_option = option_parser("VhostUserBlkOptions.parse")


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


def limit_options(parser: argparse.ArgumentParser) -> None:
    """--handshake-timeout, --max-connections and the TLS options of `serve` and `nbd`."""
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


def apply_limits(args: argparse.Namespace, backend: Backend) -> None:
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


def data_dir_option(parser: argparse.ArgumentParser) -> None:
    # SUPPRESS: an absent subcommand option must not hide the top-level one.
    parser.add_argument("--data-dir", type=Path, metavar="DIR", default=argparse.SUPPRESS,
                        help="where provisioned QEMU and the guest live (as 'qbackend --data-dir')")


def instance_options(parser: argparse.ArgumentParser, what: str = "its QMP monitor") -> None:
    """--instance NAME and --control PATH: which running qbackend a command talks to."""
    parser.add_argument("--instance", metavar="NAME",
                        help="the 'qbackend run --name NAME' to talk to (default: the only one running)")
    parser.add_argument("--control", type=Path, metavar="PATH",
                        help=f"{what} at PATH instead (a 'qbackend serve --control PATH', or a 'run --workdir')")


def instance_options_after(actions: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """--instance and --control after the action too (`dimm list --control PATH`, as people
    type it), not shown again in each action's help; given there they win."""
    for parser in actions.choices.values():
        parser.add_argument("--instance", metavar="NAME", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        parser.add_argument("--control", type=Path, metavar="PATH", default=argparse.SUPPRESS,
                            help=argparse.SUPPRESS)


def control_path(args: argparse.Namespace) -> Path:
    """The QMP monitor a command talks to: --control PATH, else the running instance
    (--instance NAME, or the only one; one-line errors for none or several)."""
    if args.control is not None:
        if args.instance is not None:
            raise UsageError("give --instance NAME or --control PATH, not both")
        control: Path = args.control
        return control
    from qbackend.machine.instances import find

    return find(args.instance).control


def ivshmem_backend(options: Iterable[IvshmemOptions], handshake_timeout: float = 10.0) -> Backend:
    """A Backend with these ivshmem devices."""
    from qbackend.app.service import Backend

    backend = Backend(handshake_timeout=handshake_timeout)
    for opt in options:
        backend.add_ivshmem(opt)
    return backend


def print_exports(backend: Backend) -> None:
    """Where each vhost-user-blk disk and NBD export is served."""
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


def served_line(counts: Mapping[str, int]) -> str:
    """What a server served, for the line printed at stop: "served: READ 12, native_reads 12"
    (the nonzero counts, by name)."""
    pairs = [f"{key} {n}" for key, n in sorted(counts.items()) if n]
    return "served: " + (", ".join(pairs) if pairs else "nothing")
