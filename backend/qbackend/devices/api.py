"""Write a PCI device in Python and serve it to QEMU over vfio-user.

Subclass `Device`, say what the device is in class attributes, and answer
its BAR accesses::

    from qbackend.devices import Bar, Device

    class Counter(Device):
        vendor_id, device_id, class_code = 0x1234, 0x0001, 0xFF0000
        bars = (Bar(0, 4096),)
        msi_vectors = 1

        def __init__(self, start: str = "0") -> None:
            super().__init__()
            self.value = int(start, 0)

        def bar_read(self, bar: int, offset: int, size: int) -> int:
            return self.value

        def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
            self.value = value
            self.raise_irq()

and serve it: ``qbackend serve --device socket=/tmp/c.sock,class=mymodule:Counter,start=5``
(``class=path/to/file.py:Counter`` loads it from a file; the other keys
reach the constructor as strings).  QEMU attaches it with
``-device '{"driver":"vfio-user-pci","socket":{"type":"unix","path":"/tmp/c.sock"}}'``.

The contract:

- **Identity**: `vendor_id`, `device_id`, `class_code` (24 bits: class,
  subclass, programming interface), `revision`, `subsystem_vendor_id`,
  `subsystem_id`.
- **BARs**: `bars`, a tuple of `Bar(index, size, io=False, is_64bit=False,
  prefetchable=False, mappable=False, mappable_areas=())`.  Accesses to a
  BAR call `bar_read(bar, offset, size) -> int` and `bar_write(bar, offset,
  size, value)` with sizes 1, 2, 4 or 8 (little-endian values; a longer
  access is split into 4-byte pieces).  A `mappable` BAR is backed by
  shared memory that QEMU maps into the guest directly: its accesses never
  reach Python; the device reads and writes it through `bar_memory(index)`.
  A sparse BAR maps only its `mappable_areas`, ((offset, size), ...) pairs
  in whole pages (4096 bytes), and traps the rest to `bar_read`/`bar_write`:
  registers beside shared memory.  `bar_memory(index)` is then as large as
  the BAR, at the BAR's offsets; only the areas' bytes are the guest's.
- **Capabilities**: `capabilities`, a tuple of standard capabilities from
  `qbackend.devices`: `PowerManagement(d1=False, d2=False, pme_support=0)`
  (the guest may write the power state), `PciExpress(max_payload=128,
  link_speed=1, link_width=1)` (an endpoint; Device Control and Link
  Control writable), `VendorSpecific(data)` (read-only bytes); and
  `extended_capabilities`, e.g. `(DeviceSerialNumber(0x0123456789ABCDEF),)`,
  chained from 0x100 (they need `PciExpress`).  qbackend lays them out after
  MSI-X and MSI, links them and gives each field the write mask the PCI
  specifications give it; a device with `PciExpress` has a 4 KiB config space.
- **Interrupts**: `intx` (pin INTA#, default on), `msi_vectors` (0, or 1,
  2, 4, 8, 16, 32), `msix_vectors` (0..2048; the table and PBA go in BAR
  `msix_bar`, which must be free).  `raise_irq(vector)` sends the vector
  by whatever the guest enabled: MSI-X, else MSI, else INTx (a level that
  stays up until `lower_irq()`).  Both may be called from device code and
  from any other thread.
- **DMA**: `dma_read(address, count)` and `dma_write(address, data)` reach
  guest memory by guest-physical address: directly where QEMU shared the
  memory as an fd (the usual case with ``memory-backend-memfd,share=on``),
  else through vfio-user DMA messages.  The messages need the connection's
  thread to be free, so from inside `bar_read`/`bar_write` hand such work
  to `defer(fn, *args)`, which runs it in a background thread.
- **Lifecycle**: `reset()` (QEMU reset the device: put your registers
  back to their power-on values; config space and interrupts are reset
  before it is called, INTx lowered), `connected()` and `disconnected()` (a
  QEMU attached or went away).

Everything a BAR callback does runs under the device's lock (`self.lock`,
re-entrant); take it yourself in code that runs elsewhere (`defer`, your
own threads) and touches the same state.

That is all a `Device` has: the entry points the vfio-user server calls
(config space, region accesses, interrupt set-up, the client's coming and
going) are on a `UserFunction`, a `PciFunction` that each `Device` gets in
`Device.__init__` and that is what gets served.  So a subclass may name its
own methods and attributes as it likes (`read`, `close`, `config`, `name`,
...) without replacing one of the server's.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from qbackend.errors import DeviceError
from qbackend.models.pci_config import Bar as _ConfigBar
from qbackend.models.pci_config import (
    Capability,
    ConfigSpace,
    ExtendedCapability,
    MsiLayout,
    MsixLayout,
)
from qbackend.plumbing.native_lock import Lock
from qbackend.vfio.function import DmaPort, PciFunction, Region
from qbackend.vfio.irqs import InterruptController

log = logging.getLogger(__name__)

_ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}
PAGE_SIZE = 4096  # what a mappable area is made of


@dataclass(frozen=True)
class Bar:
    """A BAR of a `Device`: index 0..5, a power-of-two size."""

    index: int
    size: int
    io: bool = False
    is_64bit: bool = False
    prefetchable: bool = False
    mappable: bool = False  # backed by shared memory QEMU maps into the guest (no callbacks)
    # A sparse BAR: these (offset, size) pages are shared memory, the rest trapped to the callbacks.
    mappable_areas: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        areas = sorted(self.mappable_areas)
        if areas and (self.mappable or self.io):
            raise DeviceError(f"BAR{self.index}: mappable_areas are for a memory BAR that is not mappable as a whole")
        end = 0
        for offset, size in areas:
            if offset % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
                raise DeviceError(f"BAR{self.index}: mappable area {offset:#x}+{size:#x} is not whole pages")
            if offset < end or offset + size > self.size:
                raise DeviceError(f"BAR{self.index}: mappable area {offset:#x}+{size:#x} overlaps another "
                                  f"or ends past the BAR's {self.size:#x} bytes")
            end = offset + size

    @property
    def shared(self) -> bool:
        """Backed by shared memory (all of it, or its areas)."""
        return self.mappable or bool(self.mappable_areas)

    def config_bar(self) -> _ConfigBar:
        return _ConfigBar(self.index, self.size, io=self.io, is_64bit=self.is_64bit,
                          prefetchable=self.prefetchable)


class Device:
    """The base class of a user's PCI device (see the module's documentation).

    What a subclass may override: the class attributes, `bar_read`,
    `bar_write`, `reset`, `connected`, `disconnected`.  What it may call:
    `raise_irq`, `lower_irq`, `irq_mode`, `dma_read`, `dma_write`, `defer`,
    `bar_memory`, `lock`.  Nothing else is here: the server's side lives in
    the device's `UserFunction` (`function_of`).
    """

    vendor_id: ClassVar[int] = 0x1234
    device_id: ClassVar[int] = 0x0000
    class_code: ClassVar[int] = 0xFF0000  # "unassigned class"
    revision: ClassVar[int] = 0
    subsystem_vendor_id: ClassVar[int] = 0
    subsystem_id: ClassVar[int] = 0
    bars: ClassVar[tuple[Bar, ...]] = ()
    intx: ClassVar[bool] = True
    msi_vectors: ClassVar[int] = 0
    msix_vectors: ClassVar[int] = 0
    msix_bar: ClassVar[int] = 5
    capabilities: ClassVar[tuple[Capability, ...]] = ()
    extended_capabilities: ClassVar[tuple[ExtendedCapability, ...]] = ()

    def __init__(self) -> None:
        # Two leading underscores: Python mangles the name to _Device__function,
        # which no subclass's attribute can collide with.
        self.__function = UserFunction(self)

    # -- what a device overrides --

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        """A guest read of `size` bytes at `offset` of BAR `bar`; default: all ones."""
        return _ALL_ONES[size]

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        """A guest write; default: ignored."""

    def reset(self) -> None:
        """QEMU reset the device: registers to their power-on values (config
        space and interrupts are reset already)."""

    def connected(self) -> None:
        """A QEMU has attached (after the vfio-user handshake)."""

    def disconnected(self) -> None:
        """The QEMU went away (device_del, or it ended)."""

    # -- what a device calls --

    @property
    def lock(self) -> Lock:
        """The device's lock (re-entrant), held around every BAR callback."""
        return self.__function.lock

    @property
    def irq_mode(self) -> str:
        """What the guest enabled: "msix", "msi", "intx" or "none"."""
        return self.__function.irq_mode()

    def raise_irq(self, vector: int = 0) -> bool:
        """Send `vector` (MSI-X, else MSI, else assert INTx); True if it went out now."""
        return self.__function.raise_irq(vector)

    def lower_irq(self) -> None:
        """De-assert INTx (MSI and MSI-X are edges: nothing to lower)."""
        self.__function.lower_irq()

    def dma_read(self, address: int, count: int) -> bytes:
        """`count` bytes of guest memory at guest-physical `address`."""
        return self.__function.dma().read(address, count)

    def dma_write(self, address: int, data: bytes) -> None:
        """Write `data` into guest memory at guest-physical `address`."""
        self.__function.dma().write(address, data)

    def defer(self, fn: Callable[..., object], *args: object) -> None:
        """Run `fn(*args)` soon in a background thread (for DMA messages, slow work)."""
        name = self.__function.name

        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("%s: deferred %s failed", name, getattr(fn, "__name__", fn))

        threading.Thread(target=run, name=f"{name}-deferred", daemon=True).start()

    def bar_memory(self, index: int) -> mmap.mmap:
        """The shared memory behind a `mappable` BAR, or a sparse BAR's (as large
        as the BAR: its mappable areas at their offsets are what the guest sees)."""
        return self.__function.memories[index][1]


