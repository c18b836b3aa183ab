"""A small blocking vfio-user client: for tests, the benchmark, and poking
at a running qbackend device by hand.  It speaks just enough of the
protocol to act like QEMU; it is not a device driver.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from dataclasses import dataclass

from qbackend.errors import QbackendError
from qbackend.plumbing.unix import fds_ancdata, fds_from_ancdata
from qbackend.protocol import vfio_user as vu

CLIENT_VERSION_JSON = {
    "capabilities": {
        "pgsizes": 4096, "max_msg_fds": 16, "max_dma_maps": 65535,
        "max_data_xfer_size": 1048576,
    }
}


class ClientError(QbackendError):
    """The server answered with an error (errno) or broke the protocol."""

    errno = 0


@dataclass
class Reply:
    header: vu.Header
    payload: bytes
    fds: list[int]

    @property
    def error(self) -> int:
        return self.header.error if self.header.flags & vu.FLAG_ERROR else 0


class VfioUserClient:
    def __init__(self, path: str | os.PathLike[str], timeout: float = 10.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock.connect(os.fspath(path))
                break
            except BlockingIOError:  # the listen backlog is full for a moment (a burst of clients)
                if time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)
        self._next_id = 0
        self._buf = bytearray()
        self._fds: list[int] = []

    def close(self) -> None:
        self.sock.close()
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def __enter__(self) -> VfioUserClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw access -----------------------------------------------------------

    def send_raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        self.sock.sendmsg([data], fds_ancdata(fds))

    def next_id(self) -> int:
        self._next_id = (self._next_id + 1) & 0xFFFF
        return self._next_id

    def send(self, command: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
             flags: int = vu.TYPE_REQUEST) -> int:
        msg_id = self.next_id()
        self.send_raw(vu.build_message(msg_id, command, payload, flags=flags), fds)
        return msg_id

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
            if not data:
                raise EOFError("server closed the connection")
            self._fds.extend(fds_from_ancdata(anc))
            self._buf += data

    def receive(self) -> Reply:
        """The next message from the server (reply or server request)."""
        self._fill(vu.HEADER_SIZE)
        header = vu.Header(*vu.HEADER.unpack_from(self._buf))
        self._fill(header.size)
        payload = bytes(self._buf[vu.HEADER_SIZE:header.size])
        del self._buf[:header.size]
        fds, self._fds = self._fds, []
        return Reply(header, payload, fds)

    def request(self, command: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()) -> Reply:
        msg_id = self.send(command, payload, fds)
        reply = self.receive()
        if reply.header.id != msg_id or reply.header.command != command:
            raise ClientError(f"reply {reply.header.id}/{reply.header.command} to request {msg_id}/{command}")
        return reply

    def call(self, command: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = ()) -> Reply:
        """A request whose error reply becomes ClientError."""
        reply = self.request(command, payload, fds)
        if reply.error:
            for fd in reply.fds:
                os.close(fd)
            raise ClientError(f"{vu.Command(command).name} failed: {os.strerror(reply.error)}", errno=reply.error)
        return reply

    # -- the protocol, as QEMU drives it ----------------------------------------------

    def negotiate(self, caps: dict[str, object] | None = None) -> dict[str, object]:
        doc = json.dumps(caps if caps is not None else CLIENT_VERSION_JSON).encode() + b"\0"
        reply = self.call(vu.Command.VERSION, vu.VERSION_PREFIX.pack(0, 0) + doc)
        text = reply.payload[vu.VERSION_PREFIX.size:].rstrip(b"\0")
        result: dict[str, object] = json.loads(text)
        return result

    def device_info(self) -> tuple[int, int, int]:
        reply = self.call(vu.Command.DEVICE_GET_INFO, vu.DEVICE_INFO.pack(16, 0, 0, 0))
        _argsz, flags, regions, irqs = vu.DEVICE_INFO.unpack_from(reply.payload)
        return flags, regions, irqs

    def region_info(self, index: int, argsz: int = 32) -> tuple[tuple[int, ...], bytes, list[int]]:
        reply = self.call(vu.Command.DEVICE_GET_REGION_INFO, vu.REGION_INFO.pack(argsz, 0, index, 0, 0, 0))
        fields = vu.REGION_INFO.unpack_from(reply.payload)
        return fields, reply.payload[vu.REGION_INFO.size:], reply.fds

    def region_info_full(self, index: int) -> tuple[vu.RegionInfo, list[int]]:
        """GET_REGION_INFO as QEMU asks it: with argsz 32, then again with the
        argsz the reply named when its capabilities did not fit; the parsed
        reply (sparse-mmap areas included) and the fds it carried."""
        fields, caps, fds = self.region_info(index)
        if fields[0] > vu.REGION_INFO.size:
            for fd in fds:
                os.close(fd)
            fields, caps, fds = self.region_info(index, fields[0])
        return vu.RegionInfo.unpack(vu.REGION_INFO.pack(*fields) + caps), fds

    def read(self, region: int, offset: int, count: int) -> bytes:
        reply = self.call(vu.Command.REGION_READ, vu.REGION_ACCESS.pack(offset, region, count))
        return reply.payload[vu.REGION_ACCESS.size:]

    def write(self, region: int, offset: int, data: bytes) -> None:
        self.call(vu.Command.REGION_WRITE, vu.REGION_ACCESS.pack(offset, region, len(data)) + data)

    def read32(self, region: int, offset: int) -> int:
        value: int = struct.unpack("<I", self.read(region, offset, 4))[0]
        return value

    def write32(self, region: int, offset: int, value: int) -> None:
        self.write(region, offset, struct.pack("<I", value))

    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: list[int] | tuple[int, ...] = (),
                 data: bytes = b"") -> None:
        self.call(vu.Command.DEVICE_SET_IRQS, vu.IRQ_SET.pack(20 + len(data), flags, index, start, count) + data,
                  fds)

    def dma_map(self, addr: int, size: int, fd: int | None = None, offset: int = 0,
                flags: int = vu.DmaMapFlags.READ | vu.DmaMapFlags.WRITE) -> None:
        self.call(vu.Command.DMA_MAP, vu.DMA_MAP.pack(32, flags, offset, addr, size),
                  [fd] if fd is not None else [])

    def dma_unmap(self, addr: int, size: int, flags: int = 0) -> None:
        self.call(vu.Command.DMA_UNMAP, vu.DMA_UNMAP.pack(24, flags, addr, size))
