"""turnd configuration: one option registry feeding every way of setting an option.

``OPTIONS`` is the single source of truth. From it come the TOML keys, the ``--flags`` of the
command line, the ``TURND_*`` environment variables, the per-value validation and the operator
reference in ``docs/configuration.md`` (``python -m turnserver.config --markdown``), so none of
them can drift from the others.

Precedence, highest first: command-line flags > ``TURND_*`` environment variables > the TOML
file > built-in defaults.

``load_config`` only converts and range-checks single values (it must be cheap and side-effect
free). ``check_config`` does the deeper, cross-option checks that look at the file system, the
host's addresses and port conflicts; ``turnd check`` and start-up run both.
"""

from __future__ import annotations

import dataclasses
import difflib
import hmac
import ipaddress
import json
import math
import os
import re
import socket
import sys
import time
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

__all__ = [
    "CONFIG_ENV",
    "DEFAULT_CONFIG_PATH",
    "ENV_PREFIX",
    "OPTIONS",
    "OPTIONS_BY_NAME",
    "SECRETS_ENV",
    "SECTIONS",
    "Config",
    "ConfigError",
    "Option",
    "Problem",
    "check_config",
    "config_warnings",
    "credentials_configured",
    "click_options",
    "load_and_check",
    "load_config",
    "load_secrets",
    "weak_secret_warnings",
    "overrides_from_click",
    "format_hostport",
    "parse_hostport",
    "reload_plan",
    "render_markdown",
    "toml_literal",
]

ENV_PREFIX = "TURND_"
DEFAULT_CONFIG_PATH = "/etc/turnd/turnd.toml"
# Shared secrets may come from the environment (systemd LoadCredential=, container secrets) but
# never from argv, where every local user can read them in /proc.
SECRETS_ENV = "TURND_SECRETS"
# The config-file path itself may come from the environment; it is not an option of the file.
CONFIG_ENV = "TURND_CONFIG"
_ENV_NOT_OPTIONS = frozenset({SECRETS_ENV, CONFIG_ENV})

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
           "to one source address; beyond, requests are dropped unanswered, so the server is "
           "no reflector. 0: not limited.", "limits", reload=True, minimum=0),
    Option("challenge_burst_per_source", "int", 40,
           "Unauthenticated answers one source address may get in a burst before "
           "challenge_rate_per_source applies.", "limits", reload=True, minimum=1),
    Option("legacy_channel_numbers", "bool", False,
           "Also accept ChannelBind numbers 0x5000-0x7FFF, the RFC 5766 range that older clients "
           "(coturn's turnutils_uclient among them) still use; RFC 8656 §12 reserves them.",
           "limits", reload=True),
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
    Option("metrics_listen", "str", "127.0.0.1:9641",
           "\"IP:PORT\" of the Prometheus /metrics endpoint; \"\" disables it.",
           "observability", reload=False),
    Option("log_level", "choice", "info", "Least severe level logged.", "observability",
           reload=True, choices=("debug", "info", "warning", "error")),
    Option("log_format", "choice", "text",
           "\"text\" for people and journald, \"json\" (one object per line) for log "
           "pipelines.", "observability", reload=True, choices=("text", "json")),
    # -- operations -------------------------------------------------------------------------------
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
    max_connections: int = 4096
    max_connections_per_source: int = 256
    stream_idle_timeout_s: float = 30.0
    tls_handshake_timeout_s: float = 10.0
    stream_write_buffer_bytes: int = 262144
    stream_unallocated_write_buffer_bytes: int = 8192
    # observability
    metrics_listen: str = "127.0.0.1:9641"
    log_level: str = "info"
    log_format: str = "text"
    # operations
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


# --------------------------------------------------------------------------------------------
# Value conversion
# --------------------------------------------------------------------------------------------

class _BadValue(Exception):
    pass


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _show(raw: object) -> str:
    """A short, printable rendering of a rejected value (options never hold secrets)."""
    text = repr(raw)
    return text if len(text) <= 60 else text[:57] + "..."


def _split_list(text: str) -> list[str]:
    # Commas and newlines both separate: a comma never occurs in an address, CIDR or
    # "host:port", and newlines let a systemd Environment= or a .env file list one per line.
    return [item.strip() for item in re.split(r"[,\n]", text) if item.strip()]


