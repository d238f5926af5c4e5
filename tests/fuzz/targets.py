"""Fuzz targets: plain functions of one ``bytes`` argument, importable without atheris.

Each target raises (``AssertionError`` or whatever escaped the code under test) only when an
invariant broke; for any other input it returns. The allowed outcomes are a valid answer, a
typed decode error (:class:`StunDecodeError` and its subclasses, :class:`FramingError`) or a
silent drop.

- :func:`stun_decode`: ``decode_message`` and ``decode_channel_data`` on the raw bytes; what
  decodes must re-encode to the same bytes and survive a re-signed round trip.
- :func:`stream_framer`: the input cut into chunks at positions the input chooses; the frames
  and the final state must not depend on the chunking, and must match the framing rules.
- :func:`turn_core`: a fresh :class:`TurnCore` (the unit tests' harness: fixed wall clock,
  known REST secret, fake relay ports) driven by a sequence of operations cut from the input,
  among them well-formed authenticated requests whose attribute values the input chooses.
  After every operation the core's answers and its bookkeeping are checked.

The input formats are documented on each target; ``seed_inputs`` builds the seed corpus in
them, and ``CoreInput`` writes core operations for seeds and tests.
"""

from __future__ import annotations

import dataclasses
import hmac
import inspect
import itertools
import ipaddress
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from turnserver.auth import ALGORITHM_MD5, ALGORITHM_SHA256, CredentialStore, NonceManager, long_term_key
from turnserver.auth.keys import userhash
from turnserver.auth.rest import rest_password
from turnserver.policy import PeerPolicy
from turnserver.stun import (
    MAGIC_COOKIE,
    Attr,
    FramingError,
    MalformedMessageError,
    Message,
    MessageClass,
    Method,
    NotStunError,
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
from turnserver.stun.attributes import MAX_TEXT_BYTES_OUT, MAX_USERNAME_BYTES_OUT
from turnserver.turn.core import CoreConfig, SendToPeer

from ..unit.turn_harness import REALM, SECRET, WALL_NOW, FakeRelay, FakeRelayPorts, Harness, make_core

__all__ = ["TARGETS", "CoreInput", "Reader", "run_core", "seed_inputs", "stream_framer",
           "stun_decode", "turn_core"]


class Reader:
    """Cuts the fuzzer's bytes into small values; past the end every read gives zeros."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def remaining(self) -> int:
        return len(self.data) - self.pos

    def u8(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def u16(self) -> int:
        return self.u8() << 8 | self.u8()

    def u32(self) -> int:
        return self.u16() << 16 | self.u16()

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk

    def pick(self, seq: Any) -> Any:
        return seq[self.u8() % len(seq)]


def _message_type(method: int, msg_class: int) -> int:
    """RFC 8489 §5 bit layout, written out here so the harness does not share the codec's."""
    return ((method & 0x000F) | ((method & 0x0070) << 1) | ((method & 0x0F80) << 2)
            | ((msg_class & 1) << 4) | ((msg_class & 2) << 7))


# ============================================================================ the STUN decoder

_TEXT_OUT_LIMITS = {
    int(Attr.USERNAME): MAX_USERNAME_BYTES_OUT,
    int(Attr.REALM): MAX_TEXT_BYTES_OUT,
    int(Attr.NONCE): MAX_TEXT_BYTES_OUT,
    int(Attr.SOFTWARE): MAX_TEXT_BYTES_OUT,
}
_INTEGRITY = {int(Attr.MESSAGE_INTEGRITY), int(Attr.MESSAGE_INTEGRITY_SHA256), int(Attr.FINGERPRINT)}


def _tlvs(data: bytes) -> list[tuple[int, int, int]]:
    """(type, value offset, value length) of every attribute, walked independently of the codec.

    Only called on bytes ``decode_message`` accepted, so the framing is sound.
    """
    out = []
    pos = 20
    while pos < len(data):
        attr_type, length = struct.unpack_from("!HH", data, pos)
        out.append((attr_type, pos + 4, length))
        pos += 4 + ((length + 3) & ~3)
    assert pos == len(data), "attributes do not end where the message ends"
    return out


def _kept_types(walked: list[int]) -> list[int]:
    """The attribute types a decoder keeps (RFC 8489 §14.5-§14.7): everything up to
    MESSAGE-INTEGRITY, then only MESSAGE-INTEGRITY-SHA256, and FINGERPRINT, which ends it."""
    kept: list[int] = []
    state = "open"
    for t in walked:
        if t == Attr.FINGERPRINT:
            kept.append(t)
            break
        if state != "open" and not (state == "after_mi" and t == Attr.MESSAGE_INTEGRITY_SHA256):
            continue
        kept.append(t)
        if t == Attr.MESSAGE_INTEGRITY:
            state = "after_mi"
        elif t == Attr.MESSAGE_INTEGRITY_SHA256:
            state = "after_mi256"
    return kept


def _over_encoder_limit(item: tuple[int, object]) -> bool:
    """The decoder takes longer text than the encoder writes (RFC 8489 §14.3, §14.8 bounds)."""
    attr_type, value = item
    limit = _TEXT_OUT_LIMITS.get(attr_type)
    if limit is not None:
        return len(str(value).encode("utf-8")) > limit
    if attr_type == Attr.ERROR_CODE:
        return len(value[1].encode("utf-8")) > MAX_TEXT_BYTES_OUT  # type: ignore[index]
    if attr_type == Attr.ADDRESS_ERROR_CODE:
        return len(value[2].encode("utf-8")) > MAX_TEXT_BYTES_OUT  # type: ignore[index]
    return False


def _check_decoded(data: bytes, msg: Message) -> None:
    assert msg.raw == data
    header = peek_header(data)
    assert header == (msg.method, msg.msg_class, msg.transaction_id), (header, msg)
    repr(msg)
    unknown = msg.unknown_comprehension_required()
    assert all(t < 0x8000 for t in unknown) and len(set(unknown)) == len(unknown)
    for key in (b"k", b""):
        assert isinstance(verify_message_integrity(msg, key), bool)
        assert isinstance(verify_message_integrity_sha256(msg, key), bool)
    has_fingerprint = Attr.FINGERPRINT in msg
    assert verify_fingerprint(msg) == has_fingerprint
    if has_fingerprint:
        assert msg.attributes[-1][0] == Attr.FINGERPRINT, "FINGERPRINT not last"

    walked = [t for t, _, _ in _tlvs(data)]
    types = [t for t, _ in msg.attributes]
    assert types == _kept_types(walked), (types, walked)
    too_long = any(_over_encoder_limit(item) for item in msg.attributes)
    if len(types) == len(walked):
        # Nothing was ignored after MESSAGE-INTEGRITY: the re-encoding is byte-exact.
        try:
            again = encode_message(msg)
        except ValueError:
            assert too_long, f"a decoded message does not re-encode: {msg!r}"
        else:
            assert again == data, f"re-encoding differs:\n{again.hex()}\n{data.hex()}"
    elif not has_fingerprint and not too_long:
        assert decode_message(encode_message(msg)) == msg

    # What came before the integrity attributes, re-signed: must verify and decode back.
    body = [item for item in msg.attributes if item[0] not in _INTEGRITY]
    if any(_over_encoder_limit(item) for item in body):
        return
    plain = Message(msg.method, msg.msg_class, msg.transaction_id, body)
    mode = ("sha1", "sha256", "both")[data[-1] % 3]
    try:
        signed = encode_message(plain, key=b"fuzz-key", integrity=mode, fingerprint=True)
    except ValueError:
        # Only STUN's 16-bit length may stand in the way, once the trailer is added.
        trailer = 8 + {"sha1": 24, "sha256": 36, "both": 60}[mode]
        assert len(encode_message(plain)) - 20 + trailer > 0xFFFF, f"re-signing failed for {plain!r}"
        return
    back = decode_message(signed)
    assert verify_fingerprint(back)
    assert verify_message_integrity(back, b"fuzz-key") == (mode != "sha256")
    assert verify_message_integrity_sha256(back, b"fuzz-key") == (mode != "sha1")
    assert back.attributes[: len(body)] == body


def _check_channel_data(data: bytes) -> None:
    for max_channel in (0x4FFF, 0x7FFF):
        try:
            number, payload = decode_channel_data(data, max_channel=max_channel)
        except StunDecodeError:
            continue
        assert 0x4000 <= number <= max_channel
        length = struct.unpack_from("!H", data, 2)[0]
        assert payload == data[4 : 4 + length]
        assert encode_channel_data(number, payload, max_channel=max_channel) == data[: 4 + length]
        padded = encode_channel_data(number, payload, pad=True, max_channel=max_channel)
        assert len(padded) % 4 == 0
        assert decode_channel_data(padded, max_channel=max_channel) == (number, payload)


def stun_decode(data: bytes) -> None:
    """Input: one datagram, as is.

    A decode fails only with the codec's errors: ``NotStunError`` exactly when the header is not
    sound (``peek_header`` is None) or FINGERPRINT fails, ``MalformedMessageError`` carrying the
    header's fields. A message that decodes re-encodes byte for byte (unless attributes after
    MESSAGE-INTEGRITY were ignored, or text is longer than RFC 8489 lets an encoder write),
    and re-signed with a key it verifies. ChannelData decodes to what the header says and
    re-encodes to the same bytes.
    """
    header = peek_header(data)
    try:
        msg = decode_message(data)
    except MalformedMessageError as exc:
        assert header == (exc.method, exc.msg_class, exc.transaction_id), (header, exc)
    except NotStunError:
        pass
    else:
        assert header is not None, "decoded bytes whose header peek_header calls unsound"
        _check_decoded(data, msg)
    _check_channel_data(data)


# ============================================================================ the stream framer

_FRAMER_LIMITS = (65535 + 4 + 20, 1024, 128, 20)


def _reference_frames(stream: bytes, limit: int, channel_end: int) -> tuple[list[bytes], bool, int]:
    """The framing rules of RFC 8656 §12.5 applied to the whole stream at once:
    (frames, whether the stream went bad, bytes held back)."""
    frames: list[bytes] = []
    pos = 0
    n = len(stream)
    while n - pos >= 4:
        first = stream[pos]
        length = struct.unpack_from("!H", stream, pos + 2)[0]
        if first < 0x40:
            if length % 4 or 20 + length > limit:
                return frames, True, 0
            if n - pos >= 8 and struct.unpack_from("!I", stream, pos + 4)[0] != MAGIC_COOKIE:
                return frames, True, 0
            if n - pos < 20 + length:
                break
            frames.append(stream[pos : pos + 20 + length])
            pos += 20 + length
        elif first < channel_end:
            padded = (4 + length + 3) & ~3
            if padded > limit:
                return frames, True, 0
            if n - pos < 4 + length:
                break
            frames.append(stream[pos : pos + 4 + length])
            pos = min(n, pos + padded)
        else:
            return frames, True, 0
    return frames, False, n - pos


def _feed_all(framer: StreamFramer, chunks: list[bytes], limit: int) -> tuple[list[bytes], bool]:
    frames: list[bytes] = []
    for chunk in chunks:
        try:
            got = framer.feed(chunk)
        except FramingError:
            assert framer.buffered == 0
            return frames, True
        assert isinstance(got, list)
        frames.extend(got)
        assert framer.buffered <= limit, (framer.buffered, limit)
        if framer.pending_error is not None:
            assert framer.buffered == 0
            try:
                framer.feed(b"")
            except FramingError:
                return frames, True
            raise AssertionError("pending_error set but the next feed did not raise it")
    return frames, False


def stream_framer(data: bytes) -> None:
    """Input: ``flags, k, k * u16 cut positions, stream``.

    ``flags`` picks the size limit (bits 0-1) and RFC 5766 channel numbers (bit 2). The stream
    goes through three framers: in one ``feed``, in the chunks the cut positions make, and
    byte by byte (streams of up to 64 bytes). All three yield the same frames and end in the same state,
    which is what the framing rules applied to the whole stream give; every frame decodes with
    the codec's typed errors only.
    """
    r = Reader(data)
    flags = r.u8()
    limit = _FRAMER_LIMITS[flags & 3]
    max_channel = 0x7FFF if flags & 4 else 0x4FFF
    cuts = [r.u16() for _ in range(r.u8() % 16)]
    stream = data[r.pos :]
    cuts = sorted(c % (len(stream) + 1) for c in cuts)
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)])]

    expected, bad, held = _reference_frames(stream, limit, (max_channel >> 8) + 1)
    plans = [[stream], chunks]
    if len(stream) <= 64:
        plans.append([stream[i : i + 1] for i in range(len(stream))])
    for plan in plans:
        framer = StreamFramer(limit, max_channel=max_channel)
        frames, failed = _feed_all(framer, plan, limit)
        assert frames == expected, (plan, frames, expected)
        assert failed == bad, (plan, failed, bad)
        if not failed:
            # The bytes of an unfinished frame are held, padding still owed is not.
            assert framer.buffered == held, (framer.buffered, held)
            assert framer.pending_error is None
    for frame in expected:
        if frame[0] < 0x40:
            assert peek_header(frame) is not None
            try:
                decode_message(frame)
            except StunDecodeError:
                pass
        else:
            assert decode_channel_data(frame, max_channel=max_channel)[1] == frame[4:]


