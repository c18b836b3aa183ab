"""Where the provisioned QEMU folders and the test guest live.

One setting, in this order:

1. ``$QBACKEND_DATA_DIR`` (the CLI's ``--data-dir`` sets it, so child
   processes see the same folder);
2. a qbackend source checkout's ``build/``, when qbackend runs from one (an
   editable install, or the current directory inside a checkout);
3. the per-user data directory, ``$XDG_DATA_HOME/qbackend`` (by default
   ``~/.local/share/qbackend``).

The folder holds ``qemu/`` (qemu-system-x86_64 and the QEMU tools),
``qemu-ppc/`` and ``guest/`` (kernel and initramfs), as ``make setup`` and
``qbackend setup`` write them.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "QBACKEND_DATA_DIR"


def _is_checkout(path: Path) -> bool:
    pyproject = path / "pyproject.toml"
    try:
        return (path / "backend").is_dir() and (path / "qemu-configs").is_dir() and \
            'name = "qbackend"' in pyproject.read_text()
    except OSError:
        return False


def checkout_root() -> Path | None:
    """The source checkout qbackend runs from, if any."""
    # An editable install runs backend/qbackend/ of the checkout itself.
    source_root = Path(__file__).resolve().parents[2]
    if _is_checkout(source_root.parent):
        return source_root.parent
    here = Path.cwd()
    for candidate in (here, *here.parents):
        if _is_checkout(candidate):
            return candidate
    return None


def data_dir() -> Path:
    """The folder for provisioned QEMU and guest files (see the module doc)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().absolute()
    root = checkout_root()
    if root is not None:
        return root / "build"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "qbackend"


def set_data_dir(path: Path) -> None:
    """Use ``path`` from now on, in this process and the processes it starts."""
    os.environ[ENV_VAR] = str(path.expanduser().absolute())
