"""A guest reboot keeps what was plugged, on pc and on q35.

A DIMM and an ivshmem device are hot-added through qbackend, beside a
cold-plugged edu (examples/edu.py) and the hotplug controller; then the
machine is reset, once by QMP `system_reset` and once by `reboot -f` inside
the guest.  After each reboot the test checks, against QEMU itself:

- qbackend's ACPI memory-hotplug window equals QEMU's block at 0xa00 for
  every slot (address, size, proximity, enabled and the event bits: no
  stale insert or remove event), read from inside the guest;
- its PCI-hotplug window equals QEMU's block (0xae00 on pc, 0xcc0 on q35)
  for the hotplug bus (UP, DOWN, RMV);
- the guest sees the same memory (MemTotal) and the same PCI functions;
- `dimm list` / `pci list` (qbackend's QMP queries) are unchanged;
- the vfio-user devices came back from QEMU's device reset working:
  ivshmem's IVPosition and its shared memory's contents, edu's liveness
  and factorial registers.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend
from qbackend.machine.launch import load_machine_config, vfio_user_device_arg
from qbackend.machine.qmp import SyncQmp
from qbackend.options import DeviceOptions, DimmOptions, IvshmemOptions
from qbackend.testing.harness import Guest, Harness, wait_attached, wait_until

pytestmark = pytest.mark.guest

MiB = 1 << 20
SLOTS = 2
EDU = f"{Path(__file__).resolve().parent.parent}/examples/edu.py:Edu"
PCIHP_BLOCK = {"pc": 0xAE00, "q35": 0xCC0}


@dataclass
class Rig:
    machine: str
    work: Path
    thread: BackendThread
    backend: Backend
    guest: Guest
    user: SyncQmp
    controller: str  # its sysfs path
    group: str

    @property
    def controller_bar0(self) -> int:
        """Read each time: the guest's firmware may place BARs elsewhere after a reboot."""
        return self.guest.bar(self.controller, 0)[0]

    def sh(self, cmd: str, timeout: float = 60) -> str:
        return self.guest.sh(cmd, timeout)

    def memhp(self) -> list[tuple[list[int], list[int]]]:
        """(QEMU's block, qbackend's window) for every DIMM slot: address lo/hi, size lo/hi,
        proximity, and the status byte (enabled, insert and remove events)."""
        out = []
        bar0 = self.controller_bar0
        for slot in range(SLOTS):
            theirs = [int(x, 16) for x in self.sh(f"ioport wl 0xa00 {slot} && ioport rl 0xa00 6").split()]
            ours = [int(x, 16) for x in self.sh(
                f"devmem {bar0:#x} 32 {slot} && for o in 0 4 8 12 16 20; do devmem $(({bar0} + $o)) 32; done"
            ).split()]
            out.append((theirs[:5] + [theirs[5] & 0x7], ours[:5] + [ours[5] & 0x7]))
        return out

    def pcihp(self) -> tuple[list[int], list[int]]:
        """(QEMU's, qbackend's) DOWN and RMV of the hotplug bus (bsel 0), and UP, which QEMU
        clears when read: both are read twice, so a pending UP shows as the first read's."""
        block = PCIHP_BLOCK[self.machine]
        window = self.controller_bar0 + 0x100
        theirs = [int(x, 16) for x in self.sh(f"ioport wl {block + 0x10:#x} 0 && ioport rl {block:#x} 4").split()]
        ours = [int(x, 16) for x in self.sh(
            f"devmem {window + 0x10:#x} 32 0 && for o in 0 4 8 12; do devmem $(({window} + $o)) 32; done").split()]
        return [theirs[0], theirs[1], theirs[3]], [ours[0], ours[1], ours[3]]

    def mem_total_kb(self) -> int:
        return int(self.sh("sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo"))

    def functions(self) -> list[str]:
        return self.sh("for d in /sys/bus/pci/devices/*; do echo ${d##*/} $(cat $d/vendor $d/device); done"
                       ).splitlines()

    def path_of(self, vendor: int, device: int) -> str:
        (path,) = self.guest.find_pci(vendor, device)
        return path

    def ivshmem(self) -> tuple[int, str]:
        """IVPosition and the first 16 bytes of BAR2, through the guest's own mappings."""
        path = self.path_of(0x1AF4, 0x1110)
        self.sh(f"echo 1 > {path}/enable")
        position = self.guest.devmem(self.guest.bar(path, 0)[0] + 8)
        bar2 = self.guest.bar(path, 2)[0]
        data = " ".join(f"{self.guest.devmem(bar2 + 4 * i):08x}" for i in range(4))
        return position, data

    def edu_works(self) -> None:
        path = self.path_of(0x1234, 0x11E8)
        self.sh(f"echo 1 > {path}/enable")
        bar0 = self.guest.bar(path, 0)[0]
        assert self.guest.devmem(bar0) == 0x010000ED
        self.guest.devmem(bar0 + 4, value=0x12345678)
        wait_until(lambda: self.guest.devmem(bar0 + 4) == 0xEDCBA987, 10, "edu's liveness register")
        self.guest.devmem(bar0 + 8, value=6)
        wait_until(lambda: self.guest.devmem(bar0 + 8) == 720, 10, "edu's factorial of 6")

    def queries(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        assert self.backend.dimms is not None and self.backend.pci is not None
        return self.thread.call(self.backend.dimms.as_json), self.thread.call(self.backend.pci.as_json)


@pytest.fixture(scope="module", params=["pc", "q35"])
def rig(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    machine: str = request.param
    with Harness(tmp_path_factory.mktemp(f"reboot-{machine}")) as harness:
        work = harness.workdir
        group = harness.shm_name(f"reboot-{machine}")
        backend = Backend()
        controller = backend.add_hotplug_controller(work / "hotplug.sock", [DimmOptions("hot1", 128 * MiB)],
                                                    machine=machine, ram_size=512 * MiB, slots=SLOTS)
        backend.add_pci_slots(load_machine_config(machine).hotplug_bus)
        edu = backend.add_device(DeviceOptions.parse(f"socket={work / 'edu.sock'},class={EDU},id=edu1"))
        ctl_addr, edu_addr = ("0x5", "0x6") if machine == "pc" else ("0x6", "0x7")
        assert backend.dimms is not None
        guest = harness.guest(start=False, machine=machine, memory="512M", slots=SLOTS, maxmem="2G", reboot=True,
                              append="memhp_default_state=online_movable", extra_args=[
                                  "-device", vfio_user_device_arg("hotplug", controller.server.socket_path,
                                                                  addr=ctl_addr),
                                  "-device", vfio_user_device_arg("edu1", edu.server.socket_path, addr=edu_addr),
                                  *backend.dimms.cold_plug_args()])
        backend.attach_qmp(guest.vm.qmp_path)
        thread = harness.serve(backend)
        harness.start(guest)
        wait_attached(backend)
        wait_until(lambda: backend.pci is not None and backend.pci.qmp is not None, 30,
                   "qbackend's PCI slots to attach to QMP")
        yield Rig(machine, work, thread, backend, guest, guest.monitor(user=True),
                  f"/sys/bus/pci/devices/0000:00:{int(ctl_addr, 16):02x}.0", group)


@dataclass
class Seen:
    mem_total_kb: int
    functions: list[str]
    ivshmem: tuple[int, str]
    queries: tuple[list[dict[str, Any]], list[dict[str, Any]]]


def _plug(rig: Rig) -> Seen:
    """Hot-add the DIMM and an ivshmem device; write a pattern into the ivshmem memory."""
    assert rig.backend.dimms is not None
    before = rig.mem_total_kb()
    rig.thread.run(rig.backend.dimms.add, "hot1")
    wait_until(lambda: rig.mem_total_kb() >= before + 128 * 1024 - 4096, 30, "the guest to online the DIMM")
    opts = IvshmemOptions(socket=rig.work / "iv.sock", size=1 * MiB, shm=rig.group, vectors=0, id="iv0", peer=3)
    rig.thread.run(rig.backend.pci_add_ivshmem, opts)
    rig.guest.wait_guest("[ -n \"$(grep -l 0x1110 /sys/bus/pci/devices/*/device)\" ]", 30)
    path = rig.path_of(0x1AF4, 0x1110)
    rig.sh(f"echo 1 > {path}/enable")
    bar2 = rig.guest.bar(path, 2)[0]
    for i, word in enumerate((0xC0FFEE00, 0x12345678, 0xDEADBEEF, 0x0BADF00D)):
        rig.guest.devmem(bar2 + 4 * i, value=word)
    seen = Seen(rig.mem_total_kb(), rig.functions(), rig.ivshmem(), rig.queries())
    assert seen.ivshmem == (3, "c0ffee00 12345678 deadbeef 0badf00d")
    return seen


def _check_after_reboot(rig: Rig, seen: Seen) -> None:
    rig.guest.wait_ready(timeout=120)
    for slot, (theirs, ours) in enumerate(rig.memhp()):
        assert ours == theirs, f"memory-hotplug slot {slot}: qbackend {ours} vs QEMU {theirs}"
    theirs, ours = rig.pcihp()  # once: UP clears when read
    assert ours == theirs, f"PCI hotplug UP, DOWN, RMV: qbackend {ours} vs QEMU {theirs}"
    assert rig.mem_total_kb() == seen.mem_total_kb
    assert rig.functions() == seen.functions
    dimms, slots = rig.queries()
    assert dimms == seen.queries[0]
    # The same devices in the same slots; no event pending (UP and DOWN are event latches).
    assert [{k: v for k, v in e.items() if k not in ("up", "down")} for e in slots] == \
        [{k: v for k, v in e.items() if k not in ("up", "down")} for e in seen.queries[1]]
    assert not any(e["up"] or e["down"] for e in slots), slots
    assert rig.ivshmem() == seen.ivshmem
    rig.edu_works()


def test_system_reset_keeps_what_was_plugged(rig: Rig) -> None:
    seen = _plug(rig)
    rig.edu_works()
    rig.user.execute("system_reset")
    _check_after_reboot(rig, seen)


def test_reboot_inside_the_guest_keeps_what_was_plugged(rig: Rig) -> None:
    assert rig.backend.dimms is not None
    if not rig.backend.dimms.dimms["hot1"].plugged:
        _plug(rig)
    seen = Seen(rig.mem_total_kb(), rig.functions(), rig.ivshmem(), rig.queries())
    rig.guest.console.send("reboot -f\n")
    _check_after_reboot(rig, seen)