# ============================================================================ the TURN core

CLIENTS: tuple[tuple[str, tuple[str, int], tuple[str, int]], ...] = (
    ("udp", ("198.51.100.7", 40000), ("192.0.2.1", 3478)),
    ("udp", ("198.51.100.7", 40001), ("192.0.2.1", 3478)),  # same IP, another port
    ("tcp", ("198.51.100.8", 50000), ("192.0.2.1", 3478)),
    ("tls", ("2001:db8:1::8", 50001), ("2001:db8::1", 5349)),
)
SINKS = tuple(f"sink-{i}" for i in range(len(CLIENTS)))
STATIC_USER, STATIC_PASSWORD = "carol", "carol-password"
_EXPIRY_OK = int(WALL_NOW) + 3600
USERS: tuple[tuple[str, str], ...] = (
    (f"{_EXPIRY_OK}:alice", rest_password(SECRET, f"{_EXPIRY_OK}:alice")),
    (f"{_EXPIRY_OK}:bob", rest_password(SECRET, f"{_EXPIRY_OK}:bob")),
    (f"{int(WALL_NOW) + 120}:soon", rest_password(SECRET, f"{int(WALL_NOW) + 120}:soon")),
    (f"{int(WALL_NOW) - 10}:gone", rest_password(SECRET, f"{int(WALL_NOW) - 10}:gone")),
    (STATIC_USER, STATIC_PASSWORD),
    ("mallory", "guess"),  # unknown
)
ALLOWED = ("203.0.113.0/24", "2001:db8::/32")
PEERS: tuple[tuple[str, int], ...] = (
    ("203.0.113.50", 6000),
    ("203.0.113.50", 6001),
    ("203.0.113.60", 7000),
    ("2001:db8::61", 7000),
    ("127.0.0.1", 3478),  # refused by the policy
    ("10.0.0.1", 80),  # refused
    ("192.0.2.1", 50001),  # the relay address itself
    ("::ffff:203.0.113.50", 6000),  # IPv4-mapped spelling of an allowed peer
    ("2001:db8::1", 50000),  # the IPv6 relay address
    ("203.0.113.50", 0),  # port 0
)
EXTERNAL = {"192.0.2.1": "198.51.100.200"}  # bound -> advertised, when bit 7 of the config
_PASSWORD_ALGORITHMS = [(ALGORITHM_MD5, b""), (ALGORITHM_SHA256, b"")]

