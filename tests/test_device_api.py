"""The public device API (qbackend.devices.Device) with QEMU's edu device
as its example (examples/edu.py), driven over vfio-user by a raw client
that acts as QEMU does: config space, BAR accesses, MSI through SET_IRQS,
DMA through fd-backed maps and through DMA messages; and the loading of a
user's class from the command line."""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qbackend.app.backend_thread import BackendThread
from qbackend.app.device_loader import load_class, make_device
from qbackend.app.service import Backend
from qbackend.devices import Bar, Device
from qbackend.devices.api import UserFunction, function_of
from qbackend.errors import UsageError
from qbackend.options import DeviceOptions
from qbackend.plumbing.peer_memory import sealed_memfd
from qbackend.protocol import vfio_user as vu
from qbackend.testing.harness import memfd_fds, wait_until
from qbackend.testing.vfio_user_client import VfioUserClient

REPO = Path(__file__).resolve().parent.parent
EDU = f"{REPO}/examples/edu.py:Edu"
BAR0 = vu.PciRegion.BAR0
CONFIG = vu.PciRegion.CONFIG
MSI = vu.PciIrq.MSI
EVENTFD_TRIGGER = vu.IrqSetFlags.DATA_EVENTFD | vu.IrqSetFlags.ACTION_TRIGGER


@dataclass
class Served:
    backend: Backend
    thread: BackendThread
    socket: Path

    def client(self) -> VfioUserClient:
        c = VfioUserClient(self.socket)
        c.negotiate()
        return c


@pytest.fixture(scope="module")
def edu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    sock = tmp_path_factory.mktemp("edu") / "edu.sock"
    backend = Backend()
    backend.add_device(DeviceOptions.parse(f"socket={sock},class={EDU},id=edu0"))
    with BackendThread(backend) as thread:
        yield Served(backend, thread, sock)


def read64(c: VfioUserClient, offset: int) -> int:
    value: int = struct.unpack("<Q", c.read(BAR0, offset, 8))[0]
    return value


def test_config_space_says_edu_with_msi_and_intx(edu: Served) -> None:
    with edu.client() as c:
        config = c.read(CONFIG, 0, 256)
        assert struct.unpack_from("<HH", config, 0) == (0x1234, 0x11E8)
        assert config[8] == 0x10 and config[9:12] == bytes([0x00, 0xFF, 0x00])  # revision, class "other"
        assert config[0x3D] == 1  # INTA#
        cap = config[0x34]
        assert config[cap] == 0x05 and config[cap + 1] == 0  # MSI, the only capability
        control = struct.unpack_from("<H", config, cap + 2)[0]
        assert control & 0x80 and (control >> 1) & 7 == 0  # 64-bit, one vector
        (_argsz, _flags, index, count) = vu.IRQ_INFO.unpack(
            c.call(vu.Command.DEVICE_GET_IRQ_INFO, vu.IRQ_INFO.pack(16, 0, MSI, 0)).payload)
        assert (index, count) == (MSI, 1)
        fields, _caps, _fds = c.region_info(0)
        assert fields[4] == 1 << 20  # BAR0: 1 MiB


def test_registers_as_the_spec_gives_them(edu: Served) -> None:
    with edu.client() as c:
        assert c.read32(BAR0, 0x00) == 0x010000ED
        for value in (0, 1, 0x12345678, 0xFFFFFFFF):
            c.write32(BAR0, 0x04, value)
            assert c.read32(BAR0, 0x04) == ~value & 0xFFFFFFFF
        for n, expected in ((0, 1), (5, 120), (12, 0x1C8CFC00), (13, 6227020800 % (1 << 32)), (40, 0)):
            c.write32(BAR0, 0x08, n)
            assert c.read32(BAR0, 0x20) & 1 == 0
            assert c.read32(BAR0, 0x08) == expected
        # The notes' example: 0x5 then 0x30 raised leave 0x35; acknowledging 0x35 clears it.
        c.write32(BAR0, 0x60, 0x5)
        c.write32(BAR0, 0x60, 0x30)
        assert c.read32(BAR0, 0x24) == 0x35
        c.write32(BAR0, 0x64, 0x35)
        assert c.read32(BAR0, 0x24) == 0
        # Below 0x80 only 4-byte accesses act; unknown registers read all ones.
        assert c.read(BAR0, 0x00, 2) == b"\xff\xff"
        c.write(BAR0, 0x04, b"\x01\x00")
        assert c.read32(BAR0, 0x04) == ~0xFFFFFFFF & 0xFFFFFFFF
        assert c.read32(BAR0, 0x40) == 0xFFFFFFFF
        c.write(BAR0, 0x80, struct.pack("<Q", 0x1234_5678_9ABC))
        assert read64(c, 0x80) == 0x1234_5678_9ABC


