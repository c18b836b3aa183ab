"""Building qbackend's C helpers: when the package is built, never at run time.

Each helper is a `.c` file beside the Python module that drives it, with
the declarations cffi needs in a `.h` of the same name.  The wheel build
(`hatch_build.py` at the repository's root) compiles each one into a plain
shared library, `lib<name>.so` beside its source, which `plumbing.native`
loads with cffi's ABI mode: no Python headers, no compiler on the user's
machine.  In a checkout, `python backend/qbackend/plumbing/native_build.py`
(run by `make` before the tests and checks) rebuilds in place the
libraries older than their sources.

This module uses the standard library only, and is loaded by its path at
build time, before qbackend is installed.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# The helpers, as paths from the package's root (the folder `qbackend`).
HELPERS = (
    "plumbing/native_lock.c",
    "block/read_map.c",
    "servers/nbd_fast.c",
    "servers/vfio_user_fast.c",
    "servers/vhost_user_blk_fast.c",
)
FLAGS = ("-O2", "-shared", "-fPIC", "-pthread", "-Wall")
COMPILE_TIMEOUT = 120.0


class BuildError(Exception):
    """A helper could not be compiled; the message holds the compiler's own words."""


def library_name(source: str | Path) -> str:
    """`servers/nbd_fast.c` -> `libnbd_fast.so` (not `nbd_fast.so`, which Python's
    import system would take for an extension module of the same name as the .py)."""
    return f"lib{Path(source).stem}.so"


def compiler() -> str:
    return os.environ.get("CC", "cc")


def compile_helper(source: Path, out: Path) -> None:
    """Compile `source` into the shared library `out` (replaced atomically)."""
    import shutil
    import subprocess
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=".qbackend-build-", dir=out.parent))
    try:
        built = work / out.name
        command = [compiler(), *FLAGS, "-o", str(built), str(source)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise BuildError(f"{' '.join(command[:1])}: {exc}") from exc
        if result.returncode != 0:
            raise BuildError(f"{source.name} did not compile:\n{result.stderr.strip()}")
        os.replace(built, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_all(package: Path, out_dir: Path) -> list[str]:
    """Compile every helper of `package` (the `qbackend` folder) into `out_dir`, keeping the
    package's relative layout; returns the libraries' relative paths."""
    built = []
    for helper in HELPERS:
        relative = str(Path(helper).with_name(library_name(helper)))
        target = out_dir / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        compile_helper(package / helper, target)
        built.append(relative)
    return built


def stale(package: Path) -> list[str]:
    """The helpers whose library is missing or older than a C source or header of the package."""
    newest = max(p.stat().st_mtime for pattern in ("*.c", "*.h") for p in package.rglob(pattern))
    out = []
    for helper in HELPERS:
        library = (package / helper).with_name(library_name(helper))
        if not library.exists() or library.stat().st_mtime < newest:
            out.append(helper)
    return out


def build_in_place(package: Path) -> list[str]:
    """Rebuild, beside their sources, the libraries that are stale (a checkout's loop)."""
    rebuilt = []
    for helper in stale(package):
        source = package / helper
        compile_helper(source, source.with_name(library_name(helper)))
        rebuilt.append(helper)
    return rebuilt


def main() -> int:
    package = Path(__file__).resolve().parent.parent
    try:
        rebuilt = build_in_place(package)
    except BuildError as exc:
        print(f"native_build: {exc}", file=sys.stderr)
        return 1
    for helper in rebuilt:
        print(f"native_build: built {library_name(helper)} from {helper}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