# What an attribute may be asked to carry: (type, how to draw its value).
_CHANNELS = (0x4000, 0x4001, 0x4002, 0x4FFF, 0x5000, 0x7FFF, 0x3FFF, 0x8000)
_LIFETIMES = (0, 1, 600, 601, 3600, 3601, 0xFFFFFFFF)


class CheckedRelayPorts(FakeRelayPorts):
    """The harness's fake pool, remembering every endpoint and any release it should not see."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.handed: list[FakeRelay] = []
        self.bad_releases: list[str] = []

    def allocate(self, family: int, **kwargs: Any) -> tuple[FakeRelay, FakeRelay | None] | None:
        got = super().allocate(family, **kwargs)
        if got is not None:
            self.handed.extend(e for e in got if e is not None)
        return got

    def release(self, endpoint: FakeRelay) -> None:
        if endpoint not in self.open:
            self.bad_releases.append(f"{endpoint!r} released but not open")
            return  # the pool's free list must not get the port twice
        super().release(endpoint)


@dataclass
class CoreRun:
    """What one core input did: the harness, and counts the tests look at."""

    h: Harness
    ports: CheckedRelayPorts
    now: float = 0.0
    ops: Counter = field(default_factory=Counter)
    answers: Counter = field(default_factory=Counter)  # (method, code) of every answer
    sent_to_peer: int = 0
    to_client: int = 0  # results of handle_peer_data handed to a sink
    # Payload bytes and datagrams the sinks took (those they dropped were reported to the
    # core): what the allocations' counters must add up to.
    delivered: list[int] = field(default_factory=lambda: [0, 0])
    tid_counter: int = 0
    last_tid: dict[int, bytes] = field(default_factory=dict)  # client index -> tid
    last_request: bytes = b""
    challenge_nonce: dict[str, str] = field(default_factory=dict)  # client IP -> nonce
    tokens: list[bytes] = field(default_factory=list)
    limits_changed: bool = False  # a reconfigure changed quotas or caps under live allocations


_LIMITS = {  # CoreConfig fields set by the second config byte, where the core has them
    1: {"max_permissions_per_allocation": 3, "max_channels_per_allocation": 2},
    2: {"allocation_bandwidth_bytes_s": 3000},
    4: {"server_bandwidth_bytes_s": 5000},
    8: {"challenge_rate_per_source": 1.0, "challenge_burst_per_source": 2},
}
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(CoreConfig)}


def _core_for(flags: int, limits: int) -> CoreRun:
    ipv6 = bool(flags & 16)
    external = EXTERNAL if flags & 128 else {}
    ports = CheckedRelayPorts(ipv6="2001:db8::1" if ipv6 else None,
                              ports=range(50000, 50004) if flags & 32 else range(50000, 50100),
                              dont_fragment=not flags & 64)
    config: dict[str, Any] = {
        "legacy_channel_numbers": bool(flags & 1),
        "user_quota": 2 if flags & 2 else 0,
        "max_allocations": 3 if flags & 4 else 0,
        "allow_refresh_after_expiry": not flags & 8,
    }
    for bit, values in _LIMITS.items():
        if limits & bit:
            config.update((k, v) for k, v in values.items() if k in _CONFIG_FIELDS)
    if external:
        config["external_addresses"] = external
        config["alternate_server"] = ("198.51.100.201", 3478)
    relay_addresses = ("192.0.2.1", "2001:db8::1") if ipv6 else ("192.0.2.1",)
    h = make_core(allow=ALLOWED, ports=ports, static_users={STATIC_USER: STATIC_PASSWORD},
                  relay_addresses=relay_addresses, **config)
    return CoreRun(h, ports)


def _key(username: str, password: str, algorithm: int) -> bytes:
    return _KEYS.get((username, password, algorithm)) or _KEYS.setdefault(
        (username, password, algorithm), long_term_key(username, REALM, password, algorithm))


_KEYS: dict[tuple[str, str, int], bytes] = {}


def _peer(r: Reader) -> tuple[str, int]:
    choice = r.u8()
    if choice < 200:
        return PEERS[choice % len(PEERS)]
    if choice & 1:
        return ".".join(str(b) for b in r.take(4).ljust(4, b"\0")), r.u16()
    raw = r.take(16).ljust(16, b"\0")
    return ":".join(raw[i : i + 2].hex() for i in range(0, 16, 2)), r.u16()


def _text(r: Reader, limit: int) -> str:
    return r.take(r.u8() % 40).decode("utf-8", "replace")[: limit // 4]


def _attribute(run: CoreRun, r: Reader) -> tuple[int, object] | None:
    kind = r.u8() % 18
    if kind == 0:
        return Attr.REQUESTED_TRANSPORT, r.pick((17, 17, 6, r.u8()))
    if kind == 1:
        return Attr.LIFETIME, r.pick(_LIFETIMES + (r.u32(),))
    if kind in (2, 3):
        return Attr.XOR_PEER_ADDRESS, _peer(r)
    if kind == 4:
        return Attr.CHANNEL_NUMBER, r.pick(_CHANNELS + (r.u16(),))
    if kind == 5:
        return Attr.EVEN_PORT, r.flag()
    if kind == 6:
        token = r.pick(run.tokens) if run.tokens and r.flag() else r.take(8).ljust(8, b"\0")
        return Attr.RESERVATION_TOKEN, token
    if kind == 7:
        return Attr.REQUESTED_ADDRESS_FAMILY, r.pick((1, 2, 3, 0))
    if kind == 8:
        return Attr.ADDITIONAL_ADDRESS_FAMILY, r.pick((2, 1, 3))
    if kind == 9:
        return Attr.DONT_FRAGMENT, None
    if kind == 10:
        return Attr.DATA, r.take(r.u8())
    if kind == 11:
        return 0x0030 + r.u8() % 8, r.take(r.u8() % 8)  # unknown, comprehension-required
    if kind == 12:
        return 0x8030 + r.u8() % 8, r.take(r.u8() % 8)  # unknown, optional
    if kind == 13:
        return Attr.SOFTWARE, _text(r, MAX_TEXT_BYTES_OUT)
    if kind == 14:
        return Attr.USERNAME, r.pick(USERS)[0]
    if kind == 15:
        return Attr.PRIORITY, r.u32()
    if kind == 16:
        return Attr.PASSWORD_ALGORITHM, r.pick(((ALGORITHM_MD5, b""), (ALGORITHM_SHA256, b""), (3, b"")))
    return None


_METHODS = (Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND,
            Method.ALLOCATE, Method.CHANNEL_BIND, Method.BINDING, Method.CONNECT, 0x0FF)


def _template(run: CoreRun, method: int, r: Reader) -> list[tuple[int, object]]:
    """The attributes a client sends for ``method``, values from the input."""
    if method == Method.ALLOCATE:
        return [(Attr.REQUESTED_TRANSPORT, 17)]
    if method == Method.CREATE_PERMISSION:
        return [(Attr.XOR_PEER_ADDRESS, _peer(r)) for _ in range(1 + r.u8() % 4)]
    if method == Method.CHANNEL_BIND:
        return [(Attr.CHANNEL_NUMBER, r.pick(_CHANNELS[:4])), (Attr.XOR_PEER_ADDRESS, _peer(r))]
    if method == Method.REFRESH and r.flag():
        return [(Attr.LIFETIME, r.pick(_LIFETIMES))]
    return []


# Authentication modes of a built request: which of them can possibly succeed.
_AUTH_MODES = ("md5", "md5", "sha256", "both", "none", "wrong_key", "stale_nonce",
               "other_ip_nonce", "challenge_nonce", "userhash", "bad_algorithms", "garbage_nonce")
_CAN_SUCCEED = {"md5", "sha256", "both", "challenge_nonce", "userhash"}


def _nonce(run: CoreRun, ip: str, mode: str, r: Reader) -> str:
    nonces = run.h.core.nonces
    if mode == "stale_nonce":
        wall = run.h.wall
        saved = wall[0]
        wall[0] = saved - 3600
        try:
            return nonces.make(ip)
        finally:
            wall[0] = saved
    if mode == "other_ip_nonce":
        return nonces.make("198.51.100.99")
    if mode == "garbage_nonce":
        return _text(r, 128)
    if mode == "challenge_nonce" and ip in run.challenge_nonce:
        return run.challenge_nonce[ip]
    return nonces.make(ip)


def _tid(run: CoreRun, client: int, r: Reader) -> bytes:
    if r.u8() < 40 and client in run.last_tid:
        return run.last_tid[client]  # a retransmission
    run.tid_counter += 1
    return struct.pack("!4xQ", run.tid_counter)


Built = tuple[bytes, str, "bytes | None", str, str]


def _build_request(run: CoreRun, r: Reader, client: int) -> Built:
    """(bytes, auth mode, key, integrity, username) of a request whose attributes come from
    the input."""
    method = r.pick(_METHODS)
    attrs: list[tuple[int, object]] = _template(run, method, r) if r.u8() < 200 else []
    for _ in range(r.u8() % 4):
        item = _attribute(run, r)
        if item is not None:
            attrs.insert(r.u8() % (len(attrs) + 1), item)
    mode = r.pick(_AUTH_MODES)
    username, password = r.pick(USERS)
    tid = _tid(run, client, r)
    run.last_tid[client] = tid
    fingerprint = r.u8() < 64
    msg = Message(method, MessageClass.REQUEST, tid, attrs)
    if mode == "none":
        return encode_message(msg, fingerprint=fingerprint), mode, None, "sha1", username
    ip = CLIENTS[client][1][0]
    algorithm = ALGORITHM_MD5
    integrity = "sha1"
    if mode == "userhash":
        username, password = STATIC_USER, STATIC_PASSWORD
        msg.add(Attr.USERHASH, userhash(username, REALM))
    else:
        msg.add(Attr.USERNAME, username)
    msg.add(Attr.REALM, REALM).add(Attr.NONCE, _nonce(run, ip, mode, r))
    if mode in ("sha256", "both", "bad_algorithms"):
        algorithm = ALGORITHM_SHA256 if mode == "sha256" else ALGORITHM_MD5
        offered = _PASSWORD_ALGORITHMS if mode != "bad_algorithms" else _PASSWORD_ALGORITHMS[::-1]
        msg.add(Attr.PASSWORD_ALGORITHMS, offered).add(Attr.PASSWORD_ALGORITHM, (algorithm, b""))
        integrity = "sha1" if mode == "bad_algorithms" else mode
    key = _key(username, password + ("!" if mode == "wrong_key" else ""), algorithm)
    data = encode_message(msg, key=key, integrity=integrity, fingerprint=fingerprint)
    return data, mode, key, integrity, username


def _raw_attributes(r: Reader) -> bytes:
    """Attributes with values, lengths and padding bytes straight from the input."""
    out = []
    for _ in range(r.u8() % 6):
        attr_type = r.pick((Attr.XOR_PEER_ADDRESS, Attr.CHANNEL_NUMBER, Attr.LIFETIME,
                            Attr.REQUESTED_TRANSPORT, Attr.EVEN_PORT, Attr.RESERVATION_TOKEN,
                            Attr.REQUESTED_ADDRESS_FAMILY, Attr.ADDITIONAL_ADDRESS_FAMILY,
                            Attr.DONT_FRAGMENT, Attr.DATA, Attr.USERNAME, Attr.PASSWORD_ALGORITHMS,
                            Attr.PASSWORD_ALGORITHM, Attr.MESSAGE_INTEGRITY, Attr.FINGERPRINT,
                            Attr.USERHASH, r.u16()))
        value = r.take(r.u8() % 40)
        out.append(struct.pack("!HH", attr_type, len(value)) + value)
        pad = -len(value) & 3
        out.append(r.take(pad).ljust(pad, b"\0"))
    return b"".join(out)


def _signed_raw(run: CoreRun, r: Reader, client: int) -> Built:
    """An authenticated request whose leading attributes are raw bytes from the input, followed
    by USERNAME, REALM, NONCE and a valid MESSAGE-INTEGRITY over all of them."""
    method = r.pick(_METHODS)
    username, password = r.pick(USERS[:3])
    tid = _tid(run, client, r)
    run.last_tid[client] = tid
    body = _raw_attributes(r)
    creds = Message(method, MessageClass.REQUEST, tid, [
        (Attr.USERNAME, username), (Attr.REALM, REALM),
        (Attr.NONCE, run.h.core.nonces.make(CLIENTS[client][1][0]))])
    body += encode_message(creds)[20:]
    key = _key(username, password, ALGORITHM_MD5)
    msg_type = _message_type(method, MessageClass.REQUEST)
    head = struct.pack("!HHI12s", msg_type, len(body) + 24, MAGIC_COOKIE, tid)
    body += struct.pack("!HH", Attr.MESSAGE_INTEGRITY, 20) + hmac.digest(key, head + body, "sha1")
    if r.flag():
        head = struct.pack("!HHI12s", msg_type, len(body) + 8, MAGIC_COOKIE, tid)
        crc = zlib.crc32(head + body) ^ 0x5354554E
        body += struct.pack("!HHI", Attr.FINGERPRINT, 4, crc)
    data = struct.pack("!HHI12s", msg_type, len(body), MAGIC_COOKIE, tid) + body
    return data, "raw", key, "sha1", username


def _raw_message(run: CoreRun, r: Reader) -> bytes:
    """Bytes from the input: as they are, or behind a sound header, or a mutated earlier request."""
    how = r.u8() % 3
    if how == 0:
        return r.take(r.u16() % 700)
    if how == 1:
        body = r.take(r.u16() % 400)
        body = body[: len(body) & ~3]
        return struct.pack("!HHI", r.u16() & 0x3FFF, len(body), MAGIC_COOKIE) + r.take(12).ljust(12, b"\0") + body
    data = bytearray(run.last_request)
    for _ in range(r.u8() % 4):
        if data:
            data[r.u16() % len(data)] = r.u8()
    if r.flag():
        del data[r.u16() % (len(data) + 1):]
    return bytes(data)


def _expired(username: str, wall: float) -> bool:
    """A REST username (RFC 8656 §9.2 of draft-uberti-behave-turn-rest) is "expiry:user"."""
    head, sep, _ = username.partition(":")
    return bool(sep) and head.isdigit() and int(head) <= wall


def _same_address(a: object, b: tuple[str, int]) -> bool:
    if not isinstance(a, tuple):
        return False
    return ipaddress.ip_address(a[0]) == ipaddress.ip_address(b[0]) and a[1] == b[1]


def _check_reply(run: CoreRun, client: int, data: bytes, result: object, built: Built | None,
                 before: Any) -> None:
    """An answer to ``data`` from client ``client``: decodable, same transaction, honest."""
    core = run.h.core
    five_tuple = CLIENTS[client]
    header = peek_header(data)
    if header is None:
        assert result is None, f"bytes that are not STUN were answered: {result!r}"
        return
    method, klass, tid = header
    if result is None:
        return
    if isinstance(result, SendToPeer):
        assert klass == MessageClass.INDICATION and method == Method.SEND, (header, result)
        _check_send_to_peer(run, five_tuple, result)
        return
    assert isinstance(result, bytes), f"unexpected answer type {type(result).__name__}"
    assert klass == MessageClass.REQUEST, f"a {klass!r} was answered"
    reply = decode_message(result)  # raises if the core wrote something undecodable
    assert reply.transaction_id == tid, "answer with another transaction ID"
    assert reply.method == method, (reply.method, method)
    assert reply.msg_class in (MessageClass.SUCCESS, MessageClass.ERROR), reply.msg_class
    if reply.msg_class == MessageClass.ERROR:
        error = reply.get(Attr.ERROR_CODE)
        assert isinstance(error, tuple) and 300 <= error[0] <= 699, reply
        code = error[0]
        if code in (401, 438):
            assert Attr.REALM in reply and Attr.NONCE in reply, f"challenge without REALM/NONCE: {reply!r}"
            assert Attr.MESSAGE_INTEGRITY not in reply and Attr.MESSAGE_INTEGRITY_SHA256 not in reply
            run.challenge_nonce[five_tuple[1][0]] = reply.get(Attr.NONCE)  # type: ignore[assignment]
        run.answers[(int(method), code)] += 1
        return
    run.answers[(int(method), 200)] += 1
    if method == Method.BINDING:
        assert reply.get(Attr.XOR_MAPPED_ADDRESS) == five_tuple[1], reply
        return
    assert method in (Method.ALLOCATE, Method.REFRESH, Method.CREATE_PERMISSION, Method.CHANNEL_BIND), reply
    if built is None:
        return  # raw bytes: maybe a replay of a valid request, nothing more to expect
    _, mode, key, integrity, username = built
    assert mode in _CAN_SUCCEED or mode == "raw", f"success for a request in auth mode {mode!r}"
    if method == Method.ALLOCATE and before is not None and before.transaction_id == tid \
            and before.expires_at > run.now:
        assert result == before.response, "a retransmitted Allocate got another answer"
        return
    assert key is not None
    if integrity in ("sha1", "both"):
        assert verify_message_integrity(reply, key), "success without a valid MESSAGE-INTEGRITY"
    if integrity in ("sha256", "both"):
        assert verify_message_integrity_sha256(reply, key), "success without MESSAGE-INTEGRITY-SHA256"
    if method == Method.ALLOCATE:
        assert not _expired(username, run.h.wall[0]), f"Allocate for expired {username!r}"
        allocation = core.allocations.get(five_tuple)
        assert allocation is not None and allocation.alive, "Allocate succeeded but no allocation"
        assert allocation.sink == SINKS[client]
        assert allocation.username == username, (allocation.username, username)
        relayed = reply.get_all(Attr.XOR_RELAYED_ADDRESS)
        external = core.config.external_addresses
        assert sorted(relayed) == sorted(  # type: ignore[type-var]
            ((external.get(r.address[0], r.address[0]), r.address[1]) for r in allocation.relays))
        token = reply.get(Attr.RESERVATION_TOKEN)
        if isinstance(token, bytes):
            run.tokens.append(token)
    else:
        assert before is not None and before.username == username, "success on another user's allocation"
        if method == Method.REFRESH and reply.get(Attr.LIFETIME) == 0:
            assert five_tuple not in core.allocations, "Refresh with lifetime 0 left the allocation"
        if method == Method.REFRESH and _expired(username, run.h.wall[0]):
            assert core.config.allow_refresh_after_expiry, "Refresh for an expired username"


def _check_send_to_peer(run: CoreRun, five_tuple: Any, result: SendToPeer) -> None:
    allocation = run.h.core.allocations.get(five_tuple)
    assert allocation is not None and allocation.expires_at > run.now, "relayed without an allocation"
    assert result.relay in allocation.relays, "relayed through another allocation's relay"
    assert result.relay in run.ports.open, "relayed through a released relay"
    assert allocation.permissions.get(result.peer[0], 0.0) > run.now, f"no permission for {result.peer}"
    assert run.h.core.policy.check(result.peer[0], result.peer[1]).allowed, f"policy refuses {result.peer}"
    assert (":" in result.peer[0]) == (":" in result.relay.address[0]), "relay of the wrong family"
    run.sent_to_peer += 1


def _op_stun(run: CoreRun, r: Reader, kind: int) -> None:
    client = r.u8() % len(CLIENTS)
    built: Built | None = None
    if kind == 0:
        built = _build_request(run, r, client)
        data = run.last_request = built[0]
    elif kind == 1:
        built = _signed_raw(run, r, client)
        data = run.last_request = built[0]
    elif kind == 2:
        data = _raw_message(run, r)
    else:
        attrs: list[tuple[int, object]] = [(Attr.XOR_PEER_ADDRESS, _peer(r)), (Attr.DATA, r.take(r.u8()))]
        for _ in range(r.u8() % 3):
            item = _attribute(run, r)
            if item is not None:
                attrs.insert(r.u8() % (len(attrs) + 1), item)
        data = encode_message(Message(Method.SEND, MessageClass.INDICATION, _tid(run, client, r), attrs))
    five_tuple = CLIENTS[client]
    before = run.h.core.allocations.get(five_tuple)
    result = run.h.core.handle_stun(data, five_tuple, run.now, SINKS[client])
    _check_reply(run, client, data, result, built, before)
    if isinstance(result, SendToPeer) and kind == 3:
        assert result.data == decode_message(data).get(Attr.DATA)


def _op_channel_data(run: CoreRun, r: Reader) -> None:
    client = r.u8() % len(CLIENTS)
    five_tuple = CLIENTS[client]
    allocation = run.h.core.allocations.get(five_tuple)
    bound = sorted(allocation.channels) if allocation is not None else []
    use_bound, index, raw_number = r.u8() < 200, r.u8(), r.u16()
    if bound and use_bound:
        number = bound[index % len(bound)]
    else:
        number = (_CHANNELS + (raw_number,))[index % (len(_CHANNELS) + 1)]
    payload = r.take(r.u8())
    lie, raw_length = r.u8() >= 220, r.u16()
    length = raw_length if lie else len(payload)
    data = struct.pack("!HH", number, length) + payload
    if r.flag():
        data += r.take(3)  # UDP padding, or junk after the frame
    result = run.h.core.handle_channel_data(data, five_tuple, run.now)
    if result is None:
        return
    assert isinstance(result, SendToPeer), type(result)
    assert allocation is not None
    channel = allocation.channels.get(number)
    assert channel is not None and channel.expires_at > run.now, f"unbound channel 0x{number:04x} relayed"
    # The declared length rules: bytes after the payload (padding, junk) are data when the
    # length covers them.
    assert result.peer == channel.peer and result.data == data[4:4 + length], result
    _check_send_to_peer(run, five_tuple, result)


def _op_peer_data(run: CoreRun, r: Reader) -> None:
    core = run.h.core
    relays = run.ports.handed + [FakeRelay(("192.0.2.1", 49999))]
    relay = r.pick(relays)
    peer = _peer(r)
    size = r.u8()
    payload = r.take(size) if size < 250 else bytes(r.pick((1500, 65507, 65535 - 28, 65535 - 27, 65536)))
    owner = next((a for a in core.allocations.values() if relay in a.relays), None)
    result = core.handle_peer_data(relay, payload, peer, run.now)
    if result is None:
        return
    assert owner is not None and owner.alive and owner.expires_at > run.now, "peer data for no allocation"
    assert relay in run.ports.open
    assert owner.permissions.get(peer[0], 0.0) > run.now, f"peer data from {peer} without permission"
    sink, frame = result
    assert sink == owner.sink
    if 0x40 <= frame[0] <= 0x7F:
        number, data = decode_channel_data(frame, max_channel=0x7FFF)
        channel = owner.peer_channels.get(peer)
        assert channel is not None and channel.number == number and channel.expires_at > run.now
        assert data == payload
        if owner.five_tuple[0] != "udp":
            assert len(frame) % 4 == 0, "unpadded ChannelData on a stream"
    else:
        indication = decode_message(frame)
        assert (indication.method, indication.msg_class) == (Method.DATA, MessageClass.INDICATION)
        assert indication.get(Attr.DATA) == payload
        external = core.config.external_addresses
        shown = indication.get(Attr.XOR_PEER_ADDRESS)
        assert _same_address(shown, (external.get(peer[0], peer[0]), peer[1])), (shown, peer)
    run.to_client += 1
    # A sink with a full buffer (a stream client that does not read), chosen by the length so
    # that the input format stays as it was: the I/O layer reports the drop to the core.
    if len(payload) % 4 == 3:
        counted = owner.bytes_to_client, owner.packets_to_client
        core.peer_data_dropped(relay, len(payload))
        assert (owner.bytes_to_client, owner.packets_to_client) == (counted[0] - len(payload), counted[1] - 1)
    else:
        run.delivered[0] += len(payload)
        run.delivered[1] += 1


_STEPS = (0.0, 1.0, 29.0, 31.0, 121.0, 299.0, 301.0, 599.0, 601.0, 3601.0)


def _op_time(run: CoreRun, r: Reader) -> None:
    index, raw_step = r.u8(), r.u16()
    step = (_STEPS + (float(raw_step % 4000),))[index % (len(_STEPS) + 1)]
    core = run.h.core
    if r.flag():
        deadline = core.next_deadline()
        if deadline is not None and deadline > run.now:
            step = deadline - run.now
    run.now += step
    run.h.wall[0] += step
    if r.u8() < 220:
        core.handle_timer(run.now)
        _check_expired_gone(run)


def _check_expired_gone(run: CoreRun) -> None:
    """After ``handle_timer(now)`` nothing that expired by ``now`` is left."""
    now = run.now
    for allocation in run.h.core.allocations.values():
        assert allocation.expires_at > now, "an expired allocation outlived handle_timer"
        for ip, expires_at in allocation.permissions.items():
            assert expires_at > now, f"an expired permission for {ip} outlived handle_timer"
        for channel in allocation.channels.values():
            assert channel.expires_at > now, "an expired channel outlived handle_timer"
    reservations = getattr(run.h.core, "_reservations", None)
    if isinstance(reservations, dict):
        for entry in reservations.values():
            assert entry[1] > now, f"an expired reservation {entry[0]!r} outlived handle_timer"


def _policy(allow: tuple[str, ...], external: dict[str, str]) -> PeerPolicy:
    return PeerPolicy(allow=allow, relay_addresses=("192.0.2.1", "2001:db8::1"),
                      external_addresses={e: b for b, e in external.items()},
                      relay_port_range=(50000, 50099), listening=[("192.0.2.1", 3478)])


def _nonce_manager(key: bytes, wall: list[float]) -> NonceManager:
    kwargs: dict[str, Any] = {"key": key, "lifetime_s": 600, "wall_clock": lambda: wall[0]}
    if "random_bytes" in inspect.signature(NonceManager).parameters:
        counter = itertools.count()
        kwargs["random_bytes"] = lambda n: bytes((next(counter) + i) % 256 for i in range(n))
    return NonceManager(**kwargs)


def _op_reconfigure(run: CoreRun, r: Reader) -> None:
    core = run.h.core
    wall = run.h.wall
    which = r.u8() % 5
    external = dict(core.config.external_addresses)
    if which == 0:
        core.reconfigure(policy=_policy(r.pick((("2001:db8::/32",), ("203.0.113.50/32",), ALLOWED, ())), external))
    elif which == 1:
        old = core.config
        new = dataclasses.replace(
            old, default_lifetime_s=r.pick((600, 60, 3600)), max_lifetime_s=r.pick((3600, 600, 7200)),
            user_quota=r.pick((old.user_quota, 0, 1, 2)), max_allocations=r.pick((old.max_allocations, 0, 1, 2)),
            allow_refresh_after_expiry=r.flag(), legacy_channel_numbers=r.flag())
        limits = r.u8()
        for bit, values in _LIMITS.items():
            if limits & bit:
                new = dataclasses.replace(new, **{k: v for k, v in values.items() if k in _CONFIG_FIELDS})
        run.limits_changed = True
        core.reconfigure(config=new)
    elif which == 2:
        secrets = r.pick(([b"rotated", SECRET], [b"rotated"], [SECRET]))
        core.reconfigure(credentials=CredentialStore(
            realm=REALM, secrets=secrets, static_users={STATIC_USER: STATIC_PASSWORD},
            wall_clock=lambda: wall[0]))
    elif which == 3:
        core.reconfigure(nonces=_nonce_manager(r.pick((b"k" * 32, b"n" * 32)), wall))
    else:
        core.draining = not core.draining


def _check_delivered(run: CoreRun) -> None:
    """Bytes and datagrams counted toward clients, live and ended allocations together, are
    what the sinks took."""
    core = run.h.core
    counted = [sum(a.bytes_to_client for a in core.allocations.values()),
               sum(a.packets_to_client for a in core.allocations.values())]
    for (direction, _), (nbytes, packets) in core.stats.ended_traffic.items():
        if direction == "peer_to_client":
            counted[0] += nbytes
            counted[1] += packets
    assert counted == run.delivered, f"counted toward clients {counted} != delivered {run.delivered}"


def _check_core(run: CoreRun) -> None:
    """The bookkeeping that must hold between any two calls."""
    core = run.h.core
    stats = core.stats
    assert stats.dropped["internal_error"] == 0, "the core's last-resort handler had to step in"
    assert not run.ports.bad_releases, run.ports.bad_releases
    live_relays: set[Any] = set()
    for five_tuple, allocation in core.allocations.items():
        assert allocation.alive, "a dead allocation in core.allocations"
        assert allocation.five_tuple == five_tuple
        assert allocation.timer_at is not None and allocation.timer_at <= allocation.expires_at, \
            "an allocation without a deadline heap entry at or before its expiry"
        for relay in allocation.relays:
            assert relay not in live_relays, f"{relay!r} shared by two allocations"
            live_relays.add(relay)
        assert len({r.address[0].count(":") > 0 for r in allocation.relays}) == len(allocation.relays)
        assert len(allocation.peer_channels) == len(allocation.channels)
        for number, channel in allocation.channels.items():
            assert channel.number == number
            assert allocation.peer_channels.get(channel.peer) is channel, "channel maps out of step"
            assert channel.timer_at is not None and channel.timer_at <= channel.expires_at, \
                "a channel without a deadline heap entry at or before its expiry"
        for ip, expires_at in allocation.permissions.items():
            when = allocation.permission_timers.get(ip)
            assert when is not None and when <= expires_at, f"permission {ip} without a heap entry"
    reservations = getattr(core, "_reservations", None)
    reserved = set()
    if isinstance(reservations, dict):
        reserved = {entry[0] for entry in reservations.values()}
        assert not reserved & live_relays, "a reserved relay is also an allocation's"
        assert live_relays | reserved == run.ports.open, (
            f"relays handed out and not released {run.ports.open} != "
            f"relays of allocations and reservations {live_relays | reserved}")
    else:
        assert live_relays <= run.ports.open, "an allocation holds a released relay"
    created = sum(stats.allocations_created.values())
    ended = sum(stats.allocations_ended.values())
    assert created - ended == len(core.allocations), (created, ended, len(core.allocations))
    # Quotas count allocations (and, where reservations carry their user, reservations) by
    # whom they are counted against.
    held = Counter(getattr(a, "quota_key", a.username) for a in core.allocations.values())
    if isinstance(reservations, dict):
        held.update(entry[2] for entry in reservations.values() if len(entry) > 2)
    quotas = core.quotas
    counts = {key: quotas.user_count(key) for key in held}
    assert counts == dict(held), f"user counts {counts} != what is held {dict(held)}"
    assert quotas.total() == sum(held.values()), (quotas.total(), dict(held))
    config = core.config
    if not run.limits_changed:
        per_user = Counter(a.username for a in core.allocations.values())
        if config.user_quota:
            assert max(per_user.values(), default=0) <= config.user_quota, f"over user_quota: {per_user}"
        if config.max_allocations:
            assert len(core.allocations) <= config.max_allocations, "over max_allocations"
        permissions_cap = getattr(config, "max_permissions_per_allocation", 0)
        channels_cap = getattr(config, "max_channels_per_allocation", 0)
        for allocation in core.allocations.values():
            live = [e for e in allocation.permissions.values() if e > run.now]
            assert not permissions_cap or len(live) <= permissions_cap, "over the permission cap"
            assert not channels_cap or len(allocation.channels) <= channels_cap, "over the channel cap"
    routes = getattr(core, "_routes", None)
    if isinstance(routes, dict):
        expected = {(a.five_tuple, n) for a in core.allocations.values() for n in a.channels}
        assert set(routes) == expected, "ChannelData routes out of step with the channels"
    by_relay = getattr(core, "_by_relay", None)
    if isinstance(by_relay, dict):
        assert {relay: a for a in core.allocations.values() for relay in a.relays} == by_relay, \
            "relay lookup out of step with the allocations"
    _check_delivered(run)


_OPS: tuple[Callable[[CoreRun, Reader], None], ...] = (
    lambda run, r: _op_stun(run, r, 0),
    lambda run, r: _op_stun(run, r, 0),
    lambda run, r: _op_stun(run, r, 0),
    lambda run, r: _op_stun(run, r, 1),
    lambda run, r: _op_stun(run, r, 2),
    lambda run, r: _op_stun(run, r, 3),
    _op_channel_data,
    _op_channel_data,
    _op_peer_data,
    _op_peer_data,
    _op_time,
    _op_time,
    lambda run, r: run.h.core.connection_closed(CLIENTS[r.u8() % len(CLIENTS)], run.now),
    _op_reconfigure,
)
OP_NAMES = ("request", "request", "request", "signed_raw", "raw", "send", "channel_data",
            "channel_data", "peer_data", "peer_data", "time", "time", "close", "reconfigure")
MAX_OPS = 64


def run_core(data: bytes) -> CoreRun:
    """Input: two bytes of configuration flags (``_core_for``), then operations until the bytes or ``MAX_OPS`` run out.

    Each operation is one byte choosing among ``OP_NAMES`` (modulo their number) followed by
    what that operation reads. After every operation ``_check_core`` runs; at the end the core
    is shut down and must have released every relay.
    """
    r = Reader(data)
    run = _core_for(r.u8(), r.u8())
    for _ in range(MAX_OPS):
        if not r.remaining():
            break
        index = r.u8() % len(_OPS)
        run.ops[OP_NAMES[index]] += 1
        _OPS[index](run, r)
        _check_core(run)
    core = run.h.core
    core.shutdown(run.now)
    assert not core.allocations, "allocations left after shutdown"
    _check_delivered(run)
    assert not run.ports.open, f"relays left open after shutdown: {run.ports.open}"
    assert not run.ports.bad_releases, run.ports.bad_releases
    assert core.stats.dropped["internal_error"] == 0
    return run


def turn_core(data: bytes) -> None:
    run_core(data)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "stun_decode": stun_decode,
    "stream_framer": stream_framer,
    "turn_core": turn_core,
}


# ============================================================================ seed inputs


class CoreInput:
    """Writes operations in :func:`run_core`'s format (for seeds and tests)."""

    def __init__(self, flags: int = 0, limits: int = 0) -> None:
        self.parts = [bytes([flags, limits])]

    def _op(self, name: str, *fields: int | bytes) -> CoreInput:
        self.parts.append(bytes([OP_NAMES.index(name)]))
        for value in fields:
            self.parts.append(bytes([value]) if isinstance(value, int) else value)
        return self

    def request(self, client: int, method: int, mode: str = "md5", user: int = 0,
                extra: bytes = b"", template: bool = True, fingerprint: bool = False,
                peers: tuple[bytes, ...] = (), channel: int = 0) -> CoreInput:
        """A built request. ``extra`` is the raw attribute-count byte and attribute fields;
        ``peers`` (see :meth:`peer`) and ``channel`` (an index into ``_CHANNELS``) fill the
        CreatePermission and ChannelBind templates."""
        parts: list[int | bytes] = [client, _METHODS.index(method), 0 if template else 255]
        if method == Method.CHANNEL_BIND and template:
            parts += [channel, *(peers[:1] or [self.peer(0)])]
        elif method == Method.CREATE_PERMISSION and template:
            chosen = peers or (self.peer(2),)
            parts += [len(chosen) - 1, *chosen]
        elif method == Method.REFRESH and template:
            parts += [0]  # no LIFETIME
        parts += [extra or b"\0", _AUTH_MODES.index(mode), user, 255, 0 if fingerprint else 255]
        if mode == "garbage_nonce":
            parts += [0]
        return self._op("request", *parts)

    @staticmethod
    def peer(index: int) -> bytes:
        """``PEERS[index]``."""
        return bytes([index])

    @staticmethod
    def ipv4_peer(ip: str, port: int) -> bytes:
        """Any IPv4 peer."""
        return bytes([201]) + ipaddress.IPv4Address(ip).packed + struct.pack("!H", port)

    def send(self, client: int, peer: int, payload: bytes) -> CoreInput:
        return self._op("send", client, peer, len(payload), payload, 0, 255)

    def channel_data(self, client: int, bound_index: int, payload: bytes) -> CoreInput:
        """ChannelData on the ``bound_index``-th bound channel of the client's allocation."""
        return self._op("channel_data", client, 0, bound_index, b"\0\0", len(payload), payload,
                        b"\0\0\0", 0)

    def peer_data(self, relay: int, peer: int | bytes, payload: bytes) -> CoreInput:
        return self._op("peer_data", relay, peer, len(payload), payload)

    def big_peer_data(self, relay: int, peer: int | bytes, size_index: int) -> CoreInput:
        """A datagram of one of the large sizes ``_op_peer_data`` knows."""
        return self._op("peer_data", relay, peer, 255, size_index)

    def time(self, step_index: int, timer: bool = True) -> CoreInput:
        """Let ``_STEPS[step_index]`` seconds pass, then run the timers (or not)."""
        return self._op("time", step_index, b"\0\0", 0, 0 if timer else 255)

    def close(self, client: int) -> CoreInput:
        return self._op("close", client)

    def raw(self, client: int, data: bytes) -> CoreInput:
        return self._op("raw", client, 0, len(data) >> 8, len(data) & 255, data)

    def build(self) -> bytes:
        return b"".join(self.parts)


