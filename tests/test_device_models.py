"""Unit tests of the device models: config space, ivshmem registers and
device, interrupt delivery through eventfds, and the DMA map table.

No sockets and no QEMU.  Eventfds and memfds are real, so a test can tell
whether an interrupt was delivered and whether an fd was closed.
"""

from __future__ import annotations

import errno as E
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.devices.ivshmem import IvshmemDevice
from qbackend.ivshmem.group import PeerGroup
from qbackend.models.ivshmem import DOORBELL, INTR_MASK, INTR_STATUS, IV_POSITION, IvshmemRegisters
from qbackend.models.pci_config import (
    CAP_ID_MSIX,
    MSIX_ENABLE,
    MSIX_FUNCTION_MASK,
    Bar,
    Command,
    ConfigSpace,
    MsixLayout,
    Reg,
    Status,
)
from qbackend.plumbing.peer_memory import sealed_memfd
from qbackend.plumbing.shared_memory import SharedMemory
from qbackend.protocol.vfio_user import (
    IRQ_SET,
    DmaMap,
    DmaMapFlags,
    DmaUnmap,
    DmaUnmapFlags,
    IrqSetFlags,
    PciIrq,
    PciRegion,
    RequestError,
    SetIrqs,
    parse_body,
)
from qbackend.protocol.vfio_user import Command as VfioCommand
from qbackend.vfio.dma import DmaError, DmaTable
from qbackend.vfio.irqs import InterruptController

VENDOR, DEVICE = 0x1AF4, 0x1110
TRIGGER_EVENTFD = IrqSetFlags.DATA_EVENTFD | IrqSetFlags.ACTION_TRIGGER
TRIGGER_NONE = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_TRIGGER
MASK = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_MASK
UNMASK = IrqSetFlags.DATA_NONE | IrqSetFlags.ACTION_UNMASK
PBA = 0x800


# -- helpers -------------------------------------------------------------------


def u32(value: int) -> bytes:
    return value.to_bytes(4, "little")


def le(data: bytes) -> int:
    return int.from_bytes(data, "little")


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == E.EBADF
        return False
    return True


def eventfd_count(fd: int) -> int:
    """Read (and reset) an eventfd's counter; 0 if nothing was signalled."""
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


def set_irqs_request(flags: int, index: int, start: int, count: int, nfds: int) -> SetIrqs:
    """A SET_IRQS body as the wire parser produces it."""
    body = parse_body(VfioCommand.DEVICE_SET_IRQS, IRQ_SET.pack(IRQ_SET.size, flags, index, start, count), nfds)
    assert isinstance(body, SetIrqs)
    return body


