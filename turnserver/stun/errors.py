"""Typed errors of the wire codec. Decoders raise nothing else on bad input."""

from __future__ import annotations


class StunDecodeError(ValueError):
    """Base of every error raised while decoding bytes from the network."""


class NotStunError(StunDecodeError):
    """The bytes are not a STUN message at all; RFC 8489 §6.3 says drop them silently."""


class MalformedMessageError(StunDecodeError):
    """The header is sound but the attributes are not.

    Carries the header fields so that a request can be answered with a 400 that reuses its
    transaction ID (RFC 8489 §6.3.1.1).
    """

    def __init__(self, reason: str, method: int, msg_class: int, transaction_id: bytes) -> None:
        super().__init__(reason)
        self.method = method
        self.msg_class = msg_class
        self.transaction_id = transaction_id


class FramingError(StunDecodeError):
    """A TCP/TLS byte stream no longer holds STUN or ChannelData frames: close the connection."""
