"""take_snapshot: the running server's counters as a :class:`~turnserver.snapshot.ServerSnapshot`.

The one place that knows where each number lives: the core's CoreStats and live allocations
(turnserver/turn), the relay port pool (io/relay.py), the stream layer's StreamStats and TLS
certificates (io/stream.py, io/tls.py) and the process itself. It runs on the relay's event
loop, between two packets, so it reads without locks or copies of the core's structures, and
it keeps its work to one pass over the live allocations: a snapshot's cost is a pause for
every client.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from ..snapshot import ServerSnapshot

if TYPE_CHECKING:
    from .server import TurnServer

try:
    _PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
except (AttributeError, ValueError, OSError):
    _PAGE_BYTES = 4096


def take_snapshot(server: TurnServer | Any, worker: int | None = None) -> ServerSnapshot:
    """The server's counters and gauges now. ``worker`` names the worker slot of a server run
    as one of several processes (None for a single-process server).

    Read: ``core``, ``relays``, ``state.listeners``, ``streams`` and ``tls_not_after``; those a
    server that has not started yet lacks (or holds as None) leave their part out.
    """
    core = getattr(server, "core", None)
    # FOLD: the core's data-plane counters (kept per channel route) join the allocations first.
    fold = getattr(core, "fold_route_counts", None)
    if fold is not None:
        fold()
    snap = ServerSnapshot(worker=worker, pid=os.getpid())
    _listeners(snap, getattr(getattr(server, "state", None), "listeners", ()))
    streams = getattr(server, "streams", None)
    if core is not None:
        _core(snap, core, streams)
    relays = getattr(server, "relays", None)
    if relays is not None:
        snap.has_relay_ports = True
        snap.relay_ports_in_use = relays.open_count
        snap.relay_ports_capacity = relays.capacity()
        snap.relay_bind_failures = relays.bind_failures
    if streams is not None:
        _streams(snap, streams)
    not_after = getattr(server, "tls_not_after", None)
    snap.tls_not_after = float(not_after) if not_after is not None else None
    snap.cpu_seconds, snap.resident_memory_bytes = process_usage()
    return snap


def _listeners(snap: ServerSnapshot, listeners: Any) -> None:
    counts = snap.listeners
    for lst in listeners:
        counts[lst.transport] = counts.get(lst.transport, 0) + 1


def _core(snap: ServerSnapshot, core: Any, streams: Any) -> None:
    stats = core.stats
    snap.has_core = True
    allocations = snap.allocations
    permissions = 0
    channels = 0
    # Relayed traffic is counted live: what ended allocations carried plus what the live ones
    # carry so far, so a long call shows up while it lasts, not only at its end.
    relayed_bytes = snap.relayed_bytes
    relayed_packets = snap.relayed_packets
    for key, (nbytes, npackets) in stats.ended_traffic.items():
        relayed_bytes[key] = relayed_bytes.get(key, 0) + nbytes
        relayed_packets[key] = relayed_packets.get(key, 0) + npackets
    # One pass over the live allocations, with as little work each as possible.
    live: dict[str, list[int]] = {}
    for allocation in core.allocations.values():
        transport = allocation.five_tuple[0]
        relays = allocation.relays
        if len(relays) == 1:
            family = "ipv6" if ":" in relays[0].address[0] else "ipv4"
        else:
            family = "dual" if relays else "ipv4"
        key = (transport, family)
        allocations[key] = allocations.get(key, 0) + 1
        # Expired permissions and channels leave these dicts at their deadline (the core's
        # timer heap), so their sizes are the live counts.
        permissions += len(allocation.permissions)
        channels += len(allocation.channels)
        sums = live.get(transport)
        if sums is None:
            sums = live[transport] = [0, 0, 0, 0]
        sums[0] += allocation.bytes_to_peer
        sums[1] += allocation.packets_to_peer
        sums[2] += allocation.bytes_to_client
        sums[3] += allocation.packets_to_client
    for transport, (up_b, up_p, down_b, down_p) in live.items():
        up = ("client_to_peer", transport)
        down = ("peer_to_client", transport)
        relayed_bytes[up] = relayed_bytes.get(up, 0) + up_b
        relayed_packets[up] = relayed_packets.get(up, 0) + up_p
        relayed_bytes[down] = relayed_bytes.get(down, 0) + down_b
        relayed_packets[down] = relayed_packets.get(down, 0) + down_p
    snap.permissions = permissions
    snap.channels = channels
    snap.allocations_created = dict(stats.allocations_created)
    snap.allocations_refused = dict(stats.allocations_refused)
    snap.allocations_ended = dict(stats.allocations_ended)
    snap.requests = dict(stats.requests)
    snap.auth_failures = dict(stats.auth_failures)
    snap.policy_refusals = dict(stats.policy_refusals)
    snap.dropped = dict(stats.dropped)
    limits = dict(stats.limit_refusals)
    if streams is not None:
        # The stream layer refuses connections itself; its limits are counted with the core's.
        closed = streams.stats.closed
        limits["connections_per_source"] = closed.get("source_limit", 0)
        limits["max_connections"] = closed.get("capacity", 0)
    snap.limit_refusals = limits
    snap.timer_entries = core.timer_entries
    snap.tcp_connections = dict(stats.tcp_connections)
    snap.tcp_connection_states = core.tcp_connection_states
    snap.reservations = core.reservation_count
    snap.draining = bool(core.draining)


def _streams(snap: ServerSnapshot, streams: Any) -> None:
    stats = streams.stats
    snap.has_streams = True
    snap.stream_open = dict(stats.open)
    snap.stream_accepted = dict(stats.accepted)
    snap.stream_closed = dict(stats.closed)
    snap.stream_plain_on_tls = stats.plain_on_tls
    snap.stream_dropped_messages = stats.dropped_messages
    snap.stream_dropped_bytes = stats.dropped_bytes
    snap.stream_read_pauses = stats.read_pauses
    snap.stream_handed_over = dict(stats.handed_over)
    tls = streams.tls
    if tls is not None:
        snap.has_tls = True
        snap.tls_reloads_ok = tls.reloads_ok
        snap.tls_reloads_failed = tls.reloads_failed


def process_usage() -> tuple[float, int]:
    """(CPU seconds, user and system, and resident memory bytes) of this process: one
    ``times`` call and one read of ``/proc/self/statm`` (0 bytes where there is none)."""
    times = os.times()
    try:
        with open("/proc/self/statm", "rb") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        resident_pages = 0
    return times.user + times.system, resident_pages * _PAGE_BYTES
