"""TURN over TCP and TLS (RFC 8656 §3.1, §12.5; RFC 7443): listeners and client connections.

Each client connection is one :class:`StreamConnection`, an ``asyncio.Protocol`` (uvloop runs
those without a Python-level stream layer). Bytes go through a
:class:`~turnserver.stun.StreamFramer`; each frame goes to ``dispatch.client_message``, the
same first-byte demultiplex as a UDP datagram's (STUN to ``core.handle_stun`` with the
connection itself as the sink, ChannelData to ``core.handle_channel_data``), and its reply
back through the connection's write back-pressure. The connection is the core's
:class:`~.dispatch.Sink` for this client: ``send`` returns False for peer data it drops. The
relay toward peers stays UDP (REQUESTED-TRANSPORT 17). A connection's 5-tuple transport is
"tcp" or "tls".

Plain TCP listeners are ``loop.create_server`` servers. TLS listeners accept in Python (one
``accept`` per connection, nothing per packet), peek at the first byte the client sends and
hand the socket to ``loop.connect_accepted_socket``: with the TLS context when it is 0x16 (a
TLS handshake record), as plain TURN otherwise (a STUN or ChannelData byte: coturn allows
that too, and it lets one port 443 serve both). Accepting ourselves also means the
connection cap applies before any handshake work, the handshake timeout covers a client
that never sends a byte, failed handshakes can be counted, and every handshake picks up the
context current at that moment, so a certificate reload needs no change to a live context.

Limits, read from the running configuration (a reload that changes them takes effect
within one sweep interval, at most a second):

* ``max_connections``: connections beyond it are reset at accept (reason ``capacity``).
* ``max_connections_per_source``: connections from one source address (one /64 for IPv6)
  beyond it are reset at accept (reason ``source_limit``).
* ``stream_unallocated_write_buffer_bytes``: replies queued toward a client that has no
  allocation yet. Beyond it the connection stops reading (``pause_reading``) until the client
  has read them, so a client that pipelines requests and never reads costs a few KiB, not
  its whole request stream's worth of replies. With an allocation, the connection stops
  reading once replies exceed twice ``stream_write_buffer_bytes``.
* ``tls_handshake_timeout_s``: the first byte and the TLS handshake must arrive within it.
* ``stream_idle_timeout_s``: a connection without an allocation that long is closed; after
  its allocation ended it is closed once it has also been quiet that long.
* ``stream_write_buffer_bytes``: the write buffer toward one client. Above it the transport
  pauses us and peer data for that client is dropped (counted) instead of queued, so a
  client that never reads costs a bounded amount of memory. Replies to the client's own
  requests may use up to twice the limit, so a burst of media cannot starve a Refresh.
* The framer holds at most one frame (64 KiB + header) per connection.

Counters (:class:`StreamStats`, plain ints read at scrape time, reachable as
``TurnServer.streams.stats``):

* ``open[kind]``, ``accepted[kind]``: connections open now / accepted since start, by the
  kind of listener that accepted them ("tcp" or "tls"; a plain client on a TLS listener
  counts under "tls" there, and ``plain_on_tls`` counts those clients);
  ``StreamServer.open_counts()`` returns a copy of ``open``;
* ``closed[reason]``: connections closed, by reason: ``idle``, ``handshake`` (no first byte
  or no TLS handshake in time, or a failed handshake), ``framing`` (bytes that are neither
  STUN nor ChannelData), ``capacity`` (refused over ``max_connections``), ``peer_closed``
  (the client closed or reset), ``shutdown`` (server stopping);
  ``sum(accepted.values()) == sum(open.values()) + sum(closed.values())``;
* ``dropped_messages``, ``dropped_bytes``: messages toward slow clients dropped because
  their write buffer was full (peer data so dropped is not in the allocation's
  ``bytes_to_client``: the data path takes it back out);
* the TLS certificate's expiry: :meth:`StreamServer.tls_certificate_not_after`, and
  ``tls.reloads_ok`` / ``tls.reloads_failed`` on the :class:`~.tls.TlsCertificates`.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import ssl
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Protocol, cast

from ..stun import FramingError, StreamFramer
from ..turn.allocation import Address, FiveTuple
from ..turn.core import LEGACY_CHANNEL_MAX, ConnectionBound
from .dispatch import client_message
from .tls import TlsCertificates

if TYPE_CHECKING:
    from ..config import Config
    from ..turn.core import TurnCore
    from .handoff import Bridge, Handoff
    from .tcp_relay import Splice, TcpPeers

log = logging.getLogger("turnd")

CLOSE_REASONS = ("idle", "handshake", "framing", "capacity", "source_limit", "peer_closed",
                 "shutdown", "handed_off")
LISTEN_BACKLOG = 1024
# RFC 5246 §6.2.1 / RFC 8446 §5.1: ContentType handshake(22) opens every TLS connection.
TLS_HANDSHAKE_RECORD = 0x16
# Connections accepted per readiness callback of a TLS listener before yielding.
_ACCEPT_BATCH = 64
# accept() errors about one connection only, and the pause after any other.
_ACCEPT_TRANSIENT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
_ACCEPT_RETRY_S = 1.0
# Replies to a client's own requests may exceed the media limit by this factor.
_CONTROL_HEADROOM = 2
# The smallest kernel send buffer set on a stream socket (the kernel doubles what it is given).
_MIN_SNDBUF = 4096
# The idle sweep runs at most and at least this often (seconds).
_SWEEP_MIN_S = 0.05
_SWEEP_MAX_S = 1.0
# SO_LINGER with a zero timeout: close() sends a reset and keeps no state (no TIME_WAIT).
_LINGER_RESET = struct.pack("ii", 1, 0)

# Connection states, in order: a state never goes back.
_NEW, _SNIFF, _HANDSHAKE, _READY, _CLOSING, _CLOSED = range(6)


@dataclass
class StreamLimits:
    max_connections: int = 4096
    idle_timeout_s: float = 30.0
    handshake_timeout_s: float = 10.0
    write_buffer_bytes: int = 262144
    max_per_source: int = 256
    unallocated_buffer_bytes: int = 8192

    @classmethod
    def from_config(cls, config: Config) -> StreamLimits:
        return cls(
            max_connections=config.max_connections,
            idle_timeout_s=config.stream_idle_timeout_s,
            handshake_timeout_s=config.tls_handshake_timeout_s,
            write_buffer_bytes=config.stream_write_buffer_bytes,
            max_per_source=config.max_connections_per_source,
            unallocated_buffer_bytes=config.stream_unallocated_write_buffer_bytes,
        )


def source_key(ip: str) -> str:
    """What max_connections_per_source counts by: the IPv4 address, or the IPv6 /64 (one
    subscriber's prefix: every address in it is free to whoever holds it)."""
    if ":" not in ip:
        return ip
    try:
        addr = ipaddress.IPv6Address(ip.split("%", 1)[0])
    except ValueError:
        return ip
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)  # an IPv4 client on a dual-stack socket
    return str(ipaddress.IPv6Network((addr, 64), strict=False))


