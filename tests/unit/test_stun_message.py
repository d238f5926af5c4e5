"""Message header, integrity, fingerprint and the Message object (RFC 8489 §5, §6.3, §14)."""

from __future__ import annotations

import hashlib
import hmac
import struct
import zlib

import pytest

from turnserver.stun import (
    MAGIC_COOKIE,
    Attr,
    MalformedMessageError,
    Message,
    MessageClass,
    Method,
    NotStunError,
    StunDecodeError,
    decode_message,
    encode_message,
    is_stun,
    peek_header,
    verify_fingerprint,
    verify_message_integrity,
    verify_message_integrity_sha256,
)

TID = bytes.fromhex("00112233445566778899aabb")
KEY = b"shared key"


def tlv(attr_type: int, value: bytes) -> bytes:
    return struct.pack("!HH", attr_type, len(value)) + value + b"\x00" * (-len(value) & 3)


def raw_message(*attrs: bytes, msg_type: int = 0x0001, length: int | None = None) -> bytes:
    body = b"".join(attrs)
    size = len(body) if length is None else length
    return struct.pack("!HHI", msg_type, size, MAGIC_COOKIE) + TID + body


def with_length(data: bytes, length: int) -> bytes:
    return data[:2] + struct.pack("!H", length) + data[4:]


# --- message type: method and class bits (RFC 8489 §5) ------------------------------------


@pytest.mark.parametrize(
    ("method", "msg_class", "msg_type"),
    [
        (Method.BINDING, MessageClass.REQUEST, 0x0001),
        (Method.BINDING, MessageClass.SUCCESS, 0x0101),
        (Method.BINDING, MessageClass.ERROR, 0x0111),
        (Method.BINDING, MessageClass.INDICATION, 0x0011),
        (Method.ALLOCATE, MessageClass.REQUEST, 0x0003),
        (Method.ALLOCATE, MessageClass.SUCCESS, 0x0103),
        (Method.ALLOCATE, MessageClass.ERROR, 0x0113),
        (Method.REFRESH, MessageClass.REQUEST, 0x0004),
        (Method.SEND, MessageClass.INDICATION, 0x0016),
        (Method.DATA, MessageClass.INDICATION, 0x0017),
        (Method.CREATE_PERMISSION, MessageClass.REQUEST, 0x0008),
        (Method.CHANNEL_BIND, MessageClass.SUCCESS, 0x0109),
        (Method.CONNECT, MessageClass.REQUEST, 0x000A),
        (Method.CONNECTION_BIND, MessageClass.REQUEST, 0x000B),
        (Method.CONNECTION_ATTEMPT, MessageClass.INDICATION, 0x001C),
        (0xFFF, MessageClass.ERROR, 0x3FFF),
        (0x080, MessageClass.REQUEST, 0x0200),
        (0x010, MessageClass.REQUEST, 0x0020),
    ],
)
def test_method_and_class_bits(method: int, msg_class: int, msg_type: int) -> None:
    raw = encode_message(Message(method, msg_class, TID))
    assert raw == struct.pack("!HHI", msg_type, 0, MAGIC_COOKIE) + TID
    msg = decode_message(raw)
    assert (msg.method, msg.msg_class) == (method, msg_class)
    assert peek_header(raw) == (method, msg_class, TID)


def test_known_methods_and_classes_decode_to_enum_members() -> None:
    msg = decode_message(encode_message(Message(Method.ALLOCATE, MessageClass.ERROR, TID)))
    assert msg.method is Method.ALLOCATE
    assert msg.msg_class is MessageClass.ERROR
    unknown = decode_message(encode_message(Message(0x123, MessageClass.REQUEST, TID)))
    assert unknown.method == 0x123


# --- header checks: NotStunError (RFC 8489 §6.3) ------------------------------------------

