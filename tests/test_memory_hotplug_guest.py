"""Memory hotplug against a real QEMU 11.1 and a booted guest with two NUMA
nodes: qbackend's slot manager drives hot-add and hot-remove over QMP, and
its hotplug-controller device shows the ACPI memory-hotplug block in BAR0.

After every step, for every slot, the guest reads QEMU's own block at port
0xa00 (32-bit port reads, guest/ioport.c) and qbackend's window (32-bit
MMIO reads) and the address, size, proximity and enabled bit must match.
The event bits are not compared: the guest's ACPI clears them in QEMU's
block, while qbackend's window keeps its own until a driver clears them.

The guest's writes into the window may be posted by QEMU: a test that
checks what qbackend made of one waits for it (wait_until)."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend
from qbackend.devices.hotplug_controller import HotplugController
from qbackend.machine.dimm_slots import DimmManager, RemovalState
from qbackend.machine.launch import vfio_user_device_arg
from qbackend.machine.qmp import SyncQmp
from qbackend.models.memhp import EjectRefused, OstReported
from qbackend.options import DimmOptions
from qbackend.protocol.vfio_user import PciRegion
from qbackend.testing.harness import Guest, Harness, wait_attached, wait_equal, wait_until

pytestmark = pytest.mark.guest

MiB = 1 << 20
SLOTS = 4


@dataclass
class Rig:
    thread: BackendThread
    backend: Backend
    guest: Guest
    user: SyncQmp  # the second monitor, as a person would use it
    bar0: int
    monitor: Path  # qbackend's own QMP monitor

    @property
    def dimms(self) -> DimmManager:
        assert self.backend.dimms is not None
        return self.backend.dimms

    @property
    def controller(self) -> HotplugController:
        assert self.backend.controller is not None
        device = self.backend.controller.device
        assert isinstance(device, HotplugController)
        return device

    def sh(self, cmd: str, timeout: float = 60) -> str:
        return self.guest.sh(cmd, timeout)

    def qemu_block(self, slot: int) -> list[int]:
        return [int(x, 16) for x in self.sh(f"ioport wl 0xa00 {slot} && ioport rl 0xa00 6").split()]

    def window(self, slot: int) -> list[int]:
        # The selector write and the reads go to the same device over one
        # socket, which qbackend serves in order: the reads see the write.
        out = self.sh(f"devmem {self.bar0:#x} 32 {slot} && for o in 0 4 8 12 16 20; do "
                      f"devmem $(({self.bar0} + $o)) 32; done")
        return [int(x, 16) for x in out.split()]

    def assert_window_matches_qemu(self) -> None:
        for slot in range(SLOTS):
            theirs, ours = self.qemu_block(slot), self.window(slot)
            assert ours[:5] == theirs[:5], f"slot {slot}: qbackend {ours} vs QEMU {theirs}"
            assert ours[5] & 1 == theirs[5] & 1, f"slot {slot} enabled bit: qbackend {ours[5]} vs QEMU {theirs[5]}"

    def mem_total_kb(self) -> int:
        return int(self.sh("sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo"))

    def wait_guest(self, cond: str, timeout: float = 10) -> None:
        self.guest.wait_guest(cond, timeout)


DIMMS = [
    DimmOptions(id="cold0", size=256 * MiB, node=0, populated=True),
    DimmOptions(id="hot1", size=256 * MiB, node=1),
    DimmOptions(id="hot2", size=128 * MiB, node=0),
    DimmOptions(id="qmp3", size=128 * MiB, node=0),  # driven only through qbackend's QMP monitor
]


@pytest.fixture(scope="module")
def rig(harness: Harness) -> Iterator[Rig]:
    backend = Backend()
    served = backend.add_hotplug_controller(harness.workdir / "hotplug.sock", DIMMS, machine="pc",
                                            ram_size=512 * MiB, slots=SLOTS)
    assert backend.dimms is not None
    dimms = backend.dimms
    guest = harness.guest(start=False, memory="512M", numa_nodes=2, slots=SLOTS, maxmem="4G",
                          append="memhp_default_state=online_movable",
                          extra_args=["-device", vfio_user_device_arg("hotplug", served.server.socket_path,
                                                                      addr="0x5"),
                                      *dimms.cold_plug_args()])
    backend.attach_qmp(guest.vm.qmp_path)
    backend.enable_control(harness.workdir / "qbackend-qmp.sock")
    thread = harness.serve(backend)
    harness.start(guest)
    path = "/sys/bus/pci/devices/0000:00:05.0"
    rig = Rig(thread, backend, guest, guest.monitor(user=True), guest.bar(path, 0)[0],
              harness.workdir / "qbackend-qmp.sock")
    assert rig.sh(f"cat {path}/vendor") == "0x1234"
    wait_attached(backend)
    wait_until(lambda: dimms.dimms["cold0"].plugged, 30, "qbackend to see the cold-plugged DIMM")
    yield rig


def test_cold_plugged_dimm_sits_where_the_layout_put_it(rig: Rig) -> None:
    cold = rig.dimms.dimms["cold0"]
    assert cold.address == 4 << 30  # 512M of RAM end far below the PCI hole: the slots start at 4 GiB
    assert rig.dimms.dimms["hot1"].address == cold.address + 256 * MiB
    assert rig.sh("cat /sys/devices/system/node/possible") == "0-1"
    block = cold.address // (128 * MiB)
    assert rig.sh(f"cat /sys/devices/system/memory/memory{block}/state") == "online"
    rig.assert_window_matches_qemu()


def test_hot_add_grows_memtotal_on_the_declared_node(rig: Rig) -> None:
    before = rig.mem_total_kb()
    hot1 = rig.thread.run(rig.dimms.add, "hot1")
    first = hot1.address // (128 * MiB)
    rig.wait_guest(f"[ -e /sys/devices/system/memory/memory{first + 1} ]")
    for block in (first, first + 1):
        rig.wait_guest(f"[ \"$(cat /sys/devices/system/memory/memory{block}/state)\" = online ]")
        assert rig.sh(f"[ -e /sys/devices/system/node/node1/memory{block} ] && echo yes") == "yes"
    assert rig.mem_total_kb() == before + 256 * 1024
    total = rig.thread.run(rig.dimms.memory_total)
    assert total["total"] == total["qemu-base"] + total["qemu-plugged"] == (512 + 256 + 256) * MiB
    rig.assert_window_matches_qemu()


def test_hot_remove_of_movable_memory_is_reported_done(rig: Rig) -> None:
    before = rig.mem_total_kb()
    rig.user.drain_events()
    assert rig.thread.run(rig.dimms.remove, "hot1") is RemovalState.REMOVED
    rig.user.next_event("DEVICE_DELETED", data={"device": "hot1"}, timeout=10)
    assert rig.mem_total_kb() == before - 256 * 1024
    assert not rig.dimms.dimms["hot1"].plugged
    rig.assert_window_matches_qemu()


def test_hot_remove_of_normal_memory_fails_with_ost_busy(rig: Rig) -> None:
    rig.sh("echo online_kernel > /sys/devices/system/memory/auto_online_blocks")
    try:
        hot2 = rig.thread.run(rig.dimms.add, "hot2")
        block = hot2.address // (128 * MiB)
        rig.wait_guest(f"[ \"$(cat /sys/devices/system/memory/memory{block}/state 2>/dev/null)\" = online ]")
        assert "Normal" in rig.sh(f"cat /sys/devices/system/memory/memory{block}/valid_zones")
        # Unmovable kernel allocations (inodes, dentries) land in the new Normal memory.
        rig.sh("mkdir -p /tmp/slab && i=0; while [ $i -lt 3000 ]; do : > /tmp/slab/f$i; i=$((i+1)); done",
               timeout=120)
        before = rig.mem_total_kb()
        with SyncQmp(rig.monitor) as listener:  # qbackend's monitor tells its clients the outcome too
            outcome = rig.thread.run(rig.dimms.remove, "hot2")
            assert outcome is RemovalState.FAILED, outcome
            event = listener.next_event("DIMM_REMOVE_FAILED", data={"id": "hot2"}, timeout=10)
            assert event["data"] == {"id": "hot2", "slot": hot2.slot, "ost-status": 0x82}
        statuses = [o.status for o in rig.dimms.ost if o.device == "hot2" and o.source == 3]
        assert statuses[-2:] == [0x84, 0x82]
        devices = rig.user.execute("query-memory-devices")
        assert any(d["data"].get("id") == "hot2" for d in devices)  # the DIMM is intact
        assert rig.mem_total_kb() == before
        assert rig.dimms.dimms["hot2"].plugged
        rig.assert_window_matches_qemu()
    finally:
        rig.sh("echo online_movable > /sys/devices/system/memory/auto_online_blocks")


def test_dimm_added_by_a_user_on_another_monitor_shows_within_a_second(rig: Rig) -> None:
    rig.user.execute("object-add", {"qom-type": "memory-backend-memfd", "id": "mem-user", "size": 128 * MiB,
                                    "share": True})
    rig.user.execute("device_add", {"driver": "pc-dimm", "id": "user1", "memdev": "mem-user", "slot": 3,
                                    "node": 1})
    wait_until(lambda: rig.controller.memhp.slots[3].enabled, 1.0, "qbackend to see the user's DIMM in slot 3")
    assert rig.controller.memhp.slots[3].device_id == "user1"
    assert any(d["id"] == "user1" and d.get("declared") is False for d in rig.dimms.as_json())
    rig.assert_window_matches_qemu()
    rig.user.execute("device_del", {"id": "user1"})
    rig.user.next_event("DEVICE_DELETED", data={"device": "user1"}, timeout=10)
    rig.user.execute("object-del", {"id": "mem-user"})
    wait_until(lambda: not rig.controller.memhp.slots[3].enabled, 1.0, "slot 3 to be empty again")
    rig.assert_window_matches_qemu()


def dimm_list(rig: Rig) -> list[str]:
    """`qbackend dimm list` against the rig's qbackend, as a user runs it."""
    result = subprocess.run([sys.executable, "-m", "qbackend", "dimm", "--control", str(rig.monitor), "list"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.splitlines()


def test_a_dimm_plugged_on_qemus_own_monitor_shows_in_dimm_list_and_query_memory_hotplug(rig: Rig) -> None:
    """Plugged and unplugged by someone else on QEMU's monitor (a plain RAM
    backend, QEMU choosing slot and address): qbackend's QMP says so within
    a second, marked not declared, and so does `qbackend dimm list`."""
    before = rig.mem_total_kb()
    rig.user.execute("object-add", {"qom-type": "memory-backend-ram", "id": "mem-theirs", "size": 128 * MiB})
    rig.user.execute("device_add", {"driver": "pc-dimm", "id": "theirs", "memdev": "mem-theirs"})
    (qemu_row,) = [d["data"] for d in rig.user.execute("query-memory-devices") if d["data"].get("id") == "theirs"]
    with SyncQmp(rig.monitor) as qmp:
        def theirs() -> list[dict[str, object]]:
            return [r for r in qmp.execute("query-memory-hotplug") if r["id"] == "theirs"]

        (row,) = wait_until(theirs, 1.0, "query-memory-hotplug to list the DIMM")
        assert row == {"id": "theirs", "slot": qemu_row["slot"], "address": qemu_row["addr"], "size": 128 * MiB,
                       "node": qemu_row["node"], "state": "plugged", "declared": False}
        (line,) = wait_until(lambda: [ln for ln in dimm_list(rig) if ln.startswith("theirs ")], 10,
                             "dimm list to show the DIMM")
        assert line.split()[1:] == [str(qemu_row["slot"]), f"{qemu_row['addr']:#018x}", "128M",
                                    str(qemu_row["node"]), "plugged", "(not", "declared)"]
        wait_until(lambda: rig.mem_total_kb() == before + 128 * 1024, 10, "the guest's MemTotal to grow",
                   seen=rig.mem_total_kb)
        rig.assert_window_matches_qemu()

        rig.user.execute("device_del", {"id": "theirs"})
        rig.user.next_event("DEVICE_DELETED", data={"device": "theirs"}, timeout=30)
        rig.user.execute("object-del", {"id": "mem-theirs"})
        wait_until(lambda: not theirs(), 1.0, "query-memory-hotplug to drop the DIMM", seen=theirs)
        wait_until(lambda: not [ln for ln in dimm_list(rig) if ln.startswith("theirs ")], 10,
                   "dimm list to drop the DIMM")
        wait_until(lambda: rig.mem_total_kb() == before, 10, "MemTotal back", seen=rig.mem_total_kb)
        assert all(r["declared"] for r in qmp.execute("query-memory-hotplug"))
    rig.assert_window_matches_qemu()


def test_an_eject_written_into_the_window_removes_the_dimm(rig: Rig) -> None:
    hot1 = rig.thread.run(rig.dimms.add, "hot1")
    rig.wait_guest(f"[ -e /sys/devices/system/memory/memory{hot1.address // (128 * MiB) + 1} ]")
    rig.sh(f"devmem {rig.bar0:#x} 32 {hot1.slot} && devmem {rig.bar0 + 0x14:#x} 8 8")
    wait_until(lambda: not rig.dimms.dimms["hot1"].plugged, 15, "the eject to unplug hot1",
               seen=lambda: rig.dimms.dimms["hot1"].removal)
    assert rig.dimms.dimms["hot1"].removal is RemovalState.REMOVED
    rig.assert_window_matches_qemu()


# -- fault injection: what the guest and QMP see -------------------------------------------


def test_fault_refuse_eject(rig: Rig) -> None:
    slot = rig.dimms.dimms["cold0"].slot
    rig.thread.call(lambda: rig.controller.memhp.faults.refuse_eject.add(slot))
    try:
        rig.user.drain_events()
        rig.sh(f"devmem {rig.bar0:#x} 32 {slot} && devmem {rig.bar0 + 0x14:#x} 8 8")
        wait_until(lambda: EjectRefused(slot) in rig.controller.effects, what=f"EjectRefused({slot}) in the effects",
                   seen=lambda: rig.controller.effects[-3:])
        time.sleep(0.5)
        assert rig.dimms.dimms["cold0"].plugged
        assert not [e for e in rig.user.pending_events() if e["event"] == "DEVICE_DELETED"]
    finally:
        rig.thread.call(lambda: rig.controller.memhp.faults.refuse_eject.discard(slot))


def test_fault_ost_failure_code(rig: Rig) -> None:
    slot = rig.dimms.dimms["cold0"].slot
    rig.thread.call(lambda: rig.controller.memhp.faults.ost_status.__setitem__(slot, 0x82))
    try:
        rig.sh(f"devmem {rig.bar0:#x} 32 {slot} && devmem {rig.bar0 + 4:#x} 32 3 && devmem {rig.bar0 + 8:#x} 32 0")
        wait_equal(lambda: rig.controller.effects[-1:], [OstReported(slot, "cold0", 3, 0x82)], what="the last effect")
        wait_equal(lambda: rig.controller.memhp.ost_status, 0x82, what="the OST status")
    finally:
        rig.thread.call(lambda: rig.controller.memhp.faults.ost_status.clear())


def test_fault_spurious_insert_raises_the_interrupt_and_shows_in_the_window(rig: Rig) -> None:
    def clear_events() -> None:  # what earlier hot-adds left pending in qbackend's window
        with rig.controller.lock:
            for slot in rig.controller.memhp.slots:
                slot.inserting = slot.removing = False
            rig.controller.update_interrupt()

    rig.thread.call(clear_events)
    rig.sh(f"devmem {rig.bar0 + 0xF00:#x} 32 1")  # a driver enables the event interrupt
    wait_equal(lambda: rig.controller.irq_enable, 1, what="the interrupt enable")
    fired = rig.controller.irqs.intx.fired

    def spurious() -> None:
        with rig.controller.lock:
            rig.controller.memhp.spurious_insert(3)
            rig.controller.update_interrupt()

    rig.thread.call(spurious)
    assert rig.controller.irqs.intx.fired == fired + 1
    assert rig.window(3)[5] & 0b010  # inserting, with nothing enabled
    rig.sh(f"devmem {rig.bar0:#x} 32 3 && devmem {rig.bar0 + 0x14:#x} 8 2")  # the driver clears it
    assert rig.window(3)[5] == 0
    wait_until(lambda: not rig.controller.memhp.event_pending, what="no event pending",
               seen=lambda: rig.controller.memhp.event_pending)
    wait_until(lambda: not rig.controller.irqs.intx_level, what="INTx low", seen=lambda: rig.controller.irqs.intx_level)
    rig.sh(f"devmem {rig.bar0 + 0xF00:#x} 32 0")
    wait_equal(lambda: rig.controller.irq_enable, 0, what="the interrupt enable")


def test_fault_hold_remove_bit(rig: Rig) -> None:
    slot = rig.dimms.dimms["cold0"].slot

    def hold() -> None:
        with rig.controller.lock:
            rig.controller.memhp.faults.hold_remove.add(slot)
            rig.controller.memhp.slots[slot].removing = True
            rig.controller.update_interrupt()

    rig.thread.call(hold)
    try:
        accesses = rig.controller.region_accesses[PciRegion.BAR0]
        rig.sh(f"devmem {rig.bar0:#x} 32 {slot} && devmem {rig.bar0 + 0x14:#x} 8 4")
        # An ignored write changes nothing to wait for: wait for qbackend to have handled both.
        wait_until(lambda: rig.controller.region_accesses[PciRegion.BAR0] >= accesses + 2,
                   what="qbackend to handle the two BAR0 writes",
                   seen=lambda: rig.controller.region_accesses[PciRegion.BAR0] - accesses)
        assert rig.window(slot)[5] & 0b100  # the clear was ignored
        assert rig.controller.memhp.event_pending
    finally:
        def release() -> None:
            with rig.controller.lock:
                rig.controller.memhp.faults.hold_remove.discard(slot)
                rig.controller.memhp.slots[slot].removing = False
                rig.controller.update_interrupt()

        rig.thread.call(release)


# -- the same through qbackend's QMP monitor -----------------------------------------------


def test_dimm_added_and_removed_over_qmp_with_the_events_to_a_listener(rig: Rig) -> None:
    """A client that only listens sees the outcome of what another client asked for."""
    with SyncQmp(rig.monitor) as actor, SyncQmp(rig.monitor) as listener:
        before = rig.mem_total_kb()
        added = actor.execute("dimm-add", {"id": "qmp3"})
        d = rig.dimms.dimms["qmp3"]
        assert added == {"id": "qmp3", "slot": d.slot, "address": d.address, "node": 0}
        event = listener.next_event("DIMM_ADDED", data={"id": "qmp3"}, timeout=10)
        assert event["data"] == added
        block = d.address // (128 * MiB)
        rig.wait_guest(f"[ \"$(cat /sys/devices/system/memory/memory{block}/state 2>/dev/null)\" = online ]")
        assert rig.mem_total_kb() == before + 128 * 1024
        states = {r["id"]: r["state"] for r in actor.execute("query-memory-hotplug")}
        assert states["qmp3"] == "plugged" and states["cold0"] == "plugged"
        total = actor.execute("query-memory-total")
        assert total["total"] == total["qemu-base"] + total["qemu-plugged"]

        assert actor.execute("dimm-del", {"id": "qmp3"}) == {}  # at once; the outcome is an event
        event = listener.next_event("DIMM_REMOVED", data={"id": "qmp3"}, timeout=30)
        assert event["data"] == {"id": "qmp3", "slot": d.slot}
        wait_until(lambda: rig.mem_total_kb() == before, 10, "MemTotal back", seen=rig.mem_total_kb)
        assert {r["id"]: r["state"] for r in actor.execute("query-memory-hotplug")}["qmp3"] == "empty"
        assert not [e for e in listener.pending_events() if e["event"] == "DIMM_REMOVE_FAILED"]
        rig.assert_window_matches_qemu()


def test_refuse_eject_set_over_qmp_keeps_the_dimm_until_cleared(rig: Rig) -> None:
    """A fault set from outside: the guest's eject in the window is refused, QEMU deletes nothing;
    cleared, the same eject removes the DIMM and the listener hears of it."""
    with SyncQmp(rig.monitor) as actor, SyncQmp(rig.monitor) as listener:
        d = rig.dimms.dimms["qmp3"]
        actor.execute("dimm-add", {"id": "qmp3"})
        rig.wait_guest(f"[ -e /sys/devices/system/memory/memory{d.address // (128 * MiB)} ]")
        actor.execute("hotplug-fault-set", {"fault": "refuse-eject", "slot": d.slot})
        assert actor.execute("query-hotplug-faults")["refuse-eject"] == [d.slot]
        rig.user.drain_events()
        try:
            rig.sh(f"devmem {rig.bar0:#x} 32 {d.slot} && devmem {rig.bar0 + 0x14:#x} 8 8")
            wait_until(lambda: EjectRefused(d.slot) in rig.controller.effects, what="the eject to be refused",
                       seen=lambda: rig.controller.effects[-3:])
            time.sleep(0.5)  # long enough for a DEVICE_DELETED that should not come
            assert not [e for e in rig.user.pending_events() if e["event"] == "DEVICE_DELETED"]
            assert {r["id"]: r["state"] for r in actor.execute("query-memory-hotplug")}["qmp3"] == "plugged"
        finally:
            actor.execute("hotplug-fault-clear", {"fault": "refuse-eject"})
        assert actor.execute("query-hotplug-faults")["refuse-eject"] == []
        rig.sh(f"devmem {rig.bar0:#x} 32 {d.slot} && devmem {rig.bar0 + 0x14:#x} 8 8")
        listener.next_event("DIMM_REMOVED", data={"id": "qmp3"}, timeout=30)
        rig.user.next_event("DEVICE_DELETED", data={"device": "qmp3"}, timeout=10)
