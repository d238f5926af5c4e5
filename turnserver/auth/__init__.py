"""Authentication: SASLprep, long-term keys, TURN REST credentials, credential store, nonces.

Sans-IO: nothing here imports asyncio, socket or time, and nothing logs.  Wall
clock and randomness come in through constructor arguments.
"""

from turnserver.auth.keys import (
    ALGORITHM_MD5,
    ALGORITHM_SHA256,
    SUPPORTED_ALGORITHMS,
    long_term_key,
    userhash,
)
from turnserver.auth.nonce import NONCE_COOKIE_PREFIX, NonceManager
from turnserver.auth.rest import rest_expiry, rest_password, rest_username
from turnserver.auth.saslprep import saslprep
from turnserver.auth.store import CredentialStore

__all__ = [
    "ALGORITHM_MD5",
    "ALGORITHM_SHA256",
    "NONCE_COOKIE_PREFIX",
    "SUPPORTED_ALGORITHMS",
    "CredentialStore",
    "NonceManager",
    "long_term_key",
    "rest_expiry",
    "rest_password",
    "rest_username",
    "saslprep",
    "userhash",
]
