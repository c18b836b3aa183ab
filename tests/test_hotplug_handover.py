"""The hotplug controller and its slots handed over to a new process (qbackend
upgrade), without a guest: the controller's registers (both hotplug blocks,
faults, the event interrupt) through save_state/restore_state and a real
socket pair; the slot managers' knowledge of QEMU (the backend's "hotplug"
part); the backend described and made again; the hold that keeps the slots
still while an upgrade pauses; and `qbackend serve --hotplug` upgraded from
the command line.  A booted guest's: tests/test_upgrade_hotplug_guest.py.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from qbackend.app.backend_state import HotplugSlots, describe, parts_of, rebuild, refusals
from qbackend.app.monitor_client import call, monitor
from qbackend.app.service import Backend
from qbackend.devices.hotplug_controller import IRQ_ENABLE, MEMHP_OFFSET, PCIHP_OFFSET, HotplugController
from qbackend.machine.dimm_slots import DimmManager, RemovalState
from qbackend.machine.hold import ChangeHold, UpgradeUnderWay
from qbackend.machine.qmp_replies import DimmInfo, OspmStatus
from qbackend.models import memhp, pcihp
from qbackend.models.memhp import EjectRequested, MemoryHotplugBlock, Profile
from qbackend.models.pcihp import EjectSlot, PciHotplugBlock
from qbackend.options import DimmOptions
from qbackend.plumbing.handover import HandoverError, Loader, Saver, State, recv_state, send_state
from qbackend.protocol.vfio_user import PciRegion
from qbackend.testing.harness import wait_until

MiB = 1 << 20
BAR0 = PciRegion.BAR0


def through_a_socket(state: State, fds: list[int]) -> tuple[State, Loader]:
    """The state as the new process gets it: JSON over a socket pair, fds as new numbers."""
    mine, theirs = socket.socketpair()
    with mine, theirs:
        sender = threading.Thread(target=send_state, args=(mine, state, fds))
        sender.start()
        got, received = recv_state(theirs)
        sender.join(10)
    return got, Loader(received)


def dword(controller: HotplugController, offset: int) -> int:
    return int.from_bytes(controller.read(BAR0, offset, 4), "little")


def write(controller: HotplugController, offset: int, value: int, size: int = 4) -> None:
    controller.write(BAR0, offset, value.to_bytes(size, "little"))


def busy_controller() -> HotplugController:
    """A controller a guest and a user have used: DIMMs plugged (one with its insert event
    pending, one being removed), a selector, OST registers, faults, PCI devices with an
    event each way, a bus select, and the event interrupt enabled and raised."""
    block = MemoryHotplugBlock(4)
    controller = HotplugController(block)
    block.plug(0, 4 << 30, 256 * MiB, 0, "cold0", hotplugged=False)
    block.plug(1, (4 << 30) + 256 * MiB, 128 * MiB, 1, "d1", hotplugged=True)
    block.plug(2, (4 << 30) + 384 * MiB, 128 * MiB, 0, "d2", hotplugged=False)
    block.request_unplug(2)
    block.faults.refuse_eject.add(3)
    block.faults.hold_remove.add(2)
    block.faults.ost_status[1] = 0x82
    controller.pcihp.plug(0, 3, "iv9", hotplugged=True, acpi_index=7)
    controller.pcihp.plug(0, 4, "nic0", hotplugged=False)
    controller.pcihp.request_unplug(0, 4)
    controller.pcihp.set_removable(0, 1, False)
    write(controller, IRQ_ENABLE, 1, 1)
    write(controller, MEMHP_OFFSET + memhp.SELECTOR, 1)  # the guest selects slot 1
    write(controller, MEMHP_OFFSET + memhp.OST_EVENT, memhp.OST_EVENT_INSERT)
    write(controller, PCIHP_OFFSET + pcihp.SEL, 0)
    controller.config.write(0x04, (0x6).to_bytes(2, "little"))  # memory space and bus mastering
    controller.update_interrupt()
    return controller


def window(controller: HotplugController) -> list[int]:
    """Everything the guest can read without changing anything: each memory slot's
    registers (the selector put back after), the PCI registers that do not clear
    on read, and the interrupt enable."""
    out = []
    selector = controller.memhp.selector
    for slot in range(len(controller.memhp.slots)):
        write(controller, MEMHP_OFFSET + memhp.SELECTOR, slot)
        out += [dword(controller, MEMHP_OFFSET + reg) for reg in range(0, 0x18, 4)]
    write(controller, MEMHP_OFFSET + memhp.SELECTOR, selector)
    bus = controller.pcihp.buses[0]
    out += [bus.up, bus.down, dword(controller, PCIHP_OFFSET + pcihp.RMV), dword(controller, PCIHP_OFFSET + pcihp.SEL)]
    out += [dword(controller, IRQ_ENABLE) & 1, controller.memhp.selector]
    return out


def test_the_controller_hands_over_both_blocks_the_faults_and_its_interrupt() -> None:
    old = busy_controller()
    assert old.event_pending and old.intx_asserted()
    seen = window(old)
    saver = Saver()
    with old.lock:
        state = old.save_state(saver)
    got, loader = through_a_socket(json.loads(json.dumps(state)), saver.fds)
    new = HotplugController(MemoryHotplugBlock(4))  # as rebuild() makes it: from the options
    block, pci = new.memhp, new.pcihp
    with new.lock:
        new.restore_state(got, loader)
    loader.close_rest()
    assert new.memhp is block and new.pcihp is pci, "in place: the slot managers hold these blocks"
    assert window(new) == seen
    assert new.memhp.slots == old.memhp.slots
    assert new.memhp.faults == old.memhp.faults
    assert (new.memhp.ost_event, new.memhp.ost_status) == (old.memhp.ost_event, old.memhp.ost_status)
    assert new.pcihp.buses == old.pcihp.buses
    assert new.irq_enable == 1 and new._pending and new.intx_asserted()
    assert bytes(new.config.data) == bytes(old.config.data)
    # The guest carries on where it was: slot 1 is selected, its insert event is cleared,
    # its OST status reported as the fault says; slot 3 refuses an eject.
    write(new, MEMHP_OFFSET + memhp.CONTROL, memhp.CONTROL_CLEAR_INSERT, 1)
    assert not new.memhp.slots[1].inserting
    effects = new.memhp.write(memhp.OST_STATUS, 4, 0)
    assert effects == [memhp.OstReported(1, "d1", memhp.OST_EVENT_INSERT, 0x82)]
    new.memhp.plug(3, 5 << 30, 128 * MiB, 0, "d3")
    new.memhp.selector = 3
    assert new.memhp.write(memhp.CONTROL, 1, memhp.CONTROL_EJECT) == [memhp.EjectRefused(3)]


def test_a_controller_of_another_shape_is_refused() -> None:
    old = busy_controller()
    saver = Saver()
    state = old.save_state(saver)
    for other in (HotplugController(MemoryHotplugBlock(2)), HotplugController(MemoryHotplugBlock(4, Profile.SPEC_2_4)),
                  HotplugController(MemoryHotplugBlock(4), PciHotplugBlock(2))):
        with pytest.raises(HandoverError, match="hotplug"):
            other.restore_state(state, Loader([]))


DIMMS = [DimmOptions("cold0", 256 * MiB, 0, True), DimmOptions("d1", 128 * MiB, 1), DimmOptions("d2", 128 * MiB)]


def test_the_dimm_slots_hand_over_what_they_know_of_qemu() -> None:
    block = MemoryHotplugBlock(4)
    old = DimmManager(DIMMS, machine="pc", ram_size=512 * MiB, slots=4, block=block, lock=threading.Lock())
    d1, d2 = old.dimms["d1"], old.dimms["d2"]
    old.dimms["cold0"].plugged = True
    d1.plugged, d1.hotplugged, d1.removal, d1.ost_status = True, True, RemovalState.EJECTING, 0x84
    d2.removal, d2.reported, d2.ost_status = RemovalState.FAILED, RemovalState.FAILED, 0x82
    old.others = {3: DimmInfo(3, 5 << 30, 128 * MiB, 1, "user1", True)}
    old.ost = [OspmStatus("d1", "DIMM", 3, 0x84), OspmStatus("d2", "DIMM", 3, 0x82)]
    state = json.loads(json.dumps(old.save()))
    new = DimmManager(DIMMS, machine="pc", ram_size=512 * MiB, slots=4, block=MemoryHotplugBlock(4), lock=threading.Lock())
    new.restore(state)
    assert new.as_json() == old.as_json()
    assert new.hotplug_status() == old.hotplug_status()
    for dimm_id, d in old.dimms.items():
        n = new.dimms[dimm_id]
        assert (n.plugged, n.hotplugged, n.removal, n.reported, n.ost_status, n.address, n.slot) == (
            d.plugged, d.hotplugged, d.removal, d.reported, d.ost_status, d.address, d.slot)
    assert new.others == old.others and new.ost == old.ost
    other = DimmManager(DIMMS[:2], machine="pc", ram_size=512 * MiB, slots=4, block=MemoryHotplugBlock(4),
                        lock=threading.Lock())
    with pytest.raises(HandoverError, match="DIMM slots"):
        other.restore(state)


class FakeQmp:
    """QEMU's QMP as the new process finds it after events it did not see."""

    def __init__(self, devices: list[dict[str, Any]], ospm: list[dict[str, Any]]) -> None:
        self.replies = {"query-memory-devices": devices, "query-acpi-ospm-status": ospm, "object-del": {}}
        self.calls: list[tuple[str, object]] = []

    async def execute(self, cmd: str, args: object = None) -> object:
        self.calls.append((cmd, args))
        return self.replies[cmd]


