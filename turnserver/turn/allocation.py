"""Allocation state (RFC 8656 §6): relayed addresses, permissions, channels, usage counters.

Plain objects with ``__slots__``; the core keeps lookup dicts keyed both ways so the
per-packet paths are dictionary hits, never scans.
"""

from __future__ import annotations

from typing import Any, Protocol

from .limits import TokenBucket

# RFC 8656 §9 and §12: fixed lifetimes of a permission and of a channel binding.
PERMISSION_LIFETIME_S = 300.0
CHANNEL_LIFETIME_S = 600.0
# RFC 8656 §7.2: the server "MUST hold this reservation for at least 30 seconds".
RESERVATION_LIFETIME_S = 30.0

# A client's 5-tuple: (transport, client (ip, port), server (ip, port)).
# transport is "udp", "tcp" or "tls"; TLS and TCP both use stream framing.
FiveTuple = tuple[str, tuple[str, int], tuple[str, int]]
Address = tuple[str, int]


class RelayEndpoint(Protocol):
    """A bound relay socket, owned by the I/O layer. The core only reads its address."""

    address: Address  # the bound (local) relay transport address

    def __hash__(self) -> int: ...


class RelayPorts(Protocol):
    """What the core needs from the I/O layer to give an allocation its relayed addresses."""

    def families(self) -> set[int]:
        """Address families (1 IPv4, 2 IPv6) that have at least one relay address."""
        ...

    def allocate(
        self, family: int, *, even_port: bool = False, reserve_next: bool = False,
        dont_fragment: bool = False, tcp: bool = False,
    ) -> tuple[RelayEndpoint, RelayEndpoint | None] | None:
        """Bind a relay socket of ``family``; with ``reserve_next`` also bind port+1 (the
        reservation); with ``tcp`` a listening TCP socket (RFC 6062) instead, its port held
        as a UDP relay port is. ``None`` when no port could be bound (508)."""
        ...

    def release(self, endpoint: RelayEndpoint) -> None:
        """Close a relay socket."""
        ...

    def supports_dont_fragment(self) -> bool: ...


class Channel:
    __slots__ = ("number", "peer", "expires_at", "timer_at")

    def __init__(self, number: int, peer: Address, expires_at: float) -> None:
        self.number = number
        self.peer = peer
        self.expires_at = expires_at
        self.timer_at: float | None = None  # the core's deadline heap entry, when it has one


class Allocation:
    """One allocation. ``relays`` holds one endpoint, or two for a dual-stack allocation."""

    __slots__ = (
        "five_tuple", "sink", "username", "relays", "created_at", "expires_at", "transaction_id",
        "response", "permissions", "channels", "peer_channels", "peers_seen", "peers_unlisted",
        "bytes_to_peer", "packets_to_peer", "bytes_to_client", "packets_to_client",
        "alive", "timer_at", "permission_timers", "quota_key", "up", "down", "id",
        "relay_transport", "tcp_conns", "tcp_connections_total",
    )

    def __init__(
        self,
        five_tuple: FiveTuple,
        sink: Any,
        username: str,
        relays: list[RelayEndpoint],
        created_at: float,
        lifetime_s: int,
        transaction_id: bytes,
    ) -> None:
        self.five_tuple = five_tuple
        self.sink = sink  # opaque to the core: the I/O layer's way back to the client
        self.username = username  # every later request must authenticate as this user (RFC 8656 §5)
        self.relays = relays
        self.created_at = created_at
        self.expires_at = created_at + lifetime_s
        self.transaction_id = transaction_id
        self.response: bytes = b""  # the success response, replayed on a retransmitted Allocate
        self.permissions: dict[str, float] = {}  # peer IP -> expires_at
        self.channels: dict[int, Channel] = {}  # channel number -> Channel
        self.peer_channels: dict[Address, Channel] = {}  # peer address -> Channel
        self.peers_seen: set[str] = set()  # distinct peer IPs with a permission, for the usage record
        self.peers_unlisted = 0  # new peer IPs past the size limit of peers_seen, only counted
        self.bytes_to_peer = 0
        self.packets_to_peer = 0
        self.bytes_to_client = 0
        self.packets_to_client = 0
        self.alive = True
        # The core's deadline heap holds one entry per allocation and per permission, at the
        # time recorded here (see TurnCore.handle_timer).
        self.timer_at: float | None = None
        self.permission_timers: dict[str, float] = {}  # peer IP -> time of its heap entry
        self.quota_key = username  # what user_quota counts: the user part of a REST username
        self.id = ""  # set by the core: how an operator names it (turnd admin)
        # Relayed bytes per second toward the peers and toward the client (the core sets them).
        self.up = TokenBucket(0, created_at)
        self.down = TokenBucket(0, created_at)
        # "udp", or "tcp" for an RFC 6062 allocation: its peer connections by CONNECTION-ID
        # (turnserver/turn/tcp.py), and how many it has had.
        self.relay_transport = "udp"
        self.tcp_conns: dict[int, Any] = {}
        self.tcp_connections_total = 0

    @property
    def peer_count(self) -> int:
        """Distinct peer IPs this allocation had a permission for."""
        return len(self.peers_seen) + self.peers_unlisted

    def release_state(self) -> None:
        """Drop what an ended allocation holds (permissions, channels, the sink), so that
        whatever still refers to it keeps a small object alive, not its tables."""
        self.sink = None
        self.response = b""
        self.permissions = {}
        self.channels = {}
        self.peer_channels = {}
        self.permission_timers = {}
        self.peers_seen = set()
        self.tcp_conns = {}

    @property
    def transport(self) -> str:
        return self.five_tuple[0]

    @property
    def client_address(self) -> Address:
        return self.five_tuple[1]

    def families(self) -> set[int]:
        return {family_of(r.address[0]) for r in self.relays}

    def relay_for_family(self, family: int) -> RelayEndpoint | None:
        for relay in self.relays:
            if family_of(relay.address[0]) == family:
                return relay
        return None


def family_of(ip: str) -> int:
    """1 for IPv4, 2 for IPv6: the STUN address family numbers."""
    return 2 if ":" in ip else 1


def compute_lifetime(requested: int | None, default_s: int, max_s: int) -> int:
    """RFC 8656 §7.2 / §8.2: the "desired lifetime".

    Absent LIFETIME gives the default; otherwise min(requested, max), raised to the default
    when lower. (A requested 0 on Refresh is handled by the caller: it deletes.)
    """
    if requested is None:
        return default_s
    return max(min(requested, max_s), default_s)
