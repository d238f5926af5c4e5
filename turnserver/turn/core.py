"""The TURN server state machine (RFC 8656), sans-IO.

The core never touches a socket or a clock. The I/O layer hands it:

* ``handle_stun(data, five_tuple, now, sink)`` for every STUN message from a client; it
  returns the bytes to send back to that client, a :class:`SendToPeer` for a Send
  indication, or ``None``.
* ``handle_channel_data(data, five_tuple, now)`` for ChannelData from a client; it returns a
  :class:`SendToPeer` or ``None``.
* ``handle_peer_data(relay, data, peer, now)`` for a datagram a relay socket received; it
  returns ``(sink, bytes)`` to send to the client, or ``None``. When the sink drops those
  bytes, ``peer_data_dropped(relay, len(data))`` takes them back out of the counters.
* ``handle_timer(now)`` when ``next_deadline()`` passes, and ``connection_closed`` when a
  stream client goes away.

Media on bound channels of UDP clients need not pass through here at all: when the I/O layer
gives the core a :class:`FastRoutes` (``fast_routes``), the core installs a route there for
each such channel, with the earliest of the channel's, the permission's and the allocation's
expiry, and the allocation's token buckets; it moves that expiry whenever one of them changes,
and removes the route when the channel or the allocation goes. What the data plane carried is
added to the allocation's counters by ``fold_route_counts`` (before a scrape) and when the
route goes (before the usage record). Whatever a route does not fully allow still reaches
``handle_channel_data`` and ``handle_peer_data``, which decide and count as before.

Relay sockets come from a :class:`RelayPorts` the I/O layer provides; the core only keeps
the opaque endpoints it returns. Expiry is checked where an entry is looked up
(``expires_at > now``) and one deadline heap drives clean-up: each allocation, permission and
channel has at most one entry there, which is pushed again at the current ``expires_at`` when
it falls due on something refreshed in the meantime.
"""

from __future__ import annotations

import heapq
import logging
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol

from ..addresses import canonical_ip
from ..auth import ALGORITHM_MD5, SUPPORTED_ALGORITHMS, CredentialStore, NonceManager
from ..policy import PeerPolicy
from ..stun import (
    Attr,
    MalformedMessageError,
    Message,
    MessageClass,
    Method,
    StunDecodeError,
    decode_message,
    encode_channel_data,
    encode_message,
    verify_message_integrity,
    verify_message_integrity_sha256,
)
from ..stun.channel_data import CHANNEL_MAX, CHANNEL_MIN
from .allocation import (
    CHANNEL_LIFETIME_S,
    PERMISSION_LIFETIME_S,
    RESERVATION_LIFETIME_S,
    Address,
    Allocation,
    Channel,
    FiveTuple,
    RelayEndpoint,
    RelayPorts,
    compute_lifetime,
    family_of,
)
from .errors import TurnError, error
from .limits import QuotaLedger, SourceRateLimiter, TokenBucket
from .stats import CoreStats
from .tcp import (
    BIND_TIMEOUT_S,
    BOUND,
    CONNECTING,
    PENDING,
    REQUESTED_TRANSPORT_TCP,
    PeerConnection,
    TcpPeers,
)

REQUESTED_TRANSPORT_UDP = 17
LEGACY_CHANNEL_MAX = 0x7FFF  # RFC 5766 §11 (0x4000-0x7FFF)
FAMILY_NAMES = {1: "ipv4", 2: "ipv6"}
METHOD_NAMES = {
    Method.BINDING: "binding",
    Method.ALLOCATE: "allocate",
    Method.REFRESH: "refresh",
    Method.CREATE_PERMISSION: "create_permission",
    Method.CHANNEL_BIND: "channel_bind",
    Method.CONNECT: "connect",
    Method.CONNECTION_BIND: "connection_bind",
}
# A handler's answer that comes later (a Connect waits for the peer's TCP handshake).
_DEFERRED = object()
# RFC 8489 §14.11: what a challenge offers; every algorithm we derive keys for, no parameters.
SERVER_PASSWORD_ALGORITHMS = [(algorithm, b"") for algorithm in SUPPORTED_ALGORITHMS]
_CHANNEL_HEADER = struct.Struct("!HH")
# RFC 8489 §5: a message body is at most 0xFFFF bytes. A Data indication spends 12 (IPv4) or
# 24 (IPv6) of them on XOR-PEER-ADDRESS and 4 on the DATA header, and DATA is padded to 4.
_DATA_INDICATION_MAX = {1: (0xFFFF - 12 - 4) & ~3, 2: (0xFFFF - 24 - 4) & ~3}
# The most one UDP datagram carries toward a client (IPv4, IPv6): a bigger frame the kernel
# would refuse, so it is dropped here as too_big.
_UDP_PAYLOAD_MAX = {1: 65507, 2: 65527}
# RFC 8489 §14.9: UNKNOWN-ATTRIBUTES in a 420 lists at most this many types (coturn's limit).
MAX_UNKNOWN_LISTED = 128
# Authentication failures are logged one line each (for fail2ban and incident response), at most
# this many in a burst and per second from one source address.
_AUTH_LOG_BURST = 5
_AUTH_LOG_RATE_S = 0.2
# and at most this many lines a second (bursts of _AUTH_LOG_TOTAL_BURST) from all sources
# together, since UDP sources can be forged by the thousand.
_AUTH_LOG_TOTAL_RATE_S = 20.0
_AUTH_LOG_TOTAL_BURST = 100
# Failures that need a nonce the server sent to the client's address, so a forged UDP source
# cannot cause them: only these are warnings (and what fail2ban counts). The others (a missing
# attribute, a nonce the server never made) can come from anyone about any address: debug.
_AUTH_WARNINGS = frozenset({"unknown_user", "bad_integrity", "expired_username"})
# Reason phrases of a 403 that name the policy's rule, so an operator can tell them apart.
_POLICY_PHRASES = {
    "own_port": "Peer is a listening port of this server or a relay port it does not hold",
    "own_address": "Peer is an address of this host",
    "denied_cidr": "Peer address denied by denied_peers",
}
_log = logging.getLogger("turnd.auth")
_policy_log = logging.getLogger("turnd.policy")
# Distinct peer IPs remembered per allocation for its usage record; beyond, only counted.
_PEERS_SEEN_MAX = 1024
_AUTHENTICATED_METHODS = frozenset({
    Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND,
    Method.CONNECT, Method.CONNECTION_BIND,
})


@dataclass
class CoreConfig:
    realm: str = "turnd"
    software: str = "turnd"
    default_lifetime_s: int = 600
    max_lifetime_s: int = 3600
    max_allocations: int = 10000  # allocations plus EVEN-PORT reservations; 0: ports only
    user_quota: int = 32  # per user part of a REST username (or static user); 0: unlimited
    max_permissions_per_allocation: int = 128  # 0: unlimited
    max_channels_per_allocation: int = 64  # 0: unlimited
    # Relayed bytes per second, each direction on its own; 0: unlimited.
    allocation_bandwidth_bytes_s: int = 625_000  # 5 Mbit/s
    server_bandwidth_bytes_s: int = 0
    # Unauthenticated answers (401, 438, pre-authentication 400/420) per source address.
    challenge_rate_per_source: float = 40.0  # 0: not limited
    challenge_burst_per_source: int = 40
    allow_refresh_after_expiry: bool = True
    # bound relay IP -> advertised external IP (servers behind 1:1 NAT); any spelling that
    # ipaddress accepts, kept in canonical form
    external_addresses: Mapping[str, str] = field(default_factory=dict)
    alternate_server: Address | None = None
    # RFC 5766 clients (coturn's tools among them) bind channels up to 0x7FFF; RFC 8656 §12
    # narrowed the range to 0x4FFF. Off: the RFC 8656 range only.
    legacy_channel_numbers: bool = False
    # RFC 6062 TCP allocations: offered at all, and peer connections (pending and bound)
    # per allocation; 0: unlimited.
    tcp_relay: bool = True
    max_tcp_connections_per_allocation: int = 32

    def __post_init__(self) -> None:
        self.external_addresses = {
            canonical_ip(bound): canonical_ip(ext) for bound, ext in self.external_addresses.items()
        }

    @property
    def channel_max(self) -> int:
        return LEGACY_CHANNEL_MAX if self.legacy_channel_numbers else CHANNEL_MAX


class FastRoutes(Protocol):
    """The I/O layer's data plane, as the core drives it (turnserver/io/datapath.py)."""

    def add(self, five_tuple: FiveTuple, number: int, relay: RelayEndpoint, peer: Address,
            expires_at: float, up: Any, down: Any, held: Any = None) -> Any:
        """Install a route; its handle, or None when the data plane cannot carry it. ``held``
        (from ``RelayPorts.held_offset``): where the data plane reads, per packet, whether the
        peer's port on our own relay address is still held."""
        ...

    def set_expiry(self, handle: Any, expires_at: float) -> None: ...

    def remove(self, handle: Any) -> tuple[int, int, int, int]:
        """Remove a route; what it carried since the last ``take_counts``: bytes and packets
        toward the peer, bytes and packets toward the client."""
        ...

    def take_counts(self) -> list[tuple[Any, int, int, int, int]]:
        """(handle, bytes up, packets up, bytes down, packets down) for every route that
        carried something since the last call."""
        ...

    def take_send_failures(self) -> int:
        """Datagrams the kernel would not take since the last call (``send_failed``)."""
        ...


