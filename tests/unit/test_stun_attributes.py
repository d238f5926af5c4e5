"""Attribute value codecs: round trips, exact wire bytes, reserved bits, malformed values."""

from __future__ import annotations

import hashlib
import ipaddress
import struct

import pytest

from turnserver.stun import (
    ADDRESS_FAMILY_IPV4,
    ADDRESS_FAMILY_IPV6,
    MAGIC_COOKIE,
    PASSWORD_ALGORITHM_MD5,
    PASSWORD_ALGORITHM_SHA256,
    Attr,
    MalformedMessageError,
    Message,
    MessageClass,
    Method,
    decode_message,
    encode_message,
)

TID = bytes(range(1, 13))


def tlv(attr_type: int, value: bytes, pad: bytes = b"\x00") -> bytes:
    return struct.pack("!HH", attr_type, len(value)) + value + pad * (-len(value) & 3)


def raw_message(*attrs: bytes, msg_type: int = 0x0001, tid: bytes = TID) -> bytes:
    body = b"".join(attrs)
    return struct.pack("!HHI", msg_type, len(body), MAGIC_COOKIE) + tid + body


def one(attr_type: int, value: object, tid: bytes = TID) -> bytes:
    """The encoded attribute (header, value, padding) of a message holding just that one."""
    return encode_message(Message(Method.ALLOCATE, MessageClass.REQUEST, tid, [(attr_type, value)]))[20:]