def dimm_device(d: DimmOptions, slot: int, addr: int, hotplugged: bool) -> dict[str, Any]:
    return {"type": "dimm", "data": {"slot": slot, "addr": addr, "size": d.size, "node": d.node, "id": d.id,
                                     "hotplugged": hotplugged, "hotpluggable": True, "memdev": f"/objects/mem-{d.id}"}}


def test_removals_whose_outcome_came_while_nobody_listened_are_settled_at_attach() -> None:
    """d1's DEVICE_DELETED and d2's OST busy came between the old process's pause and the
    new process's connection: the first look at QEMU finishes both."""
    block = MemoryHotplugBlock(4)
    outcomes: list[tuple[str, RemovalState | None]] = []
    slots = DimmManager(DIMMS, machine="pc", ram_size=512 * MiB, slots=4, block=block, lock=threading.Lock(),
                        on_outcome=lambda d: outcomes.append((d.id, d.removal)))
    cold, d1, d2 = slots.dimms["cold0"], slots.dimms["d1"], slots.dimms["d2"]
    for d in (cold, d1, d2):
        block.plug(d.slot, d.address, d.opts.size, d.opts.node, d.id, hotplugged=False)
        d.plugged = True
    d1.removal, d2.removal = RemovalState.REQUESTED, RemovalState.EJECTING
    block.request_unplug(d1.slot)
    block.request_unplug(d2.slot)
    qmp = FakeQmp([dimm_device(cold.opts, 0, cold.address, False), dimm_device(d2.opts, 2, d2.address, True)],
                  [{"device": "d2", "slot": "2", "slot-type": "DIMM", "source": 3, "status": 0x82}])
    trio.run(slots.attach, qmp)
    assert d1.removal is RemovalState.REMOVED and not d1.plugged and not block.slots[d1.slot].enabled
    assert ("object-del", {"id": "mem-d1"}) in qmp.calls
    assert d2.removal is RemovalState.FAILED and d2.plugged and d2.ost_status == 0x82
    assert not block.slots[d2.slot].removing
    assert outcomes == [("d1", RemovalState.REMOVED), ("d2", RemovalState.FAILED)]


