"""Convert a coturn ``turnserver.conf`` into turnd's TOML configuration.

coturn's syntax: one option per line as ``key=value``, ``key value`` or a bare ``key`` (a flag),
``#`` starts a comment line, keys may repeat (listening-ip, relay-ip, external-ip, user,
allowed-peer-ip, ...). A flag may also carry a boolean value (``no-tcp=false``).

The result is the TOML for ``turnserver.config.Config`` plus one note per coturn option that
could not be carried over, saying why. Secrets and passwords (static-auth-secret, user=,
cli-password, pkey-pwd, database connection strings) are never copied into either: the TOML
points at a file and the note says what to put there.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from turnserver.config import OPTIONS, OPTIONS_BY_NAME, SECTIONS, format_hostport, toml_literal

__all__ = ["DEFAULT_SECRETS_PATH", "DEFAULT_USERS_PATH", "convert", "parse_coturn"]

DEFAULT_SECRETS_PATH = "/etc/turnd/secrets"
DEFAULT_USERS_PATH = "/etc/turnd/users"

# coturn's defaults where they matter for the conversion.
_COTURN_PORT = 3478
_COTURN_TLS_PORT = 5349
_COTURN_PROMETHEUS_PORT = 9641
_COTURN_STALE_NONCE_S = 600
# RFC 8656 §7.2: the default allocation lifetime.
_DEFAULT_LIFETIME_S = 600

# coturn reads these words as false for a flag written with a value (turnserver.conf header).
_COTURN_FALSE = frozenset({"0", "off", "no", "false", "f"})

# Options whose values are secret: neither the TOML nor a note may repeat them.
_SENSITIVE = frozenset({
    "static-auth-secret", "user", "cli-password", "pkey-pwd", "userdb", "psql-userdb",
    "mysql-userdb", "mongo-userdb", "redis-userdb", "redis-statsdb", "secret-key-file",
    "oauth", "web-admin-password",
})


@dataclass(frozen=True)
class CoturnLine:
    number: int
    key: str
    value: str | None  # None for a bare flag


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def parse_coturn(text: str) -> list[CoturnLine]:
    """The option lines of a turnserver.conf, in order, comments and blanks dropped."""
    lines: list[CoturnLine] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # The command-line spelling (--realm=x) is accepted in the file as well.
        line = line.lstrip("-")
        cut = len(line)
        for i, ch in enumerate(line):
            if ch == "=" or ch.isspace():
                cut = i
                break
        key, rest = line[:cut], line[cut:].strip()
        if rest.startswith("="):
            rest = rest[1:].strip()
        lines.append(CoturnLine(number, key, _unquote(rest) if rest else None))
    return lines


@dataclass
class _State:
    listening_port: int = _COTURN_PORT
    tls_port: int = _COTURN_TLS_PORT
    listening_ips: list[str] = field(default_factory=list)
    no_udp: bool = False
    no_tcp: bool = False
    no_tls: bool = False
    no_dtls: bool = False
    cert: str | None = None
    pkey: str | None = None
    secret_lines: list[int] = field(default_factory=list)
    use_auth_secret: bool = False
    user_lines: list[int] = field(default_factory=list)
    prometheus: bool = False
    prometheus_port: int = _COTURN_PROMETHEUS_PORT
    max_lifetime: int | None = None
    alternate: str | None = None
    values: dict[str, object] = field(default_factory=dict)
    allowed: list[str] = field(default_factory=list)
    denied: list[str] = field(default_factory=list)
    relay: list[str] = field(default_factory=list)
    external: list[str] = field(default_factory=list)
    stun_only: bool = False
    keys: set[str] = field(default_factory=set)  # every coturn option the file mentions
    notes: list[str] = field(default_factory=list)


def _note(state: _State, line: CoturnLine, reason: str, *, show_value: bool = True) -> None:
    if line.value is not None and show_value and line.key not in _SENSITIVE:
        where = f"{line.key}={line.value}"
    else:
        where = line.key
    state.notes.append(f"line {line.number}: {where}: {reason}")


def _flag_on(line: CoturnLine) -> bool:
    return line.value is None or line.value.strip().lower() not in _COTURN_FALSE


def _int(state: _State, line: CoturnLine, low: int, high: int) -> int | None:
    try:
        value = int((line.value or "").strip(), 10)
    except ValueError:
        _note(state, line, "not an integer; not carried over")
        return None
    if not low <= value <= high:
        _note(state, line, f"outside {low}-{high}; not carried over")
        return None
    return value


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text.strip().strip("[]"))
    except ValueError:
        return None




def _peer_cidrs(text: str) -> list[str] | None:
    """coturn's "a.b.c.d", "a-b" range or CIDR as exact CIDRs; None if it is none of those."""
    text = text.strip()
    if "-" in text:
        first_text, _, last_text = text.partition("-")
        first, last = _ip(first_text), _ip(last_text)
        if first is None or last is None or first.version != last.version or first > last:
            return None
        # summarize_address_range covers exactly [first, last]; nothing more, nothing less.
        return [str(n) for n in ipaddress.summarize_address_range(first, last)]  # type: ignore[arg-type]
    if "/" in text:
        try:
            return [str(ipaddress.ip_network(text, strict=True))]
        except ValueError:
            return None
    address = _ip(text)
    if address is None:
        return None
    return [str(ipaddress.ip_network(address))]


