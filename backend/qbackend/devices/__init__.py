"""The PCI devices qbackend serves, and the public API for writing your own.

`Device` and `Bar` (from `qbackend.devices.api`) are the stable API; the
built-in devices are `qbackend.devices.ivshmem` and
`qbackend.devices.hotplug_controller`.
"""

from qbackend.devices.api import Bar, Device

__all__ = ["Bar", "Device"]
