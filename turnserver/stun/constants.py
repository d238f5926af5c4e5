"""Numbers of the STUN/TURN wire format: cookie, methods, classes, attribute types.

Values come from the IANA STUN registries as filled by RFC 8489 (STUN), RFC 8656 (TURN),
RFC 6062 (TURN over TCP), RFC 8445 (ICE) and RFC 5780 (NAT behaviour discovery).
"""

from __future__ import annotations

import enum

# RFC 8489 §5: fixed value in bytes 4-7 of every message; also the XOR key for addresses.
MAGIC_COOKIE = 0x2112A442
MAGIC_COOKIE_BYTES = MAGIC_COOKIE.to_bytes(4, "big")

# RFC 8489 §7: the value FINGERPRINT's CRC-32 is XORed with ("STUN" in ASCII).
FINGERPRINT_XOR = 0x5354554E

HEADER_SIZE = 20
TRANSACTION_ID_SIZE = 12

# ZERO_PAD[k] is k zero bytes: attribute values (RFC 8489 §14) and stream ChannelData (RFC 8656
# §12.5) are padded to a multiple of 4, so a value of length n takes ZERO_PAD[-n & 3].
ZERO_PAD = (b"", b"\x00", b"\x00\x00", b"\x00\x00\x00")

# RFC 8489 §14.1: address family byte of (XOR-)MAPPED-ADDRESS and friends.
ADDRESS_FAMILY_IPV4 = 0x01
ADDRESS_FAMILY_IPV6 = 0x02

# RFC 8489 §18.5: STUN Password Algorithms registry.
PASSWORD_ALGORITHM_MD5 = 0x0001
PASSWORD_ALGORITHM_SHA256 = 0x0002


class MessageClass(enum.IntEnum):
    """RFC 8489 §5: the two class bits C1 C0."""

    REQUEST = 0
    INDICATION = 1
    SUCCESS = 2
    ERROR = 3


class Method(enum.IntEnum):
    """RFC 8489 §18.2, RFC 8656 §17, RFC 6062 §6.1."""

    BINDING = 0x001
    ALLOCATE = 0x003
    REFRESH = 0x004
    SEND = 0x006
    DATA = 0x007
    CREATE_PERMISSION = 0x008
    CHANNEL_BIND = 0x009
    CONNECT = 0x00A
    CONNECTION_BIND = 0x00B
    CONNECTION_ATTEMPT = 0x00C


class Attr(enum.IntEnum):
    """Attribute types. Below 0x8000 comprehension-required, from 0x8000 optional (RFC 8489 §14)."""

    MAPPED_ADDRESS = 0x0001
    USERNAME = 0x0006
    MESSAGE_INTEGRITY = 0x0008
    ERROR_CODE = 0x0009
    UNKNOWN_ATTRIBUTES = 0x000A
    CHANNEL_NUMBER = 0x000C
    LIFETIME = 0x000D
    XOR_PEER_ADDRESS = 0x0012
    DATA = 0x0013
    REALM = 0x0014
    NONCE = 0x0015
    XOR_RELAYED_ADDRESS = 0x0016
    REQUESTED_ADDRESS_FAMILY = 0x0017
    EVEN_PORT = 0x0018
    REQUESTED_TRANSPORT = 0x0019
    DONT_FRAGMENT = 0x001A
    MESSAGE_INTEGRITY_SHA256 = 0x001C
    PASSWORD_ALGORITHM = 0x001D
    USERHASH = 0x001E
    XOR_MAPPED_ADDRESS = 0x0020
    RESERVATION_TOKEN = 0x0022
    PRIORITY = 0x0024
    USE_CANDIDATE = 0x0025
    CONNECTION_ID = 0x002A
    ADDITIONAL_ADDRESS_FAMILY = 0x8000
    ADDRESS_ERROR_CODE = 0x8001
    PASSWORD_ALGORITHMS = 0x8002
    ALTERNATE_DOMAIN = 0x8003
    ICMP = 0x8004
    SOFTWARE = 0x8022
    ALTERNATE_SERVER = 0x8023
    FINGERPRINT = 0x8028
    ICE_CONTROLLED = 0x8029
    ICE_CONTROLLING = 0x802A
    RESPONSE_ORIGIN = 0x802B
    OTHER_ADDRESS = 0x802C
