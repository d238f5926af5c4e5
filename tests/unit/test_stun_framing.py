"""Stream framing for TCP/TLS (RFC 8656 §12.5): any split, any coalescing, bad bytes."""

from __future__ import annotations

import struct

import pytest

from tests.unit.test_stun_vectors import ALL_VECTORS, RFC8489_B1
from turnserver.stun import (
    MAGIC_COOKIE,
    FramingError,
    StreamFramer,
    StunDecodeError,
    decode_channel_data,
    decode_message,
    encode_channel_data,
)

VECTORS = ALL_VECTORS + [RFC8489_B1]
VECTOR_IDS = ["2.1", "2.2", "2.3", "2.4", "B.1"]


def feed_all(framer: StreamFramer, chunks: list[bytes]) -> list[bytes]:
    frames: list[bytes] = []
    for chunk in chunks:
        frames.extend(framer.feed(chunk))
    return frames


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_vector_whole(vector: bytes) -> None:
    framer = StreamFramer()
    assert framer.feed(vector) == [vector]
    assert framer.buffered == 0


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_vector_one_byte_at_a_time(vector: bytes) -> None:
    framer = StreamFramer()
    frames = []
    for i, piece in enumerate(bytewise(vector)):
        got = framer.feed(piece)
        if i < len(vector) - 1:
            assert got == []
            assert framer.buffered == i + 1
        frames.extend(got)
    assert frames == [vector]
    assert framer.buffered == 0
    decode_message(frames[0])


@pytest.mark.parametrize("vector", VECTORS, ids=VECTOR_IDS)
def test_vector_coalesced_with_the_next(vector: bytes) -> None:
    framer = StreamFramer()
    following = ALL_VECTORS[1]
    assert framer.feed(vector + following[:7]) == [vector]
    assert framer.buffered == 7
    assert framer.feed(following[7:] + vector) == [following, vector]
    assert framer.buffered == 0


def test_every_vector_back_to_back_split_at_every_point() -> None:
    stream = b"".join(VECTORS)
    for cut in range(len(stream) + 1):
        framer = StreamFramer()
        assert feed_all(framer, [stream[:cut], stream[cut:]]) == VECTORS
        assert framer.buffered == 0


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 7, 8, 100])
def test_channel_data_padded_split_everywhere(size: int) -> None:
    payload = bytes(range(size))
    padded = encode_channel_data(0x4001, payload, pad=True)
    unpadded = padded[: 4 + size]
    after = ALL_VECTORS[0]
    stream = padded + after + padded
    for cut in range(len(stream) + 1):
        framer = StreamFramer()
        frames = feed_all(framer, [stream[:cut], stream[cut:]])
        # The frame is the header plus data; the stream padding is consumed, not returned.
        assert frames == [unpadded, after, unpadded], cut
        assert decode_channel_data(frames[0]) == (0x4001, payload)
        assert framer.buffered == 0
    framer = StreamFramer()
    assert feed_all(framer, bytewise(stream)) == [unpadded, after, unpadded]


def test_channel_data_returned_before_its_padding_arrives() -> None:
    framer = StreamFramer()
    padded = encode_channel_data(0x4002, b"abcde", pad=True)
    assert framer.feed(padded[:9]) == [padded[:9]]
    assert framer.buffered == 0
    assert framer.feed(padded[9:10]) == []  # padding, dropped
    assert framer.feed(padded[10:] + ALL_VECTORS[1]) == [ALL_VECTORS[1]]


def test_channel_data_without_padding_when_aligned() -> None:
    frame = encode_channel_data(0x4FFF, b"1234")
    framer = StreamFramer()
    assert framer.feed(frame + frame) == [frame, frame]


def test_garbage_after_a_valid_message_yields_it_then_fails() -> None:
    framer = StreamFramer()
    frames = framer.feed(ALL_VECTORS[0] + b"\xffgarbage")
    assert frames == [ALL_VECTORS[0]]
    assert isinstance(framer.pending_error, FramingError)
    assert framer.buffered == 0
    with pytest.raises(FramingError):
        framer.feed(b"")
    with pytest.raises(FramingError):
        framer.feed(ALL_VECTORS[1])  # once lost, the stream stays lost


