"""Plain integer counters kept by the core and read at scrape time.

Nothing here takes a lock: the per-packet path only adds to ints and dict entries, and the
metrics collector sums them when Prometheus asks (see turnserver/metrics.py).
"""

from __future__ import annotations

from collections import defaultdict


class CoreStats:
    __slots__ = (
        "allocations_created", "allocations_refused", "allocations_ended", "requests",
        "auth_failures", "policy_refusals", "dropped", "ended_traffic", "limit_refusals",
        "tcp_connections",
    )

    def __init__(self) -> None:
        # (client transport, family "ipv4"/"ipv6"/"dual") -> count
        self.allocations_created: defaultdict[tuple[str, str], int] = defaultdict(int)
        # reason: auth, quota, capacity, policy, draining, bad_request, mismatch, ...
        self.allocations_refused: defaultdict[str, int] = defaultdict(int)
        # reason: expired, deleted, connection_closed, shutdown
        self.allocations_ended: defaultdict[str, int] = defaultdict(int)
        # (method name, result code; 200 for success) -> count
        self.requests: defaultdict[tuple[str, int], int] = defaultdict(int)
        # reason: unknown_user, bad_integrity, stale_nonce, expired_username, bad_request
        self.auth_failures: defaultdict[str, int] = defaultdict(int)
        # the policy's reason label -> count: peers refused in CreatePermission, ChannelBind and
        # Send, and permissions and channels removed because a reloaded policy refuses them
        self.policy_refusals: defaultdict[str, int] = defaultdict(int)
        # reason -> count of packets dropped, e.g. malformed, no_permission, policy, too_big
        # (a peer datagram no Data indication can carry), unknown_attribute and
        # dont_fragment_unsupported (Send indications RFC 8489 §6.3.2 / RFC 8656 §11.2 discard)
        self.dropped: defaultdict[str, int] = defaultdict(int)
        # (direction "client_to_peer"/"peer_to_client", transport) -> [bytes, packets] of
        # allocations that have ended; live allocations are summed at scrape time.
        self.ended_traffic: defaultdict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
        # limit -> refusals it caused: requests refused (permissions, channels, user_quota,
        # max_allocations), answers withheld (challenge_rate) and packets dropped
        # (allocation_bandwidth, server_bandwidth)
        self.limit_refusals: defaultdict[str, int] = defaultdict(int)
        # RFC 6062 peer connections: (direction "outbound"/"inbound", result) -> count, result
        # one of connected, failed (447), bound, bind_timeout, no_permission, no_allocation,
        # limit
        self.tcp_connections: defaultdict[tuple[str, str], int] = defaultdict(int)
