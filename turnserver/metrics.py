"""Prometheus metrics, the health endpoint and the rate-limited trouble summary.

The relay's hot paths only add to plain integers (turnserver/turn/stats.py and the counters on
each allocation). Everything here reads those integers when someone asks: a custom collector
on the project's own registry turns them into metric families at scrape time, and a tiny
HTTP/1.1 responder on the server's own event loop serves them. Being on the same loop as the
relay, a scrape sees the core between two packets: no lock, no copy, no "dictionary changed
size during iteration".

Labels are low-cardinality by construction (transport, family, direction, reason, method,
code): never a username, a client address or an allocation id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
from collections.abc import Iterator, Mapping
from typing import Any, Callable

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from . import __version__
from .config import format_hostport, parse_hostport

log = logging.getLogger("turnd")

# Text format 0.0.4: what every Prometheus and promtool version reads (the client library's
# "latest" may announce a newer format that older scrapers reject).
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

DEFAULT_TROUBLE_INTERVAL_S = 10.0

# Label values that always appear, at zero if need be, so that rate() and alert rules work
# from the first event instead of from the first scrape after it.
TRANSPORTS = ("udp", "tcp", "tls")
FAMILIES = ("ipv4", "ipv6", "dual")
DIRECTIONS = ("client_to_peer", "peer_to_client")
REFUSAL_REASONS = ("auth", "quota", "capacity", "family", "draining", "bad_request", "mismatch")
END_REASONS = ("expired", "deleted", "connection_closed", "shutdown")
AUTH_FAILURE_REASONS = (
    "unknown_user", "bad_integrity", "stale_nonce", "bad_nonce", "expired_username", "bad_request",
)
DROP_REASONS = (
    "not_stun", "malformed", "unexpected_indication", "unsolicited_response", "bad_indication",
    "no_allocation", "no_permission", "unbound_channel", "policy", "family_mismatch",
    "too_big", "unknown_attribute", "dont_fragment_unsupported", "send_failed", "internal_error",
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
)
# Drops that a healthy relay sees all the time (a peer's packet racing its permission, media
# still in flight when an allocation ends): reported at debug level unless something else moved.
ROUTINE_DROPS = frozenset({"no_permission", "no_allocation", "unbound_channel"})


# ---------------------------------------------------------------------------------- collector


class TurnCollector(Collector):
    """Reads the server's plain counters at scrape time.

    ``server`` is the running :class:`~turnserver.io.server.TurnServer`; only these attributes
    are read, each tolerated absent (a server that has not started): ``core``, ``relays``,
    ``state.listeners``, ``streams`` (io/stream.py's StreamServer, ``None`` without TCP/TLS
    listeners) and ``tls_not_after`` (the served certificate's expiry as a UNIX time, ``None``
    without TLS listeners).
    """

    def __init__(self, server: Any, *, python_version: str | None = None) -> None:
        self.server = server
        self.python_version = python_version or platform.python_version()

    def describe(self) -> list[Metric]:
        # Nothing to declare up front: the registry must not call collect() at register time,
        # when the core does not exist yet.
        return []

    def collect(self) -> Iterator[Metric]:
        server = self.server
        core = getattr(server, "core", None)
        yield from self._build_info()
        yield from self._listeners()
        if core is not None:
            yield from self._core(core)
        yield from self._relay_ports()
        yield from self._streams()
        yield from self._certificate()

    # -- families ---------------------------------------------------------------------

    def _build_info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("turn_build_info", "Always 1; labels give the turnd and Python versions.",
                                 labels=["version", "python"])
        info.add_metric([__version__, self.python_version], 1)
        yield info

    def _listeners(self) -> Iterator[Metric]:
        state = getattr(self.server, "state", None)
        counts = dict.fromkeys(TRANSPORTS, 0)
        for lst in getattr(state, "listeners", ()):
            transport = getattr(lst, "transport", "")
            if transport in counts:
                counts[transport] += 1
        family = GaugeMetricFamily("turn_listeners", "Client listening sockets bound, by transport.",
                                   labels=["transport"])
        for transport, count in counts.items():
            family.add_metric([transport], count)
        yield family

    def _core(self, core: Any) -> Iterator[Metric]:
        stats = core.stats
        current = dict.fromkeys(((t, f) for t in TRANSPORTS for f in FAMILIES), 0)
        permissions = 0
        channels = 0
        # Relayed traffic is counted live: what ended allocations carried plus what the live
        # ones carry so far, so a long call shows up while it lasts, not only at its end.
        traffic: dict[tuple[str, str], list[int]] = {
            (d, t): [0, 0] for d in DIRECTIONS for t in TRANSPORTS
        }
        for key, (nbytes, npackets) in stats.ended_traffic.items():
            entry = traffic.setdefault(key, [0, 0])
            entry[0] += nbytes
            entry[1] += npackets
        # One pass over the live allocations, with as little work each as possible: a scrape
        # runs on the relay's loop, so its cost is a pause for every client.
        live: dict[str, list[int]] = {}
        for allocation in core.allocations.values():
            transport = allocation.five_tuple[0]
            relays = allocation.relays
            if len(relays) == 1:
                fam = "ipv6" if ":" in relays[0].address[0] else "ipv4"
            else:
                fam = "dual" if relays else "ipv4"
            key2 = (transport, fam)
            current[key2] = current.get(key2, 0) + 1
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
            up = traffic.setdefault(("client_to_peer", transport), [0, 0])
            up[0] += up_b
            up[1] += up_p
            down = traffic.setdefault(("peer_to_client", transport), [0, 0])
            down[0] += down_b
            down[1] += down_p

        family = GaugeMetricFamily("turn_allocations", "Allocations alive now, by client transport and "
                                   "relayed address family.", labels=["transport", "family"])
        for (transport, fam), count in sorted(current.items()):
            family.add_metric([transport, fam], count)
        yield family

        created = CounterMetricFamily("turn_allocations_created_total", "Allocations granted, by client "
                                      "transport and relayed address family.", labels=["transport", "family"])
        for (transport, fam), count in _with_zeros(
            stats.allocations_created, [(t, f) for t in TRANSPORTS for f in FAMILIES]
        ):
            created.add_metric([transport, fam], count)
        yield created

        yield _counter("turn_allocations_refused_total",
                       "Allocate requests refused (401 challenges excluded), by reason.",
                       "reason", _with_zeros(stats.allocations_refused, REFUSAL_REASONS))
        yield _counter("turn_allocations_ended_total", "Allocations ended, by reason.",
                       "reason", _with_zeros(stats.allocations_ended, END_REASONS))

        yield GaugeMetricFamily("turn_permissions", "Permissions installed now, over all allocations.",
                                value=permissions)
        yield GaugeMetricFamily("turn_channels", "Channels bound now, over all allocations.",
                                value=channels)

        relayed_bytes = CounterMetricFamily("turn_relayed_bytes_total", "Application data bytes relayed "
                                            "(TURN framing excluded), by direction and client transport.",
                                            labels=["direction", "transport"])
        relayed_packets = CounterMetricFamily("turn_relayed_packets_total", "Datagrams relayed, by "
                                              "direction and client transport.",
                                              labels=["direction", "transport"])
        for (direction, transport), (nbytes, npackets) in sorted(traffic.items()):
            relayed_bytes.add_metric([direction, transport], nbytes)
            relayed_packets.add_metric([direction, transport], npackets)
        yield relayed_bytes
        yield relayed_packets

        requests = CounterMetricFamily("turn_requests_total", "STUN/TURN requests answered, by method and "
                                       "response code (200 for success).", labels=["method", "code"])
        for (method, code), count in sorted(stats.requests.items()):
            requests.add_metric([method, str(code)], count)
        yield requests

        yield _counter("turn_auth_failures_total", "Requests whose long-term credentials failed, by "
                       "reason (the first, unauthenticated request is not a failure).",
                       "reason", _with_zeros(stats.auth_failures, AUTH_FAILURE_REASONS))
        yield _counter("turn_peer_policy_refusals_total", "Peer addresses refused by the peer policy "
                       "(CreatePermission, ChannelBind, Send), by reason.",
                       "reason", _with_zeros(stats.policy_refusals, POLICY_REASONS))
        yield _counter("turn_dropped_packets_total", "Packets dropped without an answer, by reason.",
                       "reason", _with_zeros(stats.dropped, DROP_REASONS))
        limits = dict(stats.limit_refusals)
        streams = getattr(self.server, "streams", None)
        if streams is not None:
            closed = streams.stats.closed
            limits["connections_per_source"] = closed.get("source_limit", 0)
            limits["max_connections"] = closed.get("capacity", 0)
        yield _counter("turn_limit_refusals_total", "Requests refused, answers withheld, packets "
                       "dropped or connections reset because a configured limit was reached, "
                       "by limit.", "limit", _with_zeros(limits, LIMITS))
        yield GaugeMetricFamily("turn_timer_entries", "Entries in the core's deadline heap (live "
                                "and stale); follows the allocations, permissions and channels.",
                                value=getattr(core, "timer_entries", 0))
        yield GaugeMetricFamily("turn_relay_reservations", "EVEN-PORT reservations held now (each "
                                "holds a relay port and counts toward the quotas).",
                                value=getattr(core, "reservation_count", 0))
        yield GaugeMetricFamily("turn_draining", "1 while the server drains (refuses new allocations).",
                                value=1 if getattr(core, "draining", False) else 0)

    def _relay_ports(self) -> Iterator[Metric]:
        relays = getattr(self.server, "relays", None)
        if relays is None:
            return
        yield GaugeMetricFamily("turn_relay_ports_in_use", "Relay sockets bound now (allocations and "
                                "EVEN-PORT reservations).", value=getattr(relays, "open_count", 0))
        yield GaugeMetricFamily("turn_relay_ports_capacity", "Relay ports available in all: the port "
                                "range times the relay addresses.", value=relays.capacity())
        failures = getattr(relays, "bind_failures", None)
        if isinstance(failures, int):
            yield CounterMetricFamily("turn_relay_bind_failures_total", "Relay port binds that failed "
                                      "(port taken by another process, or none left).", value=failures)

    def _streams(self) -> Iterator[Metric]:
        streams = getattr(self.server, "streams", None)
        if streams is None:
            return
        # The stream layer's own plain counters (io/stream.py StreamStats).
        stats = streams.stats
        family = GaugeMetricFamily("turn_stream_connections", "Open TCP and TLS client connections.",
                                   labels=["transport"])
        for transport, count in _with_zeros(stats.open, ("tcp", "tls")):
            family.add_metric([transport], count)
        yield family
        yield _counter("turn_stream_connections_accepted_total", "TCP and TLS connections accepted, "
                       "by the kind of listener.", "transport", _with_zeros(stats.accepted, ("tcp", "tls")))
        yield _counter("turn_stream_connections_closed_total", "TCP and TLS connections closed, by "
                       "reason.", "reason", sorted(stats.closed.items()))
        yield CounterMetricFamily("turn_stream_plain_on_tls_total", "Plain TCP clients accepted on a "
                                  "TLS listener (first-byte detection).", value=stats.plain_on_tls)
        yield CounterMetricFamily("turn_stream_write_dropped_messages_total", "Messages toward slow "
                                  "TCP/TLS clients dropped because their write buffer was full.",
                                  value=stats.dropped_messages)
        yield CounterMetricFamily("turn_stream_write_dropped_bytes_total", "Bytes of the messages "
                                  "counted in turn_stream_write_dropped_messages_total.",
                                  value=stats.dropped_bytes)
        yield CounterMetricFamily("turn_stream_read_pauses_total", "Times a TCP/TLS connection "
                                  "stopped reading because its client did not read its replies.",
                                  value=stats.read_pauses)
        tls = streams.tls
        if tls is not None:
            yield _counter("turn_tls_reloads_total", "Reloads (SIGHUP) of the TLS certificate and key, "
                           "by result.", "result", [("failed", tls.reloads_failed), ("ok", tls.reloads_ok)])

    def _certificate(self) -> Iterator[Metric]:
        # TurnServer.tls_not_after: io/tls.py TlsCertificates knows the served certificate,
        # the in-memory self-signed one and a reloaded one included.
        not_after = getattr(self.server, "tls_not_after", None)
        if not_after is None:
            return
        yield GaugeMetricFamily("turn_tls_certificate_not_after_timestamp_seconds",
                                "Expiry (notAfter) of the TLS listeners' certificate, UNIX time.",
                                value=float(not_after))


def _with_zeros(values: Mapping[Any, int], known: Any) -> list[tuple[Any, int]]:
    merged = dict.fromkeys(known, 0)
    merged.update(values)
    return sorted(merged.items())


def _counter(name: str, doc: str, label: str, items: list[tuple[str, int]]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=[label])
    for value, count in items:
        family.add_metric([str(value)], count)
    return family


def build_registry(server: Any, *, process: bool = True) -> CollectorRegistry:
    """The project's own registry (never the global one): relay metrics plus process metrics."""
    registry = CollectorRegistry()
    registry.register(TurnCollector(server))
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
    return registry


