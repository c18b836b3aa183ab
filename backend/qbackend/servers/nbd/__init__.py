"""The NBD server: listeners on a UNIX socket and optionally TCP, the sans-IO
protocol in qbackend.protocol.nbd, exports in qbackend.block.exports.

What happens to a client:

- Its handshake runs in trio (`handshake`), bounded by `handshake_timeout`
  (10 s by default, as qemu-nbd): a client that connects and says nothing
  costs a task, and is dropped with a log line.  `max_connections` bounds
  the clients at once (0: no bound); with 1, multi-conn is not offered.
- Once it has chosen an export, a plain connection joins the one
  transmission thread (`loop`): an epoll over every plain connection,
  served in C by the native loop (servers.nbd_fast) when the helpers are
  there, else by Python in that thread.
- A TLS connection, and a plain one from its first READ or WRITE of
  64 KiB (BULK) or more on, gets a thread of its own (`threaded`), with
  blocking I/O: one thread cannot overlap several clients' megabyte
  transfers.
- Requests are read in order and most are answered in order.  FLUSH and
  FUA writes go to a small pool per connection, so a slow flush does not
  hold up the reads behind it: their replies can come back out of order,
  which NBD allows (replies carry the request's cookie).
- A WRITE is checked on its header, before its payload: a refused one's
  payload is dropped as it comes and its error sent after it; an accepted
  one over 4 MiB (MAX_HELD_PAYLOAD) is received and written in pieces.  A
  client that stops in the middle of a request is dropped after
  payload_timeout seconds (the handshake timeout unless set); between
  requests it may stay idle.  docs/resources.md has the whole budget.
- A stopping server stops reading new requests, waits for the loop to let
  go of each connection (LOOP_LET_GO at most) and for what is in flight,
  then flushes and closes the exports.  What a thread may still use is not
  freed under it: a connection the loop keeps longer is left to the loop.

A package of one module per driver, because the four ways a connection is
served share state but no control flow, and each reads best alone:

- `connection`: NbdConnection, the state every driver shares (the
  protocol, the export, the socket, the send lock, the receive buffer, the
  native requests, the pool) and the serving of requests;
- `handshake`: the greeting, the options, STARTTLS (trio);
- `threaded`: a connection's own thread (run_blocking, run_promoted);
- `loop`: the transmission thread (TransmissionLoop), its callbacks per
  connection, and the hand-over to and from the native loop;
- `server`: NbdServer, the way from accept to a driver, and the end;
- `handover`: the state a hand-over to a new process carries (`qbackend
  upgrade`: NbdServer.pause / resume / save / adopt).
"""

from qbackend.servers.nbd.connection import (
                                             BULK,
                                             HANDSHAKE_RECV,
                                             LOOP_BATCH,
                                             MAX_DESCRIPTORS,
                                             RECV_SIZE,
                                             NbdConnection,
                                             nbd_errno,
)
from qbackend.servers.nbd.loop import TransmissionLoop
from qbackend.servers.nbd.server import HANDSHAKE_TIMEOUT, LOOP_LET_GO, ExportInUse, NbdServer
from qbackend.servers.nbd.threaded import MAX_HELD_PAYLOAD

__all__ = [
    "BULK",
    "HANDSHAKE_RECV",
    "HANDSHAKE_TIMEOUT",
    "LOOP_BATCH",
    "LOOP_LET_GO",
    "MAX_DESCRIPTORS",
    "MAX_HELD_PAYLOAD",
    "RECV_SIZE",
    "ExportInUse",
    "NbdConnection",
    "NbdServer",
    "TransmissionLoop",
    "nbd_errno",
]
