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
- **Reload**: `qbackend device reload ID` (QMP ``device-reload``) loads the
  device's module again and puts a new instance of its class in the old
  one's place while the guest runs (qbackend.devices.reload): the
  connection, config space, interrupts and DMA stay.  The new instance
  takes the old one's state by `reloaded(old)`; by default every attribute
  of the old instance is copied over the new one's (the registers the guest
  set carry over; attributes only the new `__init__` sets keep their new
  value).  Override it where an attribute changed meaning.
- **Upgrade**: `qbackend upgrade` hands a running qbackend to a new process
  (the code installed now) while QEMU stays connected.  A device takes part
  by giving its class a pair of hooks: `save_state() -> dict` returns its
  state as JSON-able values (registers, buffers as lists or base64 text, an
  interrupt it still owes), and `restore_state(state)` puts that state in a
  new instance made from the same `--device` keys.  Both run under the
  device's lock, with nothing of the device running: the guest's accesses
  wait, and the jobs given to `defer` have ended (jobs deferred meanwhile
  start after).  Config space, interrupts, DMA maps and the memory of
  mappable BARs travel without the device's help.  A class without both
  hooks is refused, and the whole upgrade with it (nothing changes).
- **Tracing and replay**: every access, interrupt, DMA and lifecycle event
  can be recorded (``trace=FILE`` among the `--device` keys, QMP
  ``device-trace-start``; qbackend.vfio.trace) and replayed against the
  class without QEMU (``qbackend replay``; qbackend.devices.replay).

Everything a BAR callback does runs under the device's lock (`self.lock`,
re-entrant); take it yourself in code that runs elsewhere (`defer`, your
own threads) and touches the same state.

When a callback goes wrong, the device is at fault, never the server, and
the device keeps being served (qbackend.devices.faults):

- **A callback that raises** (`bar_read`, `bar_write`, `reset`,
  `connected`, `disconnected`, a job given to `defer`): the access is
  answered as if nothing were there (a read gets all ones of its size, a
  write is dropped), the device stays connected and serves the next access
  at once.  The fault is logged with the device's id, the access (BAR,
  offset, size, the value of a write) and your traceback, once per place
  (the file and line that raised); later faults there are only counted.
- **A value that does not fit its read**: `bar_read` must return an `int`
  from 0 to ``(1 << 8 * size) - 1``; anything else (wider, negative, not
  an int) is a fault as above, not truncated: mask it yourself
  (``value & 0xFFFFFFFF``) where a narrower read of a wider register
  should see its low bytes.
- **A callback that does not return**: after a second (``stall=SECONDS``
  among the `--device` keys) its current stack is logged, once per stuck
  call.  QEMU waits 5 s for each reply, then the guest reads all ones; a
  stuck callback holds the device's lock, so the device serves nothing
  else meanwhile.  Ctrl-C and SIGTERM still stop qbackend within a few
  seconds, its sockets removed.

Faults and stalls are counted (`faults`, `stalls` in the device's
statistics); the pytest plugin fails the test during which a device of
its guest faulted or stalled, with the traceback or stack in the report.

