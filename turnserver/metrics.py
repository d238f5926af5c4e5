"""Prometheus metrics from server snapshots, the health verdict and the trouble summary.

The relay's hot paths only add to plain integers (turnserver/turn/stats.py and the counters on
each allocation). Nothing here reads the server itself: at scrape time a custom collector on
the project's own registry calls a *snapshot source*, which returns one
:class:`~turnserver.snapshot.ServerSnapshot` (a single process: turnserver/io/snapshot.py's
``take_snapshot``, run on the relay's own loop, so it sees the core between two packets: no
lock, no "dictionary changed size during iteration") or a list of them (one per worker
process, added up here), and turns it into metric families. turnserver/io/http.py serves them.

Labels are low-cardinality by construction (transport, family, direction, reason, method,
code, and the worker slot on the two per-worker families): never a username, a client address
or an allocation id.
"""

from __future__ import annotations

import asyncio
import logging
import platform
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Callable

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .io.http import METRICS_CONTENT_TYPE, MetricsEndpoint, start_endpoint
from .io.snapshot import take_snapshot
from .snapshot import ServerSnapshot, SnapshotSource, as_list, merge

__all__ = [
    "METRICS_CONTENT_TYPE", "MetricsEndpoint", "Observability", "TroubleReporter", "TurnCollector",
    "build_registry",
]

log = logging.getLogger("turnd")

DEFAULT_TROUBLE_INTERVAL_S = 10.0

# Label values that always appear, at zero if need be, so that rate() and alert rules work
# from the first event instead of from the first scrape after it.
TRANSPORTS = ("udp", "tcp", "tls")
FAMILIES = ("ipv4", "ipv6", "dual")
DIRECTIONS = ("client_to_peer", "peer_to_client")
REFUSAL_REASONS = ("auth", "quota", "capacity", "family", "draining", "bad_request", "mismatch")
END_REASONS = ("expired", "deleted", "connection_closed", "shutdown", "disconnected")
AUTH_FAILURE_REASONS = (
    "unknown_user", "bad_integrity", "stale_nonce", "bad_nonce", "expired_username", "bad_request",
)
DROP_REASONS = (
    "not_stun", "malformed", "unexpected_indication", "unsolicited_response", "bad_indication",
    "no_allocation", "no_permission", "unbound_channel", "policy", "family_mismatch",
    "too_big", "unknown_attribute", "dont_fragment_unsupported", "send_failed", "internal_error",
    "tcp_allocation",
)
# The peer policy's reasons (turnserver/policy.py), exported at zero from the start.
POLICY_REASONS = (
    "own_port", "own_address", "loopback", "private", "cgnat", "link_local", "multicast",
    "broadcast", "unspecified", "reserved", "documentation", "site_local", "ula", "denied_cidr",
    "invalid", "invalid_port",
)
# Every limit that can refuse something (requests, answers, packets, connections).
LIMITS = (
    "user_quota", "max_allocations", "permissions", "channels", "allocation_bandwidth",
    "server_bandwidth", "challenge_rate", "connections_per_source", "max_connections",
    "tcp_connections",
)
# RFC 6062 peer connections: what can happen to one, by direction; and the states of open ones.
TCP_DIRECTIONS = ("outbound", "inbound")
TCP_RESULTS = ("connected", "failed", "bound", "bind_timeout", "no_permission", "no_allocation",
               "limit")
TCP_STATES = ("connecting", "pending", "bound")
# Drops that a healthy relay sees all the time (a peer's packet racing its permission, media
# still in flight when an allocation ends): reported at debug level unless something else moved.
ROUTINE_DROPS = frozenset({"no_permission", "no_allocation", "unbound_channel"})

_ALLOCATION_KEYS = [(t, f) for t in TRANSPORTS for f in FAMILIES]
_TRAFFIC_KEYS = [(d, t) for d in DIRECTIONS for t in TRANSPORTS]


# ---------------------------------------------------------------------------------- collector