def _coturn_alternate(text: str) -> str | None:
    """coturn's "ip[:port]" or "[v6][:port]" as turnd's "ip:port" (port defaulting to 3478)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, ""
    address = _ip(host)
    if address is None or address.is_unspecified:
        return None
    if port_text:
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            return None
        port = int(port_text)
    else:
        port = _COTURN_PORT
    return format_hostport(str(address), port)


# -- handlers: one per coturn option, each recording values or notes ---------------------------

Handler = Callable[[_State, CoturnLine], None]


def _needs_value(handler: Handler) -> Handler:
    def wrapped(state: _State, line: CoturnLine) -> None:
        if line.value is None or not line.value.strip():
            _note(state, line, "needs a value; ignored")
            return
        handler(state, line)
    return wrapped


_STATE_FIELDS = frozenset(f.name for f in dataclasses.fields(_State))
_PORT = (1, 65535)
_COUNT = (0, 2**31 - 1)


def _integer(target: str, bounds: tuple[int, int]) -> Handler:
    """An integer option within ``bounds``, stored as the turnd option ``target`` or, when
    _finish combines it with other lines, in the _State field ``target``."""
    to_option = target in OPTIONS_BY_NAME
    if not to_option and target not in _STATE_FIELDS:  # pragma: no cover - a typo here
        raise AssertionError(f"{target} is neither a turnd option nor a _State field")

    @_needs_value
    def handler(state: _State, line: CoturnLine) -> None:
        value = _int(state, line, *bounds)
        if value is None:
            return
        if to_option:
            state.values[target] = value
        else:
            setattr(state, target, value)
    return handler


@_needs_value
def _listening_ip(state: _State, line: CoturnLine) -> None:
    address = _ip(line.value or "")
    if address is None:
        _note(state, line, "not an IP address; not carried over")
    elif str(address) not in state.listening_ips:
        state.listening_ips.append(str(address))


@_needs_value
def _relay_ip(state: _State, line: CoturnLine) -> None:
    address = _ip(line.value or "")
    if address is None:
        _note(state, line, "not an IP address; not carried over")
    elif str(address) not in state.relay:
        state.relay.append(str(address))


@_needs_value
def _external_ip(state: _State, line: CoturnLine) -> None:
    # coturn: "EXT" for the single relay address, "EXT/PRIVATE" per mapped address.
    public_text, slash, private_text = (line.value or "").strip().partition("/")
    public = _ip(public_text)
    if public is None:
        _note(state, line, "turnd needs the external address as an IP literal (host names are "
                           "not resolved); not carried over")
        return
    if not slash:
        state.external.append(str(public))
        return
    private = _ip(private_text)
    if private is None or private.version != public.version:
        _note(state, line, "the private part is not an IP address of the same family; not "
                           "carried over")
        return
    state.external.append(f"{public}={private}")


def _state_flag(name: str) -> Handler:
    """A coturn on/off option remembered on the state, for _finish to explain."""
    def handler(state: _State, line: CoturnLine) -> None:
        setattr(state, name, _flag_on(line))
    return handler


def _tcp_relay_off(state: _State, line: CoturnLine) -> None:
    """coturn's no-tcp-relay: turnd's tcp_relay = false (RFC 6062 allocations get 442)."""
    state.values["tcp_relay"] = not _flag_on(line)


@_needs_value
def _realm(state: _State, line: CoturnLine) -> None:
    state.values["realm"] = (line.value or "").strip()


def _use_auth_secret(state: _State, line: CoturnLine) -> None:
    state.use_auth_secret = _flag_on(line)


def _static_auth_secret(state: _State, line: CoturnLine) -> None:
    # coturn treats a static secret as switching the REST API mechanism on.
    if line.value:
        state.secret_lines.append(line.number)
        state.use_auth_secret = True


def _user(state: _State, line: CoturnLine) -> None:
    if line.value:
        state.user_lines.append(line.number)


@_needs_value
def _cert(state: _State, line: CoturnLine) -> None:
    state.cert = line.value


@_needs_value
def _pkey(state: _State, line: CoturnLine) -> None:
    state.pkey = line.value


def _peer_list(target: str) -> Handler:
    @_needs_value
    def handler(state: _State, line: CoturnLine) -> None:
        cidrs = _peer_cidrs(line.value or "")
        if cidrs is None:
            _note(state, line, "not an address, an address range \"a-b\" of one family, or a "
                               "CIDR; not carried over")
            return
        bucket = state.allowed if target == "allowed" else state.denied
        bucket.extend(c for c in cidrs if c not in bucket)
    return handler


def _flag_into(attribute: str) -> Handler:
    def handler(state: _State, line: CoturnLine) -> None:
        setattr(state, attribute, _flag_on(line))
    return handler


def _stale_nonce(state: _State, line: CoturnLine) -> None:
    if line.value is None:
        state.values["nonce_lifetime_s"] = _COTURN_STALE_NONCE_S
        return
    if line.value.strip().lower() in _COTURN_FALSE:
        return
    value = _int(state, line, 1, 86400)
    if value is not None:
        state.values["nonce_lifetime_s"] = value


def _allow_loopback_peers(state: _State, line: CoturnLine) -> None:
    if not _flag_on(line):
        return
    for cidr in ("127.0.0.0/8", "::1/128"):
        if cidr not in state.allowed:
            state.allowed.append(cidr)
    _note(state, line, "WARNING: carried over as allowed_peers 127.0.0.0/8 and ::1/128, which "
                       "lets clients relay to services on this host; remove them outside "
                       "testing", show_value=False)


def _prometheus(state: _State, line: CoturnLine) -> None:
    state.prometheus = _flag_on(line)


def _verbose(level: str) -> Handler:
    def handler(state: _State, line: CoturnLine) -> None:
        if _flag_on(line):
            state.values["log_level"] = level
    return handler


@_needs_value
def _server_name(state: _State, line: CoturnLine) -> None:
    state.values["public_host"] = (line.value or "").strip()


@_needs_value
def _alternate_server(state: _State, line: CoturnLine) -> None:
    converted = _coturn_alternate(line.value or "")
    if converted is None:
        _note(state, line, "not \"ip[:port]\"; not carried over")
        return
    if state.alternate is not None:
        _note(state, line, "turnd has a single alternate_server; only the first is carried "
                           "over")
        return
    state.alternate = converted
    _note(state, line, f"carried over as alternate_server = \"{converted}\", but coturn "
                       "redirected every Allocate to its alternate servers while turnd sends "
                       "300 Try Alternate only while draining", show_value=False)


def _no_software_attribute(state: _State, line: CoturnLine) -> None:
    if _flag_on(line):
        state.values["software"] = ""


@_needs_value
def _rest_api_separator(state: _State, line: CoturnLine) -> None:
    if (line.value or "").strip() != ":":
        _note(state, line, "turnd's REST API usernames are \"<expiry>:<user>\" with ':'; "
                           "credentials minted with another separator will not verify")


def _ignore(state: _State, line: CoturnLine) -> None:
    """Already turnd's behaviour, nothing to carry over."""


