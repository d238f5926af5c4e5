"""TCP relay allocations (RFC 6062): peer connections and their splice to data connections.

:class:`TcpPeers` implements the core's ``TcpPeers`` (turnserver/turn/tcp.py): it accepts on
each TCP relay's listener (``TcpRelay``, io/relay.py), opens the connections a Connect asks for
from the relayed address, and closes them when the core says so. The core decides; this module
only carries out and reports:

* an accepted peer goes to ``core.peer_connection_arrived``; refused, it is reset at once;
  accepted, its socket waits unread (the kernel buffers what the peer sends, and its receive
  window tells the peer to wait) until the client binds it, or the core's 30 s timer closes it;
* a Connect's attempt ends in ``core.peer_connect_result``, whose answer goes to the control
  connection; a connection the core no longer wants is closed;
* a successful ConnectionBind (``ConnectionBound``, from io/stream.py) makes a :class:`Splice`
  of the data connection and the peer connection.

A splice copies bytes both ways and adds them to the allocation's counters, as the data paths
of a UDP allocation do (bytes, and one "packet" per read). Nothing is ever dropped: TCP has
back-pressure, so a side whose other end cannot take more stops being read (the write buffer
over ``stream_write_buffer_bytes``), and so does a side over the allocation's or the server's
bandwidth cap, for as long as its debt to the token bucket takes to pay back.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING, Any, Callable, cast

from ..turn.allocation import Address
from ..turn.tcp import CONNECT_TIMEOUT_S, PeerConnection
from .relay import TcpRelay, reusable_tcp_socket

if TYPE_CHECKING:
    from ..turn.core import TurnCore
    from .stream import StreamConnection

log = logging.getLogger("turnd")

# Peer connections accepted per readiness callback of one relay listener.
_ACCEPT_BATCH = 16
# Reads of one splice side per event loop iteration are whatever the transport gives; the
# write buffer of the other side above this stops the reading (stream_write_buffer_bytes
# replaces it once known).
_DEFAULT_HIGH_WATER = 262144
# The longest a bandwidth cap pauses one side at a time (seconds); it is re-checked then.
_MAX_RATE_PAUSE_S = 1.0


def charge(bucket: Any, size: int, now: float) -> float:
    """Take ``size`` bytes from a token bucket that cannot refuse them (TCP bytes already
    read): the seconds until the debt is paid, 0 when there is none."""
    bucket.credit -= size
    if bucket.credit >= 0 or bucket.refill(now, size):
        return 0.0
    # refill() gave the bytes back: take them anyway, as debt.
    bucket.credit -= size
    return min(_MAX_RATE_PAUSE_S, -bucket.credit / bucket.rate)


def debt_left(bucket: Any, now: float) -> float:
    """Seconds until a bucket in debt (``charge``) has paid it, after what accrued until now."""
    if bucket.credit >= 0 or bucket.refill(now, 0):
        return 0.0
    return min(_MAX_RATE_PAUSE_S, -bucket.credit / bucket.rate)


class TcpPeers:
    """The peer side of every TCP allocation of one ``TurnServer``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, *, get_core: Callable[[], TurnCore | None],
                 on_change: Callable[[], None],
                 get_write_limit: Callable[[], int] = lambda: _DEFAULT_HIGH_WATER) -> None:
        self.loop = loop
        self.get_core = get_core
        # Called after the core was handed something: it may have a new deadline.
        self.on_change = on_change
        self.get_write_limit = get_write_limit
        self._listening: set[TcpRelay] = set()
        # cid -> the peer socket while it waits for ConnectionBind, or its Splice once bound
        self._waiting: dict[int, socket.socket] = {}
        self._connecting: dict[int, asyncio.Task[None]] = {}
        self.splices: dict[int, Splice] = {}
        self._closed = False

    # -- the relay pool's hooks -------------------------------------------------

    def listen(self, relay: TcpRelay) -> None:
        self._listening.add(relay)
        self.loop.add_reader(relay.listener.fileno(), self._accept, relay)

    def unlisten(self, relay: TcpRelay) -> None:
        if relay in self._listening:
            self._listening.discard(relay)
            try:
                self.loop.remove_reader(relay.listener.fileno())
            except (OSError, ValueError):
                pass

    # -- the core's TcpPeers ----------------------------------------------------

    def connect(self, relay: Any, peer: Address, cid: int) -> None:
        self._connecting[cid] = self.loop.create_task(self._connect(relay, peer, cid))

    def close(self, cid: int) -> None:
        task = self._connecting.pop(cid, None)
        if task is not None:
            task.cancel()
        sock = self._waiting.pop(cid, None)
        if sock is not None:
            _reset(sock)
        splice = self.splices.pop(cid, None)
        if splice is not None:
            splice.close()

    # -- stream.py's hand-over ----------------------------------------------------

    def bind(self, conn: PeerConnection, client: StreamConnection, early: bytes) -> Splice | None:
        """The client's data connection for ``conn`` is ``client`` (its ConnectionBind was
        answered); ``early``: bytes it sent after the request. None when the peer side is
        already gone (the caller then closes the client connection)."""
        sock = self._waiting.pop(conn.cid, None)
        if sock is None:
            return None
        splice = Splice(self, conn, client)
        self.splices[conn.cid] = splice
        if early:
            splice.from_client(early)
        self.loop.create_task(splice.start_peer(sock))
        return splice

    def shutdown(self) -> None:
        """Server stopping: every peer connection goes (the core has ended the allocations)."""
        self._closed = True
        for relay in list(self._listening):
            self.unlisten(relay)
        for cid in list(self._connecting) + list(self._waiting) + list(self.splices):
            self.close(cid)

    def counts(self) -> dict[str, int]:
        return {"connecting": len(self._connecting), "waiting": len(self._waiting),
                "spliced": len(self.splices)}

    # -- internals ------------------------------------------------------------------

    def _accept(self, relay: TcpRelay) -> None:
        core = self.get_core()
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, addr = relay.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break  # the next readiness callback tries again
            if core is None or self._closed:
                _reset(sock)
                continue
            try:
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                arrived = core.peer_connection_arrived(relay, (addr[0], addr[1]), self.loop.time())
            except Exception:
                log.exception("accepting a peer connection failed")
                arrived = None
            if arrived is None:
                _reset(sock)  # RFC 6062 §5.3: no permission (or no room): closed at once
                continue
            cid, sink, indication = arrived
            self._waiting[cid] = sock
            if not sink.send(indication):
                log.debug("ConnectionAttempt %d not delivered: the client is not reading", cid)
        self.on_change()

    async def _connect(self, relay: Any, peer: Address, cid: int) -> None:
        ok = False
        sock: socket.socket | None = None
        try:
            sock = reusable_tcp_socket(relay.address[0])
            sock.bind(relay.address)
            await asyncio.wait_for(self.loop.sock_connect(sock, peer), CONNECT_TIMEOUT_S)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ok = True
        except asyncio.CancelledError:
            if sock is not None:
                sock.close()
            raise
        except (OSError, asyncio.TimeoutError) as exc:
            log.debug("connection %d to a peer failed: %r", cid, exc)
        except Exception:  # never leave a Connect unanswered: it fails with 447
            log.exception("connection %d to a peer failed", cid)
        finally:
            self._connecting.pop(cid, None)
        if not ok and sock is not None:
            sock.close()
            sock = None
        core = self.get_core()
        answer = core.peer_connect_result(cid, ok, self.loop.time()) if core is not None else None
        if answer is None:
            if sock is not None:
                _reset(sock)
            return
        if sock is not None:
            self._waiting[cid] = sock
        sink, reply = answer
        write = getattr(sink, "write_control", None)
        if write is not None:
            write(reply)
        else:
            sink.send(reply)
        self.on_change()

    def _splice_closed(self, splice: Splice) -> None:
        if self.splices.get(splice.cid) is splice:
            del self.splices[splice.cid]
        core = self.get_core()
        if core is not None:
            core.peer_connection_closed(splice.cid)


