"""Flattened device tree (dtb) values, encoder, decoder and dts text, sans-IO.

`Node` keeps properties and subnodes in the order they sit in the blob.  Its
`setprop` and `add_subnode` follow libfdt's placement rules, which QEMU's
device-tree code relies on: a *new* property goes in front of the node's
existing properties, a *new* subnode in front of the existing subnodes, and
an existing property is replaced where it stands.  Code that builds a node
the way QEMU does (same calls, same order) therefore lays it out byte for
byte as QEMU's blob does.

`decode` parses a blob (version 16 or 17) with every length bounded by the
blob; malformed input raises `FdtError` and nothing else.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum

from qbackend.errors import ModelError

FDT_MAGIC = 0xD00DFEED
FDT_VERSION = 17
FDT_LAST_COMP_VERSION = 16
HEADER = struct.Struct(">10I")
"""magic, totalsize, off_dt_struct, off_dt_strings, off_mem_rsvmap, version,
last_comp_version, boot_cpuid_phys, size_dt_strings, size_dt_struct."""
RSV_ENTRY = struct.Struct(">QQ")
CELL = struct.Struct(">I")
MAX_DEPTH = 64
MAX_BLOB = 64 * 1024 * 1024


class Tag(IntEnum):
    """Structure block tokens (devicetree specification, 5.4.1)."""

    BEGIN_NODE = 1
    END_NODE = 2
    PROP = 3
    NOP = 4
    END = 9


class FdtError(ModelError):
    """A malformed blob, or a tree that cannot be encoded."""


def cell(value: int) -> bytes:
    """One big-endian 32-bit cell; negative values wrap (``-1`` is 0xffffffff)."""
    return CELL.pack(value & 0xFFFFFFFF)


def cells(*values: int) -> bytes:
    return b"".join(cell(v) for v in values)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value & 0xFFFFFFFFFFFFFFFF)


def string(text: str) -> bytes:
    return text.encode() + b"\0"


def read_cells(value: bytes) -> list[int]:
    if len(value) % 4:
        raise FdtError(f"property of {len(value)} bytes is not a list of cells")
    return [c for (c,) in CELL.iter_unpack(value)]


@dataclass
class Node:
    name: str
    props: dict[str, bytes] = field(default_factory=dict)
    children: list[Node] = field(default_factory=list)

    # -- building, with libfdt's placement --------------------------------
    def setprop(self, name: str, value: bytes) -> Node:
        if name in self.props:
            self.props[name] = value
        else:
            self.props = {name: value, **self.props}
        return self

    def setprop_cell(self, name: str, value: int) -> Node:
        return self.setprop(name, cell(value))

    def setprop_string(self, name: str, text: str) -> Node:
        return self.setprop(name, string(text))

    def add_subnode(self, name: str) -> Node:
        if self.child(name) is not None:
            raise FdtError(f"node {self.name!r} already has a subnode {name!r}")
        node = Node(name)
        self.children.insert(0, node)
        return node

    # -- reading ----------------------------------------------------------
    def child(self, name: str) -> Node | None:
        for c in self.children:
            if c.name == name:
                return c
        return None

    def find(self, path: str) -> Node | None:
        """The node at ``/a/b`` below this one (``/`` is this node)."""
        node: Node | None = self
        for part in (p for p in path.split("/") if p):
            node = node.child(part) if node is not None else None
        return node

    def walk(self) -> Iterator[tuple[str, Node]]:
        """(path, node) for this node and every node below it, in blob order."""
        stack: list[tuple[str, Node]] = [("/", self)]
        while stack:
            path, node = stack.pop()
            yield path, node
            for c in reversed(node.children):
                stack.append(((path.rstrip("/") + "/" + c.name), c))


# -- the structure-block token stream ------------------------------------------

Token = tuple[Tag, str, bytes]
"""(tag, name, value): BEGIN_NODE carries the node name, PROP the property
name and value, END_NODE and END carry empty fields."""


def tokens(node: Node) -> Iterator[Token]:
    yield Tag.BEGIN_NODE, node.name, b""
    for name, value in node.props.items():
        yield Tag.PROP, name, value
    for c in node.children:
        yield from tokens(c)
    yield Tag.END_NODE, "", b""


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def encode(root: Node, reserve: list[tuple[int, int]] | None = None,
           boot_cpuid: int = 0) -> bytes:
    """A version-17 blob; property names are shared in the strings block in
    order of first use, as libfdt's sequential-write mode lays them out."""
    strings = bytearray()
    offsets: dict[str, int] = {}
    struct_block = bytearray()
    for tag, name, value in tokens(root):
        if tag is Tag.BEGIN_NODE:
            if "\0" in name:
                raise FdtError(f"node name {name!r} contains NUL")
            struct_block += cell(tag) + _pad4(name.encode() + b"\0")
        elif tag is Tag.PROP:
            if name not in offsets:
                offsets[name] = len(strings)
                strings += name.encode() + b"\0"
            struct_block += cell(tag) + cells(len(value), offsets[name]) + _pad4(value)
        else:
            struct_block += cell(tag)
    struct_block += cell(Tag.END)
    rsv = b"".join(RSV_ENTRY.pack(a, s) for a, s in (reserve or [])) + RSV_ENTRY.pack(0, 0)
    off_rsv = HEADER.size
    off_rsv += -off_rsv % 8
    off_struct = off_rsv + len(rsv)
    off_strings = off_struct + len(struct_block)
    total = off_strings + len(strings)
    header = HEADER.pack(FDT_MAGIC, total, off_struct, off_strings, off_rsv, FDT_VERSION,
                         FDT_LAST_COMP_VERSION, boot_cpuid, len(strings), len(struct_block))
    blob = bytearray(header)
    blob += b"\0" * (off_rsv - len(blob))
    blob += rsv + struct_block + strings
    return bytes(blob)


