"""The dependency rule of qbackend's layers: LAYERS below is the one layer map
(docs/architecture.md's table is checked against it).

Each module may import from its own layer and from the layers below it,
never from a layer above.  Beyond the order:
- protocol/ is sans-IO: it imports nothing of qbackend, and no trio,
  socket, asyncio, threading, select or file I/O helpers;
- models/ holds pure state: no trio, socket, threading, select, mmap or
  QMP, and only errors/sizes/options of the base layer;
- nothing below the command line imports the command line.
The test reads the import statements of every file with ast, so a lazy
import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from qbackend.app.cli.commands import HIDDEN, SUMMARIES

REPO = Path(__file__).resolve().parent.parent

# Lowest first.  Modules of the same rank may import each other.
LAYERS = [
    ("base", ["errors", "sizes", "options", "version", "profiles"]),
    ("protocol", ["protocol"]),
    ("models", ["models"]),
    ("plumbing", ["plumbing"]),
    ("vfio", ["vfio"]),
    ("ivshmem", ["ivshmem"]),
    ("devices", ["devices"]),
    ("block", ["block"]),
    ("servers", ["servers"]),
    ("machine", ["machine", "provision"]),
    ("app", ["app", "__main__"]),
    ("testing", ["testing"]),
]
RANK = {part: rank for rank, (_layer, parts) in enumerate(LAYERS) for part in parts}
NO_IO = {"trio", "socket", "asyncio", "threading", "select", "selectors", "mmap", "subprocess", "qemu"}
CLI_MODULES = {"qbackend.app.cli", "qbackend.app.cli.common", "qbackend.app.cli.commands",
               *(f"qbackend.app.cli.{c}" for c in (*SUMMARIES, *HIDDEN))}


SOURCE_ROOTS = ("backend", "protocol", "qemu-configs")


def package_files() -> dict[str, Path]:
    """Import name -> file: a file's path under its source root is its import path."""
    out = {}
    for root in SOURCE_ROOTS:
        folder = REPO / root
        for path in (folder / "qbackend").rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    out = []
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            out.append((node.lineno, name))
            out += [(node.lineno, f"{name}.{alias.name}") for alias in node.names]  # `from pkg import module`
    return out


def layer_part(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "qbackend" and len(parts) > 1 else None


FILES = package_files()


def test_every_module_sits_in_a_layer() -> None:
    homeless = sorted(m for m in FILES if m != "qbackend" and layer_part(m) not in RANK)
    assert homeless == [], "add these to LAYERS (and to docs/architecture.md's table)"


def test_no_module_imports_a_layer_above_its_own() -> None:
    offenders = []
    for module, path in FILES.items():
        src = layer_part(module)
        if src is None:
            continue
        for line, name in imports(path, module):
            dst = layer_part(name)
            if dst is None or dst not in RANK or (name not in FILES and name.rpartition(".")[0] not in FILES):
                continue
            if RANK[dst] > RANK[src]:
                offenders.append(f"{path.relative_to(REPO)}:{line}: {src} imports {name} ({dst} is above it)")
    assert offenders == []


def test_protocol_is_sans_io_and_imports_nothing_of_qbackend() -> None:
    files = {m: p for m, p in FILES.items() if layer_part(m) == "protocol"}
    assert "qbackend.protocol.vfio_user" in files and "qbackend.protocol.nbd" in files
    offenders = [f"{path.name}:{line} imports {name}" for module, path in files.items()
                 for line, name in imports(path, module)
                 if name.split(".")[0] in NO_IO | {"os", "io", "pathlib"}
                 or (name.startswith("qbackend") and not name.startswith("qbackend.protocol"))]
    assert offenders == []


def test_models_do_no_io() -> None:
    files = {m: p for m, p in FILES.items() if layer_part(m) == "models"}
    assert "qbackend.models.memhp" in files
    offenders = [f"{path.relative_to(REPO)}:{line} imports {name}" for module, path in files.items()
                 for line, name in imports(path, module) if name.split(".")[0] in NO_IO]
    assert offenders == []


def test_the_command_line_modules_are_the_cli_package() -> None:
    assert CLI_MODULES == {m for m in FILES if m == "qbackend.app.cli" or m.startswith("qbackend.app.cli.")}


def test_nothing_below_the_command_line_imports_it() -> None:
    offenders = [f"{path.relative_to(REPO)}:{line} imports {name}" for module, path in FILES.items()
                 if module not in CLI_MODULES and module != "qbackend.__main__"
                 for line, name in imports(path, module) if name in CLI_MODULES]
    assert offenders == []


def test_the_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The scan itself can fail: a model importing trio and the CLI is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("import trio\nfrom qbackend.app.cli import main\n")
    names = [name for _line, name in imports(bad, "qbackend.models.bad")]
    assert "trio" in names and "qbackend.app.cli" in names
    assert RANK[layer_part("qbackend.app.cli") or ""] > RANK["models"]


def walk_own_body(fn: ast.AsyncFunctionDef) -> list[ast.AST]:
    """The nodes of a coroutine's own body: a nested plain function runs elsewhere (a worker thread)."""
    out: list[ast.AST] = []
    todo: list[ast.AST] = [n for n in fn.body if not isinstance(n, ast.FunctionDef)]
    while todo:
        node = todo.pop()
        out.append(node)
        todo += [child for child in ast.iter_child_nodes(node)
                 if not isinstance(child, (ast.FunctionDef, ast.Lambda))]
    return out


# Coroutines that run on the asyncio loop of qbackend.machine.qmp, not under trio.
ASYNCIO_SIDE = {("qbackend.machine.qmp", "_Core")}


def test_no_trio_task_takes_a_lock_with_with() -> None:
    """qbackend.plumbing.threads' rule: a trio task never blocks on a lock a
    worker thread can hold; such work goes through run_locked."""
    offenders = []
    for module, path in FILES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for cls in [tree, *[n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)]]:
            owner = getattr(cls, "name", None)
            if (module, owner) in ASYNCIO_SIDE:
                continue
            for fn in ast.iter_child_nodes(cls):
                if not isinstance(fn, ast.AsyncFunctionDef):
                    continue
                for node in walk_own_body(fn):
                    if isinstance(node, ast.With):
                        for item in node.items:
                            text = ast.unparse(item.context_expr)
                            if "lock" in text.lower() or "_cond" in text:
                                offenders.append(f"{path.relative_to(REPO)}:{node.lineno}: {fn.name}: with {text}")
    assert offenders == []


def test_every_source_file_is_where_its_import_path_says() -> None:
    """Under backend/, protocol/ and qemu-configs/, every tracked Python file is
    ROOT/qbackend/...: no file outside the package, and qbackend itself is a
    namespace package (no __init__.py) that the three roots join."""
    import subprocess

    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    stray = [f for f in tracked if f.split("/")[0] in SOURCE_ROOTS and f.split("/")[1] != "qbackend"]
    assert stray == []
    assert not any((REPO / root / "qbackend" / "__init__.py").exists() for root in SOURCE_ROOTS)
    assert "qbackend.protocol.nbd" in FILES and "qbackend.profiles" in FILES and "qbackend.block.qed" in FILES


def test_the_architecture_table_is_the_layer_map() -> None:
    """docs/architecture.md's layer table lists LAYERS' layers, in LAYERS' order."""
    text = (REPO / "docs" / "architecture.md").read_text()
    table = text.split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1].strip().strip("`") for line in table.splitlines()
            if line.startswith("| ") and not line.startswith("| layer") and not line.startswith("| ---")]
    assert rows == [layer for layer, _parts in LAYERS]