def _explain(reason: str) -> Handler:
    def handler(state: _State, line: CoturnLine) -> None:
        _note(state, line, reason)
    return handler


_LOGS = "turnd logs to stderr (journald under systemd); use log_level and log_format"
_NO_CLI = "turnd has no telnet admin CLI; use the /metrics endpoint and systemctl"
_NO_WEB = "turnd has no web admin interface"
_TLS_DEFAULTS = "turnd uses the Python ssl defaults (TLS 1.2 and later, the system cipher policy)"
_NO_DB = ("turnd reads no user database; export REST API secrets to secrets_file and static "
          "users to static_users_file")
_NO_5780 = "RFC 5780 NAT behaviour discovery is not supported (no alternate ports)"
_THREADS = "turnd runs one event loop per process and has no thread pool"

_HANDLERS: dict[str, Handler] = {
    # listeners
    "listening-port": _integer("listening_port", _PORT),
    "tls-listening-port": _integer("tls_port", _PORT),
    "listening-ip": _listening_ip,
    "no-udp": _flag_into("no_udp"),
    "no-tcp": _flag_into("no_tcp"),
    "no-tls": _flag_into("no_tls"),
    "no-dtls": _flag_into("no_dtls"),
    "alt-listening-port": _explain(_NO_5780),
    "alt-tls-listening-port": _explain(_NO_5780),
    "listening-device": _explain("turnd binds addresses, not devices; use listen_* addresses"),
    "aux-server": _explain("add the address to listen_udp/listen_tcp instead"),
    "udp-self-balance": _explain("no ALTERNATE-SERVER load balancing"),
    "tcp-proxy-port": _explain("the PROXY protocol is not supported"),
    # relay
    "relay-ip": _relay_ip,
    "external-ip": _external_ip,
    "min-port": _integer("relay_port_min", _PORT),
    "max-port": _integer("relay_port_max", _PORT),
    "relay-device": _explain("turnd binds addresses, not devices; use relay_addresses"),
    "relay-threads": _explain(_THREADS),
    "general-threads": _explain(_THREADS),
    "no-tcp-relay": _tcp_relay_off,
    "no-udp-relay": _explain("turnd always offers UDP allocations (RFC 8656) beside TCP ones "
                             "(RFC 6062), so this cannot be reproduced"),
    "keep-address-family": _explain("turnd follows RFC 8656 §7.2 address family selection"),
    "allocation-default-address-family": _explain("turnd follows RFC 8656 §7.2: IPv4 unless "
                                                  "REQUESTED-ADDRESS-FAMILY says otherwise"),
    "mobility": _explain("MICE mobility is not supported"),
    "server-relay": _explain("permissions are always enforced (RFC 8656 §9)"),
    # auth
    "realm": _realm,
    "use-auth-secret": _use_auth_secret,
    "static-auth-secret": _static_auth_secret,
    "user": _user,
    "lt-cred-mech": _ignore,  # turnd always uses the long-term credential mechanism.
    "no-auth": _explain("turnd always requires credentials (RFC 8656 §5)"),
    "userdb": _explain(_NO_DB),
    "psql-userdb": _explain(_NO_DB),
    "mysql-userdb": _explain(_NO_DB),
    "mongo-userdb": _explain(_NO_DB),
    "redis-userdb": _explain(_NO_DB),
    "secret-key-file": _explain("not needed: turnd reads no database"),
    "oauth": _explain("third-party authorization (RFC 7635) is not supported"),
    "rest-api-separator": _rest_api_separator,
    "stale-nonce": _stale_nonce,
    "secure-stun": _explain("Binding requests are answered without authentication"),
    "check-origin-consistency": _explain("ORIGIN is not checked"),
    # tls
    "cert": _cert,
    "pkey": _pkey,
    "pkey-pwd": _explain("turnd needs an unencrypted key: decrypt it with `openssl pkey` and "
                         "protect the file with its permissions"),
    "cipher-list": _explain(_TLS_DEFAULTS),
    "ec-curve-name": _explain(_TLS_DEFAULTS),
    "dh566": _explain(_TLS_DEFAULTS),
    "dh1066": _explain(_TLS_DEFAULTS),
    "dh2066": _explain(_TLS_DEFAULTS),
    "dh-file": _explain(_TLS_DEFAULTS),
    "CA-file": _explain("client certificates are not requested"),
    "no-tlsv1": _ignore,  # never offered: the ssl module's floor is TLS 1.2.
    "no-tlsv1_1": _ignore,
    "no-tlsv1_2": _explain(_TLS_DEFAULTS),
    "no-tlsv1_3": _explain(_TLS_DEFAULTS),
    # policy
    "allowed-peer-ip": _peer_list("allowed"),
    "denied-peer-ip": _peer_list("denied"),
    "no-multicast-peers": _ignore,  # built-in denial in turnd's peer policy.
    "no-loopback-peers": _ignore,  # built-in denial in turnd's peer policy.
    "allow-loopback-peers": _allow_loopback_peers,
    # limits
    "total-quota": _integer("max_allocations", _COUNT),
    "user-quota": _integer("user_quota", _COUNT),
    "max-allocate-lifetime": _integer("max_lifetime", (1, 2**31 - 1)),
    "channel-lifetime": _explain("fixed by RFC 8656 §12 at 600 s"),
    "permission-lifetime": _explain("fixed by RFC 8656 §9 at 300 s"),
    # coturn's max-bps: bytes per second per session, each direction apart; as turnd's.
    "max-bps": _integer("allocation_bandwidth_bytes_s", _COUNT),
    "bps-capacity": _integer("server_bandwidth_bytes_s", _COUNT),
    "max-allocate-timeout": _explain("not configurable"),
    "stun-only": _state_flag("stun_only"),
    "no-stun": _explain("Binding requests are always answered"),
    "no-rfc5780": _ignore,  # turnd never implements RFC 5780, so never amplifies with it.
    "no-stun-backward-compatibility": _ignore,  # responses carry XOR-MAPPED-ADDRESS (RFC 8489).
    "response-origin-only-with-rfc5780": _ignore,
    # observability
    "prometheus": _prometheus,
    "prometheus-port": _integer("prometheus_port", _PORT),
    "prometheus-username-labels": _explain("metrics never carry usernames (cardinality and "
                                           "privacy)"),
    "verbose": _verbose("info"),
    "Verbose": _verbose("debug"),
    "log-file": _explain(_LOGS),
    "syslog": _explain(_LOGS),
    "syslog-facility": _explain(_LOGS),
    "no-stdout-log": _explain(_LOGS),
    "simple-log": _explain(_LOGS),
    "new-log-timestamp": _explain(_LOGS),
    "new-log-timestamp-format": _explain(_LOGS),
    "log-binding": _explain("Binding requests are never logged (no per-packet logging)"),
    # operations
    "server-name": _server_name,
    "alternate-server": _alternate_server,
    "tls-alternate-server": _explain("turnd has one alternate_server for every transport"),
    "no-software-attribute": _no_software_attribute,
    "fingerprint": _ignore,  # FINGERPRINT handling follows RFC 8489 §14.7 without a switch.
    "pidfile": _explain("no pid file: systemd (Type=notify) tracks the process"),
    "proc-user": _explain("the systemd unit runs turnd as its own user"),
    "proc-group": _explain("the systemd unit runs turnd as its own group"),
    "no-cli": _ignore,  # turnd has no admin CLI to turn off.
    "cli-ip": _explain(_NO_CLI),
    "cli-port": _explain(_NO_CLI),
    "cli-password": _explain(_NO_CLI),
    "cli-max-output-sessions": _explain(_NO_CLI),
    "web-admin": _explain(_NO_WEB),
    "web-admin-ip": _explain(_NO_WEB),
    "web-admin-port": _explain(_NO_WEB),
    "web-admin-listen-on-workers": _explain(_NO_WEB),
    "acme-redirect": _explain("no HTTP listener; serve ACME challenges elsewhere"),
    "ne": _explain("coturn-internal network engine setting"),
    "redis-statsdb": _explain("statistics are exported on /metrics instead"),
}