class Eventfds:
    """Eventfds for a test; the test keeps a dup of each to read it."""

    def __init__(self) -> None:
        self.owned: list[int] = []

    def make(self, n: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """n eventfds to hand over, and dups of them for the test to read."""
        given_fds, mine = [], []
        for _ in range(n):
            fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            given_fds.append(fd)
            mine.append(os.dup(fd))
        self.owned += mine
        return tuple(given_fds), tuple(mine)

    def close(self) -> None:
        for fd in self.owned:
            os.close(fd)


@pytest.fixture
def efds() -> Iterator[Eventfds]:
    box = Eventfds()
    yield box
    box.close()


@pytest.fixture
def group() -> Iterator[PeerGroup]:
    memory = SharedMemory(4096)
    yield PeerGroup(memory)
    memory.close()


def make_device(group: PeerGroup, vectors: int = 0) -> Iterator[IvshmemDevice]:
    device = IvshmemDevice(group, vectors=vectors)
    yield device
    device.irqs.close()
    device.close()


@pytest.fixture
def plain(group: PeerGroup) -> Iterator[IvshmemDevice]:
    """ivshmem without MSI-X: doorbells go to IntrStatus and INTx."""
    yield from make_device(group, 0)


@pytest.fixture
def msix_dev(group: PeerGroup) -> Iterator[IvshmemDevice]:
    yield from make_device(group, 2)


def config_write(device: IvshmemDevice, offset: int, size: int, value: int) -> None:
    device.write(PciRegion.CONFIG, offset, value.to_bytes(size, "little"))


def config_read(device: IvshmemDevice, offset: int, size: int) -> int:
    return le(device.read(PciRegion.CONFIG, offset, size))


# -- ConfigSpace ---------------------------------------------------------------


def make_config(**kwargs: object) -> ConfigSpace:
    defaults: dict[str, object] = {
        "vendor_id": VENDOR, "device_id": DEVICE, "class_code": 0x050000, "revision": 1,
        "subsystem_vendor_id": 0x1234, "subsystem_id": 0x5678,
        "bars": (Bar(0, 256), Bar(1, 4096), Bar(2, 1 << 20, is_64bit=True, prefetchable=True)),
        "interrupt_pin": 1, "msix": MsixLayout(vectors=4, bar=1),
    }
    defaults.update(kwargs)
    return ConfigSpace(**defaults)  # type: ignore[arg-type]


def cfg_read(cfg: ConfigSpace, offset: int, size: int) -> int:
    return le(cfg.read(offset, size))


def test_config_ids_are_read_only() -> None:
    cfg = make_config()
    before = cfg.read(0, 0x10)
    for offset in (Reg.VENDOR_ID, Reg.DEVICE_ID, Reg.REVISION, Reg.CLASS_PROG, Reg.HEADER_TYPE):
        cfg.write(offset, b"\xff\xff")
    cfg.write(Reg.SUBSYSTEM_VENDOR_ID, u32(0xFFFFFFFF))
    cfg.write(Reg.INTERRUPT_PIN, b"\x04")
    assert cfg_read(cfg, Reg.VENDOR_ID, 2) == VENDOR
    assert cfg_read(cfg, Reg.DEVICE_ID, 2) == DEVICE
    assert cfg_read(cfg, Reg.REVISION, 1) == 1
    assert cfg_read(cfg, Reg.CLASS_PROG, 3) == 0x050000
    assert cfg_read(cfg, Reg.SUBSYSTEM_VENDOR_ID, 4) == 0x5678_1234
    assert cfg_read(cfg, Reg.INTERRUPT_PIN, 1) == 1
    assert cfg.read(0, 4) == before[:4]
    assert cfg.read(8, 4) == before[8:12]


def test_config_writable_registers_take_writes() -> None:
    cfg = make_config()
    cfg.write(Reg.INTERRUPT_LINE, b"\x0b")
    cfg.write(Reg.CACHE_LINE_SIZE, b"\x10")
    assert cfg_read(cfg, Reg.INTERRUPT_LINE, 1) == 0x0B
    assert cfg_read(cfg, Reg.CACHE_LINE_SIZE, 1) == 0x10
    cfg.write(Reg.COMMAND, (Command.MEMORY | Command.MASTER).to_bytes(2, "little"))
    assert cfg.command == Command.MEMORY | Command.MASTER
    assert cfg.bus_master


def test_bar_sizing_32bit() -> None:
    cfg = make_config()
    cfg.write(Reg.BAR0, u32(0xFFFFFFFF))
    assert cfg_read(cfg, Reg.BAR0, 4) == (~(256 - 1)) & 0xFFFFFFFF
    cfg.write(Reg.BAR0, u32(0xFEBC1234))
    assert cfg_read(cfg, Reg.BAR0, 4) == 0xFEBC1200  # address bits below the size read as zero


def test_bar_sizing_64bit_prefetchable() -> None:
    size = 1 << 20
    cfg = make_config()
    bar2 = Reg.BAR0 + 8
    assert cfg_read(cfg, bar2, 4) & 0xF == 0xC  # 64-bit, prefetchable, memory
    cfg.write(bar2, u32(0xFFFFFFFF))
    cfg.write(bar2 + 4, u32(0xFFFFFFFF))
    assert cfg_read(cfg, bar2, 4) == ((~(size - 1)) & 0xFFFFFFFF) | 0xC
    assert cfg_read(cfg, bar2 + 4, 4) == 0xFFFFFFFF
    assert cfg_read(cfg, bar2, 8) == ((~(size - 1)) & (2**64 - 1)) | 0xC


def test_bar_sizing_64bit_above_4g() -> None:
    size = 8 << 30
    cfg = make_config(bars=(Bar(2, size, is_64bit=True, prefetchable=True),), msix=None)
    bar2 = Reg.BAR0 + 8
    cfg.write(bar2, u32(0xFFFFFFFF))
    cfg.write(bar2 + 4, u32(0xFFFFFFFF))
    assert cfg_read(cfg, bar2, 4) == 0xC
    assert cfg_read(cfg, bar2 + 4, 4) == 0xFFFFFFFE


def test_undeclared_bar_is_zero_and_read_only() -> None:
    cfg = make_config()
    cfg.write(Reg.BAR0 + 16, u32(0xFFFFFFFF))  # BAR4
    assert cfg_read(cfg, Reg.BAR0 + 16, 4) == 0
    # BAR3, the upper half of 64-bit BAR2, only takes size-aligned bits (all, for 1 MiB).
    assert cfg_read(cfg, Reg.BAR0 + 12, 4) == 0


def test_bad_bar_declarations_are_refused() -> None:
    with pytest.raises(ValueError):
        Bar(0, 100)
    with pytest.raises(ValueError):
        make_config(bars=(Bar(5, 4096, is_64bit=True),), msix=None)
    with pytest.raises(ValueError):
        make_config(bars=(Bar(0, 256),), msix=MsixLayout(vectors=1, bar=1))


def test_intx_disable_is_writable_only_with_a_pin() -> None:
    with_pin = make_config(interrupt_pin=1)
    with_pin.write(Reg.COMMAND, int(Command.INTX_DISABLE).to_bytes(2, "little"))
    assert with_pin.intx_disabled

    no_pin = make_config(interrupt_pin=0)
    no_pin.write(Reg.COMMAND, int(Command.INTX_DISABLE | Command.MEMORY).to_bytes(2, "little"))
    assert not no_pin.intx_disabled
    assert no_pin.command == Command.MEMORY
    # No I/O BAR: the I/O enable bit is read-only too.
    no_pin.write(Reg.COMMAND, int(Command.IO).to_bytes(2, "little"))
    assert no_pin.command == 0


def test_status_error_bits_are_write_one_to_clear() -> None:
    cfg = make_config()
    errors = Status.SIG_TARGET_ABORT | Status.REC_MASTER_ABORT | Status.DETECTED_PARITY
    cfg.data[Reg.STATUS:Reg.STATUS + 2] = (cfg_read(cfg, Reg.STATUS, 2) | errors).to_bytes(2, "little")
    cfg.set_interrupt_status(True)
    cfg.write(Reg.STATUS, b"\x00\x00")  # writing zero changes nothing
    assert cfg_read(cfg, Reg.STATUS, 2) == Status.CAP_LIST | Status.INTERRUPT | errors
    cfg.write(Reg.STATUS, int(Status.REC_MASTER_ABORT).to_bytes(2, "little"))
    assert cfg_read(cfg, Reg.STATUS, 2) == Status.CAP_LIST | Status.INTERRUPT | (errors & ~Status.REC_MASTER_ABORT)
    cfg.write(Reg.STATUS, b"\xff\xff")  # read-only bits survive a write of all ones
    assert cfg_read(cfg, Reg.STATUS, 2) == Status.CAP_LIST | Status.INTERRUPT


def test_msix_capability_and_control_bits() -> None:
    cfg = make_config()
    cap = cfg_read(cfg, Reg.CAPABILITY_LIST, 1)
    assert cap == cfg.msix_cap != 0
    assert cfg_read(cfg, cap, 1) == CAP_ID_MSIX
    assert cfg_read(cfg, cap + 2, 2) == 3  # table size N-1, not enabled
    assert cfg_read(cfg, cap + 4, 4) == 0 | 1  # table at offset 0 of BAR1
    assert cfg_read(cfg, cap + 8, 4) == 0x800 | 1  # PBA at 0x800 of BAR1
    assert not cfg.msix_enabled and not cfg.msix_function_masked

    cfg.write(cap + 2, (MSIX_ENABLE | 0x7FF).to_bytes(2, "little"))
    assert cfg.msix_enabled and not cfg.msix_function_masked
    assert cfg_read(cfg, cap + 2, 2) == MSIX_ENABLE | 3  # table size is read-only
    cfg.write(cap + 2, (MSIX_ENABLE | MSIX_FUNCTION_MASK).to_bytes(2, "little"))
    assert cfg.msix_enabled and cfg.msix_function_masked
    cfg.write(cap + 2, b"\x00\x00")
    assert not cfg.msix_enabled and not cfg.msix_function_masked
    cfg.write(cap + 4, u32(0xFFFFFFFF))
    assert cfg_read(cfg, cap + 4, 4) == 1


def test_no_msix_means_no_capability_list() -> None:
    cfg = make_config(msix=None)
    assert cfg_read(cfg, Reg.CAPABILITY_LIST, 1) == 0
    assert not cfg_read(cfg, Reg.STATUS, 2) & Status.CAP_LIST
    assert not cfg.msix_enabled


def test_reset_clears_writable_state_and_keeps_ids() -> None:
    cfg = make_config()
    pristine = cfg.read(0, 256)
    cfg.write(Reg.COMMAND, int(Command.MEMORY | Command.MASTER | Command.INTX_DISABLE).to_bytes(2, "little"))
    cfg.write(Reg.BAR0, u32(0xFEB00000))
    cfg.write(Reg.BAR0 + 8, u32(0xFFFFFFFF))
    cfg.write(Reg.BAR0 + 12, u32(0x1))
    cfg.write(Reg.INTERRUPT_LINE, b"\x0b")
    cfg.write(cfg.msix_cap + 2, MSIX_ENABLE.to_bytes(2, "little"))
    cfg.data[Reg.STATUS + 1] |= int(Status.SIG_SYSTEM_ERROR) >> 8
    assert cfg.read(0, 256) != pristine
    cfg.reset()
    assert cfg.read(0, 256) == pristine
    assert cfg_read(cfg, Reg.VENDOR_ID, 2) == VENDOR and cfg_read(cfg, Reg.DEVICE_ID, 2) == DEVICE
    assert cfg_read(cfg, Reg.BAR0 + 8, 4) == 0xC
    assert not cfg.msix_enabled and cfg.command == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 300), st.binary(min_size=1, max_size=8)), max_size=20))