class TurnCollector(Collector):
    """Turns what ``snapshot`` returns into metric families at scrape time.

    ``snapshot`` returns one :class:`~turnserver.snapshot.ServerSnapshot` or a list of them
    (one per worker), which are added up (:func:`~turnserver.snapshot.merge`). The families and
    their labels are the same either way; when there is more than one snapshot, or the
    snapshots name their worker, two families more give each worker's share, labelled
    ``worker``: ``turn_worker_allocations`` and ``turn_worker_cpu_seconds_total``.
    """

    def __init__(self, snapshot: SnapshotSource, *, python_version: str | None = None) -> None:
        self.snapshot = snapshot
        self.python_version = python_version or platform.python_version()

    def describe(self) -> list[Metric]:
        # Nothing to declare up front: the registry must not call collect() at register time,
        # when the server has not started yet.
        return []

    def collect(self) -> Iterator[Metric]:
        snapshots = as_list(self.snapshot())
        total = snapshots[0] if len(snapshots) == 1 else merge(snapshots)
        yield from self._build_info()
        yield self._listeners(total)
        if total.has_core:
            yield from self._core(total)
        if total.has_relay_ports:
            yield from self._relay_ports(total)
        if total.has_streams:
            yield from self._streams(total)
        if total.tls_not_after is not None:
            yield GaugeMetricFamily("turn_tls_certificate_not_after_timestamp_seconds",
                                    "Expiry (notAfter) of the TLS listeners' certificate, UNIX time.",
                                    value=float(total.tls_not_after))
        if len(snapshots) > 1 or any(s.worker is not None for s in snapshots):
            yield from self._workers(snapshots)

    # -- families ---------------------------------------------------------------------

    def _build_info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("turn_build_info", "Always 1; labels give the turnd and Python versions.",
                                 labels=["version", "python"])
        info.add_metric([__version__, self.python_version], 1)
        yield info

    def _listeners(self, snap: ServerSnapshot) -> Metric:
        counts = dict.fromkeys(TRANSPORTS, 0)
        for transport, count in snap.listeners.items():
            if transport in counts:
                counts[transport] += count
        family = GaugeMetricFamily("turn_listeners", "Client listening sockets bound, by transport.",
                                   labels=["transport"])
        for transport, count in counts.items():
            family.add_metric([transport], count)
        return family

    def _core(self, snap: ServerSnapshot) -> Iterator[Metric]:
        family = GaugeMetricFamily("turn_allocations", "Allocations alive now, by client transport and "
                                   "relayed address family.", labels=["transport", "family"])
        for (transport, fam), count in _with_zeros(snap.allocations, _ALLOCATION_KEYS):
            family.add_metric([transport, fam], count)
        yield family

        created = CounterMetricFamily("turn_allocations_created_total", "Allocations granted, by client "
                                      "transport and relayed address family.", labels=["transport", "family"])
        for (transport, fam), count in _with_zeros(snap.allocations_created, _ALLOCATION_KEYS):
            created.add_metric([transport, fam], count)
        yield created

        yield _counter("turn_allocations_refused_total",
                       "Allocate requests refused (401 challenges excluded), by reason.",
                       "reason", _with_zeros(snap.allocations_refused, REFUSAL_REASONS))
        yield _counter("turn_allocations_ended_total", "Allocations ended, by reason.",
                       "reason", _with_zeros(snap.allocations_ended, END_REASONS))

        yield GaugeMetricFamily("turn_permissions", "Permissions installed now, over all allocations.",
                                value=snap.permissions)
        yield GaugeMetricFamily("turn_channels", "Channels bound now, over all allocations.",
                                value=snap.channels)

        relayed_bytes = CounterMetricFamily("turn_relayed_bytes_total", "Application data bytes relayed "
                                            "(TURN framing excluded), by direction and client transport.",
                                            labels=["direction", "transport"])
        for (direction, transport), nbytes in _with_zeros(snap.relayed_bytes, _TRAFFIC_KEYS):
            relayed_bytes.add_metric([direction, transport], nbytes)
        yield relayed_bytes
        relayed_packets = CounterMetricFamily("turn_relayed_packets_total", "Datagrams relayed, by "
                                              "direction and client transport.",
                                              labels=["direction", "transport"])
        for (direction, transport), npackets in _with_zeros(snap.relayed_packets, _TRAFFIC_KEYS):
            relayed_packets.add_metric([direction, transport], npackets)
        yield relayed_packets

        requests = CounterMetricFamily("turn_requests_total", "STUN/TURN requests answered, by method and "
                                       "response code (200 for success).", labels=["method", "code"])
        for (method, code), count in sorted(snap.requests.items()):
            requests.add_metric([method, str(code)], count)
        yield requests

        yield _counter("turn_auth_failures_total", "Requests whose long-term credentials failed, by "
                       "reason (the first, unauthenticated request is not a failure).",
                       "reason", _with_zeros(snap.auth_failures, AUTH_FAILURE_REASONS))
        yield _counter("turn_peer_policy_refusals_total", "Peer addresses refused by the peer policy "
                       "(CreatePermission, ChannelBind, Send), by reason.",
                       "reason", _with_zeros(snap.policy_refusals, POLICY_REASONS))
        yield _counter("turn_dropped_packets_total", "Packets dropped without an answer, by reason.",
                       "reason", _with_zeros(snap.dropped, DROP_REASONS))
        yield _counter("turn_limit_refusals_total", "Requests refused, answers withheld, packets "
                       "dropped or connections reset because a configured limit was reached, "
                       "by limit.", "limit", _with_zeros(snap.limit_refusals, LIMITS))
        yield GaugeMetricFamily("turn_timer_entries", "Entries in the core's deadline heap (live "
                                "and stale); follows the allocations, permissions and channels.",
                                value=snap.timer_entries)
        tcp_total = CounterMetricFamily(
            "turn_tcp_peer_connections_total", "TCP allocations' peer connections (RFC 6062), by "
            "direction (outbound: a Connect; inbound: a peer connecting in) and what became of "
            "them: connected, failed (447), bound (ConnectionBind), bind_timeout (no "
            "ConnectionBind in 30 s), no_permission, no_allocation, limit (refused inbound).",
            labels=["direction", "result"])
        for (direction, result), count in _with_zeros(
                snap.tcp_connections, [(d, r) for d in TCP_DIRECTIONS for r in TCP_RESULTS]):
            tcp_total.add_metric([direction, result], count)
        yield tcp_total
        yield _gauge("turn_tcp_peer_connections", "TCP allocations' peer connections open now, by "
                     "state: connecting, pending (waiting for ConnectionBind), bound.", "state",
                     _with_zeros(snap.tcp_connection_states, TCP_STATES))
        yield GaugeMetricFamily("turn_relay_reservations", "EVEN-PORT reservations held now (each "
                                "holds a relay port and counts toward the quotas).",
                                value=snap.reservations)
        yield GaugeMetricFamily("turn_draining", "1 while the server drains (refuses new allocations).",
                                value=1 if snap.draining else 0)

    def _relay_ports(self, snap: ServerSnapshot) -> Iterator[Metric]:
        yield GaugeMetricFamily("turn_relay_ports_in_use", "Relay sockets bound now (allocations and "
                                "EVEN-PORT reservations).", value=snap.relay_ports_in_use)
        yield GaugeMetricFamily("turn_relay_ports_capacity", "Relay ports available in all: the port "
                                "range times the relay addresses.", value=snap.relay_ports_capacity)
        yield CounterMetricFamily("turn_relay_bind_failures_total", "Relay port binds that failed "
                                  "(port taken by another process, or none left).",
                                  value=snap.relay_bind_failures)

    def _streams(self, snap: ServerSnapshot) -> Iterator[Metric]:
        family = GaugeMetricFamily("turn_stream_connections", "Open TCP and TLS client connections.",
                                   labels=["transport"])
        for transport, count in _with_zeros(snap.stream_open, ("tcp", "tls")):
            family.add_metric([transport], count)
        yield family
        yield _counter("turn_stream_connections_accepted_total", "TCP and TLS connections accepted, "
                       "by the kind of listener.", "transport",
                       _with_zeros(snap.stream_accepted, ("tcp", "tls")))
        yield _counter("turn_stream_connections_closed_total", "TCP and TLS connections closed, by "
                       "reason.", "reason", sorted(snap.stream_closed.items()))
        yield _counter("turn_stream_handoffs_total", "RFC 6062 data connections whose "
                       "ConnectionBind named another worker's peer connection, handed to that "
                       "worker, by transport (tls: bridged by the worker that holds the session).",
                       "transport", _with_zeros(snap.stream_handed_over, ("tcp", "tls")))
        yield CounterMetricFamily("turn_stream_plain_on_tls_total", "Plain TCP clients accepted on a "
                                  "TLS listener (first-byte detection).", value=snap.stream_plain_on_tls)
        yield CounterMetricFamily("turn_stream_write_dropped_messages_total", "Messages toward slow "
                                  "TCP/TLS clients dropped because their write buffer was full.",
                                  value=snap.stream_dropped_messages)
        yield CounterMetricFamily("turn_stream_write_dropped_bytes_total", "Bytes of the messages "
                                  "counted in turn_stream_write_dropped_messages_total.",
                                  value=snap.stream_dropped_bytes)
        yield CounterMetricFamily("turn_stream_read_pauses_total", "Times a TCP/TLS connection "
                                  "stopped reading because its client did not read its replies.",
                                  value=snap.stream_read_pauses)
        if snap.has_tls:
            yield _counter("turn_tls_reloads_total", "Reloads (SIGHUP) of the TLS certificate and key, "
                           "by result.", "result",
                           [("failed", snap.tls_reloads_failed), ("ok", snap.tls_reloads_ok)])

    def _workers(self, snapshots: Sequence[ServerSnapshot]) -> Iterator[Metric]:
        allocations = GaugeMetricFamily("turn_worker_allocations", "Allocations alive now in each "
                                        "worker process.", labels=["worker"])
        cpu = CounterMetricFamily("turn_worker_cpu_seconds_total", "CPU time (user and system) used by "
                                  "each worker process, earlier processes in its slot included.",
                                  labels=["worker"])
        for index, snap in enumerate(snapshots):
            worker = str(snap.worker if snap.worker is not None else index)
            allocations.add_metric([worker], sum(snap.allocations.values()))
            cpu.add_metric([worker], snap.cpu_seconds)
        yield allocations
        yield cpu


