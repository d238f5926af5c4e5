"""Stateless nonces (RFC 8489 §9.2): they carry their own expiry and are verified by HMAC.

The server keeps no per-nonce state, so a flood of unauthenticated requests
costs no memory.  A nonce is bound to the client IP so that one captured on
one path cannot be replayed from another.

Layout (all printable ASCII, 24 characters with the cookie, 11 without)::

    [ "obMatJos2" <4 base64: security features> ]   nonce cookie, RFC 8489 §9.2
    <11 base64url: 8 bytes>
        3 bytes  expiry, Unix seconds modulo 2**24
        5 bytes  HMAC-SHA256(key, cookie, full expiry, client ip)[:5]

The MAC covers the cookie, so a client (or a man in the middle) cannot strip
or alter the advertised security features without the nonce becoming invalid:
that is the bid-down protection RFC 8489 §9.2 asks for.

The nonce is short on purpose: it rides in every 401 and 438, the answers anyone
can have without credentials, and a short one keeps the server a poor reflector
(docs/security.md). The full expiry is rebuilt from the 24 bits as the value
nearest to now, which is unambiguous for lifetimes up to 2**23 s (97 days; the
option allows a day), and the MAC covers the full value, so an old nonce does not
come back to life when the 24 bits wrap. A forged nonce needs a 40-bit MAC guess
per attempt, and buys nothing the attacker could not get by asking for a 401: the
nonce proves freshness and the client's address, not identity, which
MESSAGE-INTEGRITY does.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Literal

from ..addresses import canonical_ip

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

_EXPIRY_BITS = 24
_EXPIRY_MOD = 1 << _EXPIRY_BITS
_MAC_BYTES = 5
_BODY = re.compile(r"[A-Za-z0-9_-]{10}[AEIMQUYcgkosw048]")  # 8 bytes: the last char has 2 bits
_FEATURES = re.compile(r"[A-Za-z0-9+/]{4}")
# RFC 8489 §14.10: NONCE is at most 128 characters.
_MAX_NONCE_CHARS = 128
_MIN_KEY_BYTES = 16
_MAC_LABEL = b"turnserver nonce v2\x00"

NonceStatus = Literal["ok", "stale", "invalid"]


class NonceManager:
    """Makes and checks stateless, IP-bound, self-expiring nonces."""

    def __init__(
        self,
        *,
        key: bytes,
        lifetime_s: float = 600.0,
        wall_clock: Callable[[], float],
    ) -> None:
        if len(key) < _MIN_KEY_BYTES:
            raise ValueError(f"nonce key must be at least {_MIN_KEY_BYTES} bytes")
        if not 0 < lifetime_s < _EXPIRY_MOD // 2:
            raise ValueError("nonce lifetime_s must be positive and under 2**23 s")
        self._key = bytes(key)
        self._lifetime_s = lifetime_s
        self._wall_clock = wall_clock
        features = SECURITY_FEATURE_PASSWORD_ALGORITHMS | SECURITY_FEATURE_USERNAME_ANONYMITY
        self._cookie = NONCE_COOKIE_PREFIX + base64.b64encode(features.to_bytes(3, "big")).decode("ascii")

    def make(self, client_ip: str, *, security_features: bool = True) -> str:
        """A fresh nonce for ``client_ip``, valid for ``lifetime_s`` seconds.

        With ``security_features`` the nonce starts with the RFC 8489 nonce
        cookie advertising password algorithms and username anonymity (both
        supported); without it the nonce is a plain RFC 5389-style one.
        """
        cookie = self._cookie if security_features else ""
        expiry = int(self._wall_clock() + self._lifetime_s)
        raw = (expiry % _EXPIRY_MOD).to_bytes(3, "big") + self._mac(cookie, expiry, client_ip)
        return cookie + base64.urlsafe_b64encode(raw).decode("ascii")[:11]

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
        if _BODY.fullmatch(body) is None:
            return "invalid"
        raw = base64.urlsafe_b64decode(body + "=")
        now = int(self._wall_clock())
        # The full expiry: the value with these 24 low bits nearest to now.
        low = int.from_bytes(raw[:3], "big")
        expiry = now + ((low - now + _EXPIRY_MOD // 2) % _EXPIRY_MOD) - _EXPIRY_MOD // 2
        if not hmac.compare_digest(self._mac(cookie, expiry, client_ip), raw[3:]):
            return "invalid"
        if expiry <= self._wall_clock():
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

    def _mac(self, cookie: str, expiry: int, client_ip: str) -> bytes:
        material = b"\x00".join(
            (
                _MAC_LABEL,
                cookie.encode("ascii"),
                str(expiry).encode("ascii"),
                _canonical_ip(client_ip).encode("utf-8", "surrogatepass"),
            )
        )
        return hmac.new(self._key, material, hashlib.sha256).digest()[:_MAC_BYTES]


def _canonical_ip(client_ip: str) -> str:
    """One spelling per address, so "::FFFF:1.2.3.4" and "1.2.3.4" bind alike; a client
    "address" that is no IP (a test's placeholder) binds as written."""
    try:
        return canonical_ip(client_ip)
    except ValueError:
        return str(client_ip)
