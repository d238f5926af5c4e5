"""STUN messages: the header, the attribute list, integrity and fingerprint (RFC 8489 §5, §14).

``decode_message`` turns one whole message (a UDP datagram, or one frame cut by
:class:`~turnserver.stun.framing.StreamFramer`) into a :class:`Message`; ``encode_message``
does the reverse and appends MESSAGE-INTEGRITY, MESSAGE-INTEGRITY-SHA256 and FINGERPRINT.
Integrity is verified over the exact bytes received (``Message.raw``), never over a
re-encoding, so padding and reserved bits chosen by the sender cannot break the check.
"""

from __future__ import annotations

import hmac
import os
import struct
import zlib
from collections.abc import Iterable

from .attributes import (
    DECODERS,
    ENCODERS,
    RESERVED_CHECKS,
    InvalidAttribute,
    encode_bytes,
)
from .constants import (
    FINGERPRINT_XOR,
    HEADER_SIZE,
    MAGIC_COOKIE,
    MAGIC_COOKIE_BYTES,
    TRANSACTION_ID_SIZE,
    ZERO_PAD,
    Attr,
    MessageClass,
    Method,
)
from .errors import MalformedMessageError, NotStunError, StunDecodeError

_HEADER = struct.Struct("!HHI")  # type, length, cookie (transaction ID follows)
_HEADER_OUT = struct.Struct("!HHI12s")
_ATTR_HEAD = struct.Struct("!HH")
_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")

_MI = int(Attr.MESSAGE_INTEGRITY)
_MI256 = int(Attr.MESSAGE_INTEGRITY_SHA256)
_FINGERPRINT = int(Attr.FINGERPRINT)
_MI_HEAD = _ATTR_HEAD.pack(_MI, 20)
_FINGERPRINT_HEAD = _ATTR_HEAD.pack(_FINGERPRINT, 4)

# Decoded values use the enum members when known, so that reprs and logs read well, at the
# cost of one dict lookup instead of a slow enum constructor call per message.
_METHODS: dict[int, int] = {int(m): m for m in Method}
_CLASSES: tuple[MessageClass, ...] = tuple(MessageClass)
_ATTR_NAMES: dict[int, str] = {int(a): a.name for a in Attr}
_KNOWN_TYPES: frozenset[int] = frozenset(int(a) for a in Attr)

# Attribute values after these are not covered by the integrity check (RFC 8489 §14.5, §14.6).
_STATE_OPEN, _STATE_AFTER_MI, _STATE_AFTER_MI256 = 0, 1, 2

_INTEGRITY_MODES = ("sha1", "sha256", "both")

# Attributes decoded per message at most. A real STUN or TURN message carries a few dozen (a
# CreatePermission with max_permissions_per_allocation peers, 128 by default, is the largest);
# a 64 KiB message of 4-byte attributes would carry 16,383 and cost a thousand times more to
# decode than any client's. Beyond the limit the message is malformed (400 for a request).
MAX_ATTRIBUTES = 512


def _message_type(method: int, msg_class: int) -> int:
    # RFC 8489 §5: M11..M7 C1 M6..M4 C0 M3..M0 in the 14 low bits of the first two bytes.
    return (
        (method & 0x000F)
        | ((method & 0x0070) << 1)
        | ((method & 0x0F80) << 2)
        | ((msg_class & 1) << 4)
        | ((msg_class & 2) << 7)
    )


def _split_type(msg_type: int) -> tuple[int, int]:
    method = (msg_type & 0x000F) | ((msg_type & 0x00E0) >> 1) | ((msg_type & 0x3E00) >> 2)
    msg_class = ((msg_type >> 4) & 1) | ((msg_type >> 7) & 2)
    return method, msg_class


