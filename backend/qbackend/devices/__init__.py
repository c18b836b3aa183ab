"""The PCI devices qbackend serves, and the public API for writing your own.

`Device` and `Bar` (from `qbackend.devices.api`) and the capabilities a
device may declare (`PowerManagement`, `PciExpress`, `VendorSpecific`,
`DeviceSerialNumber`, from `qbackend.models.pci_config`) are the stable API; the
built-in devices are `qbackend.devices.ivshmem` and
`qbackend.devices.hotplug_controller`.
"""

from qbackend.devices.api import Bar, Device
from qbackend.models.pci_config import DeviceSerialNumber, PciExpress, PowerManagement, VendorSpecific

__all__ = ["Bar", "Device", "DeviceSerialNumber", "PciExpress", "PowerManagement", "VendorSpecific"]
