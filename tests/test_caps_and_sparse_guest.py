"""Capabilities and a sparse BAR seen from a booted guest: examples/caps_and_sparse.py
(the Mailbox device) served to QEMU 11.1 over vfio-user, on q35 behind the
profile's pcie-root-port (rp1), so that it is a PCI Express endpoint with a
4 KiB config space the guest reaches through ECAM.

The guest's view of config space is read from sysfs (`od` of
/sys/bus/pci/devices/0000:01:00.0/config) and walked here: the standard list
from 0x34 and the extended list from 0x100, as QEMU's vfio-user client lets
the guest see them.  BAR0's page 1 is mapped by QEMU (the sparse-mmap area),
so a guest write there reaches the device's memory with no access message;
page 0 is trapped, and a doorbell write there makes the device read page 1.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from qbackend.app.service import Backend
from qbackend.devices.api import UserFunction
from qbackend.machine.launch import vfio_user_device_arg
from qbackend.options import DeviceOptions
from qbackend.protocol import vfio_user as vu
from qbackend.testing.harness import Guest, Harness, sysfs_pci, wait_until

pytestmark = pytest.mark.guest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "caps_and_sparse.py"
VENDOR, DEVICE = 0x1234, 0x0CA5
SERIAL = 0x0123_4567_89AB_CDEF
PATH = sysfs_pci("01:00.0")  # the only slot of rp1's bus
BAR0 = vu.PciRegion.BAR0


@dataclass
class Rig:
    guest: Guest
    function: UserFunction

    @property
    def device(self):  # type: ignore[no-untyped-def]  # the example's Mailbox (loaded from its file)
        return self.function.device

    def config(self, offset: int = 0, count: int | None = None) -> bytes:
        """The guest's view of the device's config space (all of it that sysfs gives)."""
        window = f"-j{offset} -N{count}" if count is not None else ""
        out = self.guest.sh(f"od -An -v -tx1 {window} {PATH}/config", timeout=60)
        return bytes(int(byte, 16) for byte in out.split())

    def write_config(self, offset: int, data: bytes) -> None:
        """Write config space as the guest's root does through sysfs (byte by byte)."""
        octal = "".join(f"\\{byte:03o}" for byte in data)
        self.guest.sh(f"printf '{octal}' | dd of={PATH}/config bs=1 seek={offset} count={len(data)} "
                      "conv=notrunc 2>/dev/null")

    def accesses(self) -> tuple[int, int]:
        """BAR0 accesses the server handled, and the device's own count of its callbacks."""
        return self.function.region_accesses[BAR0], self.device.accesses


@pytest.fixture(scope="module")
def rig(harness: Harness) -> Iterator[Rig]:
    backend = Backend()
    served = backend.add_device(DeviceOptions.parse(
        f"socket={harness.workdir / 'mbox.sock'},class={EXAMPLE}:Mailbox,id=mbox0"))
    harness.serve(backend)
    arg = vfio_user_device_arg("mbox0", served.server.socket_path, bus="rp1", addr="0x0", rombar=0)
    guest = harness.guest("caps", machine="q35", extra_args=["-device", arg])
    function = served.device
    assert isinstance(function, UserFunction)
    yield Rig(guest, function)


def std_caps(config: bytes) -> dict[int, int]:
    """Capability id -> offset, walking the list from 0x34 (bounded against loops)."""
    assert struct.unpack_from("<H", config, 6)[0] & 0x10, "status: no capability list"
    caps: dict[int, int] = {}
    at = config[0x34]
    for _ in range(48):
        if not at:
            return caps
        assert 0x40 <= at < 0x100 and at % 4 == 0, f"capability pointer {at:#x}"
        caps.setdefault(config[at], at)
        at = config[at + 1]
    raise AssertionError("the capability list loops")


def ext_caps(config: bytes) -> dict[int, tuple[int, int]]:
    """Extended capability id -> (offset, version), walking the list from 0x100."""
    caps: dict[int, tuple[int, int]] = {}
    at = 0x100
    for _ in range(960):
        header = struct.unpack_from("<I", config, at)[0]
        if header == 0:
            return caps
        caps.setdefault(header & 0xFFFF, (at, header >> 16 & 0xF))
        at = header >> 20
        if not at:
            return caps
        assert 0x100 <= at < 0x1000 and at % 4 == 0, f"extended capability pointer {at:#x}"
    raise AssertionError("the extended capability list loops")


