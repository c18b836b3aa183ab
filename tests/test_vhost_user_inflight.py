"""Inflight I/O tracking (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) of the vhost-user-blk
server, against a front end that plays QEMU's part (qbackend.testing.vhost_user_client).

A back end killed mid-request is played by hand: the front end lays requests
out, makes them available, and writes into the used ring and the inflight
region what a back end that took them and died would have left (some used
already, some in flight with their counters, a last batch whose used idx store
happened but whose bookkeeping did not).  A new connection hands the region
back (SET_INFLIGHT_FD) and the ring base QEMU sends after a failed
GET_VRING_BASE (the used idx): the server must carry out again exactly the
requests in flight, oldest counter first, before anything new, and answer
every request once.  The same through the native path, the Python path and
the Python path that completes out of order (the test knob).  A region that
does not fit the ring is refused, and the queue serves as if there was none.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from qbackend.app.backend_thread import BackendThread
from qbackend.app.service import Backend
from qbackend.models.inflight import InflightRegion
from qbackend.options import VhostUserBlkOptions
from qbackend.protocol import vhost_user as vu
from qbackend.servers import vhost_user_blk_fast
from qbackend.servers.vhost_user_blk import VhostUserBlkServer
from qbackend.testing.harness import mappings, open_fds, wait_equal, wait_until
from qbackend.testing.vhost_user_client import (
    SECTOR_SIZE,
    VIRTIO_BLK_S_OK,
    VIRTIO_BLK_T_OUT,
    Used,
    VhostUserFrontend,
    Vring,
)

IMAGE_SIZE = 4 << 20
NUM = 16
WAIT = 5.0
PATHS = ["native", "python", "reorder"]


@dataclass
class Rig:
    thread: BackendThread
    server: VhostUserBlkServer
    image: Path

    def sector(self, n: int) -> bytes:
        with open(self.image, "rb") as disk:
            disk.seek(n * SECTOR_SIZE)
            return disk.read(SECTOR_SIZE)

    def idle(self) -> None:
        wait_until(lambda: self.server.connection is None, WAIT, "the server to drop its front end")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    work = tmp_path_factory.mktemp("inflight")
    image = work / "disk.raw"
    image.write_bytes(bytes(IMAGE_SIZE))
    backend = Backend()
    backend.add_vhost_user_blk(VhostUserBlkOptions(socket=work / "vub.sock", image=image, format="raw", id="vub0"))
    with BackendThread(backend) as thread:
        yield Rig(thread, backend.blocks.vhost["vub0"].server, image)


@pytest.fixture(params=PATHS)
def path(request: pytest.FixtureRequest, rig: Rig) -> Iterator[str]:
    """The server's request path for the connections of one test."""
    name: str = request.param
    if name == "native" and vhost_user_blk_fast.load() is None:
        pytest.skip("the native helper is not loaded here")
    native, reorder = rig.server.native, rig.server.reorder
    rig.server.native = name == "native"
    rig.server.reorder = name == "reorder"
    try:
        yield name
    finally:
        rig.idle()
        rig.server.native, rig.server.reorder = native, reorder


@pytest.fixture(autouse=True)
def sound(rig: Rig) -> Iterator[None]:
    before = rig.server.stats["internal_errors"]
    yield
    rig.idle()
    assert rig.server.stats["internal_errors"] == before, rig.server.stats


@contextmanager
def no_leaks() -> Iterator[None]:
    fds, maps = open_fds(), mappings("/memfd:")
    yield
    wait_equal(open_fds, fds, WAIT, "this process's fd count")
    wait_equal(lambda: mappings("/memfd:"), maps, WAIT, "this process's memfd mappings")


def connect(rig: Rig) -> VhostUserFrontend:
    f = VhostUserFrontend(rig.server.socket_path, timeout=WAIT)
    try:
        f.negotiate()
        assert f.set_mem_table()
    except BaseException:
        f.close()
        raise
    return f


