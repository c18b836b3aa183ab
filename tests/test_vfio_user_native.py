"""The native vfio-user access loop (servers/vfio_user_fast.c), the native
device lock (plumbing/native_lock.c) and their fallback to Python.

The loop may serve only accesses wholly inside a device's plain windows,
and must answer them byte for byte as the Python path does; everything
else is Python's, in order.  The strongest check here sends the same
random streams to two devices, one served natively and one in Python
alone, and compares every byte that comes back.  The whole vfio-user
server and fast-path suites also run once per path (tests/conftest.py,
`access_path`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend, ServedDevice
from qbackend.models.ivshmem import INTR_MASK, INTR_STATUS, IV_POSITION
from qbackend.models.pci_config import Status
from qbackend.options import IvshmemOptions
from qbackend.plumbing import native
from qbackend.plumbing.native_lock import NativeLock, device_lock
from qbackend.protocol import vfio_user as vu
from qbackend.protocol.vfio_user import REGION_ACCESS, Command
from qbackend.testing.vfio_user_client import VfioUserClient

CONFIG, BAR0, BAR1 = vu.PciRegion.CONFIG, vu.PciRegion.BAR0, vu.PciRegion.BAR1
REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(native.load(Path(native.__file__).with_name("native_lock.c")) is None,
                                reason="no C compiler or cffi here: the native paths cannot be built")


# -- the lock ---------------------------------------------------------------------------


def test_native_lock_behaves_as_an_rlock() -> None:
    lock = device_lock()
    assert isinstance(lock, NativeLock)
    with lock:
        with lock:  # re-entered by its holder
            pass
        seen: list[bool] = []
        other = threading.Thread(target=lambda: seen.extend([lock.acquire(False), lock.acquire(timeout=0.2)]))
        start = time.monotonic()
        other.start()
        other.join()
        assert seen == [False, False] and time.monotonic() - start >= 0.15  # held: not taken, and waited
    with pytest.raises(RuntimeError):
        lock.release()  # not held by this thread
    with pytest.raises(ValueError):
        lock.acquire(False, 1.0)
    assert lock.acquire(timeout=0.5)
    lock.release()


def test_native_lock_excludes_other_threads() -> None:
    lock = device_lock()
    total = [0]

    def add() -> None:
        for _ in range(20000):
            with lock:
                value = total[0]
                time.sleep(0) if value % 1000 == 0 else None  # hand the GIL over mid-update now and then
                total[0] = value + 1

    threads = [threading.Thread(target=add) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert total[0] == 80000


# -- falling back -----------------------------------------------------------------------------


def test_the_server_serves_in_python_when_switched_off(tmp_path: Path) -> None:
    """`QBACKEND_NATIVE=off`: `qbackend serve` serves every access in Python, and says nothing of it."""
    sock = tmp_path / "dev.sock"
    proc = subprocess.Popen([sys.executable, "-m", "qbackend", "serve", "--ivshmem", f"socket={sock},size=4K"],
                            env={**os.environ, "QBACKEND_NATIVE": "off"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        with VfioUserClient(sock, timeout=5) as client:
            client.negotiate()
            assert client.read32(CONFIG, 0) == 0x11101AF4
            client.write(BAR0, INTR_MASK, (0x5A).to_bytes(4, "little"))
            assert client.read32(BAR0, INTR_MASK) == 0x5A
            assert client.read32(BAR0, IV_POSITION) == 0
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert "Traceback" not in err and "not loaded" not in err


# -- the loop against the Python path ----------------------------------------------------------


@dataclass
class Twins:
    native: ServedDevice
    python: ServedDevice


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Twins]:
    """Two like ivshmem devices (INTx only, so IntrStatus matters), one per access path."""
    workdir = tmp_path_factory.mktemp("native")
    backend = Backend()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("QBACKEND_NATIVE", "require")
        fast = backend.add_ivshmem(IvshmemOptions(socket=workdir / "native.sock", vectors=0))
        patch.setenv("QBACKEND_NATIVE", "off")
        slow = backend.add_ivshmem(IvshmemOptions(socket=workdir / "python.sock", vectors=0))
    assert isinstance(fast.device.lock, NativeLock) and not isinstance(slow.device.lock, NativeLock)
    with BackendThread(backend):
        yield Twins(fast, slow)


def _client(served: ServedDevice) -> VfioUserClient:
    client = VfioUserClient(served.server.socket_path, timeout=5)
    client.negotiate()
    return client


def _served_natively(served: ServedDevice) -> int:
    conn = served.server.connection
    assert conn is not None and conn.native is not None
    return conn.native.served


def _message(msg_id: int, command: int, region: int, offset: int, count: int, data: bytes, flags: int) -> bytes:
    body = REGION_ACCESS.pack(offset, region, count) + data
    return vu.HEADER.pack(msg_id, command, vu.HEADER_SIZE + len(body), flags, 0) + body


_ACCESS = st.tuples(
    st.sampled_from([Command.REGION_READ, Command.REGION_WRITE]),
    st.sampled_from([CONFIG, BAR0, BAR0, BAR0, BAR1]),
    st.one_of(st.sampled_from([0, 2, 4, 6, 8, 12, 14, 0x3C, 0x40, 250, 252]), st.integers(0, 300)),
    st.one_of(st.sampled_from([1, 2, 4, 8]), st.integers(1, 80)),
    st.booleans(),  # NO_REPLY
)


@settings(max_examples=150, deadline=None)
@given(st.lists(_ACCESS, min_size=1, max_size=24), st.integers(0, 3))
def test_native_replies_equal_the_python_paths_byte_for_byte(
        twins: Twins, accesses: list[tuple[int, int, int, int, bool]], ring: int) -> None:
    """Reads and writes of config space, BAR0's registers and BAR1, at any offset and size (inside,
    across and outside the windows), posted or not, pipelined in one send, while IntrStatus is set
    or clear: the same bytes back from both devices, and the same state after."""
    streams = []
    for msg_id, (command, region, offset, count, posted) in enumerate(accesses):
        if region == CONFIG and command == Command.REGION_WRITE:
            offset = 0x3C  # the interrupt line: writable, no side effect the test must undo
            count = min(count, 1)
        data = bytes((msg_id * 7 + i) & 0xFF for i in range(count)) if command == Command.REGION_WRITE else b""
        if region == BAR0 and command == Command.REGION_WRITE and offset < 16 and offset + count > 12:
            command, data = Command.REGION_READ, b""  # not the doorbell: a ring arrives later, in another thread
        streams.append(_message(msg_id, command, region, offset, count, data, vu.FLAG_NO_REPLY if posted else 0))
    stream = b"".join(streams)
    replies: list[bytes] = []
    states: list[tuple[str, str, bool]] = []
    for served in (twins.native, twins.python):
        with served.device.lock:
            served.device.registers.intr_status = ring & 1
            served.device.update_intx()
        with _client(served) as client:
            client.send_raw(stream)
            marker = client.next_id()
            client.send_raw(_message(marker, Command.REGION_READ, CONFIG, 0, 4, b"", 0))  # ends the replies
            got = bytearray()
            while not got.endswith(vu.HEADER.pack(marker, Command.REGION_READ, 36, vu.TYPE_REPLY, 0)
                                   + REGION_ACCESS.pack(0, CONFIG, 4) + b"\xf4\x1a\x10\x11"):
                chunk = client.sock.recv(65536)
                assert chunk, "the server closed the connection"
                got += chunk
            replies.append(bytes(got))
            # Read while the client is still connected: once it goes, the server closes the
            # interrupts (INTx low) in its own time, and the two devices would race that.
            states.append((bytes(served.device.config.data[:256]).hex(), bytes(served.device.registers.memory).hex(),
                           served.device.irqs.intx_level))
    assert replies[0] == replies[1], "replies differ between the native and the Python path"
    assert states[0] == states[1], "device state differs between the native and the Python path"


def test_a_plain_register_is_served_natively_and_a_side_effect_is_not(twins: Twins) -> None:
    """IVPosition reads and IntrMask writes (while IntrStatus is 0) stay in C; reading IntrStatus
    (it clears) and writing IntrMask while IntrStatus is set (the INTx line follows IntrMask &
    IntrStatus, as in QEMU's ivshmem) go to Python, which updates the line."""
    dev = twins.native.device
    with dev.lock:
        dev.registers.intr_status = 0
        dev.update_intx()
    with _client(twins.native) as client:
        client.read32(BAR0, IV_POSITION)
        before = _served_natively(twins.native)
        assert client.read32(BAR0, IV_POSITION) == dev.position
        client.write(BAR0, INTR_MASK, (0).to_bytes(4, "little"))
        assert _served_natively(twins.native) == before + 2
        with dev.lock:
            dev.registers.intr_status = 1
            dev.update_intx()
        assert not dev.irqs.intx_level  # masked
        client.write(BAR0, INTR_MASK, (1).to_bytes(4, "little"))
        assert _served_natively(twins.native) == before + 2  # guarded: Python's
        assert dev.irqs.intx_level and dev.config.data[6] & Status.INTERRUPT
        assert client.read32(BAR0, INTR_STATUS) == 1  # clears it: Python's
        assert client.read32(BAR0, INTR_STATUS) == 0
        assert not dev.irqs.intx_level and not dev.config.data[6] & Status.INTERRUPT
        assert _served_natively(twins.native) == before + 2
        client.write(BAR0, INTR_MASK, (0).to_bytes(4, "little"))
        assert _served_natively(twins.native) == before + 3
        # Larger than a register (MAX_COUNT): Python's, and right.
        whole = client.read(CONFIG, 0, 256)
        assert whole == bytes(dev.config.data[:256])
        assert _served_natively(twins.native) == before + 3


def test_natively_served_accesses_are_counted_per_region(twins: Twins) -> None:
    dev = twins.native.device
    with _client(twins.native) as client:
        counts = dev.region_accesses
        for _ in range(5):
            client.read32(CONFIG, 0)
            client.read32(BAR0, IV_POSITION)
        client.read32(BAR0, INTR_STATUS)  # one in Python
        after = dev.region_accesses
    assert after[CONFIG] - counts[CONFIG] == 5 and after[BAR0] - counts[BAR0] == 6


def test_a_client_gone_mid_stream_leaves_the_device_serving(twins: Twins) -> None:
    """Pipelined reads, then the client goes without reading its replies; the native loop's
    send fails, the connection ends, and the next client is served at once."""
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        client = _client(twins.native)
        client.send_raw(b"".join(_message(i, Command.REGION_READ, CONFIG, 0, 4, b"", 0) for i in range(4000)))
        client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        client.close()
    with _client(twins.native) as client:
        assert client.read32(CONFIG, 0) == 0x11101AF4
    deadline = time.monotonic() + 5
    while len(os.listdir("/proc/self/fd")) > fds_before + 1:  # + this client's, until its worker saw the end
        assert time.monotonic() < deadline, "fds left behind by connections that went"
        time.sleep(0.02)
