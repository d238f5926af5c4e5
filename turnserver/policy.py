"""Peer policy: the one function that decides which peer addresses may be relayed to.

A TURN server relays for anyone holding a credential, so without a policy it
is an open proxy into the networks it can reach: its own loopback, the cloud
metadata service at 169.254.169.254, the operator's private LAN.  RFC 8656
(§21, Security Considerations) leaves the choice of reachable peers to the
server; this module refuses every non-global range by default.

The decision order, first match wins:

1. The server's own listening ports (and the metrics port) are never reachable: a
   peer that is one of this host's addresses on such a port is refused as
   ``own_port``, whatever the CIDR lists say. "This host's addresses" are the
   relay, external and listening addresses, every address of the host's
   interfaces (a wildcard listener receives on all of them), all of 127.0.0.0/8,
   ::1 and the unspecified addresses.
2. An allow CIDR that covers the address wins over the own-address rules below:
   an operator who runs an SFU on the relay host (a videobridge on :10000, say)
   allows that address and reaches it on any other port.
3. Own relay addresses (and external addresses, mapped 1:1 to their bound relay
   address) are reachable only on relay ports the server holds at that moment:
   two clients of the same server must reach each other, but another service in
   the relay port range (WireGuard on 51820, say) must not be reached with the
   server's address as source. Other addresses of this host are refused
   (``own_address``).
4. Allow CIDRs, then deny CIDRs, then the default refusals.

IPv4 written in IPv6 form (IPv4-mapped, IPv4-compatible, IPv4-translated,
NAT64, 6to4, Teredo) is judged as the IPv4 address(es) it carries, so
``::ffff:127.0.0.1`` is loopback, not "some IPv6 address".

Decisions are pure functions of (ip, port) and the configuration, so they are
cached: the check runs for every Send indication. The one part that is not, whether
the server holds a relay port right now, is asked of ``port_held`` after the cache
(``PeerDecision.held_check``).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = ["PeerDecision", "PeerPolicy", "PolicyConfigError"]

_M32 = 0xFFFF_FFFF
_DEFAULT_CACHE_SIZE = 4096


class PolicyConfigError(ValueError):
    """A policy option holds a value that cannot be parsed; the message names the option."""


@dataclass(frozen=True, slots=True)
class PeerDecision:
    allowed: bool
    # Low-cardinality label, fit for a metrics label: "ok" when allowed.
    reason: str
    # The IP to relay to, in canonical text form: an external address is replaced by the
    # relay address it maps to (1:1 NAT). Given with or without a port; None when refused.
    ip: str | None
    # The own relay address whose port must be held for this to stay allowed (None: no
    # such condition). PeerPolicy.check asks port_held; the ChannelData path asks per packet.
    held_check: str | None = field(default=None, compare=False)


# (version, address as int) identifies an address without re-parsing it.
_Key = tuple[int, int]


def _table(rows: Sequence[tuple[str, str]]) -> tuple[tuple[int, int, str], ...]:
    out = []
    for cidr, reason in rows:
        net = ipaddress.ip_network(cidr)
        out.append((int(net.network_address), int(net.netmask), reason))
    return tuple(out)


# Ordered: the first match names the reason, so the broadcast address is
# reported as "broadcast" rather than as part of 240/4.
_DEFAULT_REFUSED_V4 = _table(
    [
        ("255.255.255.255/32", "broadcast"),
        ("0.0.0.0/8", "unspecified"),  # RFC 1122 "this network"
        ("127.0.0.0/8", "loopback"),
        ("10.0.0.0/8", "private"),  # RFC 1918
        ("172.16.0.0/12", "private"),
        ("192.168.0.0/16", "private"),
        ("100.64.0.0/10", "cgnat"),  # RFC 6598 shared address space
        ("169.254.0.0/16", "link_local"),  # RFC 3927, includes cloud metadata 169.254.169.254
        ("192.0.0.0/24", "reserved"),  # RFC 6890 IETF protocol assignments
        ("192.0.2.0/24", "documentation"),  # RFC 5737 TEST-NET-1
        ("198.51.100.0/24", "documentation"),  # TEST-NET-2
        ("203.0.113.0/24", "documentation"),  # TEST-NET-3
        ("198.18.0.0/15", "reserved"),  # RFC 2544 benchmarking
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # RFC 1112 class E
    ]
)

# IPv6 ranges judged as IPv6 (the embedded-IPv4 forms are handled before this table).
_DEFAULT_REFUSED_V6 = _table(
    [
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("fe80::/10", "link_local"),
        ("fec0::/10", "site_local"),  # RFC 3879 deprecated site-local
        ("fc00::/7", "ula"),  # RFC 4193 unique local
        ("ff00::/8", "multicast"),
        ("100::/64", "reserved"),  # RFC 6666 discard-only
        ("2001:db8::/32", "documentation"),  # RFC 3849
        ("3fff::/20", "documentation"),  # RFC 9637
        ("2001::/23", "reserved"),  # RFC 2928 IETF protocol assignments (Teredo handled earlier)
    ]
)
# Everything outside 2000::/3 that is not listed above is unallocated or special
# (IANA IPv6 address space registry): no peer lives there.
_GLOBAL_UNICAST_V6 = (0x2000 << 112, 0xE000 << 112)


def _classify(version: int, x: int) -> str | None:
    """The default-refusal reason for a plain address, None when it is globally routable."""
    if version == 4:
        for net, mask, reason in _DEFAULT_REFUSED_V4:
            if x & mask == net:
                return reason
        return None
    for net, mask, reason in _DEFAULT_REFUSED_V6:
        if x & mask == net:
            return reason
    if x & _GLOBAL_UNICAST_V6[1] != _GLOBAL_UNICAST_V6[0]:
        return "reserved"
    return None


def _embedded_v4(x: int) -> tuple[int, ...]:
    """The IPv4 addresses an IPv6 address carries (empty when it carries none).

    Each of these forms makes a host, a translator or a tunnel deliver the packet
    to the embedded IPv4 address, so the policy must judge that address.
    """
    top96 = x >> 32
    if top96 == 0xFFFF:  # ::ffff:0:0/96 IPv4-mapped, RFC 4291 §2.5.5.2
        return (x & _M32,)
    if top96 == 0xFFFF_0000:  # ::ffff:0:0:0/96 IPv4-translated, RFC 2765 §2.1
        return (x & _M32,)
    if top96 == 0 and x > 1:  # ::/96 IPv4-compatible, RFC 4291 §2.5.5.1 (not :: or ::1)
        return (x & _M32,)
    if top96 == 0x64_FF9B << 64:  # 64:ff9b::/96 NAT64 well-known prefix, RFC 6052 §2.1
        return (x & _M32,)
    if x >> 80 == 0x64_FF9B_0001:  # 64:ff9b:1::/48 local-use NAT64, RFC 8215
        return _local_use_nat64(x)
    if x >> 112 == 0x2002:  # 2002::/16 6to4, RFC 3056 §2
        return ((x >> 80) & _M32,)
    if x >> 96 == 0x2001_0000:  # 2001::/32 Teredo, RFC 4380 §4: server, obfuscated client
        return ((x >> 64) & _M32, ~x & _M32)
    return ()


def _local_use_nat64(x: int) -> tuple[int, ...]:
    """Every RFC 6052 §2.2 reading that could be in use under 64:ff9b:1::/48.

    The translator's prefix length is not visible in the address, so every
    plausible reading is judged and all must be acceptable.  The shorter layouts
    (/48, /56, /64) are plausible when the address is well formed for them (bits
    64-71, the "u" octet, and the suffix are zero), which is what a translator
    using that prefix length produces; they come first so that a refusal names
    the likely reading.  The /96 reading is always judged.

    The cost is that an address well formed for a short layout is often refused
    for a meaningless second reading (say 0.0.1.0); an operator with a local
    translator allows its IPv6 prefix explicitly.  An address with a non-zero
    suffix is judged by its /96 reading only, so an operator whose translator
    uses a shorter prefix and ignores the suffix should deny 64:ff9b:1::/48 and
    allow just the prefix in use.
    """
    out = []
    if (x >> 56) & 0xFF == 0:
        if x & ((1 << 40) - 1) == 0:  # /48: IPv4 in bits 48-63 and 72-87
            out.append((((x >> 64) & 0xFFFF) << 16) | ((x >> 40) & 0xFFFF))
        if x & _M32 == 0:  # /56: bits 56-63 and 72-95
            out.append((((x >> 64) & 0xFF) << 24) | ((x >> 32) & 0xFF_FFFF))
        if x & 0xFF_FFFF == 0:  # /64: bits 72-103
            out.append((x >> 24) & _M32)
    out.append(x & _M32)
    return tuple(out)


def _parse_key(value: str) -> _Key:
    """Parse an own address; an IPv4-mapped IPv6 spelling means the IPv4 address."""
    addr = ipaddress.ip_address(value)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.scope_id is not None:
            raise ValueError("scoped address")
        if addr.ipv4_mapped is not None:
            return (4, int(addr.ipv4_mapped))
    return (addr.version, int(addr))


def _parse_cidrs(option: str, values: Sequence[str]) -> tuple[tuple[int, int, int], ...]:
    if isinstance(values, str):
        raise PolicyConfigError(f"{option}: expected a list of CIDRs, got a single string {values!r}")
    out = []
    for value in values:
        try:
            # strict=False: "10.1.2.3/8" means 10.0.0.0/8, as in most firewalls.
            net = ipaddress.ip_network(str(value).strip(), strict=False)
        except ValueError:
            raise PolicyConfigError(f"{option}: {value!r} is not a valid IPv4 or IPv6 CIDR") from None
        out.append((net.version, int(net.network_address), int(net.netmask)))
    return tuple(out)


def _key_str(key: _Key) -> str:
    return str(ipaddress.IPv4Address(key[1]) if key[0] == 4 else ipaddress.IPv6Address(key[1]))


class PeerPolicy:
    """Which peers may be relayed to.  Immutable; a reload builds a new one."""

    def __init__(
        self,
        *,
        allow: Sequence[str] = (),
        deny: Sequence[str] = (),
        relay_addresses: Sequence[str] = (),
        external_addresses: Mapping[str, str] = MappingProxyType({}),
        relay_port_range: tuple[int, int] = (49152, 65535),
        listening: Iterable[tuple[str, int]] = (),
        host_addresses: Iterable[str] = (),
        port_held: Callable[[str, int], bool] | None = None,
        cache_size: int = _DEFAULT_CACHE_SIZE,
    ) -> None:
        self._allow = _parse_cidrs("allowed_peers", allow)
        self._deny = _parse_cidrs("denied_peers", deny)

        try:
            lo, hi = (int(p) for p in relay_port_range)
        except (TypeError, ValueError):
            raise PolicyConfigError(f"relay_port_range: {relay_port_range!r} is not a (low, high) pair") from None
        if not 1 <= lo <= hi <= 65535:
            raise PolicyConfigError(f"relay_port_range: {relay_port_range!r} is not within 1-65535 with low <= high")
        self._port_lo, self._port_hi = lo, hi

        own: set[_Key] = set()
        for value in relay_addresses:
            try:
                own.add(_parse_key(value))
            except ValueError:
                raise PolicyConfigError(f"relay_addresses: {value!r} is not a valid IP address") from None

        external: dict[_Key, _Key] = {}
        for ext, bound in external_addresses.items():
            try:
                ext_key = _parse_key(ext)
            except ValueError:
                raise PolicyConfigError(f"external_addresses: {ext!r} is not a valid IP address") from None
            try:
                bound_key = _parse_key(bound)
            except ValueError:
                raise PolicyConfigError(f"external_addresses: {bound!r} (for {ext!r}) is not a valid IP address") from None
            external[ext_key] = bound_key
            own.add(bound_key)

        listening_exact: set[tuple[int, int, int]] = set()
        wildcard_ports: set[int] = set()
        listen_ips: set[_Key] = set()
        for entry in listening:
            try:
                ip, port = entry
                port = int(port)
                key = _parse_key(ip)
            except (TypeError, ValueError):
                raise PolicyConfigError(f"listening: {entry!r} is not an (ip, port) pair") from None
            if key[1] == 0:
                # 0.0.0.0 / :: receives on every own address; a dual-stack "::"
                # socket takes IPv4 too, so a wildcard guards the port on all of them.
                wildcard_ports.add(port)
            else:
                listening_exact.add((key[0], key[1], port))
                listen_ips.add(key)

        host: set[_Key] = set(_ALWAYS_HOST)
        for value in host_addresses:
            try:
                host.add(_parse_key(value))
            except ValueError:
                continue  # an interface address we cannot use (a scoped link-local one)

        self._own = frozenset(own)
        self._external = MappingProxyType(external)
        # Addresses that are this host: never reached on a listening port, and reached at
        # all only as a relay address on a held port or when an allow CIDR names them.
        self._host = frozenset(own | listen_ips | set(external) | host)
        self._listening_exact = frozenset(listening_exact)
        self._wildcard_ports = frozenset(wildcard_ports)
        # Without a pool to ask (unit tests of the policy alone), every port in the relay
        # range counts as held.
        self._port_held = port_held
        self._cached = functools.lru_cache(maxsize=cache_size)(self._decide)

    @property
    def relay_port_range(self) -> tuple[int, int]:
        return (self._port_lo, self._port_hi)

    def check(self, ip: str, port: int | None = None) -> PeerDecision:
        """Decide whether ``ip`` (and ``port``, when given) may be relayed to.

        ``port=None`` is for CreatePermission, which installs permissions by IP
        only (RFC 8656 §9).
        """
        decision = self._cached(ip, port)
        if decision.held_check is not None and port is not None and not self.port_held(
                decision.held_check, port):
            return _refuse("own_port")
        return decision

    def port_held(self, ip: str | None, port: int) -> bool:
        """Whether the server holds relay port ``port`` on its relay address ``ip`` now."""
        held = self._port_held
        if held is None:
            return self._port_lo <= port <= self._port_hi
        return ip is not None and held(ip, port)

    def is_host_address(self, ip: str) -> bool:
        """Whether ``ip`` is one of this host's addresses as the policy knows them."""
        try:
            return _is_host(self._host, _parse_key(ip))
        except ValueError:
            return False

    def cache_info(self) -> functools._CacheInfo:
        return self._cached.cache_info()

    def _decide(self, ip: str, port: int | None) -> PeerDecision:
        try:
            addr = ipaddress.ip_address(ip)
        except (TypeError, ValueError):
            return _refuse("invalid")
        if isinstance(addr, ipaddress.IPv6Address) and addr.scope_id is not None:
            return _refuse("invalid")
        if port is not None and (isinstance(port, bool) or not isinstance(port, int) or not 0 < port <= 65535):
            return _refuse("invalid_port")

        key: _Key = (addr.version, int(addr))
        primary = self._external.get(key, key)
        embedded = _embedded_v4(key[1]) if key[0] == 6 else ()
        embedded_keys = [self._external.get((4, v4), (4, v4)) for v4 in embedded]

        keys = (primary, *embedded_keys)
        host = self._host
        is_host = [k for k in keys if _is_host(host, k)]
        # Step 1: never into the server's own listening (or metrics) ports.
        if port is not None:
            for k in is_host:
                if port in self._wildcard_ports or (k[0], k[1], port) in self._listening_exact:
                    return _refuse("own_port")

        if is_host:
            ip_text = _key_str(primary) if primary in self._own else str(addr)
            # Step 2: an allow CIDR that names the address (each host address it carries)
            # wins over the own-address rules.
            covered = _matches(self._allow, key) or (bool(embedded) and all(
                _matches(self._allow, (4, v4)) for v4 in embedded if _is_host(host, (4, v4))))
            if covered and self._judge(key, embedded) is None:
                return _allow(ip_text)
            # Step 3: own relay addresses, on relay ports held at the time of the check.
            own = primary if primary in self._own else next(
                (k for k in embedded_keys if k in self._own), None)
            if own is not None:
                if port is None:
                    return _allow(ip_text)
                if not self._port_lo <= port <= self._port_hi:
                    return _refuse("own_port")
                return PeerDecision(True, "ok", ip_text, held_check=_key_str(own))
            # Another address of this host: refused, under the default reason when there is
            # one (loopback, private), else as own_address (a second public NIC, say).
            return _refuse(self._judge(key, embedded) or "own_address")

        # Step 4: operator CIDRs, then the defaults.
        reason = self._judge(key, embedded)
        if reason is None:
            return _allow(str(addr))
        return _refuse(reason)

    def _judge(self, key: _Key, embedded: tuple[int, ...]) -> str | None:
        if _matches(self._allow, key):
            return None
        if embedded:
            outer_denied = _matches(self._deny, key)
            for v4 in embedded:
                inner = (4, v4)
                if _matches(self._allow, inner):
                    continue
                if outer_denied or _matches(self._deny, inner):
                    return "denied_cidr"
                reason = _classify(4, v4)
                if reason is not None:
                    return reason
            return None
        if _matches(self._deny, key):
            return "denied_cidr"
        return _classify(key[0], key[1])


# Always this host, whatever the interfaces say: all of 127.0.0.0/8 is local on Linux, and
# the unspecified addresses mean "this host" as a destination.
_ALWAYS_HOST: frozenset[_Key] = frozenset({(4, 0), (6, 0), (6, 1)})


def _is_host(host: frozenset[_Key], key: _Key) -> bool:
    return key in host or (key[0] == 4 and key[1] >> 24 == 127)


def _matches(cidrs: tuple[tuple[int, int, int], ...], key: _Key) -> bool:
    version, x = key
    return any(v == version and x & mask == net for v, net, mask in cidrs)


def _allow(ip: str) -> PeerDecision:
    return PeerDecision(True, "ok", ip)


@functools.cache
def _refuse(reason: str) -> PeerDecision:
    return PeerDecision(False, reason, None)
