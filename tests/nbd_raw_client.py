"""A raw-socket NBD client for tests: it sends what real clients refuse to."""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

from qbackend.protocol import nbd


@dataclass
class OptReply:
    option: int
    type: int
    data: bytes


class RawNbd:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        magic, opt, flags = nbd.GREETING.unpack(self.recv_exact(nbd.GREETING.size))
        assert (magic, opt) == (nbd.NBDMAGIC, nbd.IHAVEOPT)
        self.handshake_flags = flags
        self.cookie = 0

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise EOFError(f"server closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def closed_by_server(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    # -- handshake -------------------------------------------------------------

    def client_flags(self, flags: int = nbd.ClientFlags.FIXED_NEWSTYLE | nbd.ClientFlags.NO_ZEROES) -> None:
        self.sock.sendall(struct.pack(">I", flags))

    def option(self, option: int, data: bytes = b"", magic: int = nbd.IHAVEOPT, length: int | None = None) -> None:
        self.sock.sendall(nbd.OPTION_HEADER.pack(magic, option, len(data) if length is None else length) + data)

    def opt_reply(self) -> OptReply:
        magic, option, rtype, length = nbd.OPTION_REPLY.unpack(self.recv_exact(nbd.OPTION_REPLY.size))
        assert magic == nbd.OPTION_REPLY_MAGIC
        return OptReply(option, rtype, self.recv_exact(length))

    def replies_until_final(self) -> list[OptReply]:
        out = []
        while True:
            r = self.opt_reply()
            out.append(r)
            if r.type == nbd.OptionReply.ACK or r.type & (1 << 31):
                return out

    def go(self, name: str, structured: bool = True, meta: bool = True) -> list[OptReply]:
        if structured:
            self.option(nbd.Option.STRUCTURED_REPLY)
            assert self.opt_reply().type == nbd.OptionReply.ACK
            if meta:
                q = nbd.BASE_ALLOCATION.encode()
                self.option(nbd.Option.SET_META_CONTEXT, struct.pack(">I", len(name)) + name.encode()
                            + struct.pack(">II", 1, len(q)) + q)
                self.replies_until_final()
        raw = name.encode()
        self.option(nbd.Option.GO, struct.pack(">I", len(raw)) + raw + struct.pack(">H", 0))
        return self.replies_until_final()

    # -- transmission ---------------------------------------------------------------

    def request(self, command: int, offset: int = 0, length: int = 0, data: bytes = b"", flags: int = 0,
                magic: int = nbd.REQUEST_MAGIC) -> int:
        self.cookie += 1
        self.sock.sendall(nbd.REQUEST.pack(magic, flags, command, self.cookie, offset, length) + data)
        return self.cookie

    def structured_reply(self) -> tuple[int, int, int, bytes]:
        """(cookie, type, flags, payload) of one structured chunk."""
        magic, flags, rtype, cookie, length = nbd.STRUCTURED_HEADER.unpack(self.recv_exact(nbd.STRUCTURED_HEADER.size))
        assert magic == nbd.STRUCTURED_REPLY_MAGIC, hex(magic)
        return cookie, rtype, flags, self.recv_exact(length)

    def error_of(self, cookie: int) -> int:
        """The error code the server gave request `cookie` (0 for success)."""
        got, rtype, flags, payload = self.structured_reply()
        assert got == cookie
        assert flags & nbd.REPLY_FLAG_DONE
        if rtype == nbd.ChunkType.ERROR:
            return int(struct.unpack_from(">I", payload)[0])
        return 0