GOOD = raw_message(tlv(Attr.SOFTWARE, b"abc"))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        GOOD[:19],
        b"\x80" + GOOD[1:],  # top bit set
        b"\x40" + GOOD[1:],  # second bit set (ChannelData territory)
        GOOD[:4] + b"\x21\x12\xa4\x43" + GOOD[8:],  # bad cookie
        with_length(GOOD, 6),  # not a multiple of 4
        with_length(GOOD, 4),  # shorter than the datagram
        with_length(GOOD, 12),  # longer than the datagram
        GOOD + b"\x00\x00\x00\x00",  # trailing bytes beyond the length
        GOOD[:-4],  # truncated datagram
    ],
    ids=[
        "empty",
        "19-bytes",
        "top-bit",
        "second-bit",
        "cookie",
        "length-odd",
        "length-short",
        "length-long",
        "trailing",
        "truncated",
    ],
)
def test_header_problems_are_not_stun(data: bytes) -> None:
    with pytest.raises(NotStunError):
        decode_message(data)
    assert peek_header(data) is None


def test_is_stun_is_the_cheap_check() -> None:
    assert is_stun(GOOD)
    assert is_stun(GOOD + b"extra")  # it does not look at the length
    assert not is_stun(GOOD[:19])
    assert not is_stun(b"\xc0" + GOOD[1:])
    assert not is_stun(GOOD[:5] + b"\x00" + GOOD[6:])
    assert not is_stun(b"\x40\x00\x00\x10" + bytes(16))


def test_decode_accepts_bytearray_and_memoryview() -> None:
    assert decode_message(bytearray(GOOD)) == decode_message(GOOD)
    assert decode_message(memoryview(GOOD)).raw == GOOD
    assert peek_header(bytearray(GOOD)) == (Method.BINDING, MessageClass.REQUEST, TID)


def test_empty_message_decodes() -> None:
    msg = decode_message(raw_message())
    assert msg.attributes == []
    assert msg.raw == raw_message()


# --- attribute framing: MalformedMessageError ----------------------------------------------


def test_attribute_overrunning_the_message_is_malformed() -> None:
    overrun = struct.pack("!HH", Attr.SOFTWARE, 9) + b"abcd"  # says 9, has 4
    data = raw_message(overrun, msg_type=0x0003)
    with pytest.raises(MalformedMessageError) as info:
        decode_message(data)
    assert info.value.method == Method.ALLOCATE
    assert info.value.msg_class == MessageClass.REQUEST
    assert info.value.transaction_id == TID
    assert peek_header(data) == (Method.ALLOCATE, MessageClass.REQUEST, TID)


def test_padding_overrunning_the_message_is_malformed() -> None:
    # Length 5 fits only without its 3 bytes of padding; the message length ends there.
    attr = struct.pack("!HH", 0x8050, 5) + b"abcde"
    data = struct.pack("!HHI", 1, 12, MAGIC_COOKIE) + TID + attr + b"\x00\x00\x00"
    assert decode_message(data).get(0x8050) == b"abcde"
    with pytest.raises(StunDecodeError):
        decode_message(data[:-3])  # not a multiple of 4 any more


def test_malformed_is_a_stun_decode_error_and_a_value_error() -> None:
    assert issubclass(MalformedMessageError, StunDecodeError)
    assert issubclass(NotStunError, StunDecodeError)
    assert issubclass(StunDecodeError, ValueError)


# --- FINGERPRINT (RFC 8489 §14.7) ---------------------------------------------------------


def test_fingerprint_value_is_crc32_xor_stun() -> None:
    raw = encode_message(Message(Method.BINDING, MessageClass.REQUEST, TID), fingerprint=True)
    assert len(raw) == 28
    assert raw[20:24] == b"\x80\x28\x00\x04"
    expected = zlib.crc32(raw[:20]) ^ 0x5354554E
    assert struct.unpack("!I", raw[24:])[0] == expected
    msg = decode_message(raw)
    assert msg.get(Attr.FINGERPRINT) == expected
    assert verify_fingerprint(msg)


def test_wrong_fingerprint_is_not_stun() -> None:
    raw = bytearray(encode_message(Message(Method.BINDING, MessageClass.REQUEST, TID), fingerprint=True))
    raw[-1] ^= 0x01
    with pytest.raises(NotStunError):
        decode_message(bytes(raw))