def _check_range(option: Option, value: float) -> None:
    if option.minimum is not None and value < option.minimum:
        raise _BadValue(f"must be at least {_number(option.minimum)}, got {_number(value)}")
    if option.maximum is not None and value > option.maximum:
        raise _BadValue(f"must be at most {_number(option.maximum)}, got {_number(value)}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _convert(option: Option, raw: object, *, textual: bool) -> object:
    """Turn one raw value into the option's type, or raise _BadValue saying why.

    ``textual`` sources (environment, command line) may spell any type as a string; TOML
    values must already have the right TOML type, so that `port = "80"` is caught as the
    mistake it usually is.
    """
    kind = option.type
    if kind == "bool":
        if isinstance(raw, bool):
            return raw
        if textual and isinstance(raw, str):
            word = raw.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
        raise _BadValue(f"expected true or false, got {_show(raw)}")
    if kind == "int":
        value: Any
        if isinstance(raw, int) and not isinstance(raw, bool):
            value = raw
        elif textual and isinstance(raw, str):
            try:
                value = int(raw.strip(), 10)
            except ValueError:
                raise _BadValue(f"expected an integer, got {_show(raw)}") from None
        else:
            raise _BadValue(f"expected an integer, got {_show(raw)}")
        _check_range(option, value)
        return value
    if kind == "float":
        if isinstance(raw, (int, float)) and not isinstance(raw, bool):
            value = float(raw)
        elif textual and isinstance(raw, str):
            try:
                value = float(raw.strip())
            except ValueError:
                raise _BadValue(f"expected a number, got {_show(raw)}") from None
        else:
            raise _BadValue(f"expected a number, got {_show(raw)}")
        if not math.isfinite(value):
            raise _BadValue(f"expected a finite number, got {_show(raw)}")
        _check_range(option, value)
        return value
    if kind == "list":
        if textual and isinstance(raw, str):
            return tuple(_split_list(raw))
        if isinstance(raw, (list, tuple)):
            if not all(isinstance(item, str) for item in raw):
                raise _BadValue(f"expected a list of strings, got {_show(raw)}")
            if textual:
                # Repeated flags (--listen-udp A --listen-udp B,C) and Python callers.
                return tuple(part for item in raw for part in _split_list(item))
            items = tuple(item.strip() for item in raw)
            if any(not item for item in items):
                raise _BadValue("list contains an empty string")
            return items
        raise _BadValue(f"expected a list of strings, got {_show(raw)}")
    # "str", "path", "choice"
    if not isinstance(raw, str):
        raise _BadValue(f"expected a string, got {_show(raw)}")
    if "\x00" in raw:
        raise _BadValue("contains a NUL character")
    if option.nullable and raw == "":
        return None
    if kind == "choice":
        word = raw.strip().lower()
        if word not in option.choices:
            raise _BadValue(f"expected one of {', '.join(option.choices)}, got {_show(raw)}")
        return word
    return raw


def _validate_field(option: Option, value: object) -> str | None:
    """Re-check a value already in a Config (which may have been built by hand)."""
    if value is None:
        return None if option.nullable else "must be set"
    if option.type == "list" and not isinstance(value, tuple):
        return f"expected a tuple of strings, got {_show(value)}"
    if option.type == "choice" and value not in option.choices:
        return f"expected one of {', '.join(option.choices)}, got {_show(value)}"
    try:
        _convert(option, value, textual=False)
    except _BadValue as exc:
        return str(exc)
    return None


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

# Keys people reach for when they try to put a secret in the file; answered with where it goes.
_SECRET_LIKE_KEYS = frozenset({
    "secret", "secrets", "shared_secret", "shared_secrets", "static_auth_secret",
    "auth_secret", "password", "passwords",
})


def _unknown(name: str, candidates: Iterable[str]) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def _read_toml(path: str, problems: list[Problem]) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        problems.append(Problem("config", f"cannot read {path}: {exc.strerror or exc}"))
        return {}
    except tomllib.TOMLDecodeError as exc:
        problems.append(Problem("config", f"{path} is not valid TOML: {exc}"))
        return {}
    except UnicodeDecodeError:
        problems.append(Problem("config", f"{path} is not UTF-8 text"))
        return {}
    base_dir = os.path.dirname(os.path.abspath(path))
    values: dict[str, object] = {}
    for key, raw in data.items():
        option = OPTIONS_BY_NAME.get(key)
        if option is None:
            if key in _SECRET_LIKE_KEYS:
                message = ("secrets are not accepted in the configuration file; put them in "
                           f"the file named by secrets_file or in {SECRETS_ENV}")
            elif isinstance(raw, dict) and key in _SECTION_NAMES:
                message = (f"[{key}] is a section of the reference, not a table: write its "
                           "options as top-level keys")
            else:
                message = "unknown option" + _unknown(key, OPTIONS_BY_NAME)
            problems.append(Problem(key, f"{message} (in {path})"))
            continue
        try:
            value = _convert(option, raw, textual=False)
        except _BadValue as exc:
            problems.append(Problem(key, f"{exc} (in {path})"))
            continue
        if option.type == "path" and isinstance(value, str) and not os.path.isabs(value):
            # Relative to the file that names it: a service's working directory is "/", so
            # relative to the cwd would never be what the author of the file meant.
            value = os.path.normpath(os.path.join(base_dir, value))
        values[key] = value
    return values


def _from_env(env: Mapping[str, str], problems: list[Problem]) -> dict[str, object]:
    values: dict[str, object] = {}
    env_names = {o.env: o for o in OPTIONS}
    for var in sorted(env):
        if not var.startswith(ENV_PREFIX) or var in _ENV_NOT_OPTIONS:
            continue
        option = env_names.get(var)
        if option is None:
            hint = _unknown(var, list(env_names) + sorted(_ENV_NOT_OPTIONS))
            problems.append(Problem(var, "unknown environment variable" + hint))
            continue
        try:
            values[option.name] = _convert(option, env[var], textual=True)
        except _BadValue as exc:
            problems.append(Problem(option.name, f"{exc} (from {var})"))
    return values


def _from_overrides(overrides: Mapping[str, object],
                    problems: list[Problem]) -> dict[str, object]:
    values: dict[str, object] = {}
    for name, raw in overrides.items():
        option = OPTIONS_BY_NAME.get(name)
        if option is None:
            problems.append(Problem(name, "unknown option" + _unknown(name, OPTIONS_BY_NAME)))
            continue
        if raw is None:
            continue
        try:
            values[name] = _convert(option, raw, textual=True)
        except _BadValue as exc:
            problems.append(Problem(name, f"{exc} (from {option.cli_flag})"))
    return values


def load_config(path: str | None = None, *, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, object] | None = None) -> Config:
    """Build the effective Config; raise ConfigError listing every problem found.

    Precedence, highest first: ``overrides`` (the command-line flags actually given) >
    ``TURND_*`` environment variables > the TOML file > built-in defaults. With ``path``
    None, DEFAULT_CONFIG_PATH is read if it exists; an explicit path must exist.
    ``env`` None means ``os.environ``.
    """
    config, problems = _load(path, env, overrides)
    if problems:
        raise ConfigError(problems)
    return config


