"""The deep checks of a loaded ``Config``: across options, against the file system (TLS files,
secrets and users files) and the host (relay and listener addresses are bound, nothing is
sent); the warnings that must not stop the server; and what a reload would apply."""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import os
import re
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass

from .addresses import _is_hostname, parse_hostport
from .convert import _show, _validate_field
from .load import load_secrets
from .registry import (
    _MAX_RFC8489_TEXT_CHARS,
    MIN_RELAY_PORTS,
    OPTIONS,
    Config,
    ConfigError,
    Problem,
)

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
