"""Loading a user's device class from `--device ...,class=SPEC`.

SPEC is ``package.module:ClassName`` (imported as Python imports it, with
the current directory on the path) or ``path/to/file.py:ClassName`` (that
file, whatever the current package layout).  The class must derive from
`qbackend.devices.Device`.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from qbackend.devices.api import Device, function_of
from qbackend.devices.faults import STALL_AFTER
from qbackend.errors import UsageError
from qbackend.options import DeviceOptions


def load_class(spec: str) -> type[Device]:
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UsageError(f"class={spec}: MODULE:CLASS or path/to/file.py:CLASS")
    module = _load_file(Path(where)) if where.endswith(".py") or os.sep in where else _import(where)
    cls = getattr(module, name, None)
    if cls is None:
        raise UsageError(f"class={spec}: {where} has no {name}")
    if not (isinstance(cls, type) and issubclass(cls, Device)):
        raise UsageError(f"class={spec}: {name} is not a qbackend.devices.Device")
    return cls


def _import(name: str) -> ModuleType:
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise UsageError(f"class: cannot import {name}: {exc}") from None


def _load_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise UsageError(f"class: {path} does not exist")
    # A name of its own per file, so that two files called device.py do not collide.
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    module_name = f"qbackend_user_{path.stem}_{digest}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"class: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def make_device(opts: DeviceOptions) -> Device:
    """An instance of the user's class with the option's other keys (but ``stall=SECONDS``:
    how long a callback may run before its stack is logged, qbackend.devices.faults)."""
    cls = load_class(opts.cls)
    kwargs = dict(opts.kwargs)
    stall = kwargs.pop("stall", None)
    stall_after = STALL_AFTER
    if stall is not None:
        try:
            stall_after = float(stall)
        except ValueError:
            stall_after = -1.0
        if not 0 < stall_after < 3600:
            raise UsageError(f"--device stall={stall}: seconds, more than 0 (e.g. stall=0.5)")
    try:
        device = cls(**kwargs)
    except TypeError as exc:
        keys = ", ".join(k for k, _ in opts.kwargs) or "none"
        raise UsageError(f"--device class={opts.cls}: {cls.__name__}() does not take these keys ({keys}): {exc}") \
            from None
    except ValueError as exc:  # a key's value the class refuses, e.g. int("abc")
        given = ", ".join(f"{k}={v}" for k, v in opts.kwargs)
        raise UsageError(f"--device class={opts.cls}: {cls.__name__}({given}): {exc}") from None
    function_of(device).faults.stall_after = stall_after
    return device
