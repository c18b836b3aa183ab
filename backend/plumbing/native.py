"""qbackend's small C helpers: compiled on first use, loaded with cffi, optional.

A few hot loops are in C (the device lock, the vfio-user register access
loop), each a `.c` file beside the Python module that uses it, with the
declarations cffi needs in a `.h` of the same name.  They are built with
the system's C compiler (`$CC`, else `cc`) the first time a process needs
them, into a cache directory (`$QBACKEND_CACHE_DIR`, else
`$XDG_CACHE_HOME/qbackend`, else `~/.cache/qbackend`) under a name that
carries the hash of the source, and loaded with `cffi.FFI.dlopen` (ABI
mode: no Python headers needed).  Every caller has a pure-Python path: when
there is no compiler, no cffi, or `QBACKEND_NATIVE=off` in the environment,
`load()` returns None (saying why once in the log) and qbackend runs as
before, only slower.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_SWITCH = "QBACKEND_NATIVE"
PACKAGE = Path(__file__).resolve().parent.parent
COMPILE_TIMEOUT = 60.0


def enabled() -> bool:
    """Whether native helpers may be used (`QBACKEND_NATIVE=off|0|no` turns them off)."""
    return os.environ.get(ENV_SWITCH, "on").strip().lower() not in ("off", "0", "no", "false")


def cache_dir() -> Path:
    explicit = os.environ.get("QBACKEND_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "qbackend"


class Native:
    """One loaded helper library: `ffi` (cffi.FFI) and `lib` (its functions)."""

    def __init__(self, ffi: Any, lib: Any) -> None:
        self.ffi = ffi
        self.lib = lib


def load(source: Path) -> Native | None:
    """The helper built from `source` (a .c file with its .h beside it), or None.

    None when native helpers are switched off or cannot be built here; the
    reason is logged once per source per process.
    """
    if not enabled():
        return None
    return _load(source)


@functools.cache
def _load(source: Path) -> Native | None:
    try:
        import cffi
    except ImportError:
        log.warning("native helpers off: cffi is not installed (pure-Python path in use)")
        return None
    header = source.with_suffix(".h")
    try:
        declarations = header.read_text()
        code = source.read_bytes()
    except OSError as exc:
        log.warning("native helper %s missing (%s): pure-Python path in use", source.name, exc)
        return None
    compiler = os.environ.get("CC", "cc")
    digest = hashlib.sha256(code + _headers() + compiler.encode()).hexdigest()[:16]
    library = _build(source, compiler, f"{source.stem}-{digest}.so")
    if library is None:
        return None
    ffi = cffi.FFI()
    try:
        ffi.cdef(declarations)
        lib = ffi.dlopen(str(library))
    except (OSError, cffi.CDefError, cffi.FFIError) as exc:
        log.warning("native helper %s cannot be loaded (%s): pure-Python path in use", source.name, exc)
        return None
    finally:
        if library.parent.name.startswith("qbackend-native-"):  # a private build: loaded, not needed on disk
            shutil.rmtree(library.parent, ignore_errors=True)
    return Native(ffi, lib)


@functools.cache
def _headers() -> bytes:
    """Every header of the package, once per process: a helper may include another's
    (read_map_impl.h), so all of them count in each helper's cache key."""
    return b"".join(p.read_bytes() for p in sorted(PACKAGE.rglob("*.h")))


def _build(source: Path, compiler: str, name: str) -> Path | None:
    """The compiled library, from the cache or built now; None if it cannot be built."""
    directory = cache_dir()
    target = directory / name
    if target.exists():
        return target
    try:
        directory.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=".build-", dir=directory))
    except OSError:
        # No writable cache: build privately, load, then delete.
        work = Path(tempfile.mkdtemp(prefix="qbackend-native-"))
        target = work / name
    out = work / name
    command = [compiler, "-O2", "-shared", "-fPIC", "-pthread", "-Wall", "-o", str(out), str(source)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("native helper %s not built (%s): pure-Python path in use", source.name, exc)
        shutil.rmtree(work, ignore_errors=True)
        return None
    if result.returncode != 0:
        log.warning("native helper %s did not compile (pure-Python path in use): %s", source.name,
                    result.stderr.strip().splitlines()[-1:] or result.returncode)
        shutil.rmtree(work, ignore_errors=True)
        return None
    if out != target:
        os.replace(out, target)  # atomic: processes building at once each install a whole file
        shutil.rmtree(work, ignore_errors=True)
    log.debug("native helper %s built: %s", source.name, target)
    return target
