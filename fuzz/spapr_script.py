"""The sPAPR DRC script (`qbackend drc run`), line by line.

Documented outcome: ``run_line`` returns None (blank or comment) or a JSON-able
dict (``"ok": false`` with ``"error"`` for a refused request), or raises a
`QbackendError`.
"""

from __future__ import annotations

import json

from qbackend.errors import QbackendError
from qbackend.models.spapr.drc import MachineConfig
from qbackend.models.spapr.script import Script

CONFIG = MachineConfig(cpus=1, maxcpus=4, memory=1 << 30, maxmem=2 << 30, slots=4, phbs=(1,))
MAX_LINES = 64


def test_one_input(data: bytes) -> None:
    script = Script(CONFIG, hp_event_source=bool(data[:1]) and data[0] & 1 == 1)
    for line in data[1:].decode("utf-8", "replace").splitlines()[:MAX_LINES]:
        try:
            out = script.run_line(line)
        except QbackendError:
            continue
        if out is not None:
            assert isinstance(out, dict) and isinstance(out.get("ok"), bool), out
            json.dumps(out)