def seed_inputs() -> dict[str, dict[str, bytes]]:
    """The seed corpus: name -> input, per target."""
    from tests.unit.test_stun_vectors import ALL_VECTORS, RFC8489_B1

    allocate = encode_message(Message(Method.ALLOCATE, MessageClass.REQUEST, bytes(range(12)),
                                      [(Attr.REQUESTED_TRANSPORT, 17), (Attr.USERNAME, USERS[0][0]),
                                       (Attr.REALM, REALM), (Attr.NONCE, "n" * 32)]),
                              key=_key(*USERS[0], ALGORITHM_MD5), fingerprint=True)
    bind = encode_message(Message(Method.CHANNEL_BIND, MessageClass.REQUEST, bytes(12),
                                  [(Attr.CHANNEL_NUMBER, 0x4000), (Attr.XOR_PEER_ADDRESS, PEERS[3]),
                                   (Attr.USERNAME, "u"), (Attr.REALM, REALM), (Attr.NONCE, "n")]),
                          key=b"k" * 16, integrity="both")
    send = encode_message(Message(Method.SEND, MessageClass.INDICATION, bytes(12),
                                  [(Attr.XOR_PEER_ADDRESS, PEERS[0]), (Attr.DATA, b"hello"),
                                   (Attr.DONT_FRAGMENT, None)]))
    response = encode_message(Message(Method.ALLOCATE, MessageClass.ERROR, bytes(12), [
        (Attr.ERROR_CODE, (401, "Unauthorized")), (Attr.REALM, REALM), (Attr.NONCE, "n"),
        (Attr.PASSWORD_ALGORITHMS, _PASSWORD_ALGORITHMS), (Attr.UNKNOWN_ATTRIBUTES, [0x30, 0x31])]))
    channel = encode_channel_data(0x4001, b"media", pad=True)

    def raw_message(msg_type: int, *attrs: tuple[int, bytes]) -> bytes:
        body = b"".join(struct.pack("!HH", t, len(v)) + v + bytes(-len(v) & 3) for t, v in attrs)
        return struct.pack("!HHI", msg_type, len(body), MAGIC_COOKIE) + bytes(range(12)) + body

    # Longer than an encoder may write, as long as a decoder must take (RFC 8489 §14.3, §14.8).
    long_text = raw_message(0x0003, (Attr.USERNAME, b"u" * 510), (Attr.REALM, "\u00e9".encode() * 300))
    long_reason = raw_message(0x0113, (Attr.ERROR_CODE, b"\0\0\x04\x01" + b"r" * 700))
    decode = {f"rfc5769_{i}": v for i, v in enumerate(ALL_VECTORS)}
    decode.update(rfc8489_b1=RFC8489_B1, allocate=allocate, channel_bind=bind, send=send,
                  error_401=response, channel_data=channel, long_text=long_text, long_reason=long_reason)

    stream = b"".join([allocate, channel, send, encode_channel_data(0x4FFF, b"abcdefg", pad=True), bind])
    framer = {
        "exchange": bytes([0, 3]) + struct.pack("!HHH", 7, 100, 200) + stream,
        "vectors_small_limit": bytes([1, 2]) + struct.pack("!HH", 1, 21) + b"".join(ALL_VECTORS),
        "legacy_channel": bytes([4, 1]) + struct.pack("!H", 5) + encode_channel_data(0x7000, b"x" * 9, pad=True,
                                                                                      max_channel=0x7FFF),
    }

    exchange = (CoreInput()
                .request(0, Method.ALLOCATE, mode="none")
                .request(0, Method.ALLOCATE)
                .request(0, Method.CREATE_PERMISSION)
                .request(0, Method.CHANNEL_BIND)
                .channel_data(0, 0, b"to the peer")
                .peer_data(0, 0, b"from the peer")
                .send(0, 2, b"send indication")
                .peer_data(0, 2, b"data indication")
                .time(5)
                .request(0, Method.REFRESH)
                .request(0, Method.BINDING, mode="none")
                .build())
    stream_client = (CoreInput(flags=16)
                     .request(2, Method.ALLOCATE, mode="sha256", user=1)
                     .request(2, Method.CHANNEL_BIND, mode="sha256", user=1)
                     .peer_data(0, 0, b"padded")
                     .close(2)
                     .request(3, Method.ALLOCATE, mode="userhash")
                     .time(9)
                     .build())
    churn = (CoreInput(flags=2 | 4 | 32)
             .request(0, Method.ALLOCATE, user=0)
             .request(1, Method.ALLOCATE, user=0, mode="both")
             .request(2, Method.ALLOCATE, user=0)
             .request(3, Method.ALLOCATE, user=4)
             .time(8)
             .request(0, Method.ALLOCATE, user=2)
             .raw(0, allocate)
             .build())
    peers = [CoreInput.ipv4_peer(f"203.0.113.{70 + i}", 6000) for i in range(4)]
    limits = (CoreInput(limits=1 | 2)  # 3 permissions, 2 channels, 3000 bytes/s
              .request(0, Method.ALLOCATE)
              .request(0, Method.CREATE_PERMISSION, peers=tuple(peers))  # more than fit
              .request(0, Method.CREATE_PERMISSION, peers=tuple(peers[:3]))
              .request(0, Method.CREATE_PERMISSION, peers=(CoreInput.peer(2),))  # a fourth
              .request(0, Method.CHANNEL_BIND, channel=0, peers=(peers[0],))
              .request(0, Method.CHANNEL_BIND, channel=1, peers=(peers[1],))
              .request(0, Method.CHANNEL_BIND, channel=2, peers=(peers[2],))  # a third
              .big_peer_data(0, peers[0], 0)
              .big_peer_data(0, peers[1], 0)
              .big_peer_data(0, peers[2], 0)  # past the 3000 bytes of burst
              .build())
    core = {"exchange": exchange, "stream_client": stream_client, "churn": churn, "limits": limits}
    return {"stun_decode": decode, "stream_framer": framer, "turn_core": core}
