"""A PCI function as the vfio-user server sees it: config space, regions
(BARs), interrupts.  Concrete devices (ivshmem, the hotplug controller)
subclass `PciFunction` and supply BAR handlers; a user's
`qbackend.devices.Device` is served through `qbackend.devices.api.UserFunction`,
a subclass that holds it.

Region accesses arrive already checked against the wire rules; the range
checks against region sizes are here, since only the device knows its
regions.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from qbackend.models.pci_config import MSIX_ENTRY_SIZE, ConfigSpace
from qbackend.plumbing.handover import HandoverError, Loader, Saver, State
from qbackend.plumbing.native_lock import device_lock
from qbackend.protocol.vfio_user import (
    PCI_NUM_REGIONS,
    PciIrq,
    PciRegion,
    RegionFlags,
    RequestError,
)
from qbackend.vfio.irqs import InterruptController

if TYPE_CHECKING:
    from qbackend.vfio.trace import Hooks

_CONFIG = int(PciRegion.CONFIG)  # a plain int: reading an enum member is slow on the hot path

ReadHandler = Callable[[int, int], bytes]
WriteHandler = Callable[[int, bytes], None]


class DmaPort(Protocol):
    """Guest memory by guest-physical address, while a client is attached
    (the vfio-user server provides it: `PciFunction.dma_port`)."""

    def read(self, address: int, count: int) -> bytes: ...

    def write(self, address: int, data: bytes) -> None: ...


@dataclass
class Region:
    """A BAR: its handlers, and for a mappable one the fd behind it.

    With `mmap_fd`, the client may map the fd into the guest: all of the
    region, or only `mmap_areas` ((offset, size) pairs, page-aligned, at the
    same offsets in the fd), the rest staying trapped to `read`/`write`.
    """

    size: int
    read: ReadHandler
    write: WriteHandler
    mmap_fd: int | None = None  # handed to the client; stays owned by the device
    mmap_offset: int = 0
    mmap_areas: tuple[tuple[int, int], ...] = ()  # empty: the whole region

    @property
    def flags(self) -> RegionFlags:
        flags = RegionFlags.READ | RegionFlags.WRITE
        if self.mmap_fd is not None:
            flags |= RegionFlags.MMAP
        return flags

    @property
    def sparse_areas(self) -> tuple[tuple[int, int], ...]:
        # Saying which parts are mappable with the sparse-mmap capability is
        # what makes QEMU map them rather than trap them (all of the region
        # unless areas are given).
        if self.mmap_fd is None:
            return ()
        return self.mmap_areas or ((0, self.size),)


@dataclass(frozen=True)
class PlainWindow:
    """Part of a region that is plain memory: a read inside it returns its
    bytes, a write of the whole window (if `writable`) stores them, and
    nothing else happens; so the server may serve those accesses without
    calling the device (qbackend.servers.vfio_user_fast).  Other writes
    (narrower ones, say, which a register may widen) go to the device's
    handler.  `memory` is the window's bytes from `start` on (a bytearray or
    a view of one, never resized or replaced); with a `guard`, a write is
    plain only while those 4 bytes are zero."""

    region: int
    start: int
    memory: bytearray | memoryview
    writable: bool = False
    guard: memoryview | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.memory)


class PciFunction:
    """Base class: config space plus regions plus interrupts."""

    name = "pci"

    def __init__(self, config: ConfigSpace, irqs: InterruptController) -> None:
        self.config = config
        self.irqs = irqs
        # Held by whoever touches the device: the connection's worker thread
        # while it handles messages, trio tasks while they act as the host;
        # the native access loop too, hence a lock C code can take.
        self.lock = device_lock()
        self.regions: dict[int, Region] = {}
        self._accesses = [0] * PCI_NUM_REGIONS  # REGION_READ/WRITE messages per region served here
        # Counts of the accesses the native loop served, per region (it adds to them).
        self.native_accesses: Sequence[int] | None = None
        self.dma_port: DmaPort | None = None  # set by the server while a client is attached
        # What the server calls for a region access: [read, write], these methods
        # unless a trace stands between (qbackend.vfio.trace, which also sets `tracer`).
        self.accessors: list[Any] = [self.read, self.write]
        self.tracer: Hooks | None = None
        self.native_loop: Any = None  # the native access loop serving this function, while one does
        self._msix_table = bytearray()
        if config.msix is not None:
            layout = config.msix
            # QEMU emulates the table and never forwards it, so this copy
            # starts with its mask bits clear: it gates nothing unless a
            # client writes it.  Masking then comes through SET_IRQS.
            self._msix_table = bytearray(layout.vectors * MSIX_ENTRY_SIZE)

    # -- region access, as the server calls it --------------------------------

    @property
    def region_accesses(self) -> list[int]:
        """REGION_READ/WRITE messages served, per region (by this class or natively)."""
        native = self.native_accesses
        if native is None:
            return list(self._accesses)
        return [mine + native[i] for i, mine in enumerate(self._accesses)]

    def plain_windows(self) -> list[PlainWindow]:
        """The parts of regions that are plain memory (see PlainWindow).

        Config space reads are (writes go through the masks, config_write);
        a subclass adds its own windows, and one that overrides read() gets
        none from here.
        """
        if type(self).read is not PciFunction.read:
            return []
        return [PlainWindow(_CONFIG, 0, memoryview(self.config.data))]

    def pause_native(self, paused: bool) -> None:
        """Under the lock: make the native access loop leave every access to Python
        (while a trace runs), or serve its windows again."""
        if self.native_loop is not None:
            self.native_loop.pause(paused)

    def region(self, index: int) -> Region | None:
        if index == PciRegion.CONFIG:
            return None
        return self.regions.get(index)

    def region_size(self, index: int) -> int:
        if index == PciRegion.CONFIG:
            return self.config.size
        region = self.regions.get(index)
        return region.size if region else 0

    def _out_of_range(self, index: int, offset: int, count: int) -> RequestError:
        if not 0 <= index < PCI_NUM_REGIONS:
            return RequestError(f"region {index} does not exist (0..{PCI_NUM_REGIONS - 1})")
        size = self.region_size(index)
        if size == 0:
            return RequestError(f"region {index} is not implemented by {self.name}")
        return RequestError(f"access {offset:#x}+{count} is outside region {index} of {size:#x} bytes")

    def read(self, index: int, offset: int, count: int) -> bytes:
        if index == _CONFIG:
            if offset + count > self.config.size:
                raise self._out_of_range(index, offset, count)
            self._accesses[index] += 1
            return bytes(self.config.data[offset:offset + count])  # ConfigSpace.read, inlined: the hot path
        region = self.regions.get(index)
        if region is None or offset + count > region.size:
            raise self._out_of_range(index, offset, count)
        self._accesses[index] += 1
        return region.read(offset, count)

    def write(self, index: int, offset: int, data: bytes) -> None:
        if index == _CONFIG:
            if offset + len(data) > self.config.size:
                raise self._out_of_range(index, offset, len(data))
            self._accesses[index] += 1
            self.config_write(offset, data)
            return
        region = self.regions.get(index)
        if region is None or offset + len(data) > region.size:
            raise self._out_of_range(index, offset, len(data))
        self._accesses[index] += 1
        region.write(offset, data)

    # -- config space side effects -------------------------------------------

    def config_write(self, offset: int, data: bytes) -> None:
        msix_was_enabled = self.config.msix_enabled
        self.config.write(offset, data)
        self.update_intx()
        if self.config.msix is not None and (msix_was_enabled != self.config.msix_enabled
                                             or not self.config.msix_function_masked):
            self.release_msix()

    def intx_asserted(self) -> bool:
        """The device's own INTx condition; subclasses override."""
        return False

    def update_intx(self) -> None:
        """Recompute the INTx line and the status register's interrupt bit."""
        asserted = self.intx_asserted()
        self.config.set_interrupt_status(asserted)
        self.irqs.set_intx_level(asserted and not self.config.intx_disabled)

    # -- MSI-X -------------------------------------------------------------------

    def msix_notify(self, vector: int) -> bool:
        """Signal an MSI-X vector; it stays pending (PBA) while masked."""
        if self.config.msix is None or not 0 <= vector < self.config.msix.vectors:
            return False
        if self.config.msix_function_masked or self._msix_entry_masked(vector):
            self.irqs.msix.vectors[vector].pending = True
            return False
        return self.irqs.msix.trigger(vector)

    def _msix_entry_masked(self, vector: int) -> bool:
        return bool(self._msix_table[vector * MSIX_ENTRY_SIZE + 12] & 1)

    def release_msix(self) -> None:
        if self.config.msix is None or self.config.msix_function_masked:
            return
        for n in range(self.config.msix.vectors):
            if not self._msix_entry_masked(n):
                self.irqs.msix._release(n)

    def msix_bar_read(self, offset: int, count: int) -> bytes:
        layout = self.config.msix
        assert layout is not None
        if offset >= layout.pba_offset:
            pba = self.irqs.pending_bits(PciIrq.MSIX)
            start = offset - layout.pba_offset
            return pba[start:start + count].ljust(count, b"\0")
        start = offset - layout.table_offset
        return bytes(self._msix_table[start:start + count]).ljust(count, b"\0")

    def msix_bar_write(self, offset: int, data: bytes) -> None:
        # QEMU emulates the table itself and drops PBA writes; a client that
        # does forward table writes still gets a working mask bit.
        layout = self.config.msix
        assert layout is not None
        if offset >= layout.pba_offset:
            return
        start = offset - layout.table_offset
        end = min(start + len(data), len(self._msix_table))
        if start < end:
            self._msix_table[start:end] = data[:end - start]
            self.release_msix()

    # -- lifecycle -------------------------------------------------------------

    def reset(self) -> None:
        """DEVICE_RESET: registers to power-on values; DMA maps are kept."""
        self.config.reset()
        self.irqs.reset()
        self._msix_table[:] = bytes(len(self._msix_table))

    def client_connected(self) -> None:
        """A client (QEMU) has finished the VERSION handshake."""

    def client_disconnected(self) -> None:
        """The client is gone: interrupts are closed by the server."""

    def worker_started(self) -> None:
        """A new thread serves the client, which connected before it (a resume after
        a pause, or a connection handed over from another process)."""

    def worker_stopped(self) -> None:
        """That thread stopped without the client going (a pause)."""

    # -- hand-over to a new process (qbackend.app.upgrade) ---------------------

    def handover_refusal(self) -> str | None:
        """Why this device cannot be handed over to a new process (one line), or None."""
        return None

    def quiesce(self, timeout: float) -> bool:
        """Wait (blocking, at most `timeout` s) until the device runs nothing of its own
        (deferred jobs) and starts nothing until resume_jobs(); False if it did not settle."""
        return True

    def resume_jobs(self) -> None:
        """Let what quiesce() held back run."""

    def save_state(self, saver: Saver) -> State:
        """Under the lock, the device paused: what a device made from the same options in
        a new process needs to carry on (restore_state).  Here: config space (BAR
        addresses, command, capability registers; the masks come from the options)
        and the MSI-X table copy.  Subclasses extend it; interrupts and DMA maps
        belong to the connection and travel with it."""
        return {"config": base64.b64encode(self.config.data).decode(),
                "msix_table": base64.b64encode(self._msix_table).decode()}

    def restore_state(self, state: State, loader: Loader) -> None:
        """Under the lock, before serving: what save_state saved."""
        config = base64.b64decode(state["config"])
        table = base64.b64decode(state["msix_table"])
        if len(config) != len(self.config.data) or len(table) != len(self._msix_table):
            raise HandoverError(f"{self.name}: the state handed over is of a device of another shape")
        # In place: the native loop's plain windows point into these buffers.
        self.config.data[:] = config
        self._msix_table[:] = table

    def close(self) -> None:
        """The device is being destroyed: release what it owns."""
