"""Capabilities a device declares and sparse BARs, without a guest: the config
space model (layout, the two lists, read-only / writable / write-one-to-clear
bits, power-on values), the device API's declarations, and the vfio-user
side (a 4 KiB config region; REGION_INFO with the sparse-mmap capability,
parsed by the raw client) against examples/caps_and_sparse.py."""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend
from qbackend.devices import Bar, Device, DeviceSerialNumber, PciExpress, PowerManagement, VendorSpecific
from qbackend.devices.api import function_of
from qbackend.errors import DeviceError
from qbackend.models.pci_config import Bar as ConfigBar
from qbackend.models.pci_config import ConfigSpace, MsiLayout, MsixLayout
from qbackend.options import DeviceOptions
from qbackend.protocol import vfio_user as vu
from qbackend.testing.vfio_user_client import ClientError, VfioUserClient

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "caps_and_sparse.py"
CONFIG = vu.PciRegion.CONFIG
BAR0 = vu.PciRegion.BAR0


def space(**kwargs: object) -> ConfigSpace:
    return ConfigSpace(vendor_id=0x1234, device_id=0x5678, class_code=0xFF0000, **kwargs)  # type: ignore[arg-type]


def u16(config: ConfigSpace, offset: int) -> int:
    value: int = struct.unpack_from("<H", config.data, offset)[0]
    return value


def u32(config: ConfigSpace, offset: int) -> int:
    value: int = struct.unpack_from("<I", config.data, offset)[0]
    return value


def chain(config: ConfigSpace) -> list[tuple[int, int]]:
    """(offset, id) of the standard list, in order."""
    out, at = [], config.data[0x34]
    while at:
        out.append((at, config.data[at]))
        at = config.data[at + 1]
    return out


def ext_chain(config: ConfigSpace) -> list[tuple[int, int, int]]:
    """(offset, id, version) of the extended list, in order."""
    out, at = [], 0x100
    while at:
        header = u32(config, at)
        if not header:
            break
        out.append((at, header & 0xFFFF, header >> 16 & 0xF))
        at = header >> 20
    return out


def full() -> ConfigSpace:
    return space(bars=(ConfigBar(0, 4096), ConfigBar(2, 4096)), interrupt_pin=1,
                 msix=MsixLayout(4, 2), msi=MsiLayout(1),
                 capabilities=(PowerManagement(pme_support=0x18), PciExpress(256, link_speed=3, link_width=8),
                               VendorSpecific(b"abc"), VendorSpecific(b"second")),
                 extended_capabilities=(DeviceSerialNumber(0x1122334455667788),))


# -- the model ---------------------------------------------------------------------------------


PM, EXP, VENDOR = 0x5C, 0x64, 0xA0  # where full() has them (after MSI-X at 0x40, 64-bit MSI at 0x4C)


def test_layout_and_both_lists() -> None:
    config = full()
    assert config.size == 4096 and len(config.data) == len(config.wmask) == len(config.w1cmask) == 4096
    assert u16(config, 6) & 0x10  # status: capability list
    assert chain(config) == [(0x40, 0x11), (0x4C, 0x05), (PM, 0x01), (EXP, 0x10), (VENDOR, 0x09), (0xA8, 0x09)]
    assert config.caps == {0x11: 0x40, 0x05: 0x4C, 0x01: PM, 0x10: EXP, 0x09: VENDOR}
    assert config.data[VENDOR + 2] == 6 and bytes(config.data[VENDOR + 3:VENDOR + 6]) == b"abc"
    assert config.data[0xAA] == 9 and bytes(config.data[0xAB:0xB1]) == b"second"
    assert ext_chain(config) == [(0x100, 0x0003, 1)]
    assert struct.unpack_from("<Q", config.data, 0x104)[0] == 0x1122334455667788
    # PM 1.2 with PME from D3hot and D3cold; D0; No_Soft_Reset.
    assert u16(config, PM + 2) == 3 | 0x18 << 11 and u16(config, PM + 4) == 0x0008
    # PCIe v2 endpoint: 256-byte payloads; 8 GT/s x8, every speed up to it in Link Capabilities 2.
    assert u16(config, EXP + 2) == 0x0002 and u32(config, EXP + 4) == 1 << 15 | 1
    assert u32(config, EXP + 0x0C) & 0x3FF == 8 << 4 | 3 and u16(config, EXP + 0x12) == 8 << 4 | 3
    assert u32(config, EXP + 0x2C) == 0b1110 and u16(config, EXP + 8) == 0x2810


