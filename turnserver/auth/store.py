"""Which long-term keys can verify a USERNAME: REST shared secrets and static users."""

from __future__ import annotations

import re
import types
from collections.abc import Callable, Mapping, Sequence

from turnserver.auth.keys import (
    ALGORITHM_MD5,
    ALGORITHM_SHA256,
    MD5_KEY_LENGTH,
    SUPPORTED_ALGORITHMS,
    long_term_key,
    userhash,
)
from turnserver.auth.rest import rest_expiry, rest_password
from turnserver.auth.saslprep import saslprep

__all__ = ["CredentialStore"]

_HEX_KEY = re.compile(r"0x([0-9a-fA-F]{32})")
_EMPTY: Mapping[str, str | bytes] = types.MappingProxyType({})


class CredentialStore:
    """Answers: which keys can verify this USERNAME?

    Holds the REST shared secrets and the static users for one realm.  It is
    immutable after construction; a configuration reload builds a new store and
    swaps the reference, so a lookup never sees a half-applied reload.

    A username that names a static user is that static user, even if it looks
    like a REST username: otherwise an expired REST credential whose name
    collides with a static user would never expire.
    """

    def __init__(
        self,
        *,
        realm: str,
        secrets: Sequence[bytes] = (),
        static_users: Mapping[str, str | bytes] = _EMPTY,
        wall_clock: Callable[[], float],
    ) -> None:
        self.realm = realm
        self._wall_clock = wall_clock
        self._secrets: tuple[bytes, ...] = tuple(_as_secret(s) for s in secrets)
        # Keys are derived once here rather than per request: SASLprep and the
        # hashes are the expensive part, and static users do not change.
        self._static: dict[str, dict[int, bytes]] = {}
        self._by_userhash: dict[bytes, str] = {}
        for user, credential in static_users.items():
            self._static[user] = _static_keys(user, realm, credential)
            self._by_userhash[userhash(user, realm)] = user

    def is_rest_username(self, username: str) -> bool:
        """True when ``username`` is verified as a REST credential (leading expiry, not a static user)."""
        return username not in self._static and rest_expiry(username) is not None

    def quota_user(self, username: str) -> str:
        """Whom ``user_quota`` counts ``username`` against: the user part of a REST username
        ("1700000000:alice" -> "alice", as coturn counts), else the whole name. Credentials
        minted for one user at different times share one quota."""
        if username in self._static or rest_expiry(username) is None:
            return username
        head, sep, user = username.partition(":")
        return user if sep else username

    def lookup(self, username: str, algorithm: int) -> list[bytes]:
        """Candidate long-term keys for ``username``; empty when the user is unknown.

        A REST username yields one key per configured secret, so that during a
        secret rotation credentials minted with the old and the new secret are
        both accepted; the caller tries each with ``hmac.compare_digest``.
        Expiry is not checked here (see :meth:`is_expired`), so the caller can
        tell "wrong password" from "expired credential".
        """
        static = self._static.get(username)
        if static is not None:
            key = static.get(algorithm)
            return [key] if key is not None else []
        if algorithm not in SUPPORTED_ALGORITHMS:
            return []
        if rest_expiry(username) is None:
            return []
        return [
            long_term_key(username, self.realm, rest_password(secret, username), algorithm)
            for secret in self._secrets
        ]

    def lookup_userhash(self, uh: bytes, algorithm: int) -> tuple[str, list[bytes]] | None:
        """RFC 8489 §14.4: resolve a USERHASH to (username, candidate keys).

        Works for static users only: a REST username cannot be recovered from
        its hash, and the server keeps no list of the ones it has seen.
        """
        user = self._by_userhash.get(bytes(uh))
        if user is None:
            return None
        return user, self.lookup(user, algorithm)

    def is_expired(self, username: str) -> bool:
        """True for a REST username whose timestamp is not in the future; static users never expire."""
        if username in self._static:
            return False
        expiry = rest_expiry(username)
        if expiry is None:
            return False
        return expiry <= self._wall_clock()

    @classmethod
    def load_static_users(cls, path: str) -> dict[str, str | bytes]:
        """Read a static-users file in coturn's format.

        One ``user:password`` or ``user:0x<32 hex digits>`` (a precomputed MD5
        long-term key) per line; the password is everything after the first
        ``:``.  Lines are stripped of surrounding whitespace; blank lines and
        lines starting with ``#`` are ignored.

        Raises ``ValueError("<path>:<line>: ...")``.  Messages may name the user
        but never contain the password or key.
        """
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not valid UTF-8 text") from exc

        users: dict[str, str | bytes] = {}
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            where = f"{path}:{lineno}"
            user, sep, credential = line.partition(":")
            if not sep:
                raise ValueError(f"{where}: expected 'user:password' or 'user:0x<md5 key>'")
            user = user.strip()
            if not user:
                raise ValueError(f"{where}: empty user name")
            if not credential:
                raise ValueError(f"{where}: empty password for user {user!r}")
            if user in users:
                raise ValueError(f"{where}: duplicate user {user!r}")
            if credential[:2] in ("0x", "0X"):
                m = _HEX_KEY.fullmatch("0x" + credential[2:])
                if m is None:
                    raise ValueError(
                        f"{where}: a value starting with 0x must be a 32-hex-digit MD5 key (user {user!r})"
                    )
                users[user] = bytes.fromhex(m.group(1))
                continue
            try:
                saslprep(credential)
            except ValueError:
                raise ValueError(
                    f"{where}: password for user {user!r} is not valid under SASLprep (RFC 4013)"
                ) from None
            users[user] = credential
        return users

    @staticmethod
    def load_secrets(text: str) -> list[bytes]:
        """One secret per non-empty, non-comment (``#``) line, surrounding whitespace stripped."""
        secrets: list[bytes] = []
        for raw in text.splitlines():
            line = raw.strip()
            if line and not line.startswith("#"):
                secrets.append(line.encode("utf-8"))
        return secrets


def _as_secret(secret: bytes | str) -> bytes:
    value = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not value:
        # An empty HMAC key would make every REST password publicly computable.
        raise ValueError("REST secret must not be empty")
    return value


def _static_keys(user: str, realm: str, credential: str | bytes) -> dict[int, bytes]:
    if isinstance(credential, (bytes, bytearray)):
        if len(credential) != MD5_KEY_LENGTH:
            raise ValueError(
                f"static user {user!r}: a precomputed key must be {MD5_KEY_LENGTH} bytes (MD5)"
            )
        # Only the MD5 key was given; the SHA-256 key cannot be derived from it,
        # so this user can authenticate with PASSWORD-ALGORITHM MD5 only.
        return {ALGORITHM_MD5: bytes(credential)}
    try:
        return {
            ALGORITHM_MD5: long_term_key(user, realm, credential, ALGORITHM_MD5),
            ALGORITHM_SHA256: long_term_key(user, realm, credential, ALGORITHM_SHA256),
        }
    except ValueError:
        raise ValueError(f"static user {user!r}: password is not valid under SASLprep (RFC 4013)") from None