@dataclass
class StreamStats:
    """Plain counters; see the module docstring for what each one means."""

    open: dict[str, int] = field(default_factory=lambda: {"tcp": 0, "tls": 0})
    accepted: dict[str, int] = field(default_factory=lambda: {"tcp": 0, "tls": 0})
    closed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))
    plain_on_tls: int = 0
    dropped_messages: int = 0
    dropped_bytes: int = 0
    # Times a connection stopped reading because its replies were not being read.
    read_pauses: int = 0
    # RFC 6062 data connections handed to another worker (io/handoff.py), by the 5-tuple's
    # transport: "tcp" the socket itself, "tls" through a bridge kept here.
    handed_over: dict[str, int] = field(default_factory=lambda: {"tcp": 0, "tls": 0})


class Closable(Protocol):
    def close(self) -> None: ...


def bind_tcp(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound (not yet listening) TCP socket, the stream twin of ``server.bind_udp``;
    ``reuse_port``: one of a SO_REUSEPORT group (a socket per worker process)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A restart must not wait for TIME_WAIT connections of the previous process.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # So that "0.0.0.0:3478" and "[::]:3478" can both be bound.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        from .server import named_socket_error

        raise named_socket_error(exc, "tcp", host, port) from None
    return sock


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass
    sock.close()


class StreamServer:
    """The TCP/TLS side of one ``TurnServer``: listeners, live connections, limits, counters."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        get_config: Callable[[], Config],
        get_core: Callable[[], TurnCore | None],
        on_stun: Callable[[], None],
        tls: TlsCertificates | None = None,
    ) -> None:
        self.loop = loop
        # The running configuration, whoever replaces it on reload; limits are copied out
        # of it at start and at every sweep.
        self.get_config = get_config
        self.limits = StreamLimits.from_config(get_config())
        self.get_core = get_core
        # Called after STUN was handled: the core may have scheduled a new deadline.
        self.on_stun = on_stun
        self.tls = tls
        self.stats = StreamStats()
        self.connections: set[StreamConnection] = set()
        self._per_source: dict[str, int] = {}
        self.servers: list[Closable] = []
        # The TCP allocations' peer side (io/tcp_relay.py), which data connections join.
        self.tcp_peers: TcpPeers | None = None
        # With worker processes: where a ConnectionBind for another worker's connection goes.
        self.handoff: Handoff | None = None
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._closed = False

    async def listen(self, kind: str, host: str, port: int) -> tuple[Closable, Address]:
        """Bind and serve one listener; ``kind`` is "tcp" or "tls".

        Returns an object whose ``close()`` stops the listener, and the bound address.
        """
        if kind not in ("tcp", "tls"):
            raise ValueError(f"unknown stream listener kind {kind!r}")
        if kind == "tls" and self.tls is None:
            raise ValueError("a TLS listener needs a certificate")
        return await self.serve_socket(kind, bind_tcp(host, port))

    async def serve_socket(self, kind: str, sock: socket.socket) -> tuple[Closable, Address]:
        """Serve one bound TCP socket (``listen`` binds it; a worker process inherits it)."""
        if kind not in ("tcp", "tls"):
            raise ValueError(f"unknown stream listener kind {kind!r}")
        if kind == "tls" and self.tls is None:
            raise ValueError("a TLS listener needs a certificate")
        try:
            bound = sock.getsockname()
            server: Closable
            if kind == "tcp":
                server = await self.loop.create_server(
                    lambda: StreamConnection(self, "tcp"), sock=sock, backlog=LISTEN_BACKLOG,
                )
            else:
                server = TlsAcceptor(self, sock)
        except BaseException:
            sock.close()
            raise
        self.servers.append(server)
        self._schedule_sweep()
        return server, (bound[0], bound[1])

    def tls_certificate_not_after(self) -> float | None:
        """Unix time the TLS certificate expires; ``None`` without TLS listeners."""
        return self.tls.not_after if self.tls is not None else None

    def open_counts(self) -> dict[str, int]:
        """Open connections by listener kind (what the metrics collector reads)."""
        return dict(self.stats.open)

    def refresh_limits(self) -> None:
        """Copy the limits out of the running configuration; apply changed write limits."""
        limits = StreamLimits.from_config(self.get_config())
        if limits == self.limits:
            return
        old, self.limits = self.limits, limits
        if limits.write_buffer_bytes != old.write_buffer_bytes:
            for conn in self.connections:
                conn.apply_write_limits()
        # Connections over a lowered max_connections stay; new ones wait for room.

    def reload_tls(self, config: Config, names: list[str]) -> None:
        """Re-read the certificate of ``config``; raises TlsError and keeps the old one on error."""
        self.refresh_limits()
        if self.tls is not None:
            self.tls.reload(config.tls_cert_file, config.tls_key_file, names=names)

    def close(self) -> None:
        """Stop the listeners and the sweep; connections stay (see close_connections)."""
        self._closed = True
        for server in self.servers:
            server.close()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    def close_connections(self) -> None:
        """Reset every connection (server stopping) and log the totals of this process."""
        for conn in list(self.connections):
            conn.close("shutdown", abort=True)
            # Counted now rather than when the loop reports each one lost, so the totals
            # below are final.
            conn._finish("shutdown")
        stats = self.stats
        # For operators without a metrics scraper, and for tests of a server process.
        # The numbers are the fields (key=value pairs in text): each printed once.
        log.info("stream connections at shutdown",
                 extra={"streams": {"accepted": dict(stats.accepted),
                                    "plain_on_tls": stats.plain_on_tls,
                                    "closed": dict(stats.closed),
                                    "dropped_messages": stats.dropped_messages,
                                    "dropped_bytes": stats.dropped_bytes}})

    def admit(self, conn: StreamConnection, client_ip: str) -> bool:
        """Count a new connection; False (counted as refused) when at a cap."""
        stats = self.stats
        stats.accepted[conn.kind] += 1
        if self._closed or len(self.connections) >= self.limits.max_connections:
            stats.closed["capacity"] += 1
            return False
        key = source_key(client_ip)
        count = self._per_source.get(key, 0)
        per_source = self.limits.max_per_source
        if per_source and count >= per_source:
            stats.closed["source_limit"] += 1
            return False
        self._per_source[key] = count + 1
        conn._source = key
        self.connections.add(conn)
        stats.open[conn.kind] += 1
        return True

    def release(self, conn: StreamConnection) -> None:
        """The other half of ``admit``: the connection is gone."""
        key = conn._source
        if key is not None:
            conn._source = None
            count = self._per_source.get(key, 1) - 1
            if count > 0:
                self._per_source[key] = count
            else:
                self._per_source.pop(key, None)

    def adopt(self, sock: socket.socket, kind: str, name: str, client: Address, server: Address,
              data: bytes) -> None:
        """A client connection another worker accepted and handed over (io/handoff.py), with
        the bytes it had read: served as if accepted here."""
        conn = StreamConnection(self, kind if kind in ("tcp", "tls") else "tcp")
        if not self.admit(conn, client[0]):
            conn._state = _CLOSED
            _reset(sock)
            return
        conn._client, conn._server, conn._name, conn._initial = client, server, name, data
        conn._state = _HANDSHAKE
        sock.setblocking(False)
        conn._task = self.loop.create_task(conn._adopt(sock))

    def sources(self) -> int:
        """Distinct sources (IPv4 addresses, IPv6 /64s) with a connection open."""
        return len(self._per_source)

    # ------------------------------------------------------------------ idle sweep

    def _schedule_sweep(self) -> None:
        if self._sweep_handle is not None or self._closed:
            return
        shortest = min(self.limits.idle_timeout_s, self.limits.handshake_timeout_s)
        interval = max(_SWEEP_MIN_S, min(_SWEEP_MAX_S, shortest / 4))
        self._sweep_handle = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        # One timer for all connections, as the core does for allocations: a timer per
        # connection would be re-armed on every packet.
        self._sweep_handle = None
        try:
            self.refresh_limits()
            now = self.loop.time()
            core = self.get_core()
            allocations = core.allocations if core is not None else {}
            for conn in list(self.connections):
                conn.check_timeouts(now, allocations)
        except Exception:
            log.exception("stream idle sweep failed")
        self._schedule_sweep()


class TlsAcceptor:
    """Accepts on a TLS listener socket and starts each connection's first-byte check."""

    def __init__(self, streams: StreamServer, sock: socket.socket) -> None:
        self.streams = streams
        self.sock = sock
        self.loop = streams.loop
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        sock.listen(LISTEN_BACKLOG)
        self.loop.add_reader(sock.fileno(), self._on_readable)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        try:
            self.loop.remove_reader(self.sock.fileno())
        except (OSError, ValueError):
            pass
        self.sock.close()

    def _resume(self) -> None:
        self._retry = None
        if not self._closed:
            self.loop.add_reader(self.sock.fileno(), self._on_readable)

    def _on_readable(self) -> None:
        streams = self.streams
        for _ in range(_ACCEPT_BATCH):
            try:
                conn_sock, _addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _ACCEPT_TRANSIENT:
                    continue  # that one client went away before we took it
                # Out of descriptors or memory: the listener stays readable, so pause it
                # rather than spin (asyncio's own accept loop does the same).
                log.warning("accept on a TLS listener failed, pausing it for %.0f s: %s",
                            _ACCEPT_RETRY_S, exc)
                self.loop.remove_reader(self.sock.fileno())
                self._retry = self.loop.call_later(_ACCEPT_RETRY_S, self._resume)
                return
            try:
                # Media must not wait for Nagle.
                conn_sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            conn = StreamConnection(streams, "tls")
            if not streams.admit(conn, _addr[0]):
                conn._state = _CLOSED
                _reset(conn_sock)
                continue
            try:
                conn.start_sniff(conn_sock)
            except OSError:  # reset before we looked at it (getpeername: ENOTCONN)
                conn._stop_sniff()
                conn_sock.close()
                conn._finish("peer_closed")


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS client; also the sink the core hands peer data for this client to."""

    __slots__ = (
        "streams", "kind", "loop", "_state", "_sock", "_transport", "_framer", "_five_tuple",
        "_client", "_server", "_opened_at", "_last_activity", "_unallocated_since",
        "_had_allocation", "_write_paused", "_close_reason", "_task", "_closing_at",
        "_source", "_allocated", "_read_paused", "_backlog", "_splice", "_name",
        "_initial",
    )

    def __init__(self, streams: StreamServer, kind: str) -> None:
        self.streams = streams
        self.kind = kind  # the listener's kind: "tcp" or "tls"
        self.loop = streams.loop
        self._state = _NEW
        self._sock: socket.socket | None = None  # ours only while sniffing
        self._transport: asyncio.Transport | None = None
        # The framer only delimits frames, so it takes RFC 5766's whole channel range; whether a
        # channel number is valid (legacy_channel_numbers, reloadable) is the core's to say.
        self._framer = StreamFramer(max_channel=LEGACY_CHANNEL_MAX)
        self._five_tuple: FiveTuple | None = None
        self._client: Address = ("", 0)
        self._server: Address = ("", 0)
        self._opened_at = self.loop.time()
        self._last_activity = self._opened_at
        self._unallocated_since: float | None = None
        self._had_allocation = False
        self._write_paused = False
        self._close_reason: str | None = None
        self._task: asyncio.Task[Any] | None = None
        self._closing_at = 0.0
        self._source: str | None = None  # the per-source key it counts under, once admitted
        self._allocated = False  # it has a live allocation (decides the reply allowance)
        self._read_paused = False
        self._backlog: list[bytes] = []  # frames read but not handled while reading is paused
        # Once a ConnectionBind succeeded (RFC 6062 §5.4): the bytes go to and come from a peer.
        self._splice: Splice | Bridge | None = None
        self._name: str | None = None  # the 5-tuple's transport of a connection handed over
        self._initial = b""  # and the bytes it had read, handled before any other

    @property
    def five_tuple(self) -> FiveTuple | None:
        return self._five_tuple

    @property
    def transport(self) -> asyncio.Transport | None:
        return self._transport

    async def _adopt(self, sock: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(lambda: self, sock)
        except Exception:
            self._finish(self._close_reason or "peer_closed")
        finally:
            self._task = None

    # ------------------------------------------------------------------ TLS listener path

    def start_sniff(self, sock: socket.socket) -> None:
        self._sock = sock
        sock.setblocking(False)
        self._client = _address(sock.getpeername())
        self._server = _address(sock.getsockname())
        self._state = _SNIFF
        self.loop.add_reader(sock.fileno(), self._on_first_byte)

    def _stop_sniff(self) -> socket.socket | None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                self.loop.remove_reader(sock.fileno())
            except (OSError, ValueError):
                pass
        return sock

    def _on_first_byte(self) -> None:
        sock = self._sock
        if sock is None or self._state != _SNIFF:
            return
        try:
            head = sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            head = b""
        self._stop_sniff()
        if not head:
            sock.close()
            self._finish("peer_closed")
            return
        context: ssl.SSLContext | None = None
        if head[0] == TLS_HANDSHAKE_RECORD:
            tls = self.streams.tls
            assert tls is not None
            context = tls.context  # the one current now: reloads affect new handshakes only
        else:
            # Plain STUN/ChannelData on a TLS port; garbage is left to the framer to reject.
            self.streams.stats.plain_on_tls += 1
        self._state = _HANDSHAKE
        self._task = self.loop.create_task(self._connect(sock, context))

    async def _connect(self, sock: socket.socket, context: ssl.SSLContext | None) -> None:
        timeout = self.streams.limits.handshake_timeout_s
        try:
            if context is None:
                await self.loop.connect_accepted_socket(lambda: self, sock)
            else:
                await self.loop.connect_accepted_socket(
                    lambda: self, sock, ssl=context,
                    ssl_handshake_timeout=timeout, ssl_shutdown_timeout=timeout,
                )
        # The loop owns the socket from here on and closes it on failure; closing it here
        # as well could close a descriptor number already reused by another connection.
        except asyncio.CancelledError:
            self._finish(self._close_reason or "handshake")
            raise
        except Exception as exc:
            # Scanners and clients that distrust the certificate end here: not our error.
            log.debug("TLS handshake from %s failed: %r", self._client[0], exc)
            self._task = None
            self._finish(self._close_reason or "handshake")
        else:
            self._task = None

    # ------------------------------------------------------------------ lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport but have its methods.
        transport = cast(asyncio.Transport, transport)
        if self._state == _NEW:
            # A plain TCP listener: this is the accept.
            peer = transport.get_extra_info("peername")
            local = transport.get_extra_info("sockname")
            if not peer or not local or not self.streams.admit(self, peer[0]):
                if self in self.streams.connections:
                    self._finish("peer_closed")
                self._state = _CLOSED
                # Refused at once: a reset costs less than a framer and a sweep entry.
                transport.abort()
                return
            self._client = _address(peer)
            self._server = _address(local)
            name = "tcp"
        elif self._state == _HANDSHAKE:
            name = self._name or ("tls" if transport.get_extra_info("ssl_object") is not None else "tcp")
        else:  # closed while the handshake finished
            transport.abort()
            return
        self._transport = transport
        self._five_tuple = (name, self._client, self._server)
        self._state = _READY
        self.apply_write_limits()
        if self._initial:
            # Handed over by another worker: what it read comes first.
            initial, self._initial = self._initial, b""
            self.data_received(initial)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(self._close_reason or "peer_closed")

    def eof_received(self) -> bool | None:
        # A half-closed client cannot send requests any more: close our side too, through
        # close(), which frees the allocation at once and starts the grace period after which
        # a client that does not read what is still queued is cut off.
        self.close("peer_closed")
        return None  # our close() is already under way (and TLS transports ignore True)

    def close(self, reason: str, *, abort: bool = False) -> None:
        """Close for ``reason``; counted when the transport reports the connection lost."""
        if self._state >= _CLOSING:
            return
        self._close_reason = reason
        state = self._state
        self._state = _CLOSING
        self._closing_at = self.loop.time()
        self._free_allocation()
        transport = self._transport
        if state == _SNIFF:
            sock = self._stop_sniff()
            if sock is not None:
                _reset(sock)
            self._finish(reason)
        elif state == _HANDSHAKE or transport is None:
            task = self._task
            if task is not None and not task.done():
                task.cancel()  # the loop closes the socket; _connect counts it
            else:
                self._finish(reason)
        elif abort:
            transport.abort()
        else:
            # close() flushes what is queued first, so a reply written just before a
            # framing error still reaches the client.
            transport.close()

    def _finish(self, reason: str) -> None:
        """The connection is gone: count it once and free its allocation at once."""
        if self._state == _CLOSED:
            return
        self._state = _CLOSED
        self._stop_sniff()
        self._free_allocation()
        splice, self._splice = self._splice, None
        if splice is not None:
            splice.close()
        streams = self.streams
        streams.release(self)
        self._backlog = []
        if self in streams.connections:
            streams.connections.discard(self)
            streams.stats.open[self.kind] -= 1
            streams.stats.closed[reason] = streams.stats.closed.get(reason, 0) + 1

    def _free_allocation(self) -> None:
        # RFC 8656 §3.1 / §7: a stream allocation lives only as long as its connection.
        five_tuple = self._five_tuple
        core = self.streams.get_core()
        if five_tuple is None or core is None:
            return
        allocation = core.allocations.get(five_tuple)
        # The same 5-tuple may already belong to a newer connection if the client reused
        # its port: only free an allocation that sends through this connection.
        if allocation is not None and allocation.sink is self:
            try:
                core.connection_closed(five_tuple, self.loop.time())
            except Exception:
                log.exception("freeing a stream allocation failed")

    def apply_write_limits(self) -> None:
        if self._transport is None:
            return
        limits = self.streams.limits
        high = limits.write_buffer_bytes if self._allocated else limits.unallocated_buffer_bytes
        # Resume at a quarter: hysteresis, so a client reading slowly does not flip the
        # state on every message.
        self._transport.set_write_buffer_limits(high=high, low=high // 4)
        # The kernel's send buffer is the other place replies wait. Before an allocation it is
        # held to the same allowance (the kernel may grow an untouched one to megabytes); with
        # one, media gets room for a second of a 5 Mbit/s call at any round-trip time.
        sock = self._transport.get_extra_info("socket")
        if sock is not None:
            size = 4 * limits.write_buffer_bytes if self._allocated else limits.unallocated_buffer_bytes
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, max(size, _MIN_SNDBUF))
            except (OSError, AttributeError, TypeError):
                pass

    def _reply_allowance(self) -> int:
        """Bytes of queued replies beyond which this connection stops reading."""
        limits = self.streams.limits
        if self._allocated:
            return _CONTROL_HEADROOM * limits.write_buffer_bytes
        return limits.unallocated_buffer_bytes

    def check_timeouts(self, now: float, allocations: dict[FiveTuple, Any]) -> None:
        limits = self.streams.limits
        state = self._state
        if state == _SNIFF:
            # A client that connects to a TLS port and never sends a byte.
            if now - self._opened_at >= limits.handshake_timeout_s:
                self.close("handshake")
            return
        if state == _HANDSHAKE:
            # connect_accepted_socket enforces the handshake timeout; this is a backstop.
            if now - self._opened_at >= 2 * limits.handshake_timeout_s + 1.0:
                self.close("handshake")
            return
        if state == _CLOSING:
            # A graceful close waits for the write buffer to drain (and for TLS, for the
            # close_notify exchange): a client that never reads would hold its slot forever.
            if now - self._closing_at >= limits.handshake_timeout_s and self._transport is not None:
                self._transport.abort()
                self._finish(self._close_reason or "peer_closed")
            return
        if state != _READY or self._splice is not None:
            return  # a data connection lives as long as its peer connection
        allocation = allocations.get(self._five_tuple) if self._five_tuple else None
        if allocation is not None and allocation.sink is self:
            self._had_allocation = True
            self._unallocated_since = None
            return
        if self._unallocated_since is None:
            self._unallocated_since = now if self._had_allocation else self._opened_at
        if now - self._unallocated_since < limits.idle_timeout_s:
            return
        if self._had_allocation and now - self._last_activity < limits.idle_timeout_s:
            return
        self.close("idle")

    # ------------------------------------------------------------------ data

    def data_received(self, data: bytes) -> None:
        if self._state != _READY:
            return
        splice = self._splice
        if splice is not None:
            splice.from_client(data)
            return
        now = self.loop.time()
        self._last_activity = now
        try:
            frames = self._framer.feed(data)
        except FramingError:
            self.close("framing")
            return
        if self._backlog:  # not expected (reading is paused), but order is kept
            self._backlog.extend(frames)
            frames, self._backlog = self._backlog, []
        self._handle_frames(frames, now)
        if self._framer.pending_error is not None and not self._backlog:
            # RFC 8656 §12.5 gives no way to find the next frame in a broken stream: answer
            # what was whole, then close.
            self.close("framing")

    def _handle_frames(self, frames: list[bytes], now: float) -> None:
        core = self.streams.get_core()
        if core is None:
            return
        five_tuple = self._five_tuple
        assert five_tuple is not None
        dispatch = client_message
        sink_for = self.sink_for
        channel_first_max = core.config.channel_max >> 8
        handled_stun = False
        for index, frame in enumerate(frames):
            if self._read_paused:
                # Its replies are not being read: the rest waits until they are.
                self._backlog = frames[index:]
                break
            if frame[0] == 0 and frame[1] == 0x0B and self.streams.handoff is not None \
                    and self._hand_over(frame, frames[index:]):
                break  # another worker's ConnectionBind: this connection is that worker's now
            try:
                # The framer returns only STUN and ChannelData (its padding removed).
                reply = dispatch(core, frame, five_tuple, now, sink_for, channel_first_max)
                if reply is None:
                    continue
                handled_stun = True
                if reply.__class__ is ConnectionBound:
                    self._join_peer(cast(ConnectionBound, reply), frames[index + 1:])
                    break
                if reply:
                    self._write_reply(reply)
                    allocation = core.allocations.get(five_tuple)
                    allocated = allocation is not None and allocation.sink is self
                    if allocated != self._allocated:
                        self._allocated = allocated
                        self.apply_write_limits()
            except Exception:  # one bad frame never stops the connection or the loop
                core.stats.dropped["internal_error"] += 1
                log.exception("error handling a stream frame")
        if handled_stun:
            self.streams.on_stun()

    # ------------------------------------------------------------------ RFC 6062 data connections

    def _join_peer(self, bound: ConnectionBound, later: list[bytes]) -> None:
        """This connection is now the data connection of ``bound.connection``: answer the
        ConnectionBind, then carry raw bytes. What the client sent after the request (it
        should have waited for the answer) goes to the peer as it came."""
        self._write_reply(bound.reply)
        peers = self.streams.tcp_peers
        early = b"".join(later) + self._framer.take_rest()
        self._backlog = []
        splice = peers.bind(bound.connection, self, early) if peers is not None else None
        if splice is None:
            self.close("peer_closed")
            return
        self._splice = splice
        self._allocated = True  # media limits, not the unallocated ones
        self.apply_write_limits()

    def _hand_over(self, frame: bytes, rest: list[bytes]) -> bool:
        """A ConnectionBind request (type 0x000B): when its CONNECTION-ID is another
        worker's, pass this connection there with what it sent (io/handoff.py)."""
        from ..stun import decode_message
        from ..stun.constants import Attr
        from .handoff import owner_of

        handoff = self.streams.handoff
        assert handoff is not None
        try:
            cid = decode_message(frame).get(Attr.CONNECTION_ID)
        except Exception:
            return False  # the core answers what it makes of it
        if not isinstance(cid, int):
            return False
        target = owner_of(cid, handoff.index, handoff.count)
        if target is None:
            return False
        data = b"".join(rest) + self._framer.take_rest()
        if not handoff.hand_over(self, target, data):
            return False
        self._backlog = []
        return True

    def handed_off(self) -> None:
        """Another worker has this connection's socket now: forget it here, without a FIN or
        a reset (the descriptor lives on there)."""
        transport = self._transport
        self._close_reason = "handed_off"
        self._state = _CLOSING
        if transport is not None:
            transport.abort()
        self._finish("handed_off")

    def bridge_to(self, bridge: Bridge) -> None:
        """This TLS connection's bytes now go to and come from another worker (io/handoff.py)."""
        self._splice = bridge
        self._allocated = True
        self.apply_write_limits()

    def write_control(self, data: bytes) -> None:
        """An answer that comes later than its request (a Connect's): as a reply."""
        self._write_reply(data)

    def write_spliced(self, data: bytes) -> None:
        """Peer bytes for a data connection: queued, never dropped (the splice stops reading
        the peer while this connection's buffer is full)."""
        transport = self._transport
        if transport is not None and self._state == _READY:
            transport.write(data)

    def set_spliced_reading(self, on: bool) -> None:
        transport = self._transport
        if transport is None or self._state != _READY:
            return
        try:
            if on:
                transport.resume_reading()
            else:
                transport.pause_reading()
        except (RuntimeError, AttributeError):
            pass

    # ------------------------------------------------------------------ writing

    def sink_for(self, client: Address) -> StreamConnection:
        """The sink of this connection's client (``dispatch.SinkFor``): the connection."""
        return self

    def send(self, data: bytes) -> bool:
        """Peer data for this client (the core's sink): dropped, not queued, when backed up.
        False when dropped (counted here, in ``dropped_messages`` and ``dropped_bytes``)."""
        transport = self._transport
        if self._write_paused or transport is None or self._state != _READY:
            stats = self.streams.stats
            stats.dropped_messages += 1
            stats.dropped_bytes += len(data)
            return False
        transport.write(data)
        return True

    def _write_reply(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self._state != _READY:
            return
        allowance = self._reply_allowance()
        if self._write_paused and transport.get_write_buffer_size() > allowance:
            stats = self.streams.stats
            stats.dropped_messages += 1
            stats.dropped_bytes += len(data)
            return
        transport.write(data)
        if not self._read_paused and transport.get_write_buffer_size() > allowance:
            # Replies this client does not read: read no more requests from it until it does.
            self._read_paused = True
            self.streams.stats.read_pauses += 1
            try:
                transport.pause_reading()
            except (RuntimeError, AttributeError):
                pass

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._splice is not None:
            self._splice.pause("peer", "backlog")

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._splice is not None:
            self._splice.resume("peer", "backlog")
            return
        if self._read_paused and self._state == _READY:
            self._read_paused = False
            transport = self._transport
            if transport is not None:
                try:
                    transport.resume_reading()
                except (RuntimeError, AttributeError):
                    pass
            backlog, self._backlog = self._backlog, []
            if backlog:
                self._handle_frames(backlog, self.loop.time())
            if self._framer.pending_error is not None and not self._backlog:
                self.close("framing")


def _address(sockaddr: Any) -> Address:
    # IPv6 socket addresses carry flow info and scope id; the 5-tuple needs host and port.
    return (sockaddr[0], sockaddr[1])
