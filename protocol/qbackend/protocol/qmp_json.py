"""JSON as a QEMU 11.1 monitor reads it: a stream of values, parsed token by
token, each error answered at once with its line and column.

QEMU's reader has three parts, and this module keeps their behaviour (not
their code), as qemu-storage-daemon 11.1 shows it on the wire
(tests/test_qmp_monitor.py compares the two on the same bytes):

- The lexer cuts bytes into tokens: `{ } [ ] : ,`, strings (double- or
  single-quoted; a control byte or 0xFE/0xFF in one is an error), numbers,
  keywords (`[a-z]+`).  A byte that starts no token, or a token that goes
  wrong (`01`, `1.x`, a control byte in a string), is a lexer error,
  reported as ``stray 'TEXT'`` with the bytes consumed so far; the lexer
  then skips input up to a structural character, a control byte or
  0xFE/0xFF.  A number or keyword ends at the first byte that cannot
  continue it; QEMU reads that byte twice, and a token that starts there is
  reported one column to the right (kept, so that positions match).
- The streamer ends a message when the braces and brackets opened since it
  began are all closed, or when either count goes below zero.  A lexer
  error ends the message at once.
- The parser takes the message's tokens as they come and reports the first
  thing that is wrong (``expecting value``, ``expecting key``, ``expecting
  ':'``, ``expected ',' or '}'``, ``duplicate key``, bad escapes and
  Unicode); the rest of that message is then only counted.

Positions are ``LINE:COLUMN:`` (from 1, in bytes, over the whole connection).
Beyond QEMU: a message longer than `MAX_VALUE` bytes or nested deeper than
`MAX_NESTING` is refused with QEMU's limit words and the input skipped to
the next newline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

MAX_VALUE = 4 << 20  # bytes of one message (QEMU allows 64 MiB; qbackend's commands need far less)
# QEMU allows 1024, but Python's json encodes by recursion and stops near 1000 levels less the
# stack in use: a deeper id could be parsed here and then not be encoded into the reply.
MAX_NESTING = 512


@dataclass(frozen=True)
class Parsed:
    """A whole value."""

    value: Any


@dataclass(frozen=True)
class JsonError:
    """What the client is told (QMP GenericError's desc)."""

    desc: str


_WHITESPACE = re.compile(rb"[ \t\r\n]+")
_DIGITS = re.compile(rb"[0-9]*")
_KEYWORD = re.compile(rb"[a-z]+")
# Inside a string: anything but its quote, a backslash, a control byte or 0xFE/0xFF, or a
# backslash and one such byte (the parser judges escapes).
_STRING_BODY = {
    0x22: re.compile(rb'(?:[^"\\\x00-\x1f\xfe\xff]+|\\[^\x00-\x1f\xfe\xff])*'),
    0x27: re.compile(rb"(?:[^'\\\x00-\x1f\xfe\xff]+|\\[^\x00-\x1f\xfe\xff])*"),
}
# After a lexer error: bytes skipped up to a structural character, a control byte but tab,
# or 0xFE/0xFF.
_RECOVERY_SKIP = re.compile(rb"[^\[\]{},:\x00-\x08\x0a-\x1f\xfe\xff]*")
_STRUCTURAL = frozenset(b"{}[]:,")
_DIGIT = frozenset(b"0123456789")
_SIMPLE_ESCAPES = {0x22: '"', 0x27: "'", 0x5C: "\\", 0x2F: "/", 0x62: "\b", 0x66: "\f", 0x6E: "\n", 0x72: "\r",
                   0x74: "\t"}
_HEX = frozenset(b"0123456789abcdefABCDEF")
_COMPACT_AT = 1 << 16


class _Failed(Exception):
    """The parser found the message wrong (its first error, already reported)."""


def _valid_code_point(cp: int) -> bool:
    """QEMU's rule: Unicode scalar values that are not noncharacters."""
    return (0 <= cp <= 0x10FFFF and not 0xD800 <= cp <= 0xDFFF and (cp & 0xFFFE) != 0xFFFE
            and not 0xFDD0 <= cp <= 0xFDEF)


def _hex4(text: bytes, at: int) -> int:
    digits = text[at:at + 4]
    if len(digits) != 4 or not all(b in _HEX for b in digits):
        return -1
    return int(digits, 16)


def _decode_raw(raw: bytes) -> str | None:
    """Modified UTF-8 (C0 80 is NUL) of valid code points, or None."""
    try:
        text = raw.replace(b"\xc0\x80", b"\0").decode("utf-8")
    except UnicodeDecodeError:
        return None
    if text.isascii() or all(_valid_code_point(ord(ch)) for ch in text):
        return text
    return None


def parse_string(token: bytes) -> str:
    """The value of a string token (quotes included); ValueError with QEMU's words."""
    out: list[str] = []
    end = len(token) - 1  # the closing quote
    i = 1
    while i < end:
        slash = token.find(b"\\", i, end)
        stop = end if slash < 0 else slash
        if stop > i:
            piece = _decode_raw(token[i:stop])
            if piece is None:
                raise ValueError("invalid UTF-8 sequence in string")
            out.append(piece)
            i = stop
            continue
        begin = i
        kind = token[i + 1]
        i += 2
        if kind in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[kind])
            continue
        if kind != 0x75:  # u
            raise ValueError("invalid escape sequence in string")
        cp = _hex4(token, i)
        i += 4
        if 0xD800 <= cp <= 0xDBFF and token[i:i + 2] == b"\\u":
            trailing = _hex4(token, i + 2)
            if 0xDC00 <= trailing <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10) | (trailing & 0x3FF)
                i += 6
            else:
                cp = -1
        if not _valid_code_point(cp):
            shown = token[begin:i].decode("utf-8", "replace")
            raise ValueError(f"{shown} is not a valid Unicode character")
        out.append(chr(cp))
    return "".join(out)


