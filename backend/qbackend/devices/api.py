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
  prefetchable=False, mappable=False)`.  Accesses to a BAR call
  `bar_read(bar, offset, size) -> int` and `bar_write(bar, offset, size,
  value)` with sizes 1, 2, 4 or 8 (little-endian values; a longer access
  is split into 4-byte pieces).  A `mappable` BAR is backed by shared
  memory that QEMU maps into the guest directly: its accesses never reach
  Python; the device reads and writes it through `bar_memory(index)`.
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
- **Lifecycle**: `reset()` (QEMU's device reset; call `super().reset()`),
  `connected()` and `disconnected()` (a QEMU attached or went away).

Everything a BAR callback does runs under the device's lock (`self.lock`,
re-entrant); take it yourself in code that runs elsewhere (`defer`, your
own threads) and touches the same state.
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
from qbackend.models.pci_config import ConfigSpace, MsiLayout, MsixLayout
from qbackend.vfio.function import DmaPort, PciFunction, Region
from qbackend.vfio.irqs import InterruptController

log = logging.getLogger(__name__)

_ALL_ONES = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF, 8: 0xFFFFFFFFFFFFFFFF}


@dataclass(frozen=True)
class Bar:
    """A BAR of a `Device`: index 0..5, a power-of-two size."""

    index: int
    size: int
    io: bool = False
    is_64bit: bool = False
    prefetchable: bool = False
    mappable: bool = False  # backed by shared memory QEMU maps into the guest (no callbacks)

    def config_bar(self) -> _ConfigBar:
        return _ConfigBar(self.index, self.size, io=self.io, is_64bit=self.is_64bit,
                          prefetchable=self.prefetchable)


class Device(PciFunction):
    """The base class of a user's PCI device (see the module's documentation)."""

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

    def __init__(self) -> None:
        cls = type(self)
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
                             msi=MsiLayout(cls.msi_vectors) if cls.msi_vectors else None)
        super().__init__(config, InterruptController(intx=cls.intx, msix_vectors=cls.msix_vectors,
                                                     msi_vectors=cls.msi_vectors))
        self.name = cls.__name__
        self._intx_level = False
        self._memories: dict[int, tuple[int, mmap.mmap]] = {}
        for bar in cls.bars:
            if bar.mappable:
                fd = os.memfd_create(f"qbackend-{cls.__name__}-bar{bar.index}", os.MFD_CLOEXEC)
                os.ftruncate(fd, bar.size)
                memory = mmap.mmap(fd, bar.size)
                self._memories[bar.index] = (fd, memory)
                self.regions[bar.index] = Region(bar.size, self._memory_reader(memory),
                                                 self._memory_writer(memory), mmap_fd=fd)
            else:
                self.regions[bar.index] = Region(bar.size, self._reader(bar.index), self._writer(bar.index))
        if msix is not None:
            self.regions[cls.msix_bar] = Region(msix.pba_offset * 2, self.msix_bar_read, self.msix_bar_write)

    # -- what a device overrides --

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        """A guest read of `size` bytes at `offset` of BAR `bar`; default: all ones."""
        return _ALL_ONES[size]

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        """A guest write; default: ignored."""

    def connected(self) -> None:
        """A QEMU has attached (after the vfio-user handshake)."""

    def disconnected(self) -> None:
        """The QEMU went away (device_del, or it ended)."""

    # -- interrupts --

    @property
    def irq_mode(self) -> str:
        """What the guest enabled: "msix", "msi", "intx" or "none"."""
        if self.config.msix_enabled:
            return "msix"
        if self.irqs.msi_active:
            return "msi"
        return "intx" if type(self).intx else "none"

    def raise_irq(self, vector: int = 0) -> bool:
        """Send `vector` (MSI-X, else MSI, else assert INTx); True if it went out now."""
        with self.lock:
            mode = self.irq_mode
            if mode == "msix":
                return self.msix_notify(vector)
            if mode == "msi":
                if not 0 <= vector < self.irqs.msi.count:
                    return False
                return self.irqs.msi.trigger(vector)
            if mode == "intx":
                self._intx_level = True
                self.update_intx()
                return True
            return False

    def lower_irq(self) -> None:
        """De-assert INTx (MSI and MSI-X are edges: nothing to lower)."""
        with self.lock:
            self._intx_level = False
            self.update_intx()

    def intx_asserted(self) -> bool:
        return self._intx_level

    # -- DMA --

    def dma_read(self, address: int, count: int) -> bytes:
        """`count` bytes of guest memory at guest-physical `address`."""
        return self._dma().read(address, count)

    def dma_write(self, address: int, data: bytes) -> None:
        """Write `data` into guest memory at guest-physical `address`."""
        self._dma().write(address, data)

    def _dma(self) -> DmaPort:
        port = self.dma_port
        if port is None:
            raise DeviceError(f"{self.name}: no client is attached: there is no guest memory to reach")
        return port

    def defer(self, fn: Callable[..., object], *args: object) -> None:
        """Run `fn(*args)` soon in a background thread (for DMA messages, slow work)."""

        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("%s: deferred %s failed", self.name, getattr(fn, "__name__", fn))

        threading.Thread(target=run, name=f"{self.name}-deferred", daemon=True).start()

    # -- mappable BARs --

    def bar_memory(self, index: int) -> mmap.mmap:
        """The shared memory behind a `mappable` BAR (what the guest sees there)."""
        return self._memories[index][1]

    # -- the binding to PciFunction --

    def _reader(self, bar: int) -> Callable[[int, int], bytes]:
        def read(offset: int, count: int) -> bytes:
            if count in _ALL_ONES:
                return (self.bar_read(bar, offset, count) & _ALL_ONES[count]).to_bytes(count, "little")
            return b"".join(read(offset + pos, min(4, count - pos)) for pos in range(0, count, 4))
        return read

    def _writer(self, bar: int) -> Callable[[int, bytes], None]:
        def write(offset: int, data: bytes) -> None:
            if len(data) in _ALL_ONES:
                self.bar_write(bar, offset, len(data), int.from_bytes(data, "little"))
                return
            for pos in range(0, len(data), 4):
                write(offset + pos, data[pos:pos + 4])
        return write

    @staticmethod
    def _memory_reader(memory: mmap.mmap) -> Callable[[int, int], bytes]:
        return lambda offset, count: memory[offset:offset + count]

    @staticmethod
    def _memory_writer(memory: mmap.mmap) -> Callable[[int, bytes], None]:
        def write(offset: int, data: bytes) -> None:
            memory[offset:offset + len(data)] = data
        return write

    def client_connected(self) -> None:
        self.connected()

    def client_disconnected(self) -> None:
        with self.lock:
            self._intx_level = False
        self.disconnected()

    def close(self) -> None:
        for fd, memory in self._memories.values():
            memory.close()
            os.close(fd)
        self._memories.clear()