That is all a `Device` has: the entry points the vfio-user server calls
(config space, region accesses, interrupt set-up, the client's coming and
going) are on a `UserFunction`, a `PciFunction` that each `Device` gets in
`Device.__init__` and that is what gets served.  So a subclass may name its
own methods and attributes as it likes (`read`, `close`, `config`, `name`,
...) without replacing one of the server's.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from qbackend.devices.faults import CALLERS, Access, DeviceFaults
from qbackend.errors import DeviceError
from qbackend.models.pci_config import Bar as _ConfigBar
from qbackend.models.pci_config import (
    Capability,
    ConfigSpace,
    ExtendedCapability,
    MsiLayout,
    MsixLayout,
)
from qbackend.plumbing.handover import HandoverError, Loader, Saver, State
from qbackend.plumbing.native_lock import Lock
from qbackend.vfio.function import DmaPort, PciFunction, Region
from qbackend.vfio.irqs import InterruptController
from qbackend.vfio.trace import Tracer, running_job
from qbackend.vfio.trace import stop as stop_trace

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
    `bar_write`, `reset`, `connected`, `disconnected`, `reloaded`, and the
    pair `save_state` / `restore_state` (its state across `qbackend
    upgrade`; without them the device cannot be handed over).  What it may call:
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

    def reloaded(self, old: Device) -> None:
        """This instance replaces `old` (a reload of the device's module, under the
        device's lock, before any callback reaches this one).  Default: every
        attribute of `old` is copied onto this one, so the state the guest set
        carries over; attributes `old` lacks keep what this `__init__` set."""
        mine = "_Device__function"
        self.__dict__.update({k: v for k, v in old.__dict__.items() if k != mine})

    def save_state(self) -> dict[str, Any]:
        """`qbackend upgrade`: this device's state as JSON-able values (dict, list, str,
        int, float, bool, None), for `restore_state` in the new process.  Called under
        the device's lock, with no access or deferred job running.  Override it
        together with `restore_state`; a class that does not cannot be handed over."""
        raise NotImplementedError(f"{type(self).__name__} has no save_state")

    def restore_state(self, state: dict[str, Any]) -> None:
        """In the new process, on an instance made from the same `--device` keys, under the
        lock, before any access: take the state `save_state` returned."""
        raise NotImplementedError(f"{type(self).__name__} has no restore_state")

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
        return self.__function.dma_read(address, count)

    def dma_write(self, address: int, data: bytes) -> None:
        """Write `data` into guest memory at guest-physical `address`."""
        self.__function.dma_write(address, data)

    def defer(self, fn: Callable[..., object], *args: object) -> None:
        """Run `fn(*args)` soon in a background thread (for DMA messages, slow work);
        an exception it raises is a fault of the device (logged and counted)."""
        function = self.__function
        faults = function.faults
        tracer = function.tracer
        job = tracer.next_job() if tracer is not None else None
        name = getattr(fn, "__qualname__", str(fn))

        def run() -> None:
            with running_job(job):
                try:
                    fn(*args)
                except Exception as exc:
                    faults.raised(exc, f"deferred {name}()", "the job ended")
                finally:
                    if job is not None and function.tracer is tracer and tracer is not None:
                        tracer.job_ended(job, name)

        function.start_job(run)

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
    the device were a PciFunction itself.  Every call into the device is
    made inside a `try` (free in CPython 3.11 while nothing raises) that
    turns an exception into a fault of the device (`faults`,
    qbackend.devices.faults): never into an error of the server's.
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
        self.name = cls.__name__
        self.faults = DeviceFaults(lambda: self.name)
        self._worker: int | None = None  # the thread serving the client (watched for stalls)
        self.has_intx = cls.intx
        self.intx_level = False  # raise_irq() in INTx mode until lower_irq()
        self.memories: dict[int, tuple[int, mmap.mmap]] = {}
        # The device's deferred jobs: how many run, and those held back while paused (quiesce).
        self._jobs = 0
        self._jobs_changed = threading.Condition()
        self._held_jobs: list[Callable[[], None]] | None = None
        # Where the device came from (`--device class=SPEC` and its other keys), for reload and traces.
        self.origin: tuple[str, dict[str, str]] | None = None
        for bar in cls.bars:
            if bar.shared:
                fd = os.memfd_create(f"qbackend-{cls.__name__}-bar{bar.index}", os.MFD_CLOEXEC)
                os.ftruncate(fd, bar.size)
                memory = mmap.mmap(fd, bar.size)
                self.memories[bar.index] = (fd, memory)
        if msix is not None:
            self.regions[cls.msix_bar] = Region(msix.pba_offset * 2, self.msix_bar_read, self.msix_bar_write)
        self._bind(device)

    def _bind(self, device: Device) -> None:
        """Serve `device`: its hooks and BAR callbacks, looked up once here."""
        cls = type(device)
        self.device = device
        self._device_reset = device.reset
        self._device_connected = device.connected
        self._device_disconnected = device.disconnected
        bar_read, bar_write = device.bar_read, device.bar_write
        for bar in cls.bars:
            if bar.shared:
                fd, memory = self.memories[bar.index]
                read, write = _memory_reader(memory), _memory_writer(memory)
                if bar.mappable_areas:
                    read, write = _sparse(bar.mappable_areas, (read, write),
                                          (_reader(bar_read, bar.index, self.faults),
                                           _writer(bar_write, bar.index, self.faults)))
                self.regions[bar.index] = Region(bar.size, read, write, mmap_fd=fd,
                                                 mmap_areas=tuple(sorted(bar.mappable_areas)))
            else:
                self.regions[bar.index] = Region(bar.size, _reader(bar_read, bar.index, self.faults),
                                                 _writer(bar_write, bar.index, self.faults))
            if self.faults.accesses is not None:
                self._record(bar.index)

    def replace_device(self, new: Device) -> Device:
        """Serve `new` in place of the current device (a reload): under the lock,
        `new.reloaded(old)`, then every callback reaches `new`; the connection,
        config space, interrupts, DMA and shared BAR memory stay.  `new` must
        declare what the old class declared (qbackend.devices.reload checks).
        Returns the old device."""
        spare = function_of(new)
        with self.lock:
            old = self.device
            new.reloaded(old)
            new._Device__function = self  # type: ignore[attr-defined]  # Device.__function, mangled
            self._bind(new)
        if spare is not self:
            spare.close()
        return old

    # -- deferred jobs, for Device.defer --

    def start_job(self, run: Callable[[], None]) -> None:
        """Run `run` in a thread of its own now, or at resume_jobs() while quiesced."""
        with self._jobs_changed:
            if self._held_jobs is not None:
                self._held_jobs.append(run)
                return
            self._jobs += 1

        def job() -> None:
            try:
                run()
            finally:
                with self._jobs_changed:
                    self._jobs -= 1
                    self._jobs_changed.notify_all()

        threading.Thread(target=job, name=f"{self.name}-deferred", daemon=True).start()

    def quiesce(self, timeout: float) -> bool:
        with self._jobs_changed:
            if self._held_jobs is None:
                self._held_jobs = []
            return self._jobs_changed.wait_for(lambda: self._jobs == 0, timeout)

    def resume_jobs(self) -> None:
        with self._jobs_changed:
            held, self._held_jobs = self._held_jobs or [], None
        for run in held:
            self.start_job(run)

    # -- hand-over to a new process (qbackend.app.upgrade) --

    def describe(self) -> str:
        """The device's class as `--device class=` named it."""
        if self.origin is not None:
            return self.origin[0]
        cls = type(self.device)
        return f"{cls.__module__}:{cls.__qualname__}"

    def handover_refusal(self) -> str | None:
        cls = type(self.device)
        if cls.save_state is Device.save_state or cls.restore_state is Device.restore_state:
            return (f"device {self.name} ({self.describe()}) cannot be handed over: its class has no "
                    "save_state/restore_state")
        return None

    def save_state(self, saver: Saver) -> State:
        """Config space and MSI-X (PciFunction), the INTx level, the memory of shared BARs
        (the guest has it mapped: its fds travel) and the device's own save_state()."""
        state = super().save_state(saver)
        try:
            own = self.device.save_state()
            json.dumps(own)
        except Exception as exc:
            raise HandoverError(f"device {self.name} ({self.describe()}): its save_state() failed: "
                                f"{type(exc).__name__}: {exc}") from None
        state.update(intx_level=self.intx_level, device=own,
                     memories={str(index): saver.fd(fd) for index, (fd, _memory) in self.memories.items()})
        return state

    def restore_state(self, state: State, loader: Loader) -> None:
        super().restore_state(state, loader)
        memories = {int(index): fd_index for index, fd_index in state["memories"].items()}
        if set(memories) != set(self.memories):
            raise HandoverError(f"device {self.name}: handed over with shared BARs {sorted(memories)}, "
                                f"made with {sorted(self.memories)}")
        for index, fd_index in memories.items():
            fd = loader.take(fd_index)
            size = len(self.memories[index][1])
            try:
                if os.fstat(fd).st_size < size:
                    raise HandoverError(f"device {self.name}: the memory of BAR{index} handed over is too small")
                memory = mmap.mmap(fd, size)
            except BaseException:
                os.close(fd)
                raise
            old_fd, old_memory = self.memories[index]
            self.memories[index] = (fd, memory)
            old_memory.close()
            os.close(old_fd)
        self._bind(self.device)  # the BAR handlers over the memory the guest has mapped
        self.intx_level = bool(state["intx_level"])
        with self._jobs_changed:  # jobs restore_state defers wait for the server (resume_jobs)
            if self._held_jobs is None:
                self._held_jobs = []
        try:
            self.device.restore_state(state["device"])
        except Exception as exc:
            raise HandoverError(f"device {self.name} ({self.describe()}): its restore_state() failed: "
                                f"{type(exc).__name__}: {exc}") from None

    def worker_started(self) -> None:
        # As client_connected does for the thread that saw the VERSION.
        if self._worker is None:
            self._worker = threading.get_ident()
            self.faults.watch()

    def worker_stopped(self) -> None:
        if self._worker is not None:
            self.faults.unwatch(self._worker)
            self._worker = None

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
            sent = self._raise(mode, vector)
            tracer = self.tracer
            return sent if tracer is None else tracer.irq(vector, mode, sent)

    def _raise(self, mode: str, vector: int) -> bool:
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
            if self.tracer is not None:
                self.tracer.irq_lower()

    def dma_read(self, address: int, count: int) -> bytes:
        tracer = self.tracer
        if tracer is None:
            return self.dma().read(address, count)
        return tracer.dma_read(address, count, lambda: self.dma().read(address, count))

    def dma_write(self, address: int, data: bytes) -> None:
        tracer = self.tracer
        if tracer is None:
            self.dma().write(address, data)
        else:
            tracer.dma_write(address, data, lambda: self.dma().write(address, data))

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
        self._call_hook(self._device_reset, "reset")

    def client_connected(self) -> None:
        # The server calls this in the thread that serves the client (on its
        # VERSION): from now on that thread's callbacks are watched for stalls.
        if self._worker is None:
            self._worker = threading.get_ident()
            self.faults.watch()
        self._call_hook(self._device_connected, "connected")

    def client_disconnected(self) -> None:
        with self.lock:
            self.intx_level = False
        if self._worker is not None:
            self.faults.unwatch(self._worker)
            self._worker = None
        self._call_hook(self._device_disconnected, "disconnected")

    def _call_hook(self, hook: Callable[[], object], name: str) -> None:
        """A device's lifecycle hook; an exception is its fault.  Watched for stalls
        in whichever thread calls it (this function's frame marks where the
        device's code begins: faults.CALLERS)."""
        faults = self.faults
        faults.watch()
        try:
            hook()
        except Exception as exc:
            faults.raised(exc, f"{name}()", "the server goes on")
        finally:
            faults.unwatch()

    def record_accesses(self, keep: int = 32) -> None:
        """Keep the device's latest `keep` BAR accesses in ``faults.accesses`` (for
        reports of failed tests); costs a little on each access, so only on request."""
        if self.faults.accesses is not None:
            return
        self.faults.record_accesses(keep)
        for bar in type(self.device).bars:
            self._record(bar.index)

    def _record(self, index: int) -> None:
        region = self.regions[index]
        region.read = _recording_reader(region.read, index, self.faults)
        region.write = _recording_writer(region.write, index, self.faults)

    def close(self) -> None:
        if isinstance(self.tracer, Tracer):  # its file ends with the device
            stop_trace(self)
        for fd, memory in self.memories.values():
            memory.close()
            os.close(fd)
        self.memories.clear()


