"""Every number the C helpers share with Python has one source of truth.

The C helpers (servers/nbd_fast.c, servers/vfio_user_fast.c,
servers/vhost_user_blk_fast.c, block/read_map.c, plumbing/native_lock.c) name their wire numbers with
`#define`s; the Python protocol modules name the same numbers as enums and
constants.  Here every `#define` and enum member of every C source and
header of the package is parsed and checked against its Python twin, so a
number changed on one side only fails, naming it.  Numbers the Python side
needs from C (nbd_fast.h's stop codes, say) it reads from the loaded
library instead (cffi exposes a header's `#define`s as `lib.NAME`); those
are listed too, so that every `#define` is accounted for.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from qbackend.models import virtio_blk as blk
from qbackend.models import virtqueue as vq
from qbackend.plumbing import native
from qbackend.plumbing.native_build import HELPERS
from qbackend.protocol import nbd, vhost_user
from qbackend.protocol import vfio_user as vu
from qbackend.servers import vfio_user as vfio_user_server
from qbackend.servers import vhost_user_blk as vhost_user_blk_server
from qbackend.servers import vhost_user_blk_fast
from qbackend.servers.vfio_user_fast import NativeAccessLoop

PACKAGE = Path(native.__file__).resolve().parent.parent

# What a C name must equal, per file: an int is the Python twin's value.
FROM_LIB = "read from the loaded library by Python"
Expected = dict[str, int | str]
EXPECTED: dict[str, Expected] = {
    "servers/nbd_fast.c": {
        "REQUEST_MAGIC": nbd.REQUEST_MAGIC,
        "EXTENDED_REQUEST_MAGIC": nbd.EXTENDED_REQUEST_MAGIC,
        "SIMPLE_REPLY_MAGIC": nbd.SIMPLE_REPLY_MAGIC,
        "STRUCTURED_REPLY_MAGIC": nbd.STRUCTURED_REPLY_MAGIC,
        "EXTENDED_REPLY_MAGIC": nbd.EXTENDED_REPLY_MAGIC,
        "CMD_READ": nbd.Cmd.READ,
        "CMD_WRITE": nbd.Cmd.WRITE,
        "FLAG_DF": nbd.CmdFlags.DF,
        "REPLY_FLAG_DONE": nbd.REPLY_FLAG_DONE,
        "CHUNK_NONE": nbd.ChunkType.NONE,
        "CHUNK_OFFSET_DATA": nbd.ChunkType.OFFSET_DATA,
        "REQUEST_SIZE": nbd.REQUEST.size,
        "EXTENDED_REQUEST_SIZE": nbd.EXTENDED_REQUEST.size,
        "SIMPLE_REPLY_SIZE": nbd.SIMPLE_REPLY.size,
        "STRUCTURED_REPLY_SIZE": nbd.STRUCTURED_HEADER.size,
        "EXTENDED_REPLY_SIZE": nbd.EXTENDED_HEADER.size,
        "CHUNK_OFFSET_SIZE": len(nbd.structured_read_header(0, 0, 0)) - nbd.STRUCTURED_HEADER.size,
    },
    "servers/nbd_fast.h": {
        "QB_STOP_END": FROM_LIB,
        "QB_STOP_PARTIAL": FROM_LIB,
        "QB_STOP_PYTHON": FROM_LIB,
        "QB_STOP_FULL": FROM_LIB,
        "QB_CONN_PYTHON": FROM_LIB,
        "QB_CONN_NATIVE": FROM_LIB,
        "QB_NBD_LOOP_EVENTS": FROM_LIB,
        "QB_NBD_SIMPLE": FROM_LIB,
        "QB_NBD_STRUCTURED": FROM_LIB,
        "QB_NBD_EXTENDED": FROM_LIB,
    },
    "servers/vfio_user_fast.c": {
        "REGION_READ": vu.Command.REGION_READ,
        "REGION_WRITE": vu.Command.REGION_WRITE,
        "FLAG_NO_REPLY": vu.FLAG_NO_REPLY,
        "TYPE_REPLY": vu.TYPE_REPLY,
        "HEADER_SIZE": vu.HEADER_SIZE,
        "REGION_ACCESS_SIZE": vu.REGION_ACCESS.size,
        "ACCESS_SIZE": vu.HEADER_SIZE + vu.REGION_ACCESS.size,
    },
    "servers/vfio_user_fast.h": {
        # The Python receive loop's room for fds must be the C loop's.
        "QB_SCM_MAX_FD": vfio_user_server.SCM_MAX_FD,
        "QB_PAUSED": NativeAccessLoop.PAUSED,
    },
    "servers/vhost_user_blk_fast.c": {
        "VIRTQ_DESC_F_NEXT": vq.VIRTQ_DESC_F_NEXT,
        "VIRTQ_DESC_F_WRITE": vq.VIRTQ_DESC_F_WRITE,
        "VIRTQ_DESC_F_INDIRECT": vq.VIRTQ_DESC_F_INDIRECT,
        "VIRTQ_AVAIL_F_NO_INTERRUPT": vq.VIRTQ_AVAIL_F_NO_INTERRUPT,
        "DESC_SIZE": vq.DESC_SIZE,
        "USED_ELEM_SIZE": vq.USED_ELEM_SIZE,
        "INDIRECT_REACH": vq.INDIRECT_REACH,
        "BLK_HEADER_SIZE": blk.HEADER_SIZE,
        "BLK_SECTOR_SHIFT": blk.SECTOR_SHIFT,
        "BLK_ID_BYTES": blk.ID_BYTES,
        "BLK_T_IN": blk.RequestType.IN,
        "BLK_T_OUT": blk.RequestType.OUT,
        "BLK_T_FLUSH": blk.RequestType.FLUSH,
        "BLK_T_GET_ID": blk.RequestType.GET_ID,
        "BLK_S_OK": blk.Status.OK,
        "INFLIGHT_HEADER_SIZE": vhost_user.INFLIGHT_HEADER_SIZE,
        "INFLIGHT_DESC_SIZE": vhost_user.INFLIGHT_DESC_SIZE,
        "INFLIGHT_LAST_BATCH_HEAD_OFFSET": vhost_user.INFLIGHT_LAST_BATCH_HEAD_OFFSET,
        "INFLIGHT_USED_IDX_OFFSET": vhost_user.INFLIGHT_USED_IDX_OFFSET,
        "INFLIGHT_DESC_COUNTER_OFFSET": vhost_user.INFLIGHT_DESC_COUNTER_OFFSET,
        "HOLD_BACKOFF_FIRST": vhost_user_blk_fast.HOLD_BACKOFF_FIRST,
        "HOLD_BACKOFF_MAX": vhost_user_blk_fast.HOLD_BACKOFF_MAX,
        "HOLD_MAX_REQUEST_BYTES": vhost_user_blk_fast.HOLD_MAX_REQUEST_BYTES,
    },
    "servers/vhost_user_blk_fast.h": {
        # C's memory table has room for every region the server accepts.
        "QB_VU_MAX_REGIONS": vhost_user_blk_server.MAX_MEM_SLOTS,
        "QB_VU_MAX_IOV": FROM_LIB,
        "QB_VU_POOL_MAX_THREADS": FROM_LIB,
        "QB_VU_POOL_JOBS": FROM_LIB,
        "QB_VU_EMPTY": FROM_LIB,
        "QB_VU_PYTHON": FROM_LIB,
        "QB_VU_MORE": FROM_LIB,
        "QB_VU_WAKE": FROM_LIB,
        "QB_VU_RELOAD": FROM_LIB,
        "QB_VU_FAILED": FROM_LIB,
    },
    "block/read_map.h": {"QB_MAP_BLOCK_BITS": FROM_LIB},
    "block/read_map.c": {},
    "block/read_map_impl.h": {},
    "plumbing/native_lock.c": {},
    "plumbing/native_lock.h": {},
}

_COMMENT = re.compile(r"/\*.*?\*/|//[^\n]*", re.DOTALL)
_DEFINE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]*(.*)$", re.MULTILINE)
_ENUM = re.compile(r"\benum\b\s*\w*\s*\{(.*?)\}", re.DOTALL)
_INTEGER = re.compile(r"\b(0[xX][0-9a-fA-F]+|[0-9]+)[uUlL]*\b")
_OPERATORS = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Add, ast.Sub, ast.Mult, ast.LShift,
              ast.RShift, ast.BitOr, ast.BitAnd, ast.Invert, ast.USub)


def _evaluate(text: str, defines: dict[str, str], depth: int = 0) -> int:
    """The value of an integer constant expression of C (literals, other defines,
    + - * << >> | & ~): anything else fails, naming the text."""
    if depth > 10:
        raise ValueError(f"{text!r}: defines nested too deeply")
    text = _INTEGER.sub(r"\1", text.strip())
    text = re.sub(r"\b[A-Za-z_]\w*\b",
                  lambda m: f"({_evaluate(defines[m[0]], defines, depth + 1)})" if m[0] in defines else m[0], text)
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError:
        raise ValueError(f"{text!r} is not an integer constant expression") from None
    if not all(isinstance(node, _OPERATORS) for node in ast.walk(tree)):
        raise ValueError(f"{text!r} is not an integer constant expression")
    value = eval(compile(tree, "<define>", "eval"))  # only integer arithmetic passed the check above
    if not isinstance(value, int):
        raise ValueError(f"{text!r} is not an integer")
    return value


def c_constants(source: str) -> dict[str, int]:
    """Every `#define` with a value and every enum member of a C source, by name (a
    `#define` without a value, a feature macro or an include guard, is no constant)."""
    source = _COMMENT.sub(" ", source)
    defines = {name: text for name, text in _DEFINE.findall(source) if text.strip()}
    found = {name: _evaluate(text, defines) for name, text in defines.items()}
    for body in _ENUM.findall(source):
        following = 0
        for item in filter(None, (part.strip() for part in body.split(","))):
            name, _, text = item.partition("=")
            if text:
                following = _evaluate(text, defines)
            found[name.strip()] = following
            following += 1
    return found


def mismatches(where: str, constants: dict[str, int], expected: Expected) -> list[str]:
    """What differs between a C file's constants and their Python twins, one line each, named."""
    out = []
    for name, value in constants.items():
        if name not in expected:
            out.append(f"{where}: {name} = {value:#x} has no Python twin here: add it to EXPECTED")
        elif expected[name] != FROM_LIB and expected[name] != value:
            out.append(f"{where}: {name} is {value:#x} in C but {int(expected[name]):#x} in Python")
    out += [f"{where}: {name} is no longer defined in C" for name in expected if name not in constants]
    return out


