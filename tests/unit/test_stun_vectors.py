"""Published test vectors: RFC 5769 §2.1-2.4 and RFC 8489 Appendix B.1.

Every vector is checked three ways: it decodes to the documented fields, its integrity and
fingerprint verify with the documented credentials (which also proves the bytes here were
typed in right), and it re-encodes byte for byte.
"""

from __future__ import annotations

import hashlib

import pytest

from turnserver.stun import (
    PASSWORD_ALGORITHM_SHA256,
    Attr,
    Message,
    MessageClass,
    Method,
    NotStunError,
    decode_message,
    encode_message,
    verify_fingerprint,
    verify_message_integrity,
    verify_message_integrity_sha256,
)


def unhex(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


SHORT_TERM_PASSWORD = b"VOkJxbRl1RmTxUk/WvJxBt"
VECTOR_TID = unhex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")

# RFC 5769 §2.1: Binding request, short-term credentials, SOFTWARE/USERNAME padded with 0x20.
RFC5769_REQUEST = unhex(
    """
    00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf
    """
)

# RFC 5769 §2.2: Binding success, XOR-MAPPED-ADDRESS 192.0.2.1:32853.
RFC5769_IPV4_RESPONSE = unhex(
    """
    01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96
    """
)

# RFC 5769 §2.3: Binding success, XOR-MAPPED-ADDRESS [2001:db8:1234:5678:11:2233:4455:6677]:32853.
RFC5769_IPV6_RESPONSE = unhex(
    """
    01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c
    """
)

# RFC 5769 §2.4: Binding request, long-term credentials, no FINGERPRINT, zero padding.
RFC5769_LONG_TERM = unhex(
    """
    00 01 00 60 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 06 00 12 e3 83 9e e3 83 88 e3 83 aa e3 83 83 e3 82 af e3 82 b9 00 00
    00 15 00 1c 66 2f 2f 34 39 39 6b 39 35 34 64 36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 08 00 14 f6 70 24 65 6d d6 4a 3e 02 b8 e0 71 2e 85 c9 a2 8c a8 96 66
    """
)
LONG_TERM_USERNAME = "\u30de\u30c8\u30ea\u30c3\u30af\u30b9"  # マトリックス
LONG_TERM_REALM = "example.org"
LONG_TERM_PASSWORD = "TheMatrIX"  # "The\u00adM\u00aatr\u2168" after SASLprep/OpaqueString
LONG_TERM_NONCE = "f//499k954d6OL34oL9FSTvy64sA"
LONG_TERM_KEY = hashlib.md5(
    f"{LONG_TERM_USERNAME}:{LONG_TERM_REALM}:{LONG_TERM_PASSWORD}".encode()
).digest()

# RFC 8489 Appendix B.1 as corrected by verified erratum 6268: the printed vector's length
# (0x9c) and MESSAGE-INTEGRITY-SHA256 do not match its own bytes; the erratum adds the
# PASSWORD-ALGORITHM attribute and fixes both. The test below recomputes USERHASH and the
# HMAC from the documented credentials, so a mistyped byte here would fail.
RFC8489_B1 = unhex(
    """
    00 01 00 90 21 12 a4 42 78 ad 34 33 c6 ad 72 c0 29 da 41 2e
    00 1e 00 20 4a 3c f3 8f ef 69 92 bd a9 52 c6 78 04 17 da 0f
                24 81 94 15 56 9e 60 b2 05 c4 6e 41 40 7f 17 04
    00 15 00 29 6f 62 4d 61 74 4a 6f 73 32 41 41 41 43 66 2f 2f 34 39 39 6b 39 35 34 64
                36 4f 4c 33 34 6f 4c 39 46 53 54 76 79 36 34 73 41 00 00 00
    00 14 00 0b 65 78 61 6d 70 6c 65 2e 6f 72 67 00
    00 1d 00 04 00 02 00 00
    00 1c 00 20 b5 c7 bf 00 5b 6c 52 a2 1c 51 c5 e8 92 f8 19 24
                13 62 96 cb 92 7c 43 14 93 09 27 8c c6 51 8e 65
    """
)
B1_NONCE = "obMatJos2AAACf//499k954d6OL34oL9FSTvy64sA"
# RFC 8489 §9.2.2: with PASSWORD-ALGORITHM SHA-256 the key is SHA-256 of the same string.
B1_KEY = hashlib.sha256(
    f"{LONG_TERM_USERNAME}:{LONG_TERM_REALM}:{LONG_TERM_PASSWORD}".encode()
).digest()

ALL_VECTORS = [RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE, RFC5769_LONG_TERM]


def _without(msg: Message, *types: int) -> None:
    msg.attributes = [item for item in msg.attributes if item[0] not in types]


# --- RFC 5769 §2.1 ------------------------------------------------------------------------


def test_rfc5769_2_1_request_decodes_every_field() -> None:
    msg = decode_message(RFC5769_REQUEST)
    assert msg.method == Method.BINDING
    assert msg.msg_class == MessageClass.REQUEST
    assert msg.transaction_id == VECTOR_TID
    assert msg.raw == RFC5769_REQUEST
    assert [t for t, _ in msg.attributes] == [
        Attr.SOFTWARE,
        Attr.PRIORITY,
        Attr.ICE_CONTROLLED,
        Attr.USERNAME,
        Attr.MESSAGE_INTEGRITY,
        Attr.FINGERPRINT,
    ]
    assert msg.get(Attr.SOFTWARE) == "STUN test client"
    assert msg.get(Attr.PRIORITY) == 0x6E0001FF
    assert msg.get(Attr.ICE_CONTROLLED) == 0x932FF9B151263B36
    assert msg.get(Attr.USERNAME) == "evtj:h6vY"
    assert msg.get(Attr.MESSAGE_INTEGRITY) == unhex(
        "9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2"
    )
    assert msg.get(Attr.FINGERPRINT) == 0xE57A3BCF
    assert msg.unknown_comprehension_required() == []


def test_rfc5769_2_1_request_integrity_and_fingerprint_verify() -> None:
    msg = decode_message(RFC5769_REQUEST)
    assert verify_message_integrity(msg, SHORT_TERM_PASSWORD)
    assert not verify_message_integrity(msg, b"VOkJxbRl1RmTxUk/WvJxBu")
    assert verify_fingerprint(msg)
    assert not verify_message_integrity_sha256(msg, SHORT_TERM_PASSWORD)  # none present


def test_rfc5769_2_1_request_reencodes_byte_for_byte() -> None:
    assert encode_message(decode_message(RFC5769_REQUEST)) == RFC5769_REQUEST


def test_rfc5769_2_1_request_recomputed_integrity_keeps_received_padding() -> None:
    # Dropping MI and FINGERPRINT and letting the encoder compute them again must give the
    # same values: the USERNAME's 0x20 padding is kept from the received bytes.
    msg = decode_message(RFC5769_REQUEST)
    _without(msg, Attr.MESSAGE_INTEGRITY, Attr.FINGERPRINT)
    assert encode_message(msg, key=SHORT_TERM_PASSWORD, fingerprint=True) == RFC5769_REQUEST


def test_rfc5769_2_1_request_built_from_scratch_differs_only_in_padding() -> None:
    # Locally built attributes pad with zeros, so MI and FINGERPRINT change; putting the
    # vector's 0x20 padding back into our encoding must reproduce the vector exactly.
    msg = Message(
        Method.BINDING,
        MessageClass.REQUEST,
        VECTOR_TID,
        [
            (Attr.SOFTWARE, "STUN test client"),
            (Attr.PRIORITY, 0x6E0001FF),
            (Attr.ICE_CONTROLLED, 0x932FF9B151263B36),
            (Attr.USERNAME, "evtj:h6vY"),
        ],
    )
    ours = encode_message(msg, key=SHORT_TERM_PASSWORD, fingerprint=True)
    assert len(ours) == len(RFC5769_REQUEST)
    username_padding = slice(20 + 20 + 8 + 12 + 4 + 9, 20 + 20 + 8 + 12 + 4 + 12)
    assert ours[username_padding] == b"\x00\x00\x00"
    assert RFC5769_REQUEST[username_padding] == b"   "
    assert ours[:-32] == RFC5769_REQUEST[:-32].replace(b"h6vY   ", b"h6vY\x00\x00\x00")
    reparsed = decode_message(ours)
    assert verify_message_integrity(reparsed, SHORT_TERM_PASSWORD)
    assert verify_fingerprint(reparsed)
    assert reparsed == Message(
        Method.BINDING,
        MessageClass.REQUEST,
        VECTOR_TID,
        msg.attributes
        + [
            (Attr.MESSAGE_INTEGRITY, reparsed.get(Attr.MESSAGE_INTEGRITY)),
            (Attr.FINGERPRINT, reparsed.get(Attr.FINGERPRINT)),
        ],
    )


# --- RFC 5769 §2.2 and §2.3 ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("vector", "address"),
    [
        (RFC5769_IPV4_RESPONSE, ("192.0.2.1", 32853)),
        (RFC5769_IPV6_RESPONSE, ("2001:db8:1234:5678:11:2233:4455:6677", 32853)),
    ],
    ids=["2.2-ipv4", "2.3-ipv6"],
)
def test_rfc5769_responses_decode_verify_and_reencode(
    vector: bytes, address: tuple[str, int]
) -> None:
    msg = decode_message(vector)
    assert msg.method == Method.BINDING
    assert msg.msg_class == MessageClass.SUCCESS
    assert msg.transaction_id == VECTOR_TID
    assert [t for t, _ in msg.attributes] == [
        Attr.SOFTWARE,
        Attr.XOR_MAPPED_ADDRESS,
        Attr.MESSAGE_INTEGRITY,
        Attr.FINGERPRINT,
    ]
    assert msg.get(Attr.SOFTWARE) == "test vector"
    assert msg.get(Attr.XOR_MAPPED_ADDRESS) == address
    assert verify_message_integrity(msg, SHORT_TERM_PASSWORD)
    assert not verify_message_integrity(msg, SHORT_TERM_PASSWORD[:-1])
    assert verify_fingerprint(msg)
    assert encode_message(msg) == vector

    _without(msg, Attr.MESSAGE_INTEGRITY, Attr.FINGERPRINT)
    assert encode_message(msg, key=SHORT_TERM_PASSWORD, fingerprint=True) == vector


