"""The vhost-user-blk server against a front end that plays QEMU's part
(qbackend.testing.vhost_user_client): its own memfd guest RAM, rings laid
out in it, requests made as a driver makes them, and bad input on purpose.

The server runs in this process (a Backend in a trio thread), so its fds
and mappings are this process's: after each client goes, the fd count and
the memfd mappings come back to what they were.  What the server does
happens on its own threads: every effect is waited for with a deadline.

Bad input comes in three kinds: a request the device answers with a status
(the queue goes on), a ring that cannot be trusted (the queue stops, its
error eventfd is signalled, and it serves again once set up anew or after
a reconnect), and a message that is refused (REPLY_ACK failure; the
connection goes on) or ends the connection (the next one works)."""

from __future__ import annotations

import logging
import os
import re
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend
from qbackend.models.virtqueue import (
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
)
from qbackend.options import VhostUserBlkOptions
from qbackend.protocol import vhost_user as vu
from qbackend.servers import vhost_user_blk_fast
from qbackend.servers.vhost_user_blk import VhostUserBlkServer
from qbackend.testing.harness import mappings, open_fds, wait_equal, wait_until
from qbackend.testing.vhost_user_client import (
    SECTOR_SIZE,
    VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT,
    BlkRequest,
    FrontendError,
    GuestRegion,
    Used,
    VhostUserFrontend,
)

Request = vu.FrontendRequest
IMAGE_SIZE = 8 << 20
RO_SIZE = 1 << 20
SECTORS = IMAGE_SIZE // SECTOR_SIZE
OUTSIDE = 0xDEAD_0000_0000  # a guest address in no region
WAIT = 5.0
VIRTIO_BLK_F_RO = 5