def test_random_config_writes_never_touch_ids(writes: list[tuple[int, bytes]]) -> None:
    cfg = make_config()
    for offset, data in writes:
        cfg.write(offset, data)
    assert len(cfg.data) == 256
    assert cfg_read(cfg, Reg.VENDOR_ID, 2) == VENDOR
    assert cfg_read(cfg, Reg.DEVICE_ID, 2) == DEVICE
    assert cfg_read(cfg, Reg.CLASS_PROG, 3) == 0x050000
    assert cfg_read(cfg, Reg.BAR0, 4) & 0xFF == 0  # 256-byte BAR: low byte never writable
    assert cfg_read(cfg, Reg.BAR0 + 8, 4) & 0xF == 0xC


# -- IvshmemRegisters ------------------------------------------------------------


def test_registers_intr_status_clears_on_read() -> None:
    regs = IvshmemRegisters(position=3)
    regs.write(INTR_STATUS, 0x81)
    assert regs.read(INTR_STATUS) == 0x81
    assert regs.read(INTR_STATUS) == 0
    regs.write(INTR_MASK, 0xFFFF)
    assert regs.read(INTR_MASK) == 0xFFFF
    assert regs.read(INTR_MASK) == 0xFFFF  # the mask does not clear on read


def test_registers_iv_position_is_read_only() -> None:
    regs = IvshmemRegisters(position=7)
    assert regs.write(IV_POSITION, 99) is None
    assert regs.read(IV_POSITION) == 7
    assert regs.read(DOORBELL) == 0  # the doorbell reads as zero


