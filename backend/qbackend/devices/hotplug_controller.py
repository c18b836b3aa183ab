"""The hotplug-controller PCI device: QEMU's ACPI hotplug register blocks,
kept in Python and served over vfio-user, so that guest drivers, firmware
and tools can watch and drive them.

BAR0 (4 KiB of MMIO) holds the memory-hotplug block at 0x000 (the
layout of QEMU's I/O ports 0xa00-0xa17), the PCI-hotplug block at 0x100
(the layout of 0xae00-0xae17 on pc, 0x0cc0 on q35) and, at 0xf00, the controller's
own interrupt-enable register (bit 0).  Once a driver sets it, the
interrupt (MSI-X vector 0, or INTx without MSI-X) is raised while an insert
or remove event is pending, the role GPE.3 plays for QEMU's own block.  It
starts disabled: with no driver to clear the events, a level-triggered INTx
would otherwise never drop.  Guest writes act as
the block says; an eject becomes an effect that the backend carries out
over QMP.

It is a `PciFunction` itself rather than a public `qbackend.devices.Device`:
its interrupt follows config space, which the public API gives a device no
hook on.  A guest that enables MSI-X while an event is pending must get the
vector then (`config_write`), and the INTx line counts only while MSI-X is
off (`intx_asserted`).
"""

from __future__ import annotations

from collections.abc import Callable

from qbackend.models.memhp import BLOCK_SIZE as MEMHP_SIZE
from qbackend.models.memhp import Effect, MemoryHotplugBlock
from qbackend.models.pci_config import Bar, ConfigSpace, MsixLayout
from qbackend.models.pcihp import BLOCK_SIZE as PCIHP_SIZE
from qbackend.models.pcihp import EjectSlot, PciHotplugBlock
from qbackend.plumbing.handover import HandoverError, Loader, Saver, State
from qbackend.protocol.vfio_user import PciRegion
from qbackend.vfio.function import PciFunction, Region
from qbackend.vfio.irqs import InterruptController

# 1234 is the vendor id QEMU's own test devices use (edu, bochs display);
# nobody owns it, and this device id is ours within it.
VENDOR_ID = 0x1234
DEVICE_ID = 0x11E0
CLASS_SYSTEM_OTHER = 0x088000
BAR0_SIZE = 4096
MSIX_BAR_SIZE = 4096
MEMHP_OFFSET = 0x000
PCIHP_OFFSET = 0x100
IRQ_ENABLE = 0xF00  # bit 0: raise the event interrupt