# ---------------------------------------------------------------------------------- HTTP


_MAX_HEAD_BYTES = 8192
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            408: "Request Timeout", 500: "Internal Server Error", 503: "Service Unavailable"}


class MetricsEndpoint:
    """A minimal HTTP/1.1 responder for ``/metrics`` and ``/health`` on the running loop.

    One request per connection (``Connection: close``): Prometheus and probes open few
    connections, and it keeps the parser small. Heads are bounded in size and time, and so is
    the number of connections served at once, so a misbehaving client costs little.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        health: Callable[[], tuple[int, str]],
        *,
        max_connections: int = 32,
        read_timeout_s: float = 5.0,
    ) -> None:
        self.registry = registry
        self.health = health
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.address: tuple[str, int] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._accept, host, port, limit=_MAX_HEAD_BYTES)
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        return self.address

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        try:
            await asyncio.wait_for(server.wait_closed(), timeout=2.0)
        except (asyncio.TimeoutError, OSError):
            pass

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._tasks) >= self.max_connections:
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.read_timeout_s)
            except asyncio.TimeoutError:
                await self._respond(writer, "GET", 408, b"timeout\n")
                return
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                await self._respond(writer, "GET", 400, b"bad request\n")
                return
            method, status, body, content_type, extra = self.route(head)
            await self._respond(writer, method, status, body, content_type, extra)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # the endpoint must outlive any one request
            log.exception("metrics endpoint request failed")
        finally:
            writer.close()

    def route(self, head: bytes) -> tuple[str, int, bytes, str, dict[str, str]]:
        """(method, status, body, content type, extra headers) for one request head."""
        plain = "text/plain; charset=utf-8"
        try:
            request_line = head.split(b"\r\n", 1)[0].decode("ascii")
            method, target, version = request_line.split(" ")
        except (UnicodeDecodeError, ValueError):
            return "GET", 400, b"bad request\n", plain, {}
        if not version.startswith("HTTP/1."):
            return "GET", 400, b"bad request\n", plain, {}
        path = target.split("?", 1)[0]
        if path not in ("/metrics", "/health", "/healthz"):
            return method, 404, b"not found: try /metrics or /health\n", plain, {}
        if method not in ("GET", "HEAD"):
            return method, 405, b"method not allowed\n", plain, {"Allow": "GET, HEAD"}
        if path == "/metrics":
            try:
                body = generate_latest(self.registry)
            except Exception:
                log.exception("collecting metrics failed")
                return method, 500, b"collecting metrics failed\n", plain, {}
            return method, 200, body, METRICS_CONTENT_TYPE, {}
        status, text = self.health()
        return method, status, f"{text}\n".encode(), plain, {"Cache-Control": "no-store"}

    async def _respond(self, writer: asyncio.StreamWriter, method: str, status: int, body: bytes,
                       content_type: str = "text/plain; charset=utf-8",
                       extra: dict[str, str] | None = None) -> None:
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        lines.extend(f"{k}: {v}" for k, v in (extra or {}).items())
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
        if method != "HEAD":
            writer.write(body)
        await writer.drain()


# ---------------------------------------------------------------------------------- trouble


class TroubleReporter:
    """Rate-limits warnings: compares the core's refusal and drop counters between checks and
    logs one line summarising what moved, instead of one line per packet or request.

    ``stats`` returns the core's CoreStats (or ``None`` before the core exists).
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
    """What the server starts and stops for operators: the metrics/health endpoint and the
    periodic trouble summary. Owned by :class:`~turnserver.io.server.TurnServer`."""

    def __init__(self, server: Any, *, trouble_interval_s: float = DEFAULT_TROUBLE_INTERVAL_S) -> None:
        self.server = server
        self.trouble_interval_s = trouble_interval_s
        self.registry = build_registry(server)
        self.endpoint: MetricsEndpoint | None = None
        self.serving = False
        self._trouble: TroubleReporter | None = None
        self._trouble_task: asyncio.Task[None] | None = None

    def health(self) -> tuple[int, str]:
        """200 "ok" only while the listeners are up and new allocations are taken.

        A draining server still relays its allocations but answers 503 "draining", so a load
        balancer sends new clients elsewhere; before start and after stop: 503 "down".
        """
        core = getattr(self.server, "core", None)
        if not self.serving or core is None:
            return 503, "down"
        if getattr(core, "draining", False):
            return 503, "draining"
        return 200, "ok"

    async def start(self) -> None:
        spec = getattr(self.server.config, "metrics_listen", "")
        if spec:
            host, port = parse_hostport(spec, "metrics_listen")
            endpoint = MetricsEndpoint(self.registry, self.health)
            try:
                address = await endpoint.start(host, port)
            except OSError as exc:
                # Named like the listeners' errors, and with the option to change.
                reason = os.strerror(exc.errno) if exc.errno else str(exc)
                raise OSError(exc.errno, f"metrics_listen {format_hostport(host, port)}: "
                                         f"{reason}") from None
            self.endpoint = endpoint
            log.info("metrics on http://%s/metrics, health on /health", format_hostport(*address))
        self._trouble = TroubleReporter(lambda: getattr(getattr(self.server, "core", None), "stats", None))
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