# BAR accesses of sizes other than 1, 2, 4, 8 are split into 4-, 2- and 1-byte pieces.
# A callback's exception, or a read's value that is not an int of its size
# (int.to_bytes checks both, for nothing more than the conversion costs), is
# the device's fault: reported, answered all ones (a read) or dropped (a write).

def _pieces(count: int) -> list[tuple[int, int]]:
    out, pos = [], 0
    while pos < count:
        n = 4 if count - pos >= 4 else 2 if count - pos >= 2 else 1
        out.append((pos, n))
        pos += n
    return out


def _reader(bar_read: Callable[[int, int, int], int], bar: int, faults: DeviceFaults) -> Callable[[int, int], bytes]:
    to_bytes = int.to_bytes  # unbound: a value that is not an int is a TypeError, not a call of its own method

    def read(offset: int, count: int) -> bytes:
        if count in _ALL_ONES:
            try:
                value = bar_read(bar, offset, count)
            except Exception as exc:
                return faults.read_raised(exc, bar, offset, count)
            try:
                return to_bytes(value, count, "little")
            except (TypeError, OverflowError):
                return faults.bad_value(bar_read, value, bar, offset, count)
        return b"".join(read(offset + pos, n) for pos, n in _pieces(count))
    return read


def _writer(bar_write: Callable[[int, int, int, int], None], bar: int,
            faults: DeviceFaults) -> Callable[[int, bytes], None]:
    from_bytes = int.from_bytes

    def write(offset: int, data: bytes) -> None:
        size = len(data)
        if size in _ALL_ONES:
            value = from_bytes(data, "little")
            try:
                bar_write(bar, offset, size, value)
            except Exception as exc:
                faults.write_raised(exc, bar, offset, size, value)
            return
        for pos, n in _pieces(size):
            write(offset + pos, data[pos:pos + n])
    return write


# Where a device's code begins, for the stall watcher: the frames below these are the user's.
CALLERS.update({_reader(lambda bar, offset, size: 0, 0, DeviceFaults(str)).__code__,
                _writer(lambda bar, offset, size, value: None, 0, DeviceFaults(str)).__code__,
                UserFunction._call_hook.__code__})


def _recording_reader(read: Callable[[int, int], bytes], bar: int,
                      faults: DeviceFaults) -> Callable[[int, int], bytes]:
    def recording(offset: int, count: int) -> bytes:
        before = faults.faults
        data = read(offset, count)
        if faults.accesses is not None:
            faults.accesses.append(Access("read", bar, offset, count,
                                          int.from_bytes(data, "little") if faults.faults == before else None))
        return data
    return recording


def _recording_writer(write: Callable[[int, bytes], None], bar: int,
                      faults: DeviceFaults) -> Callable[[int, bytes], None]:
    def recording(offset: int, data: bytes) -> None:
        before = faults.faults
        write(offset, data)
        if faults.accesses is not None:
            faults.accesses.append(Access("write", bar, offset, len(data),
                                          int.from_bytes(data, "little") if faults.faults == before else None))
    return recording


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