def test_dma_through_an_fd_map_and_the_completion_msi(edu: Served) -> None:
    with edu.client() as c:
        mem = sealed_memfd("guest-ram", 0x10000)
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            c.dma_map(0x100000, 0x10000, mem)
            c.set_irqs(MSI, EVENTFD_TRIGGER, 0, 1, [efd])  # the guest enabled MSI
            pattern = bytes(range(256)) * 2
            os.pwrite(mem, pattern, 0x100)
            for offset, value in ((0x80, 0x100100), (0x88, 0x40000), (0x90, len(pattern)), (0x98, 0x1 | 0x4)):
                c.write(BAR0, offset, struct.pack("<Q", value))
            wait_until(lambda: read64(c, 0x98) & 1 == 0, 10, "the DMA into the buffer to finish")
            assert select.select([efd], [], [], 10)[0], "no completion MSI"
            assert os.eventfd_read(efd) == 1
            assert c.read32(BAR0, 0x24) == 0x100
            c.write32(BAR0, 0x64, 0x100)
            for offset, value in ((0x80, 0x40000), (0x88, 0x100800), (0x90, len(pattern)), (0x98, 0x3)):
                c.write(BAR0, offset, struct.pack("<Q", value))
            wait_until(lambda: read64(c, 0x98) & 1 == 0, 10, "the DMA back to RAM to finish")
            assert read64(c, 0x98) == 0x2  # the direction bit stays, start cleared
            assert os.pread(mem, len(pattern), 0x800) == pattern
            # A transfer outside the 4 KiB buffer is refused, and the device goes on.
            for offset, value in ((0x80, 0x100000), (0x88, 0x40F00), (0x90, 0x200), (0x98, 0x1)):
                c.write(BAR0, offset, struct.pack("<Q", value))
            wait_until(lambda: read64(c, 0x98) & 1 == 0, 10, "the refused DMA to end")
            assert c.read32(BAR0, 0x00) == 0x010000ED
        finally:
            os.close(mem)
            os.close(efd)


def test_dma_by_message_when_memory_has_no_fd(edu: Served) -> None:
    """Guest memory without an fd: the device's DMA becomes DMA_READ / DMA_WRITE messages."""
    with edu.client() as c:
        c.dma_map(0x200000, 0x1000)  # no fd, as QEMU maps ROMs
        for offset, value in ((0x80, 0x200010), (0x88, 0x40000), (0x90, 16), (0x98, 0x1)):
            c.write(BAR0, offset, struct.pack("<Q", value))
        req = c.receive()  # the device's request arrives on the socket, as QEMU would get it
        assert req.header.command == vu.Command.DMA_READ
        address, count = struct.unpack_from("<QQ", req.payload)
        assert (address, count) == (0x200010, 16)
        c.send_raw(vu.build_reply(req.header.id, vu.Command.DMA_READ, req.payload + b"from-the-message"))
        wait_until(lambda: read64(c, 0x98) & 1 == 0, 10, "the DMA to finish")
        for offset, value in ((0x80, 0x40000), (0x88, 0x200100), (0x90, 16), (0x98, 0x3)):
            c.write(BAR0, offset, struct.pack("<Q", value))
        req = c.receive()
        assert req.header.command == vu.Command.DMA_WRITE
        assert req.payload[16:] == b"from-the-message"
        c.send_raw(vu.build_reply(req.header.id, vu.Command.DMA_WRITE, req.payload[:16]))
        wait_until(lambda: read64(c, 0x98) & 1 == 0, 10, "the DMA back to finish")


