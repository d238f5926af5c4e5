"""One spelling per IP address, for every part of the server (sans-IO: standard library only).

Configured addresses, addresses read from sockets and addresses in messages are compared as
text; ``canonical_ip`` gives each address one text form so that "2001:DB8:0::1" and
"2001:db8::1", or "::ffff:192.0.2.1" and "192.0.2.1", compare equal.
"""

from __future__ import annotations

import functools
import ipaddress

__all__ = ["canonical_ip"]


@functools.lru_cache(maxsize=1024)
def canonical_ip(text: str, *, keep_mapped: bool = False) -> str:
    """ipaddress's text form of ``text``; an IPv4-mapped IPv6 address ("::ffff:192.0.2.1")
    becomes the IPv4 address, as the peer policy and the nonces read it, unless
    ``keep_mapped``: a relay address is kept as written, since it is what a socket binds
    (an IPv6 socket, serving the IPv6 family). A scope ("fe80::1%eth0") is kept.
    ``ValueError`` when ``text`` is no IP address (surrounding white space included)."""
    addr = ipaddress.ip_address(text)
    if not keep_mapped and isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)
