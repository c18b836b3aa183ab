"""A mailbox device: PCI capabilities and a sparse BAR, on qbackend's device API.

Serve it from a checkout:

    qbackend serve --device socket=/tmp/mbox.sock,class=examples/caps_and_sparse.py:Mailbox

PCI 1234:0ca5, class "unassigned" (0xff0000), INTx and one MSI vector, and
these capabilities: power management (D0 and D3hot), PCI Express (an
endpoint, 256-byte payloads, 5 GT/s x4), a vendor-specific one holding
b"qbackend-mailbox", and at 0x100 the Device Serial Number extended
capability (serial number 0x0123456789abcdef); so its config space is
4 KiB.

BAR0 is 8 KiB: page 0 is registers, trapped to `bar_read`/`bar_write`;
page 1 is the mailbox, shared memory QEMU maps into the guest, which the
driver writes without the device hearing of it.  4-byte registers:

    0x00  ID        reads 0x4d424f58 ("MBOX")
    0x04  DOORBELL  write N: the device reads the first N bytes of the
                    mailbox (at most 4096), counts the ring, keeps the
                    length and CRC-32 of what it read, and raises its
                    interrupt; reads the number of rings
    0x08  LENGTH    the length read at the last ring
    0x0c  CRC       the CRC-32 of the bytes read at the last ring
    0x10  ACK       write anything: lowers INTx

Other offsets of page 0 read zero and ignore writes.  `accesses` counts
every call of `bar_read`/`bar_write` (what a test checks stayed still
while the guest wrote the mailbox); `message` is the last bytes read.
"""

from __future__ import annotations

import zlib

from qbackend.devices import (
    Bar,
    Device,
    DeviceSerialNumber,
    PciExpress,
    PowerManagement,
    VendorSpecific,
)

PAGE = 4096
MAILBOX = PAGE  # the mailbox page's offset in BAR0
IDENTIFICATION = 0x4D424F58  # "MBOX", most significant byte first
REG_ID, REG_DOORBELL, REG_LENGTH, REG_CRC, REG_ACK = 0x00, 0x04, 0x08, 0x0C, 0x10
VENDOR_DATA = b"qbackend-mailbox"
SERIAL = 0x0123_4567_89AB_CDEF


class Mailbox(Device):
    vendor_id, device_id = 0x1234, 0x0CA5
    class_code = 0xFF0000
    bars = (Bar(0, 2 * PAGE, mappable_areas=((MAILBOX, PAGE),)),)
    msi_vectors = 1
    capabilities = (PowerManagement(), PciExpress(max_payload=256, link_speed=2, link_width=4),
                    VendorSpecific(VENDOR_DATA))
    extended_capabilities = (DeviceSerialNumber(SERIAL),)

    def __init__(self) -> None:
        super().__init__()
        self.accesses = 0
        self.rings = 0
        self.length = 0
        self.crc = 0
        self.message = b""

    def bar_read(self, bar: int, offset: int, size: int) -> int:
        self.accesses += 1
        if size != 4:
            return 0
        return {REG_ID: IDENTIFICATION, REG_DOORBELL: self.rings, REG_LENGTH: self.length,
                REG_CRC: self.crc}.get(offset, 0)

    def bar_write(self, bar: int, offset: int, size: int, value: int) -> None:
        self.accesses += 1
        if size != 4:
            return
        if offset == REG_DOORBELL:
            length = min(value, PAGE)
            self.message = bytes(self.bar_memory(0)[MAILBOX:MAILBOX + length])
            self.rings += 1
            self.length = length
            self.crc = zlib.crc32(self.message)
            self.raise_irq()
        elif offset == REG_ACK:
            self.lower_irq()

    def reset(self) -> None:
        self.rings = self.length = self.crc = 0
        self.message = b""
