"""Typed TURN errors: handlers raise them, one place turns them into STUN error responses."""

from __future__ import annotations

from typing import Any


class TurnError(Exception):
    """A request failed with a STUN error code (RFC 8489 §14.8, RFC 8656 §19).

    ``attributes`` are extra (type, value) pairs for the error response, such as
    UNKNOWN-ATTRIBUTES for 420 or ALTERNATE-SERVER for 300. ``reason_label`` is the
    low-cardinality label used for metrics and refusal counters.
    """

    def __init__(
        self,
        code: int,
        reason: str,
        *,
        attributes: list[tuple[int, Any]] | None = None,
        label: str | None = None,
    ) -> None:
        super().__init__(f"{code} {reason}")
        self.code = code
        self.reason = reason
        self.attributes = attributes or []
        self.label = label or str(code)


# RFC 8489 §14.8 and RFC 8656 §19 reason phrases, used when a handler gives none.
REASONS = {
    300: "Try Alternate",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    420: "Unknown Attribute",
    437: "Allocation Mismatch",
    438: "Stale Nonce",
    440: "Address Family not Supported",
    441: "Wrong Credentials",
    442: "Unsupported Transport Protocol",
    443: "Peer Address Family Mismatch",
    486: "Allocation Quota Reached",
    500: "Server Error",
    508: "Insufficient Capacity",
}


def error(code: int, reason: str | None = None, **kwargs: Any) -> TurnError:
    return TurnError(code, reason or REASONS.get(code, "Error"), **kwargs)