class HotplugController(PciFunction):
    name = "hotplug-controller"

    def __init__(self, memhp: MemoryHotplugBlock, pcihp: PciHotplugBlock | None = None,
                 on_effect: Callable[[Effect | EjectSlot], None] = lambda e: None) -> None:
        config = ConfigSpace(
            vendor_id=VENDOR_ID, device_id=DEVICE_ID, class_code=CLASS_SYSTEM_OTHER, revision=1,
            subsystem_vendor_id=VENDOR_ID, subsystem_id=DEVICE_ID,
            bars=(Bar(0, BAR0_SIZE), Bar(1, MSIX_BAR_SIZE)),
            interrupt_pin=1,
            msix=MsixLayout(vectors=1, bar=1),
        )
        super().__init__(config, InterruptController(intx=True, msix_vectors=1))
        self.memhp = memhp
        self.pcihp = pcihp if pcihp is not None else PciHotplugBlock()
        self.on_effect = on_effect
        self.effects: list[Effect | EjectSlot] = []  # every effect so far, for tests and logs
        self._pending = False
        self.irq_enable = 0
        self.regions[PciRegion.BAR0] = Region(BAR0_SIZE, self._bar0_read, self._bar0_write)
        self.regions[PciRegion.BAR1] = Region(MSIX_BAR_SIZE, self.msix_bar_read, self.msix_bar_write)

    # -- BAR0 -----------------------------------------------------------------------

    def _bar0_read(self, offset: int, count: int) -> bytes:
        out = bytearray()
        pos = offset
        while pos < offset + count:
            n = min(4, offset + count - pos)
            if MEMHP_OFFSET <= pos < MEMHP_OFFSET + MEMHP_SIZE:
                value = self.memhp.read(pos - MEMHP_OFFSET, n)
            elif PCIHP_OFFSET <= pos < PCIHP_OFFSET + PCIHP_SIZE:
                value = self.pcihp.read(pos - PCIHP_OFFSET, n)
            elif pos == IRQ_ENABLE:
                value = self.irq_enable & ((1 << (8 * n)) - 1)
            else:
                value = (1 << (8 * n)) - 1  # nothing decodes here: all ones, like an empty port
            out += value.to_bytes(n, "little")
            pos += n
        return bytes(out)

    def _bar0_write(self, offset: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            n = min(4, len(data) - pos)
            at = offset + pos
            value = int.from_bytes(data[pos:pos + n], "little")
            effects: list[Effect | EjectSlot] = []
            if MEMHP_OFFSET <= at < MEMHP_OFFSET + MEMHP_SIZE:
                effects += self.memhp.write(at - MEMHP_OFFSET, n, value)
            elif PCIHP_OFFSET <= at < PCIHP_OFFSET + PCIHP_SIZE:
                effects += self.pcihp.write(at - PCIHP_OFFSET, n, value)
            elif at == IRQ_ENABLE:
                self.irq_enable = data[pos] & 1
            for effect in effects:
                self.effects.append(effect)
                self.on_effect(effect)
            pos += n
        self.update_interrupt()

    # -- the interrupt --------------------------------------------------------------

    @property
    def event_pending(self) -> bool:
        return self.memhp.event_pending or self.pcihp.event_pending

    def intx_asserted(self) -> bool:
        return bool(self.irq_enable) and self.event_pending and not self.config.msix_enabled

    def update_interrupt(self) -> None:
        """Raise or lower the event interrupt after the blocks changed (call under self.lock)."""
        pending = bool(self.irq_enable) and self.event_pending
        if pending and not self._pending and self.config.msix_enabled:
            self.msix_notify(0)
        self._pending = pending
        self.update_intx()

    def config_write(self, offset: int, data: bytes) -> None:
        super().config_write(offset, data)
        self.update_interrupt()

    # -- hand-over to a new process (qbackend.app.upgrade) ------------------------------

    def save_state(self, saver: Saver) -> State:
        """Besides config space: both register blocks (every slot, the selectors, the OST
        registers, the faults set over QMP, the PCI up/down/removable bits) and the event
        interrupt (its enable and whether it is raised).  The slot managers keep what
        they know of QEMU in the backend's "hotplug" part."""
        state = super().save_state(saver)
        state.update(memhp=self.memhp.save(), pcihp=self.pcihp.save(), irq_enable=self.irq_enable,
                     irq_pending=self._pending)
        return state

    def restore_state(self, state: State, loader: Loader) -> None:
        """In place: the slot managers of the new process hold these very blocks."""
        super().restore_state(state, loader)
        try:
            self.memhp.restore(state["memhp"])
            self.pcihp.restore(state["pcihp"])
        except ValueError as exc:
            raise HandoverError(f"{self.name}: {exc}") from None
        self.irq_enable = int(state["irq_enable"]) & 1
        self._pending = bool(state["irq_pending"])

    def reset(self) -> None:
        # The slots survive a reset, as QEMU's do: what is plugged stays plugged.  What was
        # plugged before the reset is present at boot, so its insert event is not pending
        # any more (the guest's firmware and ACPI find it as they find cold-plugged devices);
        # a pending PCI removal is carried out by QEMU at the reset.  The interrupt enable
        # does not survive either.
        super().reset()
        self.memhp.machine_reset()
        self.pcihp.machine_reset()
        self.irq_enable = 0
        self._pending = False