@pytest.mark.parametrize(
    ("vector", "address", "xor_value"),
    [
        (RFC5769_IPV4_RESPONSE, ("192.0.2.1", 32853), "00 01 a1 47 e1 12 a6 43"),
        (
            RFC5769_IPV6_RESPONSE,
            ("2001:db8:1234:5678:11:2233:4455:6677", 32853),
            "00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9",
        ),
    ],
    ids=["ipv4", "ipv6"],
)
def test_rfc5769_xor_mapped_address_encodes_to_the_vector_value(
    vector: bytes, address: tuple[str, int], xor_value: str
) -> None:
    # The SOFTWARE padding is 0x20 in the vector, so compare only the address attribute.
    msg = Message(Method.BINDING, MessageClass.SUCCESS, VECTOR_TID)
    msg.add(Attr.XOR_MAPPED_ADDRESS, address)
    raw = encode_message(msg)
    assert raw[20:24] == bytes([0x00, 0x20, 0x00, len(unhex(xor_value))])
    assert raw[24:] == unhex(xor_value)
    assert unhex(xor_value) in vector


def test_rfc5769_ipv6_address_given_in_long_form_encodes_the_same() -> None:
    long_form = ("2001:0db8:1234:5678:0011:2233:4455:6677", 32853)
    short_form = ("2001:db8:1234:5678:11:2233:4455:6677", 32853)
    a = Message(Method.BINDING, MessageClass.SUCCESS, VECTOR_TID, [(Attr.XOR_MAPPED_ADDRESS, long_form)])
    b = Message(Method.BINDING, MessageClass.SUCCESS, VECTOR_TID, [(Attr.XOR_MAPPED_ADDRESS, short_form)])
    assert encode_message(a) == encode_message(b)
    assert decode_message(encode_message(a)).get(Attr.XOR_MAPPED_ADDRESS) == short_form


