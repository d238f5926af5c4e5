"""TCP relay allocations (RFC 6062): the state the core keeps per peer connection, and what it
needs from the I/O layer to open, accept and close those connections (sans-IO).

A TCP allocation's relayed transport address is a listening TCP socket (``RelayPorts.allocate``
with ``tcp=True``). Each connection with a peer, opened by a Connect request or accepted on
that socket, is a :class:`PeerConnection` with a CONNECTION-ID. It waits for the client's
ConnectionBind on a new TCP/TLS connection, the data connection, for at most
:data:`BIND_TIMEOUT_S`; once bound, the I/O layer copies bytes between the two connections
and adds them to the allocation's counters.
"""

from __future__ import annotations

from typing import Any, Protocol

from .allocation import Address, Allocation, RelayEndpoint

# RFC 6062 §5.2 and §5.3: a peer connection not bound within 30 seconds is closed.
BIND_TIMEOUT_S = 30.0
# RFC 6062 §5.2: a connection attempt toward a peer times out after at least 30 seconds.
CONNECT_TIMEOUT_S = 30.0
# REQUESTED-TRANSPORT for TCP (RFC 6062 §6.2: the IANA protocol number).
REQUESTED_TRANSPORT_TCP = 6

CONNECTING, PENDING, BOUND = "connecting", "pending", "bound"


class PeerConnection:
    """One TCP connection with a peer, of one TCP allocation.

    ``state``: ``connecting`` (a Connect in progress), ``pending`` (waiting for ConnectionBind),
    ``bound`` (spliced to its data connection). ``reply`` keeps what the deferred answer to a
    Connect needs: the request's transaction id, its authentication and whether it had a
    FINGERPRINT.
    """

    __slots__ = ("cid", "allocation", "peer", "outbound", "state", "timer_at", "reply",
                 "created_at", "alive")

    def __init__(self, cid: int, allocation: Allocation, peer: Address, outbound: bool,
                 now: float) -> None:
        self.cid = cid
        self.allocation = allocation
        self.peer = peer
        self.outbound = outbound
        self.state = CONNECTING if outbound else PENDING
        self.timer_at: float | None = None
        self.reply: Any = None
        self.created_at = now
        self.alive = True

    @property
    def direction(self) -> str:
        return "outbound" if self.outbound else "inbound"


class TcpPeers(Protocol):
    """What the core needs from the I/O layer for peer connections (io/tcp_relay.py)."""

    def connect(self, relay: RelayEndpoint, peer: Address, cid: int) -> None:
        """Open a TCP connection from ``relay``'s address to ``peer``; report the outcome
        with ``TurnCore.peer_connect_result(cid, ok, now)``, within CONNECT_TIMEOUT_S."""
        ...

    def close(self, cid: int) -> None:
        """Close the peer connection ``cid`` and its data connection, if it has one. Nothing
        is reported back: the core has already forgotten it."""
        ...
