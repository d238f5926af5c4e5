"""ChannelData messages (RFC 8656 §12.4): a 4-byte header instead of a STUN message.

    channel number (16 bits) | length of the application data (16 bits) | data ...

Over UDP the datagram may carry padding after ``length`` bytes; over TCP/TLS the sender
pads to a multiple of 4 (RFC 8656 §12.5).
"""

from __future__ import annotations

import struct

from .errors import StunDecodeError

# RFC 8656 §12: 0x4000-0x4FFF are the channel numbers; 0x5000-0xFFFF are reserved, so a
# first byte of 0x50 or above is neither STUN nor ChannelData.
CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF
CHANNEL_DATA_HEADER_SIZE = 4

_HEAD = struct.Struct("!HH")
_PAD = (b"", b"\x00", b"\x00\x00", b"\x00\x00\x00")


def is_channel_number(channel: int) -> bool:
    return CHANNEL_MIN <= channel <= CHANNEL_MAX


def encode_channel_data(channel: int, data: bytes, *, pad: bool = False) -> bytes:
    """Header plus data; ``pad`` (stream transports) pads to a multiple of 4 with zeros."""
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise ValueError(f"channel number 0x{channel:04x} outside 0x4000-0x4FFF")
    size = len(data)
    if size > 0xFFFF:
        raise ValueError("ChannelData payload longer than 65535 bytes")
    if pad and size & 3:
        return _HEAD.pack(channel, size) + data + _PAD[-size & 3]
    return _HEAD.pack(channel, size) + data


def decode_channel_data(buf: bytes | bytearray | memoryview) -> tuple[int, bytes]:
    """(channel, data). Bytes after ``length`` are padding and ignored (RFC 8656 §12.5)."""
    if len(buf) < CHANNEL_DATA_HEADER_SIZE:
        raise StunDecodeError("ChannelData shorter than its header")
    channel, size = _HEAD.unpack_from(buf, 0)
    if not CHANNEL_MIN <= channel <= CHANNEL_MAX:
        raise StunDecodeError(f"channel number 0x{channel:04x} outside 0x4000-0x4FFF")
    end = CHANNEL_DATA_HEADER_SIZE + size
    if end > len(buf):
        raise StunDecodeError("ChannelData length runs past the end of the buffer")
    return channel, bytes(buf[CHANNEL_DATA_HEADER_SIZE:end])
