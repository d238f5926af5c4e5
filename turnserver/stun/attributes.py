"""Per-attribute value codecs: one decoder and one encoder per known attribute type.

A decoder reads the value in place, ``decoder(data, offset, length, transaction_id)``, and can
never read past ``offset + length`` (every decoder checks the length before it reads), so a
lying attribute cannot reach its neighbour. Decoders raise only :class:`InvalidAttribute`; the
message decoder turns that into :class:`MalformedMessageError` carrying the header fields.

An encoder turns a value back into the unpadded value bytes, ``encoder(value, transaction_id)``,
and raises ``ValueError``/``TypeError`` on values it cannot represent.

Plain functions in dict tables rather than a class per attribute: this runs for every Send
indication and every Data indication, where a method lookup and an instance per attribute
would cost more than the parsing itself.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Callable
from typing import Any, cast

from .constants import (
    ADDRESS_FAMILY_IPV4,
    ADDRESS_FAMILY_IPV6,
    MAGIC_COOKIE,
    MAGIC_COOKIE_BYTES,
    ZERO_PAD,
    Attr,
)

Decoder = Callable[[bytes, int, int, bytes], object]
Encoder = Callable[[object, bytes], bytes]
ReservedCheck = Callable[[bytes, int, int], bool]


class InvalidAttribute(Exception):
    """An attribute value breaks its format; internal, surfaced as MalformedMessageError."""


# RFC 8489 §14.3: USERNAME is "fewer than 509 bytes". The decoder keeps the RFC 5389 bound
# (fewer than 513) so that older clients are not refused; the encoder holds to RFC 8489.
MAX_USERNAME_BYTES = 512
MAX_USERNAME_BYTES_OUT = 508
# RFC 8489 §14.8, §14.9, §14.10, §14.14: REALM, NONCE, SOFTWARE and reason phrases are fewer
# than 128 characters, "which can be as long as 509 bytes when encoding them and as long as
# 763 bytes when decoding them".
MAX_TEXT_BYTES = 763
MAX_TEXT_BYTES_OUT = 509

_TEXT_LIMITS: dict[int, tuple[int, int]] = {  # type -> (decoder limit, encoder limit)
    Attr.USERNAME: (MAX_USERNAME_BYTES, MAX_USERNAME_BYTES_OUT),
    Attr.REALM: (MAX_TEXT_BYTES, MAX_TEXT_BYTES_OUT),
    Attr.NONCE: (MAX_TEXT_BYTES, MAX_TEXT_BYTES_OUT),
    Attr.SOFTWARE: (MAX_TEXT_BYTES, MAX_TEXT_BYTES_OUT),
    Attr.ALTERNATE_DOMAIN: (0xFFFF, 0xFFFF),
}

_U8_3X = struct.Struct("!B3x")
_U16 = struct.Struct("!H")
_U16_2X = struct.Struct("!H2x")
_U32 = struct.Struct("!I")
_U64 = struct.Struct("!Q")
_U16_U16 = struct.Struct("!HH")
_ADDR_V4 = struct.Struct("!xBHI")  # reserved, family, port, address
_ADDR_HEAD = struct.Struct("!xBH")  # reserved, family, port (IPv6 address follows)
_ADDR_V4_OUT = struct.Struct("!BBHI")
_ADDR_HEAD_OUT = struct.Struct("!BBH")
_ERROR_HEAD = struct.Struct("!HBB")  # reserved, class (low 3 bits), number
_ADDR_ERROR_HEAD = struct.Struct("!BBBB")  # family, reserved, class (low 3 bits), number
_ICMP = struct.Struct("!2xBBI")
_ICMP_OUT = struct.Struct("!HBBI")

_XOR_PORT = MAGIC_COOKIE >> 16


def _bad(reason: str) -> InvalidAttribute:
    return InvalidAttribute(reason)


# --- addresses (RFC 8489 §14.1 MAPPED-ADDRESS, §14.2 XOR-MAPPED-ADDRESS) ----------------------


@functools.lru_cache(maxsize=4096)
def _ipv6_text(packed: bytes) -> str:
    # Peers are few and repeat on every packet: cache the canonical (compressed) text form.
    return str(ipaddress.IPv6Address(packed))


@functools.lru_cache(maxsize=4096)
def parse_ip(ip: str) -> tuple[int, bytes, int]:
    """Text address (any form ``ipaddress`` accepts) -> (family, packed, packed as int)."""
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        raise ValueError(f"not an IP address: {ip!r}") from None
    family = ADDRESS_FAMILY_IPV4 if addr.version == 4 else ADDRESS_FAMILY_IPV6
    return family, addr.packed, int(addr)


def _ipv4_text(value: int) -> str:
    return f"{value >> 24}.{value >> 16 & 255}.{value >> 8 & 255}.{value & 255}"


def _decode_address(data: bytes, off: int, length: int, tid: bytes) -> tuple[str, int]:
    if length < 4:
        raise _bad("address attribute too short")
    family = data[off + 1]
    if family == ADDRESS_FAMILY_IPV4:
        if length != 8:
            raise _bad("IPv4 address attribute must be 8 bytes")
        _, port, value = _ADDR_V4.unpack_from(data, off)
        return _ipv4_text(value), port
    if family == ADDRESS_FAMILY_IPV6:
        if length != 20:
            raise _bad("IPv6 address attribute must be 20 bytes")
        port = _U16.unpack_from(data, off + 2)[0]
        return _ipv6_text(data[off + 4 : off + 20]), port
    raise _bad(f"unknown address family {family}")


def _decode_xor_address(data: bytes, off: int, length: int, tid: bytes) -> tuple[str, int]:
    # RFC 8489 §14.2: port XOR the cookie's top 16 bits; IPv4 XOR the cookie; IPv6 XOR the
    # cookie followed by the transaction ID.
    if length < 4:
        raise _bad("address attribute too short")
    family = data[off + 1]
    if family == ADDRESS_FAMILY_IPV4:
        if length != 8:
            raise _bad("IPv4 address attribute must be 8 bytes")
        _, port, value = _ADDR_V4.unpack_from(data, off)
        return _ipv4_text(value ^ MAGIC_COOKIE), port ^ _XOR_PORT
    if family == ADDRESS_FAMILY_IPV6:
        if length != 20:
            raise _bad("IPv6 address attribute must be 20 bytes")
        port = _U16.unpack_from(data, off + 2)[0] ^ _XOR_PORT
        value = int.from_bytes(data[off + 4 : off + 20], "big") ^ int.from_bytes(
            MAGIC_COOKIE_BYTES + tid, "big"
        )
        return _ipv6_text(value.to_bytes(16, "big")), port
    raise _bad(f"unknown address family {family}")


def _split_address(value: object) -> tuple[tuple[int, bytes, int], int]:
    ip, port = cast(Any, value)
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port!r}")
    return parse_ip(ip), port


def _encode_address(value: object, tid: bytes) -> bytes:
    (family, packed, as_int), port = _split_address(value)
    if family == ADDRESS_FAMILY_IPV4:
        return _ADDR_V4_OUT.pack(0, family, port, as_int)
    return _ADDR_HEAD_OUT.pack(0, family, port) + packed


def _encode_xor_address(value: object, tid: bytes) -> bytes:
    (family, packed, as_int), port = _split_address(value)
    if family == ADDRESS_FAMILY_IPV4:
        return _ADDR_V4_OUT.pack(0, family, port ^ _XOR_PORT, as_int ^ MAGIC_COOKIE)
    xored = as_int ^ int.from_bytes(MAGIC_COOKIE_BYTES + tid, "big")
    return _ADDR_HEAD_OUT.pack(0, family, port ^ _XOR_PORT) + xored.to_bytes(16, "big")


# --- text (RFC 8489 §14.3 USERNAME, §14.9 REALM, §14.10 NONCE, §14.14 SOFTWARE) --------------


def _text_decoder(limit: int) -> Decoder:
    def decode(data: bytes, off: int, length: int, tid: bytes) -> str:
        if length > limit:
            raise _bad(f"text attribute longer than {limit} bytes")
        try:
            return data[off : off + length].decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("text attribute is not UTF-8") from None

    return decode


def _text_encoder(limit: int) -> Encoder:
    def encode(value: object, tid: bytes) -> bytes:
        if type(value) is not str:
            raise TypeError(f"text attribute needs str, got {type(value).__name__}")
        raw = value.encode("utf-8")
        if len(raw) > limit:
            raise ValueError(f"text attribute longer than {limit} bytes")
        return raw

    return encode


# --- opaque bytes -----------------------------------------------------------------------------


def encode_bytes(value: object, tid: bytes) -> bytes:
    """DATA and attribute types without a codec carry raw bytes both ways."""
    if type(value) is bytes:
        return value
    if isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    raise TypeError(f"attribute needs bytes, got {type(value).__name__}")


def _sized_bytes_decoder(sizes: frozenset[int]) -> Decoder:
    def decode(data: bytes, off: int, length: int, tid: bytes) -> bytes:
        if length not in sizes:
            raise _bad(f"attribute has wrong length {length}")
        return data[off : off + length]

    return decode


def _sized_bytes_encoder(sizes: frozenset[int]) -> Encoder:
    def encode(value: object, tid: bytes) -> bytes:
        raw = encode_bytes(value, tid)
        if len(raw) not in sizes:
            raise ValueError(f"attribute has wrong length {len(raw)}")
        return raw

    return encode


def _decode_data(data: bytes, off: int, length: int, tid: bytes) -> bytes:
    # The hot path (every Send indication): no checks to make, DATA may be any length.
    return data[off : off + length]


# --- integers ---------------------------------------------------------------------------------


def _int_decoder(fmt: struct.Struct) -> Decoder:
    size = fmt.size

    def decode(data: bytes, off: int, length: int, tid: bytes) -> int:
        if length != size:
            raise _bad(f"attribute must be {size} bytes, is {length}")
        value: int = fmt.unpack_from(data, off)[0]
        return value

    return decode


def _int_encoder(fmt: struct.Struct, bits: int) -> Encoder:
    top = (1 << bits) - 1

    def encode(value: object, tid: bytes) -> bytes:
        if not isinstance(value, int):
            raise TypeError(f"attribute needs int, got {type(value).__name__}")
        if not 0 <= value <= top:
            raise ValueError(f"attribute value out of range: {value}")
        return fmt.pack(value)

    return encode


def _empty_decoder(data: bytes, off: int, length: int, tid: bytes) -> None:
    if length:
        raise _bad("attribute must be empty")
    return None


def _empty_encoder(value: object, tid: bytes) -> bytes:
    if value is not None:
        raise ValueError("empty attribute takes None as its value")
    return b""


# --- RFC 8656 §18.7 EVEN-PORT -----------------------------------------------------------------


def _decode_even_port(data: bytes, off: int, length: int, tid: bytes) -> bool:
    if length != 1:
        raise _bad("EVEN-PORT must be 1 byte")
    return bool(data[off] & 0x80)


def _encode_even_port(value: object, tid: bytes) -> bytes:
    if type(value) is not bool:
        raise TypeError("EVEN-PORT takes a bool")
    return b"\x80" if value else b"\x00"


# --- RFC 8489 §14.8 ERROR-CODE, RFC 8656 §18.12 ADDRESS-ERROR-CODE --------------------------


def _code_of(klass: int, number: int) -> int:
    klass &= 0x07
    if not 3 <= klass <= 6 or number > 99:
        raise _bad(f"error code class {klass} number {number} out of range")
    return klass * 100 + number


def _reason_of(data: bytes, start: int, end: int) -> str:
    if end - start > MAX_TEXT_BYTES:
        raise _bad("reason phrase too long")
    try:
        return data[start:end].decode("utf-8")
    except UnicodeDecodeError:
        raise _bad("reason phrase is not UTF-8") from None


def _check_code(code: object) -> int:
    if not isinstance(code, int):
        raise TypeError("error code must be an int")
    if not 300 <= code <= 699:
        raise ValueError(f"error code {code} outside 300-699")
    return int(code)


def _encode_reason(reason: object) -> bytes:
    if type(reason) is not str:
        raise TypeError("reason phrase must be str")
    raw = reason.encode("utf-8")
    if len(raw) > MAX_TEXT_BYTES_OUT:
        raise ValueError("reason phrase too long")
    return raw


def _decode_error_code(data: bytes, off: int, length: int, tid: bytes) -> tuple[int, str]:
    if length < 4:
        raise _bad("ERROR-CODE too short")
    _, klass, number = _ERROR_HEAD.unpack_from(data, off)
    return _code_of(klass, number), _reason_of(data, off + 4, off + length)


def _encode_error_code(value: object, tid: bytes) -> bytes:
    code, reason = cast(Any, value)
    code = _check_code(code)
    return _ERROR_HEAD.pack(0, code // 100, code % 100) + _encode_reason(reason)


def _decode_address_error_code(
    data: bytes, off: int, length: int, tid: bytes
) -> tuple[int, int, str]:
    if length < 4:
        raise _bad("ADDRESS-ERROR-CODE too short")
    family, _, klass, number = _ADDR_ERROR_HEAD.unpack_from(data, off)
    return family, _code_of(klass, number), _reason_of(data, off + 4, off + length)


def _encode_address_error_code(value: object, tid: bytes) -> bytes:
    family, code, reason = cast(Any, value)
    if not isinstance(family, int) or not 0 <= family <= 0xFF:
        raise ValueError("address family must be a byte")
    code = _check_code(code)
    return _ADDR_ERROR_HEAD.pack(family, 0, code // 100, code % 100) + _encode_reason(reason)


# --- RFC 8489 §14.13 UNKNOWN-ATTRIBUTES -------------------------------------------------------


def _decode_unknown_attributes(data: bytes, off: int, length: int, tid: bytes) -> list[int]:
    if length & 1:
        raise _bad("UNKNOWN-ATTRIBUTES length must be even")
    return list(struct.unpack_from(f"!{length // 2}H", data, off))


def _encode_unknown_attributes(value: object, tid: bytes) -> bytes:
    types = list(cast(Any, value))
    for t in types:
        if not isinstance(t, int) or not 0 <= t <= 0xFFFF:
            raise ValueError(f"attribute type out of range: {t!r}")
    return struct.pack(f"!{len(types)}H", *types)


# --- RFC 8489 §14.11 PASSWORD-ALGORITHMS, §14.12 PASSWORD-ALGORITHM ---------------------------


def _read_algorithm(data: bytes, off: int, end: int) -> tuple[tuple[int, bytes], int]:
    """One (algorithm, parameters) entry at ``off``; returns it and the padded end."""
    if end - off < 4:
        raise _bad("password algorithm entry too short")
    algorithm, plen = _U16_U16.unpack_from(data, off)
    start = off + 4
    if start + plen > end:
        raise _bad("password algorithm parameters overrun the attribute")
    return (algorithm, data[start : start + plen]), min(start + ((plen + 3) & ~3), end)


def _write_algorithm(entry: object) -> bytes:
    algorithm, params = cast(Any, entry)
    if not isinstance(algorithm, int) or not 0 <= algorithm <= 0xFFFF:
        raise ValueError(f"password algorithm out of range: {algorithm!r}")
    if not isinstance(params, (bytes, bytearray, memoryview)):
        raise TypeError("password algorithm parameters must be bytes")
    params = bytes(params)
    if len(params) > 0xFFFF:
        raise ValueError("password algorithm parameters too long")
    # §14.11, §14.12: "padded to a 32-bit boundary, in the same manner as an attribute".
    return _U16_U16.pack(algorithm, len(params)) + params + ZERO_PAD[-len(params) & 3]


def _decode_password_algorithm(
    data: bytes, off: int, length: int, tid: bytes
) -> tuple[int, bytes]:
    end = off + length
    entry, stop = _read_algorithm(data, off, end)
    if stop != end:
        raise _bad("PASSWORD-ALGORITHM has trailing bytes")
    return entry


def _encode_password_algorithm(value: object, tid: bytes) -> bytes:
    return _write_algorithm(value)


def _decode_password_algorithms(
    data: bytes, off: int, length: int, tid: bytes
) -> list[tuple[int, bytes]]:
    end = off + length
    entries = []
    while off < end:
        entry, off = _read_algorithm(data, off, end)
        entries.append(entry)
    return entries


def _encode_password_algorithms(value: object, tid: bytes) -> bytes:
    return b"".join(_write_algorithm(entry) for entry in cast(Any, value))


# --- RFC 8656 §18.13 ICMP ---------------------------------------------------------------------
# The figure draws ICMP Type and ICMP Code across a 7/9-bit split, but both are whole octets in
# ICMP itself (and ICMPv6 types reach 255), so they are read and written as one octet each.


def _decode_icmp(data: bytes, off: int, length: int, tid: bytes) -> tuple[int, int, int]:
    if length != 8:
        raise _bad("ICMP must be 8 bytes")
    icmp_type, icmp_code, error_data = _ICMP.unpack_from(data, off)
    return icmp_type, icmp_code, error_data


def _encode_icmp(value: object, tid: bytes) -> bytes:
    icmp_type, icmp_code, error_data = cast(Any, value)
    try:
        return _ICMP_OUT.pack(0, icmp_type, icmp_code, error_data)
    except struct.error as exc:
        raise ValueError(f"bad ICMP value: {exc}") from None


# --- integers with reserved bits (RFC 8656 §18.1, §18.6, §18.8, §18.11) ----------------------


def _decode_channel_number(data: bytes, off: int, length: int, tid: bytes) -> int:
    if length != 4:
        raise _bad("CHANNEL-NUMBER must be 4 bytes")
    value: int = _U16.unpack_from(data, off)[0]  # the low 16 bits are RFFU: ignored
    return value


def _encode_channel_number(value: object, tid: bytes) -> bytes:
    if not isinstance(value, int) or not 0 <= value <= 0xFFFF:
        raise ValueError(f"channel number out of range: {value!r}")
    return _U16_2X.pack(value)


def _decode_byte_3x(data: bytes, off: int, length: int, tid: bytes) -> int:
    if length != 4:
        raise _bad("attribute must be 4 bytes")
    return data[off]  # the three bytes after it are RFFU: ignored


def _encode_byte_3x(value: object, tid: bytes) -> bytes:
    if not isinstance(value, int) or not 0 <= value <= 0xFF:
        raise ValueError(f"value must be a byte: {value!r}")
    return _U8_3X.pack(value)


# --- tables -----------------------------------------------------------------------------------

_U32_DEC = _int_decoder(_U32)
_U32_ENC = _int_encoder(_U32, 32)
_U64_DEC = _int_decoder(_U64)
_U64_ENC = _int_encoder(_U64, 64)

ADDRESS_TYPES = frozenset(
    {Attr.MAPPED_ADDRESS, Attr.ALTERNATE_SERVER, Attr.RESPONSE_ORIGIN, Attr.OTHER_ADDRESS}
)
XOR_ADDRESS_TYPES = frozenset(
    {Attr.XOR_MAPPED_ADDRESS, Attr.XOR_PEER_ADDRESS, Attr.XOR_RELAYED_ADDRESS}
)

DECODERS: dict[int, Decoder] = {
    **{int(t): _decode_address for t in ADDRESS_TYPES},
    **{int(t): _decode_xor_address for t in XOR_ADDRESS_TYPES},
    **{int(t): _text_decoder(limits[0]) for t, limits in _TEXT_LIMITS.items()},
    Attr.MESSAGE_INTEGRITY: _sized_bytes_decoder(frozenset({20})),
    Attr.MESSAGE_INTEGRITY_SHA256: _sized_bytes_decoder(frozenset({16, 20, 24, 28, 32})),
    Attr.USERHASH: _sized_bytes_decoder(frozenset({32})),
    Attr.RESERVATION_TOKEN: _sized_bytes_decoder(frozenset({8})),
    Attr.DATA: _decode_data,
    Attr.ERROR_CODE: _decode_error_code,
    Attr.UNKNOWN_ATTRIBUTES: _decode_unknown_attributes,
    Attr.CHANNEL_NUMBER: _decode_channel_number,
    Attr.LIFETIME: _U32_DEC,
    Attr.PRIORITY: _U32_DEC,
    Attr.CONNECTION_ID: _U32_DEC,
    # FINGERPRINT has no decoder: decode_message checks it against the CRC itself.
    Attr.ICE_CONTROLLED: _U64_DEC,
    Attr.ICE_CONTROLLING: _U64_DEC,
    Attr.REQUESTED_ADDRESS_FAMILY: _decode_byte_3x,
    Attr.ADDITIONAL_ADDRESS_FAMILY: _decode_byte_3x,
    Attr.REQUESTED_TRANSPORT: _decode_byte_3x,
    Attr.EVEN_PORT: _decode_even_port,
    Attr.DONT_FRAGMENT: _empty_decoder,
    Attr.USE_CANDIDATE: _empty_decoder,
    Attr.PASSWORD_ALGORITHM: _decode_password_algorithm,
    Attr.PASSWORD_ALGORITHMS: _decode_password_algorithms,
    Attr.ADDRESS_ERROR_CODE: _decode_address_error_code,
    Attr.ICMP: _decode_icmp,
}

ENCODERS: dict[int, Encoder] = {
    **{int(t): _encode_address for t in ADDRESS_TYPES},
    **{int(t): _encode_xor_address for t in XOR_ADDRESS_TYPES},
    **{int(t): _text_encoder(limits[1]) for t, limits in _TEXT_LIMITS.items()},
    Attr.MESSAGE_INTEGRITY: _sized_bytes_encoder(frozenset({20})),
    Attr.MESSAGE_INTEGRITY_SHA256: _sized_bytes_encoder(frozenset({16, 20, 24, 28, 32})),
    Attr.USERHASH: _sized_bytes_encoder(frozenset({32})),
    Attr.RESERVATION_TOKEN: _sized_bytes_encoder(frozenset({8})),
    Attr.DATA: encode_bytes,
    Attr.ERROR_CODE: _encode_error_code,
    Attr.UNKNOWN_ATTRIBUTES: _encode_unknown_attributes,
    Attr.CHANNEL_NUMBER: _encode_channel_number,
    Attr.LIFETIME: _U32_ENC,
    Attr.PRIORITY: _U32_ENC,
    Attr.CONNECTION_ID: _U32_ENC,
    Attr.FINGERPRINT: _U32_ENC,
    Attr.ICE_CONTROLLED: _U64_ENC,
    Attr.ICE_CONTROLLING: _U64_ENC,
    Attr.REQUESTED_ADDRESS_FAMILY: _encode_byte_3x,
    Attr.ADDITIONAL_ADDRESS_FAMILY: _encode_byte_3x,
    Attr.REQUESTED_TRANSPORT: _encode_byte_3x,
    Attr.EVEN_PORT: _encode_even_port,
    Attr.DONT_FRAGMENT: _empty_encoder,
    Attr.USE_CANDIDATE: _empty_encoder,
    Attr.PASSWORD_ALGORITHM: _encode_password_algorithm,
    Attr.PASSWORD_ALGORITHMS: _encode_password_algorithms,
    Attr.ADDRESS_ERROR_CODE: _encode_address_error_code,
    Attr.ICMP: _encode_icmp,
}


# Reserved bits that a decoder drops: when set, the decoded value alone cannot reproduce the
# bytes received, so the message keeps the original attribute bytes for re-encoding.
def _first_byte_set(data: bytes, off: int, length: int) -> bool:
    return data[off] != 0


def _low_three_bytes_set(data: bytes, off: int, length: int) -> bool:
    return data[off + 1 : off + 4] != b"\x00\x00\x00"


def _params_not_canonical(data: bytes, off: int, length: int) -> bool:
    # Entry padding can hold anything; compare with what the encoder would write.
    try:
        entries = _decode_password_algorithms(data, off, length, b"")
    except InvalidAttribute:
        return True
    return b"".join(_write_algorithm(e) for e in entries) != data[off : off + length]


RESERVED_CHECKS: dict[int, ReservedCheck] = {
    **{int(t): _first_byte_set for t in ADDRESS_TYPES | XOR_ADDRESS_TYPES},
    Attr.CHANNEL_NUMBER: lambda d, o, n: d[o + 2] != 0 or d[o + 3] != 0,
    Attr.REQUESTED_ADDRESS_FAMILY: _low_three_bytes_set,
    Attr.ADDITIONAL_ADDRESS_FAMILY: _low_three_bytes_set,
    Attr.REQUESTED_TRANSPORT: _low_three_bytes_set,
    Attr.EVEN_PORT: lambda d, o, n: d[o] & 0x7F != 0,
    Attr.ERROR_CODE: lambda d, o, n: d[o] != 0 or d[o + 1] != 0 or d[o + 2] & 0xF8 != 0,
    Attr.ADDRESS_ERROR_CODE: lambda d, o, n: d[o + 1] != 0 or d[o + 2] & 0xF8 != 0,
    Attr.ICMP: lambda d, o, n: d[o] != 0 or d[o + 1] != 0,
    Attr.PASSWORD_ALGORITHM: _params_not_canonical,  # one entry is a list of one
    Attr.PASSWORD_ALGORITHMS: _params_not_canonical,
}
