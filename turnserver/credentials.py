"""Mint time-limited TURN credentials in an application backend.

The server and the backend share a secret (``static-auth-secret`` in coturn's
terms, the first line of turnd's secrets file).  The backend hands each client
a username that carries its own expiry and a password derived from it; the
server recomputes the password and needs no user database.  The scheme is the
"TURN REST API" (draft-uberti-behave-turn-rest-00) that coturn and most
WebRTC stacks use::

    username = "<unix expiry>:<user>"
    password = base64(HMAC-SHA1(secret, username))

Usage in a web backend::

    from turnserver.credentials import mint_credentials

    creds = mint_credentials(SECRET, user="alice", ttl_s=3600, host="turn.example.com")
    return creds.ice_servers()      # RTCPeerConnection({iceServers: ...}) config
    # or creds.to_json() for the REST API response format:
    # {"username": ..., "password": ..., "ttl": 3600, "uris": [...]}

This file uses the standard library only and imports nothing else from
turnserver, so it can be copied into a backend as it is.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import re
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any

__all__ = ["Credentials", "build_urls", "mint_credentials"]

# Hostnames and IPv4 literals; IPv6 literals are recognised separately.
_HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")


@dataclass(frozen=True)
class Credentials:
    """A username/password pair valid until ``expires_at`` (Unix seconds), and where to use it."""

    username: str
    password: str = field(repr=False)  # kept out of repr so it does not end up in logs
    ttl_s: int
    expires_at: int
    urls: list[str]

    def ice_servers(self) -> dict[str, Any]:
        """An RTCConfiguration fragment: ``{"iceServers": [...]}``.

        TURN URLs get the credentials; the STUN URL goes in its own entry
        without them, since STUN Binding needs no authentication.
        """
        turn = [u for u in self.urls if u.startswith(("turn:", "turns:"))]
        stun = [u for u in self.urls if u.startswith("stun:")]
        servers: list[dict[str, Any]] = []
        if turn:
            servers.append({"urls": turn, "username": self.username, "credential": self.password})
        if stun:
            servers.append({"urls": stun})
        return {"iceServers": servers}

    def to_json(self) -> str:
        """The TURN REST API response body: ``{"username", "password", "ttl", "uris"}``."""
        return json.dumps(
            {"username": self.username, "password": self.password, "ttl": self.ttl_s, "uris": list(self.urls)}
        )


def mint_credentials(
    secret: bytes | str,
    user: str,
    ttl_s: int = 86400,
    *,
    host: str | None = None,
    udp_port: int | Sequence[int] | None = 3478,
    tcp_port: int | Sequence[int] | None = 3478,
    tls_port: int | Sequence[int] | None = 5349,
    now: float | None = None,
) -> Credentials:
    """Credentials for ``user`` valid for ``ttl_s`` seconds from ``now`` (default: the current time).

    ``user`` is any application identifier without ``:``.  With ``host`` the
    result also lists the server URLs (see :func:`build_urls`).
    Raises ``ValueError`` on an empty secret, an empty user or one containing
    ``:``, a non-positive ``ttl_s``, or a malformed host or port.
    """
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("secret must not be empty")
    if not user:
        raise ValueError("user must not be empty")
    if ":" in user:
        raise ValueError("user must not contain ':' (it separates the expiry from the user)")
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or ttl_s <= 0:
        raise ValueError("ttl_s must be a positive integer")
    if now is None:
        import time  # only here: the module stays importable by sans-IO code

        now = time.time()
    expires_at = int(now) + ttl_s
    username = f"{expires_at}:{user}"
    mac = hmac.new(key, username.encode("utf-8"), hashlib.sha1).digest()
    password = base64.b64encode(mac).decode("ascii")
    urls = build_urls(host, udp_port, tcp_port, tls_port) if host is not None else []
    return Credentials(username=username, password=password, ttl_s=ttl_s, expires_at=expires_at, urls=urls)


def build_urls(
    host: str,
    udp_port: int | Sequence[int] | None = 3478,
    tcp_port: int | Sequence[int] | None = 3478,
    tls_port: int | Sequence[int] | None = 5349,
) -> list[str]:
    """STUN/TURN URLs (RFC 7064, RFC 7065) for a server at ``host``.

    ``stun:`` and ``turn:...?transport=udp`` on ``udp_port``, ``turn:...?transport=tcp``
    on ``tcp_port`` and ``turns:...?transport=tcp`` on ``tls_port`` (each omitted
    when its port is None; with no ``udp_port`` there is no ``stun:`` URL either).
    Each may also be a sequence of ports, for a server listening on several: every one is
    listed, port 443 first (the one a locked-down network lets through). IPv6 literals
    are bracketed.
    """
    h = _url_host(host)
    urls: list[str] = []
    udp_ports = _ports("udp_port", udp_port)
    if udp_ports:
        urls.append(f"stun:{h}:{udp_ports[0]}")
    urls += [f"turn:{h}:{port}?transport=udp" for port in udp_ports]
    urls += [f"turn:{h}:{port}?transport=tcp" for port in _ports("tcp_port", tcp_port)]
    urls += [f"turns:{h}:{port}?transport=tcp" for port in _ports("tls_port", tls_port)]
    return urls


def _ports(name: str, value: int | Sequence[int] | None) -> list[int]:
    """The ports of one transport, each once, 443 first, then in the order given."""
    if value is None:
        return []
    items = [value] if isinstance(value, int) or not isinstance(value, Sequence) else list(value)
    out: list[int] = []
    for item in items:
        port = _port(name, item)
        if port not in out:
            out.append(port)
    return sorted(out, key=lambda p: p != 443)


def _url_host(host: str) -> str:
    candidate = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        addr = ipaddress.ip_address(candidate)
    except ValueError:
        addr = None
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            raise ValueError("host: scoped IPv6 addresses cannot be used in a URL")
        return f"[{addr.compressed}]"
    if addr is not None:
        return str(addr)
    if candidate != host or _HOSTNAME.fullmatch(host) is None or len(host) > 253:
        raise ValueError(f"host: {host!r} is not a hostname or IP address")
    return host


def _port(name: str, port: int) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"{name}: {port!r} is not a port number (1-65535)")
    return port