def test_registers_doorbell_decode() -> None:
    regs = IvshmemRegisters(position=0)
    bell = regs.write(DOORBELL, (0xBEEF << 16) | 0x1234)
    assert bell is not None
    assert (bell.peer, bell.vector) == (0xBEEF, 0x34)
    bell = regs.write(DOORBELL, 0x1_0000_0005)  # only 32 bits count
    assert bell is not None and (bell.peer, bell.vector) == (0, 5)


def test_registers_intx_follows_status_and_mask() -> None:
    regs = IvshmemRegisters(position=0)
    regs.write(INTR_STATUS, 1)
    assert not regs.intx_asserted  # mask 0
    regs.write(INTR_MASK, 2)
    assert not regs.intx_asserted  # no common bit
    regs.write(INTR_MASK, 3)
    assert regs.intx_asserted
    regs.read(INTR_STATUS)
    assert not regs.intx_asserted
    regs.write(INTR_STATUS, 1)
    regs.reset()
    assert (regs.intr_mask, regs.intr_status, regs.position) == (0, 0, 0)


# -- IvshmemDevice BAR0 ----------------------------------------------------------


def bar0_write(device: IvshmemDevice, offset: int, data: bytes) -> None:
    device.write(PciRegion.BAR0, offset, data)


def bar0_read(device: IvshmemDevice, offset: int, count: int) -> int:
    return le(device.read(PciRegion.BAR0, offset, count))


def test_device_identity(plain: IvshmemDevice) -> None:
    assert config_read(plain, Reg.VENDOR_ID, 4) == (DEVICE << 16) | VENDOR
    assert plain.position == 0
    assert bar0_read(plain, IV_POSITION, 4) == 0
    assert plain.region(PciRegion.BAR1) is None  # no MSI-X, no BAR1
    assert plain.region_size(PciRegion.BAR2) == 4096


def test_narrow_writes_act_on_the_whole_dword(plain: IvshmemDevice) -> None:
    bar0_write(plain, INTR_MASK, u32(0xFFFFFFFF))
    bar0_write(plain, INTR_MASK + 1, b"\x12")
    assert plain.registers.intr_mask == 0x1200  # other bytes written as zero, as QEMU does
    bar0_write(plain, INTR_MASK + 2, b"\x34\x56")
    assert plain.registers.intr_mask == 0x5634_0000


def test_narrow_reads_return_the_right_bytes_and_clear_status(group: PeerGroup) -> None:
    device = IvshmemDevice(group, vectors=0, position=0x0102_0304 & 0xFFFF)
    try:
        assert bar0_read(device, IV_POSITION, 1) == 0x04
        assert bar0_read(device, IV_POSITION + 1, 1) == 0x03
        assert bar0_read(device, IV_POSITION + 2, 2) == 0
        device.registers.intr_status = 0x0000_0100
        assert bar0_read(device, INTR_STATUS, 1) == 0x00  # byte 0, yet the whole dword is read...
        assert device.registers.intr_status == 0  # ...so the status is cleared
        assert bar0_read(device, INTR_STATUS + 1, 1) == 0
    finally:
        device.close()


def test_eight_byte_read_spans_two_registers(plain: IvshmemDevice) -> None:
    bar0_write(plain, INTR_MASK, u32(0xAABBCCDD))
    plain.registers.intr_status = 0x11
    assert bar0_read(plain, INTR_MASK, 8) == (0x11 << 32) | 0xAABBCCDD
    assert plain.registers.intr_status == 0
    # A read straddling a dword boundary.
    bar0_write(plain, INTR_MASK, u32(0x44332211))
    assert bar0_read(plain, INTR_MASK + 2, 4) == 0x4433  # IntrStatus is zero now