ROUND_TRIPS: list[tuple[int, object]] = [
    (Attr.MAPPED_ADDRESS, ("192.0.2.1", 3478)),
    (Attr.MAPPED_ADDRESS, ("2001:db8::1", 0)),
    (Attr.XOR_MAPPED_ADDRESS, ("203.0.113.9", 65535)),
    (Attr.XOR_MAPPED_ADDRESS, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    (Attr.XOR_PEER_ADDRESS, ("198.51.100.7", 49152)),
    # Canonical text is whatever ipaddress prints (it changed for mapped IPv4 in 3.13).
    (Attr.XOR_PEER_ADDRESS, (str(ipaddress.IPv6Address("::ffff:192.0.2.1")), 5)),
    (Attr.XOR_RELAYED_ADDRESS, ("127.0.0.1", 50000)),
    (Attr.XOR_RELAYED_ADDRESS, ("::1", 50001)),
    (Attr.ALTERNATE_SERVER, ("192.0.2.200", 3479)),
    (Attr.ALTERNATE_SERVER, ("fe80::1:2:3:4", 3479)),
    (Attr.RESPONSE_ORIGIN, ("10.0.0.1", 3478)),
    (Attr.RESPONSE_ORIGIN, ("2001:db8::", 3478)),
    (Attr.OTHER_ADDRESS, ("10.0.0.2", 3479)),
    (Attr.OTHER_ADDRESS, ("::", 1)),
    (Attr.USERNAME, "1700000000:alice"),
    (Attr.USERNAME, "マトリックス"),
    (Attr.USERNAME, ""),
    (Attr.REALM, "example.org"),
    (Attr.NONCE, "f//499k954d6OL34oL9FSTvy64sA"),
    (Attr.SOFTWARE, "turnserver 0.1"),
    (Attr.ALTERNATE_DOMAIN, "turn.example.net"),
    (Attr.MESSAGE_INTEGRITY, bytes(range(20))),
    (Attr.MESSAGE_INTEGRITY_SHA256, bytes(range(32))),
    (Attr.USERHASH, hashlib.sha256(b"u:r").digest()),
    (Attr.RESERVATION_TOKEN, b"\x01\x02\x03\x04\x05\x06\x07\x08"),
    (Attr.DATA, b""),
    (Attr.DATA, b"\x00hello\xff"),
    (Attr.DATA, bytes(1000)),
    (Attr.CONNECTION_ID, 0xDEADBEEF),
    (Attr.LIFETIME, 600),
    (Attr.PRIORITY, 0x6E0001FF),
    (Attr.CHANNEL_NUMBER, 0x4001),
    (Attr.REQUESTED_TRANSPORT, 17),
    (Attr.REQUESTED_TRANSPORT, 6),
    (Attr.ICE_CONTROLLED, 0x932FF9B151263B36),
    (Attr.ICE_CONTROLLING, 2**64 - 1),
    (Attr.REQUESTED_ADDRESS_FAMILY, ADDRESS_FAMILY_IPV6),
    (Attr.ADDITIONAL_ADDRESS_FAMILY, ADDRESS_FAMILY_IPV6),
    (Attr.EVEN_PORT, True),
    (Attr.EVEN_PORT, False),
    (Attr.DONT_FRAGMENT, None),
    (Attr.USE_CANDIDATE, None),
    (Attr.ERROR_CODE, (438, "Stale Nonce")),
    (Attr.ERROR_CODE, (300, "")),
    (Attr.ERROR_CODE, (699, "ünïcödé")),
    (Attr.UNKNOWN_ATTRIBUTES, [0x0031, 0x7FFF]),
    (Attr.UNKNOWN_ATTRIBUTES, [0x0001]),
    (Attr.UNKNOWN_ATTRIBUTES, []),
    (Attr.PASSWORD_ALGORITHM, (PASSWORD_ALGORITHM_SHA256, b"")),
    (Attr.PASSWORD_ALGORITHM, (0x7F00, b"abc")),
    (Attr.PASSWORD_ALGORITHMS, [(PASSWORD_ALGORITHM_MD5, b""), (PASSWORD_ALGORITHM_SHA256, b"")]),
    (Attr.PASSWORD_ALGORITHMS, [(9, b"x"), (10, b"12345")]),
    (Attr.PASSWORD_ALGORITHMS, []),
    (Attr.ADDRESS_ERROR_CODE, (ADDRESS_FAMILY_IPV6, 440, "Address Family not Supported")),
    (Attr.ADDRESS_ERROR_CODE, (ADDRESS_FAMILY_IPV4, 508, "")),
    (Attr.ICMP, (3, 4, 1400)),
    (Attr.ICMP, (255, 255, 0xFFFFFFFF)),
    (0x7777, b"unknown comprehension-required"),
    (0xC001, b"unknown optional"),
]


@pytest.mark.parametrize(("attr_type", "value"), ROUND_TRIPS, ids=lambda x: repr(x)[:40])
def test_attribute_round_trip(attr_type: int, value: object) -> None:
    msg = Message(Method.ALLOCATE, MessageClass.REQUEST, TID, [(attr_type, value)])
    raw = encode_message(msg)
    assert len(raw) % 4 == 0
    decoded = decode_message(raw)
    assert decoded.attributes == [(attr_type, value)]
    assert decoded == msg
    assert encode_message(decoded) == raw


def test_round_trip_all_attributes_in_one_message() -> None:
    # Integrity attributes last: what follows them is ignored on decode (RFC 8489 §14.5).
    integrity = (Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256)
    attrs = [item for item in ROUND_TRIPS if item[0] not in integrity]
    attrs += [item for item in ROUND_TRIPS if item[0] in integrity]
    msg = Message(Method.ALLOCATE, MessageClass.REQUEST, TID, attrs)
    decoded = decode_message(encode_message(msg))
    assert decoded == msg
    assert len(decoded.attributes) == len(ROUND_TRIPS)


@pytest.mark.parametrize(
    ("attr_type", "value", "wire"),
    [
        (Attr.MAPPED_ADDRESS, ("192.0.2.1", 32853), "0001 0008 00 01 8055 c0000201"),
        (
            Attr.MAPPED_ADDRESS,
            ("2001:db8::1", 1),
            "0001 0014 00 02 0001 20010db8000000000000000000000001",
        ),
        # RFC 8489 §14.2: port ^ 0x2112, IPv4 ^ cookie, IPv6 ^ (cookie || transaction ID).
        (Attr.XOR_PEER_ADDRESS, ("192.0.2.1", 32853), "0012 0008 00 01 a147 e112a643"),
        (
            Attr.XOR_RELAYED_ADDRESS,
            ("::", 0x2112),
            "0016 0014 00 02 0000 2112a442 0102030405060708090a0b0c",
        ),
        (Attr.USERNAME, "abcde", "0006 0005 6162636465 000000"),
        (Attr.CHANNEL_NUMBER, 0x4FFF, "000c 0004 4fff 0000"),
        (Attr.LIFETIME, 3600, "000d 0004 00000e10"),
        (Attr.REQUESTED_TRANSPORT, 17, "0019 0004 11 000000"),
        (Attr.REQUESTED_ADDRESS_FAMILY, 2, "0017 0004 02 000000"),
        (Attr.ADDITIONAL_ADDRESS_FAMILY, 2, "8000 0004 02 000000"),
        (Attr.EVEN_PORT, True, "0018 0001 80 000000"),
        (Attr.EVEN_PORT, False, "0018 0001 00 000000"),
        (Attr.DONT_FRAGMENT, None, "001a 0000"),
        (Attr.USE_CANDIDATE, None, "0025 0000"),
        (Attr.ERROR_CODE, (438, "Stale Nonce"), "0009 000f 0000 04 26 5374616c65204e6f6e6365 00"),
        (Attr.ERROR_CODE, (508, ""), "0009 0004 0000 05 08"),
        (Attr.UNKNOWN_ATTRIBUTES, [0x0031, 0x0032, 0x0033], "000a 0006 0031 0032 0033 0000"),
        (Attr.PASSWORD_ALGORITHM, (2, b""), "001d 0004 0002 0000"),
        (Attr.PASSWORD_ALGORITHMS, [(1, b""), (2, b"")], "8002 0008 0001 0000 0002 0000"),
        (Attr.PASSWORD_ALGORITHMS, [(9, b"ab"), (1, b"")], "8002 000c 0009 0002 6162 0000 0001 0000"),
        (Attr.ADDRESS_ERROR_CODE, (2, 440, "x"), "8001 0005 02 00 04 28 78 000000"),
        (Attr.ICMP, (3, 4, 1400), "8004 0008 0000 03 04 00000578"),
        (Attr.ICE_CONTROLLING, 1, "802a 0008 0000000000000001"),
        (Attr.CONNECTION_ID, 7, "002a 0004 00000007"),
        (Attr.RESERVATION_TOKEN, b"ABCDEFGH", "0022 0008 4142434445464748"),
        (Attr.DATA, b"\x01", "0013 0001 01 000000"),
    ],
    ids=lambda x: repr(x)[:30],
)
def test_attribute_wire_bytes(attr_type: int, value: object, wire: str) -> None:
    expected = bytes.fromhex(wire.replace(" ", ""))
    assert one(attr_type, value) == expected
    assert decode_message(raw_message(expected)).attributes == [(attr_type, value)]


def test_ipv6_text_is_canonical_on_decode() -> None:
    for given in ("2001:DB8:0:0:0:0:0:1", "2001:0db8::0001", "2001:db8::1"):
        raw = encode_message(
            Message(Method.SEND, MessageClass.INDICATION, TID, [(Attr.XOR_PEER_ADDRESS, (given, 9))])
        )
        assert decode_message(raw).get(Attr.XOR_PEER_ADDRESS) == ("2001:db8::1", 9)


@pytest.mark.parametrize(
    ("attr_type", "value", "wire"),
    [
        # RFFU / reserved bits are ignored on decode (RFC 8656 §18.1, §18.7, §18.8)...
        (Attr.CHANNEL_NUMBER, 0x4001, "4001 abcd"),
        (Attr.REQUESTED_TRANSPORT, 17, "11 ffffff"),
        (Attr.REQUESTED_ADDRESS_FAMILY, 1, "01 010101"),
        (Attr.EVEN_PORT, True, "ff"),
        (Attr.EVEN_PORT, False, "7f"),
        (Attr.ERROR_CODE, (401, "U"), "ffff fc01 55"),
        (Attr.ADDRESS_ERROR_CODE, (1, 443, ""), "01 ff fc 2b"),
        (Attr.ICMP, (1, 2, 3), "ffff 01 02 00000003"),
        (Attr.XOR_PEER_ADDRESS, ("192.0.2.1", 32853), "ff 01 a147 e112a643"),
        (Attr.MAPPED_ADDRESS, ("0.0.0.1", 1), "80 01 0001 00000001"),
    ],
    ids=lambda x: repr(x)[:30],
)
def test_reserved_bits_ignored_on_decode_kept_on_reencode(
    attr_type: int, value: object, wire: str
) -> None:
    original = raw_message(tlv(attr_type, bytes.fromhex(wire.replace(" ", ""))))
    msg = decode_message(original)
    assert msg.attributes == [(attr_type, value)]
    # ...kept when the message is re-encoded unchanged, so it stays byte-exact...
    assert encode_message(msg) == original
    # ...and a message built from the same values writes them as zero.
    fresh = Message(msg.method, msg.msg_class, msg.transaction_id, [(attr_type, value)])
    canonical = encode_message(fresh)
    assert canonical != original
    assert decode_message(canonical) == msg


def test_non_zero_padding_is_kept_only_for_the_unchanged_attribute() -> None:
    original = raw_message(
        tlv(Attr.USERNAME, b"abc", pad=b" "), tlv(Attr.SOFTWARE, b"x", pad=b"\xff")
    )
    msg = decode_message(original)
    assert msg.attributes == [(Attr.USERNAME, "abc"), (Attr.SOFTWARE, "x")]
    assert encode_message(msg) == original

    msg.attributes[1] = (Attr.SOFTWARE, "x")  # equal value, but a new pair: fresh encoding
    assert encode_message(msg) == raw_message(
        tlv(Attr.USERNAME, b"abc", pad=b" "), tlv(Attr.SOFTWARE, b"x")
    )
    msg.attributes.insert(0, (Attr.LIFETIME, 5))  # shifting the list keeps the kept bytes
    assert encode_message(msg) == raw_message(
        tlv(Attr.LIFETIME, struct.pack("!I", 5)),
        tlv(Attr.USERNAME, b"abc", pad=b" "),
        tlv(Attr.SOFTWARE, b"x"),
    )


def test_unknown_attributes_are_kept_raw_and_reported() -> None:
    original = raw_message(
        tlv(0x7001, b"\x01\x02\x03"),
        tlv(Attr.LIFETIME, b"\x00\x00\x00\x10"),
        tlv(0x8FFF, b"optional"),
        tlv(0x7001, b"again"),
        tlv(0x0002, b"RESPONSE-ADDRESS, retired"),
    )
    msg = decode_message(original)
    assert msg.get(0x7001) == b"\x01\x02\x03"
    assert msg.get_all(0x7001) == [b"\x01\x02\x03", b"again"]
    assert msg.get(0x8FFF) == b"optional"
    # RFC 8489 §6.3.1.1: comprehension-required (< 0x8000) unknown types, each once.
    assert msg.unknown_comprehension_required() == [0x7001, 0x0002]
    assert encode_message(msg) == original


# --- malformed values: the header is sound, so MalformedMessageError ----------------------


MALFORMED: list[tuple[int, bytes]] = [
    (Attr.MAPPED_ADDRESS, bytes.fromhex("0001 0001 7f000001 00")[:7]),  # IPv4 short
    (Attr.MAPPED_ADDRESS, bytes.fromhex("0001 0001 7f000001 0000")),  # IPv4 long
    (Attr.MAPPED_ADDRESS, bytes.fromhex("0002 0001 7f000001")),  # IPv6 family, IPv4 size
    (Attr.MAPPED_ADDRESS, bytes.fromhex("0001 0001") + bytes(16)),  # IPv4 family, IPv6 size
    (Attr.MAPPED_ADDRESS, bytes.fromhex("0003 0001 7f000001")),  # unknown family
    (Attr.MAPPED_ADDRESS, bytes.fromhex("0000 0001 7f000001")),  # family zero
    (Attr.MAPPED_ADDRESS, b"\x00\x01"),
    (Attr.XOR_MAPPED_ADDRESS, bytes.fromhex("0004 0001 7f000001")),
    (Attr.XOR_PEER_ADDRESS, bytes.fromhex("0002 0001") + bytes(12)),
    (Attr.XOR_RELAYED_ADDRESS, b""),
    (Attr.ALTERNATE_SERVER, bytes.fromhex("0001 0001 7f0000")),
    (Attr.RESPONSE_ORIGIN, bytes.fromhex("0009 0001 7f000001")),
    (Attr.OTHER_ADDRESS, bytes.fromhex("0002 0001 7f000001")),
    (Attr.USERNAME, b"\xff\xfe"),  # not UTF-8
    (Attr.USERNAME, b"a" * 513),  # RFC 8489 §14.3 size limit
    (Attr.REALM, b"\xc3"),  # truncated UTF-8 sequence
    (Attr.REALM, b"r" * 764),  # RFC 8489 §14.9: "as long as 763 bytes when decoding"
    (Attr.NONCE, b"\xed\xa0\x80"),  # a UTF-16 surrogate is not UTF-8
    (Attr.NONCE, b"n" * 764),
    (Attr.SOFTWARE, b"s" * 764),
    (Attr.SOFTWARE, b"\x80abc"),
    (Attr.ALTERNATE_DOMAIN, b"\xc0\xaf"),  # overlong encoding
    (Attr.MESSAGE_INTEGRITY, bytes(19)),
    (Attr.MESSAGE_INTEGRITY, bytes(32)),
    (Attr.MESSAGE_INTEGRITY_SHA256, bytes(12)),  # RFC 8489 §14.6: at least 16
    (Attr.MESSAGE_INTEGRITY_SHA256, bytes(18)),  # and a multiple of 4
    (Attr.MESSAGE_INTEGRITY_SHA256, bytes(36)),  # and at most 32
    (Attr.USERHASH, bytes(31)),
    (Attr.RESERVATION_TOKEN, bytes(4)),
    (Attr.ERROR_CODE, bytes.fromhex("0000 04")),  # too short
    (Attr.ERROR_CODE, bytes.fromhex("0000 0200")),  # class 2: 200 is not an error
    (Attr.ERROR_CODE, bytes.fromhex("0000 0763")),  # 799
    (Attr.ERROR_CODE, bytes.fromhex("0000 0464")),  # number 100
    (Attr.ERROR_CODE, bytes.fromhex("0000 0426 ff")),  # reason not UTF-8
    (Attr.ERROR_CODE, bytes.fromhex("0000 0426") + b"r" * 764),
    (Attr.UNKNOWN_ATTRIBUTES, b"\x00\x01\x00"),
    (Attr.CHANNEL_NUMBER, b"\x40\x00"),
    (Attr.LIFETIME, b"\x00\x00\x00\x00\x00"),
    (Attr.LIFETIME, b""),
    (Attr.PRIORITY, b"\x00\x00\x01"),
    (Attr.CONNECTION_ID, b"\x00" * 8),
    (Attr.ICE_CONTROLLED, b"\x00" * 4),
    (Attr.ICE_CONTROLLING, b"\x00" * 9),
    (Attr.REQUESTED_TRANSPORT, b"\x11"),
    (Attr.REQUESTED_ADDRESS_FAMILY, b"\x01\x00"),
    (Attr.ADDITIONAL_ADDRESS_FAMILY, b"\x02\x00\x00\x00\x00"),
    (Attr.EVEN_PORT, b""),
    (Attr.EVEN_PORT, b"\x80\x00\x00\x00"),
    (Attr.DONT_FRAGMENT, b"\x00"),
    (Attr.USE_CANDIDATE, b"\x00\x00\x00\x00"),
    (Attr.PASSWORD_ALGORITHM, b"\x00\x02"),  # too short
    (Attr.PASSWORD_ALGORITHM, bytes.fromhex("0002 0004 0000")),  # params overrun
    (Attr.PASSWORD_ALGORITHM, bytes.fromhex("0002 0000 0001 0000")),  # trailing entry
    (Attr.PASSWORD_ALGORITHMS, bytes.fromhex("0002 0000 0001")),  # truncated entry
    (Attr.PASSWORD_ALGORITHMS, bytes.fromhex("0001 0000 0002 0008 0000")),  # params overrun
    (Attr.ADDRESS_ERROR_CODE, bytes.fromhex("01 00 04")),
    (Attr.ADDRESS_ERROR_CODE, bytes.fromhex("01 00 07 00")),  # 700
    (Attr.ADDRESS_ERROR_CODE, bytes.fromhex("01 00 04 28 fe")),
    (Attr.ICMP, bytes(4)),
    (Attr.ICMP, bytes(12)),
]


@pytest.mark.parametrize(("attr_type", "value"), MALFORMED, ids=lambda x: repr(x)[:30])
def test_malformed_attribute_raises_with_header_fields(attr_type: int, value: bytes) -> None:
    data = raw_message(tlv(Attr.SOFTWARE, b"ok"), tlv(attr_type, value), msg_type=0x0113)
    with pytest.raises(MalformedMessageError) as info:
        decode_message(data)
    # Allocate error response: method and class come through for the caller's reply.
    assert info.value.method == Method.ALLOCATE
    assert info.value.msg_class == MessageClass.ERROR
    assert info.value.transaction_id == TID


def test_text_at_the_size_limits_is_accepted() -> None:
    # RFC 8489 §14.8-§14.14: up to 763 bytes when decoding (USERNAME: RFC 5389's 512).
    data = raw_message(
        tlv(Attr.USERNAME, b"u" * 512),
        tlv(Attr.REALM, b"r" * 763),
        tlv(Attr.NONCE, "é".encode() * 381 + b"n"),
        tlv(Attr.SOFTWARE, b"s" * 763),
        tlv(Attr.ERROR_CODE, bytes.fromhex("0000 0426") + b"e" * 763),
    )
    msg = decode_message(data)
    assert msg.get(Attr.USERNAME) == "u" * 512
    assert msg.get(Attr.NONCE) == "é" * 381 + "n"
    assert len(msg.get(Attr.REALM)) == 763  # type: ignore[arg-type]
    assert len(msg.get(Attr.SOFTWARE)) == 763  # type: ignore[arg-type]
    assert msg.get(Attr.ERROR_CODE) == (438, "e" * 763)


@pytest.mark.parametrize(
    ("attr_type", "fits", "too_long"),
    [
        # RFC 8489 §14.3: USERNAME "fewer than 509 bytes".
        (Attr.USERNAME, "u" * 508, "u" * 509),
        # §14.9, §14.10, §14.14: "as long as 509 bytes when encoding them".
        (Attr.REALM, "r" * 509, "r" * 510),
        (Attr.NONCE, "n" * 509, "n" * 510),
        (Attr.SOFTWARE, "é" * 254 + "s", "é" * 255),
        (Attr.ERROR_CODE, (400, "x" * 509), (400, "x" * 510)),
        (Attr.ADDRESS_ERROR_CODE, (2, 440, "x" * 509), (2, 440, "x" * 510)),
    ],
    ids=lambda x: repr(x)[:20],
)
def test_encoder_holds_to_the_sender_limits(attr_type: int, fits: object, too_long: object) -> None:
    data = encode_message(Message(Method.ALLOCATE, MessageClass.REQUEST, TID, [(attr_type, fits)]))
    assert decode_message(data).get(attr_type) == fits
    with pytest.raises(ValueError):
        encode_message(Message(Method.ALLOCATE, MessageClass.REQUEST, TID, [(attr_type, too_long)]))


def test_truncated_message_integrity_sha256_sizes_are_accepted() -> None:
    for size in (16, 20, 24, 28, 32):
        msg = decode_message(raw_message(tlv(Attr.MESSAGE_INTEGRITY_SHA256, bytes(size))))
        assert msg.get(Attr.MESSAGE_INTEGRITY_SHA256) == bytes(size)


def test_password_algorithm_params_without_inner_padding_are_accepted() -> None:
    # Parameters of 3 bytes padded as attribute padding rather than inside the value.
    msg = decode_message(raw_message(tlv(Attr.PASSWORD_ALGORITHM, bytes.fromhex("0009 0003 616263"))))
    assert msg.get(Attr.PASSWORD_ALGORITHM) == (9, b"abc")
    assert encode_message(msg) == raw_message(tlv(Attr.PASSWORD_ALGORITHM, bytes.fromhex("0009 0003 616263")))


# --- values the encoder refuses -----------------------------------------------------------


@pytest.mark.parametrize(
    ("attr_type", "value", "error"),
    [
        (Attr.XOR_PEER_ADDRESS, ("192.0.2.1", 65536), ValueError),
        (Attr.XOR_PEER_ADDRESS, ("192.0.2.1", -1), ValueError),
        (Attr.XOR_PEER_ADDRESS, ("not an address", 1), ValueError),
        (Attr.MAPPED_ADDRESS, ("256.0.0.1", 1), ValueError),
        (Attr.MAPPED_ADDRESS, ("192.0.2.1", "80"), ValueError),
        (Attr.USERNAME, "u" * 513, ValueError),
        (Attr.USERNAME, b"bytes", TypeError),
        (Attr.REALM, "r" * 510, ValueError),
        (Attr.ERROR_CODE, (200, "OK"), ValueError),
        (Attr.ERROR_CODE, (700, "x"), ValueError),
        (Attr.ERROR_CODE, (400, b"x"), TypeError),
        (Attr.ADDRESS_ERROR_CODE, (1, 299, ""), ValueError),
        (Attr.ADDRESS_ERROR_CODE, (256, 440, ""), ValueError),
        (Attr.MESSAGE_INTEGRITY, bytes(19), ValueError),
        (Attr.MESSAGE_INTEGRITY_SHA256, bytes(17), ValueError),
        (Attr.USERHASH, "text", TypeError),
        (Attr.LIFETIME, -1, ValueError),
        (Attr.LIFETIME, 2**32, ValueError),
        (Attr.LIFETIME, "600", TypeError),
        (Attr.ICE_CONTROLLED, 2**64, ValueError),
        (Attr.CHANNEL_NUMBER, 0x10000, ValueError),
        (Attr.REQUESTED_TRANSPORT, 256, ValueError),
        (Attr.EVEN_PORT, 1, TypeError),
        (Attr.DONT_FRAGMENT, b"", ValueError),
        (Attr.UNKNOWN_ATTRIBUTES, [0x10000], ValueError),
        (Attr.PASSWORD_ALGORITHM, (0x10000, b""), ValueError),
        (Attr.PASSWORD_ALGORITHMS, [(1, "x")], TypeError),
        (Attr.ICMP, (256, 0, 0), ValueError),
        (Attr.DATA, "text", TypeError),
        (0x7001, "text", TypeError),
        (Attr.DATA, bytes(0x10000), ValueError),
    ],
    ids=lambda x: repr(x)[:30],
)
def test_encoder_refuses_values_it_cannot_represent(
    attr_type: int, value: object, error: type[Exception]
) -> None:
    with pytest.raises(error):
        encode_message(Message(Method.ALLOCATE, MessageClass.REQUEST, TID, [(attr_type, value)]))


def test_kept_bytes_are_dropped_when_the_transaction_id_changes() -> None:
    # A reserved bit kept an XOR address's received bytes; those bytes are XORed with the old
    # transaction ID, so a new ID must re-encode the address from its value.
    original = raw_message(tlv(Attr.XOR_PEER_ADDRESS, bytes.fromhex("ff02 a147") + bytes(16)))
    msg = decode_message(original)
    peer = msg.get(Attr.XOR_PEER_ADDRESS)
    assert encode_message(msg) == original
    msg.transaction_id = bytes(12)
    again = decode_message(encode_message(msg))
    assert again.get(Attr.XOR_PEER_ADDRESS) == peer
    assert again.transaction_id == bytes(12)