def test_extended_list_is_chained_and_config_is_256_bytes_without_pcie() -> None:
    assert space().size == 256 and space(capabilities=(PowerManagement(),)).size == 256
    assert space().data[0x34] == 0 and not u16(space(), 6) & 0x10  # no capabilities, no list
    config = space(capabilities=(PciExpress(),),
                   extended_capabilities=(DeviceSerialNumber(1), DeviceSerialNumber(2))[:1])
    assert ext_chain(config) == [(0x100, 3, 1)] and u32(config, 0x100) >> 20 == 0
    bare = space(capabilities=(PciExpress(),))
    assert bare.size == 4096 and u32(bare, 0x100) == 0  # 4 KiB, no extended capability
    with pytest.raises(ValueError, match="need a PCI Express"):
        space(extended_capabilities=(DeviceSerialNumber(1),))
    with pytest.raises(ValueError, match="more than one PowerManagement"):
        space(capabilities=(PowerManagement(), PowerManagement()))
    with pytest.raises(ValueError, match="more than one DeviceSerialNumber"):
        space(capabilities=(PciExpress(),), extended_capabilities=(DeviceSerialNumber(1), DeviceSerialNumber(2)))
    with pytest.raises(ValueError, match="does not fit below 0x100"):
        space(capabilities=tuple(VendorSpecific(bytes(200)) for _ in range(2)))
    for bad in (lambda: PciExpress(max_payload=100), lambda: PciExpress(link_width=3),
                lambda: PciExpress(link_speed=0), lambda: VendorSpecific(bytes(253)),
                lambda: DeviceSerialNumber(1 << 64), lambda: PowerManagement(pme_support=0x20)):
        with pytest.raises(ValueError):
            bad()


def test_read_only_fields_stay() -> None:
    config = full()
    before = bytes(config.data)
    # Headers, next pointers, PMC, Device/Link Capabilities (1, 2), Link Status, the
    # vendor bytes, the serial number and the extended header: all read-only.
    for offset in (0x34, PM, PM + 1, PM + 2, PM + 3, EXP, EXP + 1, EXP + 2, EXP + 4, EXP + 5, EXP + 0x0C,
                   EXP + 0x12, EXP + 0x24, EXP + 0x2C, VENDOR + 1, VENDOR + 2, VENDOR + 3, 0xAB,
                   0x100, 0x102, 0x103, 0x104, 0x10B):
        config.write(offset, b"\xff")
        config.write(offset, b"\x00")
    assert bytes(config.data) == before


def test_writable_fields_as_the_specs_say() -> None:
    config = full()
    pmcsr, devctl, devsta, lnkctl, devctl2 = PM + 4, EXP + 8, EXP + 0x0A, EXP + 0x10, EXP + 0x28
    config.write(pmcsr, b"\x03\x01")  # D3hot, PME_En (PME is supported)
    assert config.power_state == 3 and u16(config, pmcsr) == 0x0108 | 3
    config.write(pmcsr, b"\x01")  # D1 is not supported: dropped, D3hot stays
    assert config.power_state == 3
    config.write(pmcsr, b"\x02")  # neither is D2
    assert config.power_state == 3
    config.write(pmcsr, b"\x00")
    assert config.power_state == 0
    config.data[pmcsr + 1] |= 0x80  # the device signalled PME
    config.write(pmcsr + 1, b"\x81")  # write one to clear PME_Status (PME_En kept)
    assert u16(config, pmcsr) & 0x8000 == 0 and u16(config, pmcsr) & 0x0100
    config.write(devctl, b"\xff\xff")
    assert u16(config, devctl) == 0x78FF  # no extended tags, phantom functions, aux power or FLR
    config.write(devctl, struct.pack("<H", 0x1020))
    assert u16(config, devctl) == 0x1020
    config.data[devsta] = 0x3F  # errors detected, aux power, transactions pending
    config.write(devsta, b"\x05\x00")
    assert config.data[devsta] == 0x3A  # 0 and 2 cleared; 4 and 5 are read-only
    config.write(lnkctl, b"\xff\xff")
    assert u16(config, lnkctl) == 0x00CB
    config.write(devctl2, b"\xff\xff")
    assert u16(config, devctl2) == 0x0010
    # A reset puts power-on values back: D0, PME off, Device Control's defaults.
    config.reset()
    assert u16(config, pmcsr) == 0x0008 and u16(config, devctl) == 0x2810
    assert u16(config, lnkctl) == 0 and u16(config, devctl2) == 0 and config.data[devsta] == 0x30