class Message:
    """One STUN message: header fields and the attributes in wire order.

    ``attributes`` holds ``(type, value)`` pairs with the value types documented in
    ``turnserver.stun``. It is a plain list: append to it, or use :meth:`add`.
    """

    __slots__ = (
        "method",
        "msg_class",
        "transaction_id",
        "attributes",
        "raw",
        "_wire",
        "_mi_at",
        "_mi256_at",
        "_fp_at",
    )

    method: int
    msg_class: int
    transaction_id: bytes
    attributes: list[tuple[int, object]]
    raw: bytes | None
    # id(attribute pair) -> (that pair, its bytes as received), only for pairs whose decoded
    # value cannot reproduce the received bytes (non-zero padding or reserved bits).
    _wire: dict[int, tuple[tuple[int, object], bytes]] | None
    _mi_at: int  # offset of MESSAGE-INTEGRITY in raw, -1 when absent
    _mi256_at: int  # offset of MESSAGE-INTEGRITY-SHA256 in raw, -1 when absent
    _fp_at: int  # offset of FINGERPRINT in raw, -1 when absent

    def __init__(
        self,
        method: int,
        msg_class: int,
        transaction_id: bytes | None = None,
        attributes: Iterable[tuple[int, object]] | None = None,
    ) -> None:
        if transaction_id is None:
            transaction_id = os.urandom(TRANSACTION_ID_SIZE)
        elif len(transaction_id) != TRANSACTION_ID_SIZE:
            raise ValueError("transaction ID must be 12 bytes")
        self.method = method
        self.msg_class = msg_class
        self.transaction_id = bytes(transaction_id)
        self.attributes = [] if attributes is None else list(attributes)
        self.raw = None
        self._wire = None
        self._mi_at = -1
        self._mi256_at = -1
        self._fp_at = -1

    def get(self, attr_type: int, default: object = None) -> object:
        """Value of the first attribute of that type, or ``default``."""
        for t, value in self.attributes:
            if t == attr_type:
                return value
        return default

    def get_all(self, attr_type: int) -> list[object]:
        return [value for t, value in self.attributes if t == attr_type]

    def add(self, attr_type: int, value: object = None) -> Message:
        self.attributes.append((attr_type, value))
        return self

    def __contains__(self, attr_type: object) -> bool:
        for t, _ in self.attributes:
            if t == attr_type:
                return True
        return False

    def unknown_comprehension_required(self, limit: int | None = None) -> list[int]:
        """Types below 0x8000 that this codec does not know, each once, in wire order.

        RFC 8489 §6.3.1: a request carrying any of these gets a 420 listing them; §6.3.2: an
        indication carrying any of them is discarded. ``limit`` stops the list at that many
        types (the 420 answer lists at most 128, as coturn does). Linear in the number of
        attributes: a set, not the list, tells which types were already seen.
        """
        found: list[int] = []
        seen: set[int] = set()
        known = _KNOWN_TYPES
        for t, _ in self.attributes:
            if t < 0x8000 and t not in known and t not in seen:
                seen.add(t)
                found.append(t)
                if limit is not None and len(found) >= limit:
                    break
        return found

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Message):
            return NotImplemented
        return (
            self.method == other.method
            and self.msg_class == other.msg_class
            and self.transaction_id == other.transaction_id
            and self.attributes == other.attributes
        )

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __repr__(self) -> str:
        method = Method(self.method).name if self.method in _METHODS else hex(self.method)
        try:
            klass = MessageClass(self.msg_class).name
        except ValueError:
            klass = str(self.msg_class)
        attrs = ", ".join(
            f"{_ATTR_NAMES.get(t, f'0x{t:04x}')}={value!r}" for t, value in self.attributes
        )
        return (
            f"Message({method} {klass}, transaction_id={self.transaction_id.hex()}, [{attrs}])"
        )


def is_stun(data: bytes | bytearray | memoryview) -> bool:
    """Cheap test before a full decode: long enough, top two bits zero, magic cookie."""
    return len(data) >= HEADER_SIZE and data[0] < 0x40 and data[4:8] == MAGIC_COOKIE_BYTES


def peek_header(data: bytes | bytearray | memoryview) -> tuple[int, int, bytes] | None:
    """(method, class, transaction ID) when the 20-byte header is sound, else None.

    Sound means what :func:`decode_message` checks before it looks at attributes: top two
    bits zero, magic cookie, a length that is a multiple of 4 and matches the buffer.
    """
    if len(data) < HEADER_SIZE:
        return None
    msg_type, length, cookie = _HEADER.unpack_from(data, 0)
    if msg_type & 0xC000 or cookie != MAGIC_COOKIE or length & 3:
        return None
    if length + HEADER_SIZE != len(data):
        return None
    method, msg_class = _split_type(msg_type)
    return _METHODS.get(method, method), _CLASSES[msg_class], bytes(data[8:20])