def _with_zeros(values: Mapping[Any, int], known: Any) -> list[tuple[Any, int]]:
    merged = dict.fromkeys(known, 0)
    merged.update(values)
    return sorted(merged.items())


def _counter(name: str, doc: str, label: str, items: list[tuple[str, int]]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, count in items:
        family.add_metric([str(value)], count)
    return family


def _gauge(name: str, doc: str, label: str, items: list[tuple[str, int]]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for value, count in items:
        family.add_metric([str(value)], count)
    return family


def build_registry(source: SnapshotSource | Any, *, process: bool = True) -> CollectorRegistry:
    """The project's own registry (never the global one): relay metrics plus, with ``process``,
    this process's own metrics.

    ``source`` is a snapshot source (a callable returning one snapshot or a list of them), or a
    running :class:`~turnserver.io.server.TurnServer`, read with ``take_snapshot``.
    """
    snapshot: SnapshotSource = source if callable(source) else (lambda: take_snapshot(source))
    registry = CollectorRegistry()
    registry.register(TurnCollector(snapshot))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


# ---------------------------------------------------------------------------------- trouble


class TroubleReporter:
    """Rate-limits warnings: compares the core's refusal and drop counters between checks and
    logs one line summarising what moved, instead of one line per packet or request.

    ``stats`` returns the core's CoreStats, or a ServerSnapshot (which names these counters
    alike), or ``None`` before the core exists.
    """

    WATCHED = ("dropped", "policy_refusals", "auth_failures", "allocations_refused", "limit_refusals")

    def __init__(self, stats: Callable[[], Any], logger: logging.Logger | None = None) -> None:
        self.stats = stats
        self.logger = logger or log
        self._last: dict[str, dict[str, int]] = {name: {} for name in self.WATCHED}
        self._primed = False
        self._prime()

    def _snapshot(self) -> dict[str, dict[str, int]] | None:
        stats = self.stats()
        if stats is None:
            return None
        return {name: {str(k): int(v) for k, v in getattr(stats, name, {}).items()}
                for name in self.WATCHED}

    def _prime(self) -> None:
        snap = self._snapshot()
        if snap is not None:
            self._last = snap
            self._primed = True

    def check(self, interval_s: float) -> dict[str, dict[str, int]] | None:
        """Log what moved since the last check; returns the deltas (``None`` when nothing did)."""
        snap = self._snapshot()
        if snap is None:
            return None
        if not self._primed:
            # The core appeared after this reporter: count from here, not from its past.
            self._last, self._primed = snap, True
            return None
        moved: dict[str, dict[str, int]] = {}
        for name in self.WATCHED:
            before = self._last.get(name, {})
            deltas = {k: v - before.get(k, 0) for k, v in snap[name].items() if v > before.get(k, 0)}
            if deltas:
                moved[name] = dict(sorted(deltas.items()))
        self._last = snap
        if not moved:
            return None
        routine = set(moved) == {"dropped"} and set(moved["dropped"]) <= ROUTINE_DROPS
        # The counts travel as structured fields: key=value pairs in text, an object in JSON.
        self.logger.log(
            logging.DEBUG if routine else logging.WARNING,
            "%s in the last %.0f s:",
            "routine drops" if routine else "refusals and drops",
            interval_s,
            extra={"trouble": moved},
        )
        return moved


# ---------------------------------------------------------------------------------- glue


class Observability:
    """What a serving process starts and stops for operators: the metrics/health endpoint and
    the periodic trouble summary.

    Owned by :class:`~turnserver.io.server.TurnServer` as ``Observability(server)``: the metrics
    come from ``take_snapshot(server)``, health and the trouble summary from its core, the
    address from its ``metrics_listen``. Without a server (a parent serving the sum of its
    workers), ``snapshot_source`` returns the snapshots (say, one per worker) and
    ``metrics_listen`` says where to serve them; health and the trouble summary then follow the
    snapshots too.
    """

    def __init__(
        self,
        server: Any = None,
        *,
        snapshot_source: SnapshotSource | None = None,
        metrics_listen: str | None = None,
        trouble_interval_s: float = DEFAULT_TROUBLE_INTERVAL_S,
        refresh: Any = None,
        trouble: bool = True,
    ) -> None:
        if snapshot_source is None:
            if server is None:
                raise TypeError("Observability needs a server or a snapshot_source")
            snapshot_source = lambda: take_snapshot(server)  # noqa: E731
        self.server = server
        self.snapshot_source = snapshot_source
        self.metrics_listen = metrics_listen
        self.trouble_interval_s = trouble_interval_s
        self.refresh = refresh  # awaited before each scrape, when given
        # The periodic trouble summary; a parent of workers leaves it to them (each logs its own).
        self.trouble = trouble
        self.registry = build_registry(snapshot_source)
        self.endpoint: MetricsEndpoint | None = None
        self.serving = False
        self._trouble: TroubleReporter | None = None
        self._trouble_task: asyncio.Task[None] | None = None

    def health(self) -> tuple[int, str]:
        """200 "ok" only while the listeners are up and new allocations are taken.

        A draining server still relays its allocations but answers 503 "draining", so a load
        balancer sends new clients elsewhere; before start and after stop: 503 "down" (and
        without a server, while the snapshot source has no running core to show).
        """
        if not self.serving:
            return 503, "down"
        if self.server is not None:
            core = getattr(self.server, "core", None)
            if core is None:
                return 503, "down"
            draining = bool(getattr(core, "draining", False))
        else:
            total = merge(as_list(self.snapshot_source()))
            if not total.has_core:
                return 503, "down"
            draining = total.draining
        return (503, "draining") if draining else (200, "ok")

    def _trouble_stats(self) -> Any:
        if self.server is not None:
            return getattr(getattr(self.server, "core", None), "stats", None)
        # A snapshot names its counters as CoreStats does.
        total = merge(as_list(self.snapshot_source()))
        return total if total.has_core else None

    async def start(self) -> None:
        spec = self.metrics_listen
        if spec is None:
            spec = getattr(getattr(self.server, "config", None), "metrics_listen", "")
        if spec:
            self.endpoint = await start_endpoint(spec, self.registry, self.health, self.refresh)
        if self.trouble:
            self._trouble = TroubleReporter(self._trouble_stats)
            self._trouble_task = asyncio.get_running_loop().create_task(self._trouble_loop())
        self.serving = True

    async def stop(self) -> None:
        self.serving = False
        task, self._trouble_task = self._trouble_task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._trouble is not None:
            # Whatever moved since the last summary is still worth a line.
            self._trouble.check(self.trouble_interval_s)
        endpoint, self.endpoint = self.endpoint, None
        if endpoint is not None:
            await endpoint.stop()

    async def _trouble_loop(self) -> None:
        while True:
            await asyncio.sleep(self.trouble_interval_s)
            try:
                assert self._trouble is not None
                self._trouble.check(self.trouble_interval_s)
            except Exception:
                log.exception("trouble summary failed")

    def ready_entries(self) -> list[dict[str, Any]]:
        """The endpoint as a ready-file listener entry (transport "metrics")."""
        if self.endpoint is None or self.endpoint.address is None:
            return []
        host, port = self.endpoint.address
        return [{"transport": "metrics", "host": host, "port": port}]