def test_pm_without_d1_d2_and_with_them() -> None:
    config = space(capabilities=(PowerManagement(d1=True, d2=True),))
    pm = config.caps[0x01]
    assert u16(config, pm + 2) & 0x600 == 0x600 and config.wmask[pm + 5] == 0  # no PME: PME_En read-only
    for state in (1, 2, 3, 0):
        config.write(pm + 4, bytes([state]))
        assert config.power_state == state
    assert space().power_state == 0


def test_msi_and_msix_still_work_beside_the_new_capabilities() -> None:
    config = full()
    assert config.msix_cap == 0x40 and config.msi_cap == 0x4C
    config.write(0x42, struct.pack("<H", 0x8000))
    config.write(0x4E, b"\x01")
    assert config.msix_enabled and config.msi_enabled


# -- the device API --------------------------------------------------------------------------


class Sparse(Device):
    bars = (Bar(0, 0x4000, mappable_areas=((0x1000, 0x1000), (0x3000, 0x1000))),)
    capabilities = (PciExpress(),)

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int, int]] = []

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        self.calls.append(("read", offset, size))
        return 0xAB

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.calls.append(("write", offset, size))


def test_sparse_bar_traps_registers_and_shares_its_areas() -> None:
    device = Sparse()
    function = function_of(device)
    try:
        region = function.region(0)
        assert region is not None and region.mmap_fd is not None
        assert region.sparse_areas == ((0x1000, 0x1000), (0x3000, 0x1000))
        assert region.flags == vu.RegionFlags.READ | vu.RegionFlags.WRITE | vu.RegionFlags.MMAP
        memory = device.bar_memory(0)
        assert len(memory) == 0x4000
        function.write(BAR0, 0x1010, b"mail")  # inside an area: the memory, no callback
        assert memory[0x1010:0x1014] == b"mail" and os.pread(region.mmap_fd, 4, 0x1010) == b"mail"
        assert function.read(BAR0, 0x3000, 4) == bytes(4) and device.calls == []
        function.write(BAR0, 0x10, b"\x01\x00\x00\x00")  # outside: the device
        assert function.read(BAR0, 0x2000, 1) == b"\xab"
        assert device.calls == [("write", 0x10, 4), ("read", 0x2000, 1)]
        device.calls.clear()
        memory[0x1000:0x1004] = b"WXYZ"
        # An access across a border is cut there.
        assert function.read(BAR0, 0xFFE, 4) == b"\xab\x00" + b"WX"  # a 2-byte read of 0xab, then memory
        assert device.calls == [("read", 0xFFE, 2)]
        # Mapped from the fd, the guest's view and the device's are one memory.
        shared = mmap.mmap(region.mmap_fd, 0x4000)
        try:
            shared[0x3FFC:0x4000] = b"last"
            assert bytes(memory[0x3FFC:0x4000]) == b"last"
        finally:
            shared.close()
    finally:
        function.close()
    assert function.config.size == 4096 and function.region_size(CONFIG) == 4096


def test_bad_mappable_areas_are_refused() -> None:
    for areas, words in ((((0x800, 0x1000),), "not whole pages"), (((0x1000, 0x800),), "not whole pages"),
                         (((0x1000, 0x1000), (0x1000, 0x1000)), "overlaps"), (((0x1000, 0x2000),), "ends past"),
                         (((0, 0),), "not whole pages")):
        with pytest.raises(DeviceError, match=words):
            Bar(0, 0x2000, mappable_areas=areas)
    with pytest.raises(DeviceError, match="not mappable as a whole"):
        Bar(0, 0x2000, mappable=True, mappable_areas=((0, 0x1000),))
    with pytest.raises(DeviceError, match="not mappable as a whole"):
        Bar(0, 0x2000, io=True, mappable_areas=((0, 0x1000),))


def test_whole_mappable_bar_unchanged() -> None:
    class Whole(Device):
        bars = (Bar(2, 8192, mappable=True),)

    function = function_of(Whole())
    try:
        region = function.region(2)
        assert region is not None and region.sparse_areas == ((0, 8192),)
        assert function.config.size == 256
    finally:
        function.close()


