"""PCI hotplug of qbackend's devices against a real QEMU 11.1 and a booted
guest, on pc (ACPI hotplug on the root bus) and on q35 (ACPI hotplug on
the profile's root port).

The hot-plugged ivshmem devices have no MSI-X (vectors=0): QEMU 11.1.3
aborts when a vfio-user device with MSI-X is unplugged (docs/qemu-issues.md).
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend, ServedDevice
from qbackend.machine.launch import load_machine_config, vfio_user_device_arg
from qbackend.machine.qmp import QmpError, SyncQmp
from qbackend.options import IvshmemOptions
from qbackend.testing.harness import Guest, Harness, mappings, memfd_fds, open_fds, rss_kib, wait_attached, wait_until

pytestmark = pytest.mark.guest

SHM_SIZE = 1 << 20

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Rig:
    machine: str
    work: Path
    thread: BackendThread
    backend: Backend
    guest: Guest
    user: SyncQmp
    group: str
    controller_bar0: int
    monitor: Path  # qbackend's QMP monitor

    def sh(self, cmd: str, timeout: float = 60) -> str:
        return self.guest.sh(cmd, timeout)

    def pci_path(self, slot: int) -> str:
        # pc: the root bus; q35: the root port's bus (bus 1, only slot 0)
        return f"/sys/bus/pci/devices/0000:00:{slot:02x}.0" if self.machine == "pc" \
            else "/sys/bus/pci/devices/0000:01:00.0"

    def wait_seen(self, slot: int, timeout: float = 2.0) -> float:
        """Seconds until the guest lists an ivshmem device in `slot`."""
        start = time.monotonic()
        path = self.pci_path(slot)
        self.sh(f"i=0; until [ \"$(cat {path}/vendor 2>/dev/null):$(cat {path}/device 2>/dev/null)\" = "
                f"0x1af4:0x1110 ]; do i=$((i+1)); [ $i -gt 200 ] && exit 1; usleep 10000; done")
        return time.monotonic() - start

    def wait_gone(self, slot: int) -> None:
        path = self.pci_path(slot)
        self.sh(f"i=0; while [ -e {path} ]; do i=$((i+1)); [ $i -gt 500 ] && exit 1; usleep 10000; done")

    def ivposition(self, slot: int) -> int:
        # A hot-added device with no driver has memory decoding off until enabled.
        # The enable (a config write) and the read reach qbackend over one socket, in order.
        self.sh(f"echo 1 > {self.pci_path(slot)}/enable")
        return self.guest.devmem(self.guest.bar(self.pci_path(slot), 0)[0] + 8)

    def add(self, name: str) -> ServedDevice:
        opts = IvshmemOptions(socket=self.work / f"{name}.sock", size=SHM_SIZE, shm=self.group, vectors=0, id=name)
        return self.thread.run(self.backend.pci_add_ivshmem, opts)

    def slot(self, qdev_id: str) -> int:
        assert self.backend.pci is not None
        slot = self.backend.pci.slot_of(qdev_id)
        assert slot is not None
        return slot

    def wait_slot(self, qdev_id: str, what: str) -> int:
        """The slot of a device a user added, once qbackend has seen it."""
        wait_until(lambda: self.backend.pci is not None and self.backend.pci.slot_of(qdev_id) is not None, 5, what)
        return self.slot(qdev_id)


@pytest.fixture(scope="module", params=["pc", "q35"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    # One Harness per machine, not the module's: the pc guest stops before the q35 one boots.
    machine: str = request.param
    with Harness(tmp_path_factory.mktemp(f"pcihp-{machine}")) as harness:
        work = harness.workdir
        group = harness.shm_name(f"pcihp-{machine}")
        backend = Backend()
        controller = backend.add_hotplug_controller(work / "hotplug.sock", [], machine=machine,
                                                    ram_size=512 << 20, slots=0)
        backend.add_pci_slots(load_machine_config(machine).hotplug_bus)
        # A device declared in the configuration, for a user's own device_add.
        backend.add_ivshmem(IvshmemOptions(socket=work / "byhand.sock", size=SHM_SIZE, shm=group, vectors=0,
                                           id="byhand"))
        ctl_addr = "0x5" if machine == "pc" else "0x6"
        guest = harness.guest(start=False, machine=machine, extra_args=[
            "-device", vfio_user_device_arg("hotplug", controller.server.socket_path, addr=ctl_addr)])
        backend.attach_qmp(guest.vm.qmp_path)
        backend.enable_control(work / "qbackend-qmp.sock")
        thread = harness.serve(backend)
        harness.start(guest)
        user = guest.monitor(user=True)
        bar0 = guest.bar(f"/sys/bus/pci/devices/0000:00:{int(ctl_addr, 16):02x}.0", 0)[0]
        wait_attached(backend)
        wait_until(lambda: backend.pci is not None and backend.pci.qmp is not None, 30,
                   "qbackend's PCI slots to attach to QMP")
        yield Rig(machine, work, thread, backend, guest, user, group, bar0, work / "qbackend-qmp.sock")


def test_device_added_through_qbackend_is_used_and_freed_on_removal(rig: Rig) -> None:
    fds = open_fds()
    served = rig.add("iv1")
    slot = rig.slot("iv1")
    assert rig.wait_seen(slot) < 2.0
    assert rig.ivposition(slot) == served.device.position  # type: ignore[attr-defined]
    group = served.device.group  # type: ignore[attr-defined]
    position = served.device.position  # type: ignore[attr-defined]
    assert group.peers.get(position) is served.device
    rig.user.drain_events()
    assert rig.thread.run(rig.backend.pci_del, "iv1") is True
    rig.user.next_event("DEVICE_DELETED", data={"device": "iv1"}, timeout=10)
    rig.wait_gone(slot)
    assert "iv1" not in rig.backend.devices
    assert position not in group.peers  # the peer group was told
    wait_until(lambda: not served.server.socket_path.exists() and open_fds() <= fds, 5,
               "the socket removed and the fds closed", seen=lambda: (served.server.socket_path.exists(), open_fds(), fds))
    assert not served.server.socket_path.exists()
    assert open_fds() == fds


def test_device_added_and_removed_over_qmp_with_events(rig: Rig) -> None:
    """pci-device-add / pci-device-del on qbackend's monitor; a second client only listens."""
    fds = open_fds()
    with SyncQmp(rig.monitor) as actor, SyncQmp(rig.monitor) as listener:
        added = actor.execute("pci-device-add", {"driver": "ivshmem", "id": "ivq", "socket": str(rig.work / "ivq.sock"),
                                                 "size": "1M", "shm": rig.group, "vectors": 0})
        slot = added["slot"]
        assert added["socket"] == str(rig.work / "ivq.sock") and isinstance(added["position"], int)
        assert listener.next_event("PCI_DEVICE_PLUGGED", data={"id": "ivq"}, timeout=10)["data"] == \
            {"id": "ivq", "slot": slot}
        assert rig.wait_seen(slot) < 2.0
        assert rig.ivposition(slot) == added["position"]
        bus = {r["slot"]: r for r in actor.execute("query-pci-hotplug")}
        assert bus[slot]["id"] == "ivq" and (bus[slot]["vendor"], bus[slot]["device"]) == ("1af4", "1110")
        peers = actor.execute("query-ivshmem-peers", {"group": rig.group})["peers"]
        assert added["position"] in [p["id"] for p in peers]

        assert actor.execute("pci-device-del", {"id": "ivq"}) == {}  # at once; the guest ejects it later
        assert listener.next_event("PCI_DEVICE_UNPLUGGED", data={"id": "ivq"}, timeout=15)["data"] == \
            {"id": "ivq", "slot": slot}
        rig.wait_gone(slot)
        wait_until(lambda: "ivq" not in rig.backend.devices, 5, "qbackend to free the device")
        error = None
        try:
            actor.execute("pci-device-del", {"id": "ivq"})
        except QmpError as exc:
            error = exc
        assert error is not None and error.error_class == "DeviceNotFound"
    wait_until(lambda: open_fds() <= fds, 5, "the device's fds closed", seen=lambda: (open_fds(), fds))
    assert not (rig.work / "ivq.sock").exists()