@dataclass(frozen=True)
class Blob:
    root: Node
    reserve: tuple[tuple[int, int], ...]
    boot_cpuid: int
    version: int


def _cstr(data: bytes, start: int, end: int, what: str) -> tuple[str, int]:
    nul = data.find(b"\0", start, end)
    if nul < 0:
        raise FdtError(f"unterminated {what} at offset {start}")
    try:
        return data[start:nul].decode(), nul + 1
    except UnicodeDecodeError as e:
        raise FdtError(f"{what} at offset {start} is not UTF-8") from e


def decode(blob: bytes) -> Blob:
    """Parse a dtb; trailing bytes past ``totalsize`` are ignored."""
    if len(blob) < HEADER.size:
        raise FdtError(f"blob of {len(blob)} bytes is shorter than the header")
    (magic, total, off_struct, off_strings, off_rsv, version, last_comp, boot_cpuid,
     size_strings, size_struct) = HEADER.unpack_from(blob)
    if magic != FDT_MAGIC:
        raise FdtError(f"bad magic {magic:#x}")
    if version < 16 or last_comp > 17:
        raise FdtError(f"unsupported version {version} (last compatible {last_comp})")
    if total > len(blob) or total > MAX_BLOB or total < HEADER.size:
        raise FdtError(f"totalsize {total} does not fit the {len(blob)}-byte blob")
    if version < 17:
        size_struct = total - off_struct if off_struct <= total else 0
    for name, off, size in (("struct", off_struct, size_struct), ("strings", off_strings, size_strings)):
        if off > total or size > total - off:
            raise FdtError(f"{name} block [{off}, +{size}) outside the blob")
    data = blob[:total]
    reserve: list[tuple[int, int]] = []
    pos = off_rsv
    while True:
        if pos + RSV_ENTRY.size > total:
            raise FdtError("memory reservation map runs past the blob")
        addr, size = RSV_ENTRY.unpack_from(data, pos)
        pos += RSV_ENTRY.size
        if addr == 0 and size == 0:
            break
        reserve.append((addr, size))
    strings_end = off_strings + size_strings
    pos, end = off_struct, off_struct + size_struct
    stack: list[Node] = []
    root: Node | None = None
    while True:
        if pos + 4 > end:
            raise FdtError("structure block ends without FDT_END")
        (raw,) = CELL.unpack_from(data, pos)
        pos += 4
        try:
            tag = Tag(raw)
        except ValueError:
            raise FdtError(f"unknown token {raw:#x} at offset {pos - 4}") from None
        if tag is Tag.BEGIN_NODE:
            name, after = _cstr(data, pos, end, "node name")
            pos = after + (-(after - off_struct) % 4)
            node = Node(name)
            if stack:
                stack[-1].children.append(node)
            elif root is None:
                root = node
            else:
                raise FdtError("a second root node")
            if len(stack) >= MAX_DEPTH:
                raise FdtError(f"nodes nested deeper than {MAX_DEPTH}")
            stack.append(node)
        elif tag is Tag.PROP:
            if not stack:
                raise FdtError("property outside any node")
            if pos + 8 > end:
                raise FdtError("truncated property header")
            length, nameoff = struct.unpack_from(">II", data, pos)
            pos += 8
            if length > end - pos:
                raise FdtError(f"property of {length} bytes runs past the structure block")
            if nameoff >= size_strings:
                raise FdtError(f"property name offset {nameoff} outside the strings block")
            pname, _ = _cstr(data, off_strings + nameoff, strings_end, "property name")
            if pname in stack[-1].props:
                raise FdtError(f"duplicate property {pname!r}")
            stack[-1].props[pname] = bytes(data[pos:pos + length])
            pos += length + (-length % 4)
        elif tag is Tag.END_NODE:
            if not stack:
                raise FdtError("FDT_END_NODE without a node")
            stack.pop()
        elif tag is Tag.NOP:
            continue
        else:  # END
            if stack or root is None:
                raise FdtError("FDT_END inside a node or before the root")
            return Blob(root, tuple(reserve), boot_cpuid, version)


# -- dts text ---------------------------------------------------------------------

def _printable_strings(value: bytes) -> list[str] | None:
    if not value or value[-1] != 0 or b"\0\0" in value or value[0] == 0:
        return None
    parts = value[:-1].split(b"\0")
    try:
        texts = [p.decode("ascii") for p in parts]
    except UnicodeDecodeError:
        return None
    if all(t.isprintable() and '"' not in t and "\\" not in t for t in texts):
        return texts
    return None


def format_value(value: bytes) -> str:
    if not value:
        return ""
    texts = _printable_strings(value)
    if texts is not None:
        return " = " + ", ".join(f'"{t}"' for t in texts)
    if len(value) % 4 == 0:
        return " = <" + " ".join(f"{c:#04x}" for c in read_cells(value)) + ">"
    return " = [" + " ".join(f"{b:02x}" for b in value) + "]"


def to_dts(root: Node, header: bool = True) -> str:
    out: list[str] = ["/dts-v1/;", ""] if header else []

    def emit(node: Node, depth: int) -> None:
        ind = "\t" * depth
        out.append(f"{ind}{node.name or '/'} {{")
        for name, value in node.props.items():
            out.append(f"{ind}\t{name}{format_value(value)};")
        for c in node.children:
            out.append("")
            emit(c, depth + 1)
        out.append(f"{ind}}};")

    emit(root, 0)
    return "\n".join(out) + "\n"