def _load(path: str | None, env: Mapping[str, str] | None,
          overrides: Mapping[str, object] | None) -> tuple[Config, list[Problem]]:
    """The Config from every source, with each value that could not be converted left at its
    default, and the problems found; never raises."""
    environ: Mapping[str, str] = os.environ if env is None else env
    problems: list[Problem] = []
    values: dict[str, object] = {}
    if path is None and os.path.exists(DEFAULT_CONFIG_PATH):
        path = DEFAULT_CONFIG_PATH
    if path is not None:
        values.update(_read_toml(path, problems))
    env_values = _from_env(environ, problems)
    flag_values = _from_overrides(overrides or {}, problems)
    values.update(env_values)
    values.update(flag_values)
    # A bad value from a stronger source must not leave a weaker source's good one in force.
    bad = {p.option for p in problems}
    values = {k: v for k, v in values.items() if k not in bad}
    return Config(**values), problems  # type: ignore[arg-type]


def load_and_check(path: str | None = None, *, env: Mapping[str, str] | None = None,
                   overrides: Mapping[str, object] | None = None) -> tuple[Config, list[Problem]]:
    """Load and deep-check in one pass: every problem that can be found, at once.

    Values that cannot be converted are reported and replaced by their defaults for the deep
    checks, whose problems about the same options are then left out (they would be about the
    default, not about what the operator wrote). A configuration file that cannot be read or
    parsed at all is reported alone.
    """
    config, problems = _load(path, env, overrides)
    if any(p.option == "config" for p in problems):
        return config, problems
    reported = {p.option for p in problems}
    problems.extend(p for p in check_config(config) if p.option not in reported)
    return config, problems


# RFC 4086 §8 and NIST SP 800-107: an HMAC key should carry at least 128 bits.
MIN_SECRET_BITS = 128


def secret_bits(secret: bytes) -> int:
    """A generous estimate of a secret's strength: its length times the bits per character
    of the smallest common alphabet it is written in (hex 4, base64 6, printable 6.5, else 8).
    A secret that is long but repetitive passes it; it catches the short ones."""
    try:
        text = secret.decode("ascii")
    except UnicodeDecodeError:
        return 8 * len(secret)
    if re.fullmatch(r"[0-9a-fA-F]*", text):
        per_char = 4.0
    elif re.fullmatch(r"[A-Za-z0-9+/=_-]*", text):
        per_char = 6.0
    elif text.isprintable():
        per_char = 6.5
    else:
        per_char = 8.0
    return int(len(text) * per_char)


def credentials_configured(config: Config, env: Mapping[str, str]) -> bool:
    """Whether the operator configured any credential source (possibly empty: a revocation),
    as opposed to none at all, when `turnd serve` makes a one-run secret."""
    return bool(config.secrets_file or config.static_users_file or env.get(SECRETS_ENV, "").strip())


def weak_secret_warnings(secrets: Iterable[bytes]) -> list[str]:
    """One line per shared secret under MIN_SECRET_BITS, naming it by position only."""
    out = []
    for index, secret in enumerate(secrets, 1):
        bits = secret_bits(secret)
        if bits < MIN_SECRET_BITS:
            out.append(f"shared secret #{index} carries about {bits} bits, under "
                       f"{MIN_SECRET_BITS}: anyone who guesses it mints credentials; use "
                       "32 random bytes, e.g. from `python3 -c 'import secrets; "
                       "print(secrets.token_urlsafe(32))'`")
    return out


def load_secrets(config: Config, env: Mapping[str, str]) -> list[bytes]:
    """The REST API shared secrets: secrets_file lines first, then TURND_SECRETS.

    The first secret is the one used to mint; all are accepted, so a new secret can be
    rolled out ahead of the old one's removal. Problems name ``secrets_file`` and never
    include secret material.
    """
    secrets: list[bytes] = []
    if config.secrets_file is not None:
        try:
            with open(config.secrets_file, "rb") as f:
                data = f.read()
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise ConfigError([Problem("secrets_file",
                                       f"cannot read {config.secrets_file}: {reason}")]) from None
        for line in data.splitlines():
            line = line.strip()
            if line and not line.startswith(b"#"):
                secrets.append(line)
    from_env = env.get(SECRETS_ENV, "")
    # One secret per line, as in secrets_file: a comma may be part of a secret.
    for item in from_env.splitlines():
        item = item.strip()
        if item:
            secrets.append(item.encode("utf-8", "surrogateescape"))
    unique: list[bytes] = []
    for secret in secrets:
        if secret not in unique:
            unique.append(secret)
    return unique


# --------------------------------------------------------------------------------------------
# Syntax helpers
# --------------------------------------------------------------------------------------------

_PORT_RE = re.compile(r"[0-9]{1,5}")


def parse_hostport(s: str, option: str) -> tuple[str, int]:
    """Parse "0.0.0.0:3478" or "[::]:3478" into (host, port); the host must be an IP literal.

    Port 0 is accepted (an ephemeral port, used by tests); callers that need a real port
    check for it. Raises ValueError whose message starts with the option name.
    """
    def bad(why: str) -> ValueError:
        return ValueError(f"{option}: {_show(s)} is not a valid \"IP:PORT\" (an IP address, "
                          f"not a host name): {why}")

    if not isinstance(s, str):
        raise bad("not a string")
    text = s.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise bad("missing ']'")
        host, rest = text[1:close], text[close + 1:]
        if not rest.startswith(":"):
            raise bad("expected ':port' after ']'")
        port_text = rest[1:]
        try:
            addr = ipaddress.ip_address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IPv6 address") from None
        if addr.version != 6:
            raise bad("only IPv6 addresses go in brackets")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise bad("missing ':port'")
        if ":" in host:
            raise bad("IPv6 addresses must be in brackets, e.g. \"[::1]:3478\"")
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise bad(f"{host!r} is not an IP address") from None
    if not _PORT_RE.fullmatch(port_text):
        raise bad("the port must be a number")
    port = int(port_text)
    if port > 65535:
        raise bad("the port must be at most 65535")
    return host, port


