"""Loading a user's device class from `--device ...,class=SPEC`.

SPEC is ``package.module:ClassName`` (imported as Python imports it, with
the current directory on the path) or ``path/to/file.py:ClassName`` (that
file, whatever the current package layout).  The class must derive from
`qbackend.devices.Device`.

`reload_device` loads the module again and puts a new instance in a served
device's place (QMP ``device-reload``, ``qbackend device reload ID``).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

from qbackend.devices.api import Device, UserFunction, function_of
from qbackend.devices.faults import STALL_AFTER
from qbackend.errors import UsageError
from qbackend.options import DeviceOptions


def load_class(spec: str, *, fresh: bool = False) -> type[Device]:
    """The class `spec` names; `fresh`: its module loaded again from its source."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise UsageError(f"class={spec}: MODULE:CLASS or path/to/file.py:CLASS")
    module = _load_file(Path(where)) if where.endswith(".py") or os.sep in where else _import(where, fresh)
    cls = getattr(module, name, None)
    if cls is None:
        raise UsageError(f"class={spec}: {where} has no {name}")
    if not (isinstance(cls, type) and issubclass(cls, Device)):
        raise UsageError(f"class={spec}: {name} is not a qbackend.devices.Device")
    return cls


def _import(name: str, fresh: bool = False) -> ModuleType:
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        if fresh and name in sys.modules:
            importlib.invalidate_caches()
            return importlib.reload(sys.modules[name])
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
    before = sys.modules.get(module_name)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        if before is not None:  # a reload that failed: the module loaded before stays
            sys.modules[module_name] = before
        else:
            sys.modules.pop(module_name, None)
        raise
    return module


def make_device(opts: DeviceOptions) -> Device:
    """An instance of the user's class with the option's other keys (but ``stall=SECONDS``:
    how long a callback may run before its stack is logged, qbackend.devices.faults; and
    ``trace=FILE``: trace the device from the start, qbackend.vfio.trace)."""
    cls = load_class(opts.cls)
    kwargs = dict(opts.kwargs)
    trace = kwargs.pop("trace", None)
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
    function = function_of(device)
    function.faults.stall_after = stall_after
    function.origin = (opts.cls, kwargs)
    if trace:
        from qbackend.vfio import trace as tracing

        tracing.start(function, tracing.Tracer(opts.id or cls.__name__, path=trace,
                                               header={"class": opts.cls, "args": kwargs}))
    return device


# What a reloaded class must declare as its predecessor did: the config space,
# regions and interrupts stay as QEMU and the guest know them.
LAYOUT = ("vendor_id", "device_id", "class_code", "revision", "subsystem_vendor_id", "subsystem_id", "bars",
          "intx", "msi_vectors", "msix_vectors", "msix_bar", "capabilities", "extended_capabilities")


def reload_device(function: UserFunction) -> Device:
    """Load a served user device's module again and serve a new instance of its
    class (the same constructor keys) in the old one's place: the new one takes
    the old one's state (`Device.reloaded`), the connection, interrupts and DMA
    stay.  Raises UsageError, the old device still serving, when the module does
    not load (a syntax error...), the class is gone, its constructor raises, it
    declares another PCI layout, or `reloaded` raises.  Returns the new device."""
    if function.origin is None:
        raise UsageError(f"{function.name}: not loaded from class=MODULE:CLASS, so there is nothing to reload")
    spec, kwargs = function.origin
    old_cls = type(function.device)
    try:
        cls = load_class(spec, fresh=True)
    except UsageError:
        raise
    except BaseException as exc:  # whatever the module's code raised as it ran
        raise UsageError(f"{function.name}: {spec} does not load: {_one_line(exc)}") from None
    changed = [name for name in LAYOUT if getattr(cls, name) != getattr(old_cls, name)]
    if changed:
        raise UsageError(f"{function.name}: the reloaded {cls.__name__} declares other {', '.join(changed)} "
                         "than the one served (a reload keeps the PCI layout QEMU knows: restart for that)")
    try:
        new = cls(**kwargs)
    except Exception as exc:
        raise UsageError(f"{function.name}: {cls.__name__}() raised {_one_line(exc)}") from None
    try:
        function.replace_device(new)
    except Exception as exc:
        function_of(new).close()
        raise UsageError(f"{function.name}: {cls.__name__}.reloaded() raised {_one_line(exc)}") from None
    tracer = function.tracer
    if tracer is not None:
        tracer.note("reload", **{"class": spec})
    return new


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} ({Path(exc.filename or '?').name}, line {exc.lineno})"
    return f"{type(exc).__name__}: {exc}".splitlines()[0]