def test_anything_after_fingerprint_is_not_stun() -> None:
    raw = encode_message(Message(Method.BINDING, MessageClass.REQUEST, TID), fingerprint=True)
    extended = with_length(raw + tlv(Attr.SOFTWARE, b"late"), len(raw) - 20 + 8)
    with pytest.raises(NotStunError):
        decode_message(extended)


def test_fingerprint_of_wrong_size_is_not_stun() -> None:
    with pytest.raises(NotStunError):
        decode_message(raw_message(tlv(Attr.FINGERPRINT, b"\x00" * 8)))


def test_fingerprint_absent_or_local_does_not_verify() -> None:
    assert not verify_fingerprint(decode_message(GOOD))
    local = Message(Method.BINDING, MessageClass.REQUEST, TID, [(Attr.FINGERPRINT, 1)])
    assert not verify_fingerprint(local)


def test_fingerprint_lookalike_inside_data_is_not_a_fingerprint() -> None:
    # The last 8 bytes of a DATA value spell a correct-looking FINGERPRINT; it is not one.
    head = struct.pack("!HHI", 0x0016, 24, MAGIC_COOKIE) + TID + struct.pack("!HH", Attr.DATA, 20)
    filler = b"x" * 12
    crc = zlib.crc32(head + filler) ^ 0x5354554E
    data = head + filler + b"\x80\x28\x00\x04" + struct.pack("!I", crc)
    msg = decode_message(data)
    assert msg.attributes == [(Attr.DATA, data[24:])]
    assert not verify_fingerprint(msg)


# --- MESSAGE-INTEGRITY and -SHA256 (RFC 8489 §14.5, §14.6) --------------------------------


def _request() -> Message:
    return Message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        TID,
        [(Attr.USERNAME, "1700000000:alice"), (Attr.REQUESTED_TRANSPORT, 17)],
    )


def test_integrity_sha1_layout_and_value() -> None:
    raw = encode_message(_request(), key=KEY)
    at = len(raw) - 24
    assert raw[at : at + 4] == b"\x00\x08\x00\x14"
    covered = with_length(raw[:at], len(raw) - 20)
    assert raw[at + 4 :] == hmac.new(KEY, covered, hashlib.sha1).digest()
    msg = decode_message(raw)
    assert verify_message_integrity(msg, KEY)
    assert not verify_message_integrity(msg, b"other key")
    assert not verify_message_integrity_sha256(msg, KEY)


def test_integrity_sha256_layout_and_value() -> None:
    raw = encode_message(_request(), key=KEY, integrity="sha256")
    at = len(raw) - 36
    assert raw[at : at + 4] == b"\x00\x1c\x00\x20"
    covered = with_length(raw[:at], len(raw) - 20)
    assert raw[at + 4 :] == hmac.new(KEY, covered, hashlib.sha256).digest()
    msg = decode_message(raw)
    assert verify_message_integrity_sha256(msg, KEY)
    assert not verify_message_integrity_sha256(msg, b"other key")
    assert not verify_message_integrity(msg, KEY)


def test_integrity_both_puts_sha1_first_and_both_verify_with_fingerprint() -> None:
    raw = encode_message(_request(), key=KEY, integrity="both", fingerprint=True)
    msg = decode_message(raw)
    assert [t for t, _ in msg.attributes][-3:] == [
        Attr.MESSAGE_INTEGRITY,
        Attr.MESSAGE_INTEGRITY_SHA256,
        Attr.FINGERPRINT,
    ]
    assert verify_message_integrity(msg, KEY)
    assert verify_message_integrity_sha256(msg, KEY)
    assert verify_fingerprint(msg)
    # The SHA-256 HMAC covers the SHA-1 attribute; the SHA-1 one does not cover SHA-256.
    sha1_at = len(raw) - 8 - 36 - 24
    sha1_only = encode_message(_request(), key=KEY)
    assert raw[: sha1_at + 24] == with_length(sha1_only, len(raw) - 20)


def test_integrity_mode_must_be_known() -> None:
    with pytest.raises(ValueError):
        encode_message(_request(), key=KEY, integrity="md5")