def test_out_of_range_accesses_raise(plain: IvshmemDevice) -> None:
    with pytest.raises(RequestError):
        plain.read(PciRegion.BAR0, 256, 4)
    with pytest.raises(RequestError):
        plain.read(PciRegion.BAR0, 254, 4)
    with pytest.raises(RequestError):
        plain.write(PciRegion.BAR0, 255, b"\0\0")
    with pytest.raises(RequestError):
        plain.read(PciRegion.BAR1, 0, 4)  # not implemented without MSI-X
    with pytest.raises(RequestError):
        plain.read(PciRegion.BAR3, 0, 4)
    with pytest.raises(RequestError):
        plain.read(PciRegion.CONFIG, 255, 2)
    with pytest.raises(RequestError):
        plain.read(42, 0, 4)
    assert plain.read(PciRegion.BAR0, 252, 4) == bytes(4)
    assert plain.read(PciRegion.CONFIG, 252, 4) == bytes(4)


def test_shared_memory_through_bar2(group: PeerGroup) -> None:
    a = IvshmemDevice(group, vectors=0)
    b = IvshmemDevice(group, vectors=0)
    try:
        assert (a.position, b.position) == (0, 1)
        a.write(PciRegion.BAR2, 100, b"hello")
        assert b.read(PciRegion.BAR2, 100, 5) == b"hello"
        assert os.pread(group.memory.fd, 5, 100) == b"hello"
        with pytest.raises(RequestError):
            a.read(PciRegion.BAR2, 4095, 2)
    finally:
        a.close()
        b.close()


def test_doorbell_to_unknown_peer_or_vector_is_dropped(plain: IvshmemDevice) -> None:
    group = plain.group
    bar0_write(plain, DOORBELL, u32((5 << 16) | 0))
    assert group.dropped_doorbells == 1
    bar0_write(plain, DOORBELL, u32((plain.position << 16) | 3))  # vector 3 of an INTx-only device
    assert group.dropped_doorbells == 2
    assert plain.registers.intr_status == 0
    assert plain.doorbells_received == [0]


def assign_intx(device: IvshmemDevice, efds: Eventfds) -> int:
    given_fds, (mine,) = efds.make(1)
    req = set_irqs_request(TRIGGER_EVENTFD, PciIrq.INTX, 0, 1, 1)
    assert device.irqs.set_irqs(req, given_fds) == []
    return mine


def test_doorbell_to_self_raises_intx_once(plain: IvshmemDevice, efds: Eventfds) -> None:
    efd = assign_intx(plain, efds)
    bar0_write(plain, DOORBELL, u32(plain.position << 16))
    assert plain.registers.intr_status == 1
    assert eventfd_count(efd) == 0  # IntrMask is 0: the line stays low
    assert not config_read(plain, Reg.STATUS, 2) & Status.INTERRUPT

    bar0_write(plain, INTR_MASK, u32(1))
    assert eventfd_count(efd) == 1
    assert config_read(plain, Reg.STATUS, 2) & Status.INTERRUPT
    # More doorbells while the line is high (and automasked): no more edges.
    bar0_write(plain, DOORBELL, u32(plain.position << 16))
    bar0_write(plain, DOORBELL, u32(plain.position << 16))
    assert eventfd_count(efd) == 0
    assert plain.doorbells_received == [3]
    assert plain.group.dropped_doorbells == 0

    # Reading IntrStatus drops the line; after the client's unmask (EOI) a
    # new doorbell fires again.
    assert bar0_read(plain, INTR_STATUS, 4) == 1
    assert not config_read(plain, Reg.STATUS, 2) & Status.INTERRUPT
    plain.irqs.set_irqs(set_irqs_request(UNMASK, PciIrq.INTX, 0, 1, 0), ())
    assert eventfd_count(efd) == 0
    bar0_write(plain, DOORBELL, u32(plain.position << 16))
    assert eventfd_count(efd) == 1


def test_doorbell_with_mask_already_set_fires_once(plain: IvshmemDevice, efds: Eventfds) -> None:
    efd = assign_intx(plain, efds)
    bar0_write(plain, INTR_MASK, u32(1))
    bar0_write(plain, DOORBELL, u32(plain.position << 16))
    assert eventfd_count(efd) == 1
    assert eventfd_count(efd) == 0


def test_intx_disable_blocks_the_doorbell_interrupt(plain: IvshmemDevice, efds: Eventfds) -> None:
    efd = assign_intx(plain, efds)
    config_write(plain, Reg.COMMAND, 2, Command.INTX_DISABLE | Command.MEMORY)
    bar0_write(plain, INTR_MASK, u32(1))
    bar0_write(plain, DOORBELL, u32(plain.position << 16))
    assert plain.registers.intr_status == 1
    assert eventfd_count(efd) == 0
    # The status bit still shows the device's condition (PCI 3.0, 6.2.3).
    assert config_read(plain, Reg.STATUS, 2) & Status.INTERRUPT
    # Clearing INTX_DISABLE lets the pending condition through.
    config_write(plain, Reg.COMMAND, 2, Command.MEMORY)
    assert eventfd_count(efd) == 1


def test_doorbell_between_peers(group: PeerGroup, efds: Eventfds) -> None:
    a = IvshmemDevice(group, vectors=0)
    b = IvshmemDevice(group, vectors=0)
    try:
        efd_b = assign_intx(b, efds)
        bar0_write(b, INTR_MASK, u32(1))
        bar0_write(a, DOORBELL, u32(b.position << 16))
        assert b.registers.intr_status == 1 and a.registers.intr_status == 0
        assert eventfd_count(efd_b) == 1
    finally:
        a.irqs.close()
        b.irqs.close()
        a.close()
        b.close()