def _finish(state: _State, base_dir: str | None) -> dict[str, object]:
    values = dict(state.values)
    # Listeners: coturn listens on every address unless listening-ip narrows it.
    hosts = state.listening_ips or ["0.0.0.0", "::"]
    values["listen_udp"] = [] if state.no_udp else [format_hostport(h, state.listening_port)
                                                     for h in hosts]
    values["listen_tcp"] = [] if state.no_tcp else [format_hostport(h, state.listening_port)
                                                     for h in hosts]
    # turnd needs both files: with one missing (coturn then looked for its default file),
    # neither is written and TLS stays off, so that `turnd check` accepts the result.
    tls_files = state.cert is not None and state.pkey is not None
    tls_on = not state.no_tls and tls_files
    values["listen_tls"] = [format_hostport(h, state.tls_port) for h in hosts] if tls_on else []
    if not state.no_tls and state.cert is None:
        state.notes.append("tls: no cert option, so listen_tls is left empty (coturn serves TLS "
                           "only with a certificate; turnd would otherwise make a self-signed "
                           "one)")
    if not state.no_dtls and state.cert is not None:
        state.notes.append("dtls: coturn also served DTLS on the TLS port; turnd has no DTLS, "
                           "clients must use UDP, TCP or TLS")
    # Certbot's files only root can read: point at where docs/deploy.md's hook copies them.
    hooked = {"tls_cert_file": "/etc/turnd/tls/fullchain.pem",
              "tls_key_file": "/etc/turnd/tls/privkey.pem"}
    for name, path in (("tls_cert_file", state.cert), ("tls_key_file", state.pkey)):
        if path is None or not tls_files:
            continue
        if os.path.normpath(path).startswith("/etc/letsencrypt/"):
            values[name] = hooked[name]
            continue
        if not os.path.isabs(path):
            if base_dir is not None:
                # coturn resolves a relative cert or pkey against its configuration file.
                path = os.path.normpath(os.path.join(base_dir, path))
            else:
                state.notes.append(f"{name}: {path!r} is relative; coturn resolved it against "
                                   "its configuration directory, turnd against the TOML file's "
                                   "directory: make it absolute")
        values[name] = path
    if (state.cert is None) != (state.pkey is None):
        missing = "pkey" if state.pkey is None else "cert"
        state.notes.append(f"{missing}: not set, so coturn looked for its default "
                           f"turn_server_{missing}.pem; listen_tls is left empty: set "
                           "tls_cert_file and tls_key_file to the files actually used, and "
                           "listen_tls")
    if state.relay:
        values["relay_addresses"] = state.relay
    if state.external:
        values["external_addresses"] = _external_entries(state)
    # coturn's limits default to unlimited; turnd's do not. Say what applies now.
    if "user-quota" not in state.keys:
        state.notes.append("user-quota: unset, so coturn allowed any number of allocations per "
                           "user; turnd allows 32 (user_quota) per user part of a REST username, "
                           "as coturn counts it: raise it if many clients share one user part")
    if "total-quota" not in state.keys:
        state.notes.append("total-quota: unset, so coturn allowed any number of allocations; "
                           "turnd allows 10000 (max_allocations)")
    if "max-bps" not in state.keys:
        state.notes.append("max-bps: unset, so coturn did not limit a session's bandwidth; "
                           "turnd caps each allocation at 625000 bytes/s (5 Mbit/s) each way "
                           "(allocation_bandwidth_bytes_s)")
    if state.stun_only:
        state.notes.append("stun-only: turnd has no STUN-only mode; it answers Binding without "
                           "credentials and serves TURN to holders of a credential, and with "
                           "no secrets_file or static_users_file it generates a secret and "
                           "serves TURN. Configure a secret that you give to nobody to keep "
                           "TURN closed")
    for path in (state.cert, state.pkey):
        if path and os.path.normpath(path).startswith("/etc/letsencrypt/"):
            state.notes.append(f"cert/pkey: {path} is under /etc/letsencrypt, which only root "
                               "can read and turnd does not run as root: tls_cert_file and "
                               "tls_key_file point at /etc/turnd/tls instead, where the certbot "
                               "deploy hook of docs/deploy.md (section 5) copies them; install "
                               "the hook and run it once")
            break
    if state.allowed:
        values["allowed_peers"] = state.allowed
    if state.denied:
        values["denied_peers"] = state.denied
    if state.use_auth_secret:
        values["secrets_file"] = DEFAULT_SECRETS_PATH
        if state.secret_lines:
            lines = ", ".join(str(n) for n in state.secret_lines)
            state.notes.append(f"static-auth-secret: not copied (secrets never go into the "
                               f"TOML); put the secret from line(s) {lines} into "
                               f"{DEFAULT_SECRETS_PATH}, one per line, readable only by turnd")
        else:
            state.notes.append(f"use-auth-secret: coturn took the secrets from its database; "
                               f"put them into {DEFAULT_SECRETS_PATH}, one per line")
    if state.user_lines:
        values["static_users_file"] = DEFAULT_USERS_PATH
        lines = ", ".join(str(n) for n in state.user_lines)
        state.notes.append(f"user: {len(state.user_lines)} static user(s) not copied "
                           f"(passwords never go into the TOML); move the user= values from "
                           f"line(s) {lines} into {DEFAULT_USERS_PATH} as \"user:password\" or "
                           f"\"user:0x<key>\" lines (0x keys stay valid only with the same realm)")
    if state.max_lifetime is not None:
        values["max_lifetime_s"] = state.max_lifetime
        if state.max_lifetime < _DEFAULT_LIFETIME_S:
            values["default_lifetime_s"] = state.max_lifetime
    if state.prometheus:
        values["metrics_listen"] = f"0.0.0.0:{state.prometheus_port}"
        state.notes.append(f"prometheus: coturn served metrics on every address; metrics_listen "
                           f"is 0.0.0.0:{state.prometheus_port} to match; narrow it if the "
                           "scraper is local. turnd's metric names (turn_*) differ from "
                           "coturn's")
    if state.alternate is not None:
        values["alternate_server"] = state.alternate
    return values


