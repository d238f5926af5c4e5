"""ChannelData messages (RFC 8656 §12.4, §12.5)."""

from __future__ import annotations

import pytest

from turnserver.stun import StunDecodeError, decode_channel_data, encode_channel_data


def test_encode_layout_without_padding() -> None:
    assert encode_channel_data(0x4001, b"hello") == b"\x40\x01\x00\x05hello"
    assert encode_channel_data(0x4FFF, b"") == b"\x4f\xff\x00\x00"


def test_encode_pads_to_four_for_streams() -> None:
    assert encode_channel_data(0x4000, b"hello", pad=True) == b"\x40\x00\x00\x05hello\x00\x00\x00"
    assert encode_channel_data(0x4000, b"1234", pad=True) == b"\x40\x00\x00\x041234"
    assert encode_channel_data(0x4000, b"", pad=True) == b"\x40\x00\x00\x00"


@pytest.mark.parametrize("size", [0, 1, 2, 3, 4, 5, 1500, 65535])
def test_round_trip(size: int) -> None:
    payload = bytes(i & 0xFF for i in range(size))
    for pad in (False, True):
        raw = encode_channel_data(0x4123, payload, pad=pad)
        expected_size = (4 + size + 3) // 4 * 4 if pad else 4 + size
        assert len(raw) == expected_size
        assert decode_channel_data(raw) == (0x4123, payload)


def test_decode_ignores_trailing_udp_padding() -> None:
    assert decode_channel_data(b"\x40\x02\x00\x02ab\xff\xff") == (0x4002, b"ab")
    assert decode_channel_data(bytearray(b"\x40\x02\x00\x01a")) == (0x4002, b"a")
    assert decode_channel_data(memoryview(b"\x40\x02\x00\x01a")) == (0x4002, b"a")


@pytest.mark.parametrize(
    "buf",
    [
        b"",
        b"\x40\x00\x00",  # shorter than the header
        b"\x40\x00\x00\x05abcd",  # length runs past the buffer
        b"\x3f\xff\x00\x00",  # below 0x4000: STUN territory
        b"\x50\x00\x00\x00",  # 0x5000-0xFFFF reserved since RFC 8656
        b"\x7f\xff\x00\x00",  # RFC 5766 allowed this one; RFC 8656 does not
        b"\xff\xff\x00\x00",
    ],
)
def test_decode_rejects(buf: bytes) -> None:
    with pytest.raises(StunDecodeError):
        decode_channel_data(buf)


@pytest.mark.parametrize("channel", [0x0000, 0x3FFF, 0x5000, 0x7FFF, 0xFFFF, -1])
def test_encode_rejects_channels_outside_the_range(channel: int) -> None:
    with pytest.raises(ValueError):
        encode_channel_data(channel, b"x")


def test_encode_rejects_oversized_payload() -> None:
    with pytest.raises(ValueError):
        encode_channel_data(0x4000, bytes(65536))


def test_max_channel_widens_the_range_for_rfc5766_clients() -> None:
    frame = encode_channel_data(0x7FFE, b"abcde", pad=True, max_channel=0x7FFF)
    assert frame == b"\x7f\xfe\x00\x05abcde\x00\x00\x00"
    assert decode_channel_data(frame, max_channel=0x7FFF) == (0x7FFE, b"abcde")
    # Still bounded: 0x8000 and above are RTP/RTCP (RFC 7983), never a channel.
    with pytest.raises(ValueError):
        encode_channel_data(0x8000, b"x", max_channel=0x7FFF)
    with pytest.raises(StunDecodeError):
        decode_channel_data(b"\x80\x00\x00\x00", max_channel=0x7FFF)
    # Without it the RFC 8656 range holds.
    with pytest.raises(StunDecodeError):
        decode_channel_data(frame)