def decode_message(data: bytes | bytearray | memoryview, *,
                   max_attributes: int = MAX_ATTRIBUTES) -> Message:
    """Decode one whole STUN message.

    Raises :class:`NotStunError` when the bytes are not STUN (RFC 8489 §6.3: drop silently)
    and :class:`MalformedMessageError` when the header is sound but an attribute is not, or
    when there are more than ``max_attributes`` of them (answer a request with 400). The
    cost is linear in the attributes decoded, so bounded by ``max_attributes``.
    """
    if type(data) is not bytes:
        data = bytes(data)
    n = len(data)
    if n < HEADER_SIZE:
        raise NotStunError("shorter than a STUN header")
    msg_type, length, cookie = _HEADER.unpack_from(data, 0)
    # RFC 8489 §6.3: the checks that tell STUN from other protocols sharing the port.
    if msg_type & 0xC000:
        raise NotStunError("top two bits not zero")
    if cookie != MAGIC_COOKIE:
        raise NotStunError("bad magic cookie")
    if length & 3:
        raise NotStunError("length not a multiple of 4")
    if length + HEADER_SIZE != n:
        raise NotStunError("length does not match the datagram")
    method, msg_class = _split_type(msg_type)
    method = _METHODS.get(method, method)
    klass = _CLASSES[msg_class]
    tid = data[8:20]

    attributes: list[tuple[int, object]] = []
    wire: dict[int, tuple[tuple[int, object], bytes]] | None = None
    mi_at = mi256_at = fp_at = -1
    state = _STATE_OPEN
    decoders = DECODERS
    checks = RESERVED_CHECKS
    unpack_head = _ATTR_HEAD.unpack_from
    pos = HEADER_SIZE
    budget = max_attributes
    try:
        # n - pos stays a multiple of 4, so a 4-byte attribute header always fits.
        while pos < n:
            budget -= 1
            if budget < 0:
                raise InvalidAttribute(f"more than {max_attributes} attributes")
            attr_type, attr_len = unpack_head(data, pos)
            start = pos + 4
            end = start + attr_len
            if end > n:
                raise InvalidAttribute(f"attribute 0x{attr_type:04x} overruns the message")
            nxt = (end + 3) & ~3

            if attr_type == _FINGERPRINT:
                # RFC 8489 §14.7: FINGERPRINT is last, and one that does not match means the
                # bytes are not STUN after all (it exists to tell STUN from other protocols).
                if attr_len != 4 or nxt != n:
                    raise NotStunError("FINGERPRINT is not the last attribute")
                expected = zlib.crc32(memoryview(data)[:pos]) ^ FINGERPRINT_XOR
                if not hmac.compare_digest(_U32.pack(expected), data[start:end]):
                    raise NotStunError("FINGERPRINT does not match")
                attributes.append((_FINGERPRINT, expected))
                fp_at = pos
                break

            if state != _STATE_OPEN:
                # RFC 8489 §14.5/§14.6: only MI-SHA256 (after MI) and FINGERPRINT may follow the
                # integrity attributes; anything else is ignored, not interpreted.
                if not (state == _STATE_AFTER_MI and attr_type == _MI256):
                    pos = nxt
                    continue

            decoder = decoders.get(attr_type)
            value = data[start:end] if decoder is None else decoder(data, start, attr_len, tid)
            item = (attr_type, value)
            attributes.append(item)

            if nxt != end and data[end:nxt] != ZERO_PAD[nxt - end]:
                keep = True
            else:
                check = checks.get(attr_type)
                keep = check is not None and check(data, start, attr_len)
            if keep:
                if wire is None:
                    wire = {}
                wire[id(item)] = (item, data[pos:nxt])

            if attr_type == _MI:
                mi_at = pos
                state = _STATE_AFTER_MI
            elif attr_type == _MI256:
                mi256_at = pos
                state = _STATE_AFTER_MI256
            pos = nxt
    except StunDecodeError:
        raise
    except InvalidAttribute as exc:
        raise MalformedMessageError(str(exc), method, klass, tid) from None
    except (struct.error, IndexError, ValueError, OverflowError) as exc:
        # Backstop: every decoder checks lengths first, so this means a bug, but the rule
        # stays that bad input only ever raises our own errors.
        raise MalformedMessageError(f"bad attribute: {exc}", method, klass, tid) from None

    msg = Message.__new__(Message)
    msg.method = method
    msg.msg_class = klass
    msg.transaction_id = tid
    msg.attributes = attributes
    msg.raw = data
    msg._wire = wire
    msg._mi_at = mi_at
    msg._mi256_at = mi256_at
    msg._fp_at = fp_at
    return msg


