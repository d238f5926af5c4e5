"""Address syntax in option values: "IP:PORT" listeners and endpoints, host names, and the
one canonical spelling of an IP address (``canonical_ip``, shared with the sans-IO core)."""

from __future__ import annotations

import ipaddress
import re

from ..addresses import canonical_ip
from .convert import _show

__all__ = ["canonical_ip", "format_hostport", "parse_hostport"]

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
