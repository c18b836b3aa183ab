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


class NativeHelpers(BuildHookInterface):  # type: ignore[misc]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel":
            return
        native_build = _native_build(Path(self.root))
        package = Path(self.root) / "backend" / "qbackend"
        try:
            if version == "editable":
                # The .pth points at the source tree: build the libraries there.
                native_build.build_in_place(package)
                return
            out_dir = Path(tempfile.mkdtemp(prefix="qbackend-native-"))
            built = native_build.build_all(package, out_dir)
        except native_build.BuildError as exc:
            self.app.display_warning(f"qbackend: C helpers not built, this wheel is pure Python: {exc}")
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
        for relative in built:
            build_data["force_include"][str(out_dir / relative)] = f"qbackend/{relative}"