def _number(token: bytes) -> int | float:
    if any(b in token for b in b".eE"):
        return float(token)
    value = int(token)
    return value if -(1 << 63) <= value < (1 << 64) else float(token)


@dataclass
class _Frame:
    """An array or object being parsed, and what it expects next."""

    closer: int  # ord('}') or ord(']')
    container: Any
    expect: str  # "value_or_end", "value", "comma_or_end", "key_or_end", "key", "colon"
    key: str = ""


@dataclass
class JsonStream:
    """Bytes in, `Parsed` values and `JsonError`s out, in order."""

    _buf: bytearray = field(default_factory=bytearray)
    _p: int = 0  # next byte to read in _buf
    _base: int = 0  # stream offset of _buf[0]
    _line: int = 1  # of the byte at _p
    _col: int = 1
    _lookahead: int = -1  # stream offset of the byte that ended the last number, keyword or recovery
    _recovering: bool = False
    _skipping_line: bool = False
    _string_resume: int = 0  # where to go on scanning an unfinished string
    # The message being read.
    _braces: int = 0
    _brackets: int = 0
    _started: int = -1  # stream offset of its first token
    _failed: bool = False
    _stack: list[_Frame] = field(default_factory=list)
    _done: bool = False
    _result: Any = None

    def feed(self, data: bytes) -> list[Parsed | JsonError]:
        out: list[Parsed | JsonError] = []
        self._buf += data
        while self._step(out):
            pass
        if self._too_long():
            self._limit(out, "JSON token size limit exceeded")
            while self._step(out):
                pass
        if self._p > _COMPACT_AT and self._p * 2 > len(self._buf):
            del self._buf[:self._p]
            self._base += self._p
            self._string_resume = max(0, self._string_resume - self._p)
            self._p = 0
        return out

    # -- bytes ----------------------------------------------------------------------------------

    def _consume(self, end: int) -> None:
        buf, p = self._buf, self._p
        newlines = buf.count(b"\n", p, end)
        if newlines:
            self._line += newlines
            self._col = end - buf.rindex(b"\n", p, end)
        else:
            self._col += end - p
        self._p = end

    def _step(self, out: list[Parsed | JsonError]) -> bool:
        """Read one token (or skip what is to be skipped); False when more input is needed."""
        buf, p, n = self._buf, self._p, len(self._buf)
        if p >= n:
            return False
        if self._skipping_line:
            newline = buf.find(b"\n", p)
            if newline < 0:
                self._consume(n)
                return False
            self._consume(newline + 1)
            self._skipping_line = False
            return True
        if self._recovering:
            end = _RECOVERY_SKIP.match(buf, p).end()  # type: ignore[union-attr]
            self._consume(end)
            if end == n:
                return False
            self._recovering = False
            self._lookahead = self._base + end
            return True
        byte = buf[p]
        if byte in b" \t\r\n":
            self._consume(_WHITESPACE.match(buf, p).end())  # type: ignore[union-attr]
            return True
        line, col = self._line, self._col + (self._base + p == self._lookahead)
        if byte in _STRUCTURAL:
            self._consume(p + 1)
            self._token(byte, b"", line, col, out)
            return True
        if byte in _STRING_BODY:
            return self._string(byte, line, col, out)
        if byte == 0x2D or byte in _DIGIT:
            return self._number_token(line, col, out)
        if 0x61 <= byte <= 0x7A:
            end = _KEYWORD.match(buf, p).end()  # type: ignore[union-attr]
            if end == n:
                return False
            text = bytes(buf[p:end])
            self._consume(end)
            self._lookahead = self._base + end
            self._token(ord("k"), text, line, col, out)
            return True
        self._lexer_error(p + 1, line, col, out)
        return True

    def _string(self, quote: int, line: int, col: int, out: list[Parsed | JsonError]) -> bool:
        buf, p, n = self._buf, self._p, len(self._buf)
        start = self._string_resume if self._string_resume > p else p + 1
        end = _STRING_BODY[quote].match(buf, start).end()  # type: ignore[union-attr]
        if end == n or (buf[end] == 0x5C and end + 1 == n):
            self._string_resume = end
            return False
        self._string_resume = 0
        if buf[end] == quote:
            text = bytes(buf[p:end + 1])
            self._consume(end + 1)
            self._token(ord("s"), text, line, col, out)
        else:  # a control byte or 0xFE/0xFF, alone or after a backslash
            self._lexer_error(end + (2 if buf[end] == 0x5C else 1), line, col, out)
        return True

    def _number_token(self, line: int, col: int, out: list[Parsed | JsonError]) -> bool:
        """-?(0|[1-9][0-9]*)(.[0-9]+)?([eE][+-]?[0-9]+)?, ended by any other byte."""
        buf, n = self._buf, len(self._buf)
        i = self._p
        if buf[i] == 0x2D:
            i += 1
        if i == n:
            return False
        if buf[i] == 0x30:
            i += 1
            if i == n:
                return False
            if buf[i] in _DIGIT:
                self._lexer_error(i + 1, line, col, out)
                return True
        elif buf[i] in _DIGIT:
            i = _DIGITS.match(buf, i).end()  # type: ignore[union-attr]
        else:
            self._lexer_error(i + 1, line, col, out)
            return True
        for marker, signs in ((b".", b""), (b"eE", b"+-")):
            if i == n:
                return False
            if buf[i] not in marker:
                continue
            i += 1
            if signs and i < n and buf[i] in signs:
                i += 1
            if i == n:
                return False
            if buf[i] not in _DIGIT:
                self._lexer_error(i + 1, line, col, out)
                return True
            i = _DIGITS.match(buf, i).end()  # type: ignore[union-attr]
        if i == n:
            return False
        text = bytes(buf[self._p:i])
        self._consume(i)
        self._lookahead = self._base + i
        self._token(ord("n"), text, line, col, out)
        return True

    def _lexer_error(self, end: int, line: int, col: int, out: list[Parsed | JsonError]) -> None:
        """Bytes from _p to `end` went wrong: report them (unless the message already failed),
        end the message, and skip input as QEMU's lexer does."""
        text = bytes(self._buf[self._p:end]).decode("utf-8", "replace")
        self._consume(end)
        if not self._failed:
            out.append(JsonError(f"{line}:{col}: JSON parse error, stray '{text}'"))
        self._end_message()
        self._recovering = True

    def _too_long(self) -> bool:
        """Whether the message being read (or one unfinished token) is past MAX_VALUE bytes."""
        begin = self._started if self._started >= 0 else self._base + self._p
        return not self._skipping_line and self._base + len(self._buf) - begin > MAX_VALUE

    def _limit(self, out: list[Parsed | JsonError], desc: str) -> None:
        out.append(JsonError(desc))
        self._end_message()
        self._recovering = False
        self._string_resume = 0
        self._skipping_line = True

    # -- messages -------------------------------------------------------------------------------

    def _end_message(self) -> None:
        self._braces = self._brackets = 0
        self._started = -1
        self._failed = self._done = False
        self._stack.clear()
        self._result = None

    def _token(self, kind: int, text: bytes, line: int, col: int, out: list[Parsed | JsonError]) -> None:
        if self._started < 0:
            self._started = self._base + self._p
        if kind == 0x7B:  # {
            self._braces += 1
        elif kind == 0x7D:
            self._braces -= 1
        elif kind == 0x5B:  # [
            self._brackets += 1
        elif kind == 0x5D:
            self._brackets -= 1
        if self._braces + self._brackets > MAX_NESTING:
            self._limit(out, "JSON nesting depth limit exceeded")
            return
        if not self._failed:
            try:
                self._parse(kind, text)
            except _Failed as exc:
                out.append(JsonError(f"{line}:{col}: JSON parse error, {exc}"))
                self._failed = True
        if self._braces < 0 or self._brackets < 0 or (self._braces == 0 and self._brackets == 0):
            if not self._failed and self._done:
                out.append(Parsed(self._result))
            self._end_message()

    # -- the parser -----------------------------------------------------------------------------

    def _parse(self, kind: int, text: bytes) -> None:
        frame = self._stack[-1] if self._stack else None
        expect = frame.expect if frame is not None else "value"
        if expect in ("value", "value_or_end"):
            if kind == 0x5D and expect == "value_or_end":
                self._close()
            else:
                self._value(kind, text)
        elif expect in ("key", "key_or_end"):
            assert frame is not None
            if kind == 0x7D and expect == "key_or_end":
                self._close()
            elif kind == ord("s"):
                frame.key = self._string_value(text)
                frame.expect = "colon"
            else:
                raise _Failed("expecting key")
        elif expect == "colon":
            assert frame is not None
            if kind != 0x3A:
                raise _Failed("expecting ':'")
            frame.expect = "value"
        else:  # comma_or_end
            assert frame is not None
            if kind == frame.closer:
                self._close()
            elif kind == 0x2C:
                frame.expect = "value" if frame.closer == 0x5D else "key"
            else:
                raise _Failed(f"expected ',' or '{chr(frame.closer)}'")

    def _value(self, kind: int, text: bytes) -> None:
        if kind == 0x7B:
            self._stack.append(_Frame(0x7D, {}, "key_or_end"))
        elif kind == 0x5B:
            self._stack.append(_Frame(0x5D, [], "value_or_end"))
        elif kind == ord("s"):
            self._complete(self._string_value(text))
        elif kind == ord("n"):
            self._complete(_number(text))
        elif kind == ord("k"):
            keywords = {b"true": True, b"false": False, b"null": None}
            if text not in keywords:
                raise _Failed(f"invalid keyword '{text.decode()}'")
            self._complete(keywords[text])
        else:
            raise _Failed("expecting value")

    @staticmethod
    def _string_value(text: bytes) -> str:
        try:
            return parse_string(text)
        except ValueError as exc:
            raise _Failed(str(exc)) from None

    def _close(self) -> None:
        self._complete(self._stack.pop().container)

    def _complete(self, value: Any) -> None:
        if not self._stack:
            self._done, self._result = True, value
            return
        frame = self._stack[-1]
        if frame.closer == 0x5D:
            frame.container.append(value)
        else:
            if frame.key in frame.container:
                raise _Failed("duplicate key")
            frame.container[frame.key] = value
        frame.expect = "comma_or_end"