class _PeerProtocol(asyncio.Protocol):
    """The peer side of a splice."""

    def __init__(self, splice: Splice) -> None:
        self.splice = splice

    def data_received(self, data: bytes) -> None:
        self.splice.from_peer(data)

    def eof_received(self) -> bool | None:
        self.splice.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.splice.close()

    def pause_writing(self) -> None:
        self.splice.pause("client", "backlog")

    def resume_writing(self) -> None:
        self.splice.resume("client", "backlog")


class Splice:
    """A data connection (the client's) and a peer connection, copying to each other."""

    def __init__(self, peers: TcpPeers, conn: PeerConnection, client: StreamConnection) -> None:
        self.peers = peers
        self.loop = peers.loop
        self.cid = conn.cid
        self.conn = conn
        self.allocation = conn.allocation
        self.client = client
        self.peer: asyncio.Transport | None = None
        self._early: list[bytes] = []  # client bytes before the peer transport exists
        # Why each side is not being read now: "backlog" (the other side's write buffer is
        # full), "rate" (over a bandwidth cap).
        self._paused: dict[str, set[str]] = {"client": set(), "peer": set()}
        # Bytes read from a side over a bandwidth cap, forwarded once the debt is paid.
        self._held: dict[str, list[bytes]] = {"client": [], "peer": []}
        self._closed = False

    async def start_peer(self, sock: socket.socket) -> None:
        if self._closed:
            sock.close()
            return
        try:
            transport, _ = await self.loop.connect_accepted_socket(lambda: _PeerProtocol(self), sock)
        except Exception:
            sock.close()
            self.close()
            return
        self.peer = cast(asyncio.Transport, transport)
        if self._closed:
            self.peer.abort()
            return
        limit = self.peers.get_write_limit()
        self.peer.set_write_buffer_limits(high=limit, low=limit // 4)
        early, self._early = self._early, []
        for chunk in early:
            self.peer.write(chunk)
        if self._paused["peer"]:
            self.peer.pause_reading()
        if early and self.peer.get_write_buffer_size() <= limit:
            self.resume("client", "backlog")

    # -- copying ------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self._closed:
            return
        allocation = self.allocation
        size = len(data)
        allocation.bytes_to_peer += size
        allocation.packets_to_peer += 1
        if self._charge("client", allocation.up, size, data):
            self._to_peer(data)

    def _to_peer(self, data: bytes) -> None:
        if self.peer is None:
            # The peer side is being set up (a moment): hold what the client sends meanwhile,
            # and stop reading it past one write buffer's worth.
            self._early.append(data)
            if sum(map(len, self._early)) > self.peers.get_write_limit():
                self.pause("client", "backlog")
        else:
            self.peer.write(data)

    def from_peer(self, data: bytes) -> None:
        if self._closed:
            return
        allocation = self.allocation
        size = len(data)
        allocation.bytes_to_client += size
        allocation.packets_to_client += 1
        if self._charge("peer", allocation.down, size, data):
            self.client.write_spliced(data)

    def _charge(self, side: str, bucket: Any, size: int, data: bytes) -> bool:
        """Charge ``size`` bytes read from ``side`` to the allocation's and the server's
        buckets. True: forward them now. False: they are held, and ``side`` is not read,
        until the debt is paid."""
        held = self._held[side]
        now = self.loop.time()
        core = self.peers.get_core()
        wait = charge(bucket, size, now)
        if core is not None:
            if wait:
                core.stats.limit_refusals["allocation_bandwidth"] += 1
            server = core.bandwidth_up if side == "client" else core.bandwidth_down
            server_wait = charge(server, size, now)
            if server_wait:
                core.stats.limit_refusals["server_bandwidth"] += 1
                wait = max(wait, server_wait)
        if not wait and not held:
            return True
        held.append(data)  # behind what is already held, in order
        if "rate" not in self._paused[side]:
            self.pause(side, "rate")
            self.loop.call_later(max(wait, 0.001), self._release, side)
        return False

    def _release(self, side: str) -> None:
        """The wait for ``side``'s debt is over: forward what was held, or wait on."""
        if self._closed:
            return
        now = self.loop.time()
        core = self.peers.get_core()
        allocation = self.allocation
        bucket = allocation.up if side == "client" else allocation.down
        wait = debt_left(bucket, now)
        if core is not None:
            server = core.bandwidth_up if side == "client" else core.bandwidth_down
            wait = max(wait, debt_left(server, now))
        if wait:
            self.loop.call_later(wait, self._release, side)
            return
        held, self._held[side] = self._held[side], []
        for data in held:
            if side == "client":
                self._to_peer(data)
            else:
                self.client.write_spliced(data)
        self.resume(side, "rate")

    # -- flow control ------------------------------------------------------------------

    def pause(self, side: str, reason: str) -> None:
        reasons = self._paused[side]
        if not reasons and not self._closed:
            self._set_reading(side, False)
        reasons.add(reason)

    def resume(self, side: str, reason: str) -> None:
        reasons = self._paused[side]
        if reason not in reasons:
            return
        reasons.discard(reason)
        if not reasons and not self._closed:
            self._set_reading(side, True)

    def _set_reading(self, side: str, on: bool) -> None:
        if side == "client":
            self.client.set_spliced_reading(on)
            return
        if self.peer is not None:
            try:
                if on:
                    self.peer.resume_reading()
                else:
                    self.peer.pause_reading()
            except (RuntimeError, AttributeError):
                pass

    # -- ending -------------------------------------------------------------------------

    def close(self) -> None:
        """Either side closed or the core closed the connection: both go. What is queued
        toward each side is still written first."""
        if self._closed:
            return
        self._closed = True
        if self.peer is not None:
            self.peer.close()
        self.client.close("peer_closed")
        self.peers._splice_closed(self)


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    except OSError:
        pass
    sock.close()
