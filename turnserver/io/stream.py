"""TURN over TCP and TLS (RFC 8656 §3.1, §12.5; RFC 7443): listeners and client connections.

Each accepted connection is one :class:`StreamConnection`, an ``asyncio.Protocol`` (uvloop
runs those without a Python-level stream layer). Bytes go through a
:class:`~turnserver.stun.StreamFramer`; STUN frames go to ``core.handle_stun`` with the
connection itself as the sink, ChannelData frames to ``core.handle_channel_data``. The relay
toward peers stays UDP (REQUESTED-TRANSPORT 17).

TLS listeners accept a plain TCP socket and look at the first byte the client sends: 0x16
(a TLS handshake record) starts TLS with ``loop.start_tls``; a STUN or ChannelData byte means
the client speaks plain TURN on that port, as coturn allows. Doing TLS after accept (rather
than ``create_server(ssl=...)``) also lets the connection cap apply at accept time and makes
handshake failures visible, so both can be counted.

Limits, all read from the running configuration (a reload that changes them takes effect
within a sweep interval, at most a second):

* ``max_connections``: connections beyond it are reset at accept (reason ``capacity``).
* ``tls_handshake_timeout_s``: the first byte and the TLS handshake must arrive within it.
* ``stream_idle_timeout_s``: a connection without an allocation that long is closed; after
  its allocation ended it is closed once it has also been quiet that long.
* ``stream_write_buffer_bytes``: the write buffer toward one client. Above it the transport
  pauses us and peer data for that client is dropped (counted) instead of queued, so a
  client that never reads costs a bounded amount of memory. Replies to the client's own
  requests may use up to twice the limit, so a burst of media cannot starve a Refresh.

Counters (:class:`StreamStats`, plain ints read at scrape time, reachable as
``TurnServer.streams.stats``):

* ``open[kind]``, ``accepted[kind]``: connections open now / accepted since start, by the
  kind of listener that accepted them ("tcp" or "tls"; a plain client on a TLS listener
  counts under "tls" there, and ``plain_on_tls`` counts those clients);
* ``closed[reason]``: connections closed, by reason: ``idle``, ``handshake`` (no first byte
  or no TLS handshake in time, or a failed handshake), ``framing`` (bytes that are neither
  STUN nor ChannelData), ``capacity`` (refused over ``max_connections``), ``peer_closed``
  (the client closed or reset), ``shutdown`` (server stopping);
  ``accepted[tcp] + accepted[tls] == open[tcp] + open[tls] + sum(closed.values())``;
* ``dropped_messages``, ``dropped_bytes``: messages toward slow clients dropped because
  their write buffer was full;
* the TLS certificate's expiry: :meth:`StreamServer.tls_certificate_not_after`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from ..stun import FramingError, StreamFramer
from ..turn.allocation import Address, FiveTuple
from ..turn.core import SendToPeer
from .tls import TlsCertificates

if TYPE_CHECKING:
    from ..config import Config
    from ..turn.core import TurnCore

log = logging.getLogger("turnd")

CLOSE_REASONS = ("idle", "handshake", "framing", "capacity", "peer_closed", "shutdown")
LISTEN_BACKLOG = 1024
# RFC 5246 §6.2.1 / RFC 8446 §5.1: ContentType handshake(22) opens every TLS connection.
TLS_HANDSHAKE_RECORD = 0x16
# Application data that arrives while start_tls is still returning; a client cannot have
# sent more than a few requests before it saw any answer.
_EARLY_DATA_LIMIT = 65536
# Replies to a client's own requests may exceed the media limit by this factor.
_CONTROL_HEADROOM = 2
# The idle sweep runs this often at most and at least (seconds).
_SWEEP_MIN_S = 0.05
_SWEEP_MAX_S = 1.0

_SNIFF, _HANDSHAKE, _READY, _CLOSING, _CLOSED = range(5)


@dataclass
class StreamLimits:
    max_connections: int = 4096
    idle_timeout_s: float = 30.0
    handshake_timeout_s: float = 10.0
    write_buffer_bytes: int = 262144

    @classmethod
    def from_config(cls, config: Config) -> StreamLimits:
        return cls(
            max_connections=config.max_connections,
            idle_timeout_s=config.stream_idle_timeout_s,
            handshake_timeout_s=config.tls_handshake_timeout_s,
            write_buffer_bytes=config.stream_write_buffer_bytes,
        )


@dataclass
class StreamStats:
    """Plain counters; see the module docstring for what each one means."""

    open: dict[str, int] = field(default_factory=lambda: {"tcp": 0, "tls": 0})
    accepted: dict[str, int] = field(default_factory=lambda: {"tcp": 0, "tls": 0})
    closed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLOSE_REASONS, 0))
    plain_on_tls: int = 0
    dropped_messages: int = 0
    dropped_bytes: int = 0


def bind_tcp(host: str, port: int) -> socket.socket:
    """A bound (not yet listening) TCP socket, the stream twin of ``server.bind_udp``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # A restart must not wait for TIME_WAIT connections of the previous process.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # So that "0.0.0.0:3478" and "[::]:3478" can both be bound.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


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
        self.servers: list[asyncio.AbstractServer] = []
        self._sweep_handle: asyncio.TimerHandle | None = None
        self._closed = False

    async def listen(self, kind: str, host: str, port: int) -> tuple[asyncio.AbstractServer, Address]:
        """Bind and serve one listener; ``kind`` is "tcp" or "tls". Returns the bound address."""
        if kind not in ("tcp", "tls"):
            raise ValueError(f"unknown stream listener kind {kind!r}")
        if kind == "tls" and self.tls is None:
            raise ValueError("a TLS listener needs a certificate")
        sock = bind_tcp(host, port)
        try:
            bound = sock.getsockname()
            server = await self.loop.create_server(
                lambda: StreamConnection(self, kind), sock=sock, backlog=LISTEN_BACKLOG,
            )
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
        """Stop the listeners and the sweep; existing connections stay (see close_connections)."""
        self._closed = True
        for server in self.servers:
            server.close()
        if self._sweep_handle is not None:
            self._sweep_handle.cancel()
            self._sweep_handle = None

    def close_connections(self) -> None:
        for conn in list(self.connections):
            conn.close("shutdown", abort=True)

    # ------------------------------------------------------------------ idle sweep

    def _schedule_sweep(self) -> None:
        if self._sweep_handle is not None or self._closed:
            return
        shortest = min(self.limits.idle_timeout_s, self.limits.handshake_timeout_s)
        interval = max(_SWEEP_MIN_S, min(_SWEEP_MAX_S, shortest / 4))
        self._sweep_handle = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        # One timer for all connections, as the core does for allocations: per-connection
        # timers would cost a heap entry per connection per activity.
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