def test_device_added_by_a_user_is_served_removed_and_added_again(rig: Rig) -> None:
    served = rig.backend.devices["byhand"]
    args = json.loads(vfio_user_device_arg("byhand", served.server.socket_path))
    bus = load_machine_config(rig.machine).hotplug_bus
    if bus:
        args["bus"] = bus
    for round_no in (1, 2):
        rig.user.execute("device_add", args)
        slot = rig.wait_slot("byhand", "qbackend to see the user's device")
        assert rig.wait_seen(slot) < 2.0
        assert rig.ivposition(slot) == served.device.position  # type: ignore[attr-defined]
        assert served.server.connections_served == round_no
        rig.user.execute("device_del", {"id": "byhand"})
        rig.user.next_event("DEVICE_DELETED", data={"device": "byhand"}, timeout=10)
        rig.wait_gone(slot)
        wait_until(lambda: served.server.connection is None, 5, "the connection closed")
        assert served.device.irqs.open_fds() == []
        assert "byhand" in rig.backend.devices  # declared in the configuration: it stays, ready again


def test_an_eject_written_into_qbackends_window_removes_the_device(rig: Rig) -> None:
    rig.add("iv2")
    slot = rig.slot("iv2")
    rig.wait_seen(slot)
    window = rig.controller_bar0 + 0x100
    rig.sh(f"devmem {window + 0x10:#x} 32 0 && devmem {window + 0x08:#x} 32 {1 << slot:#x}")
    wait_until(lambda: "iv2" not in rig.backend.devices, 15, "the eject to remove the device")
    rig.wait_gone(slot)