# -- interrupts: MSI-X --------------------------------------------------------------


def enable_msix(device: IvshmemDevice, mask_function: bool = False) -> None:
    value = MSIX_ENABLE | (MSIX_FUNCTION_MASK if mask_function else 0)
    config_write(device, device.config.msix_cap + 2, 2, value)
    assert device.config.msix_enabled


def assign_msix(device: IvshmemDevice, efds: Eventfds, n: int = 2) -> tuple[tuple[int, ...], tuple[int, ...]]:
    given_fds, mine = efds.make(n)
    req = set_irqs_request(TRIGGER_EVENTFD, PciIrq.MSIX, 0, n, n)
    assert device.irqs.set_irqs(req, given_fds) == []
    assert device.irqs.open_fds() == list(given_fds)
    return given_fds, mine


def pba(device: IvshmemDevice) -> int:
    return le(device.msix_bar_read(PBA, 8))


def test_msix_trigger_fires_the_eventfd(msix_dev: IvshmemDevice, efds: Eventfds) -> None:
    enable_msix(msix_dev)
    _, (e0, e1) = assign_msix(msix_dev, efds)
    assert msix_dev.irqs.set_irqs(set_irqs_request(TRIGGER_NONE, PciIrq.MSIX, 1, 1, 0), ()) == []
    assert (eventfd_count(e0), eventfd_count(e1)) == (0, 1)
    # A doorbell to self on vector 0 goes to MSI-X, not IntrStatus.
    bar0_write(msix_dev, DOORBELL, u32(msix_dev.position << 16))
    assert (eventfd_count(e0), eventfd_count(e1)) == (1, 0)
    assert msix_dev.registers.intr_status == 0
    assert pba(msix_dev) == 0


def test_msix_mask_leaves_pba_bit_and_unmask_delivers(msix_dev: IvshmemDevice, efds: Eventfds) -> None:
    enable_msix(msix_dev)
    _, (e0, e1) = assign_msix(msix_dev, efds)
    msix_dev.irqs.set_irqs(set_irqs_request(MASK, PciIrq.MSIX, 1, 1, 0), ())
    assert not msix_dev.msix_notify(1)
    assert pba(msix_dev) == 0b10
    assert eventfd_count(e1) == 0
    assert msix_dev.msix_notify(0)  # the other vector is not masked
    assert eventfd_count(e0) == 1
    msix_dev.irqs.set_irqs(set_irqs_request(UNMASK, PciIrq.MSIX, 1, 1, 0), ())
    assert eventfd_count(e1) == 1
    assert pba(msix_dev) == 0
    assert eventfd_count(e1) == 0


def test_msix_function_mask_holds_vectors_until_cleared(msix_dev: IvshmemDevice, efds: Eventfds) -> None:
    enable_msix(msix_dev, mask_function=True)
    _, (e0, _e1) = assign_msix(msix_dev, efds)
    assert not msix_dev.msix_notify(0)
    assert pba(msix_dev) == 0b01 and eventfd_count(e0) == 0
    enable_msix(msix_dev, mask_function=False)
    assert eventfd_count(e0) == 1
    assert pba(msix_dev) == 0


def test_msix_without_eventfd_stays_pending_until_assigned(msix_dev: IvshmemDevice, efds: Eventfds) -> None:
    enable_msix(msix_dev)
    assert not msix_dev.msix_notify(1)
    assert pba(msix_dev) == 0b10
    _, (_e0, e1) = assign_msix(msix_dev, efds)
    assert eventfd_count(e1) == 1
    assert pba(msix_dev) == 0


def test_msix_deassign_closes_the_eventfds(msix_dev: IvshmemDevice, efds: Eventfds) -> None:
    given_fds, (e0, e1) = assign_msix(msix_dev, efds)
    assert all(fd_is_open(fd) for fd in given_fds)
    assert msix_dev.irqs.set_irqs(set_irqs_request(TRIGGER_EVENTFD, PciIrq.MSIX, 0, 2, 0), ()) == []
    assert not any(fd_is_open(fd) for fd in given_fds)
    assert msix_dev.irqs.open_fds() == []
    enable_msix(msix_dev)
    assert not msix_dev.msix_notify(0)
    assert pba(msix_dev) == 0b01
    assert (eventfd_count(e0), eventfd_count(e1)) == (0, 0)


def test_msix_replacing_an_eventfd_closes_the_old_one(msix_dev: IvshmemDevice, efds: Eventfds) -> None:
    (old0, old1), _ = assign_msix(msix_dev, efds)
    (new1,), (mine1,) = efds.make(1)
    msix_dev.irqs.set_irqs(set_irqs_request(TRIGGER_EVENTFD, PciIrq.MSIX, 1, 1, 1), (new1,))
    assert fd_is_open(old0) and not fd_is_open(old1)
    enable_msix(msix_dev)
    msix_dev.msix_notify(1)
    assert eventfd_count(mine1) == 1


