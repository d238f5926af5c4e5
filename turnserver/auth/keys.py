"""Long-term credential keys and USERHASH (RFC 8489 §9.2.2, §14.4, §18.5)."""

from __future__ import annotations

import hashlib

from turnserver.auth.saslprep import saslprep

__all__ = [
    "ALGORITHM_MD5",
    "ALGORITHM_SHA256",
    "SUPPORTED_ALGORITHMS",
    "long_term_key",
    "userhash",
]

# RFC 8489 §18.5: PASSWORD-ALGORITHM values.
ALGORITHM_MD5 = 0x0001
ALGORITHM_SHA256 = 0x0002
SUPPORTED_ALGORITHMS = (ALGORITHM_MD5, ALGORITHM_SHA256)

MD5_KEY_LENGTH = 16


def long_term_key(username: str, realm: str, password: str, algorithm: int = ALGORITHM_MD5) -> bytes:
    """The long-term key for one username/realm/password.

    RFC 8489 §9.2.2: key = H(username ":" realm ":" SASLprep(password)), where H
    is MD5 (16 bytes) or SHA-256 (32 bytes) as PASSWORD-ALGORITHM selects.  The
    username and realm go in as received on the wire, which is what the RFC 5769
    §2.4 vector and deployed clients do.

    Raises ``ValueError`` for an unknown algorithm or a password SASLprep refuses.
    """
    material = f"{username}:{realm}:{saslprep(password)}".encode("utf-8")
    if algorithm == ALGORITHM_MD5:
        # MD5 is mandated by the protocol here, not chosen for security.
        return hashlib.md5(material, usedforsecurity=False).digest()
    if algorithm == ALGORITHM_SHA256:
        return hashlib.sha256(material).digest()
    raise ValueError(f"unsupported password algorithm 0x{algorithm:04x}")


def userhash(username: str, realm: str) -> bytes:
    """RFC 8489 §14.4: USERHASH = SHA-256(username ":" realm), 32 bytes."""
    return hashlib.sha256(f"{username}:{realm}".encode("utf-8")).digest()