def test_truncated_sha256_integrity_verifies() -> None:
    body = tlv(Attr.USERNAME, b"user")
    for size in (16, 20, 28):
        head = struct.pack("!HHI", 0x0001, len(body) + 4 + size, MAGIC_COOKIE) + TID
        mac = hmac.new(KEY, head + body, hashlib.sha256).digest()[:size]
        msg = decode_message(head + body + tlv(Attr.MESSAGE_INTEGRITY_SHA256, mac))
        assert verify_message_integrity_sha256(msg, KEY)
        assert not verify_message_integrity_sha256(msg, KEY + b"x")


def test_attributes_after_message_integrity_are_ignored() -> None:
    signed = encode_message(_request(), key=KEY)
    late = tlv(Attr.LIFETIME, b"\x00\x00\x00\x10") + tlv(Attr.MESSAGE_INTEGRITY, bytes(20))
    data = with_length(signed + late, len(signed) - 20 + len(late))
    msg = decode_message(data)
    assert Attr.LIFETIME not in msg
    assert msg.get_all(Attr.MESSAGE_INTEGRITY) == [signed[-20:]]
    assert verify_message_integrity(msg, KEY)


def test_malformed_attribute_after_integrity_is_ignored_not_rejected() -> None:
    signed = encode_message(_request(), key=KEY)
    late = tlv(Attr.LIFETIME, b"\x00")  # wrong size, but never interpreted
    msg = decode_message(with_length(signed + late, len(signed) - 20 + len(late)))
    assert verify_message_integrity(msg, KEY)
    assert Attr.LIFETIME not in msg


def test_after_integrity_sha256_only_fingerprint_counts() -> None:
    signed = encode_message(_request(), key=KEY, integrity="sha256")
    late = tlv(Attr.MESSAGE_INTEGRITY, bytes(20)) + tlv(Attr.SOFTWARE, b"late")
    body_len = len(signed) - 20 + len(late) + 8
    head_and_body = with_length(signed + late, body_len)
    crc = zlib.crc32(head_and_body) ^ 0x5354554E
    data = head_and_body + struct.pack("!HHI", Attr.FINGERPRINT, 4, crc)
    msg = decode_message(data)
    assert [t for t, _ in msg.attributes] == [
        Attr.USERNAME,
        Attr.REQUESTED_TRANSPORT,
        Attr.MESSAGE_INTEGRITY_SHA256,
        Attr.FINGERPRINT,
    ]
    assert verify_message_integrity_sha256(msg, KEY)
    assert not verify_message_integrity(msg, KEY)
    assert verify_fingerprint(msg)


def test_integrity_checks_the_received_bytes_not_a_reencoding() -> None:
    # Non-zero padding in the received USERNAME is covered by the sender's HMAC.
    body = struct.pack("!HH", Attr.USERNAME, 3) + b"bob" + b"\xee"
    head = struct.pack("!HHI", 0x0001, len(body) + 24, MAGIC_COOKIE) + TID
    mac = hmac.new(KEY, head + body, hashlib.sha1).digest()
    msg = decode_message(head + body + tlv(Attr.MESSAGE_INTEGRITY, mac))
    assert msg.get(Attr.USERNAME) == "bob"
    assert verify_message_integrity(msg, KEY)


def test_locally_built_message_has_nothing_to_verify() -> None:
    msg = _request()
    assert msg.raw is None
    assert not verify_message_integrity(msg, KEY)
    assert not verify_message_integrity_sha256(msg, KEY)


# --- encode_message refusals ----------------------------------------------------------------


def test_encode_refuses_bad_header_fields() -> None:
    with pytest.raises(ValueError):
        encode_message(Message(0x1000, MessageClass.REQUEST, TID))
    with pytest.raises(ValueError):
        encode_message(Message(Method.BINDING, 4, TID))
    msg = Message(Method.BINDING, MessageClass.REQUEST, TID)
    msg.transaction_id = b"short"
    with pytest.raises(ValueError):
        encode_message(msg)


