"""The native path's interrupt decision across a reload of its rings
(qbackend.servers.vhost_user_blk_fast.NativeQueue).

Every vhost-user message makes the C side forget the rings and load them again
from the model.  A notification owed at that moment (chains pushed by C before
it handed a chain to the model, or by the model, and no notify() decision yet)
must survive the reload: a restarted back end that served the requests waiting
in the ring while the front end was still sending its set-up messages left the
guest waiting, for good, for the interrupt of a completion already in the used
ring.  A queue that starts again owes one interrupt whatever it pushes.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from qbackend.models.virtqueue import VIRTIO_F_EVENT_IDX, VIRTQ_AVAIL_F_NO_INTERRUPT, GuestMemory, SplitVirtqueue
from qbackend.servers import vhost_user_blk_fast as fast

pytestmark = pytest.mark.skipif(fast.load() is None, reason="the native helper is not loaded here")

GPA, SIZE, NUM = 0x10000, 0x4000, 8
DESC, AVAIL, USED = GPA, GPA + 0x400, GPA + 0x800


@dataclass
class Rig:
    nq: fast.NativeQueue
    vq: SplitVirtqueue
    call: int
    ram: bytearray

    def load(self) -> None:
        self.nq.load(self.vq, serving=True, capacity=2048, readonly=False, writethrough=False, kick=None,
                     call=self.call)

    def signalled(self) -> bool:
        try:
            return int.from_bytes(os.read(self.call, 8), "little") > 0
        except BlockingIOError:
            return False


@pytest.fixture(params=[True, False], ids=["event_idx", "no_event_idx"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    helper = fast.load()
    assert helper is not None
    memory = GuestMemory()
    ram = bytearray(SIZE)
    memory.add_region(GPA, SIZE, GPA, ram)
    vq = SplitVirtqueue(memory)
    vq.set_num(NUM)
    vq.set_addresses(DESC, AVAIL, USED, userspace=False)
    vq.set_features(1 << VIRTIO_F_EVENT_IDX if request.param else 0)
    vq.resolve()
    native_memory = fast.NativeMemory(helper)
    native_memory.rebuild(memory)
    export: Any = SimpleNamespace(read_map=None)
    call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    nq = fast.NativeQueue.create(native_memory, export, None, wake, b"")
    assert nq is not None
    try:
        yield Rig(nq, vq, call, ram)
    finally:
        nq.forget_rings()
        native_memory.clear()
        os.close(call)
        os.close(wake)


def test_a_notification_owed_survives_a_reload_of_the_rings(rig: Rig) -> None:
    rig.load()
    # The model served the chain C handed over, and pushed it; C takes the ring back.
    rig.nq.give(rig.vq)
    rig.vq.push(0, 1)
    rig.nq.take(rig.vq, True)
    # A message comes before C decides on the interrupt: the rings are loaded again.
    rig.nq.forget_rings()
    rig.load()
    assert rig.nq.notify()
    assert rig.signalled()
    assert not rig.nq.notify()  # decided: once


def test_a_queue_that_starts_owes_one_interrupt(rig: Rig) -> None:
    rig.load()
    assert not rig.nq.notify()  # nothing pushed, nothing owed
    rig.nq.owe_notification()
    assert rig.nq.notify()
    assert rig.signalled()
    assert not rig.nq.notify()


def test_without_event_idx_the_owed_interrupt_follows_the_drivers_flag(rig: Rig) -> None:
    if rig.vq.event_idx:
        pytest.skip("the flag is for rings without VIRTIO_F_EVENT_IDX")
    struct.pack_into("<H", rig.ram, AVAIL - GPA, VIRTQ_AVAIL_F_NO_INTERRUPT)
    rig.load()
    rig.nq.owe_notification()
    assert not rig.nq.notify()
    assert not rig.signalled()