# -- over vfio-user: the raw client --------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Backend, Path]]:
    sock = tmp_path_factory.mktemp("mbox") / "mbox.sock"
    backend = Backend()
    backend.add_device(DeviceOptions.parse(f"socket={sock},class={EXAMPLE}:Mailbox,id=mbox0"))
    with BackendThread(backend):
        yield backend, sock


def client(sock: Path) -> VfioUserClient:
    c = VfioUserClient(sock)
    c.negotiate()
    return c


def test_region_info_carries_the_sparse_areas(served: tuple[Backend, Path]) -> None:
    _backend, sock = served
    with client(sock) as c:
        # Asked with argsz 32 (as QEMU first asks): the fixed part, the full size, no fd.
        fields, caps, fds = c.region_info(0)
        assert fields[0] == 32 + 8 + 8 + 16 and caps == b"" and fds == []
        assert vu.RegionFlags(fields[1]) & vu.RegionFlags.CAPS and fields[3] == 32
        info, fds = c.region_info_full(0)
        try:
            assert len(fds) == 1
            assert info == vu.RegionInfo(64, vu.RegionFlags.READ | vu.RegionFlags.WRITE | vu.RegionFlags.MMAP
                                         | vu.RegionFlags.CAPS, 0, 0x2000, 0, ((0x1000, 0x1000),))
            # The fd is the BAR's memory: a write into it is what the device reads.
            os.pwrite(fds[0], b"mapped", 0x1000)
        finally:
            for fd in fds:
                os.close(fd)
        c.write32(BAR0, 0x04, 6)  # the doorbell (trapped)
        assert c.read32(BAR0, 0x08) == 6
        config_info, fds = c.region_info_full(CONFIG)
        assert fds == [] and config_info.size == 4096 and config_info.sparse_areas == ()
        assert c.read32(CONFIG, 0x100) == 0x0001_0003 and struct.unpack("<Q", c.read(CONFIG, 0x104, 8))[0] \
            == 0x0123_4567_89AB_CDEF
        with pytest.raises(ClientError, match="Invalid argument"):
            c.read(CONFIG, 0xFFC, 8)
        c.write(CONFIG, 0x104, b"\xff")  # the serial number is read-only
        assert c.read(CONFIG, 0x104, 1) == b"\xef"


def reply_with(areas: tuple[tuple[int, int], ...]) -> bytes:
    return vu.region_info_payload(1024, 2, vu.RegionFlags.READ | vu.RegionFlags.MMAP, 0x10000, 0, areas)


@given(st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)), max_size=8))
def test_region_info_round_trip(areas: list[tuple[int, int]]) -> None:
    payload = reply_with(tuple(areas))
    info = vu.RegionInfo.unpack(payload)
    assert info.sparse_areas == tuple(areas) and info.size == 0x10000 and info.index == 2
    assert bool(info.flags & vu.RegionFlags.CAPS) == bool(areas)
    assert vu.RegionInfo.unpack(payload + b"trailing") == info


def test_region_info_cut_short_and_broken() -> None:
    payload = reply_with(((0, 0x1000), (0x2000, 0x1000)))
    # Cut to what a small argsz holds: the fixed part, no areas; shorter than that: an error.
    assert vu.RegionInfo.unpack(payload[:32]).sparse_areas == ()
    for n in range(32):
        with pytest.raises(vu.ProtocolError):
            vu.RegionInfo.unpack(payload[:n])
    # The whole argsz present but an area missing; a chain that loops; a cap inside the fixed part.
    more = bytearray(payload)
    struct.pack_into("=I", more, 32 + vu.CAP_HEADER.size, 3)  # three areas said, two there
    with pytest.raises(vu.ProtocolError, match="do not fit"):
        vu.RegionInfo.unpack(bytes(more))
    looped = bytearray(payload)
    struct.pack_into("=I", looped, 32 + 4, 32)
    with pytest.raises(vu.ProtocolError, match="loops"):
        vu.RegionInfo.unpack(bytes(looped))
    inside = bytearray(payload)
    struct.pack_into("=I", inside, 12, 8)
    with pytest.raises(vu.ProtocolError):
        vu.RegionInfo.unpack(bytes(inside))


@given(st.binary(max_size=200))
def test_region_info_garbage_parses_or_is_a_protocol_error(data: bytes) -> None:
    try:
        vu.RegionInfo.unpack(data)
    except vu.ProtocolError:
        pass
