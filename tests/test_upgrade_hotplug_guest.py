"""`qbackend upgrade` of a `qbackend serve --hotplug ... --qmp QEMU` under a booted
guest: the hotplug controller, its DIMM slots and the PCI hotplug bus move to
the new process, which connects to QEMU's QMP monitor again.

A DIMM plugged with `dimm-add` and an ivshmem device plugged with
`pci-device-add` before the upgrade; after it:
- qbackend's query-memory-hotplug and query-pci-hotplug, QEMU's
  query-memory-devices and the guest's MemTotal are unchanged, and the guest
  still reads the device qbackend serves;
- the controller's window (BAR0) reads as before;
- `dimm-del` of that DIMM works: the guest ejects it, QEMU deletes it and its
  memory backend, qbackend says DIMM_REMOVED, and both sides agree;
- a DIMM added after the upgrade works;
- `pci-device-del` of the device works: the guest ejects it, QEMU and qbackend
  agree it is gone, and the new process frees its socket; a device added
  after the upgrade works.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from qbackend.app.monitor_client import call, monitor
from qbackend.machine.launch import vfio_user_device_arg
from qbackend.testing.harness import Guest, Harness, start_qbackend, wait_until

pytestmark = pytest.mark.guest

MiB = 1 << 20
CONTROLLER = "/sys/bus/pci/devices/0000:00:05.0"


def mem_total_kb(guest: Guest) -> int:
    return int(guest.sh("sed -n 's/^MemTotal: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo"))


def qemu_dimms(user: Any) -> list[tuple[object, ...]]:
    """QEMU's DIMMs: (id, slot, addr, size, node), by slot."""
    return sorted((d["data"].get("id"), d["data"]["slot"], d["data"]["addr"], d["data"]["size"], d["data"]["node"])
                  for d in user.execute("query-memory-devices") if d["type"] == "dimm")


def qemu_objects(user: Any) -> set[str]:
    return {o["name"] for o in user.execute("qom-list", {"path": "/objects"})}


def qemu_bus_ids(user: Any) -> set[str]:
    return {d.get("qdev_id", "") for bus in user.execute("query-pci") for d in bus["devices"]}


def pci_path(slot: int) -> str:
    return f"/sys/bus/pci/devices/0000:00:{slot:02x}.0"


def ours(control: Path, cmd: str, args: dict[str, Any] | None = None) -> Any:
    with monitor(control) as qmp:
        return call(qmp, cmd, args or {})


def attached(control: Path) -> bool:
    """Whether the serving process is connected to QEMU's QMP (qemu-* figures need it)."""
    return "qemu-base" in ours(control, "query-memory-total")


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def window(guest: Guest, bar0: int) -> list[int]:
    """The controller's memory-hotplug registers of each slot, and the PCI RMV register."""
    out = guest.sh(f"for s in 0 1 2 3; do devmem {bar0:#x} 32 $s; for o in 0 4 8 12 16 20; do "
                   f"devmem $(({bar0} + $o)) 32; done; done; devmem $(({bar0} + 0x10c)) 32")
    return [int(x, 16) for x in out.split()]