@dataclass(slots=True)
class SendToPeer:
    relay: RelayEndpoint
    data: bytes
    peer: Address


@dataclass(slots=True)
class ConnectionBound:
    """What ``handle_stun`` returns for a successful ConnectionBind (RFC 6062 §5.4): the
    response to write, after which the connection it came on carries ``connection``'s bytes."""

    reply: bytes
    connection: PeerConnection


@dataclass(slots=True)
class _Auth:
    username: str
    key: bytes
    algorithm: int
    integrity: str  # "sha1", "sha256" or "both": what the response carries


class _ChannelRoute:
    """The ChannelData fast path: (5-tuple, channel number) -> where to send.

    ``own`` is set for a peer on one of the server's own relay addresses (that address),
    reachable only while the server holds the port: checked per packet, since the port can
    be released. ``fast`` is the handle of its route in the data plane, when it has one.
    """

    __slots__ = ("allocation", "channel", "relay", "own", "fast")

    def __init__(self, allocation: Allocation, channel: Channel, relay: RelayEndpoint,
                 own: str | None = None) -> None:
        self.allocation = allocation
        self.channel = channel
        self.relay = relay
        self.own = own
        self.fast: Any = None


class TurnCore:
    def __init__(
        self,
        *,
        config: CoreConfig,
        credentials: CredentialStore,
        nonces: NonceManager,
        policy: PeerPolicy,
        relay_ports: RelayPorts,
        random_bytes: Callable[[int], bytes],
        on_allocation_end: Callable[[Allocation, str, float], None] | None = None,
    ) -> None:
        self.config = config
        self.credentials = credentials
        self.nonces = nonces
        self.policy = policy
        self.relay_ports = relay_ports
        self.random_bytes = random_bytes
        self.on_allocation_end = on_allocation_end
        # What happens to allocations, for the audit log (turnserver/io/usage_log.py): called
        # as on_event(allocation, event, now, details) for "created", "refreshed",
        # "permission" and "channel"; the end comes through on_allocation_end.
        self.on_event: Callable[[Allocation, str, float, dict[str, Any]], None] | None = None
        self.stats = CoreStats()
        self.draining = False
        # Allocation ids: the prefix (a worker's, "w1-") and a counter, unique in this server.
        self.id_prefix = ""
        self._allocation_seq = 0
        self.allocations: dict[FiveTuple, Allocation] = {}
        self._by_relay: dict[RelayEndpoint, Allocation] = {}
        self._routes: dict[tuple[FiveTuple, int], _ChannelRoute] = {}
        # The data plane's routes (see FastRoutes), by handle; none without a data plane.
        self.fast_routes: FastRoutes | None = None
        self._fast: dict[Any, _ChannelRoute] = {}
        # RFC 6062: the I/O layer's peer connections, and ours by CONNECTION-ID. A worker's
        # ids carry its number in the top byte (cid_base), so any worker can tell whose it is.
        self.tcp_peers: TcpPeers | None = None
        self._tcp: dict[int, PeerConnection] = {}
        self.cid_base = 0
        # Routes toward a peer on one of our own relay addresses, by that (address, port): the
        # port must stay held, so they leave the data plane when it is released.
        self._own_fast: dict[Address, list[_ChannelRoute]] = {}
        # Allocations plus reservations, per quota key (the user part of a REST username) and
        # in all; the I/O layer may give one shared by several processes.
        self.quotas: Any = QuotaLedger()
        # token -> (reserved relay, expires_at, quota key of the user who reserved it)
        self._reservations: dict[bytes, tuple[RelayEndpoint, float, str]] = {}
        self._timers: list[tuple[float, int, str, Any]] = []
        self._timer_seq = 0
        self._dead_timers = 0  # heap entries known to be stale (see _compact_timers)
        self._challenges = self._new_challenge_limiter(config)
        self._auth_log = SourceRateLimiter(_AUTH_LOG_RATE_S, _AUTH_LOG_BURST,
                                           seed=int.from_bytes(self.random_bytes(8), "big"),
                                           slots=1024)
        self._auth_log_total = SourceRateLimiter(_AUTH_LOG_TOTAL_RATE_S, _AUTH_LOG_TOTAL_BURST,
                                                 seed=0, slots=1)
        self.bandwidth_up = TokenBucket(config.server_bandwidth_bytes_s, 0.0)
        self.bandwidth_down = TokenBucket(config.server_bandwidth_bytes_s, 0.0)

    def _new_challenge_limiter(self, config: CoreConfig) -> SourceRateLimiter:
        seed = int.from_bytes(self.random_bytes(8), "big")
        return SourceRateLimiter(config.challenge_rate_per_source,
                                 config.challenge_burst_per_source, seed=seed)

    @property
    def timer_entries(self) -> int:
        """Entries in the deadline heap (live and stale), for the metrics."""
        return len(self._timers)

    @property
    def reservation_count(self) -> int:
        return len(self._reservations)

    # ------------------------------------------------------------------ configuration

    def reconfigure(
        self,
        *,
        config: CoreConfig | None = None,
        credentials: CredentialStore | None = None,
        policy: PeerPolicy | None = None,
        nonces: NonceManager | None = None,
    ) -> None:
        """Swap configuration on reload; allocations stay.

        A new peer policy also applies to what was granted under the old one: permissions
        and channels toward peers it refuses are removed, each counted in
        ``stats.policy_refusals`` under the policy's reason.
        """
        if config is not None:
            old, self.config = self.config, config
            if (config.challenge_rate_per_source, config.challenge_burst_per_source) != (
                    old.challenge_rate_per_source, old.challenge_burst_per_source):
                self._challenges = self._new_challenge_limiter(config)
            if config.server_bandwidth_bytes_s != old.server_bandwidth_bytes_s:
                now = self.bandwidth_up.stamp
                self.bandwidth_up.set_rate(config.server_bandwidth_bytes_s, now)
                self.bandwidth_down.set_rate(config.server_bandwidth_bytes_s, now)
            if config.allocation_bandwidth_bytes_s != old.allocation_bandwidth_bytes_s:
                rate = config.allocation_bandwidth_bytes_s
                for allocation in self.allocations.values():
                    allocation.up.set_rate(rate, allocation.up.stamp)
                    allocation.down.set_rate(rate, allocation.down.stamp)
        if credentials is not None:
            self.credentials = credentials
        if policy is not None:
            self.policy = policy
            self._revoke_refused_peers()
        if nonces is not None:
            self.nonces = nonces

    def _revoke_refused_peers(self) -> None:
        check = self.policy.check
        refusals = self.stats.policy_refusals
        for allocation in self.allocations.values():
            for channel in list(allocation.channels.values()):
                decision = check(channel.peer[0], channel.peer[1])
                if not decision.allowed:
                    self._unbind_channel(allocation, channel)
                    refusals[decision.reason] += 1
                else:
                    route = self._routes.get((allocation.five_tuple, channel.number))
                    if route is not None:
                        if route.own != decision.held_check:
                            self._remove_fast(route)
                            route.own = decision.held_check
                            self._add_fast(route)
            for conn in list(allocation.tcp_conns.values()):
                decision = check(conn.peer[0], conn.peer[1])
                if not decision.allowed:
                    self._drop_peer_connection(conn, close=True)
                    refusals[decision.reason] += 1
            permissions = allocation.permissions
            for ip in list(permissions):
                decision = check(ip)
                if not decision.allowed:
                    del permissions[ip]
                    if allocation.permission_timers.pop(ip, None) is not None:
                        self._dead_timers += 1  # its heap entry no longer matches anything
                    refusals[decision.reason] += 1
                    self._sync_fast(allocation, ip)
        self._compact_timers()

    # ------------------------------------------------------------------ timers
    #
    # One heap entry per allocation, permission and channel, not one per refresh: the time of
    # an object's entry is kept beside it (``timer_at``, ``permission_timers``). A refresh
    # that moves the expiry later pushes nothing; when the entry falls due, the object is
    # either expired or pushed again at its current ``expires_at``. Only an expiry moved
    # earlier (a Refresh with a shorter lifetime) pushes a second, earlier entry; the later
    # one no longer matches the recorded time and is skipped when it comes up.

    def _push(self, when: float, kind: str, obj: Any) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, (when, self._timer_seq, kind, obj))

    def _schedule_allocation(self, allocation: Allocation) -> None:
        when = allocation.expires_at
        if allocation.timer_at is None or when < allocation.timer_at:
            if allocation.timer_at is not None:
                self._dead_timers += 1
            allocation.timer_at = when
            self._push(when, "allocation", allocation)

    def _schedule_permission(self, allocation: Allocation, ip: str, when: float) -> None:
        timers = allocation.permission_timers
        scheduled = timers.get(ip)
        if scheduled is None or when < scheduled:
            if scheduled is not None:
                self._dead_timers += 1
            timers[ip] = when
            self._push(when, "permission", (allocation, ip))

    def _schedule_channel(self, allocation: Allocation, channel: Channel) -> None:
        when = channel.expires_at
        if channel.timer_at is None or when < channel.timer_at:
            if channel.timer_at is not None:
                self._dead_timers += 1
            channel.timer_at = when
            self._push(when, "channel", (allocation, channel))

    def next_deadline(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def _timer_live(self, entry: tuple[float, int, str, Any]) -> bool:
        """Whether a heap entry still stands for something that can expire."""
        when, _, kind, obj = entry
        if kind == "allocation":
            return obj.alive and obj.timer_at == when
        if kind == "permission":
            allocation, ip = obj
            return allocation.alive and allocation.permission_timers.get(ip) == when
        if kind == "channel":
            allocation, channel = obj
            return (allocation.alive and channel.timer_at == when
                    and allocation.channels.get(channel.number) is channel)
        if kind == "tcp_bind":
            return obj.alive and obj.timer_at == when
        entry_r = self._reservations.get(obj)
        return entry_r is not None and entry_r[1] == when

    def _compact_timers(self) -> None:
        """Rebuild the heap without stale entries once they are half of it, so an ended
        allocation is not kept alive by its old deadlines (up to an hour away) and the heap
        never holds more than twice the live entries. Each rebuild removes at least as many
        entries as it keeps: linear work, paid for by the ends that made them stale."""
        timers = self._timers
        if not self._dead_timers or 2 * self._dead_timers < len(timers):
            return
        live = [entry for entry in timers if self._timer_live(entry)]
        heapq.heapify(live)
        self._timers = live
        self._dead_timers = 0

    def handle_timer(self, now: float) -> None:
        timers = self._timers
        while timers and timers[0][0] <= now:
            entry = heapq.heappop(timers)
            if not self._timer_live(entry):
                if self._dead_timers:
                    self._dead_timers -= 1
                continue
            when, _, kind, obj = entry
            if kind == "allocation":
                obj.timer_at = None
                if obj.expires_at <= now:
                    self._end_allocation(obj, "expired", now)
                else:
                    self._schedule_allocation(obj)
            elif kind == "permission":
                allocation, ip = obj
                del allocation.permission_timers[ip]
                expires_at = allocation.permissions.get(ip)
                if expires_at is None:
                    continue
                if expires_at <= now:
                    del allocation.permissions[ip]
                else:
                    self._schedule_permission(allocation, ip, expires_at)
            elif kind == "channel":
                allocation, channel = obj
                channel.timer_at = None
                if channel.expires_at <= now:
                    self._unbind_channel(allocation, channel)
                else:
                    self._schedule_channel(allocation, channel)
            elif kind == "tcp_bind":
                obj.timer_at = None
                if obj.state == PENDING:
                    # RFC 6062 §5.2, §5.3: no ConnectionBind within 30 seconds.
                    self.stats.tcp_connections[(obj.direction, "bind_timeout")] += 1
                    self._drop_peer_connection(obj, close=True)
            elif kind == "reservation":
                reservation = self._pop_reservation(obj)
                if reservation is not None:
                    self._release_relay(reservation[0])

    def _pop_reservation(self, token: bytes) -> tuple[RelayEndpoint, float, str] | None:
        """Forget a reservation and give back its quota slot; the caller then owns its relay."""
        entry = self._reservations.pop(token, None)
        if entry is not None:
            self.quotas.release(entry[2])
        return entry

    # ------------------------------------------------------------------ client STUN

    def handle_stun(
        self, data: bytes, five_tuple: FiveTuple, now: float, sink: Any = None
    ) -> bytes | SendToPeer | ConnectionBound | None:
        """One STUN message from a client. Never raises on any input."""
        try:
            msg = decode_message(data)
        except MalformedMessageError as exc:
            # RFC 8489 §6.3: a sound header with bad attributes -> 400 for requests only.
            self.stats.dropped["malformed"] += 1
            if exc.msg_class == MessageClass.REQUEST:
                self._count_request(exc.method, 400)
                if five_tuple[0] == "udp" and not self._challenges.allow(five_tuple[1][0], now):
                    self.stats.limit_refusals["challenge_rate"] += 1
                    return None
                reply = Message(exc.method, MessageClass.ERROR, exc.transaction_id)
                reply.add(Attr.ERROR_CODE, (400, ""))  # unauthenticated: no reason phrase
                return encode_message(reply)
            return None
        except StunDecodeError:
            self.stats.dropped["not_stun"] += 1
            return None
        try:
            if msg.msg_class == MessageClass.REQUEST:
                return self._handle_request(msg, five_tuple, now, sink)
            if msg.msg_class == MessageClass.INDICATION:
                if msg.method == Method.SEND:
                    return self._handle_send(msg, five_tuple, now)
                self.stats.dropped["unexpected_indication"] += 1
                return None
            # RFC 8489 §6.3: a response to no transaction of ours is discarded.
            self.stats.dropped["unsolicited_response"] += 1
            return None
        except Exception:  # last resort: one bad message must not take the listener down
            self.stats.dropped["internal_error"] += 1
            if msg.msg_class == MessageClass.REQUEST:
                reply = Message(msg.method, MessageClass.ERROR, msg.transaction_id)
                reply.add(Attr.ERROR_CODE, (500, "Server Error"))
                return encode_message(reply)
            return None

    def _count_request(self, method: int, code: int) -> None:
        self.stats.requests[(METHOD_NAMES.get(method, "other"), code)] += 1

    def _handle_request(
        self, msg: Message, five_tuple: FiveTuple, now: float, sink: Any
    ) -> bytes | ConnectionBound | None:
        auth: _Auth | None = None
        try:
            unknown = msg.unknown_comprehension_required(MAX_UNKNOWN_LISTED)
            if unknown:
                # RFC 8489 §6.3.1: unknown comprehension-required attributes -> 420.
                raise error(420, attributes=[(Attr.UNKNOWN_ATTRIBUTES, unknown)], label="unknown_attribute")
            method = msg.method
            if method == Method.BINDING:
                reply = self._handle_binding(msg, five_tuple)
            elif method in _AUTHENTICATED_METHODS:
                auth = self._authenticate(msg, five_tuple, now)
                if method == Method.ALLOCATE:
                    reply = self._handle_allocate(msg, auth, five_tuple, now, sink)
                elif method == Method.REFRESH:
                    reply = self._handle_refresh(msg, auth, five_tuple, now)
                elif method == Method.CREATE_PERMISSION:
                    reply = self._handle_create_permission(msg, auth, five_tuple, now)
                elif method == Method.CHANNEL_BIND:
                    reply = self._handle_channel_bind(msg, auth, five_tuple, now)
                elif method == Method.CONNECT:
                    reply = self._handle_connect(msg, auth, five_tuple, now)
                else:
                    reply = self._handle_connection_bind(msg, auth, five_tuple, now, sink)
            else:
                # A method not defined for requests (ConnectionAttempt is an indication).
                # RFC 8489 §6.3 would let it be discarded; a 400 tells the client plainly.
                raise error(400, "Unsupported method", label="bad_request")
        except TurnError as exc:
            if msg.method == Method.ALLOCATE and exc.label != "challenge":
                self.stats.allocations_refused[_refusal_reason(exc)] += 1
            self._count_request(msg.method, exc.code)
            if auth is None and five_tuple[0] == "udp" and not self._challenges.allow(five_tuple[1][0], now):
                # RFC 8489 §6.3 lets a server drop what it will not answer; a reflector
                # must not answer a flood from one (possibly spoofed) source. Over TCP and
                # TLS the handshake has proved the source, nothing is reflected, and a
                # withheld answer would only stall a client that never retransmits: there
                # the write allowance of a connection without an allocation is the bound.
                self.stats.limit_refusals["challenge_rate"] += 1
                return None
            return self._error_response(msg, exc, auth, five_tuple)
        if reply is _DEFERRED:
            return None  # counted and answered when the outcome is known
        self._count_request(msg.method, 200)
        if isinstance(reply, (bytes, ConnectionBound)):
            return reply
        return self._encode_reply(msg, reply, auth)

    def _encode_reply(self, request: Message, reply: Message, auth: _Auth | None) -> bytes:
        # SOFTWARE only on authenticated answers: an unauthenticated one stays as small as the
        # RFCs allow, so that the server is a poor reflector.
        if auth is not None and self.config.software:
            reply.add(Attr.SOFTWARE, self.config.software)
        return encode_message(
            reply,
            key=auth.key if auth else None,
            integrity=auth.integrity if auth else "sha1",
            fingerprint=Attr.FINGERPRINT in request,
        )

    def _error_response(
        self, msg: Message, exc: TurnError, auth: _Auth | None, five_tuple: FiveTuple
    ) -> bytes:
        reply = Message(msg.method, MessageClass.ERROR, msg.transaction_id)
        # RFC 8489 §14.8: the reason phrase is for diagnostics; an answer to an unauthenticated
        # request carries none.
        reply.add(Attr.ERROR_CODE, (exc.code, exc.reason if auth is not None else ""))
        for attr_type, value in exc.attributes:
            reply.add(attr_type, value)
        if exc.code in (401, 438):
            # RFC 8489 §9.2.4: a challenge carries REALM, a fresh NONCE and, with the
            # security-feature cookie in the nonce, the algorithms we accept.
            reply.add(Attr.REALM, self.credentials.realm)
            reply.add(Attr.NONCE, self.nonces.make(five_tuple[1][0]))
            reply.add(Attr.PASSWORD_ALGORITHMS, SERVER_PASSWORD_ALGORITHMS)
            auth = None  # RFC 8489 §9.2.4: no integrity on 401/438
        return self._encode_reply(msg, reply, auth)

    # ------------------------------------------------------------------ authentication

    def _authenticate(self, msg: Message, five_tuple: FiveTuple, now: float) -> _Auth:
        """RFC 8489 §9.2.4, long-term credentials, in the RFC's order."""
        has_mi = Attr.MESSAGE_INTEGRITY in msg
        has_mi256 = Attr.MESSAGE_INTEGRITY_SHA256 in msg
        if not has_mi and not has_mi256:
            raise error(401, label="challenge")  # the first, unauthenticated request
        username = msg.get(Attr.USERNAME)
        user_hash = msg.get(Attr.USERHASH)
        nonce = msg.get(Attr.NONCE)
        if (username is None and user_hash is None) or msg.get(Attr.REALM) is None or nonce is None:
            self._auth_failed("bad_request", msg, five_tuple, username, now)
            raise error(400, "Missing USERNAME, REALM or NONCE", label="auth")
        verdict = self.nonces.check(nonce, five_tuple[1][0])
        if verdict != "ok":
            self._auth_failed("stale_nonce" if verdict == "stale" else "bad_nonce", msg, five_tuple,
                              username, now)
            raise error(438, label="auth")
        algorithm = ALGORITHM_MD5
        algorithms = msg.get(Attr.PASSWORD_ALGORITHMS)
        chosen = msg.get(Attr.PASSWORD_ALGORITHM)
        if (algorithms is not None or chosen is not None) and NonceManager.has_password_algorithms_feature(nonce):
            # RFC 8489 §9.2.4: both present, PASSWORD-ALGORITHMS the list we sent, and
            # PASSWORD-ALGORITHM one of its entries, parameters included.
            if algorithms is None or chosen is None or list(algorithms) != SERVER_PASSWORD_ALGORITHMS:
                self._auth_failed("bad_request", msg, five_tuple, username, now)
                raise error(400, "PASSWORD-ALGORITHMS mismatch", label="auth")
            if chosen not in SERVER_PASSWORD_ALGORITHMS:
                self._auth_failed("bad_request", msg, five_tuple, username, now)
                raise error(400, "Unsupported PASSWORD-ALGORITHM", label="auth")
            algorithm = chosen[0]
        if username is None:
            found = self.credentials.lookup_userhash(user_hash, algorithm)
            if found is None:
                self._auth_failed("unknown_user", msg, five_tuple, None, now)
                raise error(401, label="auth")
            username, keys = found
        else:
            keys = self.credentials.lookup(username, algorithm)
        if not keys:
            self._auth_failed("unknown_user", msg, five_tuple, username, now)
            raise error(401, label="auth")
        key = None
        for candidate in keys:
            if has_mi256:
                ok = verify_message_integrity_sha256(msg, candidate)
            else:
                ok = verify_message_integrity(msg, candidate)
            if ok:
                key = candidate
                break
        if key is None:
            self._auth_failed("bad_integrity", msg, five_tuple, username, now)
            raise error(401, label="auth")
        if self.credentials.is_expired(username):
            # An expired REST username never makes a new allocation; whether it may keep an
            # existing one alive is the operator's choice (allow_refresh_after_expiry).
            if msg.method == Method.ALLOCATE or not self.config.allow_refresh_after_expiry:
                self._auth_failed("expired_username", msg, five_tuple, username, now)
                raise error(401, "Credentials expired", label="auth")
        integrity = "both" if (has_mi and has_mi256) else ("sha256" if has_mi256 else "sha1")
        return _Auth(username, key, algorithm, integrity)

    def _auth_failed(self, reason: str, msg: Message, five_tuple: FiveTuple, username: Any,
                     now: float) -> None:
        """Count an authentication failure and log it, one line with the client's address,
        the user part and the reason (never a password, key or nonce), rate-limited per
        source. A stale nonce is routine (the client retries with the fresh one): debug."""
        self.stats.auth_failures[reason] += 1
        level = logging.WARNING if reason in _AUTH_WARNINGS else logging.DEBUG
        if not _log.isEnabledFor(level) or not self._auth_log.allow(five_tuple[1][0], now):
            return
        if not self._auth_log_total.allow("", now):
            return
        user = _printable(self.credentials.quota_user(username)) if isinstance(username, str) else "-"
        # The fields make the line: "authentication failed client=IP port=N reason=... user=..."
        # in text (what fail2ban matches, docs/deploy.md), an object in JSON.
        _log.log(level, "authentication failed", extra={"auth_failure": {
            "client": five_tuple[1][0], "port": five_tuple[1][1], "reason": reason, "user": user,
            "method": METHOD_NAMES.get(msg.method, "other"), "transport": five_tuple[0]}})

    def _allocation_for(self, auth: _Auth, five_tuple: FiveTuple, now: float) -> Allocation:
        allocation = self.allocations.get(five_tuple)
        if allocation is None or allocation.expires_at <= now:
            # RFC 8656 §5: a request other than Allocate on a 5-tuple without an allocation.
            raise error(437, label="mismatch")
        if allocation.username != auth.username:
            # RFC 8656 §5: the same credentials as the Allocate, else 441.
            raise error(441, label="auth")
        return allocation

    # ------------------------------------------------------------------ Binding

    def _handle_binding(self, msg: Message, five_tuple: FiveTuple) -> Message:
        # RFC 8489 §6.3.1: answered on every listener, without authentication.
        reply = Message(Method.BINDING, MessageClass.SUCCESS, msg.transaction_id)
        reply.add(Attr.XOR_MAPPED_ADDRESS, five_tuple[1])
        return reply

    # ------------------------------------------------------------------ Allocate

    def _handle_allocate(
        self, msg: Message, auth: _Auth, five_tuple: FiveTuple, now: float, sink: Any
    ) -> Message | bytes:
        existing = self.allocations.get(five_tuple)
        if existing is not None and existing.expires_at > now:
            if existing.transaction_id == msg.transaction_id:
                # RFC 8656 §5, RFC 8489 §6.3.1: a retransmitted Allocate gets the same answer.
                return existing.response
            raise error(437, label="mismatch")  # RFC 8656 §7.2 step 2
        if existing is not None:
            self._end_allocation(existing, "expired", now)
        if self.draining:
            if self.config.alternate_server is not None:
                raise error(300, attributes=[(Attr.ALTERNATE_SERVER, self.config.alternate_server)],
                            label="draining")
            raise error(508, "Server is draining", label="draining")

        transport = msg.get(Attr.REQUESTED_TRANSPORT)
        if transport is None:
            raise error(400, "Missing REQUESTED-TRANSPORT", label="bad_request")
        tcp = transport == REQUESTED_TRANSPORT_TCP and self.tcp_peers is not None and self.config.tcp_relay
        if transport != REQUESTED_TRANSPORT_UDP and not tcp:
            raise error(442, label="bad_request")  # RFC 8656 §7.2 step 3
        if tcp:
            # RFC 6062 §5.1: over TCP or TLS only, and none of the UDP-only attributes.
            if five_tuple[0] == "udp":
                raise error(400, "A TCP allocation needs a TCP or TLS connection", label="bad_request")
            if (Attr.DONT_FRAGMENT in msg or Attr.EVEN_PORT in msg or Attr.RESERVATION_TOKEN in msg
                    or Attr.ADDITIONAL_ADDRESS_FAMILY in msg):
                raise error(400, "Attribute not allowed in a TCP allocation", label="bad_request")
        dont_fragment = Attr.DONT_FRAGMENT in msg
        if dont_fragment and not self.relay_ports.supports_dont_fragment():
            # RFC 8656 §7.2 step 4: an unknown comprehension-required attribute, then.
            raise error(420, attributes=[(Attr.UNKNOWN_ATTRIBUTES, [Attr.DONT_FRAGMENT])],
                        label="bad_request")

        token = msg.get(Attr.RESERVATION_TOKEN)
        even_port = msg.get(Attr.EVEN_PORT)
        requested_family = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)
        additional_family = msg.get(Attr.ADDITIONAL_ADDRESS_FAMILY)
        if token is not None and (even_port is not None or requested_family is not None
                                  or additional_family is not None):
            # RFC 8656 §7.2 step 5
            raise error(400, "RESERVATION-TOKEN with EVEN-PORT or an address family", label="bad_request")
        if requested_family is not None and additional_family is not None:
            # RFC 8656 §7.2 step 6
            raise error(400, "Both REQUESTED- and ADDITIONAL-ADDRESS-FAMILY", label="bad_request")
        if additional_family is not None and additional_family != 2:
            raise error(400, "ADDITIONAL-ADDRESS-FAMILY must be IPv6", label="bad_request")  # step 9
        if additional_family is not None and even_port:
            # RFC 8656 §7.2 step 8
            raise error(400, "EVEN-PORT reservation with a dual allocation", label="bad_request")
        if requested_family is not None and requested_family not in (1, 2):
            raise error(440, label="bad_request")  # RFC 8656 §7.2 step 7

        # Quotas count allocations and EVEN-PORT reservations alike: a reservation holds a
        # port as surely as an allocation does. One held by this user for the token it
        # presents is about to become this allocation, so it is not counted twice.
        quota_key = self.credentials.quota_user(auth.username)
        reserved = self._reservations.get(token) if token is not None else None
        own_reservation = 1 if reserved is not None and reserved[2] == quota_key else 0
        needed = 2 if even_port else 1  # an EVEN-PORT R request reserves a second port
        refused = self.quotas.acquire(quota_key, needed, own_reservation, 1 if reserved is not None else 0,
                                      self.config.user_quota, self.config.max_allocations)
        if refused is not None:
            self.stats.limit_refusals[refused] += 1
            if refused == "user_quota":
                raise error(486, label="quota")  # RFC 8656 §7.2 step 10
            raise error(508, label="capacity")
        try:
            return self._grant_allocation(msg, auth, five_tuple, now, sink, token, even_port,
                                          requested_family, additional_family, dont_fragment,
                                          quota_key, tcp)
        except BaseException:
            self.quotas.release(quota_key, needed)  # counted above, never held
            raise

    def _grant_allocation(self, msg: Message, auth: _Auth, five_tuple: FiveTuple, now: float,
                          sink: Any, token: bytes | None, even_port: Any, requested_family: Any,
                          additional_family: Any, dont_fragment: bool, quota_key: str,
                          tcp: bool = False) -> Message:
        available = self.relay_ports.families()
        relays: list[RelayEndpoint] = []
        response_extra: list[tuple[int, Any]] = []
        new_token: bytes | None = None
        if token is not None:
            entry = self._pop_reservation(token)
            if entry is None or entry[1] <= now:
                if entry is not None:
                    self._release_relay(entry[0])
                # RFC 8656 §7.2 step 5
                raise error(508, "Unknown or expired RESERVATION-TOKEN", label="capacity")
            self._dead_timers += 1  # its reservation entry in the heap
            relays.append(entry[0])
        else:
            family = requested_family or 1
            if family not in available:
                # RFC 8656 §7.2 step 7: without REQUESTED-ADDRESS-FAMILY the allocation is
                # IPv4, so an IPv6-only server answers 440 even to ADDITIONAL-ADDRESS-FAMILY.
                raise error(440, label="family")
            if tcp:
                bound = self.relay_ports.allocate(family, tcp=True)
            else:
                bound = self.relay_ports.allocate(
                    family, even_port=even_port is not None, reserve_next=bool(even_port),
                    dont_fragment=dont_fragment,
                )
            if bound is None:
                raise error(508, label="capacity")  # RFC 8656 §7.2 step 8
            relays.append(bound[0])
            if bound[1] is not None:
                new_token = self.random_bytes(8)
                self._reservations[new_token] = (bound[1], now + RESERVATION_LIFETIME_S, quota_key)
                self._push(now + RESERVATION_LIFETIME_S, "reservation", new_token)
            if additional_family is not None:
                # RFC 8656 §7.2 step 9: the IPv4 allocation stands; ADDRESS-ERROR-CODE says
                # why IPv6 did not come with it.
                if 2 not in available:
                    response_extra.append((Attr.ADDRESS_ERROR_CODE, (2, 440, "Address Family not Supported")))
                else:
                    second = self.relay_ports.allocate(2, dont_fragment=dont_fragment)
                    if second is None:
                        response_extra.append((Attr.ADDRESS_ERROR_CODE, (2, 508, "Insufficient Capacity")))
                    else:
                        relays.append(second[0])

        lifetime = compute_lifetime(msg.get(Attr.LIFETIME), self.config.default_lifetime_s,
                                    self.config.max_lifetime_s)
        allocation = Allocation(five_tuple, sink, auth.username, relays, now, lifetime, msg.transaction_id)
        allocation.quota_key = quota_key
        if tcp:
            allocation.relay_transport = "tcp"
        self._allocation_seq += 1
        allocation.id = f"{self.id_prefix}{self._allocation_seq:x}"
        rate = self.config.allocation_bandwidth_bytes_s
        allocation.up = TokenBucket(rate, now)
        allocation.down = TokenBucket(rate, now)
        self.allocations[five_tuple] = allocation
        for relay in relays:
            self._by_relay[relay] = allocation
        self._schedule_allocation(allocation)
        if self.on_event is not None:
            details: dict[str, Any] = {
                "relayed": [_hostport(self._advertised(r.address)) for r in relays],
                "lifetime_s": lifetime}
            if tcp:
                details["relay_transport"] = "tcp"
            self.on_event(allocation, "created", now, details)
        family_label = "dual" if len(relays) == 2 else FAMILY_NAMES[family_of(relays[0].address[0])]
        self.stats.allocations_created[(five_tuple[0], family_label)] += 1

        reply = Message(Method.ALLOCATE, MessageClass.SUCCESS, msg.transaction_id)
        for relay in relays:
            reply.add(Attr.XOR_RELAYED_ADDRESS, self._advertised(relay.address))
        reply.add(Attr.LIFETIME, lifetime)
        if new_token is not None:
            reply.add(Attr.RESERVATION_TOKEN, new_token)
        for item in response_extra:
            reply.add(*item)
        reply.add(Attr.XOR_MAPPED_ADDRESS, five_tuple[1])
        allocation.response = self._encode_reply(msg, reply, auth)
        return allocation.response

    def _advertised(self, address: Address) -> Address:
        external = self.config.external_addresses.get(canonical_ip(address[0]))
        return (external, address[1]) if external else address

    # ------------------------------------------------------------------ Refresh

    def _handle_refresh(self, msg: Message, auth: _Auth, five_tuple: FiveTuple, now: float) -> Message:
        allocation = self._allocation_for(auth, five_tuple, now)
        requested_family = msg.get(Attr.REQUESTED_ADDRESS_FAMILY)
        if requested_family is not None and requested_family not in allocation.families():
            raise error(443, label="bad_request")  # RFC 8656 §8.2
        requested = msg.get(Attr.LIFETIME)
        if requested == 0:
            # RFC 8656 §8.2: lifetime 0 deletes the allocation at once.
            self._end_allocation(allocation, "deleted", now)
            lifetime = 0
        else:
            lifetime = compute_lifetime(requested, self.config.default_lifetime_s,
                                        self.config.max_lifetime_s)
            allocation.expires_at = now + lifetime
            self._schedule_allocation(allocation)
            if allocation.channels:
                self._sync_fast(allocation)
            if self.on_event is not None:
                self.on_event(allocation, "refreshed", now, {"lifetime_s": lifetime})
        reply = Message(Method.REFRESH, MessageClass.SUCCESS, msg.transaction_id)
        reply.add(Attr.LIFETIME, lifetime)
        return reply

    # ------------------------------------------------------------------ permissions

    def _checked_peer(self, allocation: Allocation, peer: Address,
                      with_port: bool) -> tuple[Address, str | None]:
        """Family and policy checks shared by CreatePermission and ChannelBind: the peer as
        the policy spells it, and whether it is one of the server's own relay addresses."""
        if family_of(peer[0]) not in allocation.families():
            raise error(443, label="bad_request")  # RFC 8656 §10.2, §12.2
        decision = self.policy.check(peer[0], peer[1] if with_port else None)
        ip = decision.ip
        if not decision.allowed or ip is None:
            self.stats.policy_refusals[decision.reason] += 1
            _policy_log.debug("peer %s refused for user %s: %s",
                              _hostport(peer) if with_port else peer[0],
                              _printable(allocation.quota_key), decision.reason)
            phrase = _POLICY_PHRASES.get(decision.reason, f"Peer address not allowed ({decision.reason})")
            raise error(403, phrase, label="policy")
        # The policy's IP: canonical, an external address replaced by its bound relay address.
        return (ip, peer[1]), decision.held_check

    def _room_for_permissions(self, allocation: Allocation, new: int, now: float) -> None:
        """508 unless ``new`` more permissions fit under max_permissions_per_allocation."""
        limit = self.config.max_permissions_per_allocation
        permissions = allocation.permissions
        if not limit or len(permissions) + new <= limit:
            return
        for ip in [ip for ip, expires_at in permissions.items() if expires_at <= now]:
            del permissions[ip]  # expired, its timer has not run yet
        if len(permissions) + new > limit:
            self.stats.limit_refusals["permissions"] += 1
            raise error(508, "Too many permissions", label="permission_limit")

    def _install_permission(self, allocation: Allocation, ip: str, now: float) -> None:
        expires_at = now + PERMISSION_LIFETIME_S
        allocation.permissions[ip] = expires_at
        seen = allocation.peers_seen
        if ip not in seen:
            if len(seen) < _PEERS_SEEN_MAX:
                seen.add(ip)
            else:
                allocation.peers_unlisted += 1
        self._schedule_permission(allocation, ip, expires_at)
        if allocation.channels:
            self._sync_fast(allocation, ip)

    def _handle_create_permission(
        self, msg: Message, auth: _Auth, five_tuple: FiveTuple, now: float
    ) -> Message:
        allocation = self._allocation_for(auth, five_tuple, now)
        peers = msg.get_all(Attr.XOR_PEER_ADDRESS)
        if not peers:
            raise error(400, "Missing XOR-PEER-ADDRESS", label="bad_request")
        limit = self.config.max_permissions_per_allocation
        if limit and len(peers) > limit:
            # More addresses than could ever be installed: refused before any policy work.
            self.stats.limit_refusals["permissions"] += 1
            raise error(508, "Too many permissions", label="permission_limit")
        # RFC 8656 §10.2: every address is checked before any permission is installed.
        targets = {self._checked_peer(allocation, peer, with_port=False)[0][0] for peer in peers}
        self._room_for_permissions(
            allocation, sum(1 for ip in targets if ip not in allocation.permissions), now)
        for ip in targets:
            self._install_permission(allocation, ip, now)
        if self.on_event is not None:
            self.on_event(allocation, "permission", now, {"peers": sorted(targets)})
        return Message(Method.CREATE_PERMISSION, MessageClass.SUCCESS, msg.transaction_id)

    # ------------------------------------------------------------------ TCP allocations (RFC 6062)

    def _new_cid(self) -> int:
        """A CONNECTION-ID no live peer connection has: 24 random bits under cid_base."""
        while True:
            cid = self.cid_base | (int.from_bytes(self.random_bytes(3), "big") or 1)
            if cid not in self._tcp:
                return cid

    def _room_for_connection(self, allocation: Allocation) -> bool:
        limit = self.config.max_tcp_connections_per_allocation
        return not limit or len(allocation.tcp_conns) < limit

    def _add_peer_connection(self, allocation: Allocation, peer: Address, outbound: bool,
                             now: float) -> PeerConnection:
        conn = PeerConnection(self._new_cid(), allocation, peer, outbound, now)
        allocation.tcp_conns[conn.cid] = conn
        allocation.tcp_connections_total += 1
        self._tcp[conn.cid] = conn
        seen = allocation.peers_seen
        if peer[0] not in seen:
            if len(seen) < _PEERS_SEEN_MAX:
                seen.add(peer[0])
            else:
                allocation.peers_unlisted += 1
        return conn

    def _await_bind(self, conn: PeerConnection, now: float) -> None:
        conn.state = PENDING
        conn.timer_at = when = now + BIND_TIMEOUT_S
        self._push(when, "tcp_bind", conn)

    def _drop_peer_connection(self, conn: PeerConnection, *, close: bool) -> None:
        """Forget a peer connection; ``close``: also have the I/O layer close it."""
        if not conn.alive:
            return
        conn.alive = False
        if conn.timer_at is not None:
            conn.timer_at = None
            self._dead_timers += 1
        self._tcp.pop(conn.cid, None)
        conn.allocation.tcp_conns.pop(conn.cid, None)
        if close and self.tcp_peers is not None:
            self.tcp_peers.close(conn.cid)

    def _handle_connect(self, msg: Message, auth: _Auth, five_tuple: FiveTuple, now: float) -> Any:
        """RFC 6062 §5.2: open a TCP connection to a peer; answered once it is open or failed."""
        allocation = self._allocation_for(auth, five_tuple, now)
        if allocation.relay_transport != "tcp":
            raise error(400, "Connect needs a TCP allocation", label="bad_request")
        peer = msg.get(Attr.XOR_PEER_ADDRESS)
        if peer is None:
            raise error(400, "Missing XOR-PEER-ADDRESS", label="bad_request")
        target, _own = self._checked_peer(allocation, peer, with_port=True)
        for other in allocation.tcp_conns.values():
            if other.peer == target:
                # RFC 6062 §5.2: one in progress, pending or active with this peer.
                raise error(446, "Connection Already Exists", label="bad_request")
        if not self._room_for_connection(allocation):
            self.stats.limit_refusals["tcp_connections"] += 1
            raise error(508, "Too many connections", label="connection_limit")
        relay = allocation.relay_for_family(family_of(target[0]))
        assert relay is not None and self.tcp_peers is not None  # _checked_peer: the family
        conn = self._add_peer_connection(allocation, target, True, now)
        conn.reply = (msg.transaction_id, auth, Attr.FINGERPRINT in msg)
        self.tcp_peers.connect(relay, target, conn.cid)
        return _DEFERRED

    def peer_connect_result(self, cid: int, ok: bool, now: float) -> tuple[Any, bytes] | None:
        """The I/O layer's outcome of a Connect's connection attempt: ``(sink, answer)`` to
        write to the control connection, or None when the allocation has gone meanwhile (the
        I/O layer then closes what it opened)."""
        conn = self._tcp.get(cid)
        if conn is None or conn.state != CONNECTING:
            return None
        allocation = conn.allocation
        transaction_id, auth, fingerprint = conn.reply
        conn.reply = None
        request = Message(Method.CONNECT, MessageClass.REQUEST, transaction_id)
        if fingerprint:
            request.add(Attr.FINGERPRINT, 0)
        if ok:
            self._await_bind(conn, now)
            reply = Message(Method.CONNECT, MessageClass.SUCCESS, transaction_id)
            reply.add(Attr.CONNECTION_ID, cid)
            self._count_request(Method.CONNECT, 200)
            self.stats.tcp_connections[("outbound", "connected")] += 1
            return allocation.sink, self._encode_reply(request, reply, auth)
        self._drop_peer_connection(conn, close=False)
        self._count_request(Method.CONNECT, 447)
        self.stats.tcp_connections[("outbound", "failed")] += 1
        # RFC 6062 §5.2: the attempt failed or timed out.
        return allocation.sink, self._error_response(
            request, error(447, "Connection Timeout or Failure", label="bad_request"), auth,
            allocation.five_tuple)

    def peer_connection_arrived(self, relay: RelayEndpoint, peer: Address,
                                now: float) -> tuple[int, Any, bytes] | None:
        """RFC 6062 §5.3: a peer connected to a TCP allocation's relayed address. ``(cid, sink,
        ConnectionAttempt)`` to send to the client, or None: the I/O layer closes it."""
        allocation = self._by_relay.get(relay)
        if allocation is None or allocation.expires_at <= now or allocation.relay_transport != "tcp":
            self.stats.tcp_connections[("inbound", "no_allocation")] += 1
            return None
        ip = canonical_ip(peer[0])
        if allocation.permissions.get(ip, 0.0) <= now:
            self.stats.tcp_connections[("inbound", "no_permission")] += 1
            return None
        if not self._room_for_connection(allocation):
            self.stats.limit_refusals["tcp_connections"] += 1
            self.stats.tcp_connections[("inbound", "limit")] += 1
            return None
        conn = self._add_peer_connection(allocation, (ip, peer[1]), False, now)
        self._await_bind(conn, now)
        self.stats.tcp_connections[("inbound", "connected")] += 1
        external = self.config.external_addresses.get(ip)
        indication = Message(Method.CONNECTION_ATTEMPT, MessageClass.INDICATION, self.random_bytes(12))
        indication.add(Attr.XOR_PEER_ADDRESS, (external, peer[1]) if external else (ip, peer[1]))
        indication.add(Attr.CONNECTION_ID, conn.cid)
        return conn.cid, allocation.sink, encode_message(indication)

    def _handle_connection_bind(self, msg: Message, auth: _Auth, five_tuple: FiveTuple,
                                now: float, sink: Any) -> ConnectionBound:
        """RFC 6062 §5.4: a new client connection asks to carry a peer connection's bytes."""
        if five_tuple[0] == "udp":
            raise error(400, "ConnectionBind needs a TCP or TLS connection", label="bad_request")
        if five_tuple in self.allocations:
            raise error(400, "A control connection cannot be a data connection", label="bad_request")
        cid = msg.get(Attr.CONNECTION_ID)
        conn = self._tcp.get(cid) if cid is not None else None
        if conn is None or conn.state != PENDING or conn.allocation.expires_at <= now:
            raise error(400, "Unknown CONNECTION-ID", label="bad_request")
        allocation = conn.allocation
        if allocation.username != auth.username:
            raise error(441, label="auth")
        conn.state = BOUND
        if conn.timer_at is not None:
            conn.timer_at = None
            self._dead_timers += 1
        self.stats.tcp_connections[(conn.direction, "bound")] += 1
        if self.on_event is not None:
            self.on_event(allocation, "connection", now, {
                "peer": _hostport(conn.peer), "direction": conn.direction, "connection_id": cid})
        reply = Message(Method.CONNECTION_BIND, MessageClass.SUCCESS, msg.transaction_id)
        return ConnectionBound(self._encode_reply(msg, reply, auth), conn)

    def peer_connection_closed(self, cid: int) -> None:
        """The I/O layer's peer connection ``cid`` (or its data connection) closed."""
        conn = self._tcp.get(cid)
        if conn is not None:
            self._drop_peer_connection(conn, close=False)

    @property
    def tcp_connection_states(self) -> dict[str, int]:
        """Peer connections now, by state (connecting, pending, bound), for the metrics."""
        counts = {CONNECTING: 0, PENDING: 0, BOUND: 0}
        for conn in self._tcp.values():
            counts[conn.state] += 1
        return counts

    # ------------------------------------------------------------------ channels

    def _handle_channel_bind(
        self, msg: Message, auth: _Auth, five_tuple: FiveTuple, now: float
    ) -> Message:
        allocation = self._allocation_for(auth, five_tuple, now)
        if allocation.relay_transport == "tcp":
            # RFC 6062 §5: a TCP allocation has no channels.
            raise error(400, "No channels on a TCP allocation", label="bad_request")
        number = msg.get(Attr.CHANNEL_NUMBER)
        peer = msg.get(Attr.XOR_PEER_ADDRESS)
        if number is None or peer is None:
            raise error(400, "Missing CHANNEL-NUMBER or XOR-PEER-ADDRESS", label="bad_request")
        if not CHANNEL_MIN <= number <= self.config.channel_max:
            raise error(400, "Channel number out of range", label="bad_request")  # RFC 8656 §12.2
        target, own = self._checked_peer(allocation, peer, with_port=True)
        bound = allocation.channels.get(number)
        if bound is not None and bound.expires_at > now and bound.peer != target:
            raise error(400, "Channel bound to another peer", label="bad_request")
        other = allocation.peer_channels.get(target)
        if other is not None and other.expires_at > now and other.number != number:
            raise error(400, "Peer bound to another channel", label="bad_request")
        if bound is not None and bound.expires_at <= now:
            self._unbind_channel(allocation, bound)
            bound = None
        if other is not None and other.expires_at <= now and allocation.channels.get(other.number) is other:
            self._unbind_channel(allocation, other)
        expires_at = now + CHANNEL_LIFETIME_S
        if target[0] not in allocation.permissions:
            self._room_for_permissions(allocation, 1, now)
        if bound is None:
            limit = self.config.max_channels_per_allocation
            if limit and len(allocation.channels) >= limit:
                for stale in [c for c in allocation.channels.values() if c.expires_at <= now]:
                    self._unbind_channel(allocation, stale)
                if len(allocation.channels) >= limit:
                    self.stats.limit_refusals["channels"] += 1
                    raise error(508, "Too many channels", label="channel_limit")
            channel = Channel(number, target, expires_at)
            allocation.channels[number] = channel
            allocation.peer_channels[target] = channel
            relay = allocation.relay_for_family(family_of(target[0]))
            assert relay is not None  # _checked_peer made sure of the family
            self._routes[(allocation.five_tuple, number)] = _ChannelRoute(allocation, channel, relay, own)
        else:
            channel = bound
            channel.expires_at = expires_at  # RFC 8656 §12.2: a rebind refreshes
        self._schedule_channel(allocation, channel)
        # RFC 8656 §12.2: binding a channel installs or refreshes the permission too (and
        # with it the expiry of this channel's route, when it has one).
        self._install_permission(allocation, target[0], now)
        if bound is None:
            self._add_fast(self._routes[(allocation.five_tuple, number)])
        if self.on_event is not None:
            self.on_event(allocation, "channel", now, {"channel": number, "peer": _hostport(target)})
        return Message(Method.CHANNEL_BIND, MessageClass.SUCCESS, msg.transaction_id)

    def _unbind_channel(self, allocation: Allocation, channel: Channel) -> None:
        allocation.channels.pop(channel.number, None)
        if allocation.peer_channels.get(channel.peer) is channel:
            del allocation.peer_channels[channel.peer]
        route = self._routes.pop((allocation.five_tuple, channel.number), None)
        if route is not None:
            self._remove_fast(route)
        if channel.timer_at is not None:
            channel.timer_at = None
            self._dead_timers += 1

    # ------------------------------------------------------------------ data paths

    def _handle_send(self, msg: Message, five_tuple: FiveTuple, now: float) -> SendToPeer | None:
        """RFC 8656 §11.2: a Send indication; anything wrong drops it silently."""
        allocation = self.allocations.get(five_tuple)
        if allocation is None or allocation.expires_at <= now:
            self.stats.dropped["no_allocation"] += 1
            return None
        if allocation.relay_transport == "tcp":
            # RFC 6062 §5: data of a TCP allocation goes over its data connections only.
            self.stats.dropped["tcp_allocation"] += 1
            return None
        if msg.unknown_comprehension_required():
            # RFC 8489 §6.3.2: discarded, no answer.
            self.stats.dropped["unknown_attribute"] += 1
            return None
        if Attr.DONT_FRAGMENT in msg and not self.relay_ports.supports_dont_fragment():
            # RFC 8656 §11.2: DONT-FRAGMENT we cannot honour counts as an unknown
            # comprehension-required attribute, so the indication is discarded.
            self.stats.dropped["dont_fragment_unsupported"] += 1
            return None
        peer = msg.get(Attr.XOR_PEER_ADDRESS)
        data = msg.get(Attr.DATA)
        if peer is None or data is None:
            self.stats.dropped["bad_indication"] += 1
            return None
        decision = self.policy.check(peer[0], peer[1])
        ip = decision.ip
        if not decision.allowed or ip is None:
            self.stats.policy_refusals[decision.reason] += 1
            self.stats.dropped["policy"] += 1
            return None
        target = (ip, peer[1])
        if allocation.permissions.get(target[0], 0.0) <= now:
            self.stats.dropped["no_permission"] += 1
            return None
        relay = allocation.relay_for_family(family_of(target[0]))
        if relay is None:
            self.stats.dropped["family_mismatch"] += 1
            return None
        size = len(data)
        if not self._take_up(allocation, size, now):
            return None
        allocation.bytes_to_peer += size
        allocation.packets_to_peer += 1
        return SendToPeer(relay, data, target)

    def _take_up(self, allocation: Allocation, size: int, now: float) -> bool:
        """Bandwidth toward peers for a Send indication: the allocation's bucket, then the
        server's (the ChannelData and peer paths do the same inline)."""
        bucket = allocation.up
        bucket.credit -= size
        if bucket.credit < 0 and not bucket.refill(now, size):
            self.stats.limit_refusals["allocation_bandwidth"] += 1
            return False
        server = self.bandwidth_up
        server.credit -= size
        if server.credit < 0 and not server.refill(now, size):
            bucket.credit += size
            self.stats.limit_refusals["server_bandwidth"] += 1
            return False
        return True

    def handle_channel_data(self, data: bytes, five_tuple: FiveTuple, now: float) -> SendToPeer | None:
        """RFC 8656 §12.4, §12.6: ChannelData from a client (the hot path)."""
        if len(data) < 4:
            self.stats.dropped["malformed"] += 1
            return None
        number, length = _CHANNEL_HEADER.unpack_from(data)
        route = self._routes.get((five_tuple, number))
        if route is None:
            self.stats.dropped["unbound_channel"] += 1
            return None
        channel = route.channel
        allocation = route.allocation
        if channel.expires_at <= now or allocation.expires_at <= now:
            self.stats.dropped["unbound_channel"] += 1
            return None
        if len(data) < 4 + length:
            self.stats.dropped["malformed"] += 1
            return None
        peer = channel.peer
        if allocation.permissions.get(peer[0], 0.0) <= now:
            self.stats.dropped["no_permission"] += 1
            return None
        if route.own is not None and not self.policy.port_held(route.own, peer[1]):
            # A peer on our own relay address whose port we have since released.
            self.stats.policy_refusals["own_port"] += 1
            self.stats.dropped["policy"] += 1
            return None
        # The bandwidth caps, inline: one subtraction and one compare per bucket.
        bucket = allocation.up
        bucket.credit -= length
        if bucket.credit < 0 and not bucket.refill(now, length):
            self.stats.limit_refusals["allocation_bandwidth"] += 1
            return None
        server = self.bandwidth_up
        server.credit -= length
        if server.credit < 0 and not server.refill(now, length):
            bucket.credit += length
            self.stats.limit_refusals["server_bandwidth"] += 1
            return None
        allocation.bytes_to_peer += length
        allocation.packets_to_peer += 1
        return SendToPeer(route.relay, data[4:4 + length], peer)

    def handle_peer_data(
        self, relay: RelayEndpoint, data: bytes, peer: Address, now: float
    ) -> tuple[Any, bytes] | None:
        """RFC 8656 §11.3, §12.7: a datagram from a peer toward the client."""
        allocation = self._by_relay.get(relay)
        if allocation is None or allocation.expires_at <= now:
            self.stats.dropped["no_allocation"] += 1
            return None
        if allocation.permissions.get(peer[0], 0.0) <= now:
            # RFC 8656 §11.3: no permission -> silently discarded.
            self.stats.dropped["no_permission"] += 1
            return None
        size = len(data)
        bucket = allocation.down
        bucket.credit -= size
        if bucket.credit < 0 and not bucket.refill(now, size):
            self.stats.limit_refusals["allocation_bandwidth"] += 1
            return None
        server = self.bandwidth_down
        server.credit -= size
        if server.credit < 0 and not server.refill(now, size):
            bucket.credit += size
            self.stats.limit_refusals["server_bandwidth"] += 1
            return None
        channel = allocation.peer_channels.get(peer)
        if channel is not None and channel.expires_at > now:
            if size > 0xFFFF:
                self.stats.dropped["too_big"] += 1
                return None
            # RFC 8656 §12.5: padded to a multiple of 4 on TCP and TLS.
            frame = encode_channel_data(channel.number, data, pad=allocation.five_tuple[0] != "udp",
                                        max_channel=LEGACY_CHANNEL_MAX)
        else:
            external = self.config.external_addresses.get(peer[0])
            shown = (external, peer[1]) if external else peer
            if size > _DATA_INDICATION_MAX[family_of(shown[0])]:
                self.stats.dropped["too_big"] += 1
                return None
            indication = Message(Method.DATA, MessageClass.INDICATION, self.random_bytes(12))
            indication.add(Attr.XOR_PEER_ADDRESS, shown)
            indication.add(Attr.DATA, data)
            frame = encode_message(indication)
        if allocation.five_tuple[0] == "udp" and len(frame) > _UDP_PAYLOAD_MAX[
                family_of(allocation.five_tuple[1][0])]:
            bucket.credit += size
            server.credit += size
            self.stats.dropped["too_big"] += 1
            return None
        allocation.bytes_to_client += size
        allocation.packets_to_client += 1
        return allocation.sink, frame

    def peer_data_dropped(self, relay: RelayEndpoint, size: int) -> None:
        """The sink dropped what ``handle_peer_data`` just returned for ``relay`` (a full
        write buffer, a send error): take its ``size`` payload bytes back out of the
        allocation's counters, so they count what reached the client's kernel or transport."""
        allocation = self._by_relay.get(relay)
        if allocation is not None:
            allocation.bytes_to_client -= size
            allocation.packets_to_client -= 1

    # ------------------------------------------------------------------ the data plane's routes

    @staticmethod
    def _route_expiry(allocation: Allocation, channel: Channel) -> float:
        """When a route must stop carrying: the first of its channel, its permission and its
        allocation to expire."""
        expires_at = channel.expires_at
        permission = allocation.permissions.get(channel.peer[0], 0.0)
        if permission < expires_at:
            expires_at = permission
        return allocation.expires_at if allocation.expires_at < expires_at else expires_at

    def _add_fast(self, route: _ChannelRoute) -> None:
        routes = self.fast_routes
        if routes is None or route.fast is not None:
            return
        allocation = route.allocation
        channel = route.channel
        held = None
        if route.own is not None:
            # With worker processes, the data plane reads the shared held-port map per packet.
            # Otherwise only a port this process holds: its release is heard here
            # (_release_relay); one held by another process stays with the core's check.
            offset = getattr(self.relay_ports, "held_offset", None)
            held = offset(route.own, channel.peer[1]) if offset is not None else None
            here = getattr(self.relay_ports, "holds_here", None)
            if held is None and here is not None and not here(route.own, channel.peer[1]):
                return
        handle = routes.add(allocation.five_tuple, channel.number, route.relay, channel.peer,
                            self._route_expiry(allocation, channel), allocation.up, allocation.down,
                            held)
        if handle is not None:
            route.fast = handle
            self._fast[handle] = route
            if route.own is not None:
                self._own_fast.setdefault((route.own, channel.peer[1]), []).append(route)

    def _remove_fast(self, route: _ChannelRoute) -> None:
        handle = route.fast
        if handle is None or self.fast_routes is None:
            return
        route.fast = None
        self._fast.pop(handle, None)
        if route.own is not None:
            key = (route.own, route.channel.peer[1])
            held = self._own_fast.get(key)
            if held is not None:
                if route in held:
                    held.remove(route)
                if not held:
                    del self._own_fast[key]
        bytes_up, packets_up, bytes_down, packets_down = self.fast_routes.remove(handle)
        allocation = route.allocation
        allocation.bytes_to_peer += bytes_up
        allocation.packets_to_peer += packets_up
        allocation.bytes_to_client += bytes_down
        allocation.packets_to_client += packets_down

    def _sync_fast(self, allocation: Allocation, ip: str | None = None) -> None:
        """A permission (``ip``), or the allocation's lifetime (``ip`` None), changed: move the
        expiry of the routes it bounds."""
        routes = self.fast_routes
        if routes is None:
            return
        five_tuple = allocation.five_tuple
        for channel in allocation.channels.values():
            if ip is not None and channel.peer[0] != ip:
                continue
            route = self._routes.get((five_tuple, channel.number))
            if route is not None and route.fast is not None:
                routes.set_expiry(route.fast, self._route_expiry(allocation, channel))

    def _release_relay(self, relay: RelayEndpoint) -> None:
        """Close a relay socket. Routes toward its port (from allocations whose peer is this
        very relay address) leave the data plane: once the port is no longer held, the core
        checks it per packet again (``route.own``), as it does for every route it carries."""
        self.relay_ports.release(relay)
        for route in self._own_fast.pop(relay.address, ()):
            self._remove_fast(route)

    def fold_route_counts(self) -> None:
        """Add what the data plane carried since the last call to the allocations' counters,
        and what it failed to send to ``dropped["send_failed"]`` (the metrics call it before
        reading them)."""
        routes = self.fast_routes
        if routes is None:
            return
        failed = routes.take_send_failures()
        if failed:
            self.stats.dropped["send_failed"] += failed
        fast = self._fast
        for handle, bytes_up, packets_up, bytes_down, packets_down in routes.take_counts():
            route = fast.get(handle)
            if route is None:
                continue
            allocation = route.allocation
            allocation.bytes_to_peer += bytes_up
            allocation.packets_to_peer += packets_up
            allocation.bytes_to_client += bytes_down
            allocation.packets_to_client += packets_down

    # ------------------------------------------------------------------ operator control

    def sessions(self, now: float, *, user: str | None = None,
                 client: Callable[[str], bool] | None = None) -> list[dict[str, Any]]:
        """One record per live allocation (turnd admin sessions), optionally only those of a
        user (the whole username or its user part) or of clients ``client(ip)`` accepts."""
        self.fold_route_counts()
        out = []
        for allocation in self._matching(user, client):
            out.append({
                "id": allocation.id,
                "user": allocation.username,
                "transport": allocation.five_tuple[0],
                "client": _hostport(allocation.five_tuple[1]),
                "server": _hostport(allocation.five_tuple[2]),
                "relayed": [_hostport(self._advertised(r.address)) for r in allocation.relays],
                "age_s": round(now - allocation.created_at, 3),
                "expires_in_s": round(allocation.expires_at - now, 3),
                "permissions": sum(1 for t in allocation.permissions.values() if t > now),
                "channels": sum(1 for c in allocation.channels.values() if c.expires_at > now),
                "relay_transport": allocation.relay_transport,
                "tcp_connections": len(allocation.tcp_conns),
                "bytes_to_peer": allocation.bytes_to_peer,
                "packets_to_peer": allocation.packets_to_peer,
                "bytes_to_client": allocation.bytes_to_client,
                "packets_to_client": allocation.packets_to_client,
            })
        return out

    def disconnect(self, now: float, *, user: str | None = None, allocation_id: str | None = None,
                   client: Callable[[str], bool] | None = None) -> int:
        """End the allocations that match every filter given, at once, with the usage reason
        ``disconnected``; how many. With no filter at all, nothing is ended."""
        if user is None and allocation_id is None and client is None:
            return 0
        ended = 0
        for allocation in list(self._matching(user, client)):
            if allocation_id is not None and allocation.id != allocation_id:
                continue
            self._end_allocation(allocation, "disconnected", now)
            ended += 1
        return ended

    def _matching(self, user: str | None, client: Callable[[str], bool] | None) -> list[Allocation]:
        out = []
        for allocation in self.allocations.values():
            if user is not None and user not in (allocation.username, allocation.quota_key):
                continue
            if client is not None and not client(allocation.five_tuple[1][0]):
                continue
            out.append(allocation)
        return out

    # ------------------------------------------------------------------ ending allocations

    def connection_closed(self, five_tuple: FiveTuple, now: float) -> None:
        """A stream client went away: its allocation goes at once (RFC 8656 §7)."""
        allocation = self.allocations.get(five_tuple)
        if allocation is not None:
            self._end_allocation(allocation, "connection_closed", now)

    def shutdown(self, now: float) -> None:
        for allocation in list(self.allocations.values()):
            self._end_allocation(allocation, "shutdown", now)
        for token in list(self._reservations):
            entry = self._pop_reservation(token)
            if entry is not None:
                self._release_relay(entry[0])

    def _end_allocation(self, allocation: Allocation, reason: str, now: float) -> None:
        if not allocation.alive:
            return
        allocation.alive = False
        if self.allocations.get(allocation.five_tuple) is allocation:
            del self.allocations[allocation.five_tuple]
        for number in list(allocation.channels):
            route = self._routes.pop((allocation.five_tuple, number), None)
            if route is not None:
                self._remove_fast(route)  # before its relay socket closes; folds its counts
        for conn in list(allocation.tcp_conns.values()):
            # RFC 6062 §5: a TCP allocation's connections end with it.
            self._drop_peer_connection(conn, close=True)
        for relay in allocation.relays:
            if self._by_relay.get(relay) is allocation:
                del self._by_relay[relay]
            self._release_relay(relay)
        self.quotas.release(allocation.quota_key)
        transport = allocation.five_tuple[0]
        up = self.stats.ended_traffic[("client_to_peer", transport)]
        up[0] += allocation.bytes_to_peer
        up[1] += allocation.packets_to_peer
        down = self.stats.ended_traffic[("peer_to_client", transport)]
        down[0] += allocation.bytes_to_client
        down[1] += allocation.packets_to_client
        self.stats.allocations_ended[reason] += 1
        try:
            if self.on_allocation_end is not None:
                self.on_allocation_end(allocation, reason, now)
        finally:
            # Its heap entries are stale now; what it held goes at once, not at its deadlines.
            self._dead_timers += ((allocation.timer_at is not None) + len(allocation.permission_timers)
                                  + sum(1 for c in allocation.channels.values() if c.timer_at is not None))
            allocation.release_state()
            self._compact_timers()


def _hostport(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _printable(text: str, limit: int = 64) -> str:
    """A client-chosen name made safe for one log line: printable ASCII, bounded."""
    out = "".join(ch if " " < ch < "\x7f" else "?" for ch in text[:limit])
    return out + ("..." if len(text) > limit else "")


def _refusal_reason(exc: TurnError) -> str:
    """Low-cardinality reason for an Allocate that did not succeed."""
    label = exc.label
    if label in ("auth", "quota", "capacity", "family", "draining", "mismatch"):
        return label
    return "bad_request"