def _sources() -> list[Path]:
    """The helpers' C sources, their cffi headers and every local header they include."""
    found: set[Path] = set()
    todo = [PACKAGE / helper for helper in HELPERS] + [(PACKAGE / helper).with_suffix(".h") for helper in HELPERS]
    while todo:
        path = todo.pop().resolve()
        if path not in found:
            found.add(path)
            todo += [path.parent / name for name in re.findall(r'^#include "([^"]+)"', path.read_text(), re.MULTILINE)]
    return sorted(found)


def test_every_c_file_is_listed() -> None:
    assert sorted(str(path.relative_to(PACKAGE)) for path in _sources()) == sorted(EXPECTED)


@pytest.mark.parametrize("relative", sorted(EXPECTED))
def test_c_constants_equal_their_python_twins(relative: str) -> None:
    constants = c_constants((PACKAGE / relative).read_text())
    assert mismatches(relative, constants, EXPECTED[relative]) == []


@pytest.mark.parametrize("relative", sorted(str(Path(helper).with_suffix(".h")) for helper in HELPERS))
def test_the_loaded_library_has_the_headers_numbers(relative: str) -> None:
    """The numbers Python reads from a library are those of the header it was built from."""
    helper = native.load((PACKAGE / relative).with_suffix(".c"))
    if helper is None:
        pytest.skip("native helpers are not loaded here")
    for name, value in c_constants((PACKAGE / relative).read_text()).items():
        assert getattr(helper.lib, name) == value, name


