"""Worker processes and RFC 6062: a ConnectionBind that reaches the wrong worker.

With worker processes the kernel spreads TCP and TLS connections over the workers by a hash of
their addresses, so a client's data connection (RFC 6062 §4.4: a new connection to the same
server address) lands on any worker, while its peer connection lives with the worker that holds
the allocation. A CONNECTION-ID says whose it is (its top byte is the worker's number plus one,
``TurnCore.cid_base``). A worker that reads a ConnectionBind for another worker's connection
hands the client's connection over, before answering it:

* plain TCP: the socket itself, passed (SCM_RIGHTS) to the owner with the bytes already read;
  this worker forgets it (closed as ``handed_off``, without a FIN: the descriptor lives on);
* TLS: the TLS session cannot move, so this worker keeps it and passes one end of a socketpair
  instead, copying between the two (the :class:`Bridge`); the owner sees a plain stream with
  the client's addresses and transport "tls".

The owner adopts the connection as if it had accepted it and handles the ConnectionBind, so the
bytes, their counters and the bandwidth caps stay with the allocation. Each worker has one
SOCK_SEQPACKET socket to its parent, which forwards each message (a JSON header and the
descriptor) to the worker named in it (io/supervisor.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from .stream import StreamConnection, StreamServer

log = logging.getLogger("turnd")

# A handed-over connection's bytes read so far travel in the message: a ConnectionBind and
# whatever the client sent after it, at most one frame's worth.
MAX_MESSAGE = 256 * 1024
_RECV_BATCH = 32


def owner_of(cid: int, own: int, count: int) -> int | None:
    """The worker index a CONNECTION-ID belongs to when it is another of the ``count``
    workers', else None (this worker's, or no worker's: the core answers it, with 400 for an
    id it does not know). The owner authenticates the ConnectionBind: before that, all a
    client chooses is which running worker answers it, at one hand-over per message."""
    top = (cid >> 24) & 0xFF
    if top == 0 or top - 1 == own or top > count:
        return None
    return top - 1


class Handoff:
    """One worker's end of the hand-over channel to its parent."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket, index: int,
                 count: int, streams: StreamServer) -> None:
        self.loop = loop
        self.sock = sock
        self.index = index
        self.count = count
        self.streams = streams
        self.sent = 0
        self.adopted = 0
        self.bridges: set[Bridge] = set()
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._receive)

    def close(self) -> None:
        try:
            self.loop.remove_reader(self.sock.fileno())
        except (OSError, ValueError):
            pass
        self.sock.close()
        for bridge in list(self.bridges):
            bridge.close()

    # -- sending ------------------------------------------------------------------------

    def hand_over(self, conn: StreamConnection, target: int, data: bytes) -> bool:
        """Pass ``conn`` (its ConnectionBind and what followed, ``data``) to worker ``target``.
        False when it could not be sent: the caller answers the request itself (a 400)."""
        five_tuple = conn.five_tuple
        transport = conn.transport
        if five_tuple is None or transport is None or len(data) > MAX_MESSAGE - 1024:
            return False
        name, client, server = five_tuple
        header = {"to": target, "from": self.index, "kind": conn.kind, "name": name,
                  "client": list(client), "server": list(server),
                  "data": base64.b64encode(data).decode("ascii")}
        message = json.dumps(header, separators=(",", ":")).encode()
        if name == "tls":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                socket.send_fds(self.sock, [message], [theirs.fileno()])
            except OSError as exc:
                log.warning("handing a data connection to worker %d failed: %s", target, exc)
                ours.close()
                return False
            finally:
                theirs.close()
            bridge = Bridge(self, conn)
            self.bridges.add(bridge)
            conn.bridge_to(bridge)
            self.loop.create_task(bridge.start(ours))
        else:
            raw = transport.get_extra_info("socket")
            if raw is None:
                return False
            try:
                socket.send_fds(self.sock, [message], [raw.fileno()])
            except OSError as exc:
                log.warning("handing a data connection to worker %d failed: %s", target, exc)
                return False
            conn.handed_off()
        self.sent += 1
        stats = self.streams.stats.handed_over
        stats[name] = stats.get(name, 0) + 1
        return True

    # -- receiving ----------------------------------------------------------------------

    def _receive(self) -> None:
        for _ in range(_RECV_BATCH):
            try:
                message, fds, _flags, _addr = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not message and not fds:
                return  # the parent is gone; the control channel says so too
            if not fds:
                continue
            sock = socket.socket(fileno=fds[0])
            try:
                header = json.loads(message)
                data = base64.b64decode(header["data"])
                client = (str(header["client"][0]), int(header["client"][1]))
                server = (str(header["server"][0]), int(header["server"][1]))
                kind, name = str(header["kind"]), str(header["name"])
            except (ValueError, KeyError, TypeError, IndexError):
                log.warning("a malformed hand-over message from the parent was dropped")
                sock.close()
                continue
            self.adopted += 1
            self.streams.adopt(sock, kind, name, client, server, data)


class _BridgeProtocol(asyncio.Protocol):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def data_received(self, data: bytes) -> None:
        self.bridge.conn.write_spliced(data)

    def eof_received(self) -> bool | None:
        self.bridge.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.bridge.close()

    def pause_writing(self) -> None:
        self.bridge.conn.set_spliced_reading(False)

    def resume_writing(self) -> None:
        self.bridge.conn.set_spliced_reading(True)


class Bridge:
    """A TLS data connection kept here, its plain bytes carried to and from the owner worker
    over a socketpair. It stands where a splice stands on the connection (same calls)."""

    def __init__(self, handoff: Handoff, conn: StreamConnection) -> None:
        self.handoff = handoff
        self.conn = conn
        self.other: asyncio.Transport | None = None
        self._early: list[bytes] = []
        self._paused = False
        self._closed = False

    async def start(self, sock: socket.socket) -> None:
        try:
            transport, _ = await self.handoff.loop.connect_accepted_socket(
                lambda: _BridgeProtocol(self), sock)
        except Exception:
            sock.close()
            self.close()
            return
        self.other = cast(asyncio.Transport, transport)
        if self._closed:
            self.other.abort()
            return
        for chunk in self._early:
            self.other.write(chunk)
        self._early = []
        if self._paused:
            self.other.pause_reading()

    def from_client(self, data: bytes) -> None:
        if self.other is None:
            self._early.append(data)
        else:
            self.other.write(data)

    def pause(self, side: str, reason: str) -> None:
        # The client's TLS connection is backed up: stop reading the owner's bytes.
        self._paused = True
        if self.other is not None:
            self.other.pause_reading()

    def resume(self, side: str, reason: str) -> None:
        self._paused = False
        if self.other is not None:
            self.other.resume_reading()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.handoff.bridges.discard(self)
        if self.other is not None:
            self.other.close()
        self.conn.close("peer_closed")

