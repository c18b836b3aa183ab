"""ivshmem peer groups without a guest: doorbell routing, ids, joins and
leaves, the ivshmem-server socket with host peers (backend.ivshmem_peer),
vfio-user devices in the same group driven by a raw vfio-user client acting
as QEMU, the control socket and `qbackend ivshmem`.  Each case checks that
no fd is left behind."""

from __future__ import annotations

import os
import socket
import struct
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qbackend.app.backend_thread import BackendThread
from qbackend.app.cli import main as cli_main
from qbackend.app.service import Backend, ServedDevice
from qbackend.devices.ivshmem import IvshmemDevice
from qbackend.ivshmem.group import PeerGroup
from qbackend.ivshmem.local_peer import LocalPeer
from qbackend.ivshmem.peer import IvshmemPeer, PeerError
from qbackend.options import IvshmemOptions, OptionError
from qbackend.plumbing.shared_memory import SharedMemory
from qbackend.plumbing.unix import clear_eventfd
from qbackend.protocol import ivshmem_server as wire
from qbackend.protocol import vfio_user as vu
from qbackend.testing.vfio_user_client import VfioUserClient

SIZE = 1 << 20


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


def wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.005)


def eventfd() -> int:
    return os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)


def wait_count(fd: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        n = clear_eventfd(fd)
        if n:
            return n
        time.sleep(0.002)
    return 0


# -- the group model, in process ------------------------------------------------------


@pytest.fixture
def group() -> Iterator[PeerGroup]:
    g = PeerGroup(SharedMemory(4096), name="g", vectors=2)
    yield g
    g.close()


def test_local_peers_ring_each_other_and_unknowns_are_dropped(group: PeerGroup) -> None:
    events: list[tuple[str, int]] = []
    group.subscribe(lambda what, peer: events.append((what, peer)))
    a = LocalPeer(group, 2, name="a")
    b = LocalPeer(group, 1, name="b")
    assert (a.position, b.position) == (0, 1)
    assert a.ring(1, 0) and b.wait(0, 1) == 1
    assert not a.ring(1, 1)  # b has one vector
    assert not a.ring(7, 0)  # nobody there
    assert group.dropped_doorbells == 2
    assert b.received() == [1]
    b.close()
    assert not a.ring(1, 0)
    assert events == [("join", 0), ("join", 1), ("leave", 1)]
    c = LocalPeer(group, 1)
    assert c.position == 1  # the id is used again
    a.close()
    c.close()


def test_callback_peer_and_device_with_msix(group: PeerGroup) -> None:
    got: list[int] = []
    host = LocalPeer(group, 2, on_doorbell=got.append)
    dev = IvshmemDevice(group, vectors=2, name="dev")
    try:
        efds = [eventfd(), eventfd()]
        dev.irqs.set_irqs(vu.SetIrqs(vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER,
                                     vu.PciIrq.MSIX, 0, 2), tuple(os.dup(fd) for fd in efds))
        dev.write(vu.PciRegion.CONFIG, dev.config.msix_cap + 2, struct.pack("<H", 0x8000))
        assert host.ring(dev.position, 1)
        assert [clear_eventfd(fd) for fd in efds] == [0, 1]
        # The guest's doorbell register: (peer << 16) | vector.
        dev.write(vu.PciRegion.BAR0, 12, struct.pack("<I", host.position << 16 | 1))
        wait_for(lambda: got == [1])
        assert dev.doorbells_received == [0, 1]
    finally:
        dev.irqs.close()
        dev.close()
        host.close()
        for fd in efds:
            os.close(fd)


def test_vfio_user_device_leaves_when_its_client_goes_and_rejoins(tmp_path: Path) -> None:
    backend = Backend()
    a = backend.add_ivshmem(IvshmemOptions(socket=tmp_path / "a.sock", size=4096, shm=None, id="a"))
    group = a.device.group  # type: ignore[attr-defined]
    with BackendThread(backend) as thread:
        assert group.peers == {0: a.device}
        c = VfioUserClient(a.server.socket_path)
        c.negotiate()
        host = thread.call(lambda: LocalPeer(group, 1))
        assert host.position == 1
        c.close()
        wait_for(lambda: 0 not in group.peers)
        assert not host.ring(0, 0)
        host2 = thread.call(lambda: LocalPeer(group, 1))
        assert host2.position == 0  # the device's id is free again
        with VfioUserClient(a.server.socket_path) as c:
            c.negotiate()
            assert a.device.position == 2  # type: ignore[attr-defined]
            assert c.read32(vu.PciRegion.BAR0, 8) == 2  # IVPosition
        host.close()
        host2.close()


def test_device_position_option_is_kept_across_reconnects(tmp_path: Path) -> None:
    backend = Backend()
    a = backend.add_ivshmem(IvshmemOptions(socket=tmp_path / "a.sock", size=4096, id="a", peer=5))
    with BackendThread(backend):
        for _ in range(2):
            with VfioUserClient(a.server.socket_path) as c:
                c.negotiate()
                assert c.read32(vu.PciRegion.BAR0, 8) == 5


# -- the ivshmem-server socket ------------------------------------------------------------


@dataclass
class Rig:
    thread: BackendThread
    a: ServedDevice
    b: ServedDevice
    server: Path
    control: Path
    shm: str

    @property
    def group(self) -> PeerGroup:
        return self.a.device.group  # type: ignore[attr-defined, no-any-return]


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    shm = f"qbackend-test-{uuid.uuid4().hex[:8]}"
    server = tmp_path / "ivs.sock"
    backend = Backend()
    a = backend.add_ivshmem(IvshmemOptions(socket=tmp_path / "a.sock", size=SIZE, shm=shm, id="a", vectors=2,
                                           server=server))
    b = backend.add_ivshmem(IvshmemOptions(socket=tmp_path / "b.sock", size=SIZE, shm=shm, id="b", vectors=1))
    control = tmp_path / "ctl.sock"
    backend.enable_control(control)
    try:
        with BackendThread(backend) as thread:
            yield Rig(thread, a, b, server, control, shm)
    finally:
        Path("/dev/shm", shm).unlink(missing_ok=True)


def test_server_option_parses() -> None:
    opts = IvshmemOptions.parse("socket=/tmp/a.sock,shm=g,server=/tmp/g.sock,vectors=2")
    assert opts.server == Path("/tmp/g.sock")
    with pytest.raises(OptionError):
        IvshmemOptions.parse("socket=/tmp/a.sock,servr=/tmp/g.sock")


def test_host_peers_join_share_memory_and_ring_each_other(rig: Rig) -> None:
    before = open_fds()
    joined: list[int] = []
    left: list[int] = []
    p = IvshmemPeer(rig.server, vectors=2, on_join=joined.append, on_leave=left.append)
    try:
        assert p.id == 2 and p.vectors == 2  # a and b are 0 and 1
        assert p.peers() == [0, 1] and p.peer_vectors(0) == 2
        assert p.size == SIZE
        p.write(100, b"from host")
        assert rig.group.memory.read(100, 9) == b"from host"
        assert Path("/dev/shm", rig.shm).read_bytes()[100:109] == b"from host"
        got: list[int] = []
        q = IvshmemPeer(rig.server, on_doorbell=got.append)
        assert q.id == 3
        wait_for(lambda: joined == [3])
        assert p.ring(3, 1)
        wait_for(lambda: got == [1])
        assert q.ring(2, 0) and p.wait(0, 2) == 1
        assert not p.ring(3, 2)  # no such vector
        q.close()
        wait_for(lambda: left == [3])
        assert not p.ring(3, 0)
        assert not rig.group.ring(3, 0)
        # The id comes back.
        with IvshmemPeer(rig.server) as r:
            assert r.id == 3
    finally:
        p.close()
    wait_for(lambda: set(rig.group.peers) == {0, 1})
    wait_for(lambda: open_fds() - before == set(rig.group.open_fds() + rig.group.service_fds()))


def test_server_setup_is_what_qemu_expects(rig: Rig) -> None:
    """Raw bytes: version, id, shm fd of a power-of-two size, then
    vectors (eventfds) per peer, ours last; at most `vectors` per peer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(rig.server))
    got: list[tuple[int, int | None]] = []
    fds: list[int] = []
    try:
        while len(got) < 3 + 3 * 2:
            data, anc, _, _ = sock.recvmsg(8, socket.CMSG_SPACE(4 * 4))
            fd = None
            for level, kind, payload in anc:
                assert (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS)
                (fd,) = struct.unpack("i", payload)
                fds.append(fd)
            assert len(data) == 8
            got.append((struct.unpack("<q", data)[0], fd))
        values = [v for v, _ in got]
        assert values == [0, 2, -1, 0, 0, 1, 1, 2, 2]
        assert [fd is not None for _, fd in got] == [False, False] + [True] * 7
        shm_fd = got[2][1]
        assert shm_fd is not None
        size = os.fstat(shm_fd).st_size
        assert size == SIZE and size & (size - 1) == 0
        # Writing the eventfd we got for device a's vector 1 reaches its MSI-X.
        dev = rig.a.device
        with VfioUserClient(rig.a.server.socket_path) as c:
            c.negotiate()
            efd = eventfd()
            try:
                c.set_irqs(vu.PciIrq.MSIX, vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER, 1, 1,
                           [efd])
                c.write(vu.PciRegion.CONFIG, dev.config.msix_cap + 2, struct.pack("<H", 0x8000))
                a_vector1 = got[4][1]
                assert a_vector1 is not None
                os.write(a_vector1, (1).to_bytes(8, "little"))
                assert wait_count(efd) == 1
            finally:
                os.close(efd)
        # Its client gone, device a leaves: id 0 without an fd.
        data, anc, _, _ = sock.recvmsg(8, socket.CMSG_SPACE(4 * 4))
        assert struct.unpack("<q", data)[0] == 0 and not anc
    finally:
        for fd in fds:
            os.close(fd)
        sock.close()


def test_a_client_that_reads_late_gets_every_message_in_order(rig: Rig) -> None:
    """More announcements than a socket buffer holds wait in qbackend's
    queue (with their fds, although those peers have left meanwhile)."""
    before = open_fds()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(rig.server))
    rounds = 400
    wait_for(lambda: 2 in rig.group.peers)

    def churn() -> None:
        for _ in range(rounds):
            LocalPeer(rig.group, 2).close()

    rig.thread.call(churn)
    conn = wire.ClientConnection()
    got: list[wire.Event] = []
    sock.settimeout(5)
    expected = 3 * 2 + rounds * 3  # setup vectors, then (2 vectors + 1 leave) per newcomer
    try:
        while len([e for e in got if not isinstance(e, wire.Setup)]) < expected:
            data, anc, _, _ = sock.recvmsg(8, socket.CMSG_SPACE(4))
            fds = [struct.unpack("i", payload)[0] for _, _, payload in anc]
            conn.receive_data(data, fds)
            while (event := conn.next_event()) is not wire.NEED_DATA:
                got.append(event)
        tail = got[1 + 6:]
        for i in range(rounds):
            v0, v1, gone = tail[3 * i:3 * i + 3]
            assert isinstance(v0, wire.PeerVector) and isinstance(v1, wire.PeerVector)
            assert (v0.peer, v0.vector, v1.peer, v1.vector) == (3, 0, 3, 1)
            assert gone == wire.PeerGone(3)
            assert os.fstat(v0.fd).st_size == 0  # a live eventfd of ours
    finally:
        sock.close()
        for event in got:
            if isinstance(event, wire.PeerVector):
                os.close(event.fd)
            elif isinstance(event, wire.Setup):
                os.close(event.shm_fd)
    wait_for(lambda: set(rig.group.peers) == {0, 1})
    wait_for(lambda: open_fds() - before <= set(rig.group.service_fds()))


def test_a_client_that_never_reads_is_dropped_before_its_fds_pile_up(rig: Rig) -> None:
    """Each announcement of a peer's vector holds a duplicate fd until the client takes it:
    a client that never reads is dropped once MAX_QUEUED_FDS are waiting, and they are
    closed; the process never holds more than that many for it."""
    from qbackend.ivshmem.server import MAX_QUEUED_FDS

    before = open_fds()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(rig.server))
    wait_for(lambda: 2 in rig.group.peers)
    peak = 0

    def churn() -> None:
        nonlocal peak
        for _ in range(MAX_QUEUED_FDS):  # two vectors each: twice the bound
            LocalPeer(rig.group, 2).close()
            peak = max(peak, len(open_fds()))

    try:
        rig.thread.call(churn)
        assert peak - len(before) <= MAX_QUEUED_FDS + 64, (len(before), peak)
        wait_for(lambda: 2 not in rig.group.peers)  # dropped: its peer left the group
    finally:
        silent.close()
    wait_for(lambda: set(rig.group.peers) == {0, 1})
    wait_for(lambda: open_fds() - before <= set(rig.group.service_fds()))


def test_doorbells_between_host_peers_and_vfio_user_devices(rig: Rig) -> None:
    before = open_fds()
    dev = rig.a.device
    assert isinstance(dev, IvshmemDevice)
    got: list[int] = []
    with IvshmemPeer(rig.server, on_doorbell=got.append) as host, VfioUserClient(rig.a.server.socket_path) as c:
        c.negotiate()
        wait_for(lambda: host.peer_vectors(0) == 2)
        efds = [eventfd(), eventfd()]
        try:
            c.set_irqs(vu.PciIrq.MSIX, vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER, 0, 2,
                       efds)
            c.write(vu.PciRegion.CONFIG, dev.config.msix_cap + 2, struct.pack("<H", 0x8000))
            # host -> device: the host writes the eventfd qbackend watches.
            assert host.ring(dev.position, 1)
            assert wait_count(efds[1]) == 1 and clear_eventfd(efds[0]) == 0
            # device -> host: a doorbell write in BAR0.
            c.write32(vu.PciRegion.BAR0, 12, host.id << 16 | 0)
            wait_for(lambda: got == [0])
            # device b (INTx only, no client) takes vector 0 and drops 1.
            assert host.ring(1, 0)
            wait_for(lambda: rig.b.device.doorbells_received == [1])  # type: ignore[attr-defined]
            dropped = rig.group.dropped_doorbells
            c.write32(vu.PciRegion.BAR0, 12, 1 << 16 | 1)
            assert rig.group.dropped_doorbells == dropped + 1
        finally:
            for fd in efds:
                os.close(fd)
    wait_for(lambda: rig.a.server.connection is None)
    wait_for(lambda: open_fds() - before == set(rig.group.open_fds() + rig.group.service_fds()))
    assert rig.group.open_fds() == []  # device a left: its eventfds are closed


def test_server_tells_clients_when_a_device_comes_and_goes(rig: Rig) -> None:
    joined: list[int] = []
    left: list[int] = []
    with IvshmemPeer(rig.server, on_join=joined.append, on_leave=left.append) as host:
        with VfioUserClient(rig.a.server.socket_path) as c:
            c.negotiate()
        wait_for(lambda: left == [0])
        assert 0 not in host.peers()
        with VfioUserClient(rig.a.server.socket_path) as c:
            c.negotiate()
            wait_for(lambda: joined == [0])
            wait_for(lambda: host.peer_vectors(0) == 2)


def test_a_silent_server_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        before = open_fds()
        with pytest.raises(PeerError, match="setup"):
            IvshmemPeer(path, timeout=0.3)
        assert open_fds() == before
    finally:
        listener.close()


def test_a_broken_server_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        import threading

        def serve() -> None:
            conn, _ = listener.accept()
            conn.sendall(wire.encode(1))  # version 1
            time.sleep(0.5)
            conn.close()

        before = open_fds()
        t = threading.Thread(target=serve)
        t.start()
        with pytest.raises(PeerError, match="version 0"):
            IvshmemPeer(path, timeout=2)
        t.join()
        assert open_fds() == before
    finally:
        listener.close()


# -- the control socket and the CLI ---------------------------------------------------------


def test_cli_peers_ring_dump_write(rig: Rig, capsys: pytest.CaptureFixture[str]) -> None:
    ctl = ["ivshmem", "--control", str(rig.control)]
    with IvshmemPeer(rig.server) as host:
        assert cli_main([*ctl, "peers"]) == 0
        out = capsys.readouterr().out
        assert "ivshmem-server client" in out and "vfio-user" in out
        assert f"{rig.shm}" in out
        assert cli_main([*ctl, "ring", str(host.id), "1"]) == 0
        assert host.wait(1, 2) == 1
        assert cli_main([*ctl, "ring", "99", "0"]) == 1
        assert cli_main([*ctl, "write", "0x40", "hello, peers"]) == 0
        assert host.read(0x40, 12) == b"hello, peers"
        capsys.readouterr()
        assert cli_main([*ctl, "dump", "0x40", "16"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("00000040  68 65 6c 6c 6f 2c 20 70  65 65 72 73 00 00 00 00  |hello, peers....|")
        assert cli_main([*ctl, "dump", str(SIZE - 4), "8"]) == 1
        assert "outside" in capsys.readouterr().err


def test_standalone_server_command(tmp_path: Path) -> None:
    import subprocess
    import sys

    sock, ctl = tmp_path / "s.sock", tmp_path / "s.ctl"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "ivshmem", "server", "--socket", str(sock),
                             "--size", "64K", "--vectors", "3", "--serve-control", str(ctl)],
                            stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent)
    try:
        assert proc.stdout is not None
        assert "ivshmem-server" in proc.stdout.readline()
        with IvshmemPeer(sock, vectors=3) as a, IvshmemPeer(sock) as b:
            assert (a.id, b.id, a.vectors, a.size) == (0, 1, 3, 64 << 10)
            a.write(0, b"x")
            assert b.read(0, 1) == b"x"
            assert b.ring(0, 2) and a.wait(2, 2) == 1
            from qbackend.machine.qmp import SyncQmp

            with SyncQmp(ctl) as qmp:
                info = qmp.execute("query-ivshmem-peers")
            assert [p["id"] for p in info["peers"]] == [0, 1]
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        assert proc.stdout is not None
        proc.stdout.close()
    assert not sock.exists()
