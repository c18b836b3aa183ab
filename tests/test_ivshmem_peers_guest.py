"""An ivshmem peer group across real guests: two guests on vfio-user (A and
B), a host program (an IvshmemPeer on the group's ivshmem-server socket),
then a stock QEMU `ivshmem-doorbell` guest (C) on the same socket.  The
guests run the project's module guest/ivshmem_msix, which enables every
MSI-X vector and counts interrupts per vector.

The tests run in order.  A and B boot together; A then leaves by having its
QEMU killed, and C boots in its place (never more than two QEMUs at once).
A leaves by SIGKILL and not by device_del: QEMU 11.1.3 aborts when a
vfio-user device with MSI-X is unplugged (docs/qemu-issues.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend, ServedDevice
from qbackend.devices.ivshmem import IvshmemDevice
from qbackend.ivshmem.group import PeerGroup
from qbackend.ivshmem.peer import IvshmemPeer
from qbackend.machine.console import GuestConsole
from qbackend.machine.launch import QemuMachine, vfio_user_device_arg
from qbackend.options import IvshmemOptions
from qbackend.testing.harness import Guest, Harness, open_fd_numbers, sysfs_pci, wait_equal, wait_until

pytestmark = pytest.mark.guest

SIZE = 4 << 20
VECTORS = 2
SLOT = "0000:00:02.0"


@dataclass
class PeerGuest:
    """A guest running guest/ivshmem_msix on the ivshmem device in SLOT."""

    guest: Guest

    @property
    def name(self) -> str:
        return self.guest.name

    @property
    def vm(self) -> QemuMachine:
        return self.guest.vm

    @property
    def console(self) -> GuestConsole:
        return self.guest.console

    def sh(self, cmd: str, timeout: float = 30) -> str:
        return self.guest.sh(cmd, timeout)

    @property
    def sysfs(self) -> str:
        return sysfs_pci(SLOT)

    def counts(self) -> list[int]:
        return [int(x) for x in self.sh(f"cat {self.sysfs}/counts").split()]

    def bar2(self) -> int:
        return self.guest.bar(self.sysfs, 2)[0]

    def ring(self, peer: int, vector: int, count: int = 1) -> None:
        self.sh(f"echo '{peer} {vector} {count}' > {self.sysfs}/doorbell")

    def wait_counts(self, expected: list[int], timeout: float = 10) -> list[int]:
        """Poll the interrupt counts until they equal `expected` (then
        check once more a little later that they stay there)."""
        got = wait_equal(self.counts, expected, timeout, f"{self.name}'s interrupt counts")
        time.sleep(0.2)
        assert self.counts() == expected, f"{self.name}: more interrupts than doorbells"
        return got


@dataclass
class Rig:
    harness: Harness
    thread: BackendThread
    group: PeerGroup
    a: ServedDevice
    b: ServedDevice
    server: Path
    guests: dict[str, PeerGuest]
    host: IvshmemPeer
    host_rung: list[int] = field(default_factory=list)
    joined: list[int] = field(default_factory=list)
    left: list[int] = field(default_factory=list)

    def device(self, served: ServedDevice) -> IvshmemDevice:
        assert isinstance(served.device, IvshmemDevice)
        return served.device


def start_guest(harness: Harness, name: str, extra: list[str]) -> PeerGuest:
    """Start a QEMU; its guest boots while others are started (see `boot`)."""
    return PeerGuest(harness.guest(name, ready=False, extra_args=extra))


def boot(guest: PeerGuest) -> None:
    guest.guest.wait_ready(timeout=120)
    assert guest.sh(f"readlink {guest.sysfs}/driver").endswith("/ivshmem_msix")


@pytest.fixture(scope="module")
def rig(harness: Harness) -> Iterator[Rig]:
    workdir = harness.workdir
    shm = harness.shm_name()
    server = workdir / "ivshmem-server.sock"
    backend = Backend()
    a = backend.add_ivshmem(IvshmemOptions(socket=workdir / "a.sock", size=SIZE, shm=shm, id="a",
                                           vectors=VECTORS, server=server))
    b = backend.add_ivshmem(IvshmemOptions(socket=workdir / "b.sock", size=SIZE, shm=shm, id="b",
                                           vectors=VECTORS))
    thread = harness.serve(backend)
    group = a.device.group  # type: ignore[attr-defined]
    guests: dict[str, PeerGuest] = {}
    for name, served in (("a", a), ("b", b)):
        guests[name] = start_guest(harness, name, [
            "-device", vfio_user_device_arg(name, served.server.socket_path, addr="0x2")])
    for guest in guests.values():
        boot(guest)
    rig = Rig(harness, thread, group, a, b, server, guests, host=None)  # type: ignore[arg-type]
    host = IvshmemPeer(server, vectors=VECTORS, on_doorbell=rig.host_rung.append,
                       on_join=rig.joined.append, on_leave=rig.left.append)
    harness.callback(host.close)
    rig.host = host
    yield rig


def test_guests_bind_the_module_with_their_ivposition(rig: Rig) -> None:
    for name, served in (("a", rig.a), ("b", rig.b)):
        guest = rig.guests[name]
        assert int(guest.sh(f"cat {guest.sysfs}/ivposition")) == rig.device(served).position
        assert guest.counts() == [0, 0]
        lines = guest.sh(f"grep ivshmem_msix:{SLOT} /proc/interrupts").splitlines()
        assert [line.split()[-1] for line in lines] == [f"ivshmem_msix:{SLOT}:v0", f"ivshmem_msix:{SLOT}:v1"]
        assert all("PCI-MSI" in line for line in lines)
    assert (rig.device(rig.a).position, rig.device(rig.b).position, rig.host.id) == (0, 1, 2)
    assert rig.host.peers() == [0, 1]


def test_a_rings_b_vector_1_and_b_rings_a(rig: Rig) -> None:
    a, b = rig.guests["a"], rig.guests["b"]
    pos_a, pos_b = rig.device(rig.a).position, rig.device(rig.b).position
    before_b, before_a = b.counts(), a.counts()
    a.ring(pos_b, 1)
    b.wait_counts([before_b[0], before_b[1] + 1])
    b.ring(pos_a, 0)
    a.wait_counts([before_a[0] + 1, before_a[1]])
    # The interrupts show in /proc/interrupts too.
    line = b.sh(f"grep ivshmem_msix:{SLOT}:v1 /proc/interrupts")
    assert int(line.split()[1]) == before_b[1] + 1


def test_host_rings_both_guests_and_guests_ring_the_host(rig: Rig) -> None:
    a, b = rig.guests["a"], rig.guests["b"]
    pos_a, pos_b = rig.device(rig.a).position, rig.device(rig.b).position
    before_a, before_b = a.counts(), b.counts()
    assert rig.host.ring(pos_a, 1)
    assert rig.host.ring(pos_b, 0)
    a.wait_counts([before_a[0], before_a[1] + 1])
    b.wait_counts([before_b[0] + 1, before_b[1]])
    a.ring(rig.host.id, 1)
    b.ring(rig.host.id, 0)
    wait_until(lambda: sorted(rig.host_rung) == [0, 1], what="the host's doorbells")


def test_what_a_writes_b_and_the_host_read(rig: Rig) -> None:
    a, b = rig.guests["a"], rig.guests["b"]
    bar_a, bar_b = a.bar2(), b.bar2()
    a.sh(f"devmem {bar_a + 0x1000:#x} 32 0xA11CE0A0; devmem {bar_a + SIZE - 4:#x} 32 0x600DF00D")
    assert int(b.sh(f"devmem {bar_b + 0x1000:#x} 32"), 16) == 0xA11CE0A0
    assert int(b.sh(f"devmem {bar_b + SIZE - 4:#x} 32"), 16) == 0x600DF00D
    assert rig.host.read(0x1000, 4) == (0xA11CE0A0).to_bytes(4, "little")
    assert rig.host.read(SIZE - 4, 4) == (0x600DF00D).to_bytes(4, "little")
    rig.host.write(0x2000, b"host->guests")
    assert int(a.sh(f"devmem {bar_a + 0x2000:#x} 32"), 16) == int.from_bytes(b"host", "little")


def test_masked_vector_sets_its_pba_bit_and_fires_on_unmask(rig: Rig) -> None:
    """MSI-X Function Mask (config space, forwarded to qbackend): the
    doorbell sets the PBA bit, which the guest reads through QEMU from
    qbackend, and the interrupt arrives when the mask is cleared.  A
    per-vector mask lives in QEMU's emulated MSI-X table, which QEMU 11.1
    does not forward: QEMU then holds the interrupt itself (the guest's PBA
    read, forwarded to qbackend, does not show it) and delivers it on
    unmask."""
    b = rig.guests["b"]
    pos_b = rig.device(rig.b).position
    before = b.counts()
    b.sh(f"echo 1 > {b.sysfs}/fmask")
    wait_until(lambda: rig.device(rig.b).config.msix_function_masked, what="the Function Mask in qbackend's config")
    assert rig.host.ring(pos_b, 1)
    time.sleep(0.3)
    assert b.counts() == before
    assert int(b.sh(f"cat {b.sysfs}/pba"), 16) == 0b10
    b.sh(f"echo 0 > {b.sysfs}/fmask")
    b.wait_counts([before[0], before[1] + 1])
    assert int(b.sh(f"cat {b.sysfs}/pba"), 16) == 0

    # Per-vector mask (disable_irq, unlazy: the table entry's mask bit).
    b.sh(f"echo '0 1' > {b.sysfs}/mask")
    assert rig.host.ring(pos_b, 0)
    time.sleep(0.3)
    assert b.counts() == [before[0], before[1] + 1]
    b.sh(f"echo '0 0' > {b.sysfs}/mask")
    b.wait_counts([before[0] + 1, before[1] + 1])


def test_a_leaves_when_its_qemu_is_killed(rig: Rig) -> None:
    """Killed, not device_del'd: QEMU 11.1.3 aborts on device_del of a
    vfio-user device with MSI-X (docs/qemu-issues.md)."""
    a_guest, b = rig.guests.pop("a"), rig.guests["b"]
    dev_a = rig.device(rig.a)
    pos_a = dev_a.position
    a_guest.console.close()
    conn = rig.a.server.connection
    assert conn is not None
    a_fds = {conn.sock.fileno(), *dev_a.irqs.open_fds(), *rig.group.open_fds()} - set(
        rig.group.doorbell_fds(rig.device(rig.b).position))
    before = open_fd_numbers()
    dropped = rig.group.dropped_doorbells

    assert a_guest.vm.proc is not None
    a_guest.guest.kill()
    wait_until(lambda: rig.left == [pos_a], what="the host being told")
    assert pos_a not in rig.group.peers and pos_a not in rig.host.peers()
    # Doorbells to it are dropped: from the host, qbackend and the guest B.
    assert not rig.host.ring(pos_a, 0)
    assert not rig.group.ring(pos_a, 0)
    b.ring(pos_a, 1)
    wait_equal(lambda: rig.group.dropped_doorbells, dropped + 2, what="the dropped doorbell count")
    # No fd of A's is left: its socket, its interrupt eventfds, the eventfds
    # handed out for it.
    wait_until(lambda: open_fd_numbers() <= before - a_fds, what="A's fds closed",
               seen=lambda: sorted(open_fd_numbers() - (before - a_fds)))
    assert dev_a.irqs.open_fds() == []
    # Its id is free again.
    with IvshmemPeer(rig.server, vectors=VECTORS) as newcomer:
        assert newcomer.id == pos_a
        wait_until(lambda: rig.joined[-1:] == [pos_a], what="the host told of the newcomer")
        assert newcomer.ring(rig.host.id, 0)
        wait_until(lambda: rig.host_rung[-1:] == [0], what="the newcomer's doorbell")
    wait_until(lambda: rig.left == [pos_a, pos_a], what="the newcomer's leave")


def test_stock_ivshmem_doorbell_guest_in_the_same_group(rig: Rig) -> None:
    b = rig.guests["b"]
    pos_b = rig.device(rig.b).position
    joined = len(rig.joined)
    c = start_guest(rig.harness, "c", [
        "-chardev", f"socket,path={rig.server},id=ivs",
        "-device", f"ivshmem-doorbell,chardev=ivs,vectors={VECTORS},addr=0x2"])
    rig.guests["c"] = c
    boot(c)
    wait_until(lambda: len(rig.joined) == joined + 1, what="the host told of C")
    pos_c = rig.joined[-1]
    assert int(c.sh(f"cat {c.sysfs}/ivposition")) == pos_c
    assert rig.group.peers[pos_c].kind == "ivshmem-server client"
    # Same memory: what A wrote before it left.
    assert int(c.sh(f"devmem {c.bar2() + 0x1000:#x} 32"), 16) == 0xA11CE0A0
    # C (stock) -> B (vfio-user): C's QEMU writes the eventfd qbackend watches.
    before_b = b.counts()
    c.ring(pos_b, 1)
    b.wait_counts([before_b[0], before_b[1] + 1])
    # B -> C: qbackend writes C's own eventfd; C's QEMU raises its MSI-X.
    before_c = c.counts()
    b.ring(pos_c, 0)
    c.wait_counts([before_c[0] + 1, before_c[1]])
    # The host -> C directly, and C -> the host.
    assert rig.host.ring(pos_c, 1)
    c.wait_counts([before_c[0] + 1, before_c[1] + 1])
    rung = len(rig.host_rung)
    c.ring(rig.host.id, 1)
    wait_until(lambda: rig.host_rung[rung:] == [1], what="C's doorbell to the host")


def test_stock_guest_leaves_when_killed(rig: Rig) -> None:
    c = rig.guests.pop("c")
    pos_c = rig.joined[-1]
    client = rig.group.peers[pos_c]
    assert c.vm.proc is not None
    told = len(rig.left)  # an earlier peer may have left with the same id: wait for a new leave
    c.guest.kill()
    wait_until(lambda: rig.left[told:] == [pos_c], what="the host told of C's leave", seen=lambda: rig.left)
    wait_until(lambda: pos_c not in rig.group.peers, what="C out of the group", seen=lambda: list(rig.group.peers))
    wait_until(lambda: client.doorbell_eventfds() == [], what="C's eventfds closed")
    assert not rig.group.ring(pos_c, 0)
