"""The edu differential of tests/test_edu_guest.py traced, replayed without
QEMU, and qbackend's edu reloaded while the guest runs.

The guest runs edu_check's check and irq sequences against QEMU's `-device
edu` and qbackend's (examples/edu.py, served with ``trace=FILE``); the
outputs must be equal, and the trace of qbackend's edu, kept in the test's
tmp folder, replays against examples/edu.py in well under a second and
against edus changed on purpose (a factorial off by one, a DMA without its
interrupt) to the first divergent event.  Then `qbackend device reload`
replaces the running edu with a changed one: the guest sees the new
factorial with no QEMU restart, and a reload of a module with a syntax
error leaves that edu serving.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_edu_guest import CHECK_TIMEOUT, EduDevice, expected_check, expected_irq

from qbackend.app.cli import main
from qbackend.app.device_loader import load_class
from qbackend.app.service import Backend
from qbackend.devices.replay import replay
from qbackend.machine.launch import vfio_user_device_arg
from qbackend.machine.qmp import SyncQmp
from qbackend.options import DeviceOptions
from qbackend.testing.harness import Guest, Harness, wait_until
from qbackend.vfio import trace

pytestmark = pytest.mark.guest

REPO = Path(__file__).resolve().parent.parent
EDU_SOURCE = (REPO / "examples" / "edu.py").read_text()
OFF_BY_ONE = ("self.fact = factorial32(value & MASK32)", "self.fact = factorial32(value & MASK32) + 1")
NO_DMA_IRQ = ("            if cmd & DMA_IRQ_ON_DONE:\n                self._raise(DMA_IRQ)", "            pass")


def changed_edu(folder: Path, name: str, change: tuple[str, str]) -> Path:
    assert change[0] in EDU_SOURCE
    path = folder / f"{name}.py"
    path.write_text(EDU_SOURCE.replace(*change))
    return path


@dataclass
class Rig:
    guest: Guest
    ref: EduDevice
    other: EduDevice
    source: Path  # the file qbackend's edu was loaded from (reload reads it again)
    trace: Path
    control: Path
    workdir: Path

    def edu_check(self, dev: EduDevice, mode: str = "check") -> list[str]:
        status, out = self.guest.console.run_status(f"edu_check {dev.path} {mode}", CHECK_TIMEOUT)
        assert status in (0, 1), out
        return [line.strip() for line in out.strip().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def rig(harness: Harness) -> Iterator[Rig]:
    source = harness.workdir / "edu.py"
    source.write_text(EDU_SOURCE)
    trace_file = harness.workdir / "edu.trace"
    backend = Backend()
    served = backend.add_device(DeviceOptions.parse(f"socket={harness.workdir / 'edu.sock'},class={source}:Edu,"
                                                    f"id=edu1,trace={trace_file}"))
    control = harness.workdir / "qbackend-qmp.sock"
    backend.enable_control(control)
    harness.serve(backend)
    ref = EduDevice("QEMU edu", 4, ("-device", "edu,id=edu0,addr=0x4"))
    other = EduDevice("qbackend edu (vfio-user)", 5,
                      ("-device", vfio_user_device_arg("edu1", served.server.socket_path, addr="0x5")))
    guest = harness.guest("edu-trace", extra_args=[*ref.args, *other.args])
    yield Rig(guest, ref, other, source, trace_file, control, harness.workdir)


@pytest.fixture(scope="module")
def recorded(rig: Rig, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The differential run, traced: check and irq sequences (MSI) on both edus."""
    ref = rig.edu_check(rig.ref)
    assert rig.edu_check(rig.other) == ref == expected_check()
    rig.guest.sh("insmod /lib/modules/edu_irq.ko mode=msi")
    wait_until(lambda: rig.guest.sh(f"cat {rig.other.path}/irq_mode 2>/dev/null || echo none") == "msi", 30,
               "edu_irq to drive qbackend's edu with MSI")
    assert rig.edu_check(rig.other, "irq") == expected_irq()
    rig.guest.sh("rmmod edu_irq")
    qmp = SyncQmp(rig.control)
    try:
        summary = qmp.execute("device-trace-stop", {"id": "edu1"})
    finally:
        qmp.close()
    kept = tmp_path_factory.mktemp("artifacts") / "edu-differential.trace"  # the test's artifact
    shutil.copy(rig.trace, kept)
    print(f"trace: {summary['events']} events, kept at {kept}")
    return kept


def test_the_traced_run_replays_without_qemu(recorded: Path) -> None:
    events = trace.load(recorded)
    kinds = {e["ev"] for e in events}
    assert {"connect", "read", "write", "set-irqs", "irq", "dma-read", "dma-write", "job", "end"} <= kinds
    assert any(e["ev"] == "read" and e["region"] == "config" for e in events)
    started = time.monotonic()
    result = replay(recorded, load_class(f"{REPO}/examples/edu.py:Edu"))
    took = time.monotonic() - started
    print(f"replayed {result.events} events of a booted guest's run in {took * 1000:.1f} ms: {result}")
    assert result.same, str(result)
    assert took < 5  # about 0.1 s here; generous for a loaded machine


@pytest.mark.parametrize(("change", "kind"), [(OFF_BY_ONE, "read"), (NO_DMA_IRQ, "irq")])
def test_a_changed_edu_diverges_at_the_first_differing_event(recorded: Path, tmp_path: Path,
                                                             change: tuple[str, str], kind: str) -> None:
    events = trace.load(recorded)
    if kind == "read":  # the first read of the factorial register after a write of it
        written = next(e["n"] for e in events if e["ev"] == "write" and e["region"] == "bar0" and e["offset"] == 8)
        first = next(e for e in events if e["n"] > written and e["ev"] == "read" and e["region"] == "bar0"
                     and e["offset"] == 8)
    else:  # the first interrupt a DMA job raised
        first = next(e for e in events if e["ev"] == "irq" and "job" in e)
    result = replay(recorded, load_class(f"{changed_edu(tmp_path, 'changed', change)}:Edu"), timeout=1)
    print(result)
    assert result.divergence is not None
    assert (result.divergence.event, result.divergence.kind) == (first["n"], kind)


def test_reload_while_the_guest_runs(rig: Rig, recorded: Path, capsys: pytest.CaptureFixture[str]) -> None:
    control = ["--control", str(rig.control)]
    fact12 = "fact 12 status_before 0x00000000 status_after 0x00000000 result "
    assert fact12 + "0x1c8cfc00" in rig.edu_check(rig.other)
    rig.source.write_text(EDU_SOURCE.replace(*OFF_BY_ONE))
    assert main(["device", *control, "reload", "edu1"]) == 0
    assert "edu1: reloaded" in capsys.readouterr().out
    lines = rig.edu_check(rig.other)
    assert fact12 + "0x1c8cfc01" in lines  # the new factorial, no QEMU restart
    assert rig.edu_check(rig.ref) == expected_check()  # QEMU's edu beside it, untouched
    # A module with a syntax error: the changed edu keeps serving.
    rig.source.write_text(EDU_SOURCE + "\ndef broken(:\n")
    assert main(["device", *control, "reload", "edu1"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SyntaxError" in err and "does not load" in err, err
    assert fact12 + "0x1c8cfc01" in rig.edu_check(rig.other)
    # Back to the real one: the guest's check sequence holds again.
    rig.source.write_text(EDU_SOURCE)
    assert main(["device", *control, "reload", "edu1"]) == 0
    assert rig.edu_check(rig.other) == expected_check()