def test_intx_follows_raise_and_acknowledge(edu: Served) -> None:
    with edu.client() as c:
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            c.set_irqs(vu.PciIrq.INTX, EVENTFD_TRIGGER, 0, 1, [efd])
            c.write32(BAR0, 0x60, 0x1)
            assert select.select([efd], [], [], 5)[0], "no INTx"
            assert os.eventfd_read(efd) == 1
            device = edu.backend.devices["edu0"].device
            assert device.irqs.intx_level
            c.write32(BAR0, 0x64, 0x1)
            wait_until(lambda: not device.irqs.intx_level, 5, "INTx to drop")
        finally:
            os.close(efd)


# -- a user's own class ---------------------------------------------------------------------------


USER_DEVICE = '''
from qbackend.devices import Bar, Device
from qbackend.devices.api import UserFunction, function_of

class Counter(Device):
    vendor_id, device_id = 0x1234, 0x0001
    bars = (Bar(0, 4096), Bar(2, 8192, mappable=True))
    msix_vectors = 4

    def __init__(self, start: str = "0") -> None:
        super().__init__()
        self.value = int(start, 0)

    def bar_read(self, bar, offset, size):
        return self.value + offset

    def bar_write(self, bar, offset, size, value):
        self.value = value
'''


def test_a_class_from_a_file_with_keys_for_its_constructor(tmp_path: Path) -> None:
    path = tmp_path / "mydevice.py"
    path.write_text(textwrap.dedent(USER_DEVICE))
    device = make_device(DeviceOptions.parse(f"socket={tmp_path}/c.sock,class={path}:Counter,start=0x10"))
    function = function_of(device)
    try:
        assert type(device).__name__ == "Counter" and device.value == 0x10  # type: ignore[attr-defined]
        assert function.read(BAR0, 4, 4) == (0x14).to_bytes(4, "little")
        function.write(BAR0, 0, (7).to_bytes(2, "little"))
        assert device.value == 7  # type: ignore[attr-defined]
        assert function.region(2) is not None and function.region(2).mmap_fd is not None  # type: ignore[union-attr]
        assert function.config.msix is not None and function.config.msix.vectors == 4
        assert function.region(5) is not None  # the MSI-X table and PBA
    finally:
        function.close()
    for spec, words in ((f"{path}:Nope", "has no Nope"), (f"{tmp_path}/missing.py:X", "does not exist"),
                        ("no.such.module:X", "cannot import"), (f"{path}:Bar", "not a qbackend.devices.Device")):
        with pytest.raises(UsageError, match=words):
            load_class(spec)
    with pytest.raises(UsageError, match="does not take these keys"):
        make_device(DeviceOptions.parse(f"socket=s,class={path}:Counter,colour=red"))


