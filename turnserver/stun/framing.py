"""Cutting a TCP/TLS byte stream into STUN messages and ChannelData frames (RFC 8656 §12.5).

The first byte of each frame says what it is (RFC 7983 §7, narrowed by RFC 8656 §12):
0x00-0x3F a STUN message (20 + length bytes), 0x40-0x4F ChannelData (4 + length bytes, then
padding to a multiple of 4). Anything else means the stream is lost: there is no way to find
the next frame boundary, so the caller closes the connection.
"""

from __future__ import annotations

import struct

from .constants import HEADER_SIZE, MAGIC_COOKIE
from .errors import FramingError

DEFAULT_MAX_MESSAGE_SIZE = 65535 + 4 + 20

_LENGTH = struct.Struct("!H")
_COOKIE = struct.Struct("!I")


class StreamFramer:
    """Feed it whatever ``recv`` returned; get back the whole frames, in order.

    STUN frames come back exactly as sent (20 + length bytes). ChannelData frames come back
    as the 4-byte header plus the data, without the stream padding, which is consumed.
    A frame is returned as soon as its last data byte arrives; padding still owed is skipped
    when it comes.

    Bad bytes raise :class:`FramingError`. When good frames came before the bad bytes in the
    same ``feed``, those frames are returned first and the error is raised by the next call
    (``pending_error`` shows it at once, so the caller can close without waiting for data).
    At most one frame, never bigger than ``max_message_size``, is ever held.
    """

    __slots__ = ("_buf", "_skip", "_max", "_error", "_channel_end")

    def __init__(self, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE, *,
                 max_channel: int = 0x4FFF) -> None:
        if max_message_size < HEADER_SIZE:
            raise ValueError("max_message_size must hold at least a STUN header")
        # First bytes below this are ChannelData: 0x50 for RFC 8656, 0x80 when the server also
        # takes RFC 5766's 0x4000-0x7FFF channels (legacy_channel_numbers).
        self._channel_end = (max_channel >> 8) + 1
        self._buf = bytearray()
        self._skip = 0  # ChannelData padding still to come and to drop
        self._max = max_message_size
        self._error: FramingError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a frame."""
        return len(self._buf)

    def take_rest(self) -> bytes:
        """The bytes buffered after the last whole frame, handed over raw (an RFC 6062 data
        connection stops being framed); the framer is empty afterwards."""
        rest = bytes(self._buf)
        self._buf.clear()
        self._skip = 0
        self._error = None
        return rest

    @property
    def pending_error(self) -> FramingError | None:
        """The error the next :meth:`feed` will raise, if the stream already went bad."""
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes]:
        if self._error is not None:
            raise self._error
        buf = self._buf
        view = memoryview(data)
        if self._skip:
            dropped = min(self._skip, len(view))
            self._skip -= dropped
            view = view[dropped:]
        buf += view
        frames: list[bytes] = []
        pos = 0
        n = len(buf)
        limit = self._max
        try:
            while n - pos >= 4:
                first = buf[pos]
                length = _LENGTH.unpack_from(buf, pos + 2)[0]
                if first < 0x40:
                    # RFC 8489 §6.3: a STUN length is a multiple of 4; check the cookie as soon
                    # as it is here, rather than wait for up to 64 KiB of garbage.
                    if length & 3:
                        raise FramingError("STUN length not a multiple of 4")
                    size = HEADER_SIZE + length
                    if size > limit:
                        raise FramingError("STUN message larger than the limit")
                    if n - pos >= 8 and _COOKIE.unpack_from(buf, pos + 4)[0] != MAGIC_COOKIE:
                        raise FramingError("bad magic cookie in stream")
                    if n - pos < size:
                        break
                    frames.append(bytes(buf[pos : pos + size]))
                    pos += size
                elif first < self._channel_end:
                    size = 4 + length
                    padded = (size + 3) & ~3
                    if padded > limit:
                        raise FramingError("ChannelData larger than the limit")
                    if n - pos < size:
                        break
                    frames.append(bytes(buf[pos : pos + size]))
                    if n - pos >= padded:
                        pos += padded
                    else:
                        self._skip = padded - (n - pos)
                        pos = n
                else:
                    raise FramingError(f"byte 0x{first:02x} starts neither STUN nor ChannelData")
        except FramingError as exc:
            # The stream is dead: drop what is held so a buggy caller cannot grow it.
            buf.clear()
            self._error = exc
            if not frames:
                raise
            return frames
        if pos:
            del buf[:pos]
        return frames