def format_hostport(host: str, port: int) -> str:
    """The inverse of ``parse_hostport``: "1.2.3.4:3478", "[::1]:3478"."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_HOSTNAME_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_hostname(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return False
    return all(_HOSTNAME_LABEL.fullmatch(label) for label in name.split("."))


def toml_literal(value: object) -> str:
    """A TOML literal for an option value (used by the docs and the coturn converter)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        # JSON string escapes are a subset of TOML basic-string escapes.
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_literal(v) for v in value) + "]"
    raise TypeError(f"no TOML literal for {type(value).__name__}")


# --------------------------------------------------------------------------------------------
# Deeper checks
# --------------------------------------------------------------------------------------------

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class _Endpoint:
    option: str
    text: str
    address: Address
    port: int


def _overlaps(a: Address, b: Address) -> bool:
    # Listeners are bound IPV6_V6ONLY, so only one family's wildcard covers its own family.
    if a.version != b.version:
        return False
    return a == b or a.is_unspecified or b.is_unspecified


def _endpoints(option: str, items: Iterable[str], problems: list[Problem]) -> list[_Endpoint]:
    out: list[_Endpoint] = []
    for item in items:
        try:
            host, port = parse_hostport(item, option)
        except ValueError as exc:
            problems.append(Problem(option, str(exc).removeprefix(option + ": ")))
            continue
        out.append(_Endpoint(option, item, ipaddress.ip_address(host), port))
    return out


def _check_listeners(config: Config, problems: list[Problem]) -> list[_Endpoint]:
    by_proto = {
        "listen_udp": _endpoints("listen_udp", config.listen_udp, problems),
        "listen_tcp": _endpoints("listen_tcp", config.listen_tcp, problems),
        "listen_tls": _endpoints("listen_tls", config.listen_tls, problems),
    }
    if not (config.listen_udp or config.listen_tcp or config.listen_tls):
        problems.append(Problem("listen_udp", "no listeners at all: listen_udp, listen_tcp "
                                              "and listen_tls are all empty"))
    # Port 0 asks the kernel for a free port, so it can never collide.
    for option, endpoints in by_proto.items():
        for i, a in enumerate(endpoints):
            for b in endpoints[i + 1:]:
                if not (a.port and a.port == b.port and _overlaps(a.address, b.address)):
                    continue
                if a.address == b.address:
                    problems.append(Problem(option, f"{a.text} is listed twice"))
                else:
                    problems.append(Problem(option, f"{a.text} and {b.text} overlap (same "
                                                    "protocol and port, and a wildcard "
                                                    "address covers the other)"))
    for tcp in by_proto["listen_tcp"]:
        for tls in by_proto["listen_tls"]:
            if tcp.port and tcp.port == tls.port and _overlaps(tcp.address, tls.address):
                problems.append(Problem("listen_tls", f"{tls.text} conflicts with listen_tcp "
                                                      f"{tcp.text}: both are TCP sockets on "
                                                      "the same address and port"))
    # A specific address must be one of this host's, or serve cannot bind it ("Cannot
    # assign requested address") and a systemd unit restarts forever.
    checked: dict[Address, str | None] = {}
    for option, endpoints in by_proto.items():
        for ep in endpoints:
            if ep.address.is_unspecified:
                continue
            if ep.address not in checked:
                checked[ep.address] = _bind_check(ep.address)
            error = checked[ep.address]
            if error is not None:
                problems.append(Problem(option, f"{ep.text}: {ep.address} is not an address of "
                                                f"this host ({error})"))
    return [e for endpoints in by_proto.values() for e in endpoints]


def _bind_check(address: Address) -> str | None:
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        # Binding proves the address is configured on this host; nothing is sent.
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(address), 0))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _check_relay(config: Config, listeners: list[_Endpoint], problems: list[Problem]) -> None:
    # Each bound is already within 1-65535 (the options' minimum and maximum).
    low, high = config.relay_port_min, config.relay_port_max
    range_ok = low <= high
    if not range_ok:
        problems.append(Problem("relay_port_min", f"relay_port_min ({low}) is greater than "
                                                  f"relay_port_max ({high})"))
    elif high - low + 1 < MIN_RELAY_PORTS:
        problems.append(Problem("relay_port_max",
                                f"the relay port range {low}-{high} holds only "
                                f"{high - low + 1} ports; at least {MIN_RELAY_PORTS} needed"))
    relay: list[Address] = []
    for text in config.relay_addresses:
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            problems.append(Problem("relay_addresses", f"{_show(text)} is not an IP address"))
            continue
        if address.is_unspecified or address.is_multicast:
            problems.append(Problem("relay_addresses",
                                    f"{text} cannot be a relay address: a relayed transport "
                                    "address must be one specific unicast address"))
            continue
        if address in relay:
            problems.append(Problem("relay_addresses", f"{text} is listed twice"))
            continue
        error = _bind_check(address)
        if error is not None:
            problems.append(Problem("relay_addresses",
                                    f"{text} is not an address of this host ({error})"))
        relay.append(address)
    if range_ok:
        for ep in listeners:
            if not ep.port or not low <= ep.port <= high:
                continue
            # With no relay_addresses the detected primary address is unknown here, so any
            # listener address could be it.
            if not relay or any(_overlaps(ep.address, r) for r in relay):
                problems.append(Problem(ep.option,
                                        f"{ep.text}: port {ep.port} is inside the relay port "
                                        f"range {low}-{high}"))
    _check_external(config, relay, problems)