class StreamConnection(asyncio.Protocol):
    """One TCP or TLS client; also the sink the core hands peer data for this client to."""

    __slots__ = (
        "streams", "kind", "loop", "_state", "_raw", "_transport", "_framer", "_five_tuple",
        "_client", "_server", "_opened_at", "_last_activity", "_unallocated_since",
        "_had_allocation", "_write_paused", "_close_reason", "_peek", "_early",
        "_handshake_task",
    )

    def __init__(self, streams: StreamServer, kind: str) -> None:
        self.streams = streams
        self.kind = kind  # the listener's kind: "tcp" or "tls"
        self.loop = streams.loop
        self._state = _SNIFF
        self._raw: asyncio.Transport | None = None
        self._transport: asyncio.Transport | None = None  # raw or TLS, once ready
        core = streams.get_core()
        # Legacy (RFC 5766) channel numbers reach the framer only when the operator allows them.
        self._framer = StreamFramer(max_channel=core.config.channel_max if core is not None else 0x4FFF)
        self._five_tuple: FiveTuple | None = None
        self._client: Address = ("", 0)
        self._server: Address = ("", 0)
        self._opened_at = 0.0
        self._last_activity = 0.0
        self._unallocated_since: float | None = None
        self._had_allocation = False
        self._write_paused = False
        self._close_reason: str | None = None
        self._peek: socket.socket | None = None
        self._early: list[bytes] | None = None
        self._handshake_task: asyncio.Task[None] | None = None

    @property
    def five_tuple(self) -> FiveTuple | None:
        return self._five_tuple

    # ------------------------------------------------------------------ lifecycle

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        streams = self.streams
        stats = streams.stats
        self._raw = transport
        stats.accepted[self.kind] += 1
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        if len(streams.connections) >= streams.limits.max_connections or not peer or not local:
            # Refused at once: a reset costs less than a handshake or a framer.
            self._state = _CLOSED
            stats.closed["capacity"] += 1
            transport.abort()
            return
        self._client = (peer[0], peer[1])
        self._server = (local[0], local[1])
        streams.connections.add(self)
        stats.open[self.kind] += 1
        self._opened_at = self._last_activity = self.loop.time()
        if self.kind == "tls":
            # Nothing may be read before we know whether this is TLS: start_tls must see
            # the ClientHello from its first byte.
            transport.pause_reading()
            self._start_sniff(transport)
        else:
            self._become_ready(transport, "tcp")

    def connection_lost(self, exc: Exception | None) -> None:
        # Lost in the middle of a TLS handshake: whichever of start_tls and this callback
        # comes first, it counts as a failed handshake.
        default = "handshake" if self._state == _HANDSHAKE else "peer_closed"
        self._finish(self._close_reason or default)

    def eof_received(self) -> bool | None:
        return None  # a half-closed client cannot get answers: close our side too

    def close(self, reason: str, *, abort: bool = False) -> None:
        """Close for ``reason`` (counted when the transport reports it lost)."""
        if self._state >= _CLOSING:
            return
        self._close_reason = reason
        self._state = _CLOSING
        self._stop_sniff()
        self._free_allocation()
        transport = self._transport or self._raw
        if transport is None:
            self._finish(reason)
            return
        if abort:
            transport.abort()
            if self._raw is not None and self._raw is not transport:
                self._raw.abort()
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
        streams = self.streams
        if self in streams.connections:
            streams.connections.discard(self)
            streams.stats.open[self.kind] -= 1
            streams.stats.closed[reason] = streams.stats.closed.get(reason, 0) + 1
        task, self._handshake_task = self._handshake_task, None
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()

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

    def _become_ready(self, transport: asyncio.Transport, transport_name: str) -> None:
        self._transport = transport
        self._five_tuple = (transport_name, self._client, self._server)
        self._state = _READY
        self.apply_write_limits()

    def apply_write_limits(self) -> None:
        if self._transport is None:
            return
        high = self.streams.limits.write_buffer_bytes
        # Resume at a quarter: hysteresis so a client reading slowly does not flip the
        # state on every message.
        self._transport.set_write_buffer_limits(high=high, low=high // 4)

    def check_timeouts(self, now: float, allocations: dict[FiveTuple, Any]) -> None:
        limits = self.streams.limits
        state = self._state
        if state in (_SNIFF, _HANDSHAKE):
            # start_tls enforces the handshake timeout itself; this also covers a client
            # that connects to a TLS port and never sends a byte.
            if now - self._opened_at >= limits.handshake_timeout_s + (
                    limits.handshake_timeout_s if state == _HANDSHAKE else 0.0):
                self.close("handshake", abort=True)
            return
        if state != _READY:
            return
        allocation = allocations.get(self._five_tuple) if self._five_tuple else None
        if allocation is not None and allocation.sink is self:
            self._had_allocation = True
            self._unallocated_since = None
            return
        if self._unallocated_since is None:
            self._unallocated_since = self._opened_at if not self._had_allocation else now
        if now - self._unallocated_since < limits.idle_timeout_s:
            return
        if self._had_allocation and now - self._last_activity < limits.idle_timeout_s:
            return
        self.close("idle")

    # ------------------------------------------------------------------ TLS detection

    def _start_sniff(self, transport: asyncio.Transport) -> None:
        sock = transport.get_extra_info("socket")
        try:
            # A duplicate descriptor lets us wait for and peek at the first byte without
            # taking it from the transport (which the loop owns and has paused).
            self._peek = socket.socket(fileno=os.dup(sock.fileno()))
            self.loop.add_reader(self._peek.fileno(), self._on_first_byte)
        except (OSError, AttributeError, ValueError):
            log.exception("cannot watch a new TLS connection")
            self._stop_sniff()
            self.close("handshake", abort=True)

    def _stop_sniff(self) -> None:
        peek = self._peek
        if peek is None:
            return
        self._peek = None
        try:
            self.loop.remove_reader(peek.fileno())
        except (OSError, ValueError):
            pass
        peek.close()

    def _on_first_byte(self) -> None:
        peek = self._peek
        if peek is None or self._state != _SNIFF:
            return
        try:
            head = peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            head = b""
        self._stop_sniff()
        raw = self._raw
        assert raw is not None
        if not head:
            self.close("peer_closed")
            return
        if head[0] == TLS_HANDSHAKE_RECORD:
            tls = self.streams.tls
            assert tls is not None
            self._state = _HANDSHAKE
            self._early = []
            self._handshake_task = self.loop.create_task(self._handshake(raw, tls.context))
            return
        # Plain STUN/ChannelData on a TLS port; garbage is left to the framer to reject.
        self.streams.stats.plain_on_tls += 1
        self._become_ready(raw, "tcp")
        raw.resume_reading()

    async def _handshake(self, raw: asyncio.Transport, context: Any) -> None:
        timeout = self.streams.limits.handshake_timeout_s
        try:
            tls_transport = await self.loop.start_tls(
                raw, self, context, server_side=True,
                ssl_handshake_timeout=timeout, ssl_shutdown_timeout=timeout,
            )
        except asyncio.CancelledError:
            raw.abort()
            raise
        except Exception as exc:
            # Scanners and clients that distrust the certificate end here: not an error.
            log.debug("TLS handshake from %s failed: %s", self._client[0], exc)
            if self._state == _HANDSHAKE:
                self._close_reason = "handshake"
                self._state = _CLOSING
            raw.abort()
            self._finish(self._close_reason or "handshake")
            return
        if tls_transport is None or self._state != _HANDSHAKE:
            if tls_transport is not None:
                tls_transport.abort()
            raw.abort()
            self._finish(self._close_reason or "peer_closed")
            return
        self._become_ready(tls_transport, "tls")  # type: ignore[arg-type]
        early, self._early = self._early, None
        for chunk in early or ():
            if self._state != _READY:
                break
            self.data_received(chunk)

    # ------------------------------------------------------------------ data

    def data_received(self, data: bytes) -> None:
        if self._state != _READY:
            early = self._early
            if self._state == _HANDSHAKE and early is not None:
                # The TLS layer may hand over application data that came with the client's
                # Finished before start_tls has returned the transport to write answers to.
                early.append(data)
                if sum(map(len, early)) > _EARLY_DATA_LIMIT:
                    self.close("framing", abort=True)
            return
        now = self.loop.time()
        self._last_activity = now
        try:
            frames = self._framer.feed(data)
        except FramingError:
            self.close("framing")
            return
        core = self.streams.get_core()
        if core is None:
            return
        five_tuple = self._five_tuple
        assert five_tuple is not None
        handled_stun = False
        for frame in frames:
            try:
                if frame[0] < 0x40:
                    handled_stun = True
                    reply = core.handle_stun(frame, five_tuple, now, self)
                    if reply is None:
                        continue
                    if isinstance(reply, SendToPeer):
                        reply.relay.sendto(reply.data, reply.peer)
                    else:
                        self._write_reply(reply)
                else:
                    # The framer only returns 0x40-0x4F here: ChannelData, padding removed.
                    out = core.handle_channel_data(frame, five_tuple, now)
                    if out is not None:
                        out.relay.sendto(out.data, out.peer)
            except Exception:  # one bad frame never stops the connection or the loop
                core.stats.dropped["internal_error"] += 1
                log.exception("error handling a stream frame")
        if handled_stun:
            self.streams.on_stun()
        if self._framer.pending_error is not None:
            # RFC 8656 §12.5 gives no way to resynchronise a stream: answer what was whole,
            # then close.
            self.close("framing")

    # ------------------------------------------------------------------ writing

    def send(self, data: bytes) -> None:
        """Peer data for this client (the core's sink): dropped, not queued, when backed up."""
        transport = self._transport
        if self._write_paused or transport is None or self._state != _READY:
            stats = self.streams.stats
            stats.dropped_messages += 1
            stats.dropped_bytes += len(data)
            return
        transport.write(data)

    def _write_reply(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or self._state != _READY:
            return
        if self._write_paused and transport.get_write_buffer_size() > (
                _CONTROL_HEADROOM * self.streams.limits.write_buffer_bytes):
            stats = self.streams.stats
            stats.dropped_messages += 1
            stats.dropped_bytes += len(data)
            return
        transport.write(data)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