def test_disable_with_count_zero_closes_all(msix_dev: IvshmemDevice, efds: Eventfds) -> None:
    given_fds, _ = assign_msix(msix_dev, efds)
    msix_dev.irqs.set_irqs(set_irqs_request(MASK, PciIrq.MSIX, 0, 1, 0), ())
    assert msix_dev.irqs.set_irqs(set_irqs_request(TRIGGER_NONE, PciIrq.MSIX, 0, 0, 0), ()) == []
    assert not any(fd_is_open(fd) for fd in given_fds)
    assert msix_dev.irqs.open_fds() == []
    assert not msix_dev.irqs.msix.vectors[0].masked


def test_bad_set_irqs_changes_nothing(msix_dev: IvshmemDevice, efds: Eventfds) -> None:
    given_fds, _ = efds.make(3)
    with pytest.raises(RequestError):
        msix_dev.irqs.set_irqs(set_irqs_request(TRIGGER_EVENTFD, PciIrq.MSIX, 0, 3, 3), given_fds)
    with pytest.raises(RequestError):
        msix_dev.irqs.set_irqs(set_irqs_request(TRIGGER_NONE, 7, 0, 1, 0), ())
    with pytest.raises(RequestError):
        msix_dev.irqs.set_irqs(set_irqs_request(TRIGGER_NONE, PciIrq.MSI, 0, 1, 0), ())
    assert msix_dev.irqs.open_fds() == []
    for fd in given_fds:  # still the caller's to close
        assert fd_is_open(fd)
        os.close(fd)


def test_client_disconnect_closes_every_eventfd(msix_dev: IvshmemDevice, efds: Eventfds) -> None:
    msix_fds, _ = assign_msix(msix_dev, efds)
    intx_fds, _ = efds.make(1)
    msix_dev.irqs.set_irqs(set_irqs_request(TRIGGER_EVENTFD, PciIrq.INTX, 0, 1, 1), intx_fds)
    msix_dev.irqs.close()
    assert not any(fd_is_open(fd) for fd in msix_fds + intx_fds)


# -- interrupts: INTx automask -----------------------------------------------------


def test_intx_automask_until_unmask(efds: Eventfds) -> None:
    irqs = InterruptController(intx=True, msix_vectors=0)
    try:
        (given,), (efd,) = efds.make(1)
        irqs.set_irqs(set_irqs_request(TRIGGER_EVENTFD, PciIrq.INTX, 0, 1, 1), (given,))
        irqs.set_intx_level(True)
        assert eventfd_count(efd) == 1
        assert irqs.intx.vectors[0].masked
        irqs.set_intx_level(False)
        irqs.set_intx_level(True)  # a new rising edge, but automasked
        assert eventfd_count(efd) == 0
        irqs.set_irqs(set_irqs_request(UNMASK, PciIrq.INTX, 0, 1, 0), ())
        assert eventfd_count(efd) == 1  # unmasked with the line still high
        irqs.set_intx_level(False)
        irqs.set_irqs(set_irqs_request(UNMASK, PciIrq.INTX, 0, 1, 0), ())
        assert eventfd_count(efd) == 0  # unmasked with the line low: nothing
        irqs.set_intx_level(True)
        assert eventfd_count(efd) == 1
        assert irqs.intx.fired == 3
    finally:
        irqs.close()


def test_intx_level_held_while_masked_is_dropped_when_line_falls(efds: Eventfds) -> None:
    irqs = InterruptController(intx=True, msix_vectors=0)
    try:
        (given,), (efd,) = efds.make(1)
        irqs.set_irqs(set_irqs_request(TRIGGER_EVENTFD, PciIrq.INTX, 0, 1, 1), (given,))
        irqs.set_irqs(set_irqs_request(MASK, PciIrq.INTX, 0, 1, 0), ())
        irqs.set_intx_level(True)
        irqs.set_intx_level(False)
        irqs.set_irqs(set_irqs_request(UNMASK, PciIrq.INTX, 0, 1, 0), ())
        assert eventfd_count(efd) == 0  # level-triggered: no stale interrupt
    finally:
        irqs.close()


# -- DmaTable ----------------------------------------------------------------------


RW = DmaMapFlags.READ | DmaMapFlags.WRITE


@pytest.fixture
def table() -> Iterator[DmaTable]:
    t = DmaTable()
    yield t
    t.clear()


def memfd(size: int) -> tuple[int, int]:
    """A memfd of `size` bytes to hand over, and a dup the test keeps."""
    fd = sealed_memfd("dma-test", size)
    return fd, os.dup(fd)


