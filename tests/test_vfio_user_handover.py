"""A vfio-user server handing its device and client over to another server
(qbackend upgrade, without a guest): server A serves a client that changed
the device's state; A pauses and saves; the state and its fds pass through a
real socket pair (so every fd is a new number); server B, made from the same
options, adopts it and serves; the same client goes on and sees nothing
change: registers, BAR memory, interrupts, doorbells, DMA maps, a message
sent while paused and a message half sent before the pause.

Both servers live in this process, in one trio loop in a thread of its own.
The old process would exit without clean-up; here A is stopped with socket
removal turned off, so that its copies of every fd are closed as the test's
fd counts expect.
"""

from __future__ import annotations

import importlib.util
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio

from qbackend.devices import Device
from qbackend.devices.api import UserFunction, function_of
from qbackend.devices.ivshmem import IvshmemDevice
from qbackend.ivshmem import server as ivshmem_server
from qbackend.ivshmem.group import PeerGroup
from qbackend.ivshmem.peer import IvshmemPeer
from qbackend.ivshmem.server import add_server
from qbackend.models.ivshmem import DOORBELL, INTR_MASK, IV_POSITION
from qbackend.models.pci_config import MSIX_ENABLE
from qbackend.plumbing import unix
from qbackend.plumbing.handover import Loader, Saver, State, recv_state, send_state
from qbackend.plumbing.peer_memory import sealed_memfd
from qbackend.plumbing.shared_memory import SharedMemory
from qbackend.protocol import vfio_user as vu
from qbackend.servers.vfio_user import VfioUserServer
from qbackend.testing.vfio_user_client import VfioUserClient

CONFIG, BAR0, BAR2 = vu.PciRegion.CONFIG, vu.PciRegion.BAR0, vu.PciRegion.BAR2
EDU = Path(__file__).resolve().parent.parent / "examples" / "edu.py"
DEADLINE = 10.0  # seconds any one wait in these tests may take
T = TypeVar("T")


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


class TrioThread:
    """A trio loop in a thread: servers run in it, the test drives them from outside."""

    def __init__(self) -> None:
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=trio.run, args=(self._main,), daemon=True)
        self._thread.start()
        assert self._ready.wait(DEADLINE)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self._ready.set()
            await trio.sleep_forever()

    def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def bounded() -> T:
            with trio.fail_after(DEADLINE):
                return await fn(*args)
        return trio.from_thread.run(bounded, trio_token=self._token)

    def serve(self, server: VfioUserServer | PeerGroup) -> trio.CancelScope:
        """server.serve() in the loop, once it listens; cancel the scope to stop it."""
        async def start() -> trio.CancelScope:
            scope = trio.CancelScope()

            async def serve(task_status: trio.TaskStatus[None]) -> None:
                with scope:
                    await server.serve(task_status=task_status)

            assert self._nursery is not None
            await self._nursery.start(serve)
            return scope
        return self.run(start)

    def stop(self, scope: trio.CancelScope) -> None:
        async def cancel() -> None:
            scope.cancel()
        self.run(cancel)

    def close(self) -> None:
        async def cancel() -> None:
            assert self._nursery is not None
            self._nursery.cancel_scope.cancel()
        trio.from_thread.run(cancel, trio_token=self._token)
        self._thread.join(DEADLINE)


@pytest.fixture
def loop() -> Iterator[TrioThread]:
    thread = TrioThread()
    yield thread
    thread.close()