def function_of(device: Device) -> UserFunction:
    """The `UserFunction` that serves `device` (what a `VfioUserServer` takes)."""
    function = getattr(device, "_Device__function", None)  # Device.__function, as Python mangles it
    if not isinstance(function, UserFunction):
        raise DeviceError(f"{type(device).__name__}: its __init__ must call super().__init__()")
    return function


class UserFunction(PciFunction):
    """A `Device` as the vfio-user server sees it: the config space and
    regions its class declares, its interrupts, and its hooks called where
    the server's entry points need them.

    The device's hooks are looked up once, here, so a BAR access costs the
    same one call into the user's `bar_read` / `bar_write` as it would if
    the device were a PciFunction itself.
    """

    def __init__(self, device: Device) -> None:
        cls = type(device)
        config_bars = [bar.config_bar() for bar in cls.bars]
        msix = None
        if cls.msix_vectors:
            if any(bar.index == cls.msix_bar for bar in cls.bars):
                raise DeviceError(f"{cls.__name__}: BAR{cls.msix_bar} holds the MSI-X table; choose msix_bar")
            half = max(2048, 1 << (cls.msix_vectors * 16 - 1).bit_length())  # the table; the PBA after it
            msix = MsixLayout(cls.msix_vectors, cls.msix_bar, 0, half)
            config_bars.append(_ConfigBar(cls.msix_bar, 2 * half))
        config = ConfigSpace(vendor_id=cls.vendor_id, device_id=cls.device_id, class_code=cls.class_code,
                             revision=cls.revision, subsystem_vendor_id=cls.subsystem_vendor_id,
                             subsystem_id=cls.subsystem_id, bars=tuple(config_bars),
                             interrupt_pin=1 if cls.intx else 0, msix=msix,
                             msi=MsiLayout(cls.msi_vectors) if cls.msi_vectors else None,
                             capabilities=tuple(cls.capabilities),
                             extended_capabilities=tuple(cls.extended_capabilities))
        super().__init__(config, InterruptController(intx=cls.intx, msix_vectors=cls.msix_vectors,
                                                     msi_vectors=cls.msi_vectors))
        self.device = device
        self.name = cls.__name__
        self.has_intx = cls.intx
        self.intx_level = False  # raise_irq() in INTx mode until lower_irq()
        self.memories: dict[int, tuple[int, mmap.mmap]] = {}
        self._device_reset = device.reset
        self._device_connected = device.connected
        self._device_disconnected = device.disconnected
        bar_read, bar_write = device.bar_read, device.bar_write
        for bar in cls.bars:
            if bar.shared:
                fd = os.memfd_create(f"qbackend-{cls.__name__}-bar{bar.index}", os.MFD_CLOEXEC)
                os.ftruncate(fd, bar.size)
                memory = mmap.mmap(fd, bar.size)
                self.memories[bar.index] = (fd, memory)
                read, write = _memory_reader(memory), _memory_writer(memory)
                if bar.mappable_areas:
                    read, write = _sparse(bar.mappable_areas, (read, write),
                                          (_reader(bar_read, bar.index), _writer(bar_write, bar.index)))
                self.regions[bar.index] = Region(bar.size, read, write, mmap_fd=fd,
                                                 mmap_areas=tuple(sorted(bar.mappable_areas)))
            else:
                self.regions[bar.index] = Region(bar.size, _reader(bar_read, bar.index),
                                                 _writer(bar_write, bar.index))
        if msix is not None:
            self.regions[cls.msix_bar] = Region(msix.pba_offset * 2, self.msix_bar_read, self.msix_bar_write)

    # -- interrupts, for Device --

    def irq_mode(self) -> str:
        if self.config.msix_enabled:
            return "msix"
        if self.irqs.msi_active:
            return "msi"
        return "intx" if self.has_intx else "none"

    def raise_irq(self, vector: int) -> bool:
        with self.lock:
            mode = self.irq_mode()
            if mode == "msix":
                return self.msix_notify(vector)
            if mode == "msi":
                if not 0 <= vector < self.irqs.msi.count:
                    return False
                return self.irqs.msi.trigger(vector)
            if mode == "intx":
                self.intx_level = True
                self.update_intx()
                return True
            return False

    def lower_irq(self) -> None:
        with self.lock:
            self.intx_level = False
            self.update_intx()

    def intx_asserted(self) -> bool:
        return self.intx_level

    def dma(self) -> DmaPort:
        port = self.dma_port
        if port is None:
            raise DeviceError(f"{self.name}: no client is attached: there is no guest memory to reach")
        return port

    # -- the server's entry points --

    def reset(self) -> None:
        super().reset()
        # As QEMU's PCI core does on reset, whatever the device's own state says.
        self.intx_level = False
        self._device_reset()

    def client_connected(self) -> None:
        self._device_connected()

    def client_disconnected(self) -> None:
        with self.lock:
            self.intx_level = False
        self._device_disconnected()

    def close(self) -> None:
        for fd, memory in self.memories.values():
            memory.close()
            os.close(fd)
        self.memories.clear()