def pattern(size: int, tag: bytes) -> bytearray:
    """Every sector different: its number, then the tag, repeated."""
    return bytearray(b"".join((s.to_bytes(4, "little") + tag) * 64 for s in range(size // SECTOR_SIZE)))


@dataclass
class Rig:
    thread: BackendThread
    backend: Backend
    rw: VhostUserBlkServer
    ro: VhostUserBlkServer
    image: Path
    ro_image: Path
    model: bytearray  # what the read-write image holds

    def connect(self, server: VhostUserBlkServer | None = None) -> VhostUserFrontend:
        return VhostUserFrontend((server or self.rw).socket_path, timeout=WAIT)

    def ready(self, server: VhostUserBlkServer | None = None, num: int = 16) -> VhostUserFrontend:
        """A front end that has negotiated, sent its memory table and set up queue 0."""
        f = self.connect(server)
        try:
            bring_up(f, num)
        except BaseException:
            f.close()
            raise
        return f

    def expected(self, sector: int, count: int) -> bytes:
        return bytes(self.model[sector * SECTOR_SIZE:(sector + count) * SECTOR_SIZE])

    def wrote(self, sector: int, data: bytes) -> None:
        self.model[sector * SECTOR_SIZE:sector * SECTOR_SIZE + len(data)] = data

    def idle(self, server: VhostUserBlkServer | None = None) -> None:
        """Wait until the server has let its front end go (its fds are closed by then)."""
        server = server or self.rw
        wait_until(lambda: server.connection is None, WAIT, f"{server.name} to drop its front end")


def bring_up(f: VhostUserFrontend, num: int = 16) -> None:
    f.negotiate()
    assert f.set_mem_table()
    f.setup_queue(0, num)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("vub")
    image, ro_image = work / "disk.raw", work / "ro.raw"
    model = pattern(IMAGE_SIZE, b"rw!!")
    image.write_bytes(model)
    ro_image.write_bytes(pattern(RO_SIZE, b"ro!!"))
    backend = Backend()
    backend.add_vhost_user_blk(VhostUserBlkOptions(socket=work / "rw.sock", image=image, format="raw", id="vub0"))
    backend.add_vhost_user_blk(VhostUserBlkOptions(socket=work / "ro.sock", image=ro_image, format="raw",
                                                   readonly=True, id="vubro"))
    with BackendThread(backend) as thread:
        yield Rig(thread, backend, backend.blocks.vhost["vub0"].server, backend.blocks.vhost["vubro"].server,
                  image, ro_image, model)


@pytest.fixture(autouse=True)
def sound(rig: Rig) -> Iterator[None]:
    """Whatever a test sent, the servers end it idle and without an internal error."""
    before = [server.stats["internal_errors"] for server in (rig.rw, rig.ro)]
    yield
    for server, errors in zip((rig.rw, rig.ro), before):
        rig.idle(server)
        assert server.stats["internal_errors"] == errors, server.stats


@contextmanager
def no_leaks() -> Iterator[None]:
    """The block's clients (closed inside it) leave this process's fd count and
    memfd mappings as they found them; both may settle a moment late."""
    fds, maps = open_fds(), mappings("/memfd:")
    yield
    wait_equal(open_fds, fds, WAIT, "this process's fd count")
    wait_equal(lambda: mappings("/memfd:"), maps, WAIT, "this process's memfd mappings")


def good(rig: Rig, f: VhostUserFrontend, sector: int = 17, count: int = 3) -> None:
    """The queue serves: a read returns the image's bytes."""
    status, data = f.read_sectors(0, sector, count)
    assert status == VIRTIO_BLK_S_OK
    assert data == rig.expected(sector, count)


def stat(server: VhostUserBlkServer, name: str) -> int:
    return server.stats[name]


# -- the happy path ---------------------------------------------------------------------


def test_socket_is_private(rig: Rig) -> None:
    assert os.stat(rig.rw.socket_path).st_mode & 0o777 == 0o600


def test_negotiation(rig: Rig) -> None:
    with rig.connect() as f:
        features = f.negotiate()
        assert features & vu.VHOST_USER_F_PROTOCOL_FEATURES
        assert features >> VIRTIO_F_INDIRECT_DESC & 1 and features >> VIRTIO_F_EVENT_IDX & 1
        assert not features >> VIRTIO_BLK_F_RO & 1
        assert f.protocol_features & vu.ProtocolFeature.REPLY_ACK
        assert f.protocol_features & vu.ProtocolFeature.CONFIGURE_MEM_SLOTS
        assert f.queue_num == 1
        assert f.get_max_mem_slots() >= 8
        # Features never offered are refused, and the connection goes on.
        assert not f.call(Request.SET_FEATURES, vu.u64(features | 1 << 60))
        assert f.ask_u64(Request.GET_QUEUE_NUM) == 1


def test_read_write_flush_get_id_and_config(rig: Rig) -> None:
    payload = os.urandom(3 * SECTOR_SIZE)
    native_before = rig.rw.stats["native_requests"]
    with rig.ready() as f:
        assert f.capacity() == IMAGE_SIZE // SECTOR_SIZE
        blk_size = struct.unpack("<I", f.get_config(4, offset=20))[0]
        assert blk_size == SECTOR_SIZE
        # IN of a few sectors, direct and indirect; the used length is data + status.
        req = f.make_request(0, VIRTIO_BLK_T_IN, 10, in_len=4 * SECTOR_SIZE)
        f.kick(0)
        assert f.wait_used(0) == [Used(req.head, 4 * SECTOR_SIZE + 1)]
        assert f.status(req) == VIRTIO_BLK_S_OK and f.data(req) == rig.expected(10, 4)
        assert f.wait_call(0) >= 1  # the interrupt
        status, data = f.read_sectors(0, 33, 2, indirect=True)
        assert status == VIRTIO_BLK_S_OK and data == rig.expected(33, 2)
        status, data = f.read_sectors(0, SECTORS - 1, 1)  # the last sector
        assert status == VIRTIO_BLK_S_OK and data == rig.expected(SECTORS - 1, 1)
        # OUT then IN.
        assert f.write_sectors(0, 100, payload) == VIRTIO_BLK_S_OK
        rig.wrote(100, payload)
        status, data = f.read_sectors(0, 99, 5, indirect=True)
        assert status == VIRTIO_BLK_S_OK and data == rig.expected(99, 5)
        assert data[SECTOR_SIZE:4 * SECTOR_SIZE] == payload
        assert f.flush() == VIRTIO_BLK_S_OK
        status, ident = f.get_id()
        assert status == VIRTIO_BLK_S_OK and ident == b"vub0".ljust(20, b"\0")
        # Several requests in one kick.
        reqs = [f.make_request(0, VIRTIO_BLK_T_IN, s, in_len=SECTOR_SIZE) for s in (1, 2, 3)]
        assert f.run(*reqs) == [VIRTIO_BLK_S_OK] * 3
        assert [f.data(r) for r in reqs] == [rig.expected(s, 1) for s in (1, 2, 3)]
    rig.idle()
    with open(rig.image, "rb") as disk:
        disk.seek(100 * SECTOR_SIZE)
        assert disk.read(len(payload)) == payload
    if vhost_user_blk_fast.load() is not None:
        # Every one of these plain requests was answered in C, none by Python.
        assert rig.rw.stats["native_requests"] - native_before == 10, rig.rw.stats


def test_a_front_end_that_goes_leaves_a_line_per_queue_of_where_its_requests_went(
        rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="qbackend.servers.vhost_user_blk")
    with rig.ready() as f:
        for sector in (1, 2, 3):
            good(rig, f, sector, 1)
    rig.idle()
    lines = [r.getMessage() for r in caplog.records if " served " in r.getMessage()]
    assert len(lines) == rig.rw.num_queues, lines
    native, python = (3, 0) if vhost_user_blk_fast.load() is not None else (0, 3)
    found = re.fullmatch(r"vub0: queue 0 served 3 requests: (\d+) native \((\d+) interrupts, held (\d+) times "
                         r"with more and (\d+) alone, (\d+) handed to Python, woken by \d+ kicks\), (\d+) in Python", lines[0])
    assert found is not None, lines
    assert (int(found[1]), int(found[5]), int(found[6])) == (native, 0, python), lines
    # The native path counts its interrupts: at most one per request, and one owed at queue start.
    assert min(native, 1) <= int(found[2]) <= native + 1, lines
    assert all(" served 0 requests" in line for line in lines[1:]), lines


def _queue_log(caplog: pytest.LogCaptureFixture) -> re.Match[str]:
    lines = [r.getMessage() for r in caplog.records if " served " in r.getMessage()]
    found = re.match(r"vub0: queue 0 served (\d+) requests: (\d+) native \((\d+) interrupts, held (\d+) times "
                     r"with more and (\d+) alone", lines[0] if lines else "")
    assert found is not None, lines
    return found


HOLDING = pytest.mark.skipif(vhost_user_blk_fast.load() is None, reason="holding interrupts is the native path's")


@contextmanager
def holding(rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
            hold_ns: int) -> Iterator[VhostUserFrontend]:
    """A front end set up on queue 0 of a server whose native path holds interrupts for
    hold_ns, the interrupt owed at queue start taken (it is never held); the server has let
    the front end go afterwards, so its per-queue line is logged (_queue_log)."""
    monkeypatch.setattr(vhost_user_blk_fast, "HOLD_NS", hold_ns)
    caplog.set_level(logging.INFO, logger="qbackend.servers.vhost_user_blk")
    with rig.ready() as f:
        f.wait_call(0)
        yield f
    rig.idle()


@HOLDING
def test_a_held_interrupt_still_comes_for_each_request_at_qd1(
        rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """A front end that waits for each request's interrupt before sending the next gets it
    every time (the hold runs out and the interrupt goes alone), and holding then backs off:
    the first hold catches nothing, so the next HOLD_BACKOFF_FIRST requests are answered at
    once; the one after is held again, and catches nothing either."""
    count = vhost_user_blk_fast.HOLD_BACKOFF_FIRST + 4
    with holding(rig, caplog, monkeypatch, 20_000_000) as f:
        for n in range(count):
            req = f.make_request(0, VIRTIO_BLK_T_IN, 40 + n, in_len=SECTOR_SIZE)
            f.kick(0)
            assert f.wait_call(0) >= 1, f"request {n} got no interrupt"
            assert [u.id for u in f.wait_used(0, timeout=0)] == [req.head]
            assert f.data(req) == rig.expected(40 + n, 1)
    found = _queue_log(caplog)
    assert int(found[2]) == count
    assert (int(found[3]), int(found[4]), int(found[5])) == (count + 1, 0, 2), found[0]


@HOLDING
def test_requests_that_come_during_a_hold_share_its_interrupt(
        rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    with holding(rig, caplog, monkeypatch, 1_200_000_000) as f:  # over a second: whole seconds too
        first = f.make_request(0, VIRTIO_BLK_T_IN, 60, in_len=SECTOR_SIZE)
        f.kick(0)
        f.wait_used(0)  # served, and its interrupt held
        second = f.make_request(0, VIRTIO_BLK_T_IN, 61, in_len=SECTOR_SIZE)
        f.kick(0)
        assert [u.id for u in f.wait_used(0)] == [second.head]
        assert f.wait_call(0) == 1  # one interrupt for both, once the hold ran out
        assert f.data(first) + f.data(second) == rig.expected(60, 2)
    found = _queue_log(caplog)
    assert (int(found[2]), int(found[4])) == (2, 1), found[0]


@HOLDING
def test_during_a_hold_no_kick_is_asked_for_and_what_comes_without_one_is_served(
        rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """While an interrupt is held the avail event stays behind, so a driver adds without
    kicking; what it adds is served when the hold ends, with one interrupt, and a kick is
    asked for again."""
    with holding(rig, caplog, monkeypatch, 300_000_000) as f:
        first = f.make_request(0, VIRTIO_BLK_T_IN, 70, in_len=SECTOR_SIZE)
        f.kick(0)
        f.wait_used(0)
        assert f.avail_event(0) == 0  # not moved past the request just served: no kick wanted
        second = f.make_request(0, VIRTIO_BLK_T_IN, 71, in_len=SECTOR_SIZE)  # not kicked
        assert [u.id for u in f.wait_used(0)] == [second.head]
        assert f.wait_call(0) == 1
        assert f.data(first) + f.data(second) == rig.expected(70, 2)
        wait_until(lambda: f.avail_event(0) == 2, WAIT, "the avail event to ask for a kick again")
    found = _queue_log(caplog)
    assert (int(found[3]), int(found[4])) == (2, 1), found[0]


@HOLDING
def test_large_requests_start_no_hold(
        rig: Rig, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    sectors = 2 * vhost_user_blk_fast.HOLD_MAX_REQUEST_BYTES // SECTOR_SIZE
    with holding(rig, caplog, monkeypatch, 900_000_000) as f:
        for n in range(3):
            req = f.make_request(0, VIRTIO_BLK_T_IN, n * sectors, in_len=sectors * SECTOR_SIZE)
            f.kick(0)
            assert f.wait_call(0) == 1
            f.wait_used(0)
            assert f.data(req) == rig.expected(n * sectors, sectors)
    found = _queue_log(caplog)
    # No hold began: none caught more, none ran out alone (the counts of every hold that ends).
    assert (int(found[3]), int(found[4]), int(found[5])) == (4, 0, 0), found[0]


def test_get_config_past_the_config_space_fails(rig: Rig) -> None:
    with rig.connect() as f:
        f.negotiate()
        with pytest.raises(FrontendError, match="failed it"):
            f.get_config(16, offset=90)
        assert f.capacity() == SECTORS


def test_get_vring_base_stops_the_ring_until_a_new_kick(rig: Rig) -> None:
    with rig.ready() as f:
        for sector in (1, 2, 3):
            good(rig, f, sector, 1)
        assert f.get_vring_base(0) == 3
        req = f.make_request(0, VIRTIO_BLK_T_IN, 5, in_len=SECTOR_SIZE)
        f.kick(0)  # the server dropped its kick fd: nobody hears this one
        with pytest.raises(TimeoutError):
            f.wait_used(0, timeout=0.3)
        f.restart_queue(0, base=3)  # the ring starts again with a new kick fd and finds the request
        assert f.wait_used(0) == [Used(req.head, SECTOR_SIZE + 1)]
        assert f.data(req) == rig.expected(5, 1)


def test_ring_disabled_serves_nothing_until_enabled(rig: Rig) -> None:
    with rig.connect() as f:
        f.negotiate()
        assert f.set_mem_table()
        f.setup_queue(0, 16, enable=False)
        req = f.make_request(0, VIRTIO_BLK_T_IN, 9, in_len=SECTOR_SIZE)
        f.kick(0)
        with pytest.raises(TimeoutError):
            f.wait_used(0, timeout=0.3)
        assert f.set_vring_enable(0, True)
        assert f.wait_used(0) == [Used(req.head, SECTOR_SIZE + 1)]


# -- one request wrong: answered with a status, the queue goes on ---------------------------


def test_buffer_outside_guest_memory_is_ioerr(rig: Rig) -> None:
    with rig.ready() as f:
        before = stat(rig.rw, "bad_chains")
        ram = f.ram
        cases = [
            f.make_request(0, VIRTIO_BLK_T_IN, 4, in_len=SECTOR_SIZE, data_gpa=OUTSIDE),
            f.make_request(0, VIRTIO_BLK_T_OUT, 4, out=b"x" * SECTOR_SIZE, data_gpa=OUTSIDE),
            # Straddling the end of guest RAM: half in, half out.
            f.make_request(0, VIRTIO_BLK_T_IN, 4, in_len=SECTOR_SIZE, data_gpa=ram.end - SECTOR_SIZE // 2),
            f.make_request(0, VIRTIO_BLK_T_IN, 4, in_len=SECTOR_SIZE, data_gpa=ram.gpa - 8),
        ]
        assert f.run(*cases) == [VIRTIO_BLK_S_IOERR] * len(cases)
        wait_equal(lambda: stat(rig.rw, "bad_chains"), before + len(cases), WAIT, "bad chains")
        assert f.read(ram.end - SECTOR_SIZE // 2, SECTOR_SIZE // 2) == bytes(SECTOR_SIZE // 2)  # nothing written
        good(rig, f)


def test_read_and_write_past_the_capacity_are_ioerr(rig: Rig) -> None:
    with rig.ready() as f:
        for sector, count in ((SECTORS - 1, 2), (SECTORS, 1), (1 << 62, 1), ((1 << 64) - 1, 1)):
            status, _ = f.read_sectors(0, sector, count)
            assert status == VIRTIO_BLK_S_IOERR, (sector, count)
        assert f.write_sectors(0, SECTORS - 1, b"y" * 2 * SECTOR_SIZE) == VIRTIO_BLK_S_IOERR
        # Not whole sectors.
        req = f.make_request(0, VIRTIO_BLK_T_IN, 0, in_len=100)
        assert f.run(req) == [VIRTIO_BLK_S_IOERR]
        good(rig, f, SECTORS - 2, 2)
    rig.idle()
    assert rig.image.stat().st_size == IMAGE_SIZE


def test_unknown_request_type_is_unsupp(rig: Rig) -> None:
    with rig.ready() as f:
        for kind in (99, 2, 0xFFFFFFFF):
            req = f.make_request(0, kind, 0, in_len=SECTOR_SIZE)
            assert f.run(req) == [VIRTIO_BLK_S_UNSUPP], kind
        good(rig, f)


def test_write_to_a_readonly_export_is_ioerr(rig: Rig) -> None:
    ro_before = rig.ro_image.read_bytes()
    with rig.ready(rig.ro) as f:
        assert f.features >> VIRTIO_BLK_F_RO & 1
        assert f.capacity() == RO_SIZE // SECTOR_SIZE
        assert f.write_sectors(0, 3, b"z" * SECTOR_SIZE) == VIRTIO_BLK_S_IOERR
        assert f.write_sectors(0, 3, b"z" * SECTOR_SIZE, indirect=True) == VIRTIO_BLK_S_IOERR
        status, data = f.read_sectors(0, 3, 1)
        assert status == VIRTIO_BLK_S_OK and data == ro_before[3 * SECTOR_SIZE:4 * SECTOR_SIZE]
        assert f.flush() == VIRTIO_BLK_S_OK
        status, ident = f.get_id()
        assert ident.rstrip(b"\0") == b"vubro"
    rig.idle(rig.ro)
    assert rig.ro_image.read_bytes() == ro_before


def test_header_split_across_descriptors_works(rig: Rig) -> None:
    payload = os.urandom(2 * SECTOR_SIZE)
    with rig.ready() as f:
        status, data = f.read_sectors(0, 40, 2, split_header=True)
        assert status == VIRTIO_BLK_S_OK and data == rig.expected(40, 2)
        assert f.write_sectors(0, 200, payload, split_header=True, indirect=True) == VIRTIO_BLK_S_OK
        rig.wrote(200, payload)
        status, data = f.read_sectors(0, 200, 2, split_header=True, indirect=True)
        assert status == VIRTIO_BLK_S_OK and data == payload
        # A header shorter than 16 bytes: IOERR, found by its status byte.
        [head] = f.take_descs(0, 1)
        status_gpa = f.alloc(1, b"\xff")
        hdr = f.alloc(8, struct.pack("<II", VIRTIO_BLK_T_IN, 0))
        [second] = f.take_descs(0, 1)
        f.write_desc(0, head, hdr, 8, VIRTQ_DESC_F_NEXT, second)
        f.write_desc(0, second, status_gpa, 1, VIRTQ_DESC_F_WRITE)
        f.offer(0, head)
        f.kick(0)
        assert f.wait_used(0) == [Used(head, 1)]
        assert f.read(status_gpa, 1) == bytes([VIRTIO_BLK_S_IOERR])
        good(rig, f)


# -- the ring wrong: the queue stops, and serves again once set up anew -----------------------


def make_loop(f: VhostUserFrontend) -> None:
    a, b = f.take_descs(0, 2)
    f.write_desc(0, a, OUTSIDE, 16, VIRTQ_DESC_F_NEXT, b)
    f.write_desc(0, b, OUTSIDE + 0x1000, 1, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE, a)  # back to a
    f.offer(0, a)


def make_avail_jump(f: VhostUserFrontend) -> None:
    f.set_avail_idx(0, f.vrings[0].avail_idx + f.vrings[0].num + 1)


def make_bad_indirect_len(f: VhostUserFrontend) -> None:
    table = f.alloc(64)
    [head] = f.take_descs(0, 1)
    f.write_desc(0, head, table, 24, VIRTQ_DESC_F_INDIRECT)  # not a multiple of 16
    f.offer(0, head)


def make_empty_indirect(f: VhostUserFrontend) -> None:
    [head] = f.take_descs(0, 1)
    f.write_desc(0, head, f.alloc(16), 0, VIRTQ_DESC_F_INDIRECT)
    f.offer(0, head)


def make_indirect_outside(f: VhostUserFrontend) -> None:
    [head] = f.take_descs(0, 1)
    f.write_desc(0, head, OUTSIDE, 64, VIRTQ_DESC_F_INDIRECT)
    f.offer(0, head)


def make_head_past_num(f: VhostUserFrontend) -> None:
    f.offer(0, f.vrings[0].num)


def make_next_past_num(f: VhostUserFrontend) -> None:
    [head] = f.take_descs(0, 1)
    f.write_desc(0, head, f.alloc(16), 16, VIRTQ_DESC_F_NEXT, 0xFFFF)
    f.offer(0, head)


def make_no_status(f: VhostUserFrontend) -> None:
    [head] = f.take_descs(0, 1)
    f.write_desc(0, head, f.alloc(16, struct.pack("<IIQ", VIRTIO_BLK_T_IN, 0, 0)), 16, 0)  # nothing writable
    f.offer(0, head)


BREAKERS = {
    "loop": make_loop,
    "avail-idx-jump": make_avail_jump,
    "indirect-bad-length": make_bad_indirect_len,
    "indirect-empty": make_empty_indirect,
    "indirect-outside-memory": make_indirect_outside,
    "head-past-num": make_head_past_num,
    "next-past-num": make_next_past_num,
    "no-status-byte": make_no_status,
}


def memory_but_avail_event(f: VhostUserFrontend) -> bytes:
    """All of guest RAM except the used ring's avail_event (the device may write it whenever)."""
    ring = f.vrings[0]
    at = ring.used + 4 + 8 * ring.num - f.ram.gpa
    whole = f.read(f.ram.gpa, f.ram.size)
    return whole[:at] + whole[at + 2:]


def recover(f: VhostUserFrontend, how: str) -> None:
    if how == "setup-again":
        f.setup_queue(0, 16)  # SET_VRING_NUM, _BASE, _ADDR, _ERR, _CALL, _KICK, _ENABLE
    else:
        f.reconnect()
        bring_up(f)


@pytest.mark.parametrize("how", ["setup-again", "reconnect"])
@pytest.mark.parametrize("breaker", list(BREAKERS))
def test_a_broken_ring_stops_its_queue_and_serves_again_once_set_up(rig: Rig, breaker: str, how: str) -> None:
    with no_leaks(), rig.ready() as f:
        good(rig, f)
        broken = stat(rig.rw, "broken_queues")
        used = f.used_idx(0)
        BREAKERS[breaker](f)
        memory = memory_but_avail_event(f)
        f.kick(0)
        wait_equal(lambda: stat(rig.rw, "broken_queues"), broken + 1, WAIT, "a broken queue")
        assert f.wait_err(0) >= 1  # QEMU would report "vhost vring error"
        # The server wrote nothing into guest memory: no used entry, no status byte.
        assert f.used_idx(0) == used
        assert memory_but_avail_event(f) == memory
        # The stopped queue serves nothing, whatever the kicks.
        f.kick(0)
        time.sleep(0.1)
        assert f.used_idx(0) == used and stat(rig.rw, "broken_queues") == broken + 1
        recover(f, how)
        good(rig, f)
        assert f.errs(0) == 0


def test_good_requests_before_a_broken_one_are_answered(rig: Rig) -> None:
    """One kick, two good requests and a loop: the two are used and the driver is
    interrupted for them, then the queue stops."""
    with rig.ready() as f:
        broken = stat(rig.rw, "broken_queues")
        reqs = [f.make_request(0, VIRTIO_BLK_T_IN, s, in_len=SECTOR_SIZE) for s in (7, 8)]
        make_loop(f)
        f.kick(0)
        wait_equal(lambda: stat(rig.rw, "broken_queues"), broken + 1, WAIT, "a broken queue")
        assert {u.id for u in f.wait_used(0, 2)} == {r.head for r in reqs}
        assert [f.status(r) for r in reqs] == [VIRTIO_BLK_S_OK] * 2
        assert f.wait_call(0) >= 1
        assert f.wait_err(0) >= 1
        f.setup_queue(0, 16)
        good(rig, f)


def test_rings_outside_guest_memory_break_the_queue(rig: Rig) -> None:
    with rig.ready() as f:
        broken = stat(rig.rw, "broken_queues")
        assert f.set_vring_addr(0, OUTSIDE, OUTSIDE + 0x1000, OUTSIDE + 0x2000)
        f.kick(0)
        wait_equal(lambda: stat(rig.rw, "broken_queues"), broken + 1, WAIT, "a broken queue")
        assert f.wait_err(0) >= 1
        f.setup_queue(0, 16)
        good(rig, f)


# -- messages wrong: refused (the connection goes on) or the end of the connection ------------


def test_unknown_and_unsupported_requests_are_refused(rig: Rig) -> None:
    with no_leaks(), rig.ready() as f:
        refused = stat(rig.rw, "refused")
        assert not f.call(99)
        assert not f.call(0xFFFF, b"\0" * 40)
        assert not f.call(Request.SEND_RARP, bytes(8))
        assert not f.call(Request.SET_LOG_FD, fds=[f.eventfd()])  # its fd is closed by the server
        assert stat(rig.rw, "refused") == refused + 4
        assert f.ask_u64(Request.GET_QUEUE_NUM) == 1
        good(rig, f)


def test_bad_memory_tables_are_refused(rig: Rig) -> None:
    with no_leaks(), rig.connect() as f:
        f.negotiate()
        other = f.new_region(1 << 20, f.ram.gpa + (1 << 20), 0x7F99_0000_0000)  # inside the first one's GPAs
        assert not f.set_mem_table([f.ram, other])
        # One fd short, one too many.
        assert not f.set_mem_table_raw([f.ram.describe(), other.describe(guest_phys_addr=0x1_0000_0000)],
                                       [f.ram.fd])
        assert not f.set_mem_table_raw([f.ram.describe()], [f.ram.fd, other.fd])
        # Past the end of the memfd; an fd that cannot be mapped.
        assert not f.set_mem_table_raw([f.ram.describe(mmap_offset=f.ram.size)], [f.ram.fd])
        assert not f.set_mem_table_raw([f.ram.describe(memory_size=2 * f.ram.size)], [f.ram.fd])
        assert not f.set_mem_table_raw([f.ram.describe()], [f.eventfd()])
        # An empty region; nine regions.
        assert not f.set_mem_table_raw([f.ram.describe(memory_size=0)], [f.ram.fd])
        header = vu.MEMORY_TABLE_HEADER.pack(9, 0) + f.ram.describe().pack() * 9
        assert not f.call(Request.SET_MEM_TABLE, header, [f.ram.fd])
        assert rig.rw.connection is not None and not rig.rw.connection.mappings
        assert f.set_mem_table()
        f.setup_queue(0, 16)
        good(rig, f)


def test_vring_messages_for_a_queue_that_does_not_exist_are_refused(rig: Rig) -> None:
    with no_leaks(), rig.ready() as f:
        assert not f.set_vring_num(5, 8)
        assert not f.set_vring_base(1, 0)
        assert not f.set_vring_addr(200, 0, 0, 0)
        assert not f.set_vring_call(5, f.eventfd())
        assert not f.set_vring_kick(7, f.eventfd())
        assert not f.set_vring_enable(3, True)
        # And bad values for the one that does.
        assert not f.set_vring_num(0, 3)  # not a power of two
        assert not f.set_vring_num(0, 65536)
        assert not f.call(Request.SET_VRING_ENABLE, vu.vring_state(0, 2))
        assert not f.call(Request.SET_VRING_CALL, vu.vring_fd(0), [f.eventfd(), f.eventfd()])  # two fds
        assert not f.call(Request.SET_VRING_KICK, vu.vring_fd(0, has_fd=False))  # polling: not supported
        good(rig, f)
        # GET_VRING_BASE must be answered: for a queue that does not exist, the connection ends.
        f.send(Request.GET_VRING_BASE, vu.vring_state(5, 0))
        assert f.closed_by_peer()
    rig.idle()
    with rig.ready() as f:
        good(rig, f)


def test_a_huge_header_ends_the_connection(rig: Rig) -> None:
    with no_leaks():
        errors = stat(rig.rw, "protocol_errors")
        with rig.connect() as f:
            f.negotiate()
            f.send_raw(vu.HEADER.pack(Request.SET_FEATURES, vu.VERSION, 1 << 30) + bytes(64))
            assert f.closed_by_peer()
        assert stat(rig.rw, "protocol_errors") == errors + 1
        rig.idle()
        with rig.connect() as f:
            f.send_raw(vu.HEADER.pack(Request.GET_FEATURES, 2, 0))  # version 2
            assert f.closed_by_peer()
        wait_equal(lambda: stat(rig.rw, "protocol_errors"), errors + 2, WAIT, "protocol errors")
        rig.idle()
        with rig.ready() as f:
            good(rig, f)


@pytest.mark.parametrize("cut", [1, vu.HEADER_SIZE - 1, vu.HEADER_SIZE, vu.HEADER_SIZE + 3])
def test_half_a_message_then_gone(rig: Rig, cut: int) -> None:
    """A front end that dies mid-message, with an fd on its way."""
    with no_leaks():
        errors = stat(rig.rw, "protocol_errors")
        with rig.connect() as f:
            f.negotiate()
            message = vu.build_request(Request.SET_VRING_CALL, vu.vring_fd(0))
            f.send_raw(message[:cut], [f.eventfd()])
        wait_equal(lambda: stat(rig.rw, "protocol_errors"), errors + 1, WAIT, "a protocol error")
        rig.idle()
        with rig.ready() as f:
            good(rig, f)


def test_a_message_glued_behind_a_fatal_one_leaks_no_fd(rig: Rig) -> None:
    """GET_VRING_BASE of a missing queue ends the connection; the SET_VRING_CALL
    that came in the same segment, with its fd, must not keep that fd open."""
    with no_leaks():
        with rig.ready() as f:
            fatal = vu.build_request(Request.GET_VRING_BASE, vu.vring_state(9, 0))
            glued = vu.build_request(Request.SET_VRING_CALL, vu.vring_fd(0))
            f.send_raw(fatal + glued, [f.eventfd()])
            assert f.closed_by_peer()
        rig.idle()


def test_too_many_fds_are_closed(rig: Rig) -> None:
    with no_leaks(), rig.ready() as f:
        fds = [f.eventfd() for _ in range(vu.MAX_FDS + 4)]  # the kernel drops what does not fit
        assert not f.call(Request.SET_VRING_CALL, vu.vring_fd(0), fds)
        good(rig, f)


def test_a_second_front_end_waits_for_the_first(rig: Rig) -> None:
    with rig.ready() as first, rig.connect() as second:
        second.send(Request.GET_FEATURES)
        with pytest.raises(TimeoutError):
            second.receive(timeout=0.3)
        good(rig, first)
        first.disconnect()
        assert vu.parse_u64(second.receive().payload) & vu.VHOST_USER_F_PROTOCOL_FEATURES


# -- guest memory hot-add -------------------------------------------------------------------


def test_memory_hot_add_and_remove_under_a_running_queue(rig: Rig) -> None:
    payload = os.urandom(4 * SECTOR_SIZE)
    with no_leaks(), rig.ready() as f:
        good(rig, f)
        # A DIMM: its own memfd, its region some way into it (an unaligned mmap offset).
        dimm = f.new_region(1 << 20, 0x1_0000_0000, 0x7F55_0000_0000, mmap_offset=0x1800)
        added = stat(rig.rw, "regions_added")
        assert f.add_mem_reg(dimm)
        assert stat(rig.rw, "regions_added") == added + 1
        req = f.make_request(0, VIRTIO_BLK_T_IN, 50, in_len=4 * SECTOR_SIZE, region=dimm)
        assert dimm.contains(req.data_gpa, req.data_len)
        assert f.run(req) == [VIRTIO_BLK_S_OK]
        assert f.data(req) == rig.expected(50, 4)
        assert f.write_sectors(0, 300, payload, region=dimm, indirect=True) == VIRTIO_BLK_S_OK
        rig.wrote(300, payload)
        good(rig, f, 299, 6)
        # The same region twice, or one overlapping it: refused.
        assert not f.add_mem_reg(dimm)
        clash = f.new_region(1 << 20, dimm.gpa + 0x1000, 0x7F66_0000_0000)
        assert not f.add_mem_reg(clash)
        f.drop_region(clash)
        # Removed: a request into it is IOERR, the rest goes on.
        assert f.rem_mem_reg(dimm)
        assert not f.rem_mem_reg(dimm)
        stale = [f.make_request(0, VIRTIO_BLK_T_IN, 50, in_len=SECTOR_SIZE, data_gpa=dimm.gpa),
                 f.make_request(0, VIRTIO_BLK_T_OUT, 50, out=b"q" * SECTOR_SIZE, data_gpa=dimm.gpa + 0x800)]
        assert f.run(*stale) == [VIRTIO_BLK_S_IOERR] * 2
        good(rig, f, 50, 1)
        # And back again.
        assert f.add_mem_reg(dimm)
        status, data = f.read_sectors(0, 301, 2, region=dimm)
        assert status == VIRTIO_BLK_S_OK and data == rig.expected(301, 2)
        # Removing the region the rings are in stops the queue.
        broken = stat(rig.rw, "broken_queues")
        assert f.rem_mem_reg(f.ram)
        f.make_request(0, VIRTIO_BLK_T_IN, 1, in_len=SECTOR_SIZE)
        f.kick(0)
        wait_equal(lambda: stat(rig.rw, "broken_queues"), broken + 1, WAIT, "a broken queue")
        assert f.wait_err(0) >= 1
        assert f.add_mem_reg(f.ram)
        f.setup_queue(0, 16)
        good(rig, f)


def test_a_buffer_across_two_adjoining_regions(rig: Rig) -> None:
    """Two regions that adjoin in guest physical addresses (two DIMMs side by side):
    a buffer across the seam is served from both."""
    with no_leaks(), rig.ready() as f:
        low = f.new_region(1 << 16, 0x2_0000_0000, 0x7F70_0000_0000)
        high = f.new_region(1 << 16, low.end, 0x7F80_0000_0000)
        assert f.add_mem_reg(low) and f.add_mem_reg(high)
        req = f.make_request(0, VIRTIO_BLK_T_IN, 60, in_len=2 * SECTOR_SIZE, data_gpa=low.end - SECTOR_SIZE)
        assert f.run(req) == [VIRTIO_BLK_S_OK]
        assert f.read(low.end - SECTOR_SIZE, SECTOR_SIZE) + f.read(high.gpa, SECTOR_SIZE) == rig.expected(60, 2)


# -- no leaks over many front ends ------------------------------------------------------------


def test_twenty_front_ends_leave_nothing_behind(rig: Rig) -> None:
    served = rig.rw.connections_served
    with no_leaks():
        for i in range(20):
            with rig.ready() as f:
                if i % 2:
                    extra = f.new_region(1 << 16, 0x3_0000_0000, 0x7F90_0000_0000)
                    assert f.add_mem_reg(extra)
                    status, data = f.read_sectors(0, i, 1, region=extra)
                else:
                    status, data = f.read_sectors(0, i, 1, indirect=True)
                assert status == VIRTIO_BLK_S_OK and data == rig.expected(i, 1)
                assert rig.rw.open_fds()  # the socket, the queue's eventfds
            rig.idle()
    assert rig.rw.connections_served == served + 20


def test_requests_reach_the_right_region_by_gpa(rig: Rig) -> None:
    """The front end's idea of where a buffer is agrees with the server's: a
    request whose data is written by the server lands exactly there."""
    with rig.ready() as f:
        canary = f.alloc(SECTOR_SIZE + 32, b"\xaa" * (SECTOR_SIZE + 32))
        req: BlkRequest = f.make_request(0, VIRTIO_BLK_T_IN, 77, in_len=SECTOR_SIZE, data_gpa=canary + 16)
        assert f.run(req) == [VIRTIO_BLK_S_OK]
        assert f.read(canary, 16) == b"\xaa" * 16
        assert f.read(canary + 16, SECTOR_SIZE) == rig.expected(77, 1)
        assert f.read(canary + 16 + SECTOR_SIZE, 16) == b"\xaa" * 16


def test_region_objects_close_cleanly() -> None:
    with no_leaks():
        region = GuestRegion.create(0, 1 << 16, 0x1000)
        region.close()
        region.close()


def test_discard_and_write_zeroes_reach_the_image(rig: Rig) -> None:
    """DISCARD (type 11) and WRITE_ZEROES (type 13), each one 16-byte segment
    (sector, count, flags): zeros read back, through the device and in the file;
    a segment past the capacity is IOERR and changes nothing."""
    with rig.ready() as f:
        for kind, sector, flags in ((11, 300, 0), (13, 400, 0), (13, 500, 1)):  # 1: UNMAP allowed
            req = f.make_request(0, kind, 0, out=struct.pack("<QII", sector, 8, flags))
            assert f.run(req) == [VIRTIO_BLK_S_OK], (kind, sector)
            rig.wrote(sector, bytes(8 * SECTOR_SIZE))
            status, data = f.read_sectors(0, sector, 8)
            assert status == VIRTIO_BLK_S_OK and data == bytes(8 * SECTOR_SIZE)
        past = f.make_request(0, 13, 0, out=struct.pack("<QII", SECTORS - 4, 8, 0))
        assert f.run(past) == [VIRTIO_BLK_S_IOERR]
        good(rig, f, SECTORS - 4, 4)
    rig.idle()
    assert rig.image.read_bytes() == bytes(rig.model)