def test_garbage_in_its_own_read_fails_at_once() -> None:
    framer = StreamFramer()
    assert framer.feed(ALL_VECTORS[0]) == [ALL_VECTORS[0]]
    assert framer.pending_error is None
    with pytest.raises(FramingError):
        framer.feed(b"SSH-2.0-OpenSSH_9.6\r\n")  # 'S' is 0x53: neither STUN nor ChannelData


def test_tls_record_in_the_stun_range_fails_on_its_cookie() -> None:
    # A TLS handshake record starts 0x16 0x03: STUN range, length 0x0301 is not a multiple
    # of 4 here, and even a lucky length would fail the cookie check at byte 8.
    with pytest.raises(FramingError):
        StreamFramer().feed(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")
    with pytest.raises(FramingError):
        StreamFramer().feed(b"\x16\x03\x01\x00\x00\x01\x00\x01")


@pytest.mark.parametrize("first", [0x50, 0x7F, 0x80, 0xC0, 0xFF])
def test_first_byte_outside_stun_and_channel_data(first: int) -> None:
    with pytest.raises(FramingError):
        StreamFramer().feed(bytes([first, 0, 0, 0]))


def test_stun_length_not_multiple_of_four_fails() -> None:
    with pytest.raises(FramingError):
        StreamFramer().feed(b"\x00\x01\x00\x05")


def test_bad_cookie_fails_before_the_body_arrives() -> None:
    framer = StreamFramer()
    assert framer.feed(b"\x00\x01\x01\x00") == []  # 256-byte body announced
    with pytest.raises(FramingError):
        framer.feed(b"\x21\x12\xa4\x43")


def test_frames_larger_than_the_limit_fail_without_buffering() -> None:
    framer = StreamFramer(max_message_size=100)
    with pytest.raises(FramingError):
        framer.feed(struct.pack("!HHI", 0x0001, 84, MAGIC_COOKIE))  # 104 > 100
    framer = StreamFramer(max_message_size=100)
    with pytest.raises(FramingError):
        framer.feed(b"\x40\x00\x00\x61")  # 4 + 97 = 101 > 100
    framer = StreamFramer(max_message_size=100)
    assert framer.feed(b"\x40\x00\x00\x60" + bytes(96)) == [b"\x40\x00\x00\x60" + bytes(96)]


def test_default_limit_admits_the_largest_frames() -> None:
    biggest_cd = encode_channel_data(0x4000, bytes(65535), pad=True)
    biggest_stun = struct.pack("!HHI", 0x0016, 65532, MAGIC_COOKIE) + bytes(12) + bytes(65532)
    framer = StreamFramer()
    assert framer.feed(biggest_cd + biggest_stun) == [biggest_cd[:-1], biggest_stun]


def test_buffer_holds_at_most_one_frame() -> None:
    framer = StreamFramer()
    frame = encode_channel_data(0x4000, bytes(1000), pad=True)
    for _ in range(50):
        framer.feed(frame[:700])
        assert framer.buffered == 700
        framer.feed(frame[700:])
        assert framer.buffered == 0


def test_framing_error_is_a_decode_error() -> None:
    assert issubclass(FramingError, StunDecodeError)
    with pytest.raises(ValueError):
        StreamFramer(max_message_size=4)


def test_accepts_memoryview_and_bytearray_reads() -> None:
    framer = StreamFramer()
    data = ALL_VECTORS[1] + ALL_VECTORS[2]
    assert framer.feed(memoryview(data)[:50]) == []
    assert framer.feed(bytearray(data[50:])) == [ALL_VECTORS[1], ALL_VECTORS[2]]


def test_legacy_channel_range_when_asked() -> None:
    frame = b"\x7f\xfe\x00\x02ab\x00\x00"
    assert StreamFramer(max_channel=0x7FFF).feed(frame) == [b"\x7f\xfe\x00\x02ab"]
    with pytest.raises(FramingError):
        StreamFramer().feed(frame)