def encode_message(
    msg: Message,
    *,
    key: bytes | None = None,
    integrity: str = "sha1",
    fingerprint: bool = False,
) -> bytes:
    """Encode ``msg``; with ``key``, append MESSAGE-INTEGRITY and/or -SHA256, then FINGERPRINT.

    ``integrity`` is ``"sha1"`` (MESSAGE-INTEGRITY), ``"sha256"`` (MESSAGE-INTEGRITY-SHA256,
    full 32 bytes) or ``"both"`` (MI first, then MI-SHA256: RFC 8489 §14.6). Integrity and
    fingerprint values already present in ``msg.attributes`` are written as given, which is
    what byte-exact re-encoding of a decoded message needs.
    """
    tid = msg.transaction_id
    if len(tid) != TRANSACTION_ID_SIZE:
        raise ValueError("transaction ID must be 12 bytes")
    method = msg.method
    msg_class = msg.msg_class
    if not 0 <= method <= 0xFFF:
        raise ValueError(f"method out of range: {method!r}")
    if not 0 <= msg_class <= 3:
        raise ValueError(f"class out of range: {msg_class!r}")
    if key is not None and integrity not in _INTEGRITY_MODES:
        raise ValueError(f"integrity must be one of {_INTEGRITY_MODES}, not {integrity!r}")

    wire = msg._wire
    if wire is not None and (msg.raw is None or msg.raw[8:20] != tid):
        # Kept bytes of XOR addresses depend on the transaction ID they were received with.
        wire = None
    encoders = ENCODERS
    pack_head = _ATTR_HEAD.pack
    parts: list[bytes] = []
    append = parts.append
    for item in msg.attributes:
        if wire is not None:
            kept = wire.get(id(item))
            if kept is not None and kept[0] is item:
                append(kept[1])
                continue
        attr_type, value = item
        try:
            raw = encoders.get(attr_type, encode_bytes)(value, tid)
        except struct.error as exc:
            raise ValueError(f"bad value for attribute 0x{attr_type:04x}: {exc}") from None
        attr_len = len(raw)
        if attr_len > 0xFFFF or not 0 <= attr_type <= 0xFFFF:
            raise ValueError(f"attribute 0x{attr_type:04x} cannot be encoded")
        append(pack_head(attr_type, attr_len))
        append(raw)
        if attr_len & 3:
            append(ZERO_PAD[-attr_len & 3])
    body = b"".join(parts)

    msg_type = _message_type(method, msg_class)
    trailer = 8 if fingerprint else 0
    if key is not None:
        trailer += {"sha1": 24, "sha256": 36, "both": 60}[integrity]
    if len(body) + trailer > 0xFFFF:
        raise ValueError("message too long for STUN's 16-bit length")
    if key is not None:
        # RFC 8489 §14.5/§14.6: the HMAC covers the header, with its length already counting
        # the integrity attribute, and every attribute before it.
        if integrity != "sha256":
            head = _HEADER_OUT.pack(msg_type, len(body) + 24, MAGIC_COOKIE, tid)
            body += _MI_HEAD + hmac.digest(key, head + body, "sha1")
        if integrity != "sha1":
            head = _HEADER_OUT.pack(msg_type, len(body) + 36, MAGIC_COOKIE, tid)
            body += _ATTR_HEAD.pack(_MI256, 32) + hmac.digest(key, head + body, "sha256")
    if fingerprint:
        # RFC 8489 §14.7: CRC-32 of everything before FINGERPRINT, length counting it.
        head = _HEADER_OUT.pack(msg_type, len(body) + 8, MAGIC_COOKIE, tid)
        crc = zlib.crc32(body, zlib.crc32(head)) ^ FINGERPRINT_XOR
        body += _FINGERPRINT_HEAD + _U32.pack(crc)
    return _HEADER_OUT.pack(msg_type, len(body), MAGIC_COOKIE, tid) + body


def _covered(raw: bytes, at: int, attr_size: int) -> bytes:
    """The bytes an integrity attribute at ``at`` covers, with the length field rewritten to
    end just after that attribute (RFC 8489 §14.5)."""
    return raw[:2] + _U16.pack(at - HEADER_SIZE + attr_size) + raw[4:at]


def verify_message_integrity(msg: Message, key: bytes) -> bool:
    """Check MESSAGE-INTEGRITY (HMAC-SHA1) over the bytes the message was decoded from."""
    raw = msg.raw
    at = msg._mi_at
    if raw is None or at < 0:
        return False
    mac = hmac.digest(key, _covered(raw, at, 24), "sha1")
    return hmac.compare_digest(mac, raw[at + 4 : at + 24])


def verify_message_integrity_sha256(msg: Message, key: bytes) -> bool:
    """Check MESSAGE-INTEGRITY-SHA256; RFC 8489 §14.6 allows truncation to 16..32 bytes."""
    raw = msg.raw
    at = msg._mi256_at
    if raw is None or at < 0:
        return False
    size = _U16.unpack_from(raw, at + 2)[0]
    mac = hmac.digest(key, _covered(raw, at, 4 + size), "sha256")
    return hmac.compare_digest(mac[:size], raw[at + 4 : at + 4 + size])


def verify_fingerprint(msg: Message) -> bool:
    """True when the received bytes end in a FINGERPRINT that matches them.

    A message built locally has no received bytes and so has no verified fingerprint.
    """
    raw = msg.raw
    at = msg._fp_at
    if raw is None or at < 0:
        return False
    expected = zlib.crc32(memoryview(raw)[:at]) ^ FINGERPRINT_XOR
    return hmac.compare_digest(_U32.pack(expected), raw[at + 4 :])