def test_serve_device_from_the_command_line(tmp_path: Path) -> None:
    sock = tmp_path / f"edu-{uuid.uuid4().hex[:6]}.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "serve", "--device",
                             f"socket={sock},class=examples/edu.py:Edu"], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(sock.exists, 30, "the device's socket")
        with VfioUserClient(sock) as c:
            c.negotiate()
            assert c.read32(BAR0, 0) == 0x010000ED
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0, out
    bad = subprocess.run([sys.executable, "-m", "qbackend", "serve", "--device", "socket=x.sock,class=nowhere:X"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "cannot import nowhere" in bad.stderr and "Traceback" not in bad.stderr


class Plain(Device):
    """A device with a mappable BAR only: its memory is there for the device to read."""

    bars = (Bar(0, 4096, mappable=True),)


def test_mappable_bar_memory_is_shared(tmp_path: Path) -> None:
    device = Plain()
    function = function_of(device)
    try:
        device.bar_memory(0)[0:5] = b"hello"
        assert function.read(BAR0, 0, 5) == b"hello"
        region = function.region(0)
        assert region is not None and region.mmap_fd is not None
        assert os.pread(region.mmap_fd, 5, 0) == b"hello"
    finally:
        function.close()


# -- the public class is its contract; the server's side is apart -----------------------------------

CONTRACT = {
    "vendor_id", "device_id", "class_code", "revision", "subsystem_vendor_id", "subsystem_id",
    "bars", "intx", "msi_vectors", "msix_vectors", "msix_bar", "capabilities", "extended_capabilities",
    "bar_read", "bar_write", "reset", "connected", "disconnected", "reloaded", "save_state", "restore_state",
    "lock", "irq_mode", "raise_irq", "lower_irq", "dma_read", "dma_write", "defer", "bar_memory",
}


def server_side_names() -> set[str]:
    """Every public name of a device's UserFunction (what the server, the native loop,
    the backend and the tests call), class attributes and instance ones."""
    function = function_of(Device())
    try:
        return {name for name in dir(function) if not name.startswith("_")}
    finally:
        function.close()


def test_the_public_class_is_its_contract() -> None:
    assert {name for name in dir(Device) if not name.startswith("_")} == CONTRACT
    assert set(vars(Device())) == {"_Device__function"}  # its one link to the server's side, name-mangled


class Shadow(Device):
    """A device that takes, for its own ends, every name the server's side uses
    (they are added below the class); none may change how it is served."""

    vendor_id, device_id = 0x1234, 0x5AD0
    bars = (Bar(0, 4096), Bar(2, 4096, mappable=True))
    msi_vectors = 1

    def __init__(self) -> None:
        super().__init__()
        self.value = 0
        self.hooks: list[str] = []
        self.shadowed: list[str] = []  # the names of the server's side that were called here

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        return self.value

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.value = value
        Device.raise_irq(self)  # its own raise_irq is one of the shadows

    def reset(self) -> None:  # no super().reset(): config space and interrupts reset all the same
        self.hooks.append("reset")
        self.value = 0

    def connected(self) -> None:
        self.hooks.append("connected")

    def disconnected(self) -> None:
        self.hooks.append("disconnected")


def _shadow(name: str) -> object:
    def method(self: Shadow, *args: object, **kwargs: object) -> str:
        self.shadowed.append(name)
        return f"the device's own {name}"
    return method


for _name in server_side_names() - set(vars(Shadow)):
    setattr(Shadow, _name, _shadow(_name))


def test_a_device_may_name_its_methods_as_the_server_names_its_own(tmp_path: Path, access_path: str) -> None:
    assert {"read", "write", "close", "config", "lock", "name", "regions", "irqs", "region", "plain_windows",
            "client_connected", "client_disconnected", "dma_port", "config_write", "msix_bar_read",
            "intx_asserted", "update_intx"} <= server_side_names()
    assert server_side_names() - {"reset"} <= set(vars(Shadow))
    memfds = memfd_fds()
    device = Shadow()
    backend = Backend()
    served = backend.add_served(device, tmp_path / "shadow.sock", dev_id="shadow")
    function = served.device
    assert isinstance(function, UserFunction) and function.device is device and function.name == "shadow"
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    try:
        with BackendThread(backend):
            with VfioUserClient(served.server.socket_path) as c:
                c.negotiate()
                wait_until(lambda: device.hooks == ["connected"], 5, "connected()")
                config = c.read(CONFIG, 0, 64)
                assert struct.unpack_from("<HH", config, 0) == (0x1234, 0x5AD0)
                fields, _caps, fds = c.region_info(2, 64)  # room for the sparse-mmap capability
                assert len(fds) == 1 and fields[4] == 4096  # the mappable BAR's memory
                os.close(fds[0])
                c.set_irqs(MSI, EVENTFD_TRIGGER, 0, 1, [efd])
                c.write32(BAR0, 0x10, 42)
                assert c.read32(BAR0, 0x10) == 42
                assert select.select([efd], [], [], 5)[0], "no MSI"
                c.write(CONFIG, 4, b"\x06\x00")  # memory space and bus master on
                assert c.read(CONFIG, 4, 2) == b"\x06\x00"
                c.call(vu.Command.DEVICE_RESET)
                assert c.read(CONFIG, 4, 2) == b"\x00\x00"
                assert c.read32(BAR0, 0) == 0
                assert device.hooks == ["connected", "reset"]
                assert function.region_accesses[BAR0] >= 3
            wait_until(lambda: device.hooks[-1:] == ["disconnected"], 5, "disconnected()")
    finally:
        os.close(efd)
    assert device.shadowed == []
    assert memfd_fds() == memfds  # the backend closed the function, and with it the BAR's memory
