"""The test harness itself: QEMU boots the test guest, the serial shell and
QMP both answer, and the guest's kernel modules load."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from qbackend.machine.data_dir import data_dir
from qbackend.machine.qmp import QmpError, SyncQmp
from qbackend.testing.harness import Guest, Harness

pytestmark = pytest.mark.guest


@dataclass
class Booted:
    guest: Guest
    qmp: SyncQmp  # QEMU's first monitor (no qbackend here); tests may replace it


@pytest.fixture(scope="module")
def booted(harness: Harness) -> Iterator[Booted]:
    guest = harness.guest(ready_timeout=60)
    yield Booted(guest, guest.monitor())


def test_kernel_version(booted: Booted) -> None:
    expected = (data_dir() / "guest" / "kernel-version").read_text().strip()
    assert booted.guest.console.run_checked("uname -r").strip() == expected


def test_init_loads_the_drivers_but_not_edu_irq(booted: Booted) -> None:
    c = booted.guest.console
    loaded = {line.split()[0] for line in c.run_checked("cat /proc/modules").splitlines()}
    assert {"virtio_pci", "virtio_blk", "ext4", "uio", "uio_pci_generic", "ivshmem_msix"} <= loaded
    assert "edu_irq" not in loaded  # its tests load it with their mode=


def test_exit_status_and_output(booted: Booted) -> None:
    c = booted.guest.console
    status, out = c.run_status("echo one; echo two >&2; false")
    assert status == 1
    assert out == "one\ntwo\n"
    assert c.run_status("exit_code() { return 7; }; exit_code")[0] == 7


def test_qmp_query_status(booted: Booted) -> None:
    assert booted.qmp.execute("query-status")["status"] == "running"


def test_qmp_error_carries_class(booted: Booted) -> None:
    with pytest.raises(QmpError) as info:
        booted.qmp.execute("device_del", {"id": "no-such-device"})
    assert info.value.error_class == "DeviceNotFound"


def test_qmp_events_sync(booted: Booted) -> None:
    q = booted.qmp
    q.execute("stop")
    q.execute("cont")
    # Both events are queued before we wait; they are taken in any order.
    assert q.next_event("RESUME", timeout=10)["event"] == "RESUME"
    assert q.next_event("STOP", timeout=10)["event"] == "STOP"
    assert q.drain_events("STOP") == []


def test_qmp_trio(booted: Booted) -> None:
    import trio

    from qbackend.machine.qmp import QmpConnection, QmpTimeout

    # The QMP monitor serves one client at a time: hand it over to trio.
    booted.qmp.close()

    async def main() -> None:
        async with await QmpConnection.open(booted.guest.vm.qmp_path) as q:
            assert (await q.execute("query-status"))["status"] == "running"
            with pytest.raises(QmpError) as info:
                await q.execute("device_del", {"id": "nope"})
            assert info.value.error_class == "DeviceNotFound"
            await q.execute("stop")
            ev = await q.next_event("STOP", timeout=10)
            assert ev["event"] == "STOP"
            async with trio.open_nursery() as nursery:
                nursery.start_soon(q.execute, "cont")
                ev = await q.next_event("RESUME", timeout=10)
            assert (await q.execute("query-status"))["status"] == "running"
            with pytest.raises(QmpTimeout):
                await q.next_event("DEVICE_DELETED", data={"device": "x"}, timeout=0.2)

    try:
        trio.run(main)
    finally:
        booted.qmp = booted.guest.monitor()
    assert booted.guest.console.run_checked("echo alive") == "alive\n"