def test_guest_sees_the_capabilities(rig: Rig) -> None:
    assert f"01:00.0 ff00: {VENDOR:04x}:{DEVICE:04x}" in rig.guest.sh("lspci").splitlines()
    config = rig.config()
    assert len(config) == 4096, "the kernel sees no extended config space"
    # QEMU 11.1 shows the guest the list as the device lays it out: nothing hidden, nothing added.
    caps = std_caps(config)
    assert caps == {0x05: 0x40, 0x01: 0x50, 0x10: 0x58, 0x09: 0x94}, caps
    pm = caps[0x01]
    pmc, pmcsr = struct.unpack_from("<HH", config, pm + 2)
    assert pmc & 0x7 == 3 and pmc & 0x600 == 0  # PM 1.2; D1, D2 not supported
    assert pmcsr & 0x3 == 0 and pmcsr & 0x8  # D0, No_Soft_Reset
    exp = caps[0x10]
    flags, devcap = struct.unpack_from("<HI", config, exp + 2)
    assert flags & 0xF == 2 and flags >> 4 & 0xF == 0  # version 2, endpoint
    assert devcap & 0x7 == 1 and devcap & 1 << 15  # 256-byte payloads, role-based errors
    lnkcap, _lnkctl, lnksta = struct.unpack_from("<IHH", config, exp + 0x0C)
    assert (lnkcap & 0xF, lnkcap >> 4 & 0x3F) == (2, 4) == (lnksta & 0xF, lnksta >> 4 & 0x3F)  # 5 GT/s x4
    vendor = caps[0x09]
    assert config[vendor + 2] == 3 + 16 and config[vendor + 3:vendor + 19] == b"qbackend-mailbox"
    assert ext_caps(config) == {0x0003: (0x100, 1)}
    assert struct.unpack_from("<Q", config, 0x104)[0] == SERIAL
    # The guest's view equals the device's, byte for byte, but for what the
    # firmware and kernel wrote (command, BAR0, interrupt line).
    mine = bytes(rig.function.config.data)
    differ = [i for i in range(4096) if config[i] != mine[i]]
    assert set(differ) <= {0x04, 0x05, 0x10, 0x11, 0x12, 0x13, 0x3C}, [hex(i) for i in differ]


def test_writable_fields_as_the_spec_says(rig: Rig) -> None:
    config = rig.config()
    caps = std_caps(config)
    pmcsr, devctl, devsta = caps[0x01] + 4, caps[0x10] + 8, caps[0x10] + 0x0A
    model = rig.function.config
    try:
        rig.write_config(pmcsr, b"\x03")  # D3hot
        assert rig.config(pmcsr, 1)[0] & 0x3 == 3 and model.power_state == 3
        rig.write_config(pmcsr, b"\x01")  # D1: not supported, so the write changes nothing
        assert rig.config(pmcsr, 1)[0] & 0x3 == 3 and model.power_state == 3
    finally:
        rig.write_config(pmcsr, b"\x00")
    assert rig.config(pmcsr, 1)[0] & 0x3 == 0 and model.power_state == 0
    # Device Control: max payload 256 (bits 7:5 = 1) on top of the defaults; its
    # reserved/unsupported bits (extended tags, FLR) stay zero.
    before = struct.unpack("<H", rig.config(devctl, 2))[0]
    rig.write_config(devctl, struct.pack("<H", 0xFFFF))
    assert struct.unpack("<H", rig.config(devctl, 2))[0] == 0x78FF
    rig.write_config(devctl, struct.pack("<H", before & ~0xE0 | 0x20))
    assert struct.unpack("<H", rig.config(devctl, 2))[0] == before & ~0xE0 | 0x20
    # Read-only: the capabilities, the vendor bytes, the serial number, the list pointers.
    for offset in (caps[0x10] + 4, caps[0x09] + 4, 0x104, 0x34, caps[0x01] + 1, 0x100):
        was = rig.config(offset, 1)
        rig.write_config(offset, bytes([was[0] ^ 0xFF]))
        assert rig.config(offset, 1) == was, f"config byte {offset:#x} is writable"
    assert struct.unpack("<H", rig.config(devsta, 2))[0] & 0xF == 0


def test_sparse_bar_mapped_page_and_trapped_registers(rig: Rig) -> None:
    bar0, size = rig.guest.bar(PATH, 0)
    assert size == 0x2000
    assert rig.guest.devmem(bar0) == 0x4D424F58  # ID: a trapped read
    memory = rig.device.bar_memory(0)
    message = b"hello from the guest, through mapped memory!"  # 44 bytes: 11 words
    before = rig.accesses()
    for i in range(0, len(message), 4):
        rig.guest.devmem(bar0 + 0x1000 + i, 32, int.from_bytes(message[i:i + 4], "little"))
    # The words are in the device's memory, and no access reached the device.
    assert bytes(memory[0x1000:0x1000 + len(message)]) == message
    assert rig.guest.devmem(bar0 + 0x1000, 32) == int.from_bytes(message[:4], "little")
    assert rig.accesses() == before, "a mapped-page access was trapped"
    # The doorbell is trapped: the device reads the mailbox.
    rings = rig.device.rings
    rig.guest.devmem(bar0 + 0x04, 32, len(message))
    wait_until(lambda: rig.device.rings == rings + 1, 10, "the doorbell")
    assert rig.device.message == message
    assert rig.guest.devmem(bar0 + 0x08) == len(message)
    assert rig.guest.devmem(bar0 + 0x0C) == zlib.crc32(message)
    assert rig.guest.devmem(bar0 + 0x04) == rings + 1
    assert rig.accesses()[1] == before[1] + 4  # the doorbell and three register reads
    # The device writes its memory; the guest reads it through the mapping.
    memory[0x1800:0x1804] = b"\xde\xc0\xad\x0b"
    assert rig.guest.devmem(bar0 + 0x1800) == 0x0BADC0DE
    assert rig.accesses()[1] == before[1] + 4
