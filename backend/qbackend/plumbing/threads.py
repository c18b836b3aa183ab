"""qbackend's threads, and the one rule about locks between them and trio.

Threads, and why each exists:

- the trio thread: every server's accept loop, the NBD and control
  handshakes, QMP commands, the slot managers, the ivshmem-server clients;
- one worker per vfio-user connection (`servers.vfio_user`): a blocking
  `recvmsg_into` into a preallocated buffer, then the region access in the
  same thread.  Measured on a 2-core machine: a trio
  `wait_readable` round trip floors at about 35k requests/s, the worker at
  about 54k, level with a Python loop that parses nothing; and `recvmsg`
  must be used so that SCM_RIGHTS fds are never dropped;
- one NBD transmission thread (`servers.nbd.TransmissionLoop`): an epoll
  over every plain connection after its handshake, serving their requests
  with non-blocking sends (a thread per connection paid a GIL handoff, each
  a wake-up of the other CPU, per request: 64 clients got 0.44x qemu-nbd);
  a TLS connection, or one that sends a READ/WRITE of 64 KiB or more, gets
  a worker of its own instead, and each connection a small pool for FLUSH
  and FUA writes;
- for a vhost-user-blk front end (`servers.vhost_user_blk`): one worker
  for its control messages (blocking recvmsg with fds), and one per started
  virtqueue, a `poll` on the queue's kick eventfd that drains the ring;
- one doorbell watcher per ivshmem peer group (`ivshmem.group`): a `poll`
  over every peer's eventfds, delivering doorbells without trio in between;
- a host peer's reader and doorbell threads (`ivshmem.peer`, for programs
  that are not trio);
- one asyncio thread for every QMP client (`machine.qmp`), because
  qemu.qmp is asyncio-only.

What a client can make these threads hold, memory and time (per NBD
connection before and after its handshake, per request, the time limits,
the total under many hostile clients), is written down in
docs/resources.md.  In short for NBD: a client in its handshake costs about
7 KiB and no thread; one in the transmission loop at most about 1.1 MiB; one
with a thread of its own at most about 9.2 MiB (its WRITE payloads, however
long they claim to be, in 4 MiB pieces; a refused one's dropped as it
comes); a client that stops in the middle of a request is dropped after
the payload timeout.  At a stop, nothing a thread may still use is freed or
closed under it: a thread that does not let go in time keeps what it holds
and frees it on its way out.

Locks they share:

- a device's `PciFunction.lock` (RLock): its registers and the vfio-user
  protocol state, taken by the connection worker for each access, and by
  anything else that changes the device (slot managers, DMA, interrupts);
- a peer group's `lock` (RLock): membership and the eventfd table, taken
  by the doorbell watcher, the workers (doorbell register writes) and the
  ivshmem-server clients;
- a QED image's lock: its metadata, taken by NBD connection workers;
- a vhost-user-blk connection's `lock`: its memory table and queues, taken
  by the control worker for one message and by a queue worker for one
  drain of its ring;
- the send locks of a connection, the ivshmem-server client queue lock and
  the QMP event queue's condition: short critical sections for one message.

The rule: a trio task never blocks on a lock that a worker can hold.  It
hands the locked work to a worker thread with `run_locked` (the trio loop
keeps serving everyone else meanwhile), or posts it to the thread that owns
the state.  Workers reach trio the other way, through `trio.from_thread`
or a trio token, never by waiting on a trio primitive while holding a lock.
tests/test_layers.py checks that no `async def` of qbackend takes a lock
with `with`.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import trio

T = TypeVar("T")


async def run_locked(lock: AbstractContextManager[Any], fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` holding ``lock``, in a worker thread, so that the trio
    loop never waits for a lock.  Cancellation waits for ``fn`` to finish
    (the lock is never left half-way through an update)."""

    def call() -> T:
        with lock:
            return fn(*args)

    return await trio.to_thread.run_sync(call)