def test_twenty_add_remove_cycles_leak_nothing(rig: Rig) -> None:
    if rig.machine != "pc":
        pytest.skip("the cycle count is the same code on q35; once is enough for the suite's time")
    rig.add("warm")
    rig.wait_seen(rig.slot("warm"))
    assert rig.thread.run(rig.backend.pci_del, "warm")
    time.sleep(0.3)
    fds, rss = open_fds(), rss_kib()
    for n in range(20):
        name = f"cyc{n}"
        rig.add(name)
        rig.wait_seen(rig.slot(name))
        assert rig.thread.run(rig.backend.pci_del, name) is True
    wait_until(lambda: open_fds() <= fds, 5, f"the fds back to {fds}", seen=open_fds)
    assert open_fds() == fds
    assert rss_kib() - rss < 8 * 1024, f"RSS grew by {rss_kib() - rss} KiB over 20 cycles"


def test_twenty_cycles_of_devices_without_shm_leak_nothing(rig: Rig) -> None:
    """Unnamed memory (a memfd group per device): its group, memfd and mapping go with the device."""
    if rig.machine != "pc":
        pytest.skip("the same code on q35; once is enough for the suite's time")

    def add_unnamed(name: str) -> None:
        opts = IvshmemOptions(socket=rig.work / f"{name}.sock", size=SHM_SIZE, vectors=0, id=name)
        rig.thread.run(rig.backend.pci_add_ivshmem, opts)
        rig.wait_seen(rig.slot(name))
        assert rig.thread.run(rig.backend.pci_del, name) is True

    add_unnamed("warm-unnamed")
    groups = set(rig.backend.groups)
    wait_until(lambda: "warm-unnamed" not in rig.backend.devices, 5, "the warm-up device freed")
    fds, maps, memfds, all_maps = open_fds(), mappings(), memfd_fds(), mappings("/memfd:")
    for n in range(20):
        add_unnamed(f"un{n}")
    wait_until(lambda: open_fds() <= fds and mappings() <= maps and memfd_fds() <= memfds, 10,
               "fds, memfd mappings and memfds back",
               seen=lambda: (open_fds() - fds, mappings() - maps, memfd_fds() - memfds))
    # Nothing grew: the devices' memfds exactly; other fds and memfd mappings (QEMU's guest
    # memory, libffi's closures) may have gone meanwhile: <= for those.
    assert open_fds() <= fds and (mappings(), memfd_fds()) == (maps, memfds)
    assert mappings("/memfd:") <= all_maps
    assert set(rig.backend.groups) == groups, "a group outlived its last device"