def test_upgrade_with_the_hotplug_controller_under_a_guest(harness: Harness, tmp_path: Path) -> None:
    control = tmp_path / "qb.sock"
    guest = harness.guest("hpup", start=False, memory="512M", slots=4, maxmem="4G",
                          append="memhp_default_state=online_movable",
                          extra_args=["-device", vfio_user_device_arg("hotplug", tmp_path / "hp.sock", addr="0x5")])
    proc, _ = start_qbackend(
        ["serve", "--control", str(control), "--qmp", str(guest.vm.qmp_path),
         "--hotplug", f"socket={tmp_path / 'hp.sock'},machine=pc,ram=512M,slots=4",
         "--dimm", "id=d1,size=128M", "--dimm", "id=d2,size=128M"], tmp_path)
    pids = [proc.pid]

    def stop_last() -> None:
        try:
            os.kill(pids[-1], signal.SIGINT)
        except ProcessLookupError:
            pass
        if proc.stdout is not None and not proc.stdout.closed:
            proc.communicate(timeout=30)

    harness.callback(stop_last)
    harness.start(guest)
    user = guest.monitor(user=True)
    wait_until(lambda: attached(control), 30, "qbackend to attach to QEMU's QMP")
    bar0 = guest.bar(CONTROLLER, 0)[0]
    base_kb = mem_total_kb(guest)
    cold_bus = ours(control, "query-pci-hotplug")  # what the machine was started with

    # Before the upgrade: a DIMM and a PCI device plugged through qbackend.
    assert ours(control, "dimm-add", {"id": "d1"})["id"] == "d1"
    wait_until(lambda: mem_total_kb(guest) == base_kb + 128 * 1024, 30, "the guest to online d1",
               seen=lambda: mem_total_kb(guest))
    added = ours(control, "pci-device-add", {"driver": "ivshmem", "id": "iv9", "socket": str(tmp_path / "iv9.sock"),
                                             "size": str(MiB)})
    slot = added["slot"]
    guest.wait_guest(f"[ \"$(cat {pci_path(slot)}/vendor 2>/dev/null)\" = 0x1af4 ]", 30)
    guest.sh(f"echo 1 > {pci_path(slot)}/enable")
    iv9_bar0 = guest.bar(pci_path(slot), 0)[0]
    position = guest.devmem(iv9_bar0 + 8)
    assert position == added["position"]
    before = {"dimms": ours(control, "query-memory-hotplug"), "pci": ours(control, "query-pci-hotplug"),
              "qemu": qemu_dimms(user), "mem": mem_total_kb(guest), "window": window(guest, bar0)}
    assert [d["state"] for d in before["dimms"]] == ["plugged", "empty"]

    # The upgrade.
    reply = ours(control, "upgrade", {"timeout": 120})
    pids.append(int(reply["pid"]))
    assert proc.wait(30) == 0
    wait_until(lambda: attached(control), 30, "the new process to attach to QEMU's QMP")
    assert ours(control, "query-memory-hotplug") == before["dimms"]
    assert ours(control, "query-pci-hotplug") == before["pci"]
    assert qemu_dimms(user) == before["qemu"]
    assert mem_total_kb(guest) == before["mem"]
    assert window(guest, bar0) == before["window"]
    assert guest.devmem(iv9_bar0 + 8) == position  # the new process serves the device

    # dimm-del after the upgrade: the guest ejects d1, QEMU and qbackend agree.
    with monitor(control) as qmp:
        call(qmp, "dimm-del", {"id": "d1"})
        event = qmp.next_event("DIMM_REMOVED", data={"id": "d1"}, timeout=60)
    assert event["data"] == {"id": "d1", "slot": before["dimms"][0]["slot"]}
    wait_until(lambda: [d["state"] for d in ours(control, "query-memory-hotplug")] == ["empty", "empty"], 60,
               "qbackend to see d1 removed", seen=lambda: ours(control, "query-memory-hotplug"))
    wait_until(lambda: qemu_dimms(user) == [], 30, "QEMU to delete d1", seen=lambda: qemu_dimms(user))
    wait_until(lambda: "mem-d1" not in qemu_objects(user), 30, "d1's memory backend to go")
    wait_until(lambda: mem_total_kb(guest) == base_kb, 30, "the guest's MemTotal back to its base",
               seen=lambda: mem_total_kb(guest))

    # A DIMM added after the upgrade.
    d2 = ours(control, "dimm-add", {"id": "d2"})
    wait_until(lambda: mem_total_kb(guest) == base_kb + 128 * 1024, 30, "the guest to online d2",
               seen=lambda: mem_total_kb(guest))
    assert [(d[0], d[1], d[2]) for d in qemu_dimms(user)] == [("d2", d2["slot"], d2["address"])]
    assert [d["state"] for d in ours(control, "query-memory-hotplug")] == ["empty", "plugged"]

    # pci-device-del of the device plugged before the upgrade.
    ours(control, "pci-device-del", {"id": "iv9"})
    guest.wait_guest(f"[ ! -e {pci_path(slot)} ]", 30)
    wait_until(lambda: "iv9" not in qemu_bus_ids(user), 30, "QEMU to delete iv9")
    wait_until(lambda: ours(control, "query-pci-hotplug") == cold_bus, 30, "qbackend to see iv9 gone",
               seen=lambda: ours(control, "query-pci-hotplug"))
    wait_until(lambda: not (tmp_path / "iv9.sock").exists(), 10, "the new process to free iv9's socket")

    # A PCI device added after the upgrade.
    added = ours(control, "pci-device-add", {"driver": "ivshmem", "id": "iv10",
                                             "socket": str(tmp_path / "iv10.sock"), "size": str(MiB)})
    guest.wait_guest(f"[ \"$(cat {pci_path(added['slot'])}/vendor 2>/dev/null)\" = 0x1af4 ]", 30)
    guest.sh(f"echo 1 > {pci_path(added['slot'])}/enable")
    assert guest.devmem(guest.bar(pci_path(added["slot"]), 0)[0] + 8) == added["position"]
    ours(control, "pci-device-del", {"id": "iv10"})
    guest.wait_guest(f"[ ! -e {pci_path(added['slot'])} ]", 30)
    wait_until(lambda: ours(control, "query-pci-hotplug") == cold_bus and "iv10" not in qemu_bus_ids(user), 30,
               "iv10 gone on both sides")

    log = guest.vm.log_path.read_text(errors="replace")
    said = [line for line in log.splitlines() if not line.startswith("$ ")]
    assert not [line for line in said if "vfio" in line.lower() or "error" in line.lower()], said
    guest.stop()
    os.kill(pids[-1], signal.SIGINT)
    wait_until(lambda: gone(pids[-1]), 30, "the new process to stop")
    output = proc.communicate(timeout=30)[0]
    assert "took over" in output and "Traceback" not in output, output
