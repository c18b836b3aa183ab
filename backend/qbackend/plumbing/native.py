"""qbackend's C helpers, loaded with cffi; built with the package (native_build).

A few hot loops are in C (the device lock, the vfio-user register access
loop, the NBD transmission loop and its read map).  Each was compiled when
the package was built, into `lib<name>.so` beside its source, and is loaded
here with `cffi.FFI.dlopen` (ABI mode) and the declarations in its `.h`.
Nothing is compiled at run time.

`QBACKEND_NATIVE` chooses:

- `auto` (the default): a helper that is not there (a wheel built without
  a compiler) is said once in the log, and its callers run their pure-Python
  path, which serves the same bytes, only slower;
- `off` (also `0`, `no`, `false`): every caller runs its Python path;
- `require`: a helper that does not load is an error, named, at start-up
  (`check_required`, which the command line calls) and at every load.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Any

from qbackend.errors import QbackendError, UsageError
from qbackend.plumbing.native_build import HELPERS, library_name

log = logging.getLogger(__name__)

ENV_SWITCH = "QBACKEND_NATIVE"
PACKAGE = Path(__file__).resolve().parent.parent
MODES = ("auto", "off", "require")


class NativeMissing(QbackendError):
    """A helper did not load while `QBACKEND_NATIVE=require`."""


def mode() -> str:
    """`auto`, `off` or `require`, from `QBACKEND_NATIVE`."""
    value = os.environ.get(ENV_SWITCH, "auto").strip().lower()
    if value in ("off", "0", "no", "false"):
        return "off"
    if value in ("", "auto", "on", "1", "yes", "true"):
        return "auto"
    if value == "require":
        return "require"
    raise UsageError(f"{ENV_SWITCH}={value!r}: use auto, off or require")


def enabled() -> bool:
    """Whether native helpers may be used."""
    return mode() != "off"


class Native:
    """One loaded helper library: `ffi` (cffi.FFI) and `lib` (its functions)."""

    def __init__(self, ffi: Any, lib: Any) -> None:
        self.ffi = ffi
        self.lib = lib


def load(source: Path) -> Native | None:
    """The helper built from `source` (a .c file of the package), or None when helpers are
    off or this one is not there (said once per process; an error under `require`)."""
    chosen = mode()
    if chosen == "off":
        return None
    helper, reason = _load(source)
    if helper is None:
        if chosen == "require":
            raise NativeMissing(f"{ENV_SWITCH}=require: C helper {source.name} not loaded ({reason})")
        _say_once(source.name, reason)
    return helper


def check_required() -> None:
    """Under `QBACKEND_NATIVE=require`, load every helper now and fail naming the first that
    does not load; otherwise nothing (a bad value of the switch is an error too)."""
    if mode() != "require":
        return
    for helper in HELPERS:
        load(PACKAGE / helper)


def loaded() -> dict[str, str | None]:
    """Every helper -> None when it loads here, else why not (whatever the switch says)."""
    return {helper: _load(PACKAGE / helper)[1] or None for helper in HELPERS}


@functools.cache
def _say_once(name: str, reason: str) -> None:
    log.warning("C helper %s not loaded (%s): pure-Python path in use", name, reason)


@functools.cache
def _load(source: Path) -> tuple[Native | None, str]:
    try:
        import cffi
    except ImportError:
        return None, "cffi is not installed"
    library = source.with_name(library_name(source))
    if not library.exists():
        return None, f"{library.name} is not in this install: it was built without a C compiler"
    try:
        ffi = cffi.FFI()
        ffi.cdef(source.with_suffix(".h").read_text())
        lib = ffi.dlopen(str(library))
    except (OSError, cffi.CDefError, cffi.FFIError) as exc:
        return None, f"{library}: {exc}"
    return Native(ffi, lib), ""