def _check_external(config: Config, relay: list[Address], problems: list[Problem]) -> None:
    plain: list[str] = []
    mapped: dict[Address, str] = {}
    for item in config.external_addresses:
        ext_text, sep, bound_text = item.partition("=")
        try:
            ext = ipaddress.ip_address(ext_text.strip())
        except ValueError:
            problems.append(Problem("external_addresses",
                                    f"{_show(item)}: {ext_text.strip()!r} is not an IP address "
                                    "(expected \"EXT\" or \"EXT=BOUND\")"))
            continue
        if ext.is_unspecified or ext.is_multicast:
            problems.append(Problem("external_addresses",
                                    f"{item}: {ext} cannot be advertised as a relay address"))
            continue
        if not sep:
            plain.append(item)
            continue
        try:
            bound = ipaddress.ip_address(bound_text.strip())
        except ValueError:
            problems.append(Problem("external_addresses",
                                    f"{_show(item)}: {bound_text.strip()!r} is not an IP "
                                    "address (expected \"EXT=BOUND\")"))
            continue
        if bound.version != ext.version:
            problems.append(Problem("external_addresses",
                                    f"{item}: the external and bound addresses are of "
                                    "different families"))
            continue
        if bound in mapped:
            problems.append(Problem("external_addresses",
                                    f"{item}: {bound} is already mapped by {mapped[bound]}"))
            continue
        mapped[bound] = item
        if relay and bound not in relay:
            problems.append(Problem("external_addresses",
                                    f"{item}: {bound} is not one of relay_addresses"))
        elif not relay:
            error = _bind_check(bound)
            if error is not None:
                problems.append(Problem("external_addresses",
                                        f"{item}: {bound} is not an address of this host "
                                        f"({error})"))
    if len(plain) > 1:
        problems.append(Problem("external_addresses",
                                f"{', '.join(plain)}: more than one bare \"EXT\"; with several "
                                "relay addresses use \"EXT=BOUND\" for each"))
    elif plain and len(relay) > 1:
        problems.append(Problem("external_addresses",
                                f"{plain[0]}: a bare \"EXT\" needs exactly one relay address, "
                                f"but relay_addresses has {len(relay)}; use \"EXT=BOUND\""))
    elif plain and mapped:
        problems.append(Problem("external_addresses",
                                f"{plain[0]}: do not mix a bare \"EXT\" with \"EXT=BOUND\" "
                                "entries"))


def _check_peers(config: Config, problems: list[Problem]) -> None:
    for name in ("allowed_peers", "denied_peers"):
        for text in getattr(config, name):
            try:
                # strict: "10.0.0.1/8" has host bits set and almost always means a typo.
                ipaddress.ip_network(text, strict=True)
            except ValueError as exc:
                problems.append(Problem(name, f"{_show(text)} is not a valid CIDR ({exc})"))


def _read_file(path: str, option: str, problems: list[Problem]) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        problems.append(Problem(option, f"cannot read {path}: {exc.strerror or exc}"))
        return None


def _check_tls(config: Config, problems: list[Problem]) -> None:
    cert_path, key_path = config.tls_cert_file, config.tls_key_file
    if cert_path is None and key_path is None:
        return
    if cert_path is None:
        problems.append(Problem("tls_cert_file", "tls_key_file is set but tls_cert_file is not"))
    if key_path is None:
        problems.append(Problem("tls_key_file", "tls_cert_file is set but tls_key_file is not"))
    # Imported here: only needed when TLS files are configured, and it is a heavy import.
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    cert = None
    if cert_path is not None:
        data = _read_file(cert_path, "tls_cert_file", problems)
        if data is not None:
            try:
                chain = x509.load_pem_x509_certificates(data)
            except ValueError:
                chain = []
            if not chain:
                problems.append(Problem("tls_cert_file",
                                        f"{cert_path} holds no PEM certificate"))
            else:
                # Its dates are a warning (config_warnings), not a problem: an expired
                # certificate must not take UDP and TCP down with TLS, nor block a reload.
                cert = chain[0]
    key = None
    if key_path is not None:
        data = _read_file(key_path, "tls_key_file", problems)
        if data is not None:
            try:
                key = serialization.load_pem_private_key(data, password=None)
            except TypeError:
                problems.append(Problem("tls_key_file",
                                        f"{key_path} is encrypted; turnd needs an unencrypted "
                                        "key (protect it with file permissions)"))
            except (ValueError, UnsupportedAlgorithm):
                problems.append(Problem("tls_key_file",
                                        f"{key_path} holds no usable PEM private key"))
    if cert is not None and key is not None:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        cert_public = cert.public_key().public_bytes(der, spki)
        key_public = key.public_key().public_bytes(der, spki)
        if not hmac.compare_digest(cert_public, key_public):
            problems.append(Problem("tls_key_file",
                                    f"the key in {key_path} does not match the certificate in "
                                    f"{cert_path}"))


_MD5_KEY_RE = re.compile(r"0x[0-9a-fA-F]{32}")