def sealed(size: int, *, seal: bool = True) -> int:
    fd = os.memfd_create("test-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    if seal:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


def stat(rig: Rig, name: str) -> int:
    return rig.server.stats[name]


def sector_data(n: int, tag: int) -> bytes:
    return (n.to_bytes(4, "little") + tag.to_bytes(4, "little")) * (SECTOR_SIZE // 8)


# -- negotiation and the messages ------------------------------------------------------------


def test_inflight_is_offered_and_get_gives_a_zeroed_sealed_memfd(rig: Rig) -> None:
    with no_leaks(), connect(rig) as f:
        assert f.protocol_features & vu.ProtocolFeature.INFLIGHT_SHMFD
        info, fd = f.get_inflight_fd(1, 128)
        assert fd is not None
        try:
            size = vu.inflight_queue_size(128)
            assert size == 2112 and size % vu.INFLIGHT_ALIGN == 0
            assert (info.mmap_size, info.mmap_offset, info.num_queues, info.queue_size) == (size, 0, 1, 128)
            assert os.fstat(fd).st_size == size
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
                assert m[:] == bytes(size)
        finally:
            os.close(fd)
        # A request the device cannot meet: size 0 (no tracking), and the connection goes on.
        for queues, qsize in ((2, 128), (0, 128), (1, 0), (1, 40000)):
            info, fd = f.get_inflight_fd(queues, qsize)
            assert fd is None and info.mmap_size == 0
        assert f.ask_u64(vu.FrontendRequest.GET_QUEUE_NUM) == 1


def test_bad_set_inflight_fd_is_refused_and_the_connection_serves(rig: Rig) -> None:
    size = vu.inflight_queue_size(NUM)
    with no_leaks(), connect(rig) as f:
        good = sealed(2 * size)
        small = sealed(size - 64)
        unsealed = sealed(size, seal=False)
        try:
            refused = stat(rig, "refused")
            cases = [
                (vu.Inflight(size + 64, 0, 1, NUM), good),  # not the formula's size
                (vu.Inflight(size, 0, 2, NUM), good),  # more queues than the device has
                (vu.Inflight(0, 0, 0, NUM), good),
                (vu.Inflight(size, 0, 1, 0), good),
                (vu.Inflight(size, 8, 1, NUM), good),  # an offset that misaligns the counters
                (vu.Inflight(size, size + 64, 1, NUM), good),  # past the file's end
                (vu.Inflight(size, 0, 1, NUM), small),  # a file too small
                (vu.Inflight(size, 0, 1, NUM), unsealed),  # a file that could shrink under the mapping
            ]
            for inflight, fd in cases:
                assert not f.set_inflight_fd(inflight, fd), inflight
            assert stat(rig, "refused") - refused == len(cases)
            assert f.set_inflight_fd(vu.Inflight(size, size, 1, NUM), good)  # the second half of the file
            f.setup_queue(0, NUM)
            assert f.write_sectors(0, 3, sector_data(3, 1)) == VIRTIO_BLK_S_OK
            assert f.read_sectors(0, 3, 1) == (VIRTIO_BLK_S_OK, sector_data(3, 1))
        finally:
            for fd in (good, small, unsealed):
                os.close(fd)


def test_requests_are_recorded_and_returned_in_the_region(rig: Rig, path: str) -> None:
    with no_leaks(), connect(rig) as f:
        info, fd = f.get_inflight_fd(1, NUM)
        assert fd is not None
        try:
            assert f.set_inflight_fd(info, fd)
            f.setup_queue(0, NUM)
            for n in range(20):  # past the ring's size: used idx wraps the slots
                assert f.write_sectors(0, 40 + n, sector_data(40 + n, 2)) == VIRTIO_BLK_S_OK
            wait_until(lambda: region_of(fd, info).used_idx == 20, WAIT, "the region's used idx")
            region = region_of(fd, info)
            assert (region.version, region.desc_num) == (vu.INFLIGHT_VERSION, NUM)
            entries = [region.entry(h) for h in range(NUM)]
            assert all(flag == 0 for flag, _, _ in entries)
            assert max(counter for _, _, counter in entries) == 20  # one counter per chain taken, from 1
            region.release()
        finally:
            os.close(fd)


def region_of(fd: int, info: vu.Inflight, queue: int = 0) -> InflightRegion:
    """A copy of one queue's region as it is now."""
    size = vu.inflight_queue_size(info.queue_size)
    with mmap.mmap(fd, info.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        return InflightRegion(memoryview(bytearray(m[queue * size:(queue + 1) * size])))


# -- a back end killed with requests in flight ------------------------------------------------


@dataclass
class Crashed:
    """What a killed back end left: the ring (driver's view) and the region's fd."""

    f: VhostUserFrontend
    ring: Vring
    info: vu.Inflight
    fd: int
    heads: list[int]  # every request made available, in ring order
    used: list[int]  # returned before the crash (in the used ring)
    inflight: list[int]  # in flight, oldest counter first
    batch: list[int]  # the last batch: in the used ring, still flagged in the region
    sector_of: dict[int, int]
    tag_of: dict[int, int]


def crash(rig: Rig, f: VhostUserFrontend, *, done: int = 3, batch: int = 2, inflight_order: tuple[int, ...] = (2, 0, 3, 1),
          corrupt: str = "") -> Crashed:
    """Requests made available and a region as a back end that died leaves them: the first
    `done` used (the last `batch` of them the last batch, still flagged), then the next ones
    in flight with counters in `inflight_order` (index i gets rank inflight_order[i])."""
    info, fd = f.get_inflight_fd(1, NUM)
    assert fd is not None
    assert f.set_inflight_fd(info, fd)
    f.setup_queue(0, NUM)
    ring = f.vrings[0]
    total = done + len(inflight_order)
    # Writes: the ones in flight all to one sector (the oldest counter first, so the newest
    # wins if they are carried out in counter order) and to a sector of their own each.
    reqs = []
    sector_of, tag_of = {}, {}
    for i in range(total):
        sector = 100 if i >= done else 60 + i
        req = f.make_request(0, VIRTIO_BLK_T_OUT, sector, out=sector_data(sector, 10 + i), offer=False,
                             indirect=True)
        reqs.append(req)
        sector_of[req.head] = sector
        tag_of[req.head] = 10 + i
    heads = [r.head for r in reqs]
    f.disconnect()  # the back end's connection goes; the "dead back end" left this:
    rig.idle()
    f.vrings[0] = ring
    f.offer(0, *heads)
    del f.vrings[0]  # its eventfds are closed: the next connection makes new ones
    for i, head in enumerate(heads[:done]):
        f.write(ring.used + 4 + 8 * i, struct.pack("<II", head, 1))
        f.write(reqs[i].status_gpa, bytes([VIRTIO_BLK_S_OK]))
    f.write(ring.used + 2, struct.pack("<H", done))
    with mmap.mmap(fd, info.mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as m:
        view = memoryview(m)
        region = InflightRegion(view[:vu.inflight_queue_size(NUM)])
        batch_heads = heads[done - batch:done]
        vu.INFLIGHT_HEADER.pack_into(view, 0, 0, vu.INFLIGHT_VERSION, NUM, batch_heads[0] if batch else 0,
                                     done - batch)
        for k, head in enumerate(batch_heads):
            region.start(head, 1000 + k)  # newest of all: resubmitting them would be seen
            if k + 1 < len(batch_heads):
                struct.pack_into("<H", view, vu.INFLIGHT_HEADER_SIZE + vu.INFLIGHT_DESC_SIZE * head
                                 + vu.INFLIGHT_DESC_NEXT_OFFSET, batch_heads[k + 1])
        flying = heads[done:]
        for i, head in enumerate(flying):
            region.start(head, 500 + inflight_order[i])
        if corrupt == "desc_num":
            struct.pack_into("<H", view, vu.INFLIGHT_DESC_NUM_OFFSET, NUM * 2)
        elif corrupt == "inflight_byte":
            view[vu.INFLIGHT_HEADER_SIZE + vu.INFLIGHT_DESC_SIZE * flying[0]] = 7
        elif corrupt == "last_batch_head":
            struct.pack_into("<H", view, vu.INFLIGHT_LAST_BATCH_HEAD_OFFSET, NUM)
        elif corrupt == "too_many":
            for head in range(NUM):
                if head not in heads:
                    region.start(head, 2000 + head)
        elif corrupt == "version":
            struct.pack_into("<H", view, vu.INFLIGHT_VERSION_OFFSET, 9)
        region.release()
        view.release()
    order = [flying[i] for i in sorted(range(len(flying)), key=lambda i: inflight_order[i])]
    return Crashed(f, ring, info, fd, heads, heads[:done], order, heads[done - batch:done], sector_of, tag_of)


def test_a_crashed_back_ends_requests_are_carried_out_again_in_counter_order(rig: Rig, path: str) -> None:
    with no_leaks(), connect(rig) as f:
        c = crash(rig, f)
        try:
            resubmitted, native = stat(rig, "inflight_resubmitted"), stat(rig, "native_requests")
            f.connect()
            f.negotiate()
            assert f.set_mem_table()
            assert f.set_inflight_fd(c.info, c.fd)
            ring = f.resume_queue(c.ring, base=len(c.used))  # QEMU: the used idx, after a failed GET_VRING_BASE
            used = f.wait_used(0, len(c.used) + len(c.inflight))
            assert [u.id for u in used[:len(c.used)]] == c.used  # what the dead back end returned
            again = [u.id for u in used[len(c.used):]]
            # Exactly the requests in flight, each once, oldest counter first (the test knob
            # returns one drain's chains in reverse).
            assert again == (c.inflight[::-1] if path == "reorder" else c.inflight)
            assert all(u.len == 1 for u in used)
            assert stat(rig, "inflight_resubmitted") - resubmitted == len(c.inflight)
            # Nothing more: the batch that was returned already is not returned again.
            with pytest.raises(TimeoutError):
                f.wait_used(0, 1, timeout=0.3)
            # New requests are served after them.
            assert f.write_sectors(0, 7, sector_data(7, 99)) == VIRTIO_BLK_S_OK
            assert f.read_sectors(0, 7, 1) == (VIRTIO_BLK_S_OK, sector_data(7, 99))
            assert f.used_idx(0) == len(c.heads) + 2
            assert ring.last_used == len(c.heads) + 2
            # The requests carried out again are the model's; the new ones, C's on the native path.
            assert stat(rig, "native_requests") - native == (2 if path == "native" else 0)
        finally:
            f.disconnect()
            rig.idle()
            os.close(c.fd)
    # Carried out in counter order: the newest write to the shared sector won.
    assert rig.sector(100) == sector_data(100, c.tag_of[c.inflight[-1]])


@pytest.mark.parametrize("corrupt", ["desc_num", "inflight_byte", "last_batch_head", "too_many", "version"])
def test_a_corrupt_region_is_refused_and_the_queue_serves(rig: Rig, path: str, corrupt: str) -> None:
    with no_leaks(), connect(rig) as f:
        c = crash(rig, f, corrupt=corrupt)
        try:
            refused, resubmitted = stat(rig, "inflight_refused"), stat(rig, "inflight_resubmitted")
            f.connect()
            f.negotiate()
            assert f.set_mem_table()
            assert f.set_inflight_fd(c.info, c.fd)
            f.resume_queue(c.ring, base=len(c.used))
            wait_until(lambda: stat(rig, "inflight_refused") > refused, WAIT, "the region to be refused")
            assert stat(rig, "inflight_refused") - refused == 1
            assert stat(rig, "inflight_resubmitted") == resubmitted
            # As without a region: the ring from the base the front end gave, each entry once.
            f.kick(0)
            used = [u.id for u in f.wait_used(0, len(c.heads))]
            assert used[:len(c.used)] == c.used
            assert used[len(c.used):] == (c.heads[len(c.used):][::-1] if path == "reorder" else c.heads[len(c.used):])
            assert f.write_sectors(0, 8, sector_data(8, 98)) == VIRTIO_BLK_S_OK
            assert f.read_sectors(0, 8, 1) == (VIRTIO_BLK_S_OK, sector_data(8, 98))
            # The region was made fresh, and records again.
            wait_until(lambda: region_of(c.fd, c.info).used_idx == len(c.heads) + 2, WAIT, "the region's used idx")
        finally:
            f.disconnect()
            rig.idle()
            os.close(c.fd)


def test_a_region_too_small_for_the_ring_is_refused(rig: Rig, path: str) -> None:
    with no_leaks(), connect(rig) as f:
        info, fd = f.get_inflight_fd(1, NUM // 2)
        assert fd is not None
        try:
            refused = stat(rig, "inflight_refused")
            assert f.set_inflight_fd(info, fd)
            f.setup_queue(0, NUM)
            assert f.write_sectors(0, 9, sector_data(9, 97)) == VIRTIO_BLK_S_OK
            assert stat(rig, "inflight_refused") - refused == 1
            assert region_of(fd, info).version == 0  # not touched: it does not hold the ring
        finally:
            os.close(fd)


def test_many_regions_and_front_ends_leave_nothing_behind(rig: Rig, path: str) -> None:
    with no_leaks():
        for _ in range(10):
            with connect(rig) as f:
                fds = []
                try:
                    for _ in range(3):  # each SET replaces the mapping before it
                        info, fd = f.get_inflight_fd(1, NUM)
                        assert fd is not None
                        fds.append(fd)
                        assert f.set_inflight_fd(info, fd)
                    f.setup_queue(0, NUM)
                    assert f.write_sectors(0, 11, sector_data(11, 3)) == VIRTIO_BLK_S_OK
                    conn = rig.server.connection
                    assert conn is not None and conn.inflight_map is not None
                finally:
                    f.disconnect()
                    rig.idle()
                    for fd in fds:
                        os.close(fd)


def test_the_reorder_knob_completes_out_of_order(rig: Rig) -> None:
    rig.server.reorder = True
    try:
        with connect(rig) as f:
            f.setup_queue(0, NUM)
            reqs = [f.make_request(0, VIRTIO_BLK_T_OUT, 20 + i, out=sector_data(20 + i, 5), offer=False)
                    for i in range(4)]
            f.offer(0, *[r.head for r in reqs])
            f.kick(0)
            used = f.wait_used(0, 4)
            assert used == [Used(r.head, 1) for r in reversed(reqs)]
    finally:
        rig.idle()
        rig.server.reorder = False


# -- the interrupt a restarted back end owes --------------------------------------------------


def test_a_queue_that_starts_again_interrupts_the_driver_once(rig: Rig, path: str) -> None:
    """The dead back end pushed its last completions (used idx stored) and died before it
    signalled the call eventfd: nothing is in flight, nothing more comes, and the driver
    waits for an interrupt.  The new back end gives one as the queue starts serving."""
    with no_leaks(), connect(rig) as f:
        c = crash(rig, f, done=3, batch=0, inflight_order=())
        try:
            f.connect()
            f.negotiate()
            assert f.set_mem_table()
            assert f.set_inflight_fd(c.info, c.fd)
            f.resume_queue(c.ring, base=len(c.used))
            assert f.wait_call(0) >= 1
            assert [u.id for u in f.wait_used(0, 3)] == c.used  # the dead back end's, nothing again
            # And the queue serves on, interrupting as the driver asks.
            assert f.write_sectors(0, 9, sector_data(9, 5)) == VIRTIO_BLK_S_OK
        finally:
            f.disconnect()
            rig.idle()
            os.close(c.fd)


def test_a_new_call_fd_of_a_started_queue_is_signalled_once(rig: Rig, path: str) -> None:
    """SET_VRING_CALL while the queue runs (QEMU swaps the fd as it masks and unmasks a
    vector): an interrupt signalled on the old fd may be lost, so the new one gets one."""
    with no_leaks(), connect(rig) as f:
        f.setup_queue(0, NUM)
        assert f.write_sectors(0, 3, sector_data(3, 1)) == VIRTIO_BLK_S_OK
        ring = f.vrings[0]
        old, ring.call = ring.call, os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        assert old is not None
        os.close(old)
        assert f.set_vring_call(0, ring.call)
        assert f.wait_call(0) >= 1
        assert f.write_sectors(0, 4, sector_data(4, 1)) == VIRTIO_BLK_S_OK