def wait_for(condition: Callable[[], object], what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def fired(fd: int) -> bool:
    """Whether an eventfd was signalled within the deadline (and clear it)."""
    ready, _, _ = select.select([fd], [], [], DEADLINE)
    if not ready:
        return False
    os.read(fd, 8)
    return True


def not_fired(fd: int) -> bool:
    ready, _, _ = select.select([fd], [], [], 0.05)
    return not ready


def hand_over(loop: TrioThread, old: list[VfioUserServer], new: list[VfioUserServer],
              groups: tuple[PeerGroup, PeerGroup] | None = None) -> None:
    """What qbackend.app.upgrade does, within this process: pause and save the old
    servers (and group), pass the state through a socket pair, adopt it in the new."""
    if groups is not None:
        loop.run(groups[0].pause)
    for server in old:
        loop.run(server.pause)
    saver = Saver()
    state: State = {"servers": [server.save(saver) for server in old]}
    if groups is not None:
        state["group"] = groups[0].save(saver)
    mine, theirs = socket.socketpair()
    with mine, theirs:
        sender = threading.Thread(target=send_state, args=(mine, state, saver.fds))
        sender.start()
        got, fds = recv_state(theirs)
        sender.join(DEADLINE)
    assert not set(fds) & set(saver.fds), "the fds came through as new numbers"
    loader = Loader(fds)
    try:
        if groups is not None:
            groups[1].adopt(got["group"], loader)  # before its devices
        for server, saved in zip(new, got["servers"]):
            server.adopt(saved, loader)
    finally:
        loader.close_rest()


def stop_old(loop: TrioThread, scopes: list[trio.CancelScope], monkeypatch: pytest.MonkeyPatch) -> None:
    """The old servers' end, as far as it goes here: their copies of every fd closed,
    and the socket path (the new server's now) left where it is."""
    with monkeypatch.context() as patch:
        patch.setattr(unix, "remove_socket", lambda path: None)
        patch.setattr(ivshmem_server, "remove_socket", lambda path: None)
        for scope in scopes:
            loop.stop(scope)
        time.sleep(0.1)  # the tasks' clean-up (closing in worker threads) ends


def send_partial(client: VfioUserClient, message: bytes, cut: int) -> int:
    """Send the first `cut` bytes of a message; the rest is the caller's."""
    client.send_raw(message[:cut])
    return cut


# -- ivshmem: two devices of one group, each with its client --------------------------


class IvshmemRig:
    def __init__(self, workdir: Path, size: int = 1 << 20) -> None:
        self.group = PeerGroup(SharedMemory(size), name="g")
        self.devices = [IvshmemDevice(self.group, vectors=2, name=f"iv{n}") for n in range(2)]
        self.servers = [VfioUserServer(device, workdir / f"iv{n}.sock", name=f"iv{n}")
                        for n, device in enumerate(self.devices)]

    def close(self) -> None:
        for device in self.devices:
            device.close()
        self.group.close()


def set_up_ivshmem_client(client: VfioUserClient, device: IvshmemDevice) -> list[int]:
    """The state a guest would leave: memory and bus mastering on, IntrMask set,
    MSI-X enabled with two eventfds; those eventfds."""
    client.negotiate()
    client.write(CONFIG, 4, struct.pack("<H", 0x6))
    client.write32(BAR0, INTR_MASK, 0xFFFFFFFF)
    control = device.config.msix_cap + 2
    client.write(CONFIG, control, struct.pack("<H", MSIX_ENABLE))
    eventfds = [os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC) for _ in range(2)]
    client.set_irqs(vu.PciIrq.MSIX, vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER, 0, 2, eventfds)
    return eventfds


