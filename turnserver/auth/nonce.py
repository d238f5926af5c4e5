"""Stateless nonces (RFC 8489 §9.2): they carry their own expiry and are verified by HMAC.

The server keeps no per-nonce state, so a flood of unauthenticated requests
costs no memory.  A nonce is bound to the client IP so that one captured on
one path cannot be replayed from another.

Layout (all printable ASCII, 45 characters with the cookie, 32 without)::

    [ "obMatJos2" <4 base64: security features> ]   nonce cookie, RFC 8489 §9.2
    <8 lowercase hex: expiry, Unix seconds>
    <8 base64url: random salt>
    <16 base64url: HMAC-SHA256(key, cookie, expiry, salt, client ip)[:12]>

The MAC covers the cookie, so a client (or a man in the middle) cannot strip
or alter the advertised security features without the nonce becoming invalid:
that is the bid-down protection RFC 8489 §9.2 asks for.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import re
from collections.abc import Callable
from typing import Literal

__all__ = [
    "NONCE_COOKIE_PREFIX",
    "SECURITY_FEATURE_PASSWORD_ALGORITHMS",
    "SECURITY_FEATURE_USERNAME_ANONYMITY",
    "NonceManager",
]

NONCE_COOKIE_PREFIX = "obMatJos2"
# RFC 8489 §9.2: bit 0 is the most significant bit of the first of the three
# bytes.  §18.1 registers bit 0 "Password algorithms", bit 1 "Username anonymity".
SECURITY_FEATURE_PASSWORD_ALGORITHMS = 0x800000
SECURITY_FEATURE_USERNAME_ANONYMITY = 0x400000
_COOKIE_LENGTH = len(NONCE_COOKIE_PREFIX) + 4

_SALT_BYTES = 6
_MAC_BYTES = 12
_BODY = re.compile(r"([0-9a-f]{8})([A-Za-z0-9_-]{8})([A-Za-z0-9_-]{16})")
_FEATURES = re.compile(r"[A-Za-z0-9+/]{4}")
# RFC 8489 §14.10: NONCE is at most 128 characters.
_MAX_NONCE_CHARS = 128
_MIN_KEY_BYTES = 16
_MAC_LABEL = b"turnserver nonce v1\x00"

NonceStatus = Literal["ok", "stale", "invalid"]


class NonceManager:
    """Makes and checks stateless, IP-bound, self-expiring nonces."""

    def __init__(
        self,
        *,
        key: bytes,
        lifetime_s: float = 600.0,
        wall_clock: Callable[[], float],
        random_bytes: Callable[[int], bytes],
    ) -> None:
        if len(key) < _MIN_KEY_BYTES:
            raise ValueError(f"nonce key must be at least {_MIN_KEY_BYTES} bytes")
        if not lifetime_s > 0:
            raise ValueError("nonce lifetime_s must be positive")
        self._key = bytes(key)
        self._lifetime_s = lifetime_s
        self._wall_clock = wall_clock
        self._random_bytes = random_bytes
        features = SECURITY_FEATURE_PASSWORD_ALGORITHMS | SECURITY_FEATURE_USERNAME_ANONYMITY
        self._cookie = NONCE_COOKIE_PREFIX + base64.b64encode(features.to_bytes(3, "big")).decode("ascii")

    def make(self, client_ip: str, *, security_features: bool = True) -> str:
        """A fresh nonce for ``client_ip``, valid for ``lifetime_s`` seconds.

        With ``security_features`` the nonce starts with the RFC 8489 nonce
        cookie advertising password algorithms and username anonymity (both
        supported); without it the nonce is a plain RFC 5389-style one.
        """
        cookie = self._cookie if security_features else ""
        expiry_hex = f"{int(self._wall_clock() + self._lifetime_s) & 0xFFFFFFFF:08x}"
        salt_raw = self._random_bytes(_SALT_BYTES)
        if len(salt_raw) != _SALT_BYTES:
            raise ValueError("random_bytes returned the wrong number of bytes")
        salt = base64.urlsafe_b64encode(salt_raw).decode("ascii")
        return cookie + expiry_hex + salt + self._mac(cookie, expiry_hex, salt, client_ip)

    def check(self, nonce: str, client_ip: str) -> NonceStatus:
        """``"ok"``, ``"stale"`` (genuine but expired: answer 438) or ``"invalid"``.

        Never raises, whatever ``nonce`` holds.
        """
        if not isinstance(nonce, str) or len(nonce) > _MAX_NONCE_CHARS or not nonce.isascii():
            return "invalid"
        if nonce.startswith(NONCE_COOKIE_PREFIX):
            cookie, body = nonce[:_COOKIE_LENGTH], nonce[_COOKIE_LENGTH:]
            if _FEATURES.fullmatch(cookie, len(NONCE_COOKIE_PREFIX)) is None:
                return "invalid"
        else:
            cookie, body = "", nonce
        m = _BODY.fullmatch(body)
        if m is None:
            return "invalid"
        expiry_hex, salt, mac = m.groups()
        expected = self._mac(cookie, expiry_hex, salt, client_ip)
        if not hmac.compare_digest(expected.encode("ascii"), mac.encode("ascii")):
            return "invalid"
        if int(expiry_hex, 16) <= self._wall_clock():
            return "stale"
        return "ok"

    @staticmethod
    def has_password_algorithms_feature(nonce: str) -> bool:
        """True when ``nonce`` carries a nonce cookie with the "Password algorithms" bit set.

        RFC 8489 §9.2.4/§9.2.5: this decides whether PASSWORD-ALGORITHMS handling applies.
        """
        if not isinstance(nonce, str) or not nonce.startswith(NONCE_COOKIE_PREFIX):
            return False
        encoded = nonce[len(NONCE_COOKIE_PREFIX) : _COOKIE_LENGTH]
        if _FEATURES.fullmatch(encoded) is None:
            return False
        # Four characters of the base64 alphabet, no padding: always exactly three bytes.
        features = int.from_bytes(base64.b64decode(encoded), "big")
        return bool(features & SECURITY_FEATURE_PASSWORD_ALGORITHMS)

    def _mac(self, cookie: str, expiry_hex: str, salt: str, client_ip: str) -> str:
        material = b"\x00".join(
            (
                _MAC_LABEL,
                cookie.encode("ascii"),
                expiry_hex.encode("ascii"),
                salt.encode("ascii"),
                _canonical_ip(client_ip).encode("utf-8", "surrogatepass"),
            )
        )
        digest = hmac.new(self._key, material, hashlib.sha256).digest()[:_MAC_BYTES]
        return base64.urlsafe_b64encode(digest).decode("ascii")


def _canonical_ip(client_ip: str) -> str:
    """One spelling per address, so "::FFFF:1.2.3.4" and "1.2.3.4" bind alike."""
    try:
        addr = ipaddress.ip_address(client_ip)
    except ValueError:
        return str(client_ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)
