"""ChannelData messages (RFC 8656 §12.4): a 4-byte header instead of a STUN message.

    channel number (16 bits) | length of the application data (16 bits) | data ...

Over UDP the datagram may carry padding after ``length`` bytes; over TCP/TLS the sender
pads to a multiple of 4 (RFC 8656 §12.5).
"""

from __future__ import annotations

import struct

from .constants import ZERO_PAD
from .errors import StunDecodeError

# RFC 8656 §12: 0x4000-0x4FFF are the channel numbers; 0x5000-0xFFFF are reserved, so a
# first byte of 0x50 or above is neither STUN nor ChannelData. RFC 5766 §11 allowed up to
# 0x7FFF; ``max_channel`` below lets a server that still serves such clients say so.
CHANNEL_MIN = 0x4000
CHANNEL_MAX = 0x4FFF
CHANNEL_DATA_HEADER_SIZE = 4

_HEAD = struct.Struct("!HH")


def is_channel_number(channel: int) -> bool:
    return CHANNEL_MIN <= channel <= CHANNEL_MAX


def encode_channel_data(channel: int, data: bytes, *, pad: bool = False,
                        max_channel: int = CHANNEL_MAX) -> bytes:
    """Header plus data; ``pad`` (stream transports) pads to a multiple of 4 with zeros.

    ``channel`` must lie in 0x4000-``max_channel``; ``ValueError`` otherwise, or when ``data``
    is longer than the 16-bit length field can say.
    """
    if not CHANNEL_MIN <= channel <= max_channel:
        raise ValueError(f"channel number 0x{channel:04x} outside 0x4000-0x{max_channel:04x}")
    size = len(data)
    if size > 0xFFFF:
        raise ValueError("ChannelData payload longer than 65535 bytes")
    if pad and size & 3:
        return _HEAD.pack(channel, size) + data + ZERO_PAD[-size & 3]
    return _HEAD.pack(channel, size) + data


def decode_channel_data(buf: bytes | bytearray | memoryview, *,
                        max_channel: int = CHANNEL_MAX) -> tuple[int, bytes]:
    """(channel, data). Bytes after ``length`` are padding and ignored (RFC 8656 §12.5).

    A channel number outside 0x4000-``max_channel`` raises :class:`StunDecodeError`.
    """
    if len(buf) < CHANNEL_DATA_HEADER_SIZE:
        raise StunDecodeError("ChannelData shorter than its header")
    channel, size = _HEAD.unpack_from(buf, 0)
    if not CHANNEL_MIN <= channel <= max_channel:
        raise StunDecodeError(f"channel number 0x{channel:04x} outside 0x4000-0x{max_channel:04x}")
    end = CHANNEL_DATA_HEADER_SIZE + size
    if end > len(buf):
        raise StunDecodeError("ChannelData length runs past the end of the buffer")
    return channel, bytes(buf[CHANNEL_DATA_HEADER_SIZE:end])