# --- RFC 5769 §2.4 ------------------------------------------------------------------------


def test_rfc5769_2_4_long_term_decodes_every_field() -> None:
    msg = decode_message(RFC5769_LONG_TERM)
    assert msg.method == Method.BINDING
    assert msg.msg_class == MessageClass.REQUEST
    assert msg.transaction_id == unhex("78 ad 34 33 c6 ad 72 c0 29 da 41 2e")
    assert msg.attributes[:3] == [
        (Attr.USERNAME, LONG_TERM_USERNAME),
        (Attr.NONCE, LONG_TERM_NONCE),
        (Attr.REALM, LONG_TERM_REALM),
    ]
    assert msg.attributes[3][0] == Attr.MESSAGE_INTEGRITY
    assert len(msg.attributes) == 4
    assert not verify_fingerprint(msg)  # this vector has none


def test_rfc5769_2_4_long_term_integrity_verifies_with_md5_key() -> None:
    msg = decode_message(RFC5769_LONG_TERM)
    assert LONG_TERM_KEY == hashlib.md5(
        "マトリックス:example.org:TheMatrIX".encode("utf-8")
    ).digest()
    assert verify_message_integrity(msg, LONG_TERM_KEY)
    wrong = hashlib.md5(f"{LONG_TERM_USERNAME}:{LONG_TERM_REALM}:thematrix".encode()).digest()
    assert not verify_message_integrity(msg, wrong)


