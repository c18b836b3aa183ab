"""`qbackend ivshmem ...`: look at and drive the peer groups of a running
qbackend through its control socket, or serve a group by itself.

    qbackend ivshmem peers                 # ids, kinds, vectors, doorbells received
    qbackend ivshmem ring PEER VECTOR
    qbackend ivshmem dump OFFSET LEN       # hexdump of the shared memory
    qbackend ivshmem write OFFSET TEXT
    qbackend ivshmem server --socket PATH --shm NAME --vectors N [--serve-control PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qbackend.app.cli.commands import SUMMARIES
from qbackend.app.cli.common import control_path, instance_options, instance_options_after
from qbackend.sizes import parse_size

if TYPE_CHECKING:
    from qbackend.app.cli.common import Subparsers

# trio and the control socket are imported by the functions that use them: registering the
# command with qbackend's parser stays cheap for the other commands

EPILOG = """\
examples (against the running 'qbackend run'; several: add --instance NAME; a
'qbackend serve --control PATH --ivshmem ...,shm=g': add --control PATH):
  qbackend ivshmem peers
  qbackend ivshmem ring 1 0          # peer 1, vector 0
  qbackend ivshmem dump 0x1000 64
  qbackend ivshmem write 0 'hello'

a group by itself (an ivshmem-server for stock QEMUs and host programs):
  qbackend ivshmem server --socket /tmp/g.sock --shm g --size 4M --vectors 2 --serve-control /tmp/g.ctl
  qbackend qemu -- ... -chardev socket,path=/tmp/g.sock,id=ivs -device ivshmem-doorbell,chardev=ivs,vectors=2
"""


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None


def register(sub: Subparsers) -> None:
    """Add the `ivshmem` command to qbackend's subparsers."""
    iv = sub.add_parser("ivshmem", help=SUMMARIES["ivshmem"],
                        description="Drive the ivshmem peer groups of a running qbackend, or serve one.",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    instance_options(iv, "qbackend's QMP monitor")
    iv.add_argument("--group", help="which group (its shm name); needed when there are several")
    actions = iv.add_subparsers(dest="ivshmem_command", metavar="ACTION", required=True)
    actions.add_parser("peers", help="the group's peers: id, kind, vectors, doorbells received")
    ring = actions.add_parser("ring", help="ring a peer's vector")
    ring.add_argument("peer", type=_int)
    ring.add_argument("vector", type=_int)
    dump = actions.add_parser("dump", help="hexdump part of the shared memory")
    dump.add_argument("offset", type=_int)
    dump.add_argument("length", type=_int)
    write = actions.add_parser("write", help="write bytes into the shared memory")
    write.add_argument("offset", type=_int)
    write.add_argument("data", help="text (UTF-8), or hex digits with --hex")
    write.add_argument("--hex", action="store_true", help="DATA is hex")
    server = actions.add_parser("server", help="serve one group as an ivshmem-server until Ctrl-C")
    server.add_argument("--socket", type=Path, required=True, help="the ivshmem-server socket")
    server.add_argument("--shm", help="back the memory with /dev/shm/NAME (default: an anonymous memfd)")
    server.add_argument("--size", default="4M", help="memory size, a power of two; a bare number is bytes (default 4M)")
    server.add_argument("--vectors", type=_int, default=1, help="eventfds per peer (default 1; max 64)")
    server.add_argument("--serve-control", type=Path, dest="serve_control",
                        help="also serve a QMP monitor there for the commands above")
    instance_options_after(actions)
    iv.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import base64

    from qbackend.app.monitor_client import call, monitor

    if args.ivshmem_command == "server":
        return _server(args)
    req: dict[str, Any] = {}
    if args.group:
        req["group"] = args.group
    with monitor(control_path(args)) as qmp:
        if args.ivshmem_command == "peers":
            _print_peers(call(qmp, "query-ivshmem-peers", req))
        elif args.ivshmem_command == "ring":
            result = call(qmp, "ivshmem-ring", {"peer": args.peer, "vector": args.vector, **req})
            if not result["delivered"]:
                print(f"qbackend ivshmem: peer {args.peer} has no vector {args.vector}: doorbell dropped",
                      file=sys.stderr)
                return 1
            print(f"rang peer {args.peer} vector {args.vector}")
        elif args.ivshmem_command == "dump":
            result = call(qmp, "ivshmem-read", {"offset": args.offset, "length": args.length, **req})
            sys.stdout.write(hexdump(base64.b64decode(result["data"]), result["offset"]))
        elif args.ivshmem_command == "write":
            data = bytes.fromhex(args.data) if args.hex else args.data.encode()
            result = call(qmp, "ivshmem-write", {"offset": args.offset, "data": base64.b64encode(data).decode(),
                                                 **req})
            print(f"wrote {result['written']} bytes at {args.offset:#x}")
    return 0


def _print_peers(info: dict[str, Any]) -> None:
    where = info["shm"] or "memfd"
    servers = ", ".join(info["servers"]) or "none"
    print(f"group {info['group']}: {info['size']} bytes ({where}), ivshmem-server: {servers}, "
          f"{info['vectors']} vectors per peer, {info['dropped_doorbells']} doorbells dropped")
    print(f"{'id':>5}  {'kind':<22} {'name':<12} {'vectors':>7}  received")
    for p in info["peers"]:
        print(f"{p['id']:>5}  {p['kind']:<22} {p['name']:<12} {p['vectors']:>7}  {' '.join(map(str, p['received']))}")


def hexdump(data: bytes, base: int = 0) -> str:
    """`hexdump -C` layout."""
    lines = []
    for pos in range(0, len(data), 16):
        chunk = data[pos:pos + 16]
        hexes = " ".join(f"{b:02x}" for b in chunk[:8]) + "  " + " ".join(f"{b:02x}" for b in chunk[8:])
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        lines.append(f"{base + pos:08x}  {hexes:<48}  |{text}|\n")
    lines.append(f"{base + len(data):08x}\n")
    return "".join(lines)


def _server(args: argparse.Namespace) -> int:
    import trio

    from qbackend.app.commands.ivshmem import register_groups, watch_group
    from qbackend.app.lifecycle import stop_on_signal
    from qbackend.ivshmem.group import PeerGroup
    from qbackend.ivshmem.server import add_server
    from qbackend.plumbing.shared_memory import SharedMemory
    from qbackend.servers.qmp_monitor import QmpMonitor

    size = parse_size(args.size, "--size", default_unit="B")
    name = args.shm or "memfd-0"
    group = PeerGroup(SharedMemory(size, args.shm), name=name)
    add_server(group, args.socket, args.vectors)
    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signal, nursery.cancel_scope)
            await nursery.start(group.serve)
            if args.serve_control is not None:
                monitor = QmpMonitor(args.serve_control, on_quit=nursery.cancel_scope.cancel)
                register_groups(monitor, {name: group})
                watch_group(monitor, group)
                await nursery.start(monitor.serve)
            print(f"ivshmem-server {args.socket}: {size} bytes, {args.vectors} vectors per peer; Ctrl-C stops",
                  flush=True)

    try:
        trio.run(serve)
    finally:
        group.close()
    return 0