def _external_entries(state: _State) -> list[str]:
    """external_addresses as turnd reads them. A plain "EXT" is valid for a single relay
    address only; with several, it becomes "EXT=BOUND" for the first relay address of its
    family (coturn's plain external-ip maps onto its first relay address), with a note."""
    plain = [e for e in state.external if "=" not in e]
    if len(state.relay) <= 1 or not plain:
        return list(state.external)
    out = []
    for entry in state.external:
        if "=" in entry:
            out.append(entry)
            continue
        family = ":" in entry
        bound = next((r for r in state.relay if (":" in r) == family), None)
        if bound is None:
            state.notes.append(f"external-ip: {entry} has no relay address of its family; not "
                               "carried over")
            continue
        out.append(f"{entry}={bound}")
        state.notes.append(f"external-ip: {entry} written as \"{entry}={bound}\" (several "
                           "relay addresses need the EXT=BOUND form); check that it is the "
                           "relay address behind that public address")
    return out


def _render(values: dict[str, object]) -> str:
    out = ["# turnd configuration converted from a coturn turnserver.conf by "
           "`turnd convert-coturn`.",
           "# Review it, then run `turnd check --config <this file>`."]
    for section, title in SECTIONS:
        names = [o.name for o in OPTIONS if o.section == section and o.name in values]
        if not names:
            continue
        out.append("")
        out.append(f"# {title}")
        for name in names:
            out.append(f"{name} = {toml_literal(values[name])}")
    return "\n".join(out) + "\n"


def convert(text: str, *, base_dir: str | None = None) -> tuple[str, list[str]]:
    """Convert a coturn turnserver.conf; return (TOML for turnd, one note per loose end).

    ``base_dir`` is the directory of the coturn file, against which coturn resolves relative
    cert and pkey paths. Secrets and passwords appear in neither return value.
    """
    state = _State()
    for line in parse_coturn(text):
        state.keys.add(line.key)
        handler = _HANDLERS.get(line.key)
        if handler is None:
            _note(state, line, "unknown coturn option; not carried over", show_value=False)
            continue
        handler(state, line)
    values = _finish(state, base_dir)
    unknown = set(values) - set(OPTIONS_BY_NAME)
    if unknown:  # pragma: no cover - a bug in this module, not in the input
        raise AssertionError(f"conversion produced unknown options {sorted(unknown)}")
    return _render(values), state.notes
