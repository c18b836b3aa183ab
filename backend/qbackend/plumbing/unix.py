"""UNIX-socket plumbing, written once for every server and peer.

- `listen_unix`: bind a UNIX socket at a path, mode 0600 before `listen()`
  so nobody can connect in between, non-blocking; `listen_tcp` for TCP.
  A socket already at the path is replaced only when it is stale (nothing
  accepts on it); a live one, any other file, or a missing folder is an
  error (`SocketPathError`): qbackend never takes over another process's
  socket and never makes folders it was not asked for.
- `remove_socket`: remove a socket this process made and still owns (the
  same inode), never one another process has put there since.
- `accept_forever`: the accept loop, with back-off on EMFILE and friends;
  `serve_unix` listens, accepts and removes the socket at the end;
  `sends_within` is the handshake time limit of a client that never speaks.
- `send_with_fds` / `fds_from_ancdata` / `close_fds`: SCM_RIGHTS file
  descriptors out and in; whatever a handler does not claim, it closes.
- `make_eventfd` / `signal_eventfd` / `clear_eventfd`: the eventfds that
  carry interrupts and doorbells.
"""

from __future__ import annotations

import array
import errno as E
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path

import trio

from qbackend.errors import SocketPathError

log = logging.getLogger(__name__)

# Out of fds or memory: a passing overload, not a reason to stop listening.
_TRANSIENT = (E.EMFILE, E.ENFILE, E.ENOBUFS, E.ENOMEM)
_FD_SIZE = array.array("i").itemsize
_ONE = (1).to_bytes(8, "little")


# -- listening ----------------------------------------------------------------------

# The sockets this process made: path -> (st_dev, st_ino) of what it bound there.
_OWNED: dict[str, tuple[int, int]] = {}


def listen_unix(path: Path, backlog: int = 16) -> socket.socket:
    """A non-blocking listening socket at ``path``, mode 0600.

    A socket left at ``path`` by a process that has gone (nothing accepts on
    it) is replaced.  A socket some process still serves, any other file,
    or a folder that does not exist is a `SocketPathError`, and nothing at
    the path is touched.
    """
    if not path.parent.is_dir():
        raise SocketPathError(f"{path}: folder {path.parent} does not exist; create it first", errno=E.ENOENT)
    if path.is_socket():
        owner = _live_socket_owner(path)
        if owner is not None:
            raise SocketPathError(f"{path}: already served by {owner}; stop it or choose another path")
        path.unlink()
    elif path.exists() or path.is_symlink():
        raise SocketPathError(f"{path} exists and is not a socket; not replacing it", errno=E.EEXIST)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(str(path))
        os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)  # before listen(): nobody can connect yet
        listener.listen(backlog)
        listener.setblocking(False)
        st = os.stat(path)
    except OSError as exc:
        listener.close()
        raise SocketPathError(f"{path}: cannot listen there: {exc.strerror}", errno=exc.errno) from None
    except BaseException:
        listener.close()
        raise
    _OWNED[str(path)] = (st.st_dev, st.st_ino)
    return listener


