"""Helpers for the QED tests: the provisioned qemu-img / qemu-io, and a corruption generator."""

from __future__ import annotations

import functools
import json
import struct
import subprocess
from pathlib import Path
from typing import Any

from qbackend.block.qed import HEADER, QedHeader
from qbackend.machine.launch import QemuInstall, find_qemu


@functools.cache
def qemu() -> QemuInstall:
    return find_qemu()


def run_tool(tool: str, *args: str | Path, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    q = qemu()
    proc = subprocess.run([*q.tool_cmd(tool), *map(str, args)], env=q.env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(map(str, args))} exited {proc.returncode}:\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def qemu_img(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return run_tool("qemu-img", *args, check=check)


def qemu_io(image: Path, *commands: str, fmt: str = "qed", check: bool = True) -> subprocess.CompletedProcess[str]:
    args: list[str | Path] = ["-f", fmt]
    for c in commands:
        args += ["-c", c]
    proc = run_tool("qemu-io", *args, image, check=check)
    if check and ("error" in proc.stdout.lower() or "failed" in proc.stdout.lower()):
        raise AssertionError(f"qemu-io {commands}: {proc.stdout}{proc.stderr}")
    return proc


def qemu_check(image: Path, *extra: str) -> tuple[int, dict[str, Any], str]:
    """qemu-img check: (exit code, JSON report or {}, stderr)."""
    proc = qemu_img("check", "-f", "qed", "--output=json", *extra, image, check=False)
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except json.JSONDecodeError:
        report = {}
    return proc.returncode, report, proc.stderr


# -- corruption generator ---------------------------------------------------------


def read_header(path: Path) -> QedHeader:
    return QedHeader.unpack(path.read_bytes()[:HEADER.size])


def write_header(path: Path, header: QedHeader) -> None:
    with open(path, "r+b") as f:
        f.write(header.pack())


def poke_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack("<Q", value))


def peek_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        value: int = struct.unpack("<Q", f.read(8))[0]
        return value


def l1_entry_offset(h: QedHeader, index: int) -> int:
    return h.l1_table_offset + 8 * index


def l2_entry_offset(path: Path, h: QedHeader, guest_offset: int) -> int:
    """File offset of the L2 entry for ``guest_offset`` (its L2 table must exist)."""
    ci = guest_offset // h.cluster_size
    l1i, l2i = divmod(ci, h.table_entries)
    table = peek_u64(path, l1_entry_offset(h, l1i))
    assert table, f"no L2 table for guest offset {guest_offset:#x}"
    return table + 8 * l2i