def test_dma_map_with_fd_is_read_and_written_directly(table: DmaTable) -> None:
    fd, keep = memfd(3 * 4096)
    try:
        os.pwrite(keep, b"guest data", 4096 + 16)
        table.add(DmaMap(RW, offset=4096, addr=0x100000, size=8192), fd)
        assert table.open_fds() == [fd]  # kept with the map, for a hand-over to a new process
        mapping = table.find(0x100000 + 16, 10)
        assert mapping.memory is not None
        assert table.read_direct(mapping, 0x100000 + 16, 10) == b"guest data"
        table.write_direct(mapping, 0x100000 + 8188, b"xyzw")
        assert os.pread(keep, 4, 4096 + 8188) == b"xyzw"
        table.remove(DmaUnmap(DmaUnmapFlags(0), 0x100000, 8192, 24))
        assert not fd_is_open(fd) and table.open_fds() == []
    finally:
        os.close(keep)


def test_dma_read_only_map_refuses_writes(table: DmaTable) -> None:
    fd, keep = memfd(4096)
    os.close(keep)
    table.add(DmaMap(DmaMapFlags.READ, 0, 0x2000, 4096), fd)
    mapping = table.find(0x2000, 4)
    with pytest.raises(DmaError) as info:
        table.write_direct(mapping, 0x2000, b"no")
    assert info.value.errno == E.EPERM


def test_dma_overlap_is_eexist_and_closes_the_fd(table: DmaTable) -> None:
    table.add(DmaMap(RW, 0, 0x10000, 0x4000), None)
    for addr, size in [(0x10000, 0x1000), (0xF000, 0x2000), (0x13000, 0x1000), (0xE000, 0x10000)]:
        fd, keep = memfd(0x10000)
        os.close(keep)
        with pytest.raises(RequestError) as info:
            table.add(DmaMap(RW, 0, addr, size), fd)
        assert info.value.errno == E.EEXIST
        assert not fd_is_open(fd)
    assert len(table) == 1
    # Adjacent maps on either side are fine.
    table.add(DmaMap(RW, 0, 0xF000, 0x1000), None)
    table.add(DmaMap(RW, 0, 0x14000, 0x1000), None)
    assert [m.addr for m in table.mappings()] == [0xF000, 0x10000, 0x14000]


def test_dma_mmap_failure_closes_the_fd(table: DmaTable) -> None:
    fd, keep = memfd(4096)
    os.close(keep)
    with pytest.raises(RequestError):
        table.add(DmaMap(RW, offset=123, addr=0, size=4096), fd)  # offset not page aligned
    assert not fd_is_open(fd)
    assert len(table) == 0


def test_dma_unmap_needs_an_exact_range(table: DmaTable) -> None:
    table.add(DmaMap(RW, 0, 0x10000, 0x2000), None)
    for addr, size in [(0x10000, 0x1000), (0x11000, 0x1000), (0x10000, 0x3000), (0x20000, 0x2000)]:
        with pytest.raises(RequestError) as info:
            table.remove(DmaUnmap(DmaUnmapFlags(0), addr, size, 24))
        assert info.value.errno == E.ENOENT
    assert len(table) == 1
    table.remove(DmaUnmap(DmaUnmapFlags(0), 0x10000, 0x2000, 24))
    assert len(table) == 0
    with pytest.raises(DmaError):
        table.find(0x10000, 1)


def test_dma_unmap_all_clears(table: DmaTable) -> None:
    fd, keep = memfd(4096)
    os.close(keep)
    table.add(DmaMap(RW, 0, 0x1000, 0x1000), fd)
    memory = table.find(0x1000, 1).memory
    assert memory is not None
    table.add(DmaMap(RW, 0, 0x8000, 0x1000), None)
    table.remove(DmaUnmap(DmaUnmapFlags.ALL, 0, 0, 24))
    assert len(table) == 0 and table.mappings() == []
    assert memory.closed
    table.add(DmaMap(RW, 0, 0x1000, 0x1000), None)  # the range is free again


def test_dma_find_across_two_maps_fails(table: DmaTable) -> None:
    table.add(DmaMap(RW, 0, 0x1000, 0x1000), None)
    table.add(DmaMap(RW, 0, 0x2000, 0x1000), None)
    assert table.find(0x1000, 0x1000).addr == 0x1000
    assert table.find(0x2FFF, 1).addr == 0x2000
    with pytest.raises(DmaError):
        table.find(0x1FFF, 2)
    with pytest.raises(DmaError):
        table.find(0x0FFF, 1)
    with pytest.raises(DmaError):
        table.find(0x3000, 1)


def test_dma_map_without_fd_has_no_memory(table: DmaTable) -> None:
    table.add(DmaMap(DmaMapFlags.READ, 0, 0x40000, 0x1000), None)
    mapping = table.find(0x40000, 8)
    assert mapping.memory is None
    assert (mapping.addr, mapping.end, mapping.flags) == (0x40000, 0x41000, DmaMapFlags.READ)


def test_dma_table_limit(table: DmaTable) -> None:
    small = DmaTable(max_maps=2)
    small.add(DmaMap(RW, 0, 0x1000, 0x1000), None)
    small.add(DmaMap(RW, 0, 0x2000, 0x1000), None)
    fd, keep = memfd(4096)
    os.close(keep)
    with pytest.raises(RequestError) as info:
        small.add(DmaMap(RW, 0, 0x3000, 0x1000), fd)
    assert info.value.errno == E.ENOSPC
    assert not fd_is_open(fd)
