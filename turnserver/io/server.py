"""The daemon: binds listeners and relays around the sans-IO core and runs them on one loop.

Everything that touches sockets, the clock or the event loop for the relay lives here and in
its sibling modules (dispatch.py for the per-packet data paths, relay.py for relay ports,
stream.py for TCP/TLS). The TURN logic is in turnserver/turn and never sees a socket.

The UDP listeners and the relay sockets are watched and drained by the data plane
(io/datapath.py: the compiled turnserver/_datapath.c, or its pure-Python twin). It carries
ChannelData on the routes the core installed itself; every other datagram from a client comes
to ``_client_datagram`` here, which hands it to ``dispatch.client_message`` and returns the
reply for the data plane to send, and every other peer datagram goes to
``dispatch.peer_datagram``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable

from ..addresses import canonical_ip
from ..auth import CredentialStore, NonceManager
from ..config import Config, format_hostport, parse_hostport, reload_plan
from ..metrics import Observability
from ..policy import PeerPolicy
from ..turn.allocation import Address, Allocation
from ..turn.core import CoreConfig, TurnCore
from .datapath import IMPLEMENTATION, CoreRoutes, DataPlane
from .dispatch import SinkFor, UdpSink, client_message, peer_datagram
from .interfaces import host_addresses
from .relay import RelayPortPool, detect_relay_addresses
from .stream import StreamServer
from .tcp_relay import TcpPeers
from .tls import TlsCertificates, certificate_names
from .usage_log import UsageLog

log = logging.getLogger("turnd")
usage_log = logging.getLogger("turnd.usage")

_LISTENER_BUFFER_BYTES = 4 * 1024 * 1024


@dataclass
class Listener:
    transport: str  # "udp", "tcp" or "tls"
    address: Address  # the bound address (real port when 0 was asked)
    sock: socket.socket | None = None  # UDP only; StreamServer owns the TCP/TLS listeners


@dataclass
class RuntimeState:
    """What start-up derived from the configuration (for tests, probes and the ready file)."""

    relay_addresses: list[str] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)


@dataclass
class WorkerSetup:
    """What a worker process gets from its parent (io/supervisor.py) instead of binding and
    deciding alone: its inherited listening sockets, its slice of the relay port range, the
    nonce key every worker shares, and the shared quota ledger and held-port map."""

    index: int
    listen_sockets: list[tuple[str, socket.socket]]
    relay_port_slice: tuple[int, int]
    nonce_key: bytes
    quotas: Any
    held_ports: Any
    parent_listening: list[tuple[str, int]] = field(default_factory=list)
    # The parent's self-signed certificate and key (PEM), when TLS has no configured files.
    self_signed: tuple[bytes, bytes] | None = None
    # The hand-over channel to the parent: RFC 6062 data connections for other workers, and
    # how many workers there are.
    handoff: socket.socket | None = None
    count: int = 1


@dataclass
class ReloadReport:
    """What a reload did: options now in force, options that wait for a restart."""

    applied: list[str]
    needs_restart: list[str]
    tls_reloaded: bool | None = None  # None: no TLS listener


def bind_udp(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """A bound UDP listener; ``reuse_port``: one of a SO_REUSEPORT group (a socket per worker
    process, the kernel choosing one by a hash of the client's address)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # So that "0.0.0.0:3478" and "[::]:3478" can both be bound.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, _LISTENER_BUFFER_BYTES)
            except OSError:
                pass
        sock.setblocking(False)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise named_socket_error(exc, "udp", host, port) from None
    return sock


def named_socket_error(exc: OSError, transport: str, host: str, port: int) -> OSError:
    """The same error, its text naming the socket: "udp 0.0.0.0:3478: Address already in use"."""
    return OSError(exc.errno, f"{transport} {format_hostport(host, port)}: "
                              f"{exc.strerror or exc}")


# Descriptors beyond relay sockets and connections: listeners, the metrics endpoint, logs,
# the event loop's own, the interface enumeration.
_FD_SLACK = 64


def descriptors_needed(config: Config, relay_addresses: list[str]) -> int:
    """File descriptors the limits can take at once: a relay socket per allocation and per
    reservation (two for a dual-stack allocation), a socket per TCP/TLS connection, and with
    TCP allocations (each made on a TCP/TLS connection) a listener per allocation and a peer
    connection per data connection."""
    ports = (config.relay_port_max - config.relay_port_min + 1) * max(1, len(relay_addresses))
    families = len({":" in ip for ip in relay_addresses}) or 1
    relays = min(config.max_allocations * families, ports) if config.max_allocations else ports
    streams = config.max_connections if (config.listen_tcp or config.listen_tls) else 0
    if config.tcp_relay:
        streams *= 3
    listeners = len(config.listen_udp) + len(config.listen_tcp) + len(config.listen_tls)
    return relays + streams + listeners + _FD_SLACK


def fit_descriptor_limit(needed: int) -> str | None:
    """Raise RLIMIT_NOFILE's soft limit to ``needed``, up to the hard limit; a warning naming
    the options when they cannot fit, else None."""
    try:
        import resource
    except ImportError:  # not a Unix
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass
    if soft != resource.RLIM_INFINITY and soft < needed:
        return (f"the file descriptor limit is {soft}, but max_allocations, max_connections and "
                f"the relay port range can take {needed}: lower them, or raise LimitNOFILE= "
                f"(the hard limit is {'unlimited' if hard == resource.RLIM_INFINITY else hard}); "
                "past the limit new allocations get 508 and new connections are refused")
    return None


def external_map(config: Config, relay_addresses: list[str]) -> dict[str, str]:
    """Bound relay IP -> advertised external IP, from ``external_addresses``."""
    external: dict[str, str] = {}
    for item in config.external_addresses:
        if "=" in item:
            ext, bound = item.split("=", 1)
            external[canonical_ip(bound.strip())] = canonical_ip(ext.strip())
        elif relay_addresses:
            external[relay_addresses[0]] = canonical_ip(item.strip())
    return external


def core_config_from(config: Config, relay_addresses: list[str]) -> CoreConfig:
    alternate = None
    if config.alternate_server:
        alternate = parse_hostport(config.alternate_server, "alternate_server")
    return CoreConfig(
        realm=config.realm,
        software=config.software,
        default_lifetime_s=config.default_lifetime_s,
        max_lifetime_s=config.max_lifetime_s,
        max_allocations=config.max_allocations,
        user_quota=config.user_quota,
        max_permissions_per_allocation=config.max_permissions_per_allocation,
        max_channels_per_allocation=config.max_channels_per_allocation,
        allocation_bandwidth_bytes_s=config.allocation_bandwidth_bytes_s,
        server_bandwidth_bytes_s=config.server_bandwidth_bytes_s,
        challenge_rate_per_source=config.challenge_rate_per_source,
        challenge_burst_per_source=config.challenge_burst_per_source,
        allow_refresh_after_expiry=config.allow_refresh_after_expiry,
        external_addresses=external_map(config, relay_addresses),
        alternate_server=alternate,
        legacy_channel_numbers=config.legacy_channel_numbers,
        tcp_relay=config.tcp_relay,
        max_tcp_connections_per_allocation=config.max_tcp_connections_per_allocation,
    )


class TurnServer:
    """Owns the core, the listeners and the relay ports; one per process."""

    def __init__(
        self,
        config: Config,
        *,
        secrets: list[bytes],
        static_users: dict[str, str | bytes] | None = None,
        wall_clock: Callable[[], float] = time.time,
        random_bytes: Callable[[int], bytes] = os.urandom,
        worker: WorkerSetup | None = None,
    ) -> None:
        self.config = config
        # Set in a worker process (io/worker.py): inherited sockets, its relay port slice and
        # the state it shares with the other workers.
        self.worker = worker
        self.secrets = secrets
        self.static_users = static_users or {}
        self.wall_clock = wall_clock
        self.random_bytes = random_bytes
        self.state = RuntimeState()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.core: TurnCore | None = None
        self.relays: RelayPortPool | None = None
        # The data plane: watches the UDP listeners and relay sockets, carries bound channels.
        self.plane: Any = None
        self.routes: CoreRoutes | None = None
        # TCP/TLS listeners, connections and their counters; None without stream listeners.
        self.streams: StreamServer | None = None
        self.tcp_peers: TcpPeers | None = None
        self.handoff: Any = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        # Metrics/health endpoint and the rate-limited trouble summary (turnserver/metrics.py).
        self.observability = Observability(self)
        # The hash-chained audit log (usage_log_file), when configured.
        self.usage_log: UsageLog | None = None

    # ------------------------------------------------------------------ assembly

    def _listening_pairs(self) -> list[tuple[str, int]]:
        """Every port the server listens on, the metrics endpoint's included: never a peer."""
        pairs = [(lst.address[0], lst.address[1]) for lst in self.state.listeners]
        if self.worker is not None:
            pairs += self.worker.parent_listening  # the parent's metrics endpoint
        for entry in self.observability.ready_entries():
            pairs.append((entry["host"], int(entry["port"])))
        return pairs

    def build_policy(self, config: Config) -> PeerPolicy:
        """The peer policy for ``config``; reads the host's interface addresses afresh (a
        wildcard listener receives on all of them), so a reload sees new ones."""
        external = external_map(config, self.state.relay_addresses)
        relays = self.relays
        return PeerPolicy(
            allow=config.allowed_peers,
            deny=config.denied_peers,
            relay_addresses=self.state.relay_addresses,
            external_addresses={ext: bound for bound, ext in external.items()},
            relay_port_range=(config.relay_port_min, config.relay_port_max),
            listening=self._listening_pairs(),
            host_addresses=host_addresses(),
            port_held=relays.holds if relays is not None else None,
        )

    def build_credentials(self, config: Config) -> CredentialStore:
        return CredentialStore(
            realm=config.realm, secrets=self.secrets, static_users=self.static_users,
            wall_clock=self.wall_clock,
        )

    async def start(self) -> None:
        config = self.config
        self.loop = loop = asyncio.get_running_loop()
        # Kept as written when IPv4-mapped: each is bound as given (an IPv6 socket for "::ffff:…").
        self.state.relay_addresses = [canonical_ip(a.strip(), keep_mapped=True)
                                      for a in config.relay_addresses] or detect_relay_addresses()
        warning = fit_descriptor_limit(descriptors_needed(config, self.state.relay_addresses))
        if warning is not None:
            log.warning("%s", warning)
        # The data plane's callbacks need the core, built below; nothing reaches them before
        # the plane is started, once the listeners are bound.
        self.plane = plane = DataPlane(loop, self._client_datagram, self._peer_datagram)
        self.routes = CoreRoutes(plane)
        worker = self.worker
        port_range = worker.relay_port_slice if worker is not None else (
            config.relay_port_min, config.relay_port_max)
        self.relays = RelayPortPool(
            loop, self.state.relay_addresses, port_range, plane,
            shared_held=worker.held_ports if worker is not None else None,
        )
        # Kept so a reload that changes nonce_lifetime_s keeps every nonce already handed out
        # valid; a worker's comes from the parent, so every worker accepts every nonce.
        self._nonce_key = worker.nonce_key if worker is not None else self.random_bytes(32)
        # The core exists before any listener serves, so no early client finds it missing.
        self.core = TurnCore(
            config=core_config_from(config, self.state.relay_addresses),
            credentials=self.build_credentials(config),
            nonces=NonceManager(
                key=self._nonce_key, lifetime_s=config.nonce_lifetime_s,
                wall_clock=self.wall_clock,
            ),
            policy=self.build_policy(config),
            relay_ports=self.relays,
            random_bytes=self.random_bytes,
            on_allocation_end=self._on_allocation_end,
        )
        self.core.fast_routes = self.routes
        if config.usage_log_file:
            path = config.usage_log_file + (f".w{worker.index}" if worker is not None else "")
            self.usage_log = UsageLog(path, max_bytes=config.usage_log_max_bytes,
                                      rotate_s=config.usage_log_rotate_s,
                                      flush_s=config.usage_log_flush_s,
                                      worker=worker.index if worker is not None else None,
                                      wall_clock=self.wall_clock)
            try:
                self.usage_log.open()
            except OSError as exc:
                raise OSError(exc.errno, f"usage_log_file {path}: {exc.strerror or exc}") from None
            self.usage_log.start(loop)
            self.core.on_event = self._on_allocation_event
        if worker is not None:
            self.core.quotas = worker.quotas
            # CONNECTION-IDs name their worker (io/handoff.py).
            self.core.cid_base = ((worker.index + 1) & 0xFF) << 24
            plane.set_shared(worker.held_ports.memory.map)
        plane.set_server_buckets(self.core.bandwidth_up, self.core.bandwidth_down)
        try:
            if worker is not None:
                for transport, sock in worker.listen_sockets:
                    if transport == "udp":
                        bound = sock.getsockname()
                        self.state.listeners.append(Listener("udp", (bound[0], bound[1]), sock=sock))
            else:
                for spec in config.listen_udp:
                    host, port = parse_hostport(spec, "listen_udp")
                    sock = bind_udp(host, port)
                    bound = sock.getsockname()
                    self.state.listeners.append(Listener("udp", (bound[0], bound[1]), sock=sock))
            await self._start_streams()
            # The policy keeps peers off every listening port: rebuilt once all are bound.
            self.core.reconfigure(policy=self.build_policy(config))
            for lst in self.state.listeners:
                if lst.transport == "udp" and lst.sock is not None:
                    plane.add_listener(lst.sock, (lst.address, partial(UdpSink, lst.sock)))
                    self.routes.listeners[lst.address] = lst.sock
                log.info("listening %s %s", lst.transport, format_hostport(*lst.address))
            plane.start()
            log.info("relaying on %s, ports %d-%d (data path: %s)", ", ".join(self.state.relay_addresses),
                     port_range[0], port_range[1], IMPLEMENTATION)
            await self.observability.start()
            # Once more with the metrics port bound: it is never a peer either.
            self.core.reconfigure(policy=self.build_policy(config))
        except BaseException:
            self._close_all()
            raise

    async def _start_streams(self) -> None:
        """TCP and TLS listeners (turnserver/io/stream.py, turnserver/io/tls.py)."""
        config = self.config
        if not (config.listen_tcp or config.listen_tls) or self.loop is None:
            return
        tls = None
        if config.listen_tls:
            tls = TlsCertificates.from_config(
                config.tls_cert_file, config.tls_key_file,
                names=certificate_names(config, self.state.relay_addresses),
                self_signed=self.worker.self_signed if self.worker is not None else None,
            )
        self.streams = streams = StreamServer(
            self.loop, get_config=lambda: self.config, get_core=lambda: self.core,
            on_stun=self._arm_timer, tls=tls,
        )
        # RFC 6062 TCP allocations are made over TCP and TLS connections only.
        self.tcp_peers = tcp_peers = TcpPeers(
            self.loop, get_core=lambda: self.core, on_change=self._arm_timer,
            get_write_limit=lambda: self.config.stream_write_buffer_bytes)
        streams.tcp_peers = tcp_peers
        if self.relays is not None:
            self.relays.on_tcp_listen = tcp_peers.listen
            self.relays.on_tcp_close = tcp_peers.unlisten
        if self.core is not None:
            self.core.tcp_peers = tcp_peers
        if self.worker is not None and self.worker.handoff is not None:
            from .handoff import Handoff

            self.handoff = Handoff(self.loop, self.worker.handoff, self.worker.index,
                                   self.worker.count, streams)
            streams.handoff = self.handoff
        if self.worker is not None:
            for kind, sock in self.worker.listen_sockets:
                if kind in ("tcp", "tls"):
                    _, bound = await streams.serve_socket(kind, sock)
                    self.state.listeners.append(Listener(kind, bound))
            return
        for kind, specs in (("tcp", config.listen_tcp), ("tls", config.listen_tls)):
            for spec in specs:
                host, port = parse_hostport(spec, f"listen_{kind}")
                _, bound = await streams.listen(kind, host, port)
                self.state.listeners.append(Listener(kind, bound))

    def reload_tls(self, config: Config) -> None:
        """Re-read the TLS certificate and key (SIGHUP): new handshakes use them, established
        connections keep theirs. Raises TlsError and keeps serving the old certificate when
        the new one cannot be loaded."""
        if self.streams is not None:
            self.streams.reload_tls(config, certificate_names(config, self.state.relay_addresses))

    @property
    def tls_not_after(self) -> float | None:
        """Expiry (Unix time) of the certificate the TLS listeners serve, for metrics."""
        return self.streams.tls_certificate_not_after() if self.streams is not None else None

    def _close_listeners(self) -> None:
        for lst in self.state.listeners:
            if lst.sock is not None:
                if self.plane is not None and lst.sock.fileno() >= 0:
                    try:
                        self.plane.remove_listener(lst.sock)
                    except (ValueError, OSError):
                        pass
                if self.routes is not None:
                    self.routes.listeners.pop(lst.address, None)
                lst.sock.close()

    def ready_info(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "listeners": [
                {"transport": lst.transport, "host": lst.address[0], "port": lst.address[1]}
                for lst in self.state.listeners
            ] + self.observability.ready_entries(),
            "relay_addresses": self.state.relay_addresses,
        }

    def _close_all(self) -> None:
        """Listeners, then allocations (their usage records), then stream connections."""
        if self._timer is not None:
            self._timer.cancel()
        self._close_listeners()
        if self.core is not None and self.loop is not None:
            self.core.shutdown(self.loop.time())
        if self.tcp_peers is not None:
            self.tcp_peers.shutdown()
        if self.handoff is not None:
            self.handoff.close()
        if self.plane is not None:
            self.plane.close()
        if self.streams is not None:
            self.streams.close()
            self.streams.close_connections()

    async def stop(self) -> None:
        self._close_all()
        if self.usage_log is not None:
            await self.usage_log.close()  # after shutdown: every allocation's end is in it
        # After shutdown, so its usage records and a last trouble summary are logged.
        await self.observability.stop()

    def reload(self, new_config: Config, secrets: list[bytes],
                     static_users: dict[str, str | bytes] | None = None) -> ReloadReport:
        """Apply a re-read configuration (SIGHUP) without dropping any allocation.

        Secrets, static users, peer policy, quotas, lifetimes and the TLS certificate take
        effect for the next request; allocations, permissions and channels stay as they are.
        Options that need new sockets or would invalidate keys (``reload_plan``'s second list)
        keep their running values until a restart. Everything is built before anything is
        swapped, so an exception here leaves the server as it was.
        """
        old = self.config
        live, restart = reload_plan(old, new_config)
        effective = replace(new_config, **{name: getattr(old, name) for name in restart})
        users = dict(static_users or {})
        credentials = CredentialStore(realm=effective.realm, secrets=secrets, static_users=users,
                                      wall_clock=self.wall_clock)
        policy = self.build_policy(effective)
        core_config = core_config_from(effective, self.state.relay_addresses)
        nonces = None
        if effective.nonce_lifetime_s != old.nonce_lifetime_s:
            nonces = NonceManager(key=self._nonce_key, lifetime_s=effective.nonce_lifetime_s,
                                  wall_clock=self.wall_clock)
        if self.core is not None:
            self.core.reconfigure(config=core_config, credentials=credentials, policy=policy,
                                  nonces=nonces)
        self.config = effective
        self.secrets = list(secrets)
        self.static_users = users
        tls_reloaded: bool | None = None
        if effective.listen_tls:
            # Certificate files can change content under the same path (a renewal), so the
            # certificate is re-read on every reload, not only when the paths change.
            try:
                self.reload_tls(effective)
                tls_reloaded = True
            except Exception as exc:  # the old certificate keeps serving
                log.error("TLS certificate not reloaded, keeping the current one: %s", exc)
                tls_reloaded = False
        return ReloadReport(applied=live, needs_restart=restart, tls_reloaded=tls_reloaded)

    # ------------------------------------------------------------------ timers

    def _arm_timer(self) -> None:
        assert self.core is not None and self.loop is not None
        deadline = self.core.next_deadline()
        if deadline is None or (self._timer_at is not None and self._timer_at <= deadline):
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = deadline
        self._timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        assert self.core is not None and self.loop is not None
        self._timer = None
        self._timer_at = None
        try:
            self.core.handle_timer(self.loop.time())
        except Exception:
            log.exception("timer handling failed")
        self._arm_timer()

    # ------------------------------------------------------------------ datagrams

    def _client_datagram(self, ctx: tuple[Address, SinkFor], data: bytes, client: Address,
                         now: float) -> bytes | None:
        """A datagram from a UDP client that the data plane did not carry itself: the reply
        to send back, if any. One bad packet never stops the listener."""
        core = self.core
        assert core is not None
        local, sink_for = ctx
        try:
            reply = client_message(core, data, ("udp", client, local), now, sink_for,
                                   core.config.channel_max >> 8)
        except Exception:
            core.stats.dropped["internal_error"] += 1
            log.exception("error handling a datagram")
            return None
        if reply is None:
            return None
        self._arm_timer()
        return reply or None

    def _peer_datagram(self, relay: Any, data: bytes, peer: Address, now: float) -> None:
        """A peer datagram the data plane did not carry itself (no channel, a TCP or TLS
        client, a route that does not allow it)."""
        peer_datagram(self.core, relay, data, peer, now)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ events

    def _on_allocation_end(self, allocation: Allocation, reason: str, now: float) -> None:
        record = usage_record(allocation, reason, now)
        if self.worker is not None:
            record["worker"] = self.worker.index
        usage_log.info("allocation ended", extra={"usage": record})
        if self.usage_log is not None:
            totals = {k: record[k] for k in ("relayed", "peers", "bytes_to_peer", "packets_to_peer",
                                             "bytes_to_client", "packets_to_client", "duration_s",
                                             "reason", "relay_transport", "tcp_connections")
                      if k in record}
            self.usage_log.record("ended", allocation, totals)

    def _on_allocation_event(self, allocation: Allocation, event: str, now: float,
                             details: dict[str, Any]) -> None:
        if self.usage_log is not None:
            self.usage_log.record(event, allocation, details)


def usage_record(allocation: Allocation, reason: str, now: float) -> dict[str, Any]:
    """The audit record of one allocation. Never holds a password, key or secret."""
    record: dict[str, Any] = {
        "user": allocation.username,
        "client": format_hostport(*allocation.client_address),
        "transport": allocation.transport,
        "relayed": [format_hostport(*r.address) for r in allocation.relays],
        "peers": len(allocation.peers_seen),
        "bytes_to_peer": allocation.bytes_to_peer,
        "packets_to_peer": allocation.packets_to_peer,
        "bytes_to_client": allocation.bytes_to_client,
        "packets_to_client": allocation.packets_to_client,
        "duration_s": round(now - allocation.created_at, 3),
        "reason": reason,
    }
    if allocation.relay_transport == "tcp":
        # RFC 6062: the peer connections it had, their bytes in the totals above.
        record["relay_transport"] = "tcp"
        record["tcp_connections"] = allocation.tcp_connections_total
    return record




def write_ready_file(path: str, info: dict[str, Any]) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(info, handle)
    os.replace(tmp, path)