def test_encode_refuses_a_message_longer_than_the_length_field() -> None:
    msg = Message(Method.SEND, MessageClass.INDICATION, TID, [(Attr.DATA, bytes(0xFFF0))])
    with pytest.raises(ValueError):
        encode_message(msg, key=KEY)
    assert len(encode_message(msg)) == 20 + 4 + 0xFFF0


# --- the Message object -----------------------------------------------------------------------


def test_message_defaults_and_validation() -> None:
    a = Message(Method.BINDING, MessageClass.REQUEST)
    b = Message(Method.BINDING, MessageClass.REQUEST)
    assert len(a.transaction_id) == 12
    assert a.transaction_id != b.transaction_id  # random: 2**-96 odds of a false failure
    assert a.attributes == [] and a.raw is None
    with pytest.raises(ValueError):
        Message(Method.BINDING, MessageClass.REQUEST, b"\x00" * 11)


def test_message_accessors() -> None:
    msg = Message(Method.ALLOCATE, MessageClass.REQUEST, TID)
    assert msg.add(Attr.SOFTWARE, "a").add(Attr.LIFETIME, 5).add(Attr.SOFTWARE, "b") is msg
    assert msg.get(Attr.SOFTWARE) == "a"
    assert msg.get_all(Attr.SOFTWARE) == ["a", "b"]
    assert msg.get(Attr.REALM) is None
    assert msg.get(Attr.REALM, "default") == "default"
    assert msg.get_all(Attr.REALM) == []
    assert Attr.LIFETIME in msg
    assert Attr.REALM not in msg
    msg.add(Attr.DONT_FRAGMENT)
    assert msg.attributes[-1] == (Attr.DONT_FRAGMENT, None)
    assert Attr.DONT_FRAGMENT in msg


def test_message_equality() -> None:
    a = Message(Method.ALLOCATE, MessageClass.REQUEST, TID, [(Attr.LIFETIME, 5)])
    assert a == Message(Method.ALLOCATE, MessageClass.REQUEST, TID, [(Attr.LIFETIME, 5)])
    assert a != Message(Method.ALLOCATE, MessageClass.REQUEST, TID, [(Attr.LIFETIME, 6)])
    assert a != Message(Method.REFRESH, MessageClass.REQUEST, TID, [(Attr.LIFETIME, 5)])
    assert a != Message(Method.ALLOCATE, MessageClass.SUCCESS, TID, [(Attr.LIFETIME, 5)])
    assert a != Message(Method.ALLOCATE, MessageClass.REQUEST, bytes(12), [(Attr.LIFETIME, 5)])
    assert a != "not a message"
    with pytest.raises(TypeError):
        hash(a)


def test_message_repr_names_things() -> None:
    msg = Message(Method.ALLOCATE, MessageClass.ERROR, TID, [(Attr.ERROR_CODE, (401, "Unauthorized")), (0x7123, b"x")])
    text = repr(msg)
    assert "ALLOCATE" in text and "ERROR" in text
    assert "ERROR_CODE=(401, 'Unauthorized')" in text
    assert "0x7123" in text
    assert TID.hex() in text


def test_unknown_comprehension_required_ignores_optional_and_known() -> None:
    msg = Message(
        Method.ALLOCATE,
        MessageClass.REQUEST,
        TID,
        [(0x7FFF, b""), (Attr.LIFETIME, 1), (0x8FFF, b""), (0x0003, b""), (0x7FFF, b"")],
    )
    assert msg.unknown_comprehension_required() == [0x7FFF, 0x0003]


# --- the package boundary -------------------------------------------------------------------


def test_codec_imports_nothing_of_ours_and_no_io() -> None:
    # The codec is sans-IO: no sockets, event loop or clock, and no other project package.
    import ast
    import pathlib

    import turnserver.stun as package

    forbidden = {"asyncio", "socket", "time", "selectors", "ssl", "uvloop", "turnserver"}
    root = pathlib.Path(package.__file__).parent
    files = sorted(root.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: inside turnserver.stun
                    assert node.level == 1, path
                    continue
                names = [node.module or ""]
            else:
                continue
            for name in names:
                assert name.split(".")[0] not in forbidden, f"{path.name} imports {name}"
