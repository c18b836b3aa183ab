"""sPAPR (pseries) dynamic reconfiguration: connectors, their device-tree
properties, the DRC state machine with its RTAS calls, and hotplug event
logs, modelled on QEMU 11.1's pseries machine.  Everything here is sans-IO.

    fdt      dtb encode/decode, libfdt-style node building, dts text
    drc      connector types and indexes, machine topology, ibm,drc-* arrays,
             ibm,dynamic-reconfiguration-memory, node builders (LMB, CPU, PCI)
    state    DRC states and transitions, RTAS calls, configure-connector
    events   v6 hotplug event logs for check-exception
    ghash    GLib hash-table iteration order (QEMU's order of DRC entries)
    script   a line-oriented driver for the state machine (qbackend drc run)

The ``qbackend drc`` command group is in the command line's layer, and the
provisioned qemu-system-ppc64 is driven by ``qbackend.machine.ppc``.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qbackend.models.spapr.drc import DrcError, DrcType, MachineConfig, drc_index, split_index
    from qbackend.models.spapr.state import DrcSet, DrcState, RtasStatus

__all__ = ["DrcError", "DrcSet", "DrcState", "DrcType", "MachineConfig", "RtasStatus",
           "drc_index", "split_index"]

# Imported on first use, so that the command line registering the drc command
# does not load the model.
_HOME = {"DrcError": "drc", "DrcType": "drc", "MachineConfig": "drc", "drc_index": "drc", "split_index": "drc",
         "DrcSet": "state", "DrcState": "state", "RtasStatus": "state"}


def __getattr__(name: str) -> object:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{_HOME[name]}", __name__), name)
    globals()[name] = value
    return value