def test_window_matches_qemus_block_at_0xae00(rig: Rig) -> None:
    """UP, DOWN and RMV of bus 0, QEMU's block against qbackend's window.

    UP is cleared when read (bridge support is on by default).  The guest's
    own ACPI handler (_E01 -> PCNT) reads QEMU's UP within milliseconds of
    the event, so QEMU's UP reads 0 by the time the test looks; nothing
    reads qbackend's window but the test, so its first read shows the new
    slot and clears it.  The test checks exactly that, then that both read
    0; DOWN and RMV are compared as they are."""
    if rig.machine != "pc":
        pytest.skip("the differential is specified for pc (0xae00)")
    window = rig.controller_bar0 + 0x100

    def qemu() -> list[int]:
        return [int(x, 16) for x in rig.sh("ioport wl 0xae10 0 && ioport rl 0xae00 4").split()]

    def ours() -> list[int]:
        out = rig.sh(f"devmem {window + 0x10:#x} 32 0 && for o in 0 4 8 12; do devmem $(({window} + $o)) 32; done")
        return [int(x, 16) for x in out.split()]

    def compare(expect_up: int = 0) -> None:
        mine, theirs = ours(), qemu()
        assert mine[0] == expect_up and theirs[0] == 0, (mine, theirs)
        assert ours()[0] == 0  # cleared by the read
        assert mine[1:] == theirs[1:], f"DOWN/EJ/RMV: qbackend {mine} vs QEMU {theirs}"

    compare()
    assert qemu()[3] == 0xFFFFFFFC  # host bridge and ISA bridge are not removable
    rig.add("diff")
    slot = rig.slot("diff")
    rig.wait_seen(slot)
    compare(expect_up=1 << slot)
    assert rig.thread.run(rig.backend.pci_del, "diff")
    rig.wait_gone(slot)
    compare()


def test_qbackend_killed_and_restarted_while_qemu_runs(rig: Rig) -> None:
    """QEMU 11.1 does not reconnect to a vfio-user server: after qbackend
    dies the guest reads all ones from the device; a device_del /
    device_add cycle against the restarted qbackend brings it back."""
    sock = rig.work / "killme.sock"

    def start() -> subprocess.Popen[bytes]:
        sock.unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, "-m", "qbackend", "serve", "--ivshmem",
                                 f"socket={sock},size=1M,vectors=0,peer=7"], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: sock.exists() or proc.poll() is not None, 20, "qbackend serve to listen")
        assert proc.poll() is None, f"qbackend serve exited with {proc.returncode}"
        return proc

    args = json.loads(vfio_user_device_arg("killme", sock))
    bus = load_machine_config(rig.machine).hotplug_bus
    if bus:
        args["bus"] = bus
    proc = start()
    try:
        rig.user.execute("device_add", args)
        slot = rig.wait_slot("killme", "qbackend to see the device")
        rig.wait_seen(slot)
        assert rig.ivposition(slot) == 7
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert rig.ivposition(slot) == 0xFFFFFFFF  # QEMU keeps the device; every access fails
        proc = start()
        time.sleep(0.5)
        assert rig.ivposition(slot) == 0xFFFFFFFF  # and it does not reconnect by itself
        rig.user.execute("device_del", {"id": "killme"})
        rig.user.next_event("DEVICE_DELETED", data={"device": "killme"}, timeout=10)
        rig.wait_gone(slot)
        rig.user.execute("device_add", args)
        slot = rig.wait_slot("killme", "qbackend to see the device again")
        rig.wait_seen(slot)
        assert rig.ivposition(slot) == 7
        rig.user.execute("device_del", {"id": "killme"})
        rig.user.next_event("DEVICE_DELETED", data={"device": "killme"}, timeout=10)
        rig.wait_gone(slot)
    finally:
        proc.kill()
        proc.wait()