def _live_socket_owner(path: Path) -> str | None:
    """Who accepts connections on the socket at ``path`` ("PID n", or "another process"
    when the kernel does not say), or None when nothing does (a stale socket)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return None
        except OSError:
            return "another process"  # it exists and did not refuse: treat it as live
        try:
            creds = probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            pid = int.from_bytes(creds[:4], "little")
        except OSError:
            pid = 0
        return f"PID {pid}" if pid > 0 else "another process"
    finally:
        probe.close()


def listen_tcp(host: str, port: int, backlog: int = 64) -> socket.socket:
    """A non-blocking listening TCP socket (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(backlog)
        listener.setblocking(False)
    except OSError as exc:  # the message names the address: "127.0.0.1:10809: ... in use"
        listener.close()
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        raise OSError(exc.errno, f"cannot listen there: {exc.strerror}", where) from None
    except BaseException:
        listener.close()
        raise
    return listener


class AcceptGate:
    """A server's listener, and whether it accepts: closed for a while (a hand-over to a
    new process, qbackend.app.upgrade) without closing the listener, so that clients
    that connect meanwhile wait in its backlog for whoever accepts next."""

    def __init__(self) -> None:
        self.listener: socket.socket | None = None  # set while serve_unix listens
        self._open = trio.Event()
        self._open.set()

    @property
    def is_open(self) -> bool:
        return self._open.is_set()

    def close(self) -> None:
        if self._open.is_set():
            self._open = trio.Event()

    def open(self) -> None:
        self._open.set()

    async def wait_open(self) -> None:
        await self._open.wait()


async def accept_forever(listener: socket.socket, name: str, nursery: trio.Nursery,
                         serve_client: Callable[[socket.socket], Awaitable[object]],
                         gate: AcceptGate | None = None) -> None:
    """Accept on a non-blocking listener and start serve_client(sock) in the nursery for each
    client; while `gate` is closed, accept nothing."""
    while True:
        if gate is not None:
            await gate.wait_open()
        await trio.lowlevel.wait_readable(listener)
        if gate is not None and not gate.is_open:
            continue
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno in _TRANSIENT:
                log.error("%s: accept failed (%s); retrying shortly", name, exc)
                await trio.sleep(0.1)
                continue
            raise
        nursery.start_soon(serve_client, sock)


async def serve_unix(path: Path, name: str, serve_client: Callable[[socket.socket], Awaitable[object]], *,
                     backlog: int = 16, gate: AcceptGate | None = None, adopted: socket.socket | None = None,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen at ``path`` (listen_unix; or on ``adopted``, a listener handed over by the
    process before, see adopt_owned), started() once it does, serve each client in a
    task of its own until cancelled; then close and remove the socket."""
    listener = adopted if adopted is not None else listen_unix(path, backlog=backlog)
    if gate is not None:
        gate.listener = listener
    log.info("%s: listening", name)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started()
            await accept_forever(listener, name, nursery, serve_client, gate)
    finally:
        if gate is not None:
            gate.listener = None
        listener.close()
        remove_socket(path)


def owned_inode(path: Path) -> tuple[int, int] | None:
    """What this process bound at ``path`` ((st_dev, st_ino)), if it made the socket there."""
    return _OWNED.get(str(path))


def adopt_owned(path: Path, inode: tuple[int, int] | None) -> None:
    """The socket at ``path`` is this process's now (handed over by the process that made
    it, which said what it bound there): removed at the end as if made here."""
    if inode is not None:
        _OWNED[str(path)] = (int(inode[0]), int(inode[1]))


def remove_sockets() -> None:
    """Remove every socket this process made that is still there (for an exit that
    cannot wait for the servers' own clean-up: app.lifecycle)."""
    for path in list(_OWNED):
        remove_socket(Path(path))


def remove_socket(path: Path) -> None:
    """Remove the socket this process made at ``path`` if it is still the one there
    (the same inode): never a file or socket another process has put there since."""
    made = _OWNED.pop(str(path), None)
    if made is None:
        return
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == made:
            path.unlink()
    except OSError:
        pass


async def sends_within(sock: socket.socket, seconds: float) -> bool:
    """Whether a new client sends its first bytes within ``seconds``: one that sends
    nothing costs a task while it waits, never a thread."""
    with trio.move_on_after(seconds):
        await trio.lowlevel.wait_readable(sock)
        return True
    return False


def shutdown(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """Shut a connection down from any thread (its worker's blocking receive returns);
    a socket already closed or disconnected is not an error."""
    try:
        sock.shutdown(how)
    except OSError:
        pass


# -- file descriptors over a socket ----------------------------------------------------

def fds_ancdata(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """The ancillary data that carries ``fds`` (empty for none)."""
    return [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []


def send_with_fds(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send all of ``data``; the fds travel with its first byte."""
    if not fds:
        sock.sendall(data)
        return
    sent = sock.sendmsg([data], fds_ancdata(fds))
    if sent < len(data):
        sock.sendall(data[sent:])



def fds_from_ancdata(ancdata: Iterable[tuple[int, int, bytes]]) -> list[int]:
    """The fds received with a message; the caller owns them (see `close_fds`)."""
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % _FD_SIZE])
            fds.extend(arr)
    return fds


def close_fds(fds: Iterable[int]) -> None:
    """Close fds nobody claimed; an fd already closed is not an error."""
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


# -- eventfds --------------------------------------------------------------------------

def make_eventfd() -> int:
    """A non-blocking, close-on-exec eventfd."""
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def signal_eventfd(fd: int) -> bool:
    """Add one to an eventfd; False if its counter is saturated."""
    try:
        os.write(fd, _ONE)
        return True
    except BlockingIOError:
        return False


def clear_eventfd(fd: int) -> int:
    """Read (and so reset) an eventfd's counter; 0 if it was not signalled."""
    try:
        return int.from_bytes(os.read(fd, 8), "little")
    except BlockingIOError:
        return 0