def test_the_hold_lets_changes_under_way_end_and_holds_off_new_ones() -> None:
    async def main() -> None:
        hold = ChangeHold()
        log: list[str] = []
        release_first = trio.Event()

        async def change(name: str, refuse: bool = False, until: trio.Event | None = None) -> None:
            try:
                async with hold.change(refuse=refuse):
                    async with hold.change(refuse=True):  # nested: part of the same change
                        log.append(f"{name} in")
                        if until is not None:
                            await until.wait()
                log.append(f"{name} out")
            except UpgradeUnderWay:
                log.append(f"{name} refused")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(change, "first", False, release_first)
            await trio.testing.wait_all_tasks_blocked()
            paused = trio.Event()

            async def pause() -> None:
                await hold.pause()
                paused.set()

            nursery.start_soon(pause)
            await trio.testing.wait_all_tasks_blocked()
            assert not paused.is_set(), "the pause waits for the change under way"
            nursery.start_soon(change, "event")  # the backend's own: waits
            await change("command", refuse=True)  # from outside: refused at once
            release_first.set()
            await paused.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert log == ["first in", "command refused", "first out"]
            hold.resume()
            await trio.testing.wait_all_tasks_blocked()
            assert log[-2:] == ["event in", "event out"]
            assert hold.busy == 0

    trio.run(main)


def hotplug_backend(tmp_path: Path) -> Backend:
    backend = Backend(upgradable=True)
    backend.add_hotplug_controller(tmp_path / "hp.sock", DIMMS, machine="q35", ram_size=1024 * MiB, slots=4,
                                   profile=Profile.SPEC_2_4, dev_id="hpc")
    backend.add_pci_slots("rp0")
    backend.attach_qmp(tmp_path / "qemu-qmp.sock")
    return backend


