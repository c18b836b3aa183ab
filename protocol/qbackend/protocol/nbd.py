"""NBD, server side, sans-IO: the fixed-newstyle handshake and the
transmission phase (NetworkBlockDevice/nbd doc/proto.md).

`NbdServerConnection` is fed bytes and hands out events.  It answers the
handshake options itself from an export catalogue (plain data given at
construction), and in the transmission phase it checks each request against
the negotiated export (range, flags, read-only) so that what reaches the
caller as a `Request` is valid; everything else becomes a `Rejected` with
the spec's error reply ready to send.  Nothing here touches a socket or a
file.  All wire integers are big-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum, IntFlag
from typing import NamedTuple, Union

# -- wire numbers (proto.md) ---------------------------------------------------------

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
OPTION_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
# NBD_OPT_EXTENDED_HEADERS: 64-bit request lengths, 32-byte request and reply headers.
EXTENDED_REQUEST_MAGIC = 0x21E41C71
EXTENDED_REPLY_MAGIC = 0x6E8A278C


class HandshakeFlags(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlags(IntFlag):
    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class Option(IntEnum):
    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11


_ERR = 1 << 31


class OptionReply(IntEnum):
    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = _ERR | 1
    ERR_POLICY = _ERR | 2
    ERR_INVALID = _ERR | 3
    ERR_PLATFORM = _ERR | 4
    ERR_TLS_REQD = _ERR | 5
    ERR_UNKNOWN = _ERR | 6
    ERR_SHUTDOWN = _ERR | 7
    ERR_BLOCK_SIZE_REQD = _ERR | 8
    ERR_TOO_BIG = _ERR | 9


class Info(IntEnum):
    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class TransmissionFlags(IntFlag):
    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11


class Cmd(IntEnum):
    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7


class CmdFlags(IntFlag):
    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4


# Flags each command may carry (proto.md "Request types").
ALLOWED_FLAGS = {
    Cmd.READ: CmdFlags.DF,
    Cmd.WRITE: CmdFlags.FUA,
    Cmd.DISC: CmdFlags(0),
    Cmd.FLUSH: CmdFlags(0),
    Cmd.TRIM: CmdFlags.FUA,
    Cmd.CACHE: CmdFlags(0),
    Cmd.WRITE_ZEROES: CmdFlags.FUA | CmdFlags.NO_HOLE | CmdFlags.FAST_ZERO,
    Cmd.BLOCK_STATUS: CmdFlags.REQ_ONE,
}


# ALLOWED_FLAGS and friends as plain ints, for NbdServerConnection._check.
_CMD_BY_NUMBER = {int(c): c for c in Cmd}
_ALLOWED = {int(c): int(f) for c, f in ALLOWED_FLAGS.items()}
_DISC, _FLUSH, _TRIM, _BLOCK_STATUS = int(Cmd.DISC), int(Cmd.FLUSH), int(Cmd.TRIM), int(Cmd.BLOCK_STATUS)
_WRITING = frozenset({int(Cmd.WRITE), int(Cmd.TRIM), int(Cmd.WRITE_ZEROES)})
_GROWING = frozenset({int(Cmd.WRITE), int(Cmd.WRITE_ZEROES)})  # past the end: ENOSPC
_READING = frozenset({int(Cmd.READ), int(Cmd.CACHE)})
_DF = int(CmdFlags.DF)
_FLAGS_SEEN: dict[int, CmdFlags] = {}


def _cmd_flags(flags: int) -> CmdFlags:
    """CmdFlags(flags), made once per value (few values ever occur: _check refuses others)."""
    made = _FLAGS_SEEN.get(flags)
    if made is None:
        made = _FLAGS_SEEN[flags] = CmdFlags(flags)
    return made


class ChunkType(IntEnum):
    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6  # 64-bit descriptors, with extended headers
    ERROR = (1 << 15) | 1
    ERROR_OFFSET = (1 << 15) | 2


REPLY_FLAG_DONE = 1


class Errno(IntEnum):
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


class AllocationFlags(IntFlag):
    """base:allocation descriptor flags."""

    HOLE = 1 << 0
    ZERO = 1 << 1


BASE_ALLOCATION = "base:allocation"
BASE_ALLOCATION_ID = 1
# QEMU's context (qemu-nbd -A): per extent, the layer of the backing chain that
# holds it: 0 nowhere (reads zero), 1 the image itself, 2 its backing file, ...
ALLOCATION_DEPTH = "qemu:allocation-depth"
ALLOCATION_DEPTH_ID = 2
CONTEXT_IDS = {BASE_ALLOCATION: BASE_ALLOCATION_ID, ALLOCATION_DEPTH: ALLOCATION_DEPTH_ID}

# Limits.  Options: names and queries are at most 4 KiB (as qemu-nbd);
# requests: 32 MiB of payload, the spec's suggested maximum.
MAX_OPTION_LENGTH = 64 * 1024
MAX_STRING = 4096
MAX_REQUEST = 32 * 1024 * 1024
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096

GREETING = struct.Struct(">QQH")
OPTION_HEADER = struct.Struct(">QII")  # magic, option, length
OPTION_REPLY = struct.Struct(">QIII")  # magic, option, type, length
REQUEST = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
EXTENDED_REQUEST = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, 64-bit length
EXTENDED_HEADER = struct.Struct(">IHHQQQ")  # magic, flags, type, cookie, offset, payload length
EXTENT_EXT = struct.Struct(">QQ")  # length, status
SIMPLE_REPLY = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_HEADER = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
INFO_EXPORT = struct.Struct(">HQH")
INFO_BLOCK_SIZE = struct.Struct(">HIII")
EXTENT = struct.Struct(">II")

U64_END = 1 << 64

# -- errors and events ----------------------------------------------------------------


class NbdProtocolError(Exception):
    """The client broke the protocol; the connection must be dropped.

    `reply` holds bytes to send first, when there is something to say.
    """

    def __init__(self, message: str, reply: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply


@dataclass(frozen=True)
class ExportInfo:
    name: str
    size: int
    read_only: bool = False
    description: str = ""
    can_trim: bool = True
    can_multi_conn: bool = True
    max_block: int = MAX_REQUEST

    def flags(self) -> TransmissionFlags:
        flags = (TransmissionFlags.HAS_FLAGS | TransmissionFlags.SEND_FLUSH | TransmissionFlags.SEND_FUA
                 | TransmissionFlags.SEND_WRITE_ZEROES | TransmissionFlags.SEND_DF | TransmissionFlags.SEND_CACHE
                 | TransmissionFlags.SEND_FAST_ZERO)
        if self.read_only:
            flags |= TransmissionFlags.READ_ONLY
        elif self.can_trim:
            flags |= TransmissionFlags.SEND_TRIM
        if self.can_multi_conn:
            flags |= TransmissionFlags.CAN_MULTI_CONN
        return flags


class NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


class Negotiated(NamedTuple):
    """The handshake is over; transmission on `export` starts."""

    export: ExportInfo
    structured: bool
    meta_contexts: tuple[str, ...]


class Request(NamedTuple):
    cookie: int
    command: Cmd
    flags: CmdFlags
    offset: int
    length: int
    # WRITE payload; a memoryview when the connection received it into memory of its own
    # (NbdServerConnection.take_payload), valid until its next request.
    data: bytes | memoryview = b""


class Rejected(NamedTuple):
    """A request refused during transmission; send `reply`, go on."""

    cookie: int
    command: int
    error: Errno
    reason: str
    reply: bytes


class Disconnect(NamedTuple):
    """NBD_CMD_DISC: finish what is in flight, then close."""


class OptionHandled(NamedTuple):
    """A handshake option answered; `reply` is to be sent.  `done` is set
    for ABORT: close after sending."""

    option: int
    reply: bytes
    done: bool = False
    start_tls: bool = False  # STARTTLS accepted: send `reply`, then the TLS handshake, then `tls_started()`


Event = Union[Negotiated, Request, Rejected, Disconnect, OptionHandled, NeedData]


class Phase(IntEnum):
    CLIENT_FLAGS = 0
    OPTIONS = 1
    TRANSMISSION = 2
    CLOSED = 3


# -- reply builders -----------------------------------------------------------------------


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return OPTION_REPLY.pack(OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def option_error(option: int, reply_type: OptionReply, message: str) -> bytes:
    return option_reply(option, reply_type, message.encode()[:MAX_STRING])


def simple_reply(cookie: int, error: int = 0, data: bytes = b"") -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie) + data


def structured_chunk(cookie: int, chunk_type: int, payload: bytes, done: bool = True) -> bytes:
    return STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, chunk_type, cookie,
                                  len(payload)) + payload


def structured_error(cookie: int, error: int, message: str = "") -> bytes:
    text = message.encode()[:MAX_STRING]
    return structured_chunk(cookie, ChunkType.ERROR, struct.pack(">IH", error, len(text)) + text)


def structured_read_header(cookie: int, offset: int, length: int, done: bool = True) -> bytes:
    """The header of an OFFSET_DATA chunk; the caller sends `length` data bytes after it."""
    return STRUCTURED_HEADER.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, ChunkType.OFFSET_DATA,
                                  cookie, 8 + length) + struct.pack(">Q", offset)



def extended_chunk(cookie: int, chunk_type: int, offset: int, payload: bytes, done: bool = True) -> bytes:
    """A reply chunk with the extended header (32 bytes: 64-bit offset and payload length)."""
    return EXTENDED_HEADER.pack(EXTENDED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0, chunk_type, cookie, offset,
                                len(payload)) + payload


def structured_done(cookie: int) -> bytes:
    return structured_chunk(cookie, ChunkType.NONE, b"")


def block_status_reply(cookie: int, context_id: int, extents: list[tuple[int, int]], done: bool = True) -> bytes:
    """One BLOCK_STATUS chunk (one per negotiated context; the last one `done`)."""
    payload = struct.pack(">I", context_id) + b"".join(EXTENT.pack(n, f) for n, f in extents)
    return structured_chunk(cookie, ChunkType.BLOCK_STATUS, payload, done=done)


# -- the connection -------------------------------------------------------------------------


@dataclass
class NbdServerConnection:
    """One client, server side.  Send `greeting()` first, then feed bytes."""

    exports: dict[str, ExportInfo]
    default_export: str | None = None
    phase: Phase = Phase.CLIENT_FLAGS
    client_flags: ClientFlags = ClientFlags(0)
    structured: bool = False
    export: ExportInfo | None = None
    meta_contexts: tuple[str, ...] = ()
    _meta_export: str | None = None
    tls: str = "off"  # "off": STARTTLS refused; "on": offered; "require": nothing else before it
    tls_active: bool = False
    extended: bool = False  # NBD_OPT_EXTENDED_HEADERS accepted (it implies structured replies)
    _buffer: bytearray = field(default_factory=bytearray)
    _eof: bool = False
    # (cookie, command, flags, offset, length) of the WRITE whose payload the caller receives
    _payload_for: tuple[int, int, int, int, int] | None = None
    # A WRITE refused on its header (read-only export, out of range, bad flags) before its
    # payload had all come: the payload bytes still to come, dropped as they do (never
    # buffered), and the refusal, given once they all have (qemu-nbd answers after the
    # payload too, and keeps the connection).
    _skip: int = 0
    _refused: Rejected | None = None

    def greeting(self) -> bytes:
        return GREETING.pack(NBDMAGIC, IHAVEOPT, HandshakeFlags.FIXED_NEWSTYLE | HandshakeFlags.NO_ZEROES)

    def receive_data(self, data: bytes | memoryview) -> None:
        """Buffer `data` (copied; b"" means end of stream).  The payload of a WRITE
        refused on its header is not kept (see `skipping`)."""
        if data:
            if self._skip:
                n = min(self._skip, len(data))
                self._skip -= n
                if n == len(data):
                    return
                data = data[n:]
            self._buffer += data
        else:
            self._eof = True

    @property
    def eof(self) -> bool:
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes received and not yet taken by next_event()."""
        return len(self._buffer)

    @property
    def skipping(self) -> int:
        """Payload bytes of a refused WRITE still to come (dropped by receive_data as they
        come): the connection is in the middle of a request."""
        return self._skip

    # -- large WRITE payloads, received by the caller --------------------------------------
    # A WRITE's payload passes through the buffer otherwise, copied twice on its way to a
    # file (into the buffer, then out into its own bytes): for large ones, that is what
    # a server's CPU spends most on.

    def pending_write(self) -> int:
        """In transmission: the payload length of the WRITE whose header starts the buffer
        while its payload has not all come (0 otherwise).  The caller may then receive the
        payload itself: take_payload(), then payload_received() once it is whole."""
        if self.phase is not Phase.TRANSMISSION or self._payload_for is not None:
            return 0
        header, expected = self._request_header()
        buf = self._buffer
        if len(buf) < header.size:
            return 0
        magic, flags, command, cookie, offset, length = header.unpack_from(buf)
        if magic != expected or command != Cmd.WRITE or length > MAX_REQUEST or len(buf) >= header.size + length:
            return 0
        if self._skip or not isinstance(self._check(cookie, command, flags, offset, length, b""), Request):
            return 0  # refused on its header: next_event() drops its payload as it comes
        return int(length)

    def take_payload(self, into: memoryview) -> int:
        """The WRITE of pending_write() (its header checked: a refused one is never
        pending) leaves the buffer: the part of its payload received so far goes to the
        front of `into`, which must hold it (it may be shorter than the payload, which the
        caller may receive piece by piece); how many bytes that is."""
        header, _expected = self._request_header()
        buf = self._buffer
        _magic, flags, command, cookie, offset, length = header.unpack_from(buf)
        have = len(buf) - header.size
        if self.pending_write() != length or len(into) < min(have, length):
            raise ValueError("take_payload() without a pending WRITE, or into memory too small for what came")
        with memoryview(buf) as view:
            into[:have] = view[header.size:]
        buf.clear()  # the payload is not whole: nothing came after it
        self._payload_for = (cookie, command, flags, offset, length)
        return have

    @property
    def receiving(self) -> Request | None:
        """The WRITE whose payload the caller receives (after take_payload()), without its data."""
        if self._payload_for is None:
            return None
        cookie, command, flags, offset, length = self._payload_for
        return Request(cookie, Cmd.WRITE, _cmd_flags(flags), offset, length)

    def payload_received(self, payload: memoryview | None) -> Event:
        """The whole payload of take_payload()'s WRITE: its event, as next_event() would have
        given it (a Request whose data is `payload`, or its refusal).  None: the caller
        took the payload in pieces and served the WRITE itself; the Request, without data."""
        if self._payload_for is None or (payload is not None and len(payload) != self._payload_for[4]):
            raise ValueError("payload_received() without the payload take_payload() started")
        cookie, command, flags, offset, length = self._payload_for
        self._payload_for = None
        return self._check(cookie, command, flags, offset, length, b"" if payload is None else payload)

    def next_event(self) -> Event:
        if self._payload_for is not None:
            raise NbdProtocolError("next_event() while the caller receives a WRITE payload")
        if self.phase is Phase.TRANSMISSION:
            return self._next_request()
        if self.phase is Phase.CLIENT_FLAGS:
            if len(self._buffer) < 4:
                return self._need()
            (flags,) = struct.unpack_from(">I", self._buffer)
            del self._buffer[:4]
            if flags & ~int(ClientFlags.FIXED_NEWSTYLE | ClientFlags.NO_ZEROES):
                self.phase = Phase.CLOSED
                raise NbdProtocolError(f"unknown client flags {flags:#x}")
            if not flags & ClientFlags.FIXED_NEWSTYLE:
                self.phase = Phase.CLOSED
                raise NbdProtocolError("client does not speak fixed newstyle")
            self.client_flags = ClientFlags(flags)
            self.phase = Phase.OPTIONS
        if self.phase is Phase.OPTIONS:
            return self._next_option()
        raise NbdProtocolError("connection is closed")

    def _need(self) -> NeedData:
        if self._eof:
            self.phase = Phase.CLOSED
            if self._skip:
                raise NbdProtocolError(f"client went away in the middle of a refused WRITE's payload "
                                       f"({self._skip} bytes short)")
            raise NbdProtocolError(f"client went away in the middle of a message ({len(self._buffer)} bytes)"
                                   if self._buffer else "client closed the connection")
        return NEED_DATA

    # -- handshake options ------------------------------------------------------------

    def _next_option(self) -> Event:
        if len(self._buffer) < OPTION_HEADER.size:
            return self._need()
        magic, option, length = OPTION_HEADER.unpack_from(self._buffer)
        if magic != IHAVEOPT:
            self.phase = Phase.CLOSED
            raise NbdProtocolError(f"bad option magic {magic:#x}")
        if length > MAX_OPTION_LENGTH:
            # Reading gigabytes of option data to skip it is not worth it.
            self.phase = Phase.CLOSED
            raise NbdProtocolError(f"option {option} of {length} bytes is over the {MAX_OPTION_LENGTH}-byte limit",
                                   option_error(option, OptionReply.ERR_TOO_BIG, "option too long"))
        if len(self._buffer) < OPTION_HEADER.size + length:
            return self._need()
        data = bytes(self._buffer[OPTION_HEADER.size:OPTION_HEADER.size + length])
        del self._buffer[:OPTION_HEADER.size + length]
        return self._option(option, data)

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS is done: what was negotiated before it is forgotten (the spec)."""
        if self._buffer:
            self.phase = Phase.CLOSED
            raise NbdProtocolError("the client sent data in the clear after STARTTLS")
        self.tls_active = True
        self.structured = self.extended = False
        self.meta_contexts = ()
        self._meta_export = None

    def _option(self, option: int, data: bytes) -> Event:
        if self.tls == "require" and not self.tls_active and option not in (Option.STARTTLS, Option.ABORT):
            if option == Option.EXPORT_NAME:  # it has no error reply: the spec says close
                self.phase = Phase.CLOSED
                raise NbdProtocolError("EXPORT_NAME before STARTTLS on a server that requires TLS")
            return OptionHandled(option, option_error(option, OptionReply.ERR_TLS_REQD, "TLS is required"))
        if option == Option.EXPORT_NAME:
            if self.extended:  # its reply has no way to end the haggling with extended headers
                self.phase = Phase.CLOSED
                raise NbdProtocolError("EXPORT_NAME after EXTENDED_HEADERS")
            name = data.decode("utf-8", "replace")
            export = self._lookup(name)
            if export is None:
                # No way to say "unknown" to EXPORT_NAME: the spec says close.
                self.phase = Phase.CLOSED
                raise NbdProtocolError(f"EXPORT_NAME for unknown export {name!r}")
            reply = struct.pack(">QH", export.size, export.flags())
            if not self.client_flags & ClientFlags.NO_ZEROES:
                reply += bytes(124)
            self._start(export)
            return OptionHandled(option, reply)
        if option == Option.ABORT:
            self.phase = Phase.CLOSED
            return OptionHandled(option, option_reply(option, OptionReply.ACK), done=True)
        if option == Option.LIST:
            if data:
                return OptionHandled(option, option_error(option, OptionReply.ERR_INVALID, "LIST takes no data"))
            out = b""
            for export in self.exports.values():
                raw = export.name.encode()
                out += option_reply(option, OptionReply.SERVER, struct.pack(">I", len(raw)) + raw)
            return OptionHandled(option, out + option_reply(option, OptionReply.ACK))
        if option in (Option.INFO, Option.GO):
            return self._info_or_go(option, data)
        if option == Option.EXTENDED_HEADERS:
            if data:
                return OptionHandled(option, option_error(option, OptionReply.ERR_INVALID,
                                                          "EXTENDED_HEADERS takes no data"))
            self.extended = self.structured = True
            return OptionHandled(option, option_reply(option, OptionReply.ACK))
        if option == Option.STRUCTURED_REPLY:
            if data:
                return OptionHandled(option, option_error(option, OptionReply.ERR_INVALID,
                                                          "STRUCTURED_REPLY takes no data"))
            self.structured = True
            return OptionHandled(option, option_reply(option, OptionReply.ACK))
        if option in (Option.LIST_META_CONTEXT, Option.SET_META_CONTEXT):
            return self._meta_context(option, data)
        if option == Option.STARTTLS:
            if self.tls == "off":
                return OptionHandled(option, option_error(option, OptionReply.ERR_POLICY, "TLS is not offered"))
            if data:
                return OptionHandled(option, option_error(option, OptionReply.ERR_INVALID, "STARTTLS takes no data"))
            if self.tls_active:
                return OptionHandled(option, option_error(option, OptionReply.ERR_INVALID, "TLS is on already"))
            return OptionHandled(option, option_reply(option, OptionReply.ACK), start_tls=True)
        return OptionHandled(option, option_error(option, OptionReply.ERR_UNSUP, f"option {option} not supported"))

    def _lookup(self, name: str) -> ExportInfo | None:
        if name == "" and self.default_export is not None:
            name = self.default_export
        return self.exports.get(name)

    @staticmethod
    def _string(data: bytes, pos: int) -> tuple[str, int]:
        if pos + 4 > len(data):
            raise ValueError("string length runs past the option")
        (n,) = struct.unpack_from(">I", data, pos)
        if n > MAX_STRING or pos + 4 + n > len(data):
            raise ValueError(f"string of {n} bytes runs past the option")
        return data[pos + 4:pos + 4 + n].decode("utf-8", "replace"), pos + 4 + n

    def _info_or_go(self, option: int, data: bytes) -> Event:
        try:
            name, pos = self._string(data, 0)
            if pos + 2 > len(data):
                raise ValueError("information request count is missing")
            (count,) = struct.unpack_from(">H", data, pos)
            pos += 2
            if pos + 2 * count != len(data):
                raise ValueError(f"{count} information requests do not fill the option")
            requests = struct.unpack_from(f">{count}H", data, pos)
        except ValueError as exc:
            return OptionHandled(option, option_error(option, OptionReply.ERR_INVALID, str(exc)))
        export = self._lookup(name)
        if export is None:
            return OptionHandled(option, option_error(option, OptionReply.ERR_UNKNOWN, f"no export {name!r}"))
        out = option_reply(option, OptionReply.INFO, INFO_EXPORT.pack(Info.EXPORT, export.size, export.flags()))
        # Block sizes are always sent: clients that asked for nothing still
        # benefit, and the spec allows it.
        out += option_reply(option, OptionReply.INFO,
                            INFO_BLOCK_SIZE.pack(Info.BLOCK_SIZE, MIN_BLOCK, PREFERRED_BLOCK, export.max_block))
        if Info.NAME in requests:
            out += option_reply(option, OptionReply.INFO, struct.pack(">H", Info.NAME) + export.name.encode())
        if Info.DESCRIPTION in requests and export.description:
            out += option_reply(option, OptionReply.INFO,
                                struct.pack(">H", Info.DESCRIPTION) + export.description.encode())
        out += option_reply(option, OptionReply.ACK)
        if option == Option.GO:
            self._start(export)
        return OptionHandled(option, out)

    def _meta_context(self, option: int, data: bytes) -> Event:
        if not self.structured:
            return OptionHandled(option, option_error(option, OptionReply.ERR_INVALID,
                                                      "meta contexts need STRUCTURED_REPLY first"))
        try:
            name, pos = self._string(data, 0)
            if pos + 4 > len(data):
                raise ValueError("query count is missing")
            (count,) = struct.unpack_from(">I", data, pos)
            pos += 4
            queries = []
            for _ in range(count):
                query, pos = self._string(data, pos)
                queries.append(query)
            if pos != len(data):
                raise ValueError("trailing bytes after the queries")
        except ValueError as exc:
            return OptionHandled(option, option_error(option, OptionReply.ERR_INVALID, str(exc)))
        export = self._lookup(name)
        if export is None:
            return OptionHandled(option, option_error(option, OptionReply.ERR_UNKNOWN, f"no export {name!r}"))
        matched = []
        if option == Option.LIST_META_CONTEXT and not queries:
            matched = list(CONTEXT_IDS)
        for query in queries:
            listing = option == Option.LIST_META_CONTEXT
            for context in CONTEXT_IDS:
                namespace = context.split(":", 1)[0] + ":"
                if (query == context or (listing and query == namespace)) and context not in matched:
                    matched.append(context)
        out = b"".join(option_reply(option, OptionReply.META_CONTEXT,
                                    struct.pack(">I", CONTEXT_IDS[m]) + m.encode()) for m in matched)
        if option == Option.SET_META_CONTEXT:
            self.meta_contexts = tuple(matched)
            self._meta_export = export.name
        return OptionHandled(option, out + option_reply(option, OptionReply.ACK))

    def _start(self, export: ExportInfo) -> None:
        if self._meta_export != export.name:
            self.meta_contexts = ()  # contexts are negotiated per export
        self.export = export
        self.phase = Phase.TRANSMISSION

    def negotiated(self) -> Negotiated:
        assert self.export is not None
        return Negotiated(self.export, self.structured, self.meta_contexts)

    # -- transmission -------------------------------------------------------------------

    # -- replies, in the form the negotiation chose (simple, structured, extended) --

    def error_reply(self, cookie: int, error: int, message: str = "", offset: int = 0) -> bytes:
        if self.extended:
            text = message.encode()[:MAX_STRING]
            return extended_chunk(cookie, ChunkType.ERROR, offset, struct.pack(">IH", error, len(text)) + text)
        if self.structured:
            return structured_error(cookie, error, message)
        return simple_reply(cookie, error)

    def done_reply(self, cookie: int, offset: int = 0) -> bytes:
        """Success of a request without data."""
        if self.extended:
            return extended_chunk(cookie, ChunkType.NONE, offset, b"")
        return structured_done(cookie) if self.structured else simple_reply(cookie)

    def read_reply_header(self, cookie: int, offset: int, length: int) -> bytes:
        """What goes before a READ's `length` data bytes."""
        if self.extended:
            return EXTENDED_HEADER.pack(EXTENDED_REPLY_MAGIC, REPLY_FLAG_DONE, ChunkType.OFFSET_DATA, cookie, offset,
                                        8 + length) + struct.pack(">Q", offset)
        if self.structured:
            return structured_read_header(cookie, offset, length)
        return simple_reply(cookie)

    def block_status_chunk(self, cookie: int, offset: int, context_id: int, extents: list[tuple[int, int]],
                           done: bool) -> bytes:
        if self.extended:  # always the 64-bit form once extended headers are on (as QEMU does)
            payload = struct.pack(">II", context_id, len(extents)) + b"".join(EXTENT_EXT.pack(n, f) for n, f in extents)
            return extended_chunk(cookie, ChunkType.BLOCK_STATUS_EXT, offset, payload, done=done)
        return block_status_reply(cookie, context_id, extents, done=done)

    def _reject(self, cookie: int, command: int, error: Errno, reason: str, offset: int = 0) -> Rejected:
        return Rejected(cookie, command, error, reason, self.error_reply(cookie, error, reason, offset))

    def _request_header(self) -> tuple[struct.Struct, int]:
        return (EXTENDED_REQUEST, EXTENDED_REQUEST_MAGIC) if self.extended else (REQUEST, REQUEST_MAGIC)

    @property
    def request_header_size(self) -> int:
        """The bytes of a request's header in transmission (extended headers are longer)."""
        return self._request_header()[0].size

    def _next_request(self) -> Event:
        if self._refused is not None:  # a refused WRITE's payload is being dropped
            if self._skip:
                return self._need()
            refused, self._refused = self._refused, None
            return refused
        buf = self._buffer
        header, expected = self._request_header()
        if len(buf) < header.size:
            return self._need()
        magic, flags, command, cookie, offset, length = header.unpack_from(buf)
        if magic != expected:
            self.phase = Phase.CLOSED
            raise NbdProtocolError(f"bad request magic {magic:#x}")
        if command == Cmd.WRITE:
            if length > MAX_REQUEST:
                # The payload cannot be skipped safely: say so and drop.  EINVAL, as
                # qemu-nbd answers: the spec keeps EOVERFLOW for DF reads and
                # oversized requests that carry no payload.
                self.phase = Phase.CLOSED
                raise NbdProtocolError(f"WRITE of {length} bytes is over the {MAX_REQUEST}-byte limit",
                                       self.error_reply(cookie, Errno.EINVAL, "request too large"))
            if len(buf) < header.size + length:
                # Checked now, before its payload: a refused WRITE's payload is never held.
                event = self._check(cookie, command, flags, offset, length, b"")
                if isinstance(event, Rejected):
                    self._skip = header.size + length - len(buf)
                    self._refused = event
                    buf.clear()  # the payload is not whole: nothing came after it
                return self._need()
            with memoryview(buf) as view:  # one copy (a bytearray slice would be a second)
                data = bytes(view[header.size:header.size + length])
            del buf[:header.size + length]
        else:
            data = b""
            del buf[:header.size]
        return self._check(cookie, command, flags, offset, length, data)

    def _check(self, cookie: int, command: int, flags: int, offset: int, length: int,
               data: bytes | memoryview) -> Event:
        # Every request of the transmission phase comes through here, so the
        # tests are on plain ints (enum calls and IntFlag arithmetic cost more
        # than the rest of a request's parsing) and the CmdFlags are cached.
        export = self.export
        assert export is not None
        cmd = _CMD_BY_NUMBER.get(command)
        if cmd is None:
            return self._reject(cookie, command, Errno.EINVAL, f"unknown command {command}")
        if flags & ~_ALLOWED[command]:
            return self._reject(cookie, command, Errno.EINVAL, f"flags {flags:#x} not allowed on {cmd.name}")
        if command == _DISC:
            self.phase = Phase.CLOSED
            return Disconnect()
        if command == _FLUSH:
            return Request(cookie, cmd, _cmd_flags(flags), offset, length)
        if flags & _DF and not self.structured:
            return self._reject(cookie, command, Errno.EINVAL, "DF needs structured replies")
        if command == _BLOCK_STATUS and not self.meta_contexts:
            return self._reject(cookie, command, Errno.EINVAL, "BLOCK_STATUS without a negotiated meta context")
        if command in _WRITING and export.read_only:
            return self._reject(cookie, command, Errno.EPERM, f"{cmd.name} on the read-only export {export.name!r}")
        if command == _TRIM and not export.can_trim:
            return self._reject(cookie, command, Errno.EINVAL, "TRIM not supported")
        if length == 0:
            return self._reject(cookie, command, Errno.EINVAL, f"{cmd.name} of length 0")
        if offset + length > U64_END:
            return self._reject(cookie, command, Errno.EINVAL, f"offset {offset:#x} + {length} wraps 64 bits")
        if offset + length > export.size:
            error = Errno.ENOSPC if command in _GROWING else Errno.EINVAL
            return self._reject(cookie, command, error,
                                f"{cmd.name} {offset:#x}+{length} past the end of the export ({export.size} bytes)")
        if command in _READING and length > MAX_REQUEST:
            return self._reject(cookie, command, Errno.EINVAL if not flags & _DF else Errno.EOVERFLOW,
                                f"{cmd.name} of {length} bytes is over the {MAX_REQUEST}-byte limit")
        return Request(cookie, cmd, _cmd_flags(flags), offset, length, data)
