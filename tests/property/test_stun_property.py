"""Property tests for the wire codec: round trips, hostile bytes, arbitrary stream chunking."""

from __future__ import annotations

import ipaddress
import struct

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_stun_vectors import ALL_VECTORS, RFC8489_B1
from turnserver.stun import (
    MAGIC_COOKIE,
    Attr,
    FramingError,
    Message,
    StreamFramer,
    StunDecodeError,
    decode_channel_data,
    decode_message,
    encode_channel_data,
    encode_message,
    peek_header,
    verify_fingerprint,
    verify_message_integrity,
    verify_message_integrity_sha256,
)

KNOWN = {int(a) for a in Attr}
INTEGRITY_TYPES = {Attr.MESSAGE_INTEGRITY, Attr.MESSAGE_INTEGRITY_SHA256, Attr.FINGERPRINT}

ipv4 = st.integers(0, 2**32 - 1).map(lambda i: str(ipaddress.IPv4Address(i)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda i: str(ipaddress.IPv6Address(i)))
address = st.tuples(st.one_of(ipv4, ipv6), st.integers(0, 0xFFFF))
u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
error_code = st.integers(300, 699)
reason = st.text(max_size=60)
algorithm = st.tuples(u16, st.binary(max_size=12))


def sized(n: int) -> st.SearchStrategy[bytes]:
    return st.binary(min_size=n, max_size=n)


def text(max_bytes: int) -> st.SearchStrategy[str]:
    # Up to 4 UTF-8 bytes a character keeps every string within the attribute's limit.
    return st.text(max_size=max_bytes // 4)


VALUES: dict[int, st.SearchStrategy[object]] = {
    Attr.MAPPED_ADDRESS: address,
    Attr.XOR_MAPPED_ADDRESS: address,
    Attr.XOR_PEER_ADDRESS: address,
    Attr.XOR_RELAYED_ADDRESS: address,
    Attr.ALTERNATE_SERVER: address,
    Attr.RESPONSE_ORIGIN: address,
    Attr.OTHER_ADDRESS: address,
    Attr.USERNAME: text(512),
    Attr.REALM: text(762),
    Attr.NONCE: text(762),
    Attr.SOFTWARE: text(762),
    Attr.ALTERNATE_DOMAIN: text(400),
    Attr.USERHASH: sized(32),
    Attr.RESERVATION_TOKEN: sized(8),
    Attr.DATA: st.binary(max_size=300),
    Attr.CONNECTION_ID: u32,
    Attr.LIFETIME: u32,
    Attr.PRIORITY: u32,
    Attr.CHANNEL_NUMBER: u16,
    Attr.REQUESTED_TRANSPORT: u8,
    Attr.REQUESTED_ADDRESS_FAMILY: u8,
    Attr.ADDITIONAL_ADDRESS_FAMILY: u8,
    Attr.ICE_CONTROLLED: u64,
    Attr.ICE_CONTROLLING: u64,
    Attr.EVEN_PORT: st.booleans(),
    Attr.DONT_FRAGMENT: st.none(),
    Attr.USE_CANDIDATE: st.none(),
    Attr.ERROR_CODE: st.tuples(error_code, reason),
    Attr.ADDRESS_ERROR_CODE: st.tuples(u8, error_code, reason),
    Attr.UNKNOWN_ATTRIBUTES: st.lists(u16, max_size=6),
    Attr.PASSWORD_ALGORITHM: algorithm,
    Attr.PASSWORD_ALGORITHMS: st.lists(algorithm, max_size=4),
    Attr.ICMP: st.tuples(u8, u8, u32),
}
assert set(VALUES) | INTEGRITY_TYPES == KNOWN  # every known type has a generator

unknown_attribute = st.tuples(
    u16.filter(lambda t: t not in KNOWN), st.binary(max_size=40)
)
known_attribute = st.one_of(
    [st.tuples(st.just(int(t)), strategy) for t, strategy in VALUES.items()]
)
attribute = st.one_of(known_attribute, unknown_attribute)

messages = st.builds(
    Message,
    st.integers(0, 0xFFF),
    st.integers(0, 3),
    sized(12),
    st.lists(attribute, max_size=12),
)


@settings(deadline=None)
@given(messages)
def test_decode_of_encode_is_identity(msg: Message) -> None:
    raw = encode_message(msg)
    decoded = decode_message(raw)
    assert decoded == msg
    assert decoded.raw == raw
    assert encode_message(decoded) == raw
    assert peek_header(raw) == (msg.method, msg.msg_class, msg.transaction_id)


@settings(deadline=None)
@given(
    messages,
    st.binary(min_size=1, max_size=64),
    st.sampled_from(["sha1", "sha256", "both"]),
    st.booleans(),
)
def test_integrity_and_fingerprint_round_trip(
    msg: Message, key: bytes, integrity: str, fingerprint: bool
) -> None:
    raw = encode_message(msg, key=key, integrity=integrity, fingerprint=fingerprint)
    decoded = decode_message(raw)
    added = {"sha1": 1, "sha256": 1, "both": 2}[integrity] + fingerprint
    assert decoded.attributes[: len(decoded.attributes) - added] == msg.attributes
    assert verify_message_integrity(decoded, key) == (integrity != "sha256")
    assert verify_message_integrity_sha256(decoded, key) == (integrity != "sha1")
    assert verify_fingerprint(decoded) == fingerprint
    assert not verify_message_integrity(decoded, key + b"!")
    assert not verify_message_integrity_sha256(decoded, key + b"!")


def _decode_quietly(data: bytes) -> None:
    """Decoding may fail, but only with the codec's own errors; checks on a result never raise."""
    try:
        msg = decode_message(data)
    except StunDecodeError:
        return
    verify_message_integrity(msg, b"k")
    verify_message_integrity_sha256(msg, b"k")
    verify_fingerprint(msg)
    msg.unknown_comprehension_required()
    repr(msg)


@given(st.binary(max_size=200))
def test_random_bytes_raise_only_decode_errors(data: bytes) -> None:
    _decode_quietly(data)
    try:
        decode_channel_data(data)
    except StunDecodeError:
        pass


@given(st.integers(0, 0x3FFF), st.binary(max_size=120).map(lambda b: b[: len(b) // 4 * 4]))
def test_sound_header_with_random_attributes_raises_only_decode_errors(
    msg_type: int, body: bytes
) -> None:
    data = struct.pack("!HHI", msg_type, len(body), MAGIC_COOKIE) + bytes(12) + body
    _decode_quietly(data)


@given(st.lists(st.tuples(u16, st.binary(max_size=40)), max_size=10), st.integers(0, 0x3FFF))
def test_random_well_framed_attributes_raise_only_decode_errors(
    attrs: list[tuple[int, bytes]], msg_type: int
) -> None:
    # Every attribute type, known or not, with a value of arbitrary bytes but sound TLV framing:
    # this is what reaches the per-attribute decoders.
    body = b"".join(
        struct.pack("!HH", t, len(v)) + v + b"\x00" * (-len(v) & 3) for t, v in attrs
    )
    data = struct.pack("!HHI", msg_type, len(body), MAGIC_COOKIE) + bytes(12) + body
    _decode_quietly(data)


@given(st.sampled_from(sorted(KNOWN)), st.binary(max_size=40))
def test_every_known_attribute_with_arbitrary_value_raises_only_decode_errors(
    attr_type: int, value: bytes
) -> None:
    body = struct.pack("!HH", attr_type, len(value)) + value + b"\x00" * (-len(value) & 3)
    data = struct.pack("!HHI", 0x0001, len(body), MAGIC_COOKIE) + bytes(12) + body
    _decode_quietly(data)


SEEDS = ALL_VECTORS + [RFC8489_B1]


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(
    st.one_of(st.sampled_from(SEEDS), messages.map(lambda m: encode_message(m, key=b"k", fingerprint=True))),
    st.data(),
)
def test_truncations_and_mutations_raise_only_decode_errors(seed: bytes, data: st.DataObject) -> None:
    cut = data.draw(st.integers(0, len(seed)))
    _decode_quietly(seed[:cut])
    mutated = bytearray(seed)
    for _ in range(data.draw(st.integers(1, 4))):
        index = data.draw(st.integers(0, len(mutated) - 1))
        mutated[index] = data.draw(u8)
    _decode_quietly(bytes(mutated))
    # Lengths rewritten to lie about the size are the classic overrun.
    index = data.draw(st.integers(20, max(20, len(seed) - 2)))
    if index + 2 <= len(seed):
        lying = bytearray(seed)
        lying[index : index + 2] = struct.pack("!H", data.draw(u16))
        _decode_quietly(bytes(lying))


frames = st.one_of(
    messages.map(encode_message),
    st.sampled_from(SEEDS),
    st.tuples(st.integers(0x4000, 0x4FFF), st.binary(max_size=70)).map(
        lambda cd: encode_channel_data(cd[0], cd[1], pad=True)
    ),
)


def _unpadded(frame: bytes) -> bytes:
    if 0x40 <= frame[0] <= 0x4F:
        return frame[: 4 + struct.unpack_from("!H", frame, 2)[0]]
    return frame


@settings(deadline=None)
@given(st.lists(frames, min_size=1, max_size=8), st.data())
def test_framer_yields_the_same_frames_for_any_chunking(
    sent: list[bytes], data: st.DataObject
) -> None:
    stream = b"".join(sent)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]
    framer = StreamFramer()
    received: list[bytes] = []
    for chunk in chunks:
        received.extend(framer.feed(chunk))
        assert framer.buffered <= 65535 + 4 + 20
    assert received == [_unpadded(f) for f in sent]
    assert framer.buffered == 0


@given(st.lists(st.binary(max_size=60), max_size=10))
def test_framer_on_random_bytes_raises_only_framing_errors(chunks: list[bytes]) -> None:
    framer = StreamFramer(max_message_size=1024)
    for chunk in chunks:
        try:
            framer.feed(chunk)
        except FramingError:
            break
        assert framer.buffered <= 1024
