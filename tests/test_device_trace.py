"""Device traces (qbackend.vfio.trace), replay (qbackend.devices.replay) and
reload (qbackend.app.device_loader.reload_device) without a guest: QEMU's edu
(examples/edu.py) served to a raw vfio-user client that acts as QEMU does."""

from __future__ import annotations

import json
import os
import select
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from qbackend.app.backend_thread import BackendThread
from qbackend.app.cli import main
from qbackend.app.device_loader import load_class, reload_device
from qbackend.app.service import Backend
from qbackend.devices.api import UserFunction
from qbackend.devices.replay import replay
from qbackend.errors import UsageError
from qbackend.options import DeviceOptions
from qbackend.plumbing.peer_memory import sealed_memfd
from qbackend.protocol import vfio_user as vu
from qbackend.testing.harness import wait_until
from qbackend.testing.vfio_user_client import VfioUserClient
from qbackend.vfio import trace

REPO = Path(__file__).resolve().parent.parent
EDU_SOURCE = (REPO / "examples" / "edu.py").read_text()
BAR0, CONFIG, MSI = vu.PciRegion.BAR0, vu.PciRegion.CONFIG, vu.PciIrq.MSI
EVENTFD_TRIGGER = vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER

# Edus changed on purpose (the replay must say where they differ).
OFF_BY_ONE = ("self.fact = factorial32(value & MASK32)", "self.fact = factorial32(value & MASK32) + 1")
NO_DMA_IRQ = ("            if cmd & DMA_IRQ_ON_DONE:\n                self._raise(DMA_IRQ)",
              "            pass")


def edu_variant(tmp: Path, name: str, change: tuple[str, str] | None = None) -> Path:
    source = EDU_SOURCE
    if change is not None:
        assert change[0] in source, change
        source = source.replace(*change)
    path = tmp / f"{name}.py"
    path.write_text(source)
    return path


def read64(c: VfioUserClient, offset: int) -> int:
    value: int = struct.unpack("<Q", c.read(BAR0, offset, 8))[0]
    return value