def test_a_wrong_number_fails_naming_it() -> None:
    source = """
    #define _GNU_SOURCE
    #define REQUEST_MAGIC 0x25609514u /* one off */
    #define FLAG_DF (1u << 2)
    #define SIZE (HEADER + 16)
    #define HEADER 16
    enum mode { A, B = 5, C };
    """
    constants = c_constants(source)
    assert constants == {"REQUEST_MAGIC": 0x25609514, "FLAG_DF": 4, "SIZE": 32, "HEADER": 16, "A": 0, "B": 5, "C": 6}
    expected: Expected = {"REQUEST_MAGIC": nbd.REQUEST_MAGIC, "FLAG_DF": nbd.CmdFlags.DF, "SIZE": 32, "HEADER": 16,
                          "A": FROM_LIB, "B": FROM_LIB, "C": FROM_LIB, "GONE": 1}
    assert mismatches("x.c", constants, expected) == [
        "x.c: REQUEST_MAGIC is 0x25609514 in C but 0x25609513 in Python",
        "x.c: GONE is no longer defined in C",
    ]
    assert mismatches("x.c", {"NEW": 3}, {}) == ["x.c: NEW = 0x3 has no Python twin here: add it to EXPECTED"]
    with pytest.raises(ValueError, match="not an integer"):
        c_constants("#define NAME \"text\"")
