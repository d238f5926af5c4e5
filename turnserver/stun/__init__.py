"""STUN/TURN wire codec (RFC 8489, RFC 8656, RFC 6062, RFC 8445 attributes), sans-IO.

Imports nothing else of the project and never touches a socket or a clock.

Decoded attribute values:

- addresses (MAPPED-, XOR-MAPPED-, XOR-PEER-, XOR-RELAYED-ADDRESS, ALTERNATE-SERVER,
  RESPONSE-ORIGIN, OTHER-ADDRESS): ``(ip, port)`` with ``ip`` in canonical text form;
- USERNAME, REALM, NONCE, SOFTWARE, ALTERNATE-DOMAIN: ``str``;
- MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256, USERHASH, RESERVATION-TOKEN, DATA and
  unknown types: ``bytes``;
- FINGERPRINT, LIFETIME, PRIORITY, CHANNEL-NUMBER, REQUESTED-TRANSPORT, CONNECTION-ID,
  ICE-CONTROLLED, ICE-CONTROLLING, REQUESTED-/ADDITIONAL-ADDRESS-FAMILY: ``int``;
- EVEN-PORT: ``bool``; DONT-FRAGMENT, USE-CANDIDATE: ``None``;
- ERROR-CODE: ``(code, reason)``; ADDRESS-ERROR-CODE: ``(family, code, reason)``;
- UNKNOWN-ATTRIBUTES: ``list[int]``; PASSWORD-ALGORITHM: ``(algorithm, params)``;
  PASSWORD-ALGORITHMS: ``list[(algorithm, params)]``; ICMP: ``(type, code, error_data)``.
"""

from .channel_data import decode_channel_data, encode_channel_data
from .constants import (
    ADDRESS_FAMILY_IPV4,
    ADDRESS_FAMILY_IPV6,
    MAGIC_COOKIE,
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    Attr,
    MessageClass,
    Method,
)
from .errors import FramingError, MalformedMessageError, NotStunError, StunDecodeError
from .framing import StreamFramer
from .message import (
    Message,
    decode_message,
    encode_message,
    is_stun,
    peek_header,
    verify_fingerprint,
    verify_message_integrity,
    verify_message_integrity_sha256,
)

__all__ = [
    "ADDRESS_FAMILY_IPV4",
    "ADDRESS_FAMILY_IPV6",
    "MAGIC_COOKIE",
    "PASSWORD_ALGORITHM_MD5",
    "PASSWORD_ALGORITHM_SHA256",
    "Attr",
    "FramingError",
    "MalformedMessageError",
    "Message",
    "MessageClass",
    "Method",
    "NotStunError",
    "StreamFramer",
    "StunDecodeError",
    "decode_channel_data",
    "decode_message",
    "encode_channel_data",
    "encode_message",
    "is_stun",
    "peek_header",
    "verify_fingerprint",
    "verify_message_integrity",
    "verify_message_integrity_sha256",
]
