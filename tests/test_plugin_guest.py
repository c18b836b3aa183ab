"""The pytest plugin's `qbackend_vm` with everything it offers at once: a
device of the test's own, a built-in ivshmem, a DIMM slot behind the
hotplug controller and a QED disk; checked from the guest, from QEMU's QMP
and from qbackend's."""

from __future__ import annotations

from typing import Any

import pytest
from qed_tools import qemu_img

from qbackend.devices import Bar, Device
from qbackend.machine.console import GuestCommandFailed
from qbackend.options import IvshmemOptions

pytestmark = pytest.mark.guest

MiB = 1 << 20


class Probe(Device):
    vendor_id, device_id = 0x1234, 0xC0DE
    bars = (Bar(0, 4096),)

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        return 0xC0DE0000 | offset


@pytest.fixture(scope="module")
def vm(qbackend_vm: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    work = tmp_path_factory.mktemp("plugin")
    disk = work / "disk.qed"
    qemu_img("create", "-f", "qed", str(disk), str(32 * MiB))
    return qbackend_vm(devices=[Probe(), IvshmemOptions(socket=work / "iv.sock", size=MiB, vectors=0, id="iv")],
                       dimms=["id=d1,size=128M"], disks=[disk], append="memhp_default_state=online_movable")


def test_the_own_device_answers_from_the_guest(vm: Any) -> None:
    (probe,) = vm.pci_devices(0x1234, 0xC0DE)
    bar0 = probe.bar(0)
    assert bar0.size == 4096
    assert vm.sh(f"devmem {bar0.address + 8:#x} 32") == "0xC0DE0008"
    assert len(vm.pci_devices(0x1AF4, 0x1110)) == 1  # the built-in ivshmem


def test_the_disk_is_virtio_blk(vm: Any) -> None:
    vm.wait_guest("[ -b /dev/vda ]")
    assert vm.sh("cat /sys/block/vda/size") == str(32 * MiB // 512)


def test_the_dimm_slot_through_both_monitors(vm: Any) -> None:
    assert [d["id"] for d in vm.qbackend_qmp.execute("query-memory-hotplug")] == ["d1"]
    vm.qbackend_qmp.execute("dimm-add", {"id": "d1"})
    vm.wait_until(lambda: any(d["data"].get("id") == "d1" for d in vm.qmp.execute("query-memory-devices")),
                  10, "QEMU to have the DIMM")
    assert vm.qbackend_qmp.execute("query-memory-total")["plugged"] == 128 * MiB


def test_sh_raises_with_the_output(vm: Any) -> None:
    with pytest.raises(GuestCommandFailed, match="no-such-file"):
        vm.sh("cat /no-such-file")
    assert vm.sh("echo still here") == "still here"
