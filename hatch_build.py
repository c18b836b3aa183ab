"""The wheel build's hook: compile qbackend's C helpers into the wheel.

The rules (which helpers, which flags) are in
backend/qbackend/plumbing/native_build.py, loaded here by its path.  A
wheel is platform-specific when the helpers are in it; without a working C
compiler the build says so once and makes a pure-Python wheel, whose
helpers then run in Python (QBACKEND_NATIVE=require refuses to start).
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


def _native_build(root: Path) -> Any:
    spec = importlib.util.spec_from_file_location(
        "qbackend_native_build", root / "backend" / "qbackend" / "plumbing" / "native_build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


INIT_TEXT = '''"""qbackend: external devices and disks for a real QEMU, from one Python process.

The package's layers and where each module lives: docs/architecture.md in
qbackend's source.  (This file exists in the installed package only: in the
source tree, three folders join as a namespace package.)
"""
'''


class NativeHelpers(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        native_build = _native_build(Path(self.root))
        package = Path(self.root) / "backend" / "qbackend"
        if version == "editable":
            # The .pth points at the source tree: build the libraries there.
            try:
                native_build.build_in_place(package)
            except native_build.BuildError as exc:
                self.app.display_warning(f"qbackend: C helpers not built, paths run in Python: {exc}")
            return
        out_dir = Path(tempfile.mkdtemp(prefix="qbackend-native-"))
        # In the source tree `qbackend` is a namespace package that three folders join; the
        # wheel puts them in one folder, which is then a regular package.  It must be: for an
        # installed pytest plugin whose package has no __init__.py, pytest takes the package's
        # files for top-level modules, and marks `__main__` (qbackend/__main__.py) for
        # assertion rewriting, a warning in every pytest run of that environment.
        init = out_dir / "__init__.py"
        init.write_text(INIT_TEXT)
        build_data["force_include"][str(init)] = "qbackend/__init__.py"
        try:
            built = native_build.build_all(package, out_dir)
        except native_build.BuildError as exc:
            self.app.display_warning(f"qbackend: C helpers not built, this wheel is pure Python: {exc}")
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        for relative in built:
            build_data["force_include"][str(out_dir / relative)] = f"qbackend/{relative}"