# BAR accesses of sizes other than 1, 2, 4, 8 are split into 4-byte pieces.

def _reader(bar_read: Callable[[int, int, int], int], bar: int) -> Callable[[int, int], bytes]:
    def read(offset: int, count: int) -> bytes:
        if count in _ALL_ONES:
            return (bar_read(bar, offset, count) & _ALL_ONES[count]).to_bytes(count, "little")
        return b"".join(read(offset + pos, min(4, count - pos)) for pos in range(0, count, 4))
    return read


def _writer(bar_write: Callable[[int, int, int, int], None], bar: int) -> Callable[[int, bytes], None]:
    def write(offset: int, data: bytes) -> None:
        if len(data) in _ALL_ONES:
            bar_write(bar, offset, len(data), int.from_bytes(data, "little"))
            return
        for pos in range(0, len(data), 4):
            write(offset + pos, data[pos:pos + 4])
    return write


def _sparse(areas: tuple[tuple[int, int], ...], memory: tuple[Callable[[int, int], bytes], Callable[[int, bytes], None]],
            trapped: tuple[Callable[[int, int], bytes], Callable[[int, bytes], None]],
            ) -> tuple[Callable[[int, int], bytes], Callable[[int, bytes], None]]:
    """A sparse BAR's handlers: an access inside a mappable area (which QEMU
    still sends when it did not map it) reaches the memory, one outside
    reaches the device; one across a border is split there."""
    edges = sorted({edge for offset, size in areas for edge in (offset, offset + size)})
    mapped = [(offset, offset + size) for offset, size in areas]

    def pieces(offset: int, count: int) -> list[tuple[int, int, bool]]:
        cuts = [offset, *(e for e in edges if offset < e < offset + count), offset + count]
        return [(start, end - start, any(lo <= start < hi for lo, hi in mapped))
                for start, end in zip(cuts, cuts[1:])]

    def read(offset: int, count: int) -> bytes:
        return b"".join((memory if inside else trapped)[0](start, n) for start, n, inside in pieces(offset, count))

    def write(offset: int, data: bytes) -> None:
        for start, n, inside in pieces(offset, len(data)):
            (memory if inside else trapped)[1](start, data[start - offset:start - offset + n])

    return read, write


def _memory_reader(memory: mmap.mmap) -> Callable[[int, int], bytes]:
    return lambda offset, count: memory[offset:offset + count]


def _memory_writer(memory: mmap.mmap) -> Callable[[int, bytes], None]:
    def write(offset: int, data: bytes) -> None:
        memory[offset:offset + len(data)] = data
    return write
