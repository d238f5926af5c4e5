"""TURN REST API credentials (draft-uberti-behave-turn-rest-00, as deployed by coturn).

An application backend that shares a secret with the server mints
``username = "<unix-expiry>:<user>"`` and
``password = base64(HMAC-SHA1(secret, username))``; the server recomputes the
password from the username, so it needs no user database.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re

__all__ = ["rest_expiry", "rest_password", "rest_username"]

# Ten digits cover Unix time until the year 2286; up to twelve are accepted so
# that a backend may mint "practically never" expiries.  The cap keeps int()
# cheap on hostile input and rejects nonsense early.  ASCII digits only:
# str.isdigit() would accept other scripts' digits, which int() also parses.
_EXPIRY = re.compile(r"[0-9]{1,12}")


def rest_password(secret: bytes, username: str) -> str:
    """base64(HMAC-SHA1(secret, username)), as ASCII text."""
    mac = hmac.new(secret, username.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(mac).decode("ascii")


def rest_username(expiry_unix: int, user: str) -> str:
    """The REST username for ``user`` valid until ``expiry_unix`` (Unix seconds)."""
    return f"{int(expiry_unix)}:{user}"


def rest_expiry(username: str) -> int | None:
    """The expiry timestamp a REST username carries, or ``None`` if it has none.

    Accepts ``"<expiry>:<user>"`` (the part before the first ``:``) and coturn's
    timestamp-only form ``"<expiry>"``.
    """
    head, _, _ = username.partition(":")
    if _EXPIRY.fullmatch(head) is None:
        return None
    return int(head)
