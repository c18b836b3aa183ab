"""qbackend.machine.qmp against a real (paused) QEMU: errors, events, hang-ups."""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path

import pytest
import trio

from qbackend.machine.launch import QemuMachine
from qbackend.machine.qmp import QmpConnection, QmpError, QmpTimeout, SyncQmp

pytestmark = pytest.mark.guest


def paused_vm(tmp_path: Path) -> QemuMachine:
    return QemuMachine(tmp_path, extra_args=["-S"])


def test_sync_hangup_fails_fast(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with paused_vm(tmp_path) as vm:
        q = SyncQmp(vm.qmp_path)
        assert q.execute("query-status")["status"] == "prelaunch"
        with pytest.raises(QmpTimeout):
            q.next_event("RESUME", timeout=0.1)
        q.execute("quit")
        assert q.next_event("SHUTDOWN", timeout=10)["data"]["reason"] == "host-qmp-quit"
        t0 = time.monotonic()
        with pytest.raises(QmpError, match="closed"):
            q.next_event("DEVICE_DELETED", timeout=30)
        assert time.monotonic() - t0 < 5
        with pytest.raises(QmpError):
            q.execute("query-status")
        q.close()
        q.close()  # idempotent


def test_unclosed_connection_logs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    with paused_vm(tmp_path) as vm:
        q = SyncQmp(vm.qmp_path)
        q.execute("query-status")
    # QEMU is gone and q was never closed: dropping it must stay quiet.
    with pytest.raises(QmpError, match="closed"):
        q.next_event("STOP", timeout=10)
    del q
    gc.collect()
    time.sleep(0.2)
    gc.collect()
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_trio_events_cancel_and_hangup(tmp_path: Path) -> None:
    with paused_vm(tmp_path) as vm:

        async def main() -> None:
            async with await QmpConnection.open(vm.qmp_path) as q:
                with trio.move_on_after(0.1) as scope:
                    await q.next_event("RESUME", timeout=30)
                assert scope.cancelled_caught
                await q.execute("cont")
                ev = await q.next_event("RESUME", timeout=10)
                assert ev["event"] == "RESUME"
                with pytest.raises(QmpError) as info:
                    await q.execute("object-del", {"id": "nope"})
                assert info.value.error_class == "GenericError"
                await q.execute("quit")
                seen = []
                with pytest.raises(QmpError, match="closed"):
                    async for ev in q.events():
                        seen.append(ev["event"])
                assert "SHUTDOWN" in seen

        trio.run(main)
