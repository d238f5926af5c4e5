"""The option registry: every option once, with its type, default, range, section and whether a
reload applies it; the ``Config`` it fills, and the problems a configuration can have.

Everything else in the package (loading, checks, flags, the reference) is derived from
``OPTIONS``; a check at import keeps ``OPTIONS`` and ``Config`` in step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass

ENV_PREFIX = "TURND_"
DEFAULT_CONFIG_PATH = "/etc/turnd/turnd.toml"
# Shared secrets may come from the environment (systemd LoadCredential=, container secrets) but
# never from argv, where every local user can read them in /proc.
SECRETS_ENV = "TURND_SECRETS"
# The config-file path itself may come from the environment; it is not an option of the file.
CONFIG_ENV = "TURND_CONFIG"
# Which data path runs (turnserver/accel.py): read at import, not a configuration option.
PURE_PYTHON_ENV = "TURND_PURE_PYTHON"
_ENV_NOT_OPTIONS = frozenset({SECRETS_ENV, CONFIG_ENV, PURE_PYTHON_ENV})

# Where an option is documented, in this order.
SECTIONS: tuple[tuple[str, str], ...] = (
    ("listeners", "Listeners"),
    ("tls", "TLS"),
    ("relay", "Relay"),
    ("auth", "Authentication"),
    ("policy", "Peer policy"),
    ("limits", "Limits"),
    ("observability", "Observability"),
    ("operations", "Operations"),
)
_SECTION_NAMES = frozenset(name for name, _ in SECTIONS)
_TYPES = frozenset({"str", "int", "float", "bool", "list", "path", "choice"})

# A relay port range smaller than this cannot serve even a handful of clients; it is almost
# always a typo (min and max swapped in the operator's head, or one digit short).
MIN_RELAY_PORTS = 16

# RFC 8489 §14.9 (REALM) and §14.14 (SOFTWARE): fewer than 128 characters.
_MAX_RFC8489_TEXT_CHARS = 127


@dataclass(frozen=True)
class Option:
    """One configuration option; everything else about it is derived from these fields."""

    name: str
    type: str
    default: object
    help: str
    section: str
    reload: bool
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def cli_flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def nullable(self) -> bool:
        # Options whose default is "unset" accept "" to mean unset again: TOML has no null, and
        # an environment variable cannot be unset from a systemd drop-in, only emptied.
        return self.default is None


OPTIONS: tuple[Option, ...] = (
    # -- listeners: sockets are bound once, before privileges could be dropped -----------------
    Option("listen_udp", "list", ("0.0.0.0:3478", "[::]:3478"),
           "UDP listeners for STUN/TURN, as \"IP:PORT\" (an IP address, not a host name; IPv6 in "
           "brackets: \"[::]:3478\"). An empty list "
           "disables UDP.", "listeners", reload=False),
    Option("listen_tcp", "list", ("0.0.0.0:3478", "[::]:3478"),
           "TCP listeners for STUN/TURN (RFC 8656 §3.1), as \"IP:PORT\". An empty list "
           "disables TCP.", "listeners", reload=False),
    Option("listen_tls", "list", ("0.0.0.0:5349", "[::]:5349"),
           "TLS-over-TCP listeners (turns:), as \"IP:PORT\". An empty list disables TLS.",
           "listeners", reload=False),
    # -- tls: certificates are re-read on reload so renewals need no restart --------------------
    Option("tls_cert_file", "path", None,
           "PEM certificate chain for the TLS listeners. Unset: a self-signed certificate is "
           "made at start-up (fine for tests, not for browsers).", "tls", reload=True),
    Option("tls_key_file", "path", None,
           "PEM private key (unencrypted) matching tls_cert_file.", "tls", reload=True),
    # -- relay ------------------------------------------------------------------------------------
    Option("relay_addresses", "list", (),
           "Local IP addresses to bind relay sockets on, at most one per address family in "
           "practice. Empty: the host's primary address is detected.", "relay", reload=False),
    Option("external_addresses", "list", (),
           "Public addresses behind a 1:1 NAT, advertised in XOR-RELAYED-ADDRESS: \"EXT\" "
           "for the single relay address, or \"EXT=BOUND\" per relay address.",
           "relay", reload=False),
    Option("relay_port_min", "int", 49152,
           "Lowest UDP port for relayed transport addresses.", "relay", reload=False,
           minimum=1, maximum=65535),
    Option("relay_port_max", "int", 65535,
           "Highest UDP port for relayed transport addresses (inclusive).", "relay",
           reload=False, minimum=1, maximum=65535),
    # -- auth -------------------------------------------------------------------------------------
    Option("realm", "str", "turnd",
           "REALM of the long-term credential mechanism (RFC 8489 §9.2). Changing it "
           "invalidates every static user key, so it needs a restart.", "auth", reload=False),
    Option("secrets_file", "path", None,
           "TURN REST API shared secrets, one per line (blank lines and lines starting with # "
           "are skipped). All are accepted; the first is used to mint credentials. Secrets may "
           "also come from the TURND_SECRETS environment variable, never from a flag.",
           "auth", reload=True),
    Option("static_users_file", "path", None,
           "Static long-term users, one per line: \"user:password\" or \"user:0x<md5 key>\" "
           "(the key is MD5(user:realm:password), as coturn's turnadmin -k prints it).",
           "auth", reload=True),
    Option("allow_refresh_after_expiry", "bool", True,
           "Whether an expired REST API username may still Refresh, CreatePermission and "
           "ChannelBind on the allocation it already has; new Allocates are refused either way.",
           "auth", reload=True),
    Option("nonce_lifetime_s", "int", 600,
           "Seconds a NONCE stays valid before the client gets 438 Stale Nonce "
           "(RFC 8489 §9.2.4).", "auth", reload=True, minimum=1, maximum=86400),
    # -- policy -----------------------------------------------------------------------------------
    Option("allowed_peers", "list", (),
           "Peer CIDRs that may always be relayed to. Allow wins over deny and over the built-in "
           "denials (loopback, multicast, ...).", "policy", reload=True),
    Option("denied_peers", "list", (),
           "Peer CIDRs that may never be relayed to, in addition to the built-in denials.",
           "policy", reload=True),
    # -- limits -----------------------------------------------------------------------------------
    Option("default_lifetime_s", "int", 600,
           "Allocation lifetime when the client asks for none or less (RFC 8656 §7.2: "
           "600 s).", "limits", reload=True, minimum=1),
    Option("max_lifetime_s", "int", 3600,
           "Longest allocation lifetime granted per Allocate or Refresh (RFC 8656 §7.2 "
           "recommends 3600 s).", "limits", reload=True, minimum=1),
    Option("max_allocations", "int", 10000,
           "Most allocations at once over all users, EVEN-PORT reservations included (508 "
           "Insufficient Capacity beyond); 0: limited only by the relay port range.",
           "limits", reload=True, minimum=0),
    Option("user_quota", "int", 32,
           "Most allocations at once per user, EVEN-PORT reservations included (486 Allocation "
           "Quota Reached beyond). A REST username counts by its user part, so "
           "\"1700000000:alice\" and \"1700086400:alice\" share alice's quota (as in coturn); a "
           "static user by its name. Mint a distinct user part per user, or raise this for a "
           "shared one. 0: unlimited.", "limits", reload=True, minimum=0),
    Option("max_permissions_per_allocation", "int", 128,
           "Most peer IP permissions one allocation holds at once (508 to CreatePermission and "
           "ChannelBind beyond); 0: unlimited.", "limits", reload=True, minimum=0),
    Option("max_channels_per_allocation", "int", 64,
           "Most channels one allocation has bound at once (508 to ChannelBind beyond); "
           "0: unlimited.", "limits", reload=True, minimum=0),
    Option("allocation_bandwidth_bytes_s", "int", 625000,
           "Bytes per second one allocation relays in each direction (625000 = 5 Mbit/s, "
           "room for HD video); a burst of one second's worth, then excess is dropped and "
           "counted. 0: unlimited.", "limits", reload=True, minimum=0),
    Option("server_bandwidth_bytes_s", "int", 0,
           "Bytes per second the whole server relays in each direction; excess is dropped "
           "and counted. 0: unlimited (the host's link is the limit).", "limits",
           reload=True, minimum=0),
    Option("challenge_rate_per_source", "float", 40.0,
           "Unauthenticated answers (401, 438, and 400/420 before authentication) per second "
           "to one source address over UDP; beyond, requests are dropped unanswered, so the "
           "server is no reflector (TCP and TLS sources are proved by their handshake, and "
           "not limited). 0: not limited.", "limits", reload=True, minimum=0),
    Option("challenge_burst_per_source", "int", 40,
           "Unauthenticated answers one source address may get in a burst before "
           "challenge_rate_per_source applies.", "limits", reload=True, minimum=1),
    Option("legacy_channel_numbers", "bool", False,
           "Also accept ChannelBind numbers 0x5000-0x7FFF, the RFC 5766 range that older clients "
           "(coturn's turnutils_uclient among them) still use; RFC 8656 §12 reserves them.",
           "limits", reload=True),
    Option("tcp_relay", "bool", True,
           "Offer TCP allocations (RFC 6062: REQUESTED-TRANSPORT 6, Connect, ConnectionBind) to "
           "clients on TCP and TLS listeners; off, they get 442 as UDP-only servers answer.",
           "limits", reload=True),
    Option("max_tcp_connections_per_allocation", "int", 32,
           "Most peer connections one TCP allocation has at once, waiting for ConnectionBind "
           "or bound; a Connect beyond gets 508, a peer connecting in beyond is reset. 0: "
           "unlimited.", "limits", reload=True, minimum=0),
    Option("max_connections", "int", 4096,
           "Most TCP and TLS client connections at once; further connections are closed "
           "at accept.", "limits", reload=True, minimum=1),
    Option("max_connections_per_source", "int", 256,
           "Most TCP and TLS connections at once from one source address (one /64 for "
           "IPv6); further connections are reset at accept. Generous, since a hospital or "
           "office NAT puts many callers behind one address. 0: unlimited.", "limits",
           reload=True, minimum=0),
    Option("stream_idle_timeout_s", "float", 30.0,
           "Seconds a TCP/TLS connection may stay open without an allocation before it is "
           "closed.", "limits", reload=True, minimum=0.01),
    Option("tls_handshake_timeout_s", "float", 10.0,
           "Seconds a TLS handshake may take before the connection is closed.", "limits",
           reload=True, minimum=0.01),
    Option("stream_write_buffer_bytes", "int", 262144,
           "Bytes queued per TCP/TLS connection toward a slow client; media beyond this is "
           "dropped rather than buffered without bound.", "limits", reload=True, minimum=1024),
    Option("stream_unallocated_write_buffer_bytes", "int", 8192,
           "Bytes of replies queued toward a TCP/TLS client that has no allocation yet; "
           "beyond, the server stops reading from it until it reads its replies.", "limits",
           reload=True, minimum=512),
    # -- observability ----------------------------------------------------------------------------
    Option("usage_log_file", "str", "",
           "Audit log: one hash-chained JSON line per allocation event (created, refreshed, "
           "permission, channel, ended with totals), checked with turnd verify-usage-log; "
           "\"\" (the default) writes none. With workers, each writes FILE.wN.",
           "observability", reload=False),
    Option("usage_log_max_bytes", "int", 104857600,
           "Rotate usage_log_file when it passes this many bytes.", "observability",
           reload=False, minimum=4096),
    Option("usage_log_rotate_s", "float", 86400.0,
           "Rotate usage_log_file after this many seconds.", "observability", reload=False,
           minimum=1),
    Option("usage_log_flush_s", "float", 1.0,
           "Seconds between writes of usage_log_file: what a crash can lose at most.",
           "observability", reload=False, minimum=0.05, maximum=60),
    Option("admin_socket", "str", "/run/turnd/admin.sock",
           "Unix socket for turnd admin (sessions, disconnect, reload, drain, log level): mode "
           "0660, group turnd; only root, this server's user and that group are served "
           "(SO_PEERCRED); \"\" disables it. No network listener.", "observability",
           reload=False),
    Option("metrics_listen", "str", "127.0.0.1:9641",
           "\"IP:PORT\" of the Prometheus /metrics endpoint; \"\" disables it.",
           "observability", reload=False),
    Option("log_level", "choice", "info", "Least severe level logged.", "observability",
           reload=True, choices=("debug", "info", "warning", "error")),
    Option("log_format", "choice", "text",
           "\"text\" for people and journald, \"json\" (one object per line) for log "
           "pipelines.", "observability", reload=True, choices=("text", "json")),
    # -- operations -------------------------------------------------------------------------------
    Option("workers", "int", 0,
           "Relay processes, each on its own SO_REUSEPORT sockets and its own slice of the relay "
           "port range, under one parent that holds the sockets, serves /metrics and replaces a "
           "worker that dies; 0: one per CPU the process may use; 1: a single process.",
           "operations", reload=False, minimum=0),
    Option("software", "str", "turnd",
           "SOFTWARE attribute value in responses (RFC 8489 §14.14); \"\" omits the attribute.",
           "operations", reload=True),
    Option("public_host", "str", None,
           "Host name or IP address clients should use, put into minted turn:/turns: URLs.",
           "operations", reload=True),
    Option("drain_timeout_s", "float", 600.0,
           "On SIGTERM, the most seconds to wait for existing allocations to end before "
           "exiting.", "operations", reload=True, minimum=0),
    Option("alternate_server", "str", None,
           "\"IP:PORT\" sent in ALTERNATE-SERVER with 300 Try Alternate to new Allocates "
           "while draining (RFC 8489 §10).", "operations", reload=True),
)

OPTIONS_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Config:
    """The effective configuration. One field per ``Option``; a test keeps them in step."""

    # listeners
    listen_udp: tuple[str, ...] = ("0.0.0.0:3478", "[::]:3478")
    listen_tcp: tuple[str, ...] = ("0.0.0.0:3478", "[::]:3478")
    listen_tls: tuple[str, ...] = ("0.0.0.0:5349", "[::]:5349")
    # tls
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # relay
    relay_addresses: tuple[str, ...] = ()
    external_addresses: tuple[str, ...] = ()
    relay_port_min: int = 49152
    relay_port_max: int = 65535
    # auth
    realm: str = "turnd"
    secrets_file: str | None = None
    static_users_file: str | None = None
    allow_refresh_after_expiry: bool = True
    nonce_lifetime_s: int = 600
    # policy
    allowed_peers: tuple[str, ...] = ()
    denied_peers: tuple[str, ...] = ()
    # limits
    default_lifetime_s: int = 600
    max_lifetime_s: int = 3600
    max_allocations: int = 10000
    user_quota: int = 32
    max_permissions_per_allocation: int = 128
    max_channels_per_allocation: int = 64
    allocation_bandwidth_bytes_s: int = 625000
    server_bandwidth_bytes_s: int = 0
    challenge_rate_per_source: float = 40.0
    challenge_burst_per_source: int = 40
    legacy_channel_numbers: bool = False
    tcp_relay: bool = True
    max_tcp_connections_per_allocation: int = 32
    max_connections: int = 4096
    max_connections_per_source: int = 256
    stream_idle_timeout_s: float = 30.0
    tls_handshake_timeout_s: float = 10.0
    stream_write_buffer_bytes: int = 262144
    stream_unallocated_write_buffer_bytes: int = 8192
    # observability
    usage_log_file: str = ""
    usage_log_max_bytes: int = 104857600
    usage_log_rotate_s: float = 86400.0
    usage_log_flush_s: float = 1.0
    admin_socket: str = "/run/turnd/admin.sock"
    metrics_listen: str = "127.0.0.1:9641"
    log_level: str = "info"
    log_format: str = "text"
    # operations
    workers: int = 0
    software: str = "turnd"
    public_host: str | None = None
    drain_timeout_s: float = 600.0
    alternate_server: str | None = None


@dataclass(frozen=True)
class Problem:
    """One thing wrong with the configuration, attributed to the option it is about."""

    option: str
    message: str

    def __str__(self) -> str:
        return f"{self.option}: {self.message}"


class ConfigError(Exception):
    """Raised with every problem found at once, so an operator fixes them in one pass."""

    def __init__(self, problems: Iterable[Problem]) -> None:
        self.problems: list[Problem] = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


def _assert_registry_matches_config() -> None:
    # Fails at import if OPTIONS and Config drift apart, before any test or start-up can.
    fields = {f.name: f for f in dataclasses.fields(Config)}
    if list(fields) != [o.name for o in OPTIONS]:
        raise RuntimeError("OPTIONS and Config fields differ")
    for option in OPTIONS:
        if option.type not in _TYPES or option.section not in _SECTION_NAMES:
            raise RuntimeError(f"bad registry entry {option.name}")
        if fields[option.name].default != option.default:
            raise RuntimeError(f"default of {option.name} differs between OPTIONS and Config")


_assert_registry_matches_config()