def test_the_backend_with_its_controller_is_described_and_made_again(tmp_path: Path) -> None:
    old = hotplug_backend(tmp_path)
    assert refusals(old) == []
    desc = json.loads(json.dumps(describe(old)))
    new = rebuild(desc)
    assert describe(new) == desc
    assert new.controller is not None and new.controller.id == "hpc"
    assert new.controller.server.socket_path == tmp_path / "hp.sock"
    assert new.dimms is not None and new.pci is not None and new.pci.bus_id == "rp0"
    assert [d.opts for d in new.dimms.dimms.values()] == DIMMS
    assert [d.address for d in new.dimms.dimms.values()] == [d.address for d in old.dimms.dimms.values()]  # type: ignore[union-attr]
    controller = new.controller.device
    assert isinstance(controller, HotplugController) and controller.memhp.profile is Profile.SPEC_2_4
    assert new.dimms.block is controller.memhp and new.pci.block is controller.pcihp
    assert new.qmp_path == tmp_path / "qemu-qmp.sock"
    assert list(parts_of(new)) == list(parts_of(old)) == ["hotplug", "device:hpc", "blocks"]


def test_the_hotplug_part_hands_over_the_slots_and_the_guests_ejects(tmp_path: Path) -> None:
    old = hotplug_backend(tmp_path)
    assert old.dimms is not None and old.pci is not None
    old.dimms.dimms["d1"].plugged = True
    old.dimms.dimms["d1"].hotplugged = True
    old.pci.restore({"known": True, "slots": [[3, "iv9", 0x0500, 0x1AF4, 0x1110]]})
    old.guest_ejects[:] = [EjectRequested(1, "d1"), EjectSlot(0, 3, "iv9")]
    part = parts_of(old)["hotplug"]
    assert isinstance(part, HotplugSlots)
    trio.run(part.pause)
    assert old.hold.paused
    state = json.loads(json.dumps(part.save(Saver())))
    new = rebuild(describe(old))
    new_part = parts_of(new)["hotplug"]
    assert isinstance(new_part, HotplugSlots)
    new_part.adopt(state, Loader([]))
    assert new.dimms is not None and new.pci is not None
    assert new.dimms.as_json() == old.dimms.as_json()
    assert new.pci.as_json() == old.pci.as_json() and new.pci._known
    assert new.guest_ejects == old.guest_ejects
    trio.run(part.resume)
    assert not old.hold.paused
    other = Backend(upgradable=True)
    other.add_hotplug_controller(tmp_path / "hp.sock", DIMMS, machine="pc", ram_size=512 * MiB, slots=4)
    with pytest.raises(HandoverError, match="pci"):
        HotplugSlots(other).adopt(state, Loader([]))


# -- from the command line ------------------------------------------------------------


def test_serve_with_the_hotplug_controller_is_upgraded(tmp_path: Path) -> None:
    """No QEMU here: the slots, the faults set over QMP and the controller's socket
    move to the new process, which answers on the same control socket."""
    control = tmp_path / "qb.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "serve", "--control", str(control),
                             "--hotplug", f"socket={tmp_path / 'hp.sock'},slots=3",
                             "--dimm", "id=d1,size=128M", "--dimm", "id=d2,size=256M,node=1"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    pids = [proc.pid]
    try:
        wait_until(control.is_socket, 30, "qbackend serve to listen")
        with monitor(control) as qmp:
            call(qmp, "hotplug-fault-set", {"fault": "refuse-eject", "slot": 1})
            call(qmp, "hotplug-fault-set", {"fault": "ost-status", "slot": 0, "status": 0x82})
            before = call(qmp, "query-memory-hotplug"), call(qmp, "query-hotplug-faults")
            reply = call(qmp, "upgrade", timeout=120)
        pids.append(int(reply["pid"]))
        assert proc.wait(30) == 0
        with monitor(control) as qmp:
            assert (call(qmp, "query-memory-hotplug"), call(qmp, "query-hotplug-faults")) == before
            assert call(qmp, "query-pci-hotplug") == []
        assert (tmp_path / "hp.sock").is_socket()
    finally:
        try:
            os.kill(pids[-1], signal.SIGINT)
        except ProcessLookupError:
            pass
        wait_until(lambda: not (tmp_path / "hp.sock").exists(), 30, "the last process to stop")
        output = proc.communicate(timeout=30)[0]
    assert "took over" in output and "Traceback" not in output, output