def drive_edu(c: VfioUserClient) -> None:
    """What a guest driver does to edu: config space, registers, factorial with its
    interrupt, MSI, a DMA each way with its completion interrupt, a reset."""
    mem = sealed_memfd("guest-ram", 0x10000)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        assert c.read(CONFIG, 0, 4) == struct.pack("<HH", 0x1234, 0x11E8)  # natively served, untraced
        c.write(CONFIG, 4, struct.pack("<H", 0x6))
        c.dma_map(0x100000, 0x10000, mem)
        c.set_irqs(MSI, EVENTFD_TRIGGER, 0, 1, [efd])
        assert c.read32(BAR0, 0) == 0x010000ED
        c.write32(BAR0, 0x04, 0x12345678)
        assert c.read32(BAR0, 0x04) == 0xEDCBA987
        c.write32(BAR0, 0x20, 0x80)  # an interrupt after each factorial
        c.write32(BAR0, 0x08, 10)
        assert c.read32(BAR0, 0x08) == 3628800
        assert select.select([efd], [], [], 10)[0]
        os.eventfd_read(efd)
        c.write32(BAR0, 0x64, 0x1)
        os.pwrite(mem, bytes(range(256)), 0x100)
        for offset, value in ((0x80, 0x100100), (0x88, 0x40000), (0x90, 256), (0x98, 0x1 | 0x4)):
            c.write(BAR0, offset, struct.pack("<Q", value))
        wait_until(lambda: read64(c, 0x98) & 1 == 0, 10, "the DMA into the buffer")
        assert select.select([efd], [], [], 10)[0]
        os.eventfd_read(efd)
        c.write32(BAR0, 0x64, 0x100)
        for offset, value in ((0x80, 0x40000), (0x88, 0x100800), (0x90, 256), (0x98, 0x3 | 0x4)):
            c.write(BAR0, offset, struct.pack("<Q", value))
        wait_until(lambda: read64(c, 0x98) & 1 == 0, 10, "the DMA back to RAM")
        assert os.pread(mem, 256, 0x800) == bytes(range(256))
        c.write32(BAR0, 0x64, 0x100)
        c.call(vu.Command.DEVICE_RESET)
    finally:
        os.close(mem)
        os.close(efd)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A trace of drive_edu, recorded with `trace=FILE` among the --device keys."""
    tmp = tmp_path_factory.mktemp("trace")
    path = tmp / "edu.trace"
    edu = edu_variant(tmp, "edu")
    backend = Backend()
    served = backend.add_device(DeviceOptions.parse(f"socket={tmp / 'edu.sock'},class={edu}:Edu,id=edu0,"
                                                    f"trace={path}"))
    with BackendThread(backend):
        with VfioUserClient(served.server.socket_path) as c:
            c.negotiate()
            drive_edu(c)
        wait_until(lambda: backend.devices["edu0"].server.connection is None, 10, "the client to be gone")
    # The backend closed the device, and with it the trace.
    yield path


def test_trace_format(recorded: Path) -> None:
    events = [json.loads(line) for line in recorded.read_text().splitlines()]
    header = events[0]
    assert header["ev"] == "trace" and header["version"] == trace.FORMAT_VERSION and header["device"] == "edu0"
    assert header["class"].endswith("edu.py:Edu") and header["args"] == {}
    assert [e["n"] for e in events] == list(range(len(events)))
    assert all(b["t"] >= a["t"] for a, b in zip(events, events[1:]))
    assert events[-1] == {**events[-1], "ev": "end", "events": len(events), "dropped": 0}
    kinds = [e["ev"] for e in events]
    assert kinds[1] == "connect" and kinds[-2] == "disconnect"
    # Config space reads the native loop would serve are traced: it stands aside while tracing.
    assert {"ev": "read", "region": "config", "offset": 0, "size": 4, "value": 0x11E81234}.items() <= \
        next(e for e in events if e["ev"] == "read").items()
    assert any(e["ev"] == "set-irqs" and e["index"] == MSI and e["fds"] == 1 for e in events)
    fact = next(e for e in events if e["ev"] == "read" and e["region"] == "bar0" and e["offset"] == 8)
    assert fact["value"] == 3628800
    irqs = [e for e in events if e["ev"] == "irq"]
    assert [(e["vector"], e["mode"], e["sent"]) for e in irqs] == [(0, "msi", True)] * 3
    assert "job" not in irqs[0] and "thread" not in irqs[0]  # raised inside the factorial's write
    assert irqs[1]["job"] == 1 and irqs[2]["job"] == 2  # by the deferred DMA jobs
    dma_read = next(e for e in events if e["ev"] == "dma-read")
    assert (dma_read["address"], dma_read["size"], dma_read["data"]) == (0x100100, 256, bytes(range(256)).hex())
    dma_write = next(e for e in events if e["ev"] == "dma-write")
    assert (dma_write["address"], dma_write["data"]) == (0x100800, bytes(range(256)).hex())
    assert [e["fn"] for e in events if e["ev"] == "job"] == ["Edu._transfer"] * 2
    assert "reset" in kinds


def test_replay_the_same_device(recorded: Path) -> None:
    started = time.monotonic()
    result = replay(recorded, load_class(f"{REPO}/examples/edu.py:Edu"))
    took = time.monotonic() - started
    print(f"replay of {result.events} events: {took * 1000:.1f} ms")
    assert result.same, str(result)
    assert took < 2


@pytest.mark.parametrize(("change", "kind", "what"), [
    (OFF_BY_ONE, "read", "read bar0+0x8 size 4: 0x375f00"),
    (NO_DMA_IRQ, "irq", "irq vector 0"),
])
def test_replay_reports_the_first_divergence(recorded: Path, tmp_path: Path, change: tuple[str, str],
                                             kind: str, what: str) -> None:
    events = trace.load(recorded)
    cls = load_class(f"{edu_variant(tmp_path, 'changed', change)}:Edu")
    result = replay(recorded, cls, timeout=0.5)
    assert result.divergence is not None
    first = next(e for e in events if e["ev"] == kind and (kind != "irq" or e.get("job")) and
                 (kind != "read" or (e["offset"] == 8 and e["region"] == "bar0")))
    assert (result.divergence.event, result.divergence.kind) == (first["n"], kind), str(result)
    assert result.divergence.expected == what


def test_replay_command_exit_codes(recorded: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["replay", str(recorded)]) == 0
    assert "same:" in capsys.readouterr().out
    changed = edu_variant(tmp_path, "changed", OFF_BY_ONE)
    assert main(["replay", str(recorded), f"class={changed}:Edu"]) == 1
    assert "diverged at event" in capsys.readouterr().out
    assert main(["replay", str(tmp_path / "none.trace")]) == 2
    (tmp_path / "bad.trace").write_text("{not json\n")
    assert main(["replay", str(tmp_path / "bad.trace")]) == 2


def test_memory_trace_keeps_its_maximum() -> None:
    tracer = trace.Tracer("dev", keep=5)
    for n in range(20):
        tracer.note("reload", number=n)
    events = tracer.events()
    assert len(events) == 5 and tracer.dropped == 16 and tracer.count == 21
    assert [e["n"] for e in events] == list(range(16, 21))
    assert trace.Tracer("dev").memory.maxlen == trace.MEMORY_EVENTS_KEPT  # type: ignore[union-attr]


def test_trace_file_grows_only_while_tracing(tmp_path: Path) -> None:
    backend = Backend()
    served = backend.add_device(DeviceOptions.parse(f"socket={tmp_path / 'e.sock'},class={REPO}/examples/edu.py:Edu"))
    function = served.device
    assert isinstance(function, UserFunction)
    with BackendThread(backend), VfioUserClient(served.server.socket_path) as c:
        c.negotiate()
        c.read(CONFIG, 0, 4)
        path = tmp_path / "t.trace"
        trace.start(function, trace.Tracer("edu", path=path))
        with pytest.raises(UsageError, match="already running"):
            trace.start(function, trace.Tracer("edu"))
        for _ in range(10):
            c.read(CONFIG, 0, 4)
            c.read32(BAR0, 0)
        summary = trace.stop(function)
        assert summary["events"] == 22 and summary["file"] == str(path)
        size = path.stat().st_size
        for _ in range(10):
            c.read(CONFIG, 0, 4)
        assert path.stat().st_size == size
        # The native loop serves config reads again once the trace stopped.
        before = backend.devices[served.id].server.counts()["native_accesses"]
        c.read(CONFIG, 0, 4)
        assert backend.devices[served.id].server.counts()["native_accesses"] in (before, before + 1)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["ev"] for e in lines] == ["trace", *["read"] * 20, "end"]


def test_reload_in_place_and_a_failed_one(tmp_path: Path) -> None:
    edu = edu_variant(tmp_path, "edu")
    backend = Backend()
    served = backend.add_device(DeviceOptions.parse(f"socket={tmp_path / 'e.sock'},class={edu}:Edu,id=e"))
    function = served.device
    assert isinstance(function, UserFunction)
    with BackendThread(backend), VfioUserClient(served.server.socket_path) as c:
        c.negotiate()
        c.write32(BAR0, 0x04, 1)
        c.write32(BAR0, 0x08, 5)
        assert c.read32(BAR0, 0x08) == 120
        edu.write_text(EDU_SOURCE.replace(*OFF_BY_ONE))
        old = function.device
        reload_device(function)
        assert function.device is not old
        assert c.read32(BAR0, 0x04) == 0xFFFFFFFE  # the state carried over (Device.reloaded)
        assert c.read32(BAR0, 0x08) == 120
        c.write32(BAR0, 0x08, 5)
        assert c.read32(BAR0, 0x08) == 121  # the new code
        serving = function.device
        edu.write_text(EDU_SOURCE + "\ndef broken(:\n")
        with pytest.raises(UsageError, match=r"does not load: SyntaxError: .*line \d+"):
            reload_device(function)
        edu.write_text(EDU_SOURCE.replace("super().__init__()", "super().__init__(); raise ValueError('no')"))
        with pytest.raises(UsageError, match=r"Edu\(\) raised ValueError: no"):
            reload_device(function)
        edu.write_text(EDU_SOURCE.replace("msi_vectors = 1", "msi_vectors = 2"))
        with pytest.raises(UsageError, match="other msi_vectors"):
            reload_device(function)
        assert function.device is serving
        c.write32(BAR0, 0x08, 6)
        assert c.read32(BAR0, 0x08) == 721