def _check_static_users(path: str, problems: list[Problem]) -> None:
    data = _read_file(path, "static_users_file", problems)
    if data is None:
        return
    seen: set[bytes] = set()
    count = 0
    for number, line in enumerate(data.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(b"#"):
            continue
        user, sep, credential = line.partition(b":")
        # Messages carry the line number, never the line: it holds a password.
        if not sep or not user or not credential:
            problems.append(Problem("static_users_file",
                                    f"{path} line {number}: expected \"user:password\" or "
                                    "\"user:0x<md5 key>\""))
            continue
        try:
            name = user.decode("utf-8")
        except UnicodeDecodeError:
            problems.append(Problem("static_users_file",
                                    f"{path} line {number}: the user name is not UTF-8"))
            continue
        who = f"{path} line {number} (user {_show(name)})"  # the user, never the password
        if credential.lower().startswith(b"0x") and not _MD5_KEY_RE.fullmatch(
                credential.decode("ascii", "replace")):
            problems.append(Problem("static_users_file",
                                    f"{who}: a key must be 0x followed by 32 hex digits"))
            continue
        if user in seen:
            problems.append(Problem("static_users_file", f"{who}: user listed twice"))
            continue
        seen.add(user)
        count += 1
    if not count and not any(p.option == "static_users_file" for p in problems):
        problems.append(Problem("static_users_file", f"{path} lists no users"))


def _check_auth(config: Config, problems: list[Problem]) -> None:
    if config.secrets_file is not None:
        try:
            # An empty file is allowed (a warning, config_warnings): emptying it is how a leaked
            # secret is revoked, and a reload must not be refused for that.
            load_secrets(config, {})
        except ConfigError as exc:
            problems.extend(exc.problems)
    # No credentials at all is not a problem: `turnd serve` then makes a one-run secret.
    if config.static_users_file is not None:
        _check_static_users(config.static_users_file, problems)
    if not config.realm:
        problems.append(Problem("realm", "must not be empty"))
    elif len(config.realm) > _MAX_RFC8489_TEXT_CHARS:
        problems.append(Problem("realm", "must be fewer than 128 characters (RFC 8489 §14.9)"))


def _check_operations(config: Config, listeners: list[_Endpoint],
                      problems: list[Problem]) -> None:
    if config.default_lifetime_s > config.max_lifetime_s:
        problems.append(Problem("default_lifetime_s",
                                f"default_lifetime_s ({config.default_lifetime_s}) is greater "
                                f"than max_lifetime_s ({config.max_lifetime_s})"))
    if len(config.software) > _MAX_RFC8489_TEXT_CHARS:
        problems.append(Problem("software",
                                "must be fewer than 128 characters (RFC 8489 §14.14)"))
    if config.public_host is not None:
        host = config.public_host
        try:
            ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            if not _is_hostname(host):
                problems.append(Problem("public_host",
                                        f"{_show(host)} is neither a host name nor an IP "
                                        "address"))
    if config.alternate_server is not None:
        for ep in _endpoints("alternate_server", [config.alternate_server], problems):
            if ep.port == 0 or ep.address.is_unspecified:
                problems.append(Problem("alternate_server",
                                        f"{ep.text}: needs a specific address and a non-zero "
                                        "port"))
    if config.metrics_listen:
        for ep in _endpoints("metrics_listen", [config.metrics_listen], problems):
            for other in listeners:
                if other.option == "listen_udp" or not ep.port:
                    continue
                if other.port == ep.port and _overlaps(other.address, ep.address):
                    problems.append(Problem("metrics_listen",
                                            f"{ep.text} conflicts with {other.option} "
                                            f"{other.text}"))


# A certificate this close to its expiry is warned about (and the metrics alert fires).
CERT_WARNING_DAYS = 14


def config_warnings(config: Config, *, now: float | None = None) -> list[Problem]:
    """What is wrong but must not stop the server: a TLS certificate expired, not yet valid
    or expiring within CERT_WARNING_DAYS (TLS keeps serving it, as coturn does: UDP and TCP
    must not go down with it, and a browser reports the expiry plainly), and files holding
    secrets that other users can read. Never raises; unreadable files are check_config's."""
    import datetime

    out: list[Problem] = []
    when = datetime.datetime.fromtimestamp(time.time() if now is None else now, datetime.timezone.utc)
    if config.tls_cert_file:
        try:
            from cryptography import x509

            with open(config.tls_cert_file, "rb") as handle:
                chain = x509.load_pem_x509_certificates(handle.read())
        except (OSError, ValueError, ImportError):
            chain = []
        if chain:
            cert = chain[0]
            after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
            if after < when:
                out.append(Problem("tls_cert_file", f"the certificate in {config.tls_cert_file} "
                                   f"expired on {after:%Y-%m-%d %H:%M} UTC; TLS clients will "
                                   "refuse it (TLS keeps serving it, UDP and TCP are unaffected)"))
            elif before > when:
                out.append(Problem("tls_cert_file", f"the certificate in {config.tls_cert_file} "
                                   f"is not valid until {before:%Y-%m-%d %H:%M} UTC"))
            elif after - when < datetime.timedelta(days=CERT_WARNING_DAYS):
                out.append(Problem("tls_cert_file", f"the certificate in {config.tls_cert_file} "
                                   f"expires on {after:%Y-%m-%d %H:%M} UTC, in "
                                   f"{(after - when).days} day(s)"))
    if config.secrets_file:
        try:
            empty = not load_secrets(config, {})
        except ConfigError:
            empty = False  # unreadable: check_config's problem
        if empty:
            out.append(Problem("secrets_file", f"{config.secrets_file} holds no secrets: every "
                               "REST credential is refused (revoked) until one is added"))
    for option in ("secrets_file", "static_users_file", "tls_key_file"):
        path = getattr(config, option)
        if not path:
            continue
        try:
            mode = os.stat(path).st_mode
        except OSError:
            continue
        if mode & 0o004:
            out.append(Problem(option, f"{path} is readable by every user (mode "
                               f"{mode & 0o777:04o}); it holds secrets: chmod 0600 or 0640"))
    return out


def check_config(config: Config) -> list[Problem]:
    """Every problem with ``config`` that can be found without starting the server.

    Looks at the file system (certificates, keys, secrets and users files), tries to bind the
    relay addresses (proving they are local; nothing is sent) and looks for port conflicts.
    """
    problems: list[Problem] = []
    for option in OPTIONS:
        message = _validate_field(option, getattr(config, option.name))
        if message is not None:
            problems.append(Problem(option.name, message))
    if problems:
        # The deeper checks assume well-typed fields: they run on the defaults of the bad
        # ones, and say nothing more about those.
        bad = {p.option for p in problems}
        defaults = Config()
        config = dataclasses.replace(config, **{name: getattr(defaults, name) for name in bad})
        deeper = check_config(config)
        problems.extend(p for p in deeper if p.option not in bad)
        return problems
    listeners = _check_listeners(config, problems)
    _check_relay(config, listeners, problems)
    _check_tls(config, problems)
    _check_peers(config, problems)
    _check_auth(config, problems)
    _check_operations(config, listeners, problems)
    return problems


def reload_plan(old: Config, new: Config) -> tuple[list[str], list[str]]:
    """The options that differ, split into (applied on SIGHUP, needing a restart)."""
    live: list[str] = []
    restart: list[str] = []
    for option in OPTIONS:
        if getattr(old, option.name) != getattr(new, option.name):
            (live if option.reload else restart).append(option.name)
    return live, restart


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

F = TypeVar("F", bound=Callable[..., Any])

_METAVAR = {"str": "TEXT", "int": "INTEGER", "float": "SECONDS", "path": "PATH",
            "list": "VALUE[,VALUE...]"}


def _metavar(option: Option) -> str:
    if option.type == "choice":
        return "[" + "|".join(option.choices) + "]"
    if option.type == "float" and not option.name.endswith("_s"):
        return "NUMBER"
    if option.name.startswith("listen_") or option.name in ("metrics_listen",
                                                             "alternate_server"):
        return "IP:PORT" + (",..." if option.type == "list" else "")
    return _METAVAR[option.type]


def click_options(func: F | None = None, *, only: Iterable[str] | None = None) -> Any:
    """Add one --flag per Option (or per option named in ``only``); a flag not given arrives
    as None. Usable bare (``@click_options``) or with ``only`` (``@click_options(only=...)``).

    Values are passed through as text and converted by load_config, so that `turnd check`
    reports every bad flag at once alongside the file's and the environment's problems.
    """
    if func is None:
        return lambda f: click_options(f, only=only)
    import click

    chosen = OPTIONS if only is None else tuple(o for o in OPTIONS if o.name in set(only))
    for option in reversed(chosen):  # decorators apply bottom-up; keep registry order in --help
        help_text = f"{option.help} [env: {option.env}]"
        if option.type == "bool":
            dash = option.name.replace("_", "-")
            decorator = click.option(f"--{dash}/--no-{dash}", option.name, default=None,
                                     help=help_text)
        elif option.type == "list":
            decorator = click.option(option.cli_flag, option.name, multiple=True,
                                     default=None, metavar=_metavar(option),
                                     help=help_text + " Repeatable; \"\" gives an empty list.")
        else:
            decorator = click.option(option.cli_flag, option.name, default=None,
                                     metavar=_metavar(option), help=help_text)
        func = decorator(func)
    return func


def overrides_from_click(kwargs: Mapping[str, object]) -> dict[str, object]:
    """The option flags actually given on the command line, for load_config(overrides=...)."""
    out: dict[str, object] = {}
    for option in OPTIONS:
        if option.name not in kwargs:
            continue
        value = kwargs[option.name]
        # A repeatable flag not given arrives as (); `--listen-tls ""` arrives as ("",) and
        # means "the empty list".
        if value is None or (option.type == "list" and value == ()):
            continue
        out[option.name] = value
    return out


# --------------------------------------------------------------------------------------------
# Reference documentation
# --------------------------------------------------------------------------------------------

_TYPE_WORDS = {
    "str": "string", "int": "integer", "float": "number", "bool": "boolean",
    "list": "list of strings", "path": "file path", "choice": "one of",
}


def _doc_type(option: Option) -> str:
    word = _TYPE_WORDS[option.type]
    if option.type == "choice":
        return word + " " + ", ".join(f"`{c}`" for c in option.choices)
    if option.minimum is not None and option.maximum is not None:
        return f"{word}, {_number(option.minimum)} to {_number(option.maximum)}"
    if option.minimum is not None:
        return f"{word}, at least {_number(option.minimum)}"
    return word


def _doc_default(option: Option) -> str:
    if option.default is None:
        return "unset"
    if option.default == () or option.default == "":
        return f"`{toml_literal(option.default)}` (empty)"
    return f"`{toml_literal(option.default)}`"


_EXAMPLE_TOML = """\
# /etc/turnd/turnd.toml
listen_udp = ["0.0.0.0:3478", "[::]:3478"]
listen_tcp = ["0.0.0.0:3478", "[::]:3478"]
listen_tls = ["0.0.0.0:443"]

tls_cert_file = "/etc/letsencrypt/live/turn.example.com/fullchain.pem"
tls_key_file = "/etc/letsencrypt/live/turn.example.com/privkey.pem"

# A cloud VM: the private address 10.0.0.5 is mapped 1:1 to 203.0.113.7.
relay_addresses = ["10.0.0.5"]
external_addresses = ["203.0.113.7=10.0.0.5"]
relay_port_min = 49152
relay_port_max = 65535

realm = "turn.example.com"
secrets_file = "/etc/turnd/secrets"

# Keep relays away from the internal network.
denied_peers = ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]

user_quota = 10
public_host = "turn.example.com"
"""


def render_markdown() -> str:
    """The operator reference, docs/configuration.md (a test keeps the file equal to this)."""
    out: list[str] = []
    add = out.append
    add("# Configuration reference")
    add("")
    add("<!-- Generated by `python -m turnserver.config --markdown` from the option registry "
        "in turnserver/config.py. Do not edit by hand. -->")
    add("")
    add("Every option can be set in four places. Highest precedence first:")
    add("")
    add("1. a command-line flag, e.g. `--relay-port-min 50000`;")
    add(f"2. an environment variable, e.g. `{ENV_PREFIX}RELAY_PORT_MIN=50000`;")
    add("3. the TOML file, e.g. `relay_port_min = 50000`;")
    add("4. the built-in default.")
    add("")
    add(f"The TOML file is the one given with `--config PATH` (or `{CONFIG_ENV}`); without "
        f"either, `{DEFAULT_CONFIG_PATH}` is read if it exists, and the defaults alone are "
        "used if it does not. Options are top-level keys; the sections below only group "
        "them. An unknown key, a wrong type or an out-of-range value stops start-up with a "
        "message naming the option, and all such problems are reported at once.")
    add("")
    add("## Value syntax")
    add("")
    add("| Type | TOML | Environment variable and flag |")
    add("|---|---|---|")
    add("| string, file path | `\"text\"` | `text` |")
    add("| integer, number | `600`, `30.0` | `600`, `30.0` |")
    add("| boolean | `true` / `false` | `true`/`false`, `1`/`0`, `yes`/`no`, `on`/`off`; "
        "flags are `--name` / `--no-name` |")
    add("| list of strings | `[\"a\", \"b\"]` | `a,b` (comma- or newline-separated); a flag "
        "may be repeated |")
    add("")
    add("An option whose default is *unset* is unset again by the empty string. A relative "
        "file path in the TOML file is relative to the directory of that file; in the "
        "environment or on the command line it is relative to the working directory. "
        "`--listen-tls \"\"` (or `TURND_LISTEN_TLS=`) gives an empty list, which disables "
        "those listeners.")
    add("")
    add("## Secrets")
    add("")
    add(f"Shared secrets for TURN REST API credentials are never a flag (argv is readable by "
        f"every local user). They come from the file named by `secrets_file`, one per line, "
        f"and from the environment variable `{SECRETS_ENV}` (one per line: a comma may be part "
        f"of a secret), in "
        f"that order. Every secret is accepted; the first one is used to mint credentials, so "
        f"a new secret is rolled out by adding it first and removing the old one later. "
        f"Secrets do not belong in the TOML file, which is usually world-readable.")
    add("")
    add("## Reloading")
    add("")
    add("`systemctl reload turnd` (SIGHUP) re-reads the file, the environment the process "
        "started with and the secrets and users files. Options marked *reload* take effect "
        "at once; a change to an option marked *restart* is logged and ignored until the next "
        "restart. `turnd check` validates a configuration without touching the running "
        "server.")
    add("")
    add("## Checks")
    add("")
    add("`turnd check [--config PATH] [flags]` loads the configuration exactly as start-up "
        "does and then checks it more deeply: CIDR syntax of the peer lists, that the TLS "
        "certificate and key are readable, valid now and match each other, that the relay "
        "addresses belong to this host, that the relay port range is sane, listener syntax "
        "and port conflicts (between listeners, with the relay port range and with the "
        "metrics endpoint), the external address mapping and the secrets and users files. "
        "It prints `configuration OK` and exits 0, or prints every problem as "
        "`option: message` and exits 2.")
    add("")
    for section, title in SECTIONS:
        members = [o for o in OPTIONS if o.section == section]
        add(f"## {title}")
        add("")
        add("| Option | Type | Default | On SIGHUP |")
        add("|---|---|---|---|")
        for o in members:
            add(f"| [`{o.name}`](#{o.name}) | {_TYPE_WORDS[o.type]} | {_doc_default(o)} | "
                f"{'reload' if o.reload else 'restart'} |")
        add("")
        for o in members:
            add(f"### `{o.name}`")
            add("")
            add(o.help)
            add("")
            add(f"- Type: {_doc_type(o)}")
            add(f"- Default: {_doc_default(o)}")
            add(f"- Environment: `{o.env}`")
            add(f"- Flag: `{o.cli_flag}`")
            add("- On SIGHUP: " + ("reloaded" if o.reload else "needs a restart"))
            add("")
    add("## Examples")
    add("")
    add("A public server with a real certificate, behind a 1:1 NAT:")
    add("")
    add("```toml")
    out.extend(_EXAMPLE_TOML.rstrip("\n").split("\n"))
    add("```")
    add("")
    add("A narrower relay port range and extra denials from the environment, e.g. in a "
        "systemd drop-in:")
    add("")
    add("```ini")
    add("[Service]")
    add("Environment=TURND_RELAY_PORT_MIN=40000 TURND_RELAY_PORT_MAX=40999")
    add("Environment=TURND_DENIED_PEERS=10.0.0.0/8,192.168.0.0/16")
    add("```")
    add("")
    add("A one-off run on loopback with no TLS, from the command line:")
    add("")
    add("```sh")
    add("TURND_SECRETS=$(cat /run/secrets/turn) turnd serve --listen-udp 127.0.0.1:3478 \\")
    add("    --listen-tcp 127.0.0.1:3478 --listen-tls \"\" --relay-addresses 127.0.0.1 \\")
    add("    --allowed-peers 127.0.0.0/8")
    add("```")
    add("")
    add("Migrating from coturn: `turnd convert-coturn /etc/turnserver.conf -o turnd.toml` "
        "writes the equivalent TOML and lists, as comments at the top and on stderr, each "
        "coturn option it could not carry over and why. It never copies secrets or "
        "passwords.")
    add("")
    return "\n".join(out)


def _main(argv: list[str]) -> int:
    if argv == ["--markdown"]:
        sys.stdout.write(render_markdown())
        return 0
    sys.stderr.write("usage: python -m turnserver.config --markdown\n")
    return 2



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


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