def test_ivshmem_devices_and_their_group_hand_over(loop: TrioThread, tmp_path: Path, access_path: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    old, new = IvshmemRig(tmp_path), None
    scopes = [loop.serve(server) for server in old.servers]
    clients = [VfioUserClient(server.socket_path, timeout=DEADLINE) for server in old.servers]
    guest_ram = sealed_memfd("guest-ram", 1 << 16)
    try:
        eventfds = [set_up_ivshmem_client(c, d) for c, d in zip(clients, old.devices)]
        os.pwrite(guest_ram, b"guest memory", 0x100)
        clients[0].dma_map(0x100000, 1 << 16, guest_ram)
        clients[0].write(BAR2, 0x100, b"shared before")
        # A doorbell from peer 0 to peer 1, vector 1: it works before the hand-over.
        clients[0].write32(BAR0, DOORBELL, 1 << 16 | 1)
        assert fired(eventfds[1][1])
        connection = old.servers[0].connection
        assert connection is not None
        if access_path == "native":
            clients[0].read32(BAR0, IV_POSITION)
            wait_for(lambda: connection.native is not None, "the native loop")
        # Half a message before the pause: the server holds it when it stops.
        partial_id = clients[0].next_id()
        partial = vu.build_message(partial_id, vu.Command.REGION_READ, vu.REGION_ACCESS.pack(0, CONFIG, 4))
        cut = send_partial(clients[0], partial, 20)
        wait_for(lambda: connection.protocol.reader.buffered == cut, "the server to hold the partial message")

        before = open_fds()
        new = IvshmemRig(tmp_path)
        hand_over(loop, old.servers, new.servers, (old.group, new.group))
        # While paused (after pause, before the new servers serve): the rest of the
        # partial message, and a whole one.
        clients[0].send_raw(partial[cut:])
        while_paused = clients[0].send(vu.Command.REGION_READ, vu.REGION_ACCESS.pack(IV_POSITION, BAR0, 4))
        stop_old(loop, scopes, monkeypatch)
        old.close()
        scopes = [loop.serve(server) for server in new.servers]

        reply = clients[0].receive()
        assert (reply.header.id, reply.error) == (partial_id, 0)
        assert reply.payload[vu.REGION_ACCESS.size:] == struct.pack("<HH", 0x1AF4, 0x1110)
        reply = clients[0].receive()
        assert (reply.header.id, reply.error) == (while_paused, 0)
        assert reply.payload[vu.REGION_ACCESS.size:] == struct.pack("<I", 0)

        # The state the client left.
        for n, client in enumerate(clients):
            assert client.read32(BAR0, IV_POSITION) == n
            assert client.read32(BAR0, INTR_MASK) == 0xFFFFFFFF
            assert struct.unpack("<H", client.read(CONFIG, 4, 2))[0] == 0x6
            assert new.devices[n].config.msix_enabled
        assert clients[1].read(BAR2, 0x100, 13) == b"shared before"
        assert new.group.memory.read(0x100, 13) == b"shared before"  # the memory the old group shared
        # Doorbells both ways, through the eventfds the client gave the old process.
        clients[0].write32(BAR0, DOORBELL, 1 << 16 | 1)
        assert fired(eventfds[1][1]) and not_fired(eventfds[1][0])
        clients[1].write32(BAR0, DOORBELL, 0 << 16 | 0)
        assert fired(eventfds[0][0]) and not_fired(eventfds[0][1])
        # The DMA map: the new server reaches the client's memory through its fd.
        port = new.devices[0].dma_port
        assert port is not None
        assert port.read(0x100100, 12) == b"guest memory"
        port.write(0x100200, b"written by B")
        assert os.pread(guest_ram, 12, 0x200) == b"written by B"
        if access_path == "native":
            conn = new.servers[0].connection
            assert conn is not None
            served = conn.native.served if conn.native is not None else 0
            clients[0].read32(BAR0, IV_POSITION)
            assert conn.native is not None and conn.native.served == served + 1

        # Every fd of the old servers is closed; the new ones hold just as many.
        after = open_fds()
        assert len(after) == len(before), (sorted(before), sorted(after))
    finally:
        for client in clients:
            client.close()
        for scope in scopes:
            loop.stop(scope)
        if new is not None:
            new.close()
        os.close(guest_ram)
        for fds in locals().get("eventfds", []):
            for fd in fds:
                os.close(fd)


def test_a_group_with_an_ivshmem_server_and_its_host_peer_hand_over(
        loop: TrioThread, tmp_path: Path, access_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A host program connected to the group's ivshmem-server socket (as a stock QEMU
    ivshmem-doorbell would be) stays in the group: same id, doorbells both ways through
    the same eventfds, and it hears of peers that join after the hand-over."""
    rigs: list[IvshmemRig] = []

    def make_rig() -> IvshmemRig:
        rig = IvshmemRig(tmp_path)
        add_server(rig.group, tmp_path / "group.sock", 2)
        rigs.append(rig)
        return rig

    old = make_rig()
    scopes = [loop.serve(old.group), *(loop.serve(server) for server in old.servers)]
    clients = [VfioUserClient(server.socket_path, timeout=DEADLINE) for server in old.servers]
    rung: list[int] = []
    joined: list[int] = []
    host = None
    try:
        eventfds = [set_up_ivshmem_client(c, d) for c, d in zip(clients, old.devices)]
        host = IvshmemPeer(tmp_path / "group.sock", vectors=2, timeout=DEADLINE, on_doorbell=rung.append,
                           on_join=joined.append)
        assert host.id == 2 and host.peers() == [0, 1]
        assert host.ring(0, 1) and fired(eventfds[0][1])
        clients[1].write32(BAR0, DOORBELL, 2 << 16 | 0)
        wait_for(lambda: rung == [0], "the host peer's doorbell")

        before = open_fds()
        new = make_rig()
        hand_over(loop, old.servers, new.servers, (old.group, new.group))
        host.ring(1, 0)  # rung while paused: it waits in the device's eventfd
        stop_old(loop, scopes, monkeypatch)
        old.close()
        scopes = [loop.serve(new.group), *(loop.serve(server) for server in new.servers)]

        assert fired(eventfds[1][0])
        assert sorted(new.group.peers) == [0, 1, 2] and new.group.peers[2].kind == "ivshmem-server client"
        assert host.peers() == [0, 1]  # no leave, no second join: the peers saw nothing
        assert host.peer_vectors(0) == host.peer_vectors(1) == 2
        assert host.ring(0, 0) and fired(eventfds[0][0])
        clients[0].write32(BAR0, DOORBELL, 2 << 16 | 1)
        wait_for(lambda: rung == [0, 1], "the host peer's doorbell after the hand-over")
        assert new.group.peers[2].received() == [1, 1]
        assert len(open_fds()) == len(before)
        # A peer that connects to the new process is announced to the first.
        with IvshmemPeer(tmp_path / "group.sock", vectors=2, timeout=DEADLINE) as late:
            assert late.id == 3 and late.peers() == [0, 1, 2]
            wait_for(lambda: joined == [3], "the join to reach the first host peer")
            assert late.ring(2, 1)
            wait_for(lambda: rung == [0, 1, 1], "a doorbell between host peers")
    finally:
        if host is not None:
            host.close()
        for client in clients:
            client.close()
        for scope in scopes:
            loop.stop(scope)
        rigs[-1].close()
        for fds in locals().get("eventfds", []):
            for fd in fds:
                os.close(fd)


# -- a user device: edu ------------------------------------------------------------


def load_edu() -> type[Device]:
    spec = importlib.util.spec_from_file_location("edu_example", EDU)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    edu: type[Device] = module.Edu
    return edu


def edu_server(edu: type[Device], path: Path) -> tuple[UserFunction, VfioUserServer]:
    function = function_of(edu())
    function.name = "edu1"
    return function, VfioUserServer(function, path, name="edu1")


def wait_dma_done(client: VfioUserClient) -> None:
    wait_for(lambda: not client.read32(BAR0, 0x98) & 1, "the DMA transfer")


def test_edu_hands_over_with_its_registers_dma_and_pending_interrupt(
        loop: TrioThread, tmp_path: Path, access_path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    edu = load_edu()
    path = tmp_path / "edu.sock"
    old_function, old_server = edu_server(edu, path)
    scopes = [loop.serve(old_server)]
    client = VfioUserClient(path, timeout=DEADLINE)
    ram = sealed_memfd("guest-ram", 1 << 16)
    msi = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    new_function = None
    try:
        client.negotiate()
        client.write(CONFIG, 4, struct.pack("<H", 0x6))  # memory space, bus master
        client.dma_map(0x100000, 1 << 16, ram)
        client.set_irqs(vu.PciIrq.MSI, vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER, 0, 1, [msi])
        client.write32(BAR0, 0x04, 0x0F0F0F0F)  # liveness
        client.write32(BAR0, 0x08, 5)  # factorial
        os.pwrite(ram, b"from guest RAM!!", 0x300)
        client.write(BAR0, 0x80, struct.pack("<Q", 0x100300))  # DMA RAM -> buffer
        client.write(BAR0, 0x88, struct.pack("<Q", 0x40010))
        client.write(BAR0, 0x90, struct.pack("<Q", 16))
        client.write(BAR0, 0x98, struct.pack("<Q", 1))
        wait_dma_done(client)
        client.write32(BAR0, 0x60, 0x40)  # raise an interrupt; the guest has not acknowledged it
        assert fired(msi)

        before = open_fds()
        new_function, new_server = edu_server(edu, path)
        hand_over(loop, [old_server], [new_server])
        sent_while_paused = client.send(vu.Command.REGION_READ, vu.REGION_ACCESS.pack(0x08, BAR0, 4))
        stop_old(loop, scopes, monkeypatch)
        old_function.close()
        scopes = [loop.serve(new_server)]

        reply = client.receive()
        assert reply.header.id == sent_while_paused and reply.payload[vu.REGION_ACCESS.size:] == struct.pack("<I", 120)
        assert client.read32(BAR0, 0x04) == 0xF0F0F0F0
        assert client.read32(BAR0, 0x24) == 0x40  # still pending for the guest
        # The buffer travelled: DMA it back to RAM, through the adopted map.
        client.write(BAR0, 0x80, struct.pack("<Q", 0x40010))
        client.write(BAR0, 0x88, struct.pack("<Q", 0x100800))
        client.write(BAR0, 0x90, struct.pack("<Q", 16))
        client.write(BAR0, 0x98, struct.pack("<Q", 1 | 2))
        wait_dma_done(client)
        assert os.pread(ram, 16, 0x800) == b"from guest RAM!!"
        # Interrupts reach the eventfd the client gave the old process.
        client.write32(BAR0, 0x60, 0x1)
        assert fired(msi)
        assert len(open_fds()) == len(before)
    finally:
        client.close()
        for scope in scopes:
            loop.stop(scope)
        if new_function is not None:
            new_function.close()
        os.close(ram)
        os.close(msi)


def test_resume_after_pause_serves_on(loop: TrioThread, tmp_path: Path, access_path: str) -> None:
    """A hand-over that fails: the paused server resumes, and the client never knew."""
    rig = IvshmemRig(tmp_path)
    scopes = [loop.serve(server) for server in rig.servers]
    client = VfioUserClient(rig.servers[0].socket_path, timeout=DEADLINE)
    try:
        eventfds = set_up_ivshmem_client(client, rig.devices[0])
        msg_id = client.send(vu.Command.REGION_READ, vu.REGION_ACCESS.pack(0, CONFIG, 4))
        assert client.receive().header.id == msg_id
        for _round in range(3):
            loop.run(rig.servers[0].pause)
            connection = rig.servers[0].connection
            assert connection is not None and connection.paused
            msg_id = client.send(vu.Command.REGION_READ, vu.REGION_ACCESS.pack(IV_POSITION, BAR0, 4))
            ready, _, _ = select.select([client.sock], [], [], 0.1)
            assert not ready, "a paused server answered"
            loop.run(rig.servers[0].resume)
            reply = client.receive()
            assert reply.header.id == msg_id and reply.error == 0
        # A doorbell to ourselves still rings.
        client.write32(BAR0, DOORBELL, 0 << 16 | 1)
        assert fired(eventfds[1])
        # And a new client is accepted again once the first has gone.
        client.close()
        with VfioUserClient(rig.servers[0].socket_path, timeout=DEADLINE) as again:
            again.negotiate()
            assert again.read32(BAR0, IV_POSITION) == 0
    finally:
        client.close()
        for scope in scopes:
            loop.stop(scope)
        rig.close()
        for fd in locals().get("eventfds", []):
            os.close(fd)


# -- what cannot be handed over -------------------------------------------------------


class NoHooks(Device):
    bars = ()


class WithHooks(Device):
    def save_state(self) -> dict[str, Any]:
        return {}

    def restore_state(self, state: dict[str, Any]) -> None:
        pass


def test_a_device_class_without_the_hooks_is_refused(tmp_path: Path) -> None:
    function = function_of(NoHooks())
    function.name = "dev1"
    server = VfioUserServer(function, tmp_path / "d.sock", name="dev1")
    refusal = server.handover_refusal()
    assert refusal is not None and refusal.startswith("device dev1 (")
    assert "NoHooks) cannot be handed over: its class has no save_state/restore_state" in refusal
    assert "\n" not in refusal
    function.close()
    hooked = function_of(WithHooks())
    assert hooked.handover_refusal() is None
    hooked.close()