def test_rfc5769_2_4_long_term_reencodes_and_builds_from_scratch() -> None:
    assert encode_message(decode_message(RFC5769_LONG_TERM)) == RFC5769_LONG_TERM
    # Its padding is all zeros, so a message built from scratch reproduces it exactly.
    msg = Message(
        Method.BINDING,
        MessageClass.REQUEST,
        unhex("78 ad 34 33 c6 ad 72 c0 29 da 41 2e"),
        [
            (Attr.USERNAME, LONG_TERM_USERNAME),
            (Attr.NONCE, LONG_TERM_NONCE),
            (Attr.REALM, LONG_TERM_REALM),
        ],
    )
    assert encode_message(msg, key=LONG_TERM_KEY) == RFC5769_LONG_TERM


# --- RFC 8489 Appendix B.1 ----------------------------------------------------------------


def test_rfc8489_b1_decodes_every_field() -> None:
    msg = decode_message(RFC8489_B1)
    assert msg.method == Method.BINDING
    assert msg.msg_class == MessageClass.REQUEST
    userhash = hashlib.sha256(f"{LONG_TERM_USERNAME}:{LONG_TERM_REALM}".encode()).digest()
    assert msg.attributes[:4] == [
        (Attr.USERHASH, userhash),  # RFC 8489 §14.4: SHA-256(username ":" realm)
        (Attr.NONCE, B1_NONCE),
        (Attr.REALM, LONG_TERM_REALM),
        (Attr.PASSWORD_ALGORITHM, (PASSWORD_ALGORITHM_SHA256, b"")),
    ]
    assert msg.attributes[4][0] == Attr.MESSAGE_INTEGRITY_SHA256
    assert len(msg.get(Attr.MESSAGE_INTEGRITY_SHA256)) == 32  # type: ignore[arg-type]


def test_rfc8489_b1_integrity_sha256_verifies() -> None:
    msg = decode_message(RFC8489_B1)
    assert verify_message_integrity_sha256(msg, B1_KEY)
    assert not verify_message_integrity_sha256(msg, LONG_TERM_KEY)
    assert not verify_message_integrity(msg, B1_KEY)  # no SHA-1 integrity in this one


def test_rfc8489_b1_reencodes_and_builds_from_scratch() -> None:
    assert encode_message(decode_message(RFC8489_B1)) == RFC8489_B1
    msg = decode_message(RFC8489_B1)
    _without(msg, Attr.MESSAGE_INTEGRITY_SHA256)
    fresh = Message(msg.method, msg.msg_class, msg.transaction_id, list(msg.attributes))
    assert encode_message(fresh, key=B1_KEY, integrity="sha256") == RFC8489_B1


# --- every vector, damaged ----------------------------------------------------------------


@pytest.mark.parametrize("vector", [RFC5769_LONG_TERM, RFC8489_B1], ids=["2.4", "B.1"])
def test_vectors_without_fingerprint_fail_integrity_when_a_bit_flips(vector: bytes) -> None:
    key = LONG_TERM_KEY if vector is RFC5769_LONG_TERM else B1_KEY
    flipped = bytearray(vector)
    flipped[-40] ^= 0x01  # inside REALM / PASSWORD-ALGORITHM, covered by the HMAC
    msg = decode_message(bytes(flipped))
    assert not verify_message_integrity(msg, key)
    assert not verify_message_integrity_sha256(msg, key)


@pytest.mark.parametrize(
    "vector", [RFC5769_REQUEST, RFC5769_IPV4_RESPONSE, RFC5769_IPV6_RESPONSE], ids=["2.1", "2.2", "2.3"]
)
def test_vectors_with_fingerprint_are_not_stun_when_a_bit_flips(vector: bytes) -> None:
    # RFC 8489 §7: a FINGERPRINT that does not match says the bytes are not STUN.
    for index in (25, len(vector) - 20, len(vector) - 1):  # SOFTWARE, MI value, FINGERPRINT
        flipped = bytearray(vector)
        flipped[index] ^= 0x01
        with pytest.raises(NotStunError):
            decode_message(bytes(flipped))
