"""The QMP commands of a qbackend process, one module per part of the backend.

Each module declares its commands' argument schemas (`CommandSpec`) beside
their handlers, and `register(monitor, backend)` adds them; the schemas are
checked by `qbackend.protocol.qmp` before a handler runs, so a handler sees
only well-typed arguments.  Names are QMP style (kebab-case); events are
QEMU style (UPPER_CASE).  `query-commands` lists them all and README.md
documents them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qbackend.app.commands import devices, exports, faults, ivshmem, memory, objects, pci, upgrade

if TYPE_CHECKING:
    from qbackend.app.service import Backend
    from qbackend.servers.qmp_monitor import QmpMonitor


def register_all(monitor: QmpMonitor, backend: Backend) -> None:
    for module in (memory, pci, ivshmem, faults, objects, exports, devices, upgrade):
        module.register(monitor, backend)
